"""Qwen3-VL-MoE (`qwen3_vl_moe`): Qwen3-VL with routed-expert MLPs in the text decoder.

Everything the adapter touches is Qwen3-VL's: the vision tower with DeepStack, the text attention (softmax in every
layer, so every layer gives maps), the decoder call and `generate` through `mm_encoder_outputs`; only the classes and
the presets differ. Frozen and in eval mode the router only picks each token's experts: no auxiliary load-balancing
loss is computed (`output_router_logits` stays off) and no routing state is kept between calls.
"""

from __future__ import annotations

from transformers.models.qwen3_vl_moe import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from flmm_model.backbones import qwen3_vl
from flmm_model.backbones.adapter import BackboneAdapter, all_layers
from flmm_model.backbones.mrope import mrope_position_ids
from flmm_model.backbones.tokenizers import qwen2_tokenizer
from flmm_model.backbones.video import unit_time_interval


def qwen3_vl_moe_tiny() -> Qwen3VLMoeConfig:
    """Tests: Qwen3-VL's tiny preset with 4 experts (2 per token) of width 32 in each of its 3 text layers."""
    return qwen3_vl.make_config(
        text=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  mrope_section=[2, 3, 3], initializer_range=0.2, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, intermediate_size=128),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 1], initializer_range=0.2),
        config_class=Qwen3VLMoeConfig,
    )


def qwen3_vl_30b_a3b() -> Qwen3VLMoeConfig:
    """Qwen3-VL-30B-A3B-Instruct: 48 layers (48 x 32 = 1536 map channels), hidden 2048, 32 / 4 heads of 128, 128
    experts of width 768 (8 per token); the 27-block ViT of Qwen3-VL-8B. Shapes from public training recipes of the
    released checkpoint (Megatron arguments: layers, widths, heads, experts, RoPE theta 5e6)."""
    return qwen3_vl.make_config(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                  moe_intermediate_size=768),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
        config_class=Qwen3VLMoeConfig,
    )


ADAPTER = BackboneAdapter(
    model_type="qwen3_vl_moe",
    name="Qwen3-VL-MoE",
    config_class=Qwen3VLMoeConfig,
    model_class=Qwen3VLMoeForConditionalGeneration,
    presets={"qwen3_vl_moe_tiny": qwen3_vl_moe_tiny, "qwen3_vl_30b_a3b": qwen3_vl_30b_a3b},
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    image_block="<|vision_start|><|image_pad|><|vision_end|>",
    default_system=None,
    encode_images=qwen3_vl.encode_images,
    vision_inputs=qwen3_vl.vision_inputs,
    run_decoder=qwen3_vl.run_decoder,
    position_ids=mrope_position_ids,
    generate=qwen3_vl.generate,
    default_tokenizer=qwen2_tokenizer,
    map_layers=all_layers,
    video_time_interval=unit_time_interval,  # groups are t = 1 blocks of their own
    timestamped_video=True,
)

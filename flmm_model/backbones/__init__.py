"""Backbone adapters: one per Qwen-VL family, chosen from `config.model_type`, and the builders that use them.

    ADAPTERS              model_type -> BackboneAdapter (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5,
                          qwen3_5_moe)
    adapter_for           the adapter of a model / config / model_type (ValueError listing the supported ones)
    PRESETS               preset name -> (model_type, config builder): tiny / mid / real shapes of every family
    qwen_config           the config of a preset
    build_qwen            a local checkpoint directory (its config.json names the family) or a preset (random weights)
    load_image_processor  the family's image processor (patch 14 or 16, its mean / std) with your pixel budget

A new family = one module with an `ADAPTER` + one entry in `ADAPTERS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5 import Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_5_moe import Qwen3_5MoeForConditionalGeneration
from transformers.models.qwen3_vl import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from flmm_model.backbones import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl, qwen3_vl_moe
from flmm_model.backbones.adapter import BackboneAdapter, VisionFeatures

# What `FrozenQwenLMM(qwen=...)` accepts: the model classes of the supported families.
QwenVLModel = (Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration
               | Qwen3VLMoeForConditionalGeneration | Qwen3_5ForConditionalGeneration
               | Qwen3_5MoeForConditionalGeneration)

ADAPTERS: dict[str, BackboneAdapter] = {
    adapter.model_type: adapter
    for adapter in (qwen2_vl.ADAPTER, qwen2_5_vl.ADAPTER, qwen3_vl.ADAPTER, qwen3_vl_moe.ADAPTER, qwen3_5.ADAPTER,
                    qwen3_5.MOE_ADAPTER)
}

PRESETS: dict[str, tuple[str, Callable[[], PretrainedConfig]]] = {
    name: (adapter.model_type, builder) for adapter in ADAPTERS.values() for name, builder in adapter.presets.items()
}

__all__ = ["ADAPTERS", "PRESETS", "BackboneAdapter", "QwenVLModel", "VisionFeatures", "adapter_for", "build_qwen",
           "load_image_processor", "model_type_of", "qwen_config"]


def adapter_for(config_or_model: PretrainedConfig | PreTrainedModel | str) -> BackboneAdapter:
    """The adapter of a model, a config, or a `model_type` string.

    Raises:
        ValueError: the model type is not one of the supported families (the message lists them).
    """
    if isinstance(config_or_model, str):
        model_type = config_or_model
    else:
        config = getattr(config_or_model, "config", config_or_model)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"backbone: model_type {model_type!r} is not supported; expected one of "
                         f"{sorted(ADAPTERS)} ({', '.join(adapter.name for adapter in ADAPTERS.values())})")
    return ADAPTERS[model_type]


def model_type_of(path_or_preset: str) -> str:
    """The family of a preset name or a local checkpoint directory (its config.json `model_type`), without loading.

    Raises:
        ValueError: neither a preset nor a directory with a config.json.
    """
    if path_or_preset in PRESETS:
        return PRESETS[path_or_preset][0]
    config_file = os.path.join(path_or_preset, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"qwen: expected a local checkpoint directory (with a config.json) or one of the presets "
                         f"{sorted(PRESETS)}, found {path_or_preset!r}")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type", "")


def qwen_config(preset: str, *, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The config of a named preset (see `PRESETS`), of its family's config class."""
    if preset not in PRESETS:
        raise ValueError(f"qwen preset: expected a local checkpoint directory or one of {sorted(PRESETS)}, "
                         f"found {preset!r}")
    config = PRESETS[preset][1]()
    config._attn_implementation = attn_implementation
    return config


def build_qwen(
    path_or_preset: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0
) -> QwenVLModel:
    """A Qwen-VL model from a local checkpoint directory (the class its config.json names), or a named preset with
    random weights (seeded).

    Raises:
        ValueError: unknown preset, or a checkpoint of an unsupported family.
    """
    if os.path.isdir(path_or_preset):
        adapter = adapter_for(model_type_of(path_or_preset))
        return adapter.model_class.from_pretrained(path_or_preset, dtype=dtype,
                                                   attn_implementation=attn_implementation)
    config = qwen_config(path_or_preset, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return adapter_for(config).model_class(config).to(dtype)


def load_image_processor(
    backbone: BackboneAdapter | str = "qwen2_5_vl", *, min_pixels: int = 56 * 56, max_pixels: int = 672 * 672
) -> Qwen2VLImageProcessorPil:
    """The image processor of a family (PIL backend: no torchvision), with your pixel budget.

    Patch, merge and temporal patch sizes and the normalization come from the adapter (the same for every released
    size of a family), so no checkpoint file is read. The default budget caps an image at 576 vision tokens for
    14-pixel patches (441 for Qwen3-VL's 16-pixel ones). Qwen3-VL's processor is this class with other settings.

    Args:
        backbone: an adapter or a `model_type` ("qwen2_vl", "qwen2_5_vl", "qwen3_vl").
        min_pixels, max_pixels: the resized image's area range (each side a multiple of patch_size * merge_size).
    """
    adapter = backbone if isinstance(backbone, BackboneAdapter) else adapter_for(backbone)
    if min_pixels > max_pixels:
        raise ValueError(f"image processor: min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=adapter.patch_size, merge_size=adapter.merge_size,
        temporal_patch_size=adapter.temporal_patch_size, image_mean=list(adapter.image_mean),
        image_std=list(adapter.image_std),
    )

"""Backbone adapters: selection by model_type, presets (tiny and released shapes), image processors, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from flmm_model import build
from flmm_model.backbones import (
    ADAPTERS,
    PRESETS,
    adapter_for,
    build_qwen,
    load_image_processor,
    model_type_of,
    qwen_config,
)
from flmm_model.modeling.lmm import FrozenQwenLMM

TINY = {"qwen2_vl": "qwen2_vl_tiny", "qwen2_5_vl": "tiny", "qwen3_vl": "qwen3_vl_tiny",
        "qwen3_vl_moe": "qwen3_vl_moe_tiny", "qwen3_5": "qwen3_5_tiny", "qwen3_5_moe": "qwen3_5_moe_tiny"}
CLASS_NAMES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
               "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
PATCH_16 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # Qwen3-VL's vision tower

# Parameter counts of the released checkpoints (the safetensors totals the Hugging Face Hub shows for
# Qwen/<name>-Instruct); a preset with the wrong shape anywhere (width, depth, vocabulary, tying) misses them.
RELEASED_PARAMETERS = {
    "qwen2_vl_2b": 2_208_985_600,
    "qwen2_vl_7b": 8_291_375_616,
    "qwen2_5_vl_3b": 3_754_622_976,
    "qwen2_5_vl_7b": 8_292_166_656,
    "qwen3_vl_2b": 2_127_532_032,
    "qwen3_vl_4b": 4_437_815_808,
    "qwen3_vl_8b": 8_767_123_696,
}


def test_every_family_has_an_adapter_found_from_model_config_or_name():
    assert sorted(ADAPTERS) == ["qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe"]
    for model_type, preset in TINY.items():
        config = qwen_config(preset)
        assert adapter_for(config) is adapter_for(model_type) is ADAPTERS[model_type]
        assert type(config) is ADAPTERS[model_type].config_class
        assert ADAPTERS[model_type].model_class.__name__ == CLASS_NAMES[model_type]


def test_adapter_for_a_model_reads_its_config(tiny_qwen):
    assert adapter_for(tiny_qwen).model_type == "qwen2_5_vl"


def test_unsupported_model_type_is_rejected_with_the_supported_ones_listed(tmp_path):
    expected = (r"model_type 'llama' is not supported; expected one of \['qwen2_5_vl', 'qwen2_vl', 'qwen3_5', "
                r"'qwen3_5_moe', 'qwen3_vl', 'qwen3_vl_moe'\]")
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ValueError, match=expected):
        adapter_for(config)
    with pytest.raises(ValueError, match=expected):
        FrozenQwenLMM(qwen=LlamaForCausalLM(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=expected):
        build_qwen(str(tmp_path))


def test_presets_keep_the_old_names_and_cover_every_family():
    for name in ("tiny", "mid", "qwen2_5_vl_3b", "qwen2_5_vl_7b"):  # used by configs, tests and benchmarks
        assert PRESETS[name][0] == "qwen2_5_vl"
    for name in ("qwen2_vl_tiny", "qwen2_vl_2b", "qwen2_vl_7b"):
        assert PRESETS[name][0] == "qwen2_vl"
    for name in ("qwen3_vl_tiny", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"):
        assert PRESETS[name][0] == "qwen3_vl"
    assert set(build.QWEN_ARCHS) == set(PRESETS)  # config checks and the CLI read the names there
    for name, (model_type, _) in PRESETS.items():
        assert model_type_of(name) == model_type
        assert type(qwen_config(name)) is ADAPTERS[model_type].config_class
    with pytest.raises(ValueError, match=r"qwen preset: expected a local checkpoint directory or one of \["):
        qwen_config("qwen9_vl_1b")


# The newer families' released totals were not at hand (no Hub access): their presets must come within 3% of the
# size in the checkpoint's name (the 9B is 9.4B without its multi-token-prediction layer, which transformers does not
# build; Qwen3-VL-30B-A3B is 31.1B). A wrong width, depth or expert count misses by far more.
NAMED_SIZES = {"qwen3_5_9b": 9.4e9, "qwen3_5_27b": 27e9, "qwen3_5_35b_a3b": 35e9, "qwen3_vl_30b_a3b": 31e9}


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_newer_real_shape_presets_have_their_named_size(name):
    config = qwen_config(name)
    with torch.device("meta"):
        model = adapter_for(config).model_class(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(NAMED_SIZES[name], rel=0.03)


def test_qwen3_5_maps_come_from_its_full_attention_layers():
    """Every 4th layer is full attention in the released pattern; the U-Net reads those layers x heads."""
    expected = {"qwen3_5_tiny": ((3, 7), 4), "qwen3_5_moe_tiny": ((3, 7), 4),
                "qwen3_5_9b": (tuple(range(3, 32, 4)), 16), "qwen3_5_27b": (tuple(range(3, 64, 4)), 24),
                "qwen3_5_35b_a3b": (tuple(range(3, 40, 4)), 16)}
    for name, (layers, heads) in expected.items():
        config = qwen_config(name)
        adapter = adapter_for(config)
        assert adapter.map_layers(config.text_config) == layers
        assert config.text_config.num_attention_heads == heads
        rotary = int(config.text_config.head_dim * config.text_config.rope_parameters["partial_rotary_factor"])
        assert sum(config.text_config.rope_parameters["mrope_section"]) == rotary // 2
    lmm = FrozenQwenLMM(qwen=build_qwen("qwen3_5_tiny"))
    assert lmm.num_attention_channels == 2 * 4 and lmm.num_layers == 8  # hidden states: every layer
    for name in ("tiny", "qwen3_vl_moe_tiny"):  # softmax attention throughout: every layer gives maps
        config = qwen_config(name)
        assert adapter_for(config).map_layers(config.text_config) == tuple(range(config.text_config.num_hidden_layers))


def test_moe_presets_route_without_auxiliary_loss():
    for name in ("qwen3_vl_moe_tiny", "qwen3_5_moe_tiny", "qwen3_vl_30b_a3b", "qwen3_5_35b_a3b"):
        assert qwen_config(name).text_config.output_router_logits is False
    lmm = FrozenQwenLMM(qwen=build_qwen("qwen3_5_moe_tiny"))
    assert not lmm.qwen.training and not any(p.requires_grad for p in lmm.qwen.parameters())


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMETERS))
def test_real_shape_presets_have_the_released_parameter_count(name):
    config = qwen_config(name)
    with torch.device("meta"):  # shapes only, no memory
        model = adapter_for(config).model_class(config)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS[name]


# The largest sizes, from the parameter counts the Hugging Face Hub shows rounded to 0.1 B (73.4 B, 33.4 B).
ROUNDED_RELEASED_PARAMETERS = {"qwen2_5_vl_72b": 73.4e9, "qwen3_vl_32b": 33.4e9}


@pytest.mark.parametrize("name", sorted(ROUNDED_RELEASED_PARAMETERS))
def test_largest_presets_have_the_released_parameter_count(name):
    config = qwen_config(name)
    with torch.device("meta"):
        model = adapter_for(config).model_class(config)
    assert abs(sum(p.numel() for p in model.parameters()) - ROUNDED_RELEASED_PARAMETERS[name]) < 0.05e9


def test_qwen3_vl_presets_feed_deepstack_into_the_first_text_layers():
    for name in ("qwen3_vl_tiny", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"):
        config = qwen_config(name)
        indexes = config.vision_config.deepstack_visual_indexes
        assert len(indexes) <= config.text_config.num_hidden_layers
        assert all(0 <= i < config.vision_config.depth for i in indexes)
        text = config.text_config
        assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_image_processor_has_the_family_patch_size_and_normalization(model_type, photos):
    adapter = ADAPTERS[model_type]
    processor = load_image_processor(model_type, min_pixels=56 * 56, max_pixels=224 * 224)
    assert (processor.patch_size, processor.merge_size, processor.temporal_patch_size) == (
        adapter.patch_size, adapter.merge_size, adapter.temporal_patch_size)
    out = processor(images=photos[:2], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), adapter.patch_dim)
    assert bool((grid[:, 1:] % adapter.merge_size == 0).all())
    # The resized image keeps (almost) the aspect ratio: each side is a multiple of the merged token size.
    assert int(grid[0, 2]) * adapter.patch_size <= photos[0].width
    assert adapter.patch_size == (16 if model_type in PATCH_16 else 14)
    assert adapter.patch_dim == (1536 if model_type in PATCH_16 else 1176)
    expected_mean = [0.5] * 3 if model_type in PATCH_16 else [0.48145466, 0.4578275, 0.40821073]
    assert list(processor.image_mean) == pytest.approx(expected_mean)


def test_default_image_processor_is_the_qwen2_5_vl_one_as_before(photos):
    old = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    new = build.load_image_processor(min_pixels=56 * 56, max_pixels=224 * 224)
    a, b = old(images=photos[:2], return_tensors="pt"), new(images=photos[:2], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    qwen3 = build.load_image_processor(max_pixels=224 * 224, backbone="qwen3_vl_tiny")  # a preset names the family
    assert qwen3.patch_size == 16
    with pytest.raises(ValueError, match="min_pixels .* must not exceed max_pixels"):
        load_image_processor("qwen3_vl", min_pixels=100, max_pixels=10)


def test_chat_template_parts():
    for model_type in ("qwen2_vl", "qwen2_5_vl"):
        assert ADAPTERS[model_type].default_system == "You are a helpful assistant."
    for model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        assert ADAPTERS[model_type].default_system is None
    assert {adapter.image_block for adapter in ADAPTERS.values()} == {"<|vision_start|><|image_pad|><|vision_end|>"}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_build_qwen_loads_a_saved_checkpoint_with_the_class_its_config_names(model_type, tmp_path):
    saved = build_qwen(TINY[model_type], seed=3)
    saved.save_pretrained(tmp_path)
    assert model_type_of(str(tmp_path)) == model_type
    loaded = build_qwen(str(tmp_path), dtype=torch.bfloat16, attn_implementation="eager")
    assert type(loaded).__name__ == CLASS_NAMES[model_type]
    assert loaded.dtype == torch.bfloat16
    assert loaded.config.text_config._attn_implementation == "eager"
    expected = saved.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="expected a local checkpoint directory .* or one of the presets"):
        model_type_of(str(tmp_path / "missing"))

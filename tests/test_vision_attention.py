"""The packed vision attention (`backbones/vision_attention.py`) against each family's own vision tower.

Reference: a separately built copy of the same tiny model with transformers' SDPA vision attention (one call per
image or window), through `get_image_features`. Images of different sizes in one batch; Qwen2.5-VL's image sizes are
not multiples of its 112-pixel windows, so the windows differ in size and padding matters.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flmm_model.backbones import adapter_for
from flmm_model.backbones.vision_attention import VISION_ATTENTION, use_packed_vision_attention
from flmm_model.build import build_qwen

# (t, H, W) patch grids of three images of different sizes; odd merged grids (9 x 11, 5 x 3, 13 x 17), so Qwen2.5-VL's
# 2 x 2-token windows at the bottom and right edges are partial.
GRIDS = torch.tensor([[1, 18, 22], [1, 10, 6], [1, 26, 34]])
FAMILY_PRESETS = ["qwen2_vl_tiny", "tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]


def tower_inputs(adapter, grids):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(int(grids.prod(-1).sum()), adapter.patch_dim, generator=generator)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_packed_vision_attention_matches_the_hf_vision_tower(preset):
    reference, packed = build_qwen(preset).eval(), build_qwen(preset).eval()
    use_packed_vision_attention(packed)
    assert packed.model.visual.config._attn_implementation == VISION_ATTENTION
    assert reference.model.visual.config._attn_implementation == "sdpa"
    adapter = adapter_for(packed)
    pixels = tower_inputs(adapter, GRIDS)
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels, GRIDS)
        inputs = adapter.vision_inputs(packed.config.vision_config, GRIDS)  # on the host, with the plan
        planned = adapter.encode_images(packed, pixels, GRIDS, inputs)
        unplanned = packed.model.get_image_features(pixels, GRIDS)  # layouts built on the fly from cu_seqlens
    merged = torch.cat(expected.pooler_output)  # (sum N_b, D)
    assert planned.image_embeds.shape == merged.shape
    assert (planned.image_embeds - merged).abs().max() <= 1e-4
    assert (torch.cat(unplanned.pooler_output) - merged).abs().max() <= 1e-4
    if adapter.model_type == "qwen3_vl":
        for found, wanted in zip(planned.deepstack_embeds, expected.deepstack_features, strict=True):
            assert (found - torch.cat(wanted)).abs().max() <= 1e-4


def test_windows_of_different_sizes_are_padded_and_masked():
    """Qwen2.5-VL at these grids has windows of 16, 8 and 4 patches: padded slots exist (and must not leak in)."""
    qwen = build_qwen("tiny")
    adapter = adapter_for(qwen)
    inputs = adapter.vision_inputs(qwen.config.vision_config, GRIDS)
    window_lengths = (inputs["cu_window_seqlens"][1:] - inputs["cu_window_seqlens"][:-1]).unique()
    assert len(window_lengths) > 2
    layout = inputs["flmm_vision_plan"].layout_for(inputs["cu_window_seqlens"], inputs["max_window_seqlen"],
                                                   int(GRIDS.prod(-1).sum()))
    assert not layout.key_valid.all()


class _Calls(TorchFunctionMode):
    """Counts attention calls and host reads of tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = 0
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            self.attention += 1
        if name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grids", [GRIDS[:1], GRIDS], ids=["1 image", "3 images"])
def test_one_attention_call_per_block_and_no_host_read(grids):
    qwen = build_qwen("tiny")
    use_packed_vision_attention(qwen)
    adapter = adapter_for(qwen)
    pixels = tower_inputs(adapter, grids)
    inputs = adapter.vision_inputs(qwen.config.vision_config, grids)  # on the host, before the forward
    with torch.no_grad(), _Calls() as calls:
        adapter.encode_images(qwen, pixels, grids, inputs)
    assert calls.attention == qwen.config.vision_config.depth  # not per window, not per image
    assert calls.reads == []

"""`data.clip_pixels.qwen_clip_inputs` against the HF video processor's layout (`FramesVideoProcessor` in
test_video_inputs: frames resized with Pillow, patches laid out by one reshape / transpose, written independently
of the per-frame image-processor route under test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_video_inputs import FramesVideoProcessor

from flmm_model.backbones import load_image_processor
from flmm_model.data.clip_pixels import DEFAULT_GROUP_TOKENS, frame_size, qwen_clip_inputs
from flmm_model.data.errors import DataError


def pan(frames: int, height: int, width: int) -> np.ndarray:
    photo = data.astronaut()
    return np.stack([photo[6 * i: 6 * i + height, 4 * i: 4 * i + width] for i in range(frames)])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("frames", [1, 4, 5])
def test_rows_match_the_video_processor_layout(family, frames):
    processor = load_image_processor(family)
    clip = pan(frames, 150, 220)
    pixel_values, grid = qwen_clip_inputs(clip, processor)
    factor = processor.patch_size * processor.merge_size
    reference = FramesVideoProcessor(
        patch_size=processor.patch_size, merge_size=processor.merge_size,
        temporal_patch_size=processor.temporal_patch_size, image_mean=processor.image_mean,
        image_std=processor.image_std, max_pixels=DEFAULT_GROUP_TOKENS * factor * factor, metadata=[])([clip])
    assert grid.tolist() == reference["video_grid_thw"].tolist()
    assert grid[0, 0] == -(-frames // 2)
    torch.testing.assert_close(pixel_values, reference["pixel_values_videos"], atol=1e-5, rtol=0)


def test_the_group_budget_caps_the_tokens():
    processor = load_image_processor("qwen2_5_vl", max_pixels=2048 * 28 * 28)
    height, width = frame_size(1080, 1920, processor, group_tokens=64)
    assert (height // 28) * (width // 28) <= 64 and height % 28 == 0 and width % 28 == 0
    _, grid = qwen_clip_inputs([Image.new("RGB", (1920, 1080))] * 2, processor, group_tokens=64)
    assert grid[0, 1] * grid[0, 2] // 4 <= 64


def test_bad_clips_are_refused():
    processor = load_image_processor("qwen2_5_vl")
    with pytest.raises(DataError, match="at least one frame"):
        qwen_clip_inputs([], processor)
    with pytest.raises(DataError, match="one size"):
        qwen_clip_inputs([Image.new("RGB", (64, 64)), Image.new("RGB", (64, 80))], processor)

"""A clip's frames -> the Qwen video inputs (`pixel_values_videos`, `video_grid_thw`), with the image processor.

The HF Qwen video processors need torchvision; the layout they produce is simple enough to build from the image
processor the project already uses, so clips need nothing beyond images:
- every frame is resized to one `smart_resize` size (a multiple of patch x merge, within the frame budget
  `max_frame_pixels`) with Pillow's bicubic filter, then rescaled and normalized by the image processor;
- the frame count is padded to a multiple of `temporal_patch_size` (2) by repeating the last frame, as the video
  processor pads it; frames 2g and 2g + 1 are frame group g (`video_grid_thw[:, 0]` = the number of groups);
- rows are in (group, row block, column block, merge row, merge column) order, each row (channel, frame in the
  group, y, x): the image processor's own row order with its two (identical) temporal copies replaced by the
  group's two frames.

The frame budget is the number of merged vision tokens per frame group: `DEFAULT_GROUP_TOKENS` = 256 (a 448 x 448
frame at Qwen2.5-VL's 28 px per token), so a clip costs 256 tokens per two frames whatever the image budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from flmm_model.data.errors import DataError

DEFAULT_GROUP_TOKENS = 256


def frame_size(height: int, width: int, image_processor, *, group_tokens: int = DEFAULT_GROUP_TOKENS
               ) -> tuple[int, int]:
    """The (h, w) every frame of a height x width clip is resized to: `smart_resize` with at most `group_tokens`
    merged tokens per frame, within the image processor's pixel budget (which would resize it again otherwise)."""
    factor = image_processor.patch_size * image_processor.merge_size
    min_pixels, max_pixels = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    max_pixels = max(min(group_tokens * factor * factor, max_pixels), min_pixels)
    try:
        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as error:  # e.g. an aspect ratio over 200
        raise DataError(f"clip frames of {height}x{width}: {error}") from error


def qwen_clip_inputs(frames: Sequence[Image.Image] | np.ndarray | torch.Tensor, image_processor, *,
                     group_tokens: int = DEFAULT_GROUP_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The video inputs of one clip.

    Args:
        frames: F RGB frames of one size: PIL images, or an (F, H, W, 3) uint8 array / tensor.
        image_processor: the model's Qwen image processor (`Qwen2VLImageProcessorPil`; patch, merge and temporal
            patch sizes, mean and std come from it).
        group_tokens: the most merged vision tokens per frame group (the frame budget).

    Returns:
        pixel_values_videos: (t * H * W, 3 * temporal_patch * patch^2) float32, t = ceil(F / temporal_patch).
        video_grid_thw: (1, 3) long, (t, H, W) in patches.

    Raises:
        DataError: no frame, or frames of different sizes.
    """
    images = [frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame)) for frame in frames]
    if not images:
        raise DataError("clip: expected at least one frame, found none")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise DataError(f"clip: every frame must have one size, found {sorted(sizes)} (W, H)")
    width, height = images[0].size
    out_height, out_width = frame_size(height, width, image_processor, group_tokens=group_tokens)
    per_frame = []
    for image in images:
        resized = image.convert("RGB").resize((out_width, out_height), Image.BICUBIC)
        # the processor keeps this size (already a smart_resize fixed point); rows (h*w, C * tp * p * p)
        processed = image_processor(images=resized, return_tensors="pt")
        grid = processed["image_grid_thw"].reshape(3).tolist()
        if grid[1:] != [out_height // image_processor.patch_size, out_width // image_processor.patch_size]:
            raise DataError(f"clip: the image processor resized a {out_height}x{out_width} frame to grid {grid}")
        rows = processed["pixel_values"].to(torch.float32)
        channels = rows.shape[1] // (image_processor.temporal_patch_size * image_processor.patch_size ** 2)
        per_frame.append(rows.view(rows.shape[0], channels, image_processor.temporal_patch_size, -1)[:, :, 0])
    temporal = image_processor.temporal_patch_size
    per_frame += per_frame[-1:] * (-len(per_frame) % temporal)  # the last frame repeated, as the video processor
    groups = [torch.stack(per_frame[i:i + temporal], dim=2) for i in range(0, len(per_frame), temporal)]
    pixel_values = torch.cat([group.flatten(1) for group in groups])  # (t * h * w, C * tp * p * p)
    grid_thw = torch.tensor([[len(groups), out_height // image_processor.patch_size,
                              out_width // image_processor.patch_size]], dtype=torch.long)
    return pixel_values, grid_thw

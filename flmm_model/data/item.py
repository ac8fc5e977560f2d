"""One training / evaluation item: the dict every dataset returns and `collate` batches.

Keys (K objects, L compact tokens, original image H x W):
    input_ids       (L,) long: chat ids with one `<|image_pad|>` placeholder.
    mask_ids        (L,) long: object index per token, -1 outside the objects' text.
    pixel_values    (t*h*w, 1176) float32: Qwen image processor patches.
    image_grid_thw  (1, 3) long: (t, h, w) patch grid of `pixel_values`.
    image           (3, H, W) uint8: the original RGB image (upright), from which the model builds SAM's input.
    gt_masks        (K, H, W) bool: ground-truth masks at the original size, object k = phrase k.
    phrases         list[str] of length K, the object texts in object order.
    meta            dict: at least `image_id`, `file_name`, `dataset`, plus per-dataset keys.

A clip item (`make_clip_item`: N sampled frames, original frame size H x W) holds instead of the image's keys:
    input_ids       (L,) long: chat ids with one `<|video_pad|>` placeholder (in `<|vision_start|>..<|vision_end|>`).
    pixel_values_videos (t*h*w, 1176) float32: the clip's patches (`data.clip_pixels`), t = ceil(N / 2) groups.
    video_grid_thw  (1, 3) long: (t, h, w).
    video_frame_times (N,) float64: each sampled frame's time in seconds (the model's time positions).
    frames          (N, H, W, 3) uint8: the sampled frames, from which the model builds SAM's inputs.
    gt_masks        (K, N, H, W) bool, zeros where `has_gt` is False.
    has_gt          (N,) bool: the frames with ground truth (the losses and the metric read only those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from flmm_model.data.clip_pixels import DEFAULT_GROUP_TOKENS, qwen_clip_inputs
from flmm_model.data.errors import DataError
from flmm_model.data.images import check_image_size, image_tensor, qwen_image_inputs
from flmm_model.data.prompts import DEFAULT_SYSTEM, encode_grounded, phrases_of


@dataclass(frozen=True)
class PromptSettings:
    """How items are encoded for a model: its tokenizer, image processor and prompt (`build.prompt_settings` makes
    it from a model config, so datasets encode exactly what the model will read)."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: Any
    instruction: str
    system: str | None
    max_length: int | None


def make_item(
    *,
    image: Image.Image,
    gt_masks: np.ndarray,
    parts: list[tuple[str, int]],
    meta: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    image_processor,
    instruction: str,
    system: str = DEFAULT_SYSTEM,
    max_length: int | None = None,
    sample: str = "",
) -> dict[str, Any]:
    """Build the item dict (see the module docstring) for one image and its grounded answer.

    Args:
        image: RGB PIL image at original size (H, W).
        gt_masks: (K, H, W) bool masks, mask k for object k of `parts`.
        parts: the answer as `(text, k)` parts (see `prompts.encode_grounded`).
        meta: metadata copied into the item.
        tokenizer: Qwen tokenizer.
        image_processor: Qwen2-VL image processor.
        instruction: the user's instruction after the image.
        system: the system prompt.
        max_length: longest allowed compact sequence, or None.
        sample: a description of the sample for error messages.

    Raises:
        DataError: masks that do not fit the image or the objects, an image size the model cannot take
            (`images.check_image_size`), or a text that cannot be encoded (e.g. longer than `max_length`); the
            message names `sample`.
    """
    phrases = phrases_of(parts)
    width, height = image.size
    check_image_size(width, height, where=sample or "image")  # e.g. an aspect ratio Qwen's processor refuses
    if gt_masks.ndim != 3 or gt_masks.shape != (len(phrases), height, width):
        raise DataError(f"{sample}: gt_masks have shape {tuple(gt_masks.shape)}, expected "
                        f"({len(phrases)}, {height}, {width}) for {len(phrases)} objects on a {height}x{width} image")
    try:
        input_ids, mask_ids = encode_grounded(tokenizer, parts, instruction=instruction, system=system,
                                              max_length=max_length)
    except ValueError as error:
        raise DataError(f"{sample}: {error}") from error
    pixel_values, image_grid_thw = qwen_image_inputs(image, image_processor)
    return dict(
        input_ids=input_ids,
        mask_ids=mask_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        image=image_tensor(image),
        gt_masks=torch.from_numpy(np.ascontiguousarray(gt_masks, dtype=bool)),
        phrases=phrases,
        meta=meta,
    )


def make_clip_item(
    *,
    frames: torch.Tensor,
    times: torch.Tensor,
    gt_masks: torch.Tensor,
    has_gt: torch.Tensor,
    parts: list[tuple[str, int]],
    meta: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    image_processor,
    instruction: str,
    system: str | None = DEFAULT_SYSTEM,
    max_length: int | None = None,
    group_tokens: int = DEFAULT_GROUP_TOKENS,
    sample: str = "",
) -> dict[str, Any]:
    """Build the clip item dict (see the module docstring) for N sampled frames and their grounded answer.

    Args:
        frames: (N, H, W, 3) uint8 RGB frames. times: (N,) seconds, non-decreasing.
        gt_masks: (K, N, H, W) bool, mask k for object k of `parts`. has_gt: (N,) bool.
        parts, meta, tokenizer, image_processor, instruction, system, max_length, sample: as `make_item` (the
            instruction follows the clip block).
        group_tokens: the most vision tokens per frame group (`data.clip_pixels`).

    Raises:
        DataError: masks, flags or times that do not fit the frames or the objects, frames the processor cannot
            take, or a text that cannot be encoded; the message names `sample`.
    """
    phrases = phrases_of(parts)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise DataError(f"{sample}: frames must be (N, H, W, 3) uint8, found {tuple(frames.shape)} {frames.dtype}")
    count, height, width = frames.shape[:3]
    check_image_size(width, height, where=sample or "clip")
    if tuple(gt_masks.shape) != (len(phrases), count, height, width):
        raise DataError(f"{sample}: gt_masks have shape {tuple(gt_masks.shape)}, expected "
                        f"({len(phrases)}, {count}, {height}, {width}) for {len(phrases)} objects on {count} frames "
                        f"of {height}x{width}")
    if tuple(has_gt.shape) != (count,) or tuple(times.shape) != (count,):
        raise DataError(f"{sample}: has_gt {tuple(has_gt.shape)} and times {tuple(times.shape)} must both be "
                        f"({count},), one per frame")
    try:
        input_ids, mask_ids = encode_grounded(tokenizer, parts, instruction=instruction, system=system,
                                              max_length=max_length, video=True)
    except ValueError as error:
        raise DataError(f"{sample}: {error}") from error
    pixel_values_videos, video_grid_thw = qwen_clip_inputs(frames.numpy(), image_processor,
                                                           group_tokens=group_tokens)
    return dict(
        input_ids=input_ids,
        mask_ids=mask_ids,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        video_frame_times=times.to(torch.float64),
        frames=frames,
        gt_masks=gt_masks.to(torch.bool),
        has_gt=has_gt.to(torch.bool),
        phrases=phrases,
        meta=meta,
    )

"""Image frames of the heads: the sizes an image takes in SAM's input, on the mask input, on the U-Net grid, the
bilinear resize that moves every object's mask between them in one call, and the host-side canvases (SAM's uint8
input, the ground truth) the batch preparer builds (`modeling.batch`).

Several images of different sizes are batched by putting each object's mask in the top-left corner of one shared
canvas (the largest size of the batch) and carrying each object's own size alongside (`ObjectFrames`). Sizes are
computed on the host with Python integers, exactly as the per-image code computes them, and travel to the device as
small float tensors: nothing is read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sam_resized_size(height: int, width: int, image_size: int, *, stretch: bool = False) -> tuple[int, int]:
    """(rh, rw): an (H, W) image resized so its longest side is `image_size` (SAM's S), rounded half up; with
    `stretch` (SAM2's input: S x S whatever the aspect ratio), (S, S)."""
    if stretch:
        return image_size, image_size
    scale = image_size / max(height, width)
    return math.floor(height * scale + 0.5), math.floor(width * scale + 0.5)


def mask_input_size(resized: tuple[int, int], image_size: int, side: int) -> tuple[int, int]:
    """(mh, mw): the resized image's part of SAM's `side` x `side` mask input (side = 4e)."""
    return tuple(min(side, max(1, math.floor(length * side / image_size + 0.5))) for length in resized)


def coarse_grid_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(h', w'): an (h, w) grid scaled so its longest side is `longest`, each side rounded half up (at least 1)."""
    scale = longest / max(height, width)
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


@dataclass
class ObjectFrames:
    """Per-object (height, width) sizes, (K, 2) float32 tensors built on the host.

    Attributes:
        original: (H, W) of the object's image.
        resized: (rh, rw), the image inside SAM's S x S input.
        mask_input: (mh, mw), the image's part of the 4e x 4e mask input.
        coarse: (h', w') of the object's coarse logits (its top-left part of the coarse canvas).
    """

    original: torch.Tensor
    resized: torch.Tensor
    mask_input: torch.Tensor
    coarse: torch.Tensor

    @classmethod
    def build(cls, original: Sequence[tuple[int, int]], coarse: Sequence[tuple[int, int]], *, image_size: int,
              mask_side: int, stretch: bool = False) -> ObjectFrames:
        """From each object's image size and coarse grid size (Python ints), SAM's S and the mask input side
        (`stretch`: SAM2's frame, every image resized to S x S)."""
        resized = [sam_resized_size(height, width, image_size, stretch=stretch) for height, width in original]
        mask_input = [mask_input_size(size, image_size, mask_side) for size in resized]

        def sizes(values: Sequence[tuple[int, int]]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.float32).reshape(-1, 2)  # (K, 2)

        return cls(sizes(original), sizes(resized), sizes(mask_input), sizes(coarse))


def size_mask(sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(K, height, width) bool, True inside each object's top-left (h_k, w_k) part; sizes (K, 2) float."""
    rows = torch.arange(height, device=sizes.device) < sizes[:, :1]  # (K, height)
    cols = torch.arange(width, device=sizes.device) < sizes[:, 1:]  # (K, width)
    return rows[:, :, None] & cols[:, None, :]


def _source_coordinates(length: int, source: torch.Tensor, target: torch.Tensor, source_length: int) -> torch.Tensor:
    """Normalized grid_sample coordinates (K, length) along one axis: output pixel i of an object resized from
    `source` to `target` pixels reads source pixel (i + 0.5) * source / target - 0.5, clamped to [0, source - 1] as
    bilinear `F.interpolate` (align_corners=False) clamps it, inside an input axis of `source_length` pixels."""
    position = torch.arange(length, device=source.device, dtype=torch.float32)  # (length,)
    pixel = ((position + 0.5) * (source / target)[:, None] - 0.5).clamp(min=0.0)  # (K, length)
    pixel = torch.minimum(pixel, (source - 1.0)[:, None])
    return (2.0 * pixel + 1.0) / source_length - 1.0


def resize_on_canvas(values: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                     canvas: tuple[int, int]) -> torch.Tensor:
    """Resize each object's top-left part of `values` to its target size, onto a shared canvas, in one call.

    For object k, the part `values[k, :, :sh_k, :sw_k]` is resized bilinearly (align_corners=False, as
    `F.interpolate(size=(th_k, tw_k))` resizes it) to the top-left (th_k, tw_k) of the output; the rest of the output
    is filler (read from the clamped border) that callers mask. Gradients flow to `values`.

    Args:
        values: (K, C, Hi, Wi) float.
        source: (K, 2) float sizes (sh, sw) of the parts to resize. target: (K, 2) float sizes (th, tw).
        canvas: (Ho, Wo) of the output.

    Returns:
        (K, C, Ho, Wo) in the dtype of `values`.
    """
    height, width = canvas
    y = _source_coordinates(height, source[:, 0], target[:, 0], values.shape[2])  # (K, Ho)
    x = _source_coordinates(width, source[:, 1], target[:, 1], values.shape[3])  # (K, Wo)
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # (K, Ho, Wo, 2): (x, y)
    return F.grid_sample(values, grid.to(values.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def sam_input_canvas(images: list[torch.Tensor], image_size: int, *, stretch: bool = False) -> torch.Tensor:
    """(B, 3, S, S) uint8 SAM input pixels of B uint8 (3, H_i, W_i) images: each resized (bilinear, antialias,
    rounded to integers, as segment-anything's uint8 resize) so its longest side is S, at the top left, zeros
    elsewhere; with `stretch` (SAM2), resized to S x S."""
    canvas = torch.zeros((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for index, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"SAM input: image {index} must be a uint8 tensor (3, H, W), found {image.dtype} "
                             f"{tuple(image.shape)}")
        height, width = sam_resized_size(image.shape[1], image.shape[2], image_size, stretch=stretch)
        pixels = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                               antialias=True)  # (1, 3, rh, rw)
        canvas[index, :, :height, :width] = pixels[0].round_().clamp_(0.0, 255.0).to(torch.uint8)
    return canvas


def gt_canvas(gt_masks: list[torch.Tensor]) -> torch.Tensor:
    """(K, H_max, W_max) bool: the (K_b, H_b, W_b) masks of every sample, top-left on one canvas."""
    height = max(mask.shape[1] for mask in gt_masks)
    width = max(mask.shape[2] for mask in gt_masks)
    canvas = torch.zeros((sum(mask.shape[0] for mask in gt_masks), height, width), dtype=torch.bool)
    row = 0
    for mask in gt_masks:
        canvas[row:row + mask.shape[0], :mask.shape[1], :mask.shape[2]] = mask
        row += mask.shape[0]
    return canvas

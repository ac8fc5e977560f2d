"""The host side of a step: a collated CPU batch -> `PreparedBatch`, everything the forward reads, built where reading
values costs nothing, then moved to the device in one go (pinned, asynchronous on CUDA: `device.to_device`).

What the forward needs beyond the LMM inputs (`lmm.PreparedLMMInputs`) is how the objects of a batch of different
images line up (K objects of the batch, in sample order):
- U-Net groups: the samples whose attention maps share a grid, so the mask head runs once per distinct grid;
- the coarse canvas: each object's coarse logits at the top left of one (h'_max, w'_max) canvas, and, when there
  are several groups, each object's row in the concatenated group outputs;
- the text prompt tokens: each object's phrase slots padded to the longest phrase (T), as rows of the flattened
  (B * P) phrase slots, with a validity mask;
- `frames.ObjectFrames`: each object's image, SAM-input, mask-input and coarse sizes;
- the heads' image inputs and targets (`data.head_inputs`: usually built in the loader's workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flmm_model.modeling.frames import ObjectFrames
from flmm_model.modeling.lmm_inputs import PreparedLMMInputs


@dataclass
class UNetGroup:
    """The samples whose attention maps share the grid (h, w): one mask-head call for all their objects."""

    grid: tuple[int, int]
    samples: list[int]


@dataclass
class PreparedBatch:
    """Everything the forward of a batch reads (see the module docstring). Tensors on the host until `to_device`.

    Attributes:
        lmm: the LMM stage's inputs.
        num_objects: K_b per sample. image_sizes: (H_b, W_b) per sample. coarse_sizes: (h'_b, w'_b) per sample.
        unet_groups: the mask-head calls, in order.
        coarse_order: (K,) long, object k's row in the concatenated outputs of the groups; None when the groups'
            outputs are already in object order with one grid (a single group).
        coarse_canvas: (h'_max, w'_max). canvas: (H_max, W_max) of the refined logits.
        frames: per-object sizes (`ObjectFrames`).
        object_image: (K,) long, the sample of each object.
        text_index: (K * T,) long rows of the (B * P) phrase slots: object k's tokens, then its first token again as
            padding. text_valid: (K, T) bool, or None when every object has T tokens.
        sam_pixels: (M, 3, S, S) uint8 SAM input canvas of the images to encode in the step (all B, or the cache's
            misses), or None without SAM. sam_resized: (M, 2) float (rh, rw) of those images.
        sam_embeddings: (B, C, e, e) embeddings from the SAM cache (zeros for misses), or None without a cache.
        sam_missing: (M,) long, the images the cache missed (encoded in the step), or None without a cache.
        sam_missing_names: their cache entry names (the step's new embeddings are written under them).
        gt_canvas: (K, H_max, W_max) bool, coarse_targets: (K, h'_max, w'_max) float32; None without ground truth.
    """

    lmm: PreparedLMMInputs
    num_objects: list[int]
    image_sizes: list[tuple[int, int]]
    coarse_sizes: list[tuple[int, int]]
    unet_groups: list[UNetGroup]
    coarse_order: torch.Tensor | None
    coarse_canvas: tuple[int, int]
    canvas: tuple[int, int]
    frames: ObjectFrames
    object_image: torch.Tensor
    text_index: torch.Tensor
    text_valid: torch.Tensor | None
    sam_pixels: torch.Tensor | None
    sam_resized: torch.Tensor | None
    sam_embeddings: torch.Tensor | None
    sam_missing: torch.Tensor | None
    sam_missing_names: list[str]
    gt_canvas: torch.Tensor | None
    coarse_targets: torch.Tensor | None

    @property
    def object_offsets(self) -> list[int]:
        """Row of each sample's first object (objects are in sample order)."""
        offsets, row = [], 0
        for count in self.num_objects:
            offsets.append(row)
            row += count
        return offsets


def unet_groups(grid_hw: list[tuple[int, int]], num_objects: list[int]) -> tuple[list[UNetGroup], torch.Tensor | None]:
    """Group the samples by attention grid (first appearance order) and find each object's row in the concatenated
    group outputs: (groups, (K,) long order or None for a single group)."""
    by_grid: dict[tuple[int, int], list[int]] = {}
    for b, grid in enumerate(grid_hw):
        by_grid.setdefault(tuple(grid), []).append(b)
    groups = [UNetGroup(grid=grid, samples=samples) for grid, samples in by_grid.items()]
    if len(groups) == 1:
        return groups, None
    offsets = torch.tensor([0, *num_objects]).cumsum(0).tolist()
    rows_in_concat = [row for group in groups for b in group.samples for row in range(offsets[b], offsets[b + 1])]
    order = torch.empty(len(rows_in_concat), dtype=torch.long)
    order[torch.tensor(rows_in_concat)] = torch.arange(len(rows_in_concat))  # object -> its row in the concat
    return groups, order


def text_slots(object_slots: list[list[slice | torch.Tensor]], num_slots: int) -> tuple[torch.Tensor,
                                                                                        torch.Tensor | None]:
    """(K * T,) rows of the flattened (B * P) phrase slots and the (K, T) validity (None when all objects have T
    tokens), from each object's slots (`PreparedLMMInputs.object_slots`; P = `num_slots`)."""
    rows = []
    for b, sample_slots in enumerate(object_slots):
        for slots in sample_slots:
            index = torch.arange(slots.start, slots.stop) if isinstance(slots, slice) else slots
            rows.append(index + b * num_slots)
    lengths = [index.numel() for index in rows]
    longest = max(lengths)
    padded = torch.stack([torch.cat([index, index[:1].expand(longest - index.numel())]) for index in rows])
    valid = None
    if min(lengths) != longest:
        valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (K, T)
    return padded.flatten(), valid

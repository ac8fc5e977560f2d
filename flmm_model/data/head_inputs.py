"""The heads' inputs and targets of a batch, built on the host: SAM's input images, the ground truth on one padded
canvas and the coarse targets on the U-Net grids.

The image work (resizing every image to SAM's input, the area resize of the ground truth) is the heavy host part of
a step; given a `HeadInputSpec`, `collate` does it in the DataLoader workers, and the loader pins the result. A batch
without these entries (the predictor's, a test's) gets them from the model (`FrozenQwenSAM.prepare_batch`).

Entries (B images, K objects of the batch in sample order):
    sam_pixels      (B, 3, S, S) uint8: each image resized (bilinear, antialias, rounded to integers, as
                    segment-anything's uint8 resize) so its longest side is S, top-left, zeros elsewhere.
                    With a SAM embedding cache (`data.sam_cache`): only the M images it misses, (M, 3, S, S), and
    sam_embeddings  (B, C, e, e): the cached embeddings (zeros for the missed images),
    sam_missing     (M,) long: the missed images, to encode in the step,
    sam_names       B cache entry names (`sam_cache.image_digest`).
    gt_canvas       (K, H_max, W_max) bool: object k's mask at its image's size, top-left, False elsewhere.
    coarse_targets  (K, h'_max, w'_max) float32: each mask resized to its image's coarse grid (`resize_gt_masks`:
                    the fraction of each cell inside the object), top-left, zeros elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flmm_model.data.sam_cache import SamEmbeddingCache, image_digest
from flmm_model.modeling.frames import coarse_grid_size, sam_resized_size
from flmm_model.modeling.losses import resize_gt_masks


def sam_input_canvas(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """(B, 3, S, S) uint8 SAM input pixels of B uint8 (3, H_i, W_i) images (see the module docstring)."""
    canvas = torch.zeros((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for index, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"SAM input: image {index} must be a uint8 tensor (3, H, W), found {image.dtype} "
                             f"{tuple(image.shape)}")
        height, width = sam_resized_size(image.shape[1], image.shape[2], image_size)
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


@dataclass(frozen=True)
class HeadInputSpec:
    """What a model's heads need from the data (from `FrozenQwenSAM.head_input_spec`; picklable for workers).

    Attributes:
        sam_image_size: SAM's input side S, or None for a model without SAM.
        coarse_size: longest side of the coarse (U-Net) grid (`model.mask_head_size`).
        merge_size: patches per merged image token side (the coarse grid is computed from the merged grid).
        targets: also build the ground-truth entries (training); False for prediction.
        sam_cache: read the images' SAM embeddings from this cache (`data.sam_cache`).
    """

    sam_image_size: int | None
    coarse_size: int
    merge_size: int
    targets: bool = True
    sam_cache: SamEmbeddingCache | None = None

    def coarse_sizes(self, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """Per sample (h', w') of the coarse grid, from the (B, 3) CPU patch grid of each sample's grounded image."""
        return [coarse_grid_size(h // self.merge_size, w // self.merge_size, self.coarse_size)
                for _, h, w in image_grid_thw.tolist()]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The entries of the module docstring for a collated CPU batch (ground-truth entries only when it has
        ground truth)."""
        entries: dict[str, torch.Tensor] = {}
        images = list(batch["images"])
        if self.sam_image_size is not None and self.sam_cache is None:
            entries["sam_pixels"] = sam_input_canvas(images, self.sam_image_size)
        elif self.sam_image_size is not None:
            names = [image_digest(image) for image in images]
            cached = [self.sam_cache.read(name) for name in names]
            missing = [b for b, embedding in enumerate(cached) if embedding is None]
            dtype = getattr(torch, self.sam_cache.key.dtype)
            empty = torch.zeros(self.sam_cache.embedding_shape, dtype=dtype)
            entries.update(sam_embeddings=torch.stack([empty if e is None else e.to(dtype) for e in cached]),
                           sam_pixels=sam_input_canvas([images[b] for b in missing], self.sam_image_size),
                           sam_missing=torch.tensor(missing, dtype=torch.long), sam_names=names)
        gt_masks = batch.get("gt_masks")
        if self.targets and gt_masks and all(mask is not None for mask in gt_masks):
            entries["gt_canvas"] = gt_canvas(list(gt_masks))
            sizes = self.coarse_sizes(batch["grounded_grid_thw"])
            coarse = torch.zeros((entries["gt_canvas"].shape[0], max(h for h, _ in sizes), max(w for _, w in sizes)))
            row = 0
            for mask, (height, width) in zip(gt_masks, sizes, strict=True):
                coarse[row:row + mask.shape[0], :height, :width] = resize_gt_masks(mask, (height, width))
                row += mask.shape[0]
            entries["coarse_targets"] = coarse
        return entries

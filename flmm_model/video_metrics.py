"""Referring video object segmentation metrics: J (region similarity), F (contour accuracy) and J&F, as the DAVIS
benchmark defines them and Ref-YouTube-VOS, MeViS and ReVOS report them.

Conventions (state them with every number):
- Per frame, for bool masks at the ground truth's size: J = |pred & gt| / |pred | gt| (1 when both are empty).
  F = the boundary F-measure: each mask's boundary (`boundary_map`: the pixels whose value differs from their east,
  south or south-east neighbour, DAVIS's `seg2bmap`), a predicted boundary pixel counts as matched when a ground-truth
  boundary pixel lies within a disk of radius r (and the other way round for recall), F = 2PR / (P + R). The radius
  is r = ceil(bound_th x image diagonal) with DAVIS's bound_th = 0.008 (a bound_th >= 1 is r in pixels). Both
  boundaries empty: F = 1; only one empty: F = 0.
- Per expression (one referred object through a clip): the mean of J and of F over its annotated frames. Over a
  dataset: J and F are the means over expressions, J&F = (J + F) / 2. All x100.
- `VideoSegMetric` keeps sums only and all-reduces them in `compute()` when torch.distributed is initialized (every
  rank must call it), like the image metrics in `flmm_model.metrics`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flmm_model.distributed import all_reduce_sum

DAVIS_BOUND_TH = 0.008


def _check(pred: torch.Tensor, gt: torch.Tensor, dims: int, what: str) -> None:
    for name, masks in (("pred_masks", pred), ("gt_masks", gt)):
        if masks.dtype != torch.bool or masks.dim() != dims:
            raise ValueError(f"{what}: {name} must be a bool tensor of {dims} dimensions, found {masks.dtype} of "
                             f"shape {tuple(masks.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"{what}: pred_masks {tuple(pred.shape)} and gt_masks {tuple(gt.shape)} must have one shape")


def region_similarity(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """J per frame: (T, H, W) bool each -> (T,) float64 IoU, 1 where both masks are empty."""
    _check(pred, gt, 3, "region_similarity")
    intersection = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> the boundary pixels, (..., H, W) bool: where the mask differs from its east, south or
    south-east neighbour (outside the image counts as background, except that the last row is compared with its
    east neighbour only, the last column with its south neighbour only, and the corner with neither: DAVIS's rule)."""
    east = torch.zeros_like(mask)
    south = torch.zeros_like(mask)
    south_east = torch.zeros_like(mask)
    east[..., :, :-1] = mask[..., :, 1:]
    south[..., :-1, :] = mask[..., 1:, :]
    south_east[..., :-1, :-1] = mask[..., 1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[..., -1, :] = mask[..., -1, :] ^ east[..., -1, :]
    boundary[..., :, -1] = mask[..., :, -1] ^ south[..., :, -1]
    boundary[..., -1, -1] = False
    return boundary


def dilate_disk(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(..., H, W) bool dilated by the disk {(dy, dx): dy^2 + dx^2 <= radius^2}: one row of the disk at a time, each a
    horizontal max-pool shifted by its dy (2 r + 1 pools, not an (2 r + 1)^2 kernel)."""
    if radius <= 0:
        return mask.clone()
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()  # (N, 1, H, W)
    height = shape[-2]
    out = torch.zeros_like(flat, dtype=torch.bool)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        row = F.max_pool2d(flat, kernel_size=(1, 2 * half + 1), stride=1, padding=(0, half)) > 0
        if dy > 0:  # a pixel at y is set when a source pixel lies at y - dy
            out[..., dy:, :] |= row[..., : height - dy, :]
        elif dy < 0:
            out[..., : height + dy, :] |= row[..., -dy:, :]
        else:
            out |= row
    return out.reshape(shape)


def boundary_radius(height: int, width: int, bound_th: float = DAVIS_BOUND_TH) -> int:
    """The match radius in pixels: `bound_th` itself when >= 1, else ceil(bound_th x the image diagonal)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(height, width))


def contour_accuracy(pred: torch.Tensor, gt: torch.Tensor, *, bound_th: float = DAVIS_BOUND_TH) -> torch.Tensor:
    """F per frame: (T, H, W) bool each -> (T,) float64 boundary F-measure (see the module docstring)."""
    _check(pred, gt, 3, "contour_accuracy")
    radius = boundary_radius(pred.shape[-2], pred.shape[-1], bound_th)
    pred_boundary, gt_boundary = boundary_map(pred), boundary_map(gt)
    pred_matched = (pred_boundary & dilate_disk(gt_boundary, radius)).flatten(1).sum(1).double()
    gt_matched = (gt_boundary & dilate_disk(pred_boundary, radius)).flatten(1).sum(1).double()
    n_pred = pred_boundary.flatten(1).sum(1).double()
    n_gt = gt_boundary.flatten(1).sum(1).double()
    precision = torch.where(n_pred > 0, pred_matched / n_pred.clamp_min(1), (n_gt == 0).double())
    recall = torch.where(n_gt > 0, gt_matched / n_gt.clamp_min(1), (n_pred == 0).double())
    total = precision + recall
    return torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), torch.zeros_like(total))


class VideoSegMetric:
    """J, F and J&F over expressions (x100): `update` takes the K referred objects of one clip."""

    def __init__(self, *, bound_th: float = DAVIS_BOUND_TH) -> None:
        self.bound_th = bound_th
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)  # J sum, F sum, expressions

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor, meta: dict | None = None) -> None:
        """pred_masks, gt_masks: (K, T, H, W) bool, K expressions of a clip over its T annotated frames."""
        _check(pred_masks, gt_masks, 4, "VideoSegMetric.update")
        for pred, gt in zip(pred_masks.cpu(), gt_masks.cpu(), strict=True):
            j = region_similarity(pred, gt).mean()
            f = contour_accuracy(pred, gt, bound_th=self.bound_th).mean()
            self.sums += torch.stack([j, f, torch.ones((), dtype=torch.float64)])

    def compute(self) -> dict[str, float]:
        j_sum, f_sum, count = all_reduce_sum(self.sums).tolist()
        j, f = (100 * j_sum / count, 100 * f_sum / count) if count else (0.0, 0.0)
        return {"J&F": (j + f) / 2, "J": j, "F": f, "count": int(count)}

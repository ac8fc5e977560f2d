"""Grounding metrics: cIoU / gIoU for referring segmentation (and ReasonSeg, with ignored pixels), Average Recall for
Panoptic Narrative Grounding.

Conventions (state them with every number):
- Masks are bool, compared at the ground-truth (original image) size; predicted mask = sigmoid(logits) > 0.5.
- An object whose prediction and ground truth are both empty (union 0) has IoU 1.0, as in LISA's evaluation; it
  adds nothing to the cIoU sums. An empty prediction for a non-empty ground truth has IoU 0.
- cIoU = sum of intersections / sum of unions over all objects; gIoU = mean per-object IoU. Both x100.
- PNG Average Recall = area under recall(IoU >= t) for t in [0, 1]. For N objects this area is exactly the mean
  IoU: integral_0^1 #{i : IoU_i >= t} / N dt = (1/N) sum_i IoU_i. We compute it exactly that way; the PNG
  reference code integrates a 1e-5 threshold grid, which differs by at most 1e-5 (0.001 AR points).
- Every metric has `update(pred_masks, gt_masks, meta)` (meta: the item's meta dict, for the per-object flags a
  metric may need) and `compute()`, so scoring loops never switch on the dataset.
- Metrics keep sums only; `compute()` all-reduces them across processes when torch.distributed is initialized
  (every rank must call it), without changing the local state, so it can be called repeatedly.
"""

from __future__ import annotations

import math

import torch

from flmm_model.distributed import all_reduce_sum

PNG_GROUPS = ("all", "things", "stuff", "singulars", "plurals")


def _check_masks(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> None:
    for name, masks in (("pred_masks", pred_masks), ("gt_masks", gt_masks)):
        if masks.dtype != torch.bool or masks.ndim != 3:
            raise ValueError(f"{name}: expected a (K, H, W) bool tensor (threshold logits first), found "
                             f"{masks.dtype} of shape {tuple(masks.shape)}")
    if pred_masks.shape != gt_masks.shape:
        raise ValueError(f"pred_masks {tuple(pred_masks.shape)} and gt_masks {tuple(gt_masks.shape)} must have the "
                         f"same (K, H, W) shape: resize predictions to the ground-truth size")


def intersection_union(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object pixel counts.

    Args:
        pred_masks: (K, H, W) bool.
        gt_masks: (K, H, W) bool.

    Returns:
        intersection, union: (K,) float64 on the CPU.
    """
    _check_masks(pred_masks, gt_masks)
    pred = pred_masks.flatten(1)  # (K, H*W)
    gt = gt_masks.to(pred_masks.device).flatten(1)  # (K, H*W)
    intersection = (pred & gt).sum(dim=1)  # (K,)
    union = (pred | gt).sum(dim=1)  # (K,)
    return intersection.double().cpu(), union.double().cpu()


def iou_from_counts(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """IoU from per-object pixel counts; 1.0 where the union is empty (both masks empty, LISA's convention)."""
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def mask_iou(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Per-object IoU, (K,) float64 in [0, 1]; 1.0 where both masks are empty."""
    return iou_from_counts(*intersection_union(pred_masks, gt_masks))


def average_recall(ious: torch.Tensor) -> float:
    """Area under recall(IoU >= t) over t in [0, 1] (x100), exactly: the mean IoU. NaN for no objects."""
    return 100.0 * float(ious.double().mean()) if ious.numel() else math.nan


def recall_curve(ious: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Fraction of objects with IoU >= t for each threshold t: (T,) float64 (for plots and checks)."""
    return (ious.double()[None, :] >= thresholds.double()[:, None]).double().mean(dim=1)  # (T,)


class ReferSegMetric:
    """cIoU and gIoU over a referring-segmentation split, accumulated batch by batch (and across processes)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # intersection sum, union sum, IoU sum, object count
        self._sums = torch.zeros(4, dtype=torch.float64)

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor, meta: dict | None = None) -> None:
        """Add one sample's objects.

        Args:
            pred_masks: (K, H, W) bool predictions at the ground-truth size.
            gt_masks: (K, H, W) bool ground truth.
            meta: the item's meta dict (unused).
        """
        intersection, union = intersection_union(pred_masks, gt_masks)
        ious = iou_from_counts(intersection, union)
        self._sums += torch.stack([intersection.sum(), union.sum(), ious.sum(), torch.tensor(float(ious.numel()))])

    def compute(self) -> dict[str, float]:
        """{"cIoU", "gIoU"} x100 and "count" (objects), over all processes; NaN scores when count is 0."""
        intersection, union, iou_sum, count = all_reduce_sum(self._sums).tolist()
        if count == 0:
            return {"cIoU": math.nan, "gIoU": math.nan, "count": 0}
        ciou = 100.0 * intersection / union if union > 0 else 100.0
        return {"cIoU": ciou, "gIoU": 100.0 * iou_sum / count, "count": int(count)}


class PngRecallMetric:
    """PNG Average Recall for all / things / stuff / singulars / plurals, accumulated batch by batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(PNG_GROUPS), 2, dtype=torch.float64)  # (group, [IoU sum, count])

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor, meta: dict) -> None:
        """Add one narrative's objects.

        Args:
            pred_masks: (K, H, W) bool predictions at the ground-truth size.
            gt_masks: (K, H, W) bool ground truth.
            meta: the item's meta dict with K flags each in `isthing` and `plural`.
        """
        isthing, plural = meta["isthing"], meta["plural"]
        ious = mask_iou(pred_masks, gt_masks)  # (K,)
        if len(isthing) != ious.numel() or len(plural) != ious.numel():
            raise ValueError(f"PngRecallMetric.update: {ious.numel()} masks but {len(isthing)} isthing and "
                             f"{len(plural)} plural flags")
        thing = torch.tensor([bool(flag) for flag in isthing], dtype=torch.bool)  # (K,)
        many = torch.tensor([bool(flag) for flag in plural], dtype=torch.bool)  # (K,)
        members = torch.stack([torch.ones_like(thing), thing, ~thing, ~many, many])  # (groups, K)
        self._sums[:, 0] += (members.double() * ious[None, :]).sum(dim=1)
        self._sums[:, 1] += members.double().sum(dim=1)

    def compute(self) -> dict[str, float]:
        """{"AR_<group>"} x100 and {"count_<group>"} for each group, over all processes; NaN for empty groups."""
        sums = all_reduce_sum(self._sums)
        result: dict[str, float] = {}
        for (iou_sum, count), group in zip(sums.tolist(), PNG_GROUPS, strict=True):
            result[f"AR_{group}"] = 100.0 * iou_sum / count if count > 0 else math.nan
            result[f"count_{group}"] = int(count)
        return result


def pointing_hits(attn_maps: torch.Tensor, gt_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game of attention maps on the image-token grid: is the argmax cell inside the object?

    Cell (r, c) of an h x w grid covers the pixels [r * H / h, (r + 1) * H / h) x [c * W / w, (c + 1) * W / w) of the
    original H x W image (Qwen's resize keeps the whole image); it counts as inside an object when the pixel under
    its centre, (floor((r + 0.5) * H / h), floor((c + 0.5) * W / w)), belongs to the object's mask. Chance is the
    hit rate of a uniformly random cell: the fraction of cells inside the object. Ties go to the first cell in
    row-major order.

    Args:
        attn_maps: (K, h, w) non-negative attention (any float dtype), one map per object.
        gt_masks: (K, H, W) bool ground truth at the original image size.

    Returns:
        hits: (K,) bool, the argmax cell is inside object k.
        chance: (K,) float64 in [0, 1], fraction of cells inside object k.
    """
    if attn_maps.ndim != 3 or gt_masks.ndim != 3 or attn_maps.shape[0] != gt_masks.shape[0]:
        raise ValueError(f"pointing_hits: expected attn_maps (K, h, w) and gt_masks (K, H, W) with the same K, found "
                         f"{tuple(attn_maps.shape)} and {tuple(gt_masks.shape)}")
    if gt_masks.dtype != torch.bool:
        raise ValueError(f"pointing_hits: gt_masks must be bool, found {gt_masks.dtype}")
    (_, h, w), (_, height, width) = attn_maps.shape, gt_masks.shape
    rows = ((torch.arange(h, dtype=torch.float64) + 0.5) * height / h).floor().long()  # (h,), pixel row of centres
    cols = ((torch.arange(w, dtype=torch.float64) + 0.5) * width / w).floor().long()  # (w,)
    inside = gt_masks.cpu()[:, rows][:, :, cols].flatten(1)  # (K, h*w): cell centre inside the object
    best = attn_maps.detach().float().cpu().flatten(1).argmax(dim=1)  # (K,), row-major cell index
    hits = inside.gather(1, best[:, None])[:, 0]  # (K,)
    return hits, inside.double().mean(dim=1)


class PointingMetric:
    """Pointing accuracy of attention maps (see `pointing_hits`) next to chance, accumulated over objects."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)  # hits, chance sum, object count

    def update(self, attn_maps: torch.Tensor, gt_masks: torch.Tensor) -> None:
        """Add one sample's objects: attn_maps (K, h, w), gt_masks (K, H, W) bool."""
        hits, chance = pointing_hits(attn_maps, gt_masks)
        self._sums += torch.stack([hits.double().sum(), chance.sum(), torch.tensor(float(hits.numel()))])

    def compute(self) -> dict[str, float]:
        """{"pointing", "pointing_chance"} x100 and "count" (objects), over all processes; NaN when count is 0."""
        hits, chance, count = all_reduce_sum(self._sums).tolist()
        if count == 0:
            return {"pointing": math.nan, "pointing_chance": math.nan, "count": 0}
        return {"pointing": 100.0 * hits / count, "pointing_chance": 100.0 * chance / count, "count": int(count)}


class ReasonSegMetric:
    """ReasonSeg gIoU / cIoU with ignored pixels left out of both intersection and union (LISA's and F-LMM's rule).

    gIoU = mean per-image IoU (1.0 where prediction and target are both empty outside the ignored pixels), cIoU =
    sum of intersections / sum of unions; both x100.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)  # intersection sum, union sum, IoU sum, image count

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor, meta: dict) -> None:
        """Add one image.

        Args:
            pred_masks: (1, H, W) bool prediction at the ground-truth size.
            gt_masks: (1, H, W) bool target.
            meta: the item's meta with `ignore_mask` ((H, W) bool; absent = nothing ignored).
        """
        _check_masks(pred_masks, gt_masks)
        ignore = meta.get("ignore_mask") if meta else None
        if ignore is None:
            ignore = torch.zeros(gt_masks.shape[1:], dtype=torch.bool)
        if tuple(ignore.shape) != tuple(gt_masks.shape[1:]):
            raise ValueError(f"ReasonSegMetric.update: ignore_mask {tuple(ignore.shape)} does not match the masks "
                             f"{tuple(gt_masks.shape[1:])}")
        keep = ~ignore.to(pred_masks.device, torch.bool)
        intersection, union = intersection_union(pred_masks & keep, gt_masks.to(pred_masks.device) & keep)
        ious = iou_from_counts(intersection, union)
        self._sums += torch.stack([intersection.sum(), union.sum(), ious.sum(), torch.tensor(float(ious.numel()))])

    def compute(self) -> dict[str, float]:
        """{"gIoU", "cIoU"} x100 and "count" (images), over all processes; NaN scores when count is 0."""
        intersection, union, iou_sum, count = all_reduce_sum(self._sums).tolist()
        if count == 0:
            return {"gIoU": math.nan, "cIoU": math.nan, "count": 0}
        return {"gIoU": 100.0 * iou_sum / count, "cIoU": 100.0 * intersection / union if union > 0 else 100.0,
                "count": int(count)}

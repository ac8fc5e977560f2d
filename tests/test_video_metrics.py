"""J, F and J&F (`flmm_model.video_metrics`) against hand-computed cases and, for F, against an independent
implementation of the DAVIS measure written here: boundaries by a per-pixel loop over the DAVIS rule, matches by
Euclidean distance transforms (scipy) instead of disk dilations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from skimage.draw import ellipse, polygon

from flmm_model.video_metrics import (
    VideoSegMetric,
    boundary_map,
    contour_accuracy,
    dilate_disk,
    region_similarity,
)


def square(size: int, top: int, left: int, side: int = 4) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """DAVIS's seg2bmap rule, pixel by pixel: differs from the east, south or south-east neighbour (background
    beyond the image), except the last row (east only), the last column (south only) and the corner (never)."""
    height, width = mask.shape

    def at(y: int, x: int) -> bool:
        return bool(mask[y, x]) if y < height and x < width else False

    out = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            if y == height - 1 and x == width - 1:
                continue
            if y == height - 1:
                out[y, x] = at(y, x) != at(y, x + 1)
            elif x == width - 1:
                out[y, x] = at(y, x) != at(y + 1, x)
            else:
                out[y, x] = at(y, x) != at(y, x + 1) or at(y, x) != at(y + 1, x) or at(y, x) != at(y + 1, x + 1)
    return out


def reference_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pred_b, gt_b = reference_boundary(pred), reference_boundary(gt)
    if not pred_b.any() and not gt_b.any():
        return 1.0
    if not pred_b.any() or not gt_b.any():
        return 0.0
    # Distance from every pixel to the nearest boundary pixel of the other mask: matched when <= radius.
    to_gt, to_pred = distance_transform_edt(~gt_b), distance_transform_edt(~pred_b)
    precision = float((to_gt[pred_b] <= radius).mean())
    recall = float((to_pred[gt_b] <= radius).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_of_a_square_is_both_sides_of_its_edge():
    boundary = boundary_map(square(12, 2, 2))
    # Inside: the right column and the bottom row (7); outside: the column to the left, the row above, the corner (9).
    assert int(boundary.sum()) == 16
    assert boundary[2:6, 5].all() and boundary[5, 2:6].all() and boundary[2:6, 1].all() and boundary[1, 1:6].all()
    assert not boundary[2:5, 2:5].any()


def test_hand_computed_shifted_squares():
    gt = square(12, 2, 2)
    # Shifted by 1 column, radius 1: every boundary pixel has a partner 1 pixel away. J = 12 / 20.
    one = square(12, 2, 3)[None]
    assert contour_accuracy(one, gt[None], bound_th=1).item() == pytest.approx(1.0)
    assert region_similarity(one, gt[None]).item() == pytest.approx(12 / 20)
    # Shifted by 3 columns: 9 of the 16 boundary pixels on each side are within 1 pixel. J = 4 / 28.
    three = square(12, 2, 5)[None]
    assert contour_accuracy(three, gt[None], bound_th=1).item() == pytest.approx(9 / 16)
    assert region_similarity(three, gt[None]).item() == pytest.approx(4 / 28)
    # Radius 3 reaches every partner again.
    assert contour_accuracy(three, gt[None], bound_th=3).item() == pytest.approx(1.0)


def test_empty_masks_follow_davis():
    empty, gt = torch.zeros(1, 12, 12, dtype=torch.bool), square(12, 2, 2)[None]
    assert region_similarity(empty, empty).item() == 1.0 and contour_accuracy(empty, empty).item() == 1.0
    assert region_similarity(empty, gt).item() == 0.0 and contour_accuracy(empty, gt).item() == 0.0
    assert region_similarity(gt, empty).item() == 0.0 and contour_accuracy(gt, empty).item() == 0.0


def test_disk_dilation_is_the_disk():
    point = torch.zeros(15, 15, dtype=torch.bool)
    point[7, 7] = True
    for radius in range(5):
        ys, xs = np.mgrid[:15, :15]
        expected = (ys - 7) ** 2 + (xs - 7) ** 2 <= radius**2
        assert np.array_equal(dilate_disk(point, radius).numpy(), expected), radius


def blobs(seed: int, height: int, width: int) -> np.ndarray:
    """An ellipse and a polygon at random places (masks with curved and straight edges, touching the border)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    rr, cc = ellipse(rng.integers(0, height), rng.integers(0, width), rng.integers(3, height // 2),
                     rng.integers(3, width // 2), shape=mask.shape, rotation=rng.uniform(0, math.pi))
    mask[rr, cc] = True
    rr, cc = polygon(rng.integers(0, height, 5), rng.integers(0, width, 5), shape=mask.shape)
    mask[rr, cc] ^= True
    return mask


@pytest.mark.parametrize("bound_th", [0.008, 0.05, 2])
def test_contour_accuracy_matches_an_independent_davis_measure(bound_th):
    pairs = [(blobs(seed, 47, 61), blobs(seed + 100, 47, 61)) for seed in range(6)]
    pairs += [(blobs(7, 47, 61), blobs(7, 47, 61)), (np.zeros((47, 61), bool), blobs(8, 47, 61))]
    pred = torch.from_numpy(np.stack([p for p, _ in pairs]))
    gt = torch.from_numpy(np.stack([g for _, g in pairs]))
    ours = contour_accuracy(pred, gt, bound_th=bound_th)
    for index, (p, g) in enumerate(pairs):
        assert np.array_equal(boundary_map(torch.from_numpy(p)).numpy(), reference_boundary(p)), index
        assert ours[index].item() == pytest.approx(reference_f(p, g, bound_th), abs=1e-12), index


def test_video_metric_averages_frames_then_expressions():
    gt = square(12, 2, 2)
    metric = VideoSegMetric(bound_th=1)
    # Expression 0: frames (J, F) = (1, 1) and (12/20, 1); expression 1: one frame (4/28, 9/16).
    metric.update(torch.stack([gt, square(12, 2, 3)])[None], torch.stack([gt, gt])[None])
    metric.update(square(12, 2, 5)[None, None], gt[None, None])
    j = ((1 + 12 / 20) / 2 + 4 / 28) / 2
    f = ((1 + 1) / 2 + 9 / 16) / 2
    result = metric.compute()
    assert result["count"] == 2
    assert result["J"] == pytest.approx(100 * j) and result["F"] == pytest.approx(100 * f)
    assert result["J&F"] == pytest.approx(100 * (j + f) / 2)


def test_bad_masks_are_refused_with_the_shapes():
    gt = square(12, 2, 2)
    with pytest.raises(ValueError, match=r"VideoSegMetric.update: pred_masks must be a bool tensor of 4 dimensions"):
        VideoSegMetric().update(gt[None], gt[None])
    with pytest.raises(ValueError, match=r"pred_masks \(1, 2, 12, 12\) and gt_masks \(1, 1, 12, 12\)"):
        VideoSegMetric().update(torch.stack([gt, gt])[None], gt[None, None])
    with pytest.raises(ValueError, match="contour_accuracy: gt_masks must be a bool tensor"):
        contour_accuracy(gt[None], gt[None].float())

"""cIoU / gIoU and PNG Average Recall against hand-computed cases, including empty predictions and empty unions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from flmm_model import distributed, metrics
from flmm_model.metrics import PngRecallMetric, ReferSegMetric, average_recall, mask_iou, recall_curve


def _masks(*grids: list[list[int]]) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.int64).bool()  # (K, H, W)


# Three objects on 2 x 3 images:
#   0: gt 4 px, prediction 2 of them + 1 outside  -> I 2, U 5, IoU 0.4
#   1: gt 2 px, empty prediction                  -> I 0, U 2, IoU 0
#   2: empty gt, empty prediction (empty union)   -> I 0, U 0, IoU 1 (by convention)
PRED = _masks([[1, 1, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])
GT = _masks([[1, 1, 1], [1, 0, 0]], [[0, 1, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])


def test_mask_iou_hand_cases():
    torch.testing.assert_close(mask_iou(PRED, GT), torch.tensor([0.4, 0.0, 1.0], dtype=torch.float64))
    # A non-empty prediction for an empty ground truth scores 0.
    assert mask_iou(_masks([[1, 0, 0], [0, 0, 0]]), _masks([[0, 0, 0], [0, 0, 0]])).item() == 0.0


def test_refer_seg_metric_hand_computed():
    metric = ReferSegMetric()
    metric.update(PRED[:2], GT[:2])  # two batches, accumulated
    metric.update(PRED[2:], GT[2:])
    result = metric.compute()
    assert result["count"] == 3
    assert result["cIoU"] == pytest.approx(100 * (2 + 0 + 0) / (5 + 2 + 0))
    assert result["gIoU"] == pytest.approx(100 * (0.4 + 0.0 + 1.0) / 3)
    assert metric.compute() == result  # compute does not change the state
    metric.reset()
    assert math.isnan(metric.compute()["cIoU"]) and metric.compute()["count"] == 0


def test_refer_seg_metric_only_empty_unions_is_perfect():
    metric = ReferSegMetric()
    metric.update(GT[2:], GT[2:])
    assert metric.compute() == {"cIoU": 100.0, "gIoU": 100.0, "count": 1}


def test_metrics_reject_logits_and_size_mismatch():
    metric = ReferSegMetric()
    with pytest.raises(ValueError, match="bool"):
        metric.update(PRED.float(), GT)
    with pytest.raises(ValueError, match="same"):
        metric.update(PRED[:, :, :2], GT)


def test_png_recall_metric_groups_hand_computed():
    metric = PngRecallMetric()
    # IoUs 0.4 (thing, plural), 0.0 (stuff, singular), 1.0 (thing, singular)
    metric.update(PRED, GT, {"isthing": [True, False, True], "plural": [True, False, False]})
    result = metric.compute()
    assert result["AR_all"] == pytest.approx(100 * 1.4 / 3) and result["count_all"] == 3
    assert result["AR_things"] == pytest.approx(100 * 1.4 / 2) and result["count_things"] == 2
    assert result["AR_stuff"] == pytest.approx(0.0) and result["count_stuff"] == 1
    assert result["AR_singulars"] == pytest.approx(50.0) and result["count_singulars"] == 2
    assert result["AR_plurals"] == pytest.approx(40.0) and result["count_plurals"] == 1
    with pytest.raises(ValueError, match="3 masks but 2 isthing"):
        metric.update(PRED, GT, {"isthing": [True, False], "plural": [True, False, False]})
    assert math.isnan(PngRecallMetric().compute()["AR_plurals"])


def test_average_recall_is_the_area_under_the_recall_curve():
    ious = torch.tensor([0.0, 0.13, 0.5, 0.77, 0.9, 1.0, 0.333])
    # The PNG reference integrates recall(IoU >= t) on a 1e-5 grid (left Riemann sum).
    thresholds = torch.arange(0, 1, 1e-5, dtype=torch.float64)
    grid_area = float(recall_curve(ious, thresholds).sum() * 1e-5)
    assert average_recall(ious) == pytest.approx(100 * grid_area, abs=1e-3)
    assert average_recall(ious) == pytest.approx(100 * float(ious.double().mean()))


def test_metrics_sum_across_processes(tmp_path, monkeypatch):
    # A real one-process gloo group exercises the all_reduce path ...
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metric = ReferSegMetric()
        metric.update(PRED, GT)
        assert metric.compute()["cIoU"] == pytest.approx(100 * 2 / 7)
    finally:
        dist.destroy_process_group()
    # ... and a simulated second rank with the same objects doubles the sums.
    monkeypatch.setattr(metrics, "all_reduce_sum", lambda values: values * 2)
    png = PngRecallMetric()
    png.update(PRED, GT, {"isthing": [True, False, True], "plural": [True, False, False]})
    assert png.compute()["count_all"] == 6 and png.compute()["AR_all"] == pytest.approx(100 * 1.4 / 3)
    refer = ReferSegMetric()
    refer.update(PRED, GT)
    assert refer.compute()["count"] == 6 and refer.compute()["gIoU"] == pytest.approx(100 * 1.4 / 3)


def test_metrics_reduce_with_the_one_device_aware_all_reduce_sum():
    # One implementation for training, validation and evaluation (it handles NCCL's CUDA-only reductions).
    assert metrics.all_reduce_sum is distributed.all_reduce_sum
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    reduced = metrics.all_reduce_sum(values)  # a world of one: an equal copy
    assert torch.equal(reduced, values) and reduced is not values

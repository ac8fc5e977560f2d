"""Pointing game of attention maps: a hand-computed case, ties, errors, and the layer/head average over a loader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flmm_model.metrics import PointingMetric, pointing_hits
from flmm_model.recipes.pointing import score_pointing


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # A 4 x 6 image seen as a 2 x 3 grid: cell centres fall on pixel rows 1, 3 and pixel columns 1, 3, 5.
    gt = torch.zeros(3, 4, 6, dtype=torch.bool)
    gt[0, 2:4, 4:6] = True  # holds the centre (3, 5) of cell (1, 2) only
    gt[1, 0:2, 0:3] = True  # holds the centre (1, 1) of cell (0, 0) only; (1, 3) is outside it
    gt[2] = True  # the whole image: every cell
    maps = torch.zeros(3, 2, 3)
    maps[0, 1, 2] = 0.9  # points into object 0
    maps[1, 0, 1] = 0.5  # points beside object 1 (its cell (0, 1) has centre (1, 3), outside)
    maps[2, 1, 0] = 0.2  # anywhere is inside object 2
    return maps, gt


def test_pointing_hits_and_chance_match_a_hand_computed_case():
    maps, gt = _hand_case()
    hits, chance = pointing_hits(maps, gt)
    assert hits.tolist() == [True, False, True]
    assert chance.tolist() == pytest.approx([1 / 6, 1 / 6, 1.0])
    metric = PointingMetric()
    metric.update(maps[:2], gt[:2])
    metric.update(maps[2:], gt[2:])
    result = metric.compute()
    assert result["count"] == 3
    assert result["pointing"] == pytest.approx(100 * 2 / 3)
    assert result["pointing_chance"] == pytest.approx(100 * (1 / 6 + 1 / 6 + 1) / 3)


def test_pointing_ties_go_to_the_first_cell_and_an_object_between_centres_is_never_hit():
    gt = torch.zeros(1, 4, 6, dtype=torch.bool)
    gt[0, 0, 0] = True  # contains no cell centre
    hits, chance = pointing_hits(torch.ones(1, 2, 3), gt)  # all cells tie: the first, (0, 0), is chosen
    assert hits.tolist() == [False] and chance.tolist() == [0.0]
    gt[0, 1, 1] = True  # now the centre of cell (0, 0) is inside
    assert pointing_hits(torch.ones(1, 2, 3), gt)[0].tolist() == [True]
    assert PointingMetric().compute()["count"] == 0


def test_pointing_rejects_mismatched_or_non_bool_input():
    maps, gt = _hand_case()
    with pytest.raises(ValueError, match="same K"):
        pointing_hits(maps[:2], gt)
    with pytest.raises(ValueError, match="must be bool"):
        pointing_hits(maps, gt.float())


def test_score_pointing_averages_every_layer_and_head():
    maps, gt = _hand_case()
    # Channel 0 alone would point object 0 elsewhere; the mean over the 3 channels points where `maps` does.
    decoy = torch.zeros(3, 2, 3)
    decoy[0, 0, 0] = 1.0
    channels = torch.stack([decoy, 2 * maps, 2 * maps], dim=1)  # (K, C=3, h, w)

    class FakeLMM:
        sharded = False  # FrozenQwenLMM's: whether model.shard_lmm=fsdp sharded it

        def __call__(self, input_ids, attention_mask, pixel_values, image_grid_thw, mask_ids, grounded_image=None):
            return SimpleNamespace(attention_maps=[channels])

    batch = dict(input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, mask_ids=None,
                 images=[torch.zeros(3, 4, 6, dtype=torch.uint8)], gt_masks=[gt])
    result = score_pointing(FakeLMM(), [batch, dict(batch, images=[], gt_masks=[])])  # an all-skipped batch too
    assert result["count"] == 3 and result["pointing"] == pytest.approx(100 * 2 / 3)

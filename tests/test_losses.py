"""BCE / Dice against hand-computed values, the batch mean over masks of different sizes, GT resizing."""

from __future__ import annotations

import math

import pytest
import torch

from flmm_model.modeling.losses import bce_loss, dice_loss, mask_loss_terms, resize_gt_masks

# One mask of two pixels: p = sigmoid(logits) = (0.5, 0.75), target = (1, 0).
LOGITS = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, 2)
TARGETS = torch.tensor([[[1.0, 0.0]]])


def test_bce_matches_hand_computed_value():
    # -log(0.5) for the positive pixel, -log(1 - 0.75) = log(4) for the negative one, mean over 2 pixels.
    expected = (math.log(2.0) + math.log(4.0)) / 2
    torch.testing.assert_close(bce_loss(LOGITS, TARGETS), torch.tensor([expected]))


def test_dice_matches_hand_computed_value():
    # intersection = 0.5, sum(p) + sum(t) = 1.25 + 1 = 2.25.
    torch.testing.assert_close(dice_loss(LOGITS, TARGETS, eps=0.0), torch.tensor([1 - 1.0 / 2.25]))
    torch.testing.assert_close(dice_loss(LOGITS, TARGETS), torch.tensor([1 - 2.0 / 3.25]))  # eps = 1


def test_dice_is_zero_for_empty_target_and_empty_prediction():
    logits = torch.full((1, 4, 4), -30.0)
    targets = torch.zeros(1, 4, 4)
    assert dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_are_per_mask():
    logits = torch.stack([LOGITS[0], -LOGITS[0]])  # (2, 1, 2)
    targets = torch.cat([TARGETS, TARGETS])
    assert bce_loss(logits, targets).shape == (2,)
    assert dice_loss(logits, targets).shape == (2,)
    # Mask 2: p = (0.5, 0.25): intersection 0.5, total 0.75 + 1 = 1.75.
    torch.testing.assert_close(dice_loss(logits, targets, eps=0.0)[1], torch.tensor(1 - 1.0 / 1.75))


def test_bool_targets_and_bf16_logits_are_accepted():
    loss = bce_loss(LOGITS.to(torch.bfloat16), TARGETS.bool())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, bce_loss(LOGITS, TARGETS), rtol=1e-2, atol=1e-2)


def test_mask_loss_terms_average_over_all_masks_of_all_images():
    torch.manual_seed(0)
    image_a = (torch.randn(2, 5, 7), torch.rand(2, 5, 7).round())
    image_b = (torch.randn(1, 3, 4), torch.rand(1, 3, 4).round())
    terms = mask_loss_terms([image_a[0], image_b[0]], [image_a[1], image_b[1]])
    per_mask_bce = torch.cat([bce_loss(*image_a), bce_loss(*image_b)])  # 3 masks, each counts once
    per_mask_dice = torch.cat([dice_loss(*image_a), dice_loss(*image_b)])
    torch.testing.assert_close(terms["bce"], per_mask_bce.mean())
    torch.testing.assert_close(terms["dice"], per_mask_dice.mean())


def test_mask_loss_terms_of_no_masks_are_zero_and_differentiable():
    logits = torch.zeros(0, 4, 4, requires_grad=True)
    terms = mask_loss_terms(logits, torch.zeros(0, 4, 4))
    assert terms["bce"].item() == 0.0 and terms["dice"].item() == 0.0
    (terms["bce"] + terms["dice"]).backward()
    assert logits.grad is not None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\(1, 1, 2\) and \(1, 2, 1\)"):
        bce_loss(LOGITS, TARGETS.reshape(1, 2, 1))


def test_resize_gt_masks_gives_cell_coverage():
    gt_masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt_masks[0, 0, 0] = True  # one pixel of the top-left 2x2 cell
    gt_masks[1, :, :2] = True  # left half
    resized = resize_gt_masks(gt_masks, (2, 2))
    torch.testing.assert_close(resized[0], torch.tensor([[0.25, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(resized[1], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert resize_gt_masks(gt_masks, (8, 8)).shape == (2, 8, 8)

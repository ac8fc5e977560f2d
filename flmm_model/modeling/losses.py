"""Mask losses: per-mask BCE and Dice on logits, and their means over all masks of a batch.

F-LMM trains with BCE + Dice (weight 1 each) on the coarse U-Net mask and on the SAM mask. Every function here
takes logits (not probabilities) and targets in [0, 1] of the same shape, and computes in float32 whatever the
input dtype, so bf16 logits do not lose the small per-pixel terms in the sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shapes(name: str, logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or logits.shape != targets.shape:
        raise ValueError(f"{name}: expected logits and targets of the same shape (N, H, W), found "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits, averaged over the pixels of each mask.

    Args:
        logits: (N, H, W) mask logits.
        targets: (N, H, W) ground truth in [0, 1] (bool or float; soft values allowed).

    Returns:
        (N,) float32 loss per mask.
    """
    _check_shapes("bce_loss", logits, targets)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return per_pixel.flatten(1).mean(dim=1)  # (N, H*W) -> (N,)


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Dice loss on sigmoid probabilities, one value per mask.

    loss = 1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps), p = sigmoid(logits), sums over the pixels of one
    mask. The smoothing constant `eps` (default 1.0, one pixel's worth) keeps the loss defined for an empty target
    and an empty prediction (loss 0) and keeps the gradient bounded on tiny masks; on masks of hundreds of pixels
    it changes the loss by well under 1%.

    Args:
        logits: (N, H, W) mask logits.
        targets: (N, H, W) ground truth in [0, 1] (bool or float).
        eps: smoothing constant added to the numerator and the denominator.

    Returns:
        (N,) float32 loss per mask, in [0, 1].
    """
    _check_shapes("dice_loss", logits, targets)
    probs = logits.float().sigmoid().flatten(1)  # (N, H*W)
    target = targets.float().flatten(1)  # (N, H*W)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    return 1.0 - (2.0 * intersection + eps) / (total + eps)


def mask_loss_terms(logits: Tensor | Sequence[Tensor], targets: Tensor | Sequence[Tensor]) -> dict[str, Tensor]:
    """BCE and Dice, each computed per mask and averaged over all masks.

    Args:
        logits: (N, H, W) mask logits, or a sequence of (N_i, H_i, W_i) tensors (one per image: masks at each
            image's own size); every mask counts once in the mean, whatever its size.
        targets: ground truth in [0, 1], same shape(s) as `logits`.

    Returns:
        dict with float32 scalars `bce` and `dice`. With no mask at all both are zeros that stay connected to
        the logits' graph (so a backward pass still reaches every parameter).
    """
    logits_list = [logits] if isinstance(logits, Tensor) else list(logits)
    targets_list = [targets] if isinstance(targets, Tensor) else list(targets)
    if len(logits_list) != len(targets_list) or not logits_list:
        raise ValueError(f"mask_loss_terms: expected as many logits as targets tensors (at least one), found "
                         f"{len(logits_list)} and {len(targets_list)}")
    bce_terms, dice_terms = [], []
    for index, (mask_logits, gt_masks) in enumerate(zip(logits_list, targets_list, strict=True)):
        _check_shapes(f"mask_loss_terms (tensor {index})", mask_logits, gt_masks)
        bce_terms.append(bce_loss(mask_logits, gt_masks))
        dice_terms.append(dice_loss(mask_logits, gt_masks))
    bce, dice = torch.cat(bce_terms), torch.cat(dice_terms)  # (sum N_i,)
    if bce.numel() == 0:
        zero = sum(mask_logits.float().sum() for mask_logits in logits_list) * 0.0
        return {"bce": zero, "dice": zero.clone()}
    return {"bce": bce.mean(), "dice": dice.mean()}


def canvas_loss_terms(logits: Tensor, targets: Tensor, valid: Tensor, counts: Tensor,
                      eps: float = 1.0) -> dict[str, Tensor]:
    """BCE and Dice per mask for masks of different sizes on one canvas: what `bce_loss` and `dice_loss` give each
    mask at its own size, for all masks in one call.

    Args:
        logits: (N, H, W) mask logits; mask n occupies the top-left part where `valid[n]` is True.
        targets: (N, H, W) ground truth in [0, 1] (bool or float), zero outside the valid part.
        valid: (N, H, W) bool. counts: (N,) float, the number of valid pixels of each mask.
        eps: Dice smoothing (as `dice_loss`).

    Returns:
        dict with float32 (N,) tensors `bce` and `dice`.
    """
    _check_shapes("canvas_loss_terms", logits, targets)
    logits, targets, weight = logits.float(), targets.float(), valid.float()
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="none")
    bce = per_pixel.flatten(1).sum(dim=1) / counts  # (N,)
    probs = (logits.sigmoid() * weight).flatten(1)  # (N, H*W), zero outside each mask
    target = targets.flatten(1)
    intersection = (probs * target).sum(dim=1)
    total = probs.sum(dim=1) + target.sum(dim=1)
    return {"bce": bce, "dice": 1.0 - (2.0 * intersection + eps) / (total + eps)}


def resize_gt_masks(gt_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Ground-truth masks resized to a coarse grid as soft targets: about the fraction of each cell inside.

    Downsampling averages the pixels of each cell (`area` mode: adaptive average pooling, exact when the sizes
    divide, windows rounded outwards to whole pixels otherwise), so a cell half covered by the object gets 0.5.
    A side that grows is resized bilinearly. Use it for the coarse-mask loss, whose grid is much smaller than the
    image.

    Args:
        gt_masks: (N, H, W) bool or float masks in [0, 1].
        size: (h', w') target size.

    Returns:
        (N, h', w') float32 targets in [0, 1].
    """
    if gt_masks.dim() != 3:
        raise ValueError(f"resize_gt_masks: expected (N, H, W) masks, found {tuple(gt_masks.shape)}")
    height, width = gt_masks.shape[1:]
    if gt_masks.shape[0] == 0:
        return gt_masks.new_zeros((0, *size), dtype=torch.float32)
    masks = gt_masks.float()[:, None]  # (N, 1, H, W)
    if size[0] <= height and size[1] <= width:
        resized = F.interpolate(masks, size=size, mode="area")
    else:
        resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    return resized[:, 0].clamp_(0.0, 1.0)  # (N, h', w')

"""3-D M-RoPE position ids for one still image per sample: the same formula in Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Each family's `get_rope_index` (transformers 5.x) walks the tokens sample by sample in Python; for still images
(t = 1) all three give the positions below (Qwen2.5-VL's `second_per_grid_ts` and Qwen3-VL's timestamps only
matter for videos). How the positions become rotary frequencies differs (Qwen3-VL interleaves the t/h/w
sections), but that happens inside the model from the same (3, B, L) ids.
"""

from __future__ import annotations

import torch


def mrope_position_ids(
    *, image_mask: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor, merge_size: int
) -> torch.Tensor:
    """3-D M-RoPE positions for one image block per sample, vectorized over the batch.

    A text token at counter p gets (p, p, p) and advances p by 1. The image block starting at counter c with merged
    grid (t, h, w) gives its token j (c + j // (h*w), c + (j // w) % h, c + j % w) and advances c by max(h, w).
    Counters run over real tokens only; padding gets 0 (as `get_rope_index` does).

    Args:
        image_mask: (B, L') bool, True on the image tokens of real positions.
        attention_mask: (B, L'), 1 on real tokens.
        grid_thw: (B, 3) long, (t, H, W) in patches.
        merge_size: patches per merged image token side.

    Returns:
        (3, B, L') long.
    """
    valid = attention_mask.bool()
    h = (grid_thw[:, 1] // merge_size)[:, None]  # (B, 1)
    w = (grid_thw[:, 2] // merge_size)[:, None]
    image_rank = image_mask.long().cumsum(1) - 1  # (B, L'), j for image tokens
    is_last_image = image_mask & (image_rank == image_mask.sum(1, keepdim=True) - 1)
    # How far each token moves the counter: text 1, the block's last image token max(h, w), other image tokens 0.
    advance = torch.where(image_mask, torch.where(is_last_image, torch.maximum(h, w), 0), 1) * valid
    start = advance.cumsum(1) - advance  # (B, L'), the counter before each token
    j = image_rank.clamp(min=0)
    temporal = torch.where(image_mask, start + j // (h * w), start)
    height = torch.where(image_mask, start + (j // w) % h, start)
    width = torch.where(image_mask, start + j % w, start)
    positions = torch.stack([temporal, height, width])  # (3, B, L')
    return positions * valid

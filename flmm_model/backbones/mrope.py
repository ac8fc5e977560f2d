"""3-D M-RoPE position ids for images and clips: the same formula in Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5.

Each family's `get_rope_index` (transformers 5.x) walks the tokens sample by sample in Python; for still images
(t = 1) all of them give the positions below. Clips differ by family only in what the blocks are and how far apart
their frame groups lie in time, both decided by the caller (`modeling.lmm_inputs`): Qwen2-VL and Qwen2.5-VL give a
clip one block of t frame groups, with temporal step 1 (Qwen2-VL) or `tokens_per_second * second_per_grid_ts`
(Qwen2.5-VL, `time_interval`); Qwen3-VL and Qwen3.5 give each frame group a t = 1 block of its own (timestamp text
in between). How the positions become rotary frequencies differs (Qwen3-VL interleaves the t/h/w sections), but
that happens inside the model from the same (3, B, L) ids.
"""

from __future__ import annotations

import torch


def mrope_position_ids(
    *, image_mask: torch.Tensor, attention_mask: torch.Tensor, grid_thw: torch.Tensor, merge_size: int,
    time_interval: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-D M-RoPE positions for any number of vision blocks (images, clips) per sample, vectorized over the batch.

    A text token at counter p gets (p, p, p) and advances p by 1. A vision block starting at counter c with merged
    grid (t, h, w) gives its token j, in frame group k = j // (h*w), (c + int(k * s), c + (j // w) % h, c + j % w)
    with s the block's temporal step (1 for images), and advances c by max(h, w) (whatever t, as `get_rope_index`).
    Counters run over real tokens only; padding gets 0 (as `get_rope_index` does).

    Args:
        image_mask: (B, L') bool, True on the vision tokens (image or video) of real positions; each block is one
            run of them.
        attention_mask: (B, L'), 1 on real tokens.
        grid_thw: (I, 3) long, (t, H, W) in patches, one row per block in (sample, position) order.
        merge_size: patches per merged image token side.
        time_interval: (I,) float32, each block's temporal step s (Qwen2.5-VL clips: tokens_per_second *
            second_per_grid_ts; the product k * s is taken in float32 and truncated, as `get_rope_index` does);
            None: 1 for every block.

    Returns:
        (3, B, L') long.
    """
    valid = attention_mask.bool()
    previous = torch.nn.functional.pad(image_mask[:, :-1], (1, 0), value=False)
    run_start = image_mask & ~previous  # (B, L'), first token of each image block
    block = (run_start.flatten().long().cumsum(0) - 1).view_as(image_mask).clamp(min=0)  # (B, L'), image index
    columns = torch.arange(image_mask.shape[1], device=image_mask.device).expand_as(image_mask)  # (B, L')
    block_start = torch.zeros(grid_thw.shape[0], dtype=torch.long, device=image_mask.device)  # (I,)
    block_start[block[run_start]] = columns[run_start]  # column of each block's first token
    h = (grid_thw[:, 1] // merge_size)[block]  # (B, L'), the grid of each token's image (junk on text)
    w = (grid_thw[:, 2] // merge_size)[block]
    j = (columns - block_start[block]).clamp(min=0)  # (B, L'), rank of an image token inside its block
    is_last_image = image_mask & (j == h * w * grid_thw[:, 0][block] - 1)
    # How far each token moves the counter: text 1, a block's last image token max(h, w), other image tokens 0.
    advance = torch.where(image_mask, torch.where(is_last_image, torch.maximum(h, w), 0), 1) * valid
    start = advance.cumsum(1) - advance  # (B, L'), the counter before each token
    group = j // (h * w)  # (B, L'), frame group of each vision token
    if time_interval is not None:
        group = (group * time_interval.to(torch.float32)[block]).long()  # float32 product, truncated
    temporal = torch.where(image_mask, start + group, start)
    height = torch.where(image_mask, start + (j // w) % h, start)
    width = torch.where(image_mask, start + j % w, start)
    positions = torch.stack([temporal, height, width])  # (3, B, L')
    return positions * valid

"""The host side of the frozen LMM stage: a compact batch -> `PreparedLMMInputs` (validation, vision-token expansion,
3-D M-RoPE positions and every index the device forward reads), on CPU tensors, from the Qwen config alone.

Data pipelines tokenize the chat text with ONE `<|image_pad|>` per image (what the chat template emits). Qwen needs
N = t * H * W / merge^2 pads per image, N depending on the image size. `prepare_lmm_inputs` expands ids, attention
mask and `mask_ids` with vectorized tensor ops and builds the positions with the family's adapter
(`flmm_model.backbones`). Pre-expanded input (N pads already there, as the HF processor makes it) passes through
unchanged, so both give identical results.

A sample may hold several images (one placeholder block each; `image_grid_thw` has one row per image, in sample
and placeholder order). Grounding reads the attention to ONE image per sample: the first, unless `grounded_image`
names another. This is the one expansion path of the project: the teacher-forced forward, `generate` and caption
pretraining all start from it. It needs no model, only its config, so it runs in the data loader's workers
(`modeling.batch`) as well as in the main process; the device half is `modeling.lmm`.

Shapes: B samples, I images, L compact length, L' expanded length, K objects, P phrase tokens, N image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flmm_model.backbones import adapter_for
from flmm_model.device import move_to
from flmm_model.modeling.attention import PhraseQueries


@dataclass
class PreparedLMMInputs:
    """The LMM stage's inputs after validation, vision-token expansion and indexing, built on the host from the
    compact CPU batch by `FrozenQwenLMM.prepare` and moved to the device in one go (`to`): the forward then reads no
    value back from the device.

    Attributes:
        input_ids, attention_mask, mask_ids: (B, L') expanded, as in `LMMOutput` (mask_ids all -1 for generation).
        image_mask: (B, L') bool, True on the image tokens of every image.
        grounded_mask: (B, L') bool, the image tokens of each sample's grounded image.
        image_positions: (sum_i N_i,) long, flat (b * L' + position) index of every image token, in feature order.
        position_ids: (3, B, L') long M-RoPE positions.
        pixel_values, image_grid_thw: as given (pixel rows of all images; (I, 3) grid).
        queries: `PhraseQueries` (phrase slots, object pooling, grounded image tokens, causal + padding key mask);
            None for generation (no phrase).
        vision_inputs: the vision tower's precomputed keyword inputs (`BackboneAdapter.vision_inputs`).
        num_vision_tokens: per image (I), N_i. grid_hw: per image, the merged grid (h_i, w_i).
        num_objects: per sample, K_b (0 for generation).
        images_per_sample: per sample, its number of images.
        grounded_image: per sample, the grounded image's index among the sample's images.
        grounded_index: per sample, the grounded image's index among all I images.
        object_slots: per sample, per object, its phrase slots: a `slice` when they are consecutive (the usual
            case), else a (T_k,) long tensor.
        has_padding: whether any sample is padded (without padding the decoder runs plain causal attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_ids: torch.Tensor
    image_mask: torch.Tensor
    grounded_mask: torch.Tensor
    image_positions: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    queries: PhraseQueries | None
    vision_inputs: dict[str, Any]
    num_vision_tokens: list[int]
    grid_hw: list[tuple[int, int]]
    num_objects: list[int]
    images_per_sample: list[int]
    grounded_image: list[int]
    grounded_index: list[int]
    object_slots: list[list[slice | torch.Tensor]]
    has_padding: bool = True

    @property
    def grounded_grid_hw(self) -> list[tuple[int, int]]:
        """Per sample, the merged grid (h_b, w_b) of its grounded image."""
        return [self.grid_hw[i] for i in self.grounded_index]

    @property
    def grounded_grid_thw(self) -> torch.Tensor:
        """(B, 3) long, per sample the (t, H, W) patch grid of its grounded image."""
        return self.image_grid_thw[self.grounded_index]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PreparedLMMInputs:
        """Every tensor moved to `device` (`non_blocking` from pinned memory: no host wait)."""
        return move_to(self, device, non_blocking=non_blocking)


@dataclass
class BatchLayout:
    """What `validate_lmm_inputs` reads off a batch (host-side ints).

    Attributes:
        num_vision_tokens: per image (I), N_i = t * H * W / merge^2.
        num_objects: per sample, K_b (0 where no phrase is marked and none is required).
        images_per_sample: per sample, its number of image blocks.
        grounded_image: per sample, the index (among its images) of the image grounding refers to.
        grounded_index: per sample, the same image's index among all I images.
    """

    num_vision_tokens: list[int]
    num_objects: list[int]
    images_per_sample: list[int]
    grounded_image: list[int]
    grounded_index: list[int]


def patch_dim_of(vision_config: Any) -> int:
    """Values per row of `pixel_values` for a vision config: channels * temporal_patch_size * patch_size^2."""
    return vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def prepare_lmm_inputs(
    qwen: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    mask_ids: torch.Tensor | None = None,
    grounded_image: Sequence[int] | torch.Tensor | None = None,
) -> PreparedLMMInputs:
    """Validate a compact batch for `qwen` and build every index its forward (or `generate`) needs, on the host: the
    values are read here, where reading them costs no device sync. The one expansion path of the project: the frozen
    LMM (`FrozenQwenLMM.prepare`), the batch preparer of the loader's workers (`modeling.batch`) and caption
    pretraining (`recipes.pretrain_lmm.CaptionLM`) all start from it. `qwen`: the Qwen-VL model or its config.

    Arguments as in `FrozenQwenLMM.forward` (moved to the CPU first; `pixel_values` stays where it is); `mask_ids`
    None means no phrase (generation), and no object is required.

    Raises:
        ValueError: on inconsistent input (see `validate_lmm_inputs`).
    """
    config = getattr(qwen, "config", qwen)  # a model or its config: only the config is read
    adapter = adapter_for(config)
    vision = config.vision_config
    image_token_id, merge_size = config.image_token_id, vision.spatial_merge_size
    input_ids, attention_mask, image_grid_thw = (t.cpu() for t in (input_ids, attention_mask, image_grid_thw))
    needs_objects = mask_ids is not None
    mask_ids = torch.full_like(input_ids, -1) if mask_ids is None else mask_ids.cpu()
    layout = validate_lmm_inputs(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
        image_grid_thw=image_grid_thw, mask_ids=mask_ids, merge_size=merge_size, image_token_id=image_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        patch_dim=patch_dim_of(vision),
        grounded_image=grounded_image, require_objects=needs_objects,
    )
    input_ids, attention_mask, mask_ids = expand_vision_tokens(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids,
        num_vision_tokens=layout.num_vision_tokens, image_token_id=image_token_id,
    )
    image_mask = (input_ids == image_token_id) & attention_mask.bool()  # (B, L'), every image's tokens
    position_ids = adapter.position_ids(
        image_mask=image_mask, attention_mask=attention_mask, grid_thw=image_grid_thw, merge_size=merge_size
    )
    block = image_block_index(image_mask)  # (B, L'), global image index of each image token
    grounded_mask = image_mask & (block == torch.tensor(layout.grounded_index)[:, None])  # (B, L')
    queries, object_slots = None, []
    if needs_objects:
        queries = PhraseQueries.build(mask_ids=mask_ids, image_mask=grounded_mask, attention_mask=attention_mask,
                                      num_objects=max(layout.num_objects))
        object_slots = _object_slots(queries, layout.num_objects)
    return PreparedLMMInputs(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, image_mask=image_mask,
        grounded_mask=grounded_mask, image_positions=image_mask.flatten().nonzero().flatten(),
        position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, queries=queries,
        vision_inputs=adapter.vision_inputs(vision, image_grid_thw),
        num_vision_tokens=layout.num_vision_tokens,
        grid_hw=[tuple(hw) for hw in (image_grid_thw[:, 1:] // merge_size).tolist()],
        num_objects=layout.num_objects, images_per_sample=layout.images_per_sample,
        grounded_image=layout.grounded_image, grounded_index=layout.grounded_index, object_slots=object_slots,
        has_padding=not bool(attention_mask.all()),
    )


def image_block_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool image tokens -> (B, L) long: the global index (in (sample, position) order) of the image block
    each image token belongs to; -1 elsewhere. Blocks are maximal runs of image tokens."""
    previous = torch.nn.functional.pad(image_mask[:, :-1], (1, 0), value=False)
    run_start = image_mask & ~previous  # (B, L), first token of each block
    block = run_start.flatten().long().cumsum(0).view_as(image_mask) - 1  # (B, L)
    return torch.where(image_mask, block, -1)


def validate_lmm_inputs(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    mask_ids: torch.Tensor,
    merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    patch_dim: int | None = None,
    grounded_image: Sequence[int] | torch.Tensor | None = None,
    require_objects: bool = True,
) -> BatchLayout:
    """Check a batch before the model runs; return its layout (images per sample, tokens per image, objects).

    Every sample holds one or more image blocks `<|vision_start|>` + pads + `<|vision_end|>`, each with one pad
    (compact) or N_i pads (pre-expanded); `image_grid_thw` has one row per block, in (sample, position) order.
    The checks run as tensor ops; a handful of per-sample and per-image counts come to the host in one transfer.

    Raises:
        ValueError: naming the sample (and the image: "sample 1, image 2" = the sample's second image, counted
            from 1), the expected and the found value.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, L), found {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("mask_ids", mask_ids)):
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"found {tuple(tensor.shape)}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw: expected one (t, H, W) row per image, shape (num_images, 3), found "
                         f"{tuple(image_grid_thw.shape)}")

    valid = attention_mask.bool()
    ids = input_ids.masked_fill(~valid, -1)  # padding can never look like a vision token
    is_pad, is_start, is_end = ids.eq(image_token_id), ids.eq(vision_start_token_id), ids.eq(vision_end_token_id)
    before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)  # (B, L), the previous real token or -1
    after = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)  # (B, L), the next real token or -1
    pad_run_start = is_pad & before.eq(vision_start_token_id)  # first pad of each block
    lengths = valid.sum(1)
    columns = torch.arange(valid.shape[1], device=valid.device)
    first_valid = torch.where(valid, columns, valid.shape[1]).amin(1)
    last_valid = torch.where(valid, columns, -1).amax(1)
    counts = torch.stack([
        lengths,
        (last_valid - first_valid + 1 == lengths).long(),  # real tokens form one block: no holes
        is_pad.sum(1), is_start.sum(1), is_end.sum(1), pad_run_start.sum(1),
        (is_pad & after.eq(-1)).sum(1),  # the sequence ends inside a vision block (truncated)
        (is_pad & ~(before.eq(image_token_id) | before.eq(vision_start_token_id))).sum(1)
        + (is_pad & ~(after.eq(image_token_id) | after.eq(vision_end_token_id) | after.eq(-1))).sum(1)
        + (is_start & ~after.eq(image_token_id)).sum(1) + (is_end & ~before.eq(image_token_id)).sum(1),
        (mask_ids.ge(0) & ~valid).sum(1),  # phrase tokens on padding
        (mask_ids.ge(0) & is_pad).sum(1),  # phrase tokens on image pads
        (mask_ids < -1).sum(1),
        mask_ids.amax(1) + 1,  # K_b
    ], dim=1)  # (B, 12)
    pad_run = pad_run_start.flatten().long().cumsum(0).view_as(is_pad) - 1  # (B, L), block index of each pad
    run_lengths = torch.bincount(pad_run[is_pad].clamp(min=0), minlength=int(pad_run_start.sum()))  # (blocks,)
    counts, run_lengths = counts.tolist(), run_lengths.tolist()  # the host transfer

    images_per_sample = []
    for b, (length, span, pads, starts, ends, runs, truncated, misplaced, *_rest) in enumerate(counts):
        if not span or length == 0:
            raise ValueError(f"sample {b}: attention_mask must be one contiguous block of 1s (left or right padding)")
        if pads == 0:
            raise ValueError(f"sample {b}: no <|image_pad|> placeholder (id {image_token_id}) found, expected 1 per "
                             f"image (compact) or N per image (expanded)")
        if truncated:
            raise ValueError(f"sample {b}: the sequence ends inside the vision block (<|vision_end|> missing after "
                             f"the image pads): was it truncated by max_length?")
        if misplaced or starts != ends or starts != runs:
            raise ValueError(f"sample {b}: image pads must sit in runs between <|vision_start|> and <|vision_end|>, "
                             f"one block per image as the chat template emits; found {starts} vision starts, {ends} "
                             f"vision ends and {runs} runs of <|image_pad|>")
        images_per_sample.append(runs)
    num_images = sum(images_per_sample)
    if image_grid_thw.shape[0] != num_images:
        raise ValueError(f"image_grid_thw: expected one (t, H, W) row per image, shape ({num_images}, 3) for the "
                         f"image blocks of the batch (per sample: {images_per_sample}), found "
                         f"{tuple(image_grid_thw.shape)}")
    image_names = [f"sample {b}, image {i + 1}" if n > 1 else f"sample {b}"
                   for b, n in enumerate(images_per_sample) for i in range(n)]
    grids = image_grid_thw.tolist()
    for name, (t, h, w) in zip(image_names, grids, strict=True):
        if t != 1:
            raise ValueError(f"{name}: image_grid_thw t = {t}, expected 1 (still images)")
        if h % merge_size or w % merge_size:
            raise ValueError(f"{name}: image_grid_thw (H, W) = ({h}, {w}) must be divisible by the spatial merge "
                             f"size {merge_size}")
    expected_rows = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or pixel_values.shape[0] != expected_rows:
        raise ValueError(f"pixel_values: expected {expected_rows} rows (sum of t*H*W over image_grid_thw), "
                         f"found shape {tuple(pixel_values.shape)}")
    if patch_dim is not None and pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values: expected {patch_dim} values per patch (3 * temporal_patch_size * "
                         f"patch_size^2, from this backbone's image processor), found {pixel_values.shape[1]}")
    num_vision_tokens = [t * h * w // merge_size**2 for t, h, w in grids]
    for name, pads, n, grid in zip(image_names, run_lengths, num_vision_tokens, grids, strict=True):
        if pads not in (1, n):
            raise ValueError(f"{name}: found {pads} <|image_pad|> tokens, expected 1 (compact) or {n} "
                             f"(expanded for image_grid_thw {tuple(grid)})")

    if grounded_image is None:
        chosen = [0] * batch
    else:
        chosen = [int(g) for g in (grounded_image.tolist() if torch.is_tensor(grounded_image) else grounded_image)]
        if len(chosen) != batch:
            raise ValueError(f"grounded_image: expected one image index per sample ({batch}), found {len(chosen)}")
    first_image = [sum(images_per_sample[:b]) for b in range(batch)]
    for b, (index, available) in enumerate(zip(chosen, images_per_sample, strict=True)):
        if not 0 <= index < available:
            raise ValueError(f"sample {b}: grounded_image {index} does not exist; the sample holds {available} "
                             f"image(s), indices 0..{available - 1}")

    num_objects = []
    for b, (*_layout, on_padding, on_image, below, objects) in enumerate(counts):
        if below:
            raise ValueError(f"sample {b}: mask_ids must be -1 or an object index >= 0, found values below -1")
        if on_padding:
            raise ValueError(f"sample {b}: {on_padding} phrase tokens (mask_ids >= 0) lie on padding "
                             f"(attention_mask == 0)")
        if on_image:
            raise ValueError(f"sample {b}: {on_image} phrase tokens (mask_ids >= 0) lie on <|image_pad|>")
        if objects < 1 and require_objects:
            raise ValueError(f"sample {b}: no phrase token (mask_ids >= 0): expected at least one object")
        if objects >= 1:
            present = torch.unique(mask_ids[b][mask_ids[b] >= 0]).tolist()
            if len(present) != objects:
                missing = sorted(set(range(objects)) - set(present))
                raise ValueError(f"sample {b}: object index {missing[0]} has no token in mask_ids (expected every "
                                 f"index 0..{objects - 1} to mark at least one token)")
        num_objects.append(max(objects, 0))
    return BatchLayout(num_vision_tokens=num_vision_tokens, num_objects=num_objects,
                       images_per_sample=images_per_sample, grounded_image=chosen,
                       grounded_index=[first + index for first, index in zip(first_image, chosen, strict=True)])


def expand_vision_tokens(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ids: torch.Tensor,
    num_vision_tokens: list[int],
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each image block's single `<|image_pad|>` N_i times (blocks already holding N_i pads stay as they are).

    Blocks are numbered in (sample, position) order, the order of `num_vision_tokens` (one entry per image). The
    padding side is kept: left-padded batches (every sample ends at the last column) stay left-padded. Expanded
    image positions get mask_ids -1; padding gets the pad id of the input (the id found under the attention mask's
    zeros, else 0).

    Returns:
        (input_ids, attention_mask, mask_ids), each (B, L') with L' the longest expanded sample.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    is_pad = input_ids.eq(image_token_id) & valid  # (B, L)
    block = image_block_index(is_pad)  # (B, L), image index of each pad
    n = torch.tensor(num_vision_tokens, device=device, dtype=torch.long)  # (I,)
    block_pads = torch.bincount(block[is_pad], minlength=n.numel())  # (I,), pads each block holds now
    compact = block_pads == 1  # (I,), pre-expanded blocks keep one copy per pad
    pad_block = block.clamp(min=0)
    repeats = torch.where(is_pad & compact[pad_block], n[pad_block], 1) * valid  # (B, L), 0 drops padding
    new_lengths = repeats.sum(1)  # (B,)
    total = int(new_lengths.sum())
    out_length = int(new_lengths.max())

    source = torch.repeat_interleave(torch.arange(batch * length, device=device), repeats.flatten(),
                                     output_size=total)  # (T,), flat index of the token each output copies
    sample = source // length  # (T,)
    sample_start = new_lengths.cumsum(0) - new_lengths  # (B,)
    column = torch.arange(total, device=device) - sample_start[sample]  # (T,), position inside the sample
    left_padded = bool(valid[:, -1].all()) and not bool(valid.all())
    if left_padded:
        column = column + (out_length - new_lengths)[sample]

    pad_values = input_ids[~valid]
    pad_id = int(pad_values[0]) if pad_values.numel() else 0
    new_ids = torch.full((batch, out_length), pad_id, dtype=input_ids.dtype, device=device)
    new_mask = torch.zeros((batch, out_length), dtype=attention_mask.dtype, device=device)
    new_mask_ids = torch.full((batch, out_length), -1, dtype=mask_ids.dtype, device=device)
    new_ids[sample, column] = input_ids.flatten()[source]
    new_mask[sample, column] = 1
    new_mask_ids[sample, column] = mask_ids.flatten()[source]
    new_mask_ids[new_ids.eq(image_token_id)] = -1
    return new_ids, new_mask, new_mask_ids


def _object_slots(queries: PhraseQueries, num_objects: list[int]) -> list[list[slice | torch.Tensor]]:
    """Per sample, per object, its phrase slots (host tensors in): a slice when consecutive, else an index tensor."""
    pool = queries.object_pool > 0  # (B, K, P)
    slots = []
    for b, count in enumerate(num_objects):
        per_object = []
        for k in range(count):
            index = pool[b, k].nonzero().flatten()  # (T_k,)
            first, last = int(index[0]), int(index[-1])
            consecutive = last - first + 1 == index.numel()
            per_object.append(slice(first, last + 1) if consecutive else index)
        slots.append(per_object)
    return slots

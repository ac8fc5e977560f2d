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

Clips are expanded model-side the same way. The compact ids hold ONE `<|vision_start|><|video_pad|><|vision_end|>`
per clip (what the chat template emits); the batch carries the clips' `pixel_values_videos` (rows of all clips, as
the HF video processor gives them), `video_grid_thw` (V, 3) and `video_frame_times` (per clip a 1-D tensor: the
time in seconds of each sampled frame, before the processor's padding to an even count). From the times come each
family's timing inputs (`backbones.video`): Qwen2.5-VL's `second_per_grid_ts`, Qwen3-VL / Qwen3.5's per-group
timestamps. Qwen2-VL / Qwen2.5-VL expand the clip's pad to its t*h*w tokens in one block (pre-expanded clips pass
through, as images); Qwen3-VL / Qwen3.5 replace the block with one `<{t:.1f} seconds><|vision_start|>` + h*w pads +
`<|vision_end|>` per frame group, the timestamp tokens composed from `TimestampTokens` (read off the tokenizer at
build time: the model holds no tokenizer). The timestamp is tokenized on its own; the HF processor tokenizes it
with the text before the clip, which gives the same ids whenever that text ends at a special token or a newline
(the chat template puts the clip right after `<|im_start|>user\\n`) or at a letter or digit.

Grounding on a clip: a sample's grounded visual is its image `grounded_image` (default its first image) when it
holds an image, else its first clip; `grounded_clip` names a clip explicitly. The maps of a clip are over all its
video tokens, returned as (K_b, C, G, h, w) (G = the clip's frame groups, `video_grid_thw` t).

The frame budget: a sample whose clips hold more than `max_video_tokens` video tokens is refused with a ValueError
(never truncated); sampling fewer frames is the data side's job.

Shapes: B samples, I images, V clips, L compact length, L' expanded length, K objects, P phrase tokens, N image (or
video) tokens, G frame groups of a clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flmm_model.backbones import adapter_for
from flmm_model.backbones.video import (
    TimestampTokens,
    check_frame_times,
    group_timestamps,
    second_per_grid,
)
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
        grounded_mask: (B, L') bool, the vision tokens of each sample's grounded image (or clip).
        image_positions: (sum_i N_i,) long, flat (b * L' + position) index of every image token, in feature order.
        position_ids: (3, B, L') long M-RoPE positions.
        pixel_values, image_grid_thw: as given (pixel rows of all images; (I, 3) grid); (0, patch_dim) and (0, 3)
            when the batch holds no image.
        queries: `PhraseQueries` (phrase slots, object pooling, grounded image tokens, causal + padding key mask);
            None for generation (no phrase).
        vision_inputs: the vision tower's precomputed keyword inputs for the images (`BackboneAdapter.vision_inputs`).
        num_vision_tokens: per image (I), N_i. grid_hw: per image, the merged grid (h_i, w_i).
        num_objects: per sample, K_b (0 for generation).
        images_per_sample: per sample, its number of images.
        grounded_image: per sample, the grounded image's index among the sample's images (-1: a clip is grounded).
        grounded_index: per sample, the grounded image's index among all I images (-1: a clip is grounded).
        object_slots: per sample, per object, its phrase slots: a `slice` when they are consecutive (the usual
            case), else a (T_k,) long tensor.
        has_padding: whether any sample is padded (without padding the decoder runs plain causal attention).
        video_mask: (B, L') bool, True on the video tokens of every clip.
        video_positions: (sum_v N_v,) long, flat index of every video token, in feature order.
        pixel_values_videos, video_grid_thw: as given (pixel rows of all clips, None without clips; (V, 3) grid).
        video_vision_inputs: the vision tower's precomputed keyword inputs for the clips.
        visual_order: with both images and clips: (sum N_i + sum N_v,) long, the rank of each image token and then
            each video token among all vision tokens in (sample, position) order (to join deepstack features);
            else None.
        num_video_tokens: per clip (V), N_v = t * h * w. clips_per_sample: per sample, its number of clips.
        grounded_clip: per sample, the grounded clip's index among all V clips, or -1 (an image is grounded).
        grounded_grid: per sample, the grid of its attention maps: (h, w) for an image, (G, h, w) for a clip.
        second_per_grid_ts: (V,) float32, each clip's Qwen2.5-VL `second_per_grid_ts` (from its frame times).
        clip_timestamps: per clip, the time (s) of each frame group (what Qwen3-VL writes as text).
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
    video_mask: torch.Tensor | None = None
    video_positions: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_vision_inputs: dict[str, Any] = field(default_factory=dict)
    visual_order: torch.Tensor | None = None
    num_video_tokens: list[int] = field(default_factory=list)
    clips_per_sample: list[int] = field(default_factory=list)
    grounded_clip: list[int] = field(default_factory=list)
    grounded_grid: list[tuple[int, ...]] = field(default_factory=list)
    second_per_grid_ts: torch.Tensor | None = None
    clip_timestamps: list[list[float]] = field(default_factory=list)

    @property
    def has_clips(self) -> bool:
        """Whether the batch holds a clip."""
        return bool(self.num_video_tokens)

    @property
    def visual_mask(self) -> torch.Tensor:
        """(B, L') bool, every vision token: image and video tokens."""
        return self.image_mask if self.video_mask is None else self.image_mask | self.video_mask

    @property
    def grounded_grid_hw(self) -> list[tuple[int, int]]:
        """Per sample, the merged grid (h_b, w_b) of its grounded image (or of each frame group of its clip)."""
        if not self.grounded_grid:
            return [self.grid_hw[i] for i in self.grounded_index]
        return [tuple(grid[-2:]) for grid in self.grounded_grid]

    @property
    def grounded_grid_thw(self) -> torch.Tensor:
        """(B, 3) long, per sample the (t, H, W) patch grid of its grounded image (or clip)."""
        if not any(c >= 0 for c in self.grounded_clip):
            return self.image_grid_thw[self.grounded_index]
        return torch.stack([self.video_grid_thw[c] if c >= 0 else self.image_grid_thw[i]
                            for i, c in zip(self.grounded_index, self.grounded_clip, strict=True)])

    @property
    def num_grounded_tokens(self) -> list[int]:
        """Per sample, the vision tokens of its grounded image or clip."""
        return [self.num_video_tokens[c] if c >= 0 else self.num_vision_tokens[i]
                for i, c in zip(self.grounded_index, self.grounded_clip or [-1] * len(self.grounded_index),
                                strict=True)]

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
        grounded_image: per sample, the index (among its images) of the image grounding refers to (-1: a clip).
        grounded_index: per sample, the same image's index among all I images (-1: a clip).
        num_video_tokens: per clip (V), N_v = t * H * W / merge^2.
        clips_per_sample: per sample, its number of clips.
        grounded_clip: per sample, the index among all V clips of the clip grounding refers to, or -1.
        frame_times: per clip, its frame times (seconds) as floats.
    """

    num_vision_tokens: list[int]
    num_objects: list[int]
    images_per_sample: list[int]
    grounded_image: list[int]
    grounded_index: list[int]
    num_video_tokens: list[int] = field(default_factory=list)
    clips_per_sample: list[int] = field(default_factory=list)
    grounded_clip: list[int] = field(default_factory=list)
    frame_times: list[list[float]] = field(default_factory=list)


def patch_dim_of(vision_config: Any) -> int:
    """Values per row of `pixel_values`: channels * temporal_patch_size * patch_size^2."""
    return vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def prepare_lmm_inputs(
    qwen: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    *,
    mask_ids: torch.Tensor | None = None,
    grounded_image: Sequence[int] | torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_frame_times: Sequence[torch.Tensor | Sequence[float]] | None = None,
    grounded_clip: Sequence[int | None] | None = None,
    timestamp_tokens: TimestampTokens | None = None,
    max_video_tokens: int | None = None,
) -> PreparedLMMInputs:
    """Validate a compact batch for `qwen` and build every index its forward (or `generate`) needs, on the host: the
    values are read here, where reading them costs no device sync. The one expansion path of the project: the frozen
    LMM (`FrozenQwenLMM.prepare`), the batch preparer of the loader's workers (`modeling.batch`) and caption
    pretraining (`recipes.pretrain_lmm.CaptionLM`) all start from it. `qwen`: the Qwen-VL model or its config.

    Arguments as in `FrozenQwenLMM.forward` (moved to the CPU first; `pixel_values` stays where it is); `mask_ids`
    None means no phrase (generation), and no object is required. `timestamp_tokens`: the timestamp pieces of the
    tokenizer's vocabulary, needed for clips of Qwen3-VL / Qwen3.5. `max_video_tokens`: the video tokens a sample may
    hold (None: no limit).

    Raises:
        ValueError: on inconsistent input (see `validate_lmm_inputs`), or a Qwen3-VL / Qwen3.5 clip without
            `timestamp_tokens`.
    """
    config = getattr(qwen, "config", qwen)  # a model or its config: only the config is read
    adapter = adapter_for(config)
    vision = config.vision_config
    image_token_id, video_token_id = config.image_token_id, config.video_token_id
    merge_size, patch_dim = vision.spatial_merge_size, patch_dim_of(vision)
    if pixel_values is None:
        pixel_values = torch.zeros((0, patch_dim))
    image_grid_thw = torch.zeros((0, 3), dtype=torch.long) if image_grid_thw is None else image_grid_thw.cpu()
    video_grid_thw = None if video_grid_thw is None else video_grid_thw.cpu()
    input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
    needs_objects = mask_ids is not None
    mask_ids = torch.full_like(input_ids, -1) if mask_ids is None else mask_ids.cpu()
    layout = validate_lmm_inputs(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
        image_grid_thw=image_grid_thw, mask_ids=mask_ids, merge_size=merge_size, image_token_id=image_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        patch_dim=patch_dim, grounded_image=grounded_image, require_objects=needs_objects,
        video_token_id=video_token_id, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        video_frame_times=video_frame_times, temporal_patch_size=vision.temporal_patch_size,
        max_video_tokens=max_video_tokens, grounded_clip=grounded_clip, compact_clips=adapter.timestamped_video,
    )
    num_clips = len(layout.num_video_tokens)
    temporal_patch = vision.temporal_patch_size
    clip_timestamps = [group_timestamps(times, temporal_patch) for times in layout.frame_times]
    # The vision blocks in (sample, position) order after expansion: their grids (patches), tokens, temporal steps.
    video_blocks: list[list[int]] = []
    video_block_tokens: list[int] = []
    video_intervals: list[float] = []
    if num_clips:
        video_grid_thw = video_grid_thw.long()
        if adapter.timestamped_video:
            if timestamp_tokens is None:
                raise ValueError(f"video: {adapter.name} writes each frame group's timestamp as text before its "
                                 f"vision block, so preparing a clip needs the timestamp token ids of the tokenizer: "
                                 f"pass timestamp_tokens=TimestampTokens.from_tokenizer(tokenizer) "
                                 f"(FrozenQwenLMM(timestamp_tokens=...))")
            prefixes = [[timestamp_tokens.encode(t) for t in stamps] for stamps in clip_timestamps]
            input_ids, attention_mask, mask_ids = insert_clip_timestamps(
                input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, prefixes=prefixes,
                video_token_id=video_token_id, vision_start_token_id=config.vision_start_token_id,
                vision_end_token_id=config.vision_end_token_id)
            for (t, h, w), tokens in zip(video_grid_thw.tolist(), layout.num_video_tokens, strict=True):
                video_blocks += [[1, h, w]] * t  # one t = 1 block per frame group (as `get_rope_index` splits)
                video_block_tokens += [tokens // t] * t
                video_intervals += [1.0] * t
        else:
            video_blocks = video_grid_thw.tolist()
            video_block_tokens = list(layout.num_video_tokens)
            video_intervals = [adapter.video_time_interval(config, times) for times in layout.frame_times]

    is_video_pad = input_ids.eq(video_token_id) & attention_mask.bool()  # (B, L) after the timestamps
    block_is_video = _block_kinds(input_ids.eq(image_token_id) & attention_mask.bool(), is_video_pad)  # per block
    image_intervals = [1.0] * len(layout.num_vision_tokens)
    block_grids, block_tokens, block_intervals = _interleave(
        block_is_video, images=(image_grid_thw.tolist(), layout.num_vision_tokens, image_intervals),
        videos=(video_blocks, video_block_tokens, video_intervals))
    input_ids, attention_mask, mask_ids = expand_vision_tokens(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, num_vision_tokens=block_tokens,
        image_token_id=image_token_id, video_token_id=video_token_id if num_clips else None,
    )
    valid = attention_mask.bool()
    image_mask = input_ids.eq(image_token_id) & valid  # (B, L'), every image's tokens
    video_mask = input_ids.eq(video_token_id) & valid  # (B, L'), every clip's tokens
    visual_mask = image_mask | video_mask
    if num_clips:
        position_ids = adapter.position_ids(
            image_mask=visual_mask, attention_mask=attention_mask, grid_thw=torch.tensor(block_grids),
            merge_size=merge_size, time_interval=torch.tensor(block_intervals, dtype=torch.float32))
    else:  # images only: the image path as it always was
        position_ids = adapter.position_ids(
            image_mask=image_mask, attention_mask=attention_mask, grid_thw=image_grid_thw, merge_size=merge_size)
    grounded_mask = _grounded_mask(image_mask=image_mask, video_mask=video_mask, layout=layout,
                                   group_counts=[t for t, _, _ in video_grid_thw.tolist()] if num_clips else [],
                                   timestamped=adapter.timestamped_video)
    queries, object_slots = None, []
    if needs_objects:
        queries = PhraseQueries.build(mask_ids=mask_ids, image_mask=grounded_mask, attention_mask=attention_mask,
                                      num_objects=max(layout.num_objects))
        object_slots = _object_slots(queries, layout.num_objects)
    grid_hw = [tuple(hw) for hw in (image_grid_thw[:, 1:] // merge_size).tolist()]
    grounded_grid: list[tuple[int, ...]] = []
    for index, clip in zip(layout.grounded_index, layout.grounded_clip, strict=True):
        if clip >= 0:
            t, h, w = video_grid_thw[clip].tolist()
            grounded_grid.append((t, h // merge_size, w // merge_size))
        else:
            grounded_grid.append(grid_hw[index])
    visual_order = None
    if num_clips and image_grid_thw.shape[0]:
        rank = (visual_mask.flatten().long().cumsum(0) - 1).view_as(visual_mask)  # (B, L'), rank among vision tokens
        visual_order = torch.cat([rank[image_mask], rank[video_mask]])
    return PreparedLMMInputs(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, image_mask=image_mask,
        grounded_mask=grounded_mask, image_positions=image_mask.flatten().nonzero().flatten(),
        position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, queries=queries,
        vision_inputs=adapter.vision_inputs(vision, image_grid_thw) if image_grid_thw.shape[0] else {},
        num_vision_tokens=layout.num_vision_tokens, grid_hw=grid_hw,
        num_objects=layout.num_objects, images_per_sample=layout.images_per_sample,
        grounded_image=layout.grounded_image, grounded_index=layout.grounded_index, object_slots=object_slots,
        has_padding=not bool(attention_mask.all()),
        video_mask=video_mask, video_positions=video_mask.flatten().nonzero().flatten(),
        pixel_values_videos=pixel_values_videos if num_clips else None,
        video_grid_thw=video_grid_thw if num_clips else torch.zeros((0, 3), dtype=torch.long),
        video_vision_inputs=adapter.vision_inputs(vision, video_grid_thw) if num_clips else {},
        visual_order=visual_order, num_video_tokens=layout.num_video_tokens,
        clips_per_sample=layout.clips_per_sample, grounded_clip=layout.grounded_clip, grounded_grid=grounded_grid,
        second_per_grid_ts=torch.tensor([second_per_grid(times, temporal_patch) for times in layout.frame_times],
                                        dtype=torch.float32),
        clip_timestamps=clip_timestamps,
    )


def _block_kinds(is_image_pad: torch.Tensor, is_video_pad: torch.Tensor) -> list[bool]:
    """Per vision block (a run of pads) in (sample, position) order: whether it is a clip's (video pads)."""
    is_pad = is_image_pad | is_video_pad
    previous = torch.nn.functional.pad(is_pad[:, :-1], (1, 0), value=False)
    return is_video_pad[is_pad & ~previous].tolist()


def _interleave(block_is_video: list[bool], *, images: tuple[list, ...], videos: tuple[list, ...]
                ) -> tuple[list, ...]:
    """Per-image and per-video-block lists (each a tuple of parallel lists) merged into block order."""
    image_rows, video_rows = zip(*images, strict=True), zip(*videos, strict=True)
    merged = [next(video_rows) if is_video else next(image_rows) for is_video in block_is_video]
    return tuple(list(column) for column in zip(*merged, strict=True)) if merged else ([], [], [])


def _grounded_mask(*, image_mask: torch.Tensor, video_mask: torch.Tensor, layout: BatchLayout,
                   group_counts: list[int], timestamped: bool) -> torch.Tensor:
    """(B, L') bool: the tokens of each sample's grounded image, or of all the frame groups of its grounded clip."""
    image_block = image_block_index(image_mask)  # (B, L'), global image index of each image token
    wanted_image = torch.tensor(layout.grounded_index)[:, None]  # (B, 1), -1 when a clip is grounded
    grounded = image_mask & (image_block == wanted_image)
    if not any(c >= 0 for c in layout.grounded_clip):
        return grounded
    video_block = image_block_index(video_mask)  # (B, L'), global video block index (one per group if timestamped)
    if timestamped:  # blocks -> clips: clip v owns G_v consecutive blocks
        clip_of_block = torch.repeat_interleave(torch.arange(len(group_counts)), torch.tensor(group_counts))
        video_block = torch.where(video_mask, clip_of_block[video_block.clamp(min=0)], -1)
    wanted_clip = torch.tensor(layout.grounded_clip)[:, None]  # (B, 1), -1 when an image is grounded
    return grounded | (video_mask & (video_block == wanted_clip))


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
    video_token_id: int | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_frame_times: Sequence[torch.Tensor | Sequence[float]] | None = None,
    temporal_patch_size: int = 2,
    max_video_tokens: int | None = None,
    grounded_clip: Sequence[int | None] | None = None,
    compact_clips: bool = False,
) -> BatchLayout:
    """Check a batch before the model runs; return its layout (images and clips per sample, tokens, objects).

    Every sample holds one or more vision blocks `<|vision_start|>` + pads + `<|vision_end|>`: images
    (`<|image_pad|>`) and clips (`<|video_pad|>`), each with one pad (compact) or N pads (pre-expanded;
    `compact_clips`: clips must be compact, as for the families that insert timestamps). `image_grid_thw` has one
    row per image block and `video_grid_thw` one per clip block, each in (sample, position) order;
    `video_frame_times` one 1-D tensor of frame times per clip. The checks run as tensor ops; a handful of
    per-sample and per-block counts come to the host in one transfer.

    Raises:
        ValueError: naming the field and the sample (and the image or clip: "sample 1, image 2" = the sample's
            second image, counted from 1), the expected and the found value. The checks include what would
            otherwise fail inside the model as "Image / Video features and tokens do not match": pads against grid
            rows, pixel rows against sum t*H*W, frame counts against t and temporal_patch_size, and the
            `max_video_tokens` budget per sample.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, L), found {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("mask_ids", mask_ids)):
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"found {tuple(tensor.shape)}")
    for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
        if grid is not None and (grid.dim() != 2 or grid.shape[1] != 3):
            what = "image" if name == "image_grid_thw" else "clip"
            raise ValueError(f"{name}: expected one (t, H, W) row per {what}, shape (num_{what}s, 3), found "
                             f"{tuple(grid.shape)}")

    valid = attention_mask.bool()
    ids = input_ids.masked_fill(~valid, -1)  # padding can never look like a vision token
    no_video = -2 if video_token_id is None else video_token_id  # -2: no token has it
    is_image, is_video = ids.eq(image_token_id), ids.eq(no_video)
    is_pad, is_start, is_end = is_image | is_video, ids.eq(vision_start_token_id), ids.eq(vision_end_token_id)
    before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)  # (B, L), the previous real token or -1
    after = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)  # (B, L), the next real token or -1
    pad_run_start = is_pad & before.eq(vision_start_token_id)  # first pad of each block
    same_before = torch.where(is_image, before.eq(image_token_id), before.eq(no_video))  # the block goes on
    same_after = torch.where(is_image, after.eq(image_token_id), after.eq(no_video))
    pad_after = after.eq(image_token_id) | after.eq(no_video)
    pad_before = before.eq(image_token_id) | before.eq(no_video)
    lengths = valid.sum(1)
    columns = torch.arange(valid.shape[1], device=valid.device)
    first_valid = torch.where(valid, columns, valid.shape[1]).amin(1)
    last_valid = torch.where(valid, columns, -1).amax(1)
    counts = torch.stack([
        lengths,
        (last_valid - first_valid + 1 == lengths).long(),  # real tokens form one block: no holes
        is_pad.sum(1), is_start.sum(1), is_end.sum(1), pad_run_start.sum(1),
        (is_pad & after.eq(-1)).sum(1),  # the sequence ends inside a vision block (truncated)
        (is_pad & ~(same_before | before.eq(vision_start_token_id))).sum(1)
        + (is_pad & ~(same_after | after.eq(vision_end_token_id) | after.eq(-1))).sum(1)
        + (is_start & ~pad_after).sum(1) + (is_end & ~pad_before).sum(1),
        (mask_ids.ge(0) & ~valid).sum(1),  # phrase tokens on padding
        (mask_ids.ge(0) & is_pad).sum(1),  # phrase tokens on image / video pads
        (mask_ids < -1).sum(1),
        mask_ids.amax(1) + 1,  # K_b
        (pad_run_start & is_video).sum(1),  # clip blocks
    ], dim=1)  # (B, 13)
    pad_run = pad_run_start.flatten().long().cumsum(0).view_as(is_pad) - 1  # (B, L), block index of each pad
    run_lengths = torch.bincount(pad_run[is_pad].clamp(min=0), minlength=int(pad_run_start.sum()))  # (blocks,)
    run_is_video = is_video[pad_run_start]  # (blocks,), in (sample, position) order
    counts, run_lengths, run_is_video = counts.tolist(), run_lengths.tolist(), run_is_video.tolist()  # to the host

    images_per_sample, clips_per_sample = [], []
    for b, (length, span, pads, starts, ends, runs, truncated, misplaced, *_rest, clips) in enumerate(counts):
        if not span or length == 0:
            raise ValueError(f"sample {b}: attention_mask must be one contiguous block of 1s (left or right padding)")
        if pads == 0:
            raise ValueError(f"sample {b}: no <|image_pad|> placeholder (id {image_token_id}) found, expected 1 per "
                             f"image (compact) or N per image (expanded), or one <|video_pad|> per clip")
        if truncated:
            raise ValueError(f"sample {b}: the sequence ends inside the vision block (<|vision_end|> missing after "
                             f"the image pads): was it truncated by max_length?")
        if misplaced or starts != ends or starts != runs:
            raise ValueError(f"sample {b}: image pads must sit in runs between <|vision_start|> and <|vision_end|>, "
                             f"one block per image as the chat template emits; found {starts} vision starts, {ends} "
                             f"vision ends and {runs} runs of <|image_pad|> / <|video_pad|> (a block holds one kind)")
        images_per_sample.append(runs - clips)
        clips_per_sample.append(clips)
    image_runs = [n for n, video in zip(run_lengths, run_is_video, strict=True) if not video]
    video_runs = [n for n, video in zip(run_lengths, run_is_video, strict=True) if video]

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
    if patch_dim is not None and num_images and pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values: expected {patch_dim} values per patch (3 * temporal_patch_size * "
                         f"patch_size^2, from this backbone's image processor), found {pixel_values.shape[1]}")
    num_vision_tokens = [t * h * w // merge_size**2 for t, h, w in grids]
    for name, pads, n, grid in zip(image_names, image_runs, num_vision_tokens, grids, strict=True):
        if pads not in (1, n):
            raise ValueError(f"{name}: found {pads} <|image_pad|> tokens, expected 1 (compact) or {n} "
                             f"(expanded for image_grid_thw {tuple(grid)})")

    clip_names = [f"sample {b}, clip {i + 1}" if n > 1 else f"sample {b}"
                  for b, n in enumerate(clips_per_sample) for i in range(n)]
    num_video_tokens, frame_times = _validate_clips(
        clip_names=clip_names, clips_per_sample=clips_per_sample, video_runs=video_runs,
        pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        video_frame_times=video_frame_times, merge_size=merge_size, patch_dim=patch_dim,
        temporal_patch_size=temporal_patch_size, max_video_tokens=max_video_tokens, compact_clips=compact_clips)

    # The grounded visual: the sample's image `grounded_image` (default its first) when it holds an image, else its
    # first clip; `grounded_clip` names a clip instead.
    if grounded_image is None:
        chosen = [0] * batch
    else:
        chosen = [int(g) for g in (grounded_image.tolist() if torch.is_tensor(grounded_image) else grounded_image)]
        if len(chosen) != batch:
            raise ValueError(f"grounded_image: expected one image index per sample ({batch}), found {len(chosen)}")
    clip_choice: list[int | None] = [None] * batch if grounded_clip is None else list(grounded_clip)
    if len(clip_choice) != batch:
        raise ValueError(f"grounded_clip: expected one clip index (or None) per sample ({batch}), found "
                         f"{len(clip_choice)}")
    first_image = [sum(images_per_sample[:b]) for b in range(batch)]
    first_clip = [sum(clips_per_sample[:b]) for b in range(batch)]
    grounded_index, grounded_clip_index = [], []
    for b, (index, available, clip, clips) in enumerate(zip(chosen, images_per_sample, clip_choice,
                                                            clips_per_sample, strict=True)):
        if clip is None and available == 0:
            clip = 0  # a clip-only sample grounds on its first clip
        if clip is not None:
            if not 0 <= int(clip) < clips:
                raise ValueError(f"sample {b}: grounded_clip {clip} does not exist; the sample holds {clips} "
                                 f"clip(s)" + (f", indices 0..{clips - 1}" if clips else ""))
            chosen[b] = -1
            grounded_index.append(-1)
            grounded_clip_index.append(first_clip[b] + int(clip))
            continue
        if not 0 <= index < available:
            raise ValueError(f"sample {b}: grounded_image {index} does not exist; the sample holds {available} "
                             f"image(s), indices 0..{available - 1}")
        grounded_index.append(first_image[b] + index)
        grounded_clip_index.append(-1)

    num_objects = []
    for b, (*_layout, on_padding, on_image, below, objects, _clips) in enumerate(counts):
        if below:
            raise ValueError(f"sample {b}: mask_ids must be -1 or an object index >= 0, found values below -1")
        if on_padding:
            raise ValueError(f"sample {b}: {on_padding} phrase tokens (mask_ids >= 0) lie on padding "
                             f"(attention_mask == 0)")
        if on_image:
            raise ValueError(f"sample {b}: {on_image} phrase tokens (mask_ids >= 0) lie on <|image_pad|> or "
                             f"<|video_pad|>")
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
                       images_per_sample=images_per_sample, grounded_image=chosen, grounded_index=grounded_index,
                       num_video_tokens=num_video_tokens, clips_per_sample=clips_per_sample,
                       grounded_clip=grounded_clip_index, frame_times=frame_times)


def _validate_clips(
    *, clip_names: list[str], clips_per_sample: list[int], video_runs: list[int],
    pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | None,
    video_frame_times: Sequence[torch.Tensor | Sequence[float]] | None, merge_size: int, patch_dim: int | None,
    temporal_patch_size: int, max_video_tokens: int | None, compact_clips: bool,
) -> tuple[list[int], list[list[float]]]:
    """The clip half of `validate_lmm_inputs`: (tokens per clip, frame times per clip)."""
    num_clips = len(clip_names)
    found_rows = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    if found_rows != num_clips:
        found = "none" if video_grid_thw is None else f"shape {tuple(video_grid_thw.shape)}"
        hint = (" (a clip must be compact here: one <|vision_start|><|video_pad|><|vision_end|>; the model inserts "
                "the timestamps and the per-group blocks)") if compact_clips and found_rows < num_clips else ""
        raise ValueError(f"video_grid_thw: expected one (t, H, W) row per clip, shape ({num_clips}, 3) for the "
                         f"<|video_pad|> blocks of the batch (per sample: {clips_per_sample}), found {found}{hint}")
    if not num_clips:
        if pixel_values_videos is not None and pixel_values_videos.numel():
            raise ValueError(f"pixel_values_videos: found {pixel_values_videos.shape[0]} rows but the batch holds no "
                             f"<|video_pad|> block")
        return [], []
    grids = video_grid_thw.tolist()
    for name, (t, h, w) in zip(clip_names, grids, strict=True):
        if t < 1:
            raise ValueError(f"{name}: video_grid_thw t = {t}, expected at least 1 frame group")
        if h % merge_size or w % merge_size:
            raise ValueError(f"{name}: video_grid_thw (H, W) = ({h}, {w}) must be divisible by the spatial merge "
                             f"size {merge_size}")
    expected_rows = sum(t * h * w for t, h, w in grids)
    if pixel_values_videos is None or pixel_values_videos.dim() != 2 or pixel_values_videos.shape[0] != expected_rows:
        found = "none" if pixel_values_videos is None else f"shape {tuple(pixel_values_videos.shape)}"
        raise ValueError(f"pixel_values_videos: expected {expected_rows} rows (sum of t*H*W over video_grid_thw), "
                         f"found {found}")
    if patch_dim is not None and pixel_values_videos.shape[1] != patch_dim:
        raise ValueError(f"pixel_values_videos: expected {patch_dim} values per patch (3 * temporal_patch_size * "
                         f"patch_size^2, from this backbone's video processor), found {pixel_values_videos.shape[1]}")
    num_video_tokens = [t * h * w // merge_size**2 for t, h, w in grids]
    for name, pads, n, grid in zip(clip_names, video_runs, num_video_tokens, grids, strict=True):
        allowed = (1,) if compact_clips else (1, n)
        if pads not in allowed:
            expected = "1 (compact: the model inserts the timestamps and per-group blocks)" if compact_clips else \
                f"1 (compact) or {n} (expanded for video_grid_thw {tuple(grid)})"
            raise ValueError(f"{name}: found {pads} <|video_pad|> tokens, expected {expected}")
    if video_frame_times is None or len(video_frame_times) != num_clips:
        found = "none" if video_frame_times is None else f"{len(video_frame_times)}"
        raise ValueError(f"video_frame_times: expected one 1-D tensor of frame times (seconds) per clip "
                         f"({num_clips}), found {found}")
    frame_times = []
    for name, times, (t, _, _) in zip(clip_names, video_frame_times, grids, strict=True):
        values = times.double().flatten().tolist() if torch.is_tensor(times) else list(times)
        frame_times.append(check_frame_times(values, name=name, temporal_groups=t,
                                             temporal_patch_size=temporal_patch_size))
    if max_video_tokens is not None:
        first = 0
        for b, count in enumerate(clips_per_sample):
            tokens = num_video_tokens[first:first + count]
            if sum(tokens) > max_video_tokens:
                parts = ", ".join(f"{t} frame groups x {h // merge_size} x {w // merge_size}"
                                  for t, h, w in grids[first:first + count])
                raise ValueError(f"sample {b}: its clip(s) hold {sum(tokens)} video tokens ({parts}), over the "
                                 f"max_video_tokens budget of {max_video_tokens} per sample; the model refuses such "
                                 f"a sample and never drops frames itself: sample fewer frames (or smaller ones) "
                                 f"before the model, or raise max_video_tokens")
            first += count
    return num_video_tokens, frame_times


def insert_clip_timestamps(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ids: torch.Tensor,
    prefixes: list[list[list[int]]],
    video_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each compact clip block `<|vision_start|><|video_pad|><|vision_end|>` with one block per frame group,
    each after its timestamp ids: prefix_g + `<|vision_start|><|video_pad|><|vision_end|>` (Qwen3-VL's layout; the
    single pad of each group is expanded later like an image's).

    `prefixes`: per clip (in (sample, position) order), per frame group, the timestamp's token ids. Inserted tokens
    get mask_ids -1. The padding side is kept (left-padded batches stay left-padded), the pad id is the input's.

    Returns:
        (input_ids, attention_mask, mask_ids), each (B, L'') with L'' the longest new sample.
    """
    valid = attention_mask.bool()
    pad_values = input_ids[~valid]
    pad_id = int(pad_values[0]) if pad_values.numel() else 0
    left_padded = bool(valid[:, -1].all()) and not bool(valid.all())
    clips = iter(prefixes)
    samples = []
    for b in range(input_ids.shape[0]):
        ids, marks = input_ids[b][valid[b]], mask_ids[b][valid[b]]  # (n,) real tokens
        id_pieces, mark_pieces, cursor = [], [], 0
        for pad in ids.eq(video_token_id).nonzero().flatten().tolist():  # one compact pad per clip
            groups = [[*prefix, vision_start_token_id, video_token_id, vision_end_token_id] for prefix in next(clips)]
            replacement = torch.tensor([token for group in groups for token in group], dtype=ids.dtype)
            id_pieces += [ids[cursor:pad - 1], replacement]  # the clip's own start / pad / end are replaced
            mark_pieces += [marks[cursor:pad - 1], torch.full_like(replacement, -1, dtype=marks.dtype)]
            cursor = pad + 2
        id_pieces.append(ids[cursor:])
        mark_pieces.append(marks[cursor:])
        samples.append((torch.cat(id_pieces), torch.cat(mark_pieces)))
    width = max(ids.numel() for ids, _ in samples)
    new_ids = torch.full((len(samples), width), pad_id, dtype=input_ids.dtype)
    new_mask = torch.zeros((len(samples), width), dtype=attention_mask.dtype)
    new_marks = torch.full((len(samples), width), -1, dtype=mask_ids.dtype)
    for b, (ids, marks) in enumerate(samples):
        columns = slice(width - ids.numel(), width) if left_padded else slice(0, ids.numel())
        new_ids[b, columns], new_mask[b, columns], new_marks[b, columns] = ids, 1, marks
    return new_ids, new_mask, new_marks


def expand_vision_tokens(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ids: torch.Tensor,
    num_vision_tokens: list[int],
    image_token_id: int,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each vision block's single pad N_i times (blocks already holding N_i pads stay as they are).

    Blocks are runs of `<|image_pad|>` (or `<|video_pad|>` when `video_token_id` is given), numbered in (sample,
    position) order, the order of `num_vision_tokens` (one entry per block). The padding side is kept: left-padded
    batches (every sample ends at the last column) stay left-padded. Expanded vision positions get mask_ids -1;
    padding gets the pad id of the input (the id found under the attention mask's zeros, else 0).

    Returns:
        (input_ids, attention_mask, mask_ids), each (B, L') with L' the longest expanded sample.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    is_vision = input_ids.eq(image_token_id)
    if video_token_id is not None:
        is_vision = is_vision | input_ids.eq(video_token_id)
    is_pad = is_vision & valid  # (B, L)
    block = image_block_index(is_pad)  # (B, L), block index of each pad
    n = torch.tensor(num_vision_tokens, device=device, dtype=torch.long)  # (blocks,)
    block_pads = torch.bincount(block[is_pad], minlength=n.numel())  # (blocks,), pads each block holds now
    compact = block_pads == 1  # (blocks,), pre-expanded blocks keep one copy per pad
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
    expanded_vision = new_ids.eq(image_token_id)
    if video_token_id is not None:
        expanded_vision = expanded_vision | new_ids.eq(video_token_id)
    new_mask_ids[expanded_vision] = -1
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

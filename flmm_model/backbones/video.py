"""Clip timing, as each family's HF processor derives it, from the one timing input a batch carries: the time in
seconds of every sampled frame (`video_frame_times`, per clip a 1-D tensor).

How the HF processors turn a clip into model inputs (transformers 5.x, `processing_qwen2_vl.py`,
`processing_qwen2_5_vl.py`, `processing_qwen3_vl.py` and the video processors):

- frames: the video processor pads the frame count up to a multiple of `temporal_patch_size` (2) by repeating the
  last frame; each pair of frames is one temporal patch, so a clip of F frames has t = ceil(F / 2) frame groups
  (`video_grid_thw[v, 0]`);
- Qwen2-VL: one `<|video_pad|>` per vision token in ONE block; the M-RoPE temporal index of group k is k;
- Qwen2.5-VL: the same block; group k's temporal index is `int(k * tokens_per_second * second_per_grid_ts)`, with
  `second_per_grid_ts = temporal_patch_size / sampled_fps` and `sampled_fps` = frames / duration. From frame times
  the rate is 1 / (mean spacing of the frames): `second_per_grid` below. (The processor's `sampled_fps` is
  frames / (total_frames / fps); the two agree when the sampled indices are evenly spaced, as its own uniform
  sampler makes them whenever total_frames is a multiple of the frame count);
- Qwen3-VL, Qwen3.5: each frame group is a block of its own, `<{t:.1f} seconds><|vision_start|>` + pads +
  `<|vision_end|>`, with t the mean time of the group's first and last frame (`group_timestamps`); the chat
  template's one `<|vision_start|><|video_pad|><|vision_end|>` is replaced by these blocks. Every group is a t = 1
  block for the M-RoPE positions.

The timestamp text is tokens, and the model holds no tokenizer: `TimestampTokens` is the handful of token ids a
timestamp is made of ("<", the ten digits, ".", " seconds>"), read once from the tokenizer at build time
(`TimestampTokens.from_tokenizer`) and checked to compose exactly as the tokenizer encodes the whole text. Both
released vocabularies (Qwen2's and Qwen3.5's) split numbers into single digits, which makes that possible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The model-side budget of video tokens per sample (all its clips), `FrozenQwenLMM(max_video_tokens=...)`: a sample
# over it is refused before the model runs (never truncated). 16384 tokens is e.g. 64 frame groups of 16x16 merged
# tokens (448x448 frames at 28 px per token), 128 frames.
DEFAULT_MAX_VIDEO_TOKENS = 16384

# Values the timestamp composition is checked on (the processor writes one decimal).
_CHECKED_SECONDS = (0.0, 0.2, 1.25, 7.0, 9.9, 10.5, 59.9, 123.4, 3600.0)


def timestamp_text(seconds: float) -> str:
    """The text Qwen3-VL's processor writes before a frame group's vision block: `<{seconds:.1f} seconds>`."""
    return f"<{seconds:.1f} seconds>"


@dataclass(frozen=True)
class TimestampTokens:
    """The token ids a `<{t:.1f} seconds>` timestamp is made of, in one vocabulary (picklable, no tokenizer).

    Attributes:
        open_ids: the ids of "<". digit_ids: the id of each digit "0".."9". point_ids: the ids of ".".
        close_ids: the ids of " seconds>".
    """

    open_ids: tuple[int, ...]
    digit_ids: tuple[int, ...]
    point_ids: tuple[int, ...]
    close_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TimestampTokens:
        """Read the pieces off `tokenizer` (a transformers tokenizer of the model's vocabulary).

        Raises:
            ValueError: the tokenizer does not encode timestamps piece by piece (numbers not split into single
                digits), so ids composed here would differ from what the HF processor's text encodes to.
        """
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        digits = [encode(str(d)) for d in range(10)]
        if any(len(ids) != 1 for ids in digits):
            raise ValueError(f"TimestampTokens: expected one token per digit, found {digits}")
        tokens = cls(open_ids=encode("<"), digit_ids=tuple(ids[0] for ids in digits), point_ids=encode("."),
                     close_ids=encode(" seconds>"))
        for seconds in _CHECKED_SECONDS:
            expected = list(encode(timestamp_text(seconds)))
            if tokens.encode(seconds) != expected:
                raise ValueError(f"TimestampTokens: the tokenizer encodes {timestamp_text(seconds)!r} as {expected}, "
                                 f"not piece by piece ({tokens.encode(seconds)}); timestamps need a tokenizer that "
                                 f"splits numbers into single digits (the released Qwen vocabularies do)")
        return tokens

    def encode(self, seconds: float) -> list[int]:
        """The ids of `<{seconds:.1f} seconds>`."""
        whole, fraction = f"{seconds:.1f}".split(".")
        return [*self.open_ids, *(self.digit_ids[int(d)] for d in whole), *self.point_ids,
                *(self.digit_ids[int(d)] for d in fraction), *self.close_ids]


def padded_frame_times(frame_times: Sequence[float], temporal_patch_size: int) -> list[float]:
    """The times padded to a multiple of `temporal_patch_size` by repeating the last one, as the video processor
    repeats the last frame of a clip whose frame count is not a multiple."""
    times = [float(t) for t in frame_times]
    return times + times[-1:] * (-len(times) % temporal_patch_size)


def group_timestamps(frame_times: Sequence[float], temporal_patch_size: int) -> list[float]:
    """Per frame group, the mean of its first and last frame's time (seconds): Qwen3-VL's timestamps."""
    times = padded_frame_times(frame_times, temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def second_per_grid(frame_times: Sequence[float], temporal_patch_size: int) -> float:
    """Qwen2.5-VL's `second_per_grid_ts`: temporal_patch_size / fps, with fps = 1 / the mean spacing of the frames.
    A one-frame clip has a single group, whose temporal index is 0 whatever the value: 1.0."""
    times = [float(t) for t in frame_times]
    if len(times) < 2:
        return 1.0
    return temporal_patch_size * (times[-1] - times[0]) / (len(times) - 1)


def check_frame_times(frame_times: Sequence[float], *, name: str, temporal_groups: int,
                      temporal_patch_size: int) -> list[float]:
    """A clip's frame times as floats, checked against its grid.

    Raises:
        ValueError: naming the clip (`name`): no frame, a non-finite or decreasing time, or a frame count whose
            groups (ceil(F / temporal_patch_size)) are not the clip's `video_grid_thw` t.
    """
    times = [float(t) for t in frame_times]
    if not times:
        raise ValueError(f"video_frame_times: {name} has no frame time")
    if not all(math.isfinite(t) for t in times) or any(b < a for a, b in zip(times, times[1:], strict=False)):
        raise ValueError(f"video_frame_times: {name}: expected finite, non-decreasing times in seconds, found {times}")
    groups = -(-len(times) // temporal_patch_size)
    if groups != temporal_groups:
        raise ValueError(f"video_frame_times: {name} has {len(times)} frame times, which make {groups} frame groups "
                         f"of temporal_patch_size {temporal_patch_size}, but video_grid_thw t = {temporal_groups} "
                         f"(expected {temporal_groups * temporal_patch_size - temporal_patch_size + 1}.."
                         f"{temporal_groups * temporal_patch_size} frames; an odd count repeats the last frame, as "
                         f"the video processor does)")
    return times


def unit_time_interval(config: Any, frame_times: Sequence[float]) -> float:
    """Qwen2-VL (and the timestamped families, whose groups are separate t = 1 blocks): group k has temporal index k."""
    return 1.0


def scaled_time_interval(config: Any, frame_times: Sequence[float]) -> float:
    """Qwen2.5-VL: the temporal step between frame groups, `tokens_per_second * second_per_grid_ts` (float32, as the
    processor's tensor and `get_rope_index` compute it)."""
    vision = config.vision_config
    seconds = torch.tensor(second_per_grid(frame_times, vision.temporal_patch_size), dtype=torch.float32)
    return float(vision.tokens_per_second * seconds)

"""Referring video grounding items over a `VideoSource` (Ref-YouTube-VOS, MeViS, ReVOS) or `SyntheticClips`.

Frames are chosen by the budget rule of `data.clips.sample_frames`; no model tensors are built here (the model
side turns frames + times into its video inputs). An item is a dict:
    frames: (N, H, W, 3) uint8 RGB, the sampled frames (N even; the last repeated when padded).
    times: (N,) float64 seconds of the sampled frames (frame position / fps for frame folders).
    frame_indices: (N,) int64 source frame of each sampled frame.  nearest: (T,) int64 sampled position nearest to
        each source frame (`FrameSample.spread` maps predictions back to all T frames).
    gt_masks: (K, N, H, W) bool per object and sampled frame (zeros where `has_gt` is False).
    has_gt: (N,) bool: whether the frame has ground truth (Ref-YouTube-VOS annotates only some frames; a split
        without ground truth is all False; the padding repeat of the last frame is False, so that frame counts once).
    phrases: K expressions; parts: `prompts.expression_parts(phrases)` (F-LMM's "e0. e1." text).
    meta: dataset, split, video, expression_ids, frame_names (source names of `frame_indices`), num_source_frames.
With `prompt` (the model's `PromptSettings`) the item is a model-ready clip item (`data.item.make_clip_item`: compact
ids with one `<|video_pad|>`, the clip's pixel rows and grid, `video_frame_times`) keeping the keys above.
A VideoSource item is one expression (K = 1); a synthetic item is all of the clip's shapes (K >= 1), as F-LMM
puts every object of an image into one sample. Bad data follows `data.errors`: `on_error="skip"` returns None.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from flmm_model.data.clip_pixels import DEFAULT_GROUP_TOKENS
from flmm_model.data.clips import DEFAULT_FPS, sample_frames
from flmm_model.data.errors import SkipLog
from flmm_model.data.item import PromptSettings, make_clip_item
from flmm_model.data.prompts import DEFAULT_VIDEO_INSTRUCTION, expression_parts, video_instruction
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.data.video_sources import VideoSource


class VideoGroundingDataset(torch.utils.data.Dataset):
    """Items of a referring video source (see the module docstring for the keys).

    Args:
        source: a `VideoSource` (one item per expression) or `SyntheticClips` (one item per clip).
        max_frames: the frame budget of `sample_frames`.
        fps: frames per second of the source's frames (its times are position / fps).
        on_error: "raise" or "skip" for SyntheticClips; a VideoSource's items follow the source's own on_error
            (its `skips` is this dataset's).
        prompt: encode items for a model (its tokenizer, image processor, system prompt, max length); None: raw
            frames and masks only.
        instruction: the user's text after the clip; None: the prompt's (image) instruction with "video" for
            "image" (F-LMM's becomes "Please give me a brief description of the video.").
        group_tokens: the most vision tokens per frame group (`data.clip_pixels`).
    """

    def __init__(self, source: VideoSource | SyntheticClips, *, max_frames: int = 16, fps: float = DEFAULT_FPS,
                 on_error: str = "raise", prompt: PromptSettings | None = None,
                 instruction: str | None = None, group_tokens: int = DEFAULT_GROUP_TOKENS) -> None:
        self.source, self.max_frames, self.fps = source, max_frames, fps
        if instruction is None:
            instruction = video_instruction(prompt.instruction) if prompt is not None else DEFAULT_VIDEO_INSTRUCTION
        self.prompt, self.instruction, self.group_tokens = prompt, instruction, group_tokens
        name = f"{source.kind}/{source.split}" if isinstance(source, VideoSource) else "synthetic_clips"
        self.skips = source.skips if isinstance(source, VideoSource) else SkipLog(on_error=on_error, dataset=name)

    def __len__(self) -> int:
        return len(self.source.expressions) if isinstance(self.source, VideoSource) else len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.skips.guard(self._build, index)

    def _build(self, index: int) -> dict[str, Any]:
        if isinstance(self.source, SyntheticClips):
            clip = self.source[index]
            times = np.arange(len(clip.frames), dtype=np.float64) / self.fps
            sample = sample_frames(len(clip.frames), times, max_frames=self.max_frames)
            frames = np.stack([np.asarray(clip.frames[i]) for i in sample.indices])  # (N, H, W, 3)
            gt_masks = clip.gt_masks[:, sample.indices]  # (K, N, H, W)
            has_gt = np.ones(len(sample.indices), dtype=bool)
            phrases = clip.phrases
            meta = dict(dataset="synthetic_clips", split="", video=str(index), expression_ids=[],
                        frame_names=[str(i) for i in sample.indices], num_source_frames=len(clip.frames))
        else:
            source, expression = self.source, self.source.expressions[index]
            times = np.arange(len(expression.frames), dtype=np.float64) / self.fps
            sample = sample_frames(len(expression.frames), times, max_frames=self.max_frames)
            indices = [int(i) for i in sample.indices]
            frames = np.stack([np.asarray(image) for image in source.read_frames(expression, indices)])
            has_gt = np.array([self._annotated(expression, i) for i in indices], dtype=bool)
            gt_masks = np.zeros((1, *frames.shape[:3]), dtype=bool)  # (1, N, H, W)
            annotated = [position for position, flag in enumerate(has_gt) if flag]
            if annotated:
                read = source.read_masks(expression, [indices[p] for p in annotated])  # (A, H, W)
                gt_masks[0, annotated] = read.numpy()
            phrases = [expression.text]
            meta = dict(dataset=source.kind, split=source.split, video=expression.video,
                        expression_ids=[expression.expression_id],
                        frame_names=[expression.frames[i] for i in indices], num_source_frames=len(expression.frames))
        if sample.padded:  # the repeated last frame is trained on and scored once, as its original
            has_gt[-1] = False
        item = dict(frames=torch.from_numpy(np.ascontiguousarray(frames)),
                    times=torch.from_numpy(times[sample.indices]),
                    frame_indices=torch.from_numpy(sample.indices), nearest=torch.from_numpy(sample.nearest),
                    gt_masks=torch.from_numpy(np.ascontiguousarray(gt_masks)), has_gt=torch.from_numpy(has_gt),
                    phrases=list(phrases), parts=expression_parts(list(phrases)), meta=meta)
        if self.prompt is None:
            return item
        prompt = self.prompt
        encoded = make_clip_item(
            frames=item["frames"], times=item["times"], gt_masks=item["gt_masks"], has_gt=item["has_gt"],
            parts=item["parts"], meta=meta, tokenizer=prompt.tokenizer, image_processor=prompt.image_processor,
            instruction=self.instruction, system=prompt.system, max_length=prompt.max_length,
            group_tokens=self.group_tokens, sample=f"{meta['dataset']} video {meta['video']}")
        return {**item, **encoded}

    def _annotated(self, expression, position: int) -> bool:
        """Whether source frame `position` has ground truth: a split with masks, and for Ref-YouTube-VOS its PNG."""
        source = self.source
        if not source.has_masks:
            return False
        if source.kind == "ref_youtube_vos":
            return os.path.isfile(os.path.join(source.mask_source, expression.video,
                                               f"{expression.frames[position]}.png"))
        return True

"""Referring video object segmentation sources: the expressions of Ref-YouTube-VOS, MeViS and ReVOS, their frames and
their per-frame masks, read from the datasets' own layouts and checked like the image datasets' files.

A `VideoSource` is the file layer of a video dataset: one `VideoExpression` per referring expression (a text and
the object(s) it names through a clip), `read_frames` (RGB PIL images) and `read_masks` ((T, H, W) bool, the union
of the named objects; None where a split ships no ground truth). Layouts, for `root` = the dataset's folder:

- Ref-YouTube-VOS (`kind="ref_youtube_vos"`, splits train / valid / test):
      `meta_expressions/<split>/meta_expressions.json`  {"videos": {vid: {"expressions": {eid: {"exp": text,
                                                        "obj_id": "1"}}, "frames": ["00000", ...]}}}
      `<split>/JPEGImages/<vid>/<frame>.jpg`
      `<split>/Annotations/<vid>/<frame>.png`           palette PNG, pixel = object id (train only)
- MeViS (`kind="mevis"`, splits train / valid_u / valid):
      `<split>/meta_expressions.json`                   {"videos": {vid: {"expressions": {eid: {"exp": text,
                                                        "obj_id": [0, ...], "anno_id": [12, ...]}}, "frames": [...]}}}
      `<split>/JPEGImages/<vid>/<frame>.jpg`
      `<split>/mask_dict.json`                          {anno_id: [COCO RLE or null, one per frame]} (not in valid)
- ReVOS (`kind="revos"`, splits train / valid): MeViS's records, with the files at the root:
      `meta_expressions_<split>_.json`, `JPEGImages/<vid>/<frame>.jpg`, `mask_dict.json`

Bad data follows `data.errors`: a malformed expression, object id, frame list or mask entry is a DataError naming
the file, the video and the expression; with `on_error="skip"` a bad expression is left out of the index (counted
in `skips`), and a frame or mask that fails to read raises DataError for the caller's `skips.guard`. A mask of
another size than its frame, an RLE that does not cover its frame, a palette PNG in another mode, or a mask list
whose length is not the video's frame count never decodes into a silently wrong mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flmm_model.data.coco_masks import decode_segmentation
from flmm_model.data.errors import DataError, SkipLog, expect_type, load_json, record_errors
from flmm_model.data.images import load_rgb, read_image_size

VIDEO_KINDS = ("ref_youtube_vos", "mevis", "revos")


@dataclass(frozen=True)
class VideoExpression:
    """One referring expression through a clip.

    Attributes:
        video: the video's folder name. expression_id: its key in the meta file. text: the expression.
        frames: the clip's frame names, in order (files `<frame>.jpg`).
        objects: what the masks are made of: Ref-YouTube-VOS object ids (palette values), or MeViS / ReVOS
            annotation ids (keys of `mask_dict.json`); the mask is their union.
    """

    video: str
    expression_id: str
    text: str
    frames: tuple[str, ...]
    objects: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"video {self.video!r} expression {self.expression_id!r}"


class VideoSource:
    """The expressions of one split of a referring video dataset, and the readers of their frames and masks.

    Args:
        kind: "ref_youtube_vos", "mevis" or "revos" (layouts in the module docstring).
        root: the dataset's folder.
        split: the split's name as its files spell it.
        on_error: "raise" or "skip" (`data.errors`).

    Raises:
        DataError: a missing or malformed meta file, or (under "raise") a malformed expression.
    """

    def __init__(self, kind: str, root: str, split: str, *, on_error: str = "raise") -> None:
        if kind not in VIDEO_KINDS:
            raise ValueError(f"video source: kind must be one of {VIDEO_KINDS}, found {kind!r}")
        self.kind, self.root, self.split = kind, root, split
        self.skips = SkipLog(on_error=on_error, dataset=f"{kind}/{split}")
        if kind == "ref_youtube_vos":
            self.meta_path = os.path.join(root, "meta_expressions", split, "meta_expressions.json")
            self.frame_dir = os.path.join(root, split, "JPEGImages")
            self.mask_source = os.path.join(root, split, "Annotations")
        elif kind == "mevis":
            self.meta_path = os.path.join(root, split, "meta_expressions.json")
            self.frame_dir = os.path.join(root, split, "JPEGImages")
            self.mask_source = os.path.join(root, split, "mask_dict.json")
        else:
            self.meta_path = os.path.join(root, f"meta_expressions_{split}_.json")
            self.frame_dir = os.path.join(root, "JPEGImages")
            self.mask_source = os.path.join(root, "mask_dict.json")
        self.expressions = self._index(load_json(self.meta_path))
        self._mask_dict: dict | None = None

    @property
    def has_masks(self) -> bool:
        """Whether this split ships ground truth (Ref-YouTube-VOS valid / test and MeViS valid do not)."""
        return os.path.exists(self.mask_source)

    # ------------------------------------------------------------------ the index

    def _index(self, meta: object) -> list[VideoExpression]:
        path = self.meta_path
        videos = expect_type(expect_type(meta, dict, where=path, what="a JSON object").get("videos"), dict,
                             where=f"{path}: 'videos'", what="an object of videos")
        expressions = []
        for video, record in videos.items():
            try:
                frames, entries = self._video(path, video, record)
            except DataError as error:
                self.skips.handle(error)  # the whole video is unreadable
                continue
            for expression_id, entry in entries.items():
                where = f"{path}: video {video!r} expression {expression_id!r}"
                try:
                    with record_errors(where):
                        expressions.append(self._expression(where, video, str(expression_id), entry, frames))
                except DataError as error:
                    self.skips.handle(error)
        return expressions

    @staticmethod
    def _video(path: str, video: str, record: object) -> tuple[tuple[str, ...], dict]:
        where = f"{path}: video {video!r}"
        record = expect_type(record, dict, where=where, what="a video record")
        frames = expect_type(record.get("frames"), list, where=f"{where}: 'frames'", what="a list of frame names")
        if not frames or not all(isinstance(frame, str) and frame for frame in frames):
            raise DataError(f"{where}: 'frames' must be a non-empty list of frame names, found {str(frames)[:80]}")
        if len(set(frames)) != len(frames):
            raise DataError(f"{where}: 'frames' names a frame twice")
        entries = expect_type(record.get("expressions"), dict, where=f"{where}: 'expressions'",
                              what="an object of expressions")
        return tuple(frames), entries

    def _expression(self, where: str, video: str, expression_id: str, entry: object,
                    frames: tuple[str, ...]) -> VideoExpression:
        entry = expect_type(entry, dict, where=where, what="an expression record")
        text = entry.get("exp")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'exp' must be a non-empty text, found {type(text).__name__} {text!r}")
        if self.kind == "ref_youtube_vos":  # one object: its palette value, written as a decimal string
            raw = entry.get("obj_id")
            if not (isinstance(raw, str) and raw.isdigit()) or not 0 < int(raw) < 256:
                raise DataError(f"{where}: 'obj_id' must be an object id in 1..255 written as a string, found "
                                f"{type(raw).__name__} {raw!r}")
            objects = (int(raw),)
        else:  # MeViS / ReVOS: the annotation ids of every object the expression names
            raw = entry.get("anno_id")
            if not isinstance(raw, list) or not raw or not all(_is_id(value) for value in raw):
                raise DataError(f"{where}: 'anno_id' must be a non-empty list of annotation ids, found "
                                f"{type(raw).__name__} {str(raw)[:80]}")
            objects = tuple(int(value) for value in raw)
        return VideoExpression(video=video, expression_id=expression_id, text=text.strip(), frames=frames,
                               objects=objects)

    # ------------------------------------------------------------------ frames and masks

    def frame_path(self, expression: VideoExpression, frame: str) -> str:
        return os.path.join(self.frame_dir, expression.video, f"{frame}.jpg")

    def read_frames(self, expression: VideoExpression, indices: Sequence[int] | None = None) -> list[Image.Image]:
        """The clip's frames (all, or those at `indices`) as RGB PIL images of one size.

        Raises:
            DataError: a missing or unreadable frame, or frames of different sizes.
        """
        names = [expression.frames[i] for i in (range(len(expression.frames)) if indices is None else indices)]
        images = [load_rgb(self.frame_path(expression, name), sample=f"{self.kind}/{self.split} {expression.name}")
                  for name in names]
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            raise DataError(f"{self.kind}/{self.split} {expression.name}: frames of different sizes "
                            f"{sorted(sizes)} (W x H)")
        return images

    def read_masks(self, expression: VideoExpression, indices: Sequence[int] | None = None) -> torch.Tensor | None:
        """(T, H, W) bool: per frame (all, or those at `indices`), the union of the expression's objects at the
        frame's size; None when the split ships no ground truth.

        Raises:
            DataError: a mask of another size than its frame, a malformed mask file or entry.
        """
        if not self.has_masks:
            return None
        positions = list(range(len(expression.frames)) if indices is None else indices)
        masks = []
        for position in positions:
            frame = expression.frames[position]
            width, height = read_image_size(self.frame_path(expression, frame), sample=expression.name)
            where = f"{self.kind}/{self.split} {expression.name} frame {frame!r}"
            if self.kind == "ref_youtube_vos":
                masks.append(self._palette_mask(expression, frame, height=height, width=width, where=where))
            else:
                masks.append(self._rle_mask(expression, position, height=height, width=width, where=where))
        return torch.from_numpy(np.stack(masks))

    def _palette_mask(self, expression: VideoExpression, frame: str, *, height: int, width: int,
                      where: str) -> np.ndarray:
        path = os.path.join(self.mask_source, expression.video, f"{frame}.png")
        if not os.path.isfile(path):  # Ref-YouTube-VOS annotates every 5th frame it lists; a listed one must exist
            raise DataError(f"{where}: missing annotation file {path}")
        try:
            with Image.open(path) as stored:
                if stored.mode not in ("P", "L"):
                    raise DataError(f"{where}: {path} is a {stored.mode} image; Ref-YouTube-VOS annotations are "
                                    f"palette (P) PNGs whose pixel values are object ids")
                ids = np.asarray(stored)
        except DataError:
            raise
        except (OSError, ValueError) as error:
            raise DataError(f"{where}: cannot read annotation file {path}: {error}") from error
        if ids.shape != (height, width):
            raise DataError(f"{where}: annotation {path} is {ids.shape[0]}x{ids.shape[1]} (H x W), its frame "
                            f"{height}x{width}")
        return np.isin(ids, expression.objects)

    def _rle_mask(self, expression: VideoExpression, position: int, *, height: int, width: int,
                  where: str) -> np.ndarray:
        if self._mask_dict is None:
            self._mask_dict = expect_type(load_json(self.mask_source), dict, where=self.mask_source,
                                          what="an object of annotation ids")
        mask = np.zeros((height, width), dtype=bool)
        for anno_id in expression.objects:
            entries = self._mask_dict.get(str(anno_id))
            if not isinstance(entries, list) or len(entries) != len(expression.frames):
                found = f"{len(entries)} entries" if isinstance(entries, list) else type(entries).__name__
                raise DataError(f"{where}: {self.mask_source}: annotation {anno_id} must list one mask (or null) "
                                f"per frame of the video ({len(expression.frames)}), found {found}")
            entry = entries[position]
            if entry is not None:  # null: the object is not visible in this frame
                mask |= decode_segmentation(entry, height=height, width=width,
                                            where=f"{where} annotation {anno_id}")
        return mask


def _is_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and value.isdigit()

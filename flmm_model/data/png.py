"""Panoptic Narrative Grounding (PNG): Localized Narratives whose noun phrases point at COCO panoptic segments.

Layout (every path configurable), for split "train" or "val":
    `<ann_dir>/png_coco_<split>2017.json`   list of narratives: `image_id` (str), `caption`, `segments` with
                                            `utterance`, `segment_ids` (list of str; empty = not grounded), `plural`
    `<ann_dir>/panoptic_<split>2017.json`   COCO panoptic: images, annotations (`file_name` of the PNG,
                                            `segments_info`), categories (`isthing`)
    `<ann_dir>/panoptic_<split>2017/*.png`  segment id = R + 256 * G + 256^2 * B
    `<image_dir>` = `<root>/<split>2017`    COCO 2017 images

One sample per narrative; the assistant answer is the narrative and object k is its k-th grounded utterance, whose
mask is the union of its segments (a plural phrase names several). Narratives without any grounded utterance are
dropped when loading (the count is logged and kept in `num_ungrounded`); `__getitem__` never resamples.

Per-object flags follow F-LMM's evaluation: `plural` is the narrative's flag; `isthing` is the category's `isthing`
for a singular phrase and True for a plural one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from flmm_model.data.errors import DataError, SkipLog, expect_type, index_records, load_json, record_errors
from flmm_model.data.images import load_rgb
from flmm_model.data.item import make_item
from flmm_model.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Narrative:
    file_index: int  # position in png_coco_<split>2017.json
    image_id: int
    parts: tuple[tuple[str, int], ...]
    segment_ids: tuple[tuple[int, ...], ...]  # per object
    plural: tuple[bool, ...]
    isthing: tuple[bool, ...]


class PngDataset(torch.utils.data.Dataset):
    """PNG items (see `flmm_model.data.item`) from the PNG narratives and COCO panoptic files.

    Args:
        root: data root; images default to `<root>/<split>2017`, annotations to `<root>/annotations`.
        split: "train" or "val" (any name whose files follow the layout).
        tokenizer: Qwen tokenizer.
        image_processor: Qwen2-VL image processor.
        image_dir: COCO 2017 image folder.
        ann_dir: folder with the narratives JSON, the panoptic JSON and the panoptic PNG folder.
        instruction: user instruction after the image.
        system: system prompt.
        on_error: "raise" or "skip" (see `flmm_model.data.errors`); an empty split always raises.
        max_length: longest allowed compact sequence; longer samples are bad data (raise or skip).

    Meta keys: `dataset` ("png"), `split`, `image_id`, `file_name`, `panoptic_file`, `narrative_index`, and per
    object (length K): `segment_ids`, `isthing`, `plural`.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        image_dir: str | None = None,
        ann_dir: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str = DEFAULT_SYSTEM,
        on_error: str = "raise",
        max_length: int | None = None,
    ) -> None:
        self.split = split
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.instruction, self.system, self.max_length = instruction, system, max_length
        self.image_dir = image_dir if image_dir is not None else os.path.join(root, f"{split}2017")
        ann_dir = ann_dir if ann_dir is not None else os.path.join(root, "annotations")
        self.narratives_path = os.path.join(ann_dir, f"png_coco_{split}2017.json")
        self.panoptic_path = os.path.join(ann_dir, f"panoptic_{split}2017.json")
        self.panoptic_dir = os.path.join(ann_dir, f"panoptic_{split}2017")
        self.skips = SkipLog(on_error=on_error, dataset=f"png/{split}")

        narratives = expect_type(load_json(self.narratives_path), list, where=self.narratives_path,
                                 what="a list of narratives")
        panoptic = expect_type(load_json(self.panoptic_path), dict, where=self.panoptic_path,
                               what="a COCO panoptic mapping with 'images', 'annotations' and 'categories'")
        records = {section: index_records(panoptic, section, key, path=self.panoptic_path, skips=self.skips)
                   for section, key in (("images", "id"), ("annotations", "image_id"), ("categories", "id"))}
        images, panoptic_anns = records["images"], records["annotations"]
        isthing = {key: bool(category.get("isthing")) for key, category in records["categories"].items()}

        # Only what samples need is kept (the panoptic JSON is large, and DataLoader workers share this memory).
        self._narratives: list[_Narrative] = []
        self._image_info: dict[int, tuple[str, int, int, str]] = {}  # image_id -> (file, height, width, PNG file)
        self.num_ungrounded = 0
        for file_index, narrative in enumerate(narratives):
            image_id = narrative.get("image_id") if isinstance(narrative, dict) else None
            try:
                with record_errors(f"{self.narratives_path}: narrative {file_index} (image_id {image_id})"):
                    expect_type(narrative, dict, where=f"{self.narratives_path}: narrative {file_index}",
                                what="a dict with 'image_id' and 'segments'")
                    segments = expect_type(narrative.get("segments"), list, what="a list of segments",
                                           where=f"{self.narratives_path}: narrative {file_index} 'segments'")
                    if not any(isinstance(segment, dict) and segment.get("segment_ids") for segment in segments):
                        self.num_ungrounded += 1
                        continue
                    self._narratives.append(self._check_narrative(file_index, narrative, images, panoptic_anns,
                                                                  isthing))
            except DataError as error:
                self.skips.handle(error)
        logger.info("png/%s: dropped %d of %d narratives without any grounded segment", split, self.num_ungrounded,
                    len(narratives))
        if not self._narratives:
            raise DataError(f"{self.narratives_path}: split {split!r} has no usable narrative ({len(narratives)} in "
                            f"the file, {self.num_ungrounded} without grounded segments, {self.skips.count} skipped)")

    def _check_narrative(
        self, file_index: int, narrative: dict, images: dict, panoptic_anns: dict, category_isthing: dict
    ) -> _Narrative:
        """Validate one narrative against the panoptic JSON and build its answer parts."""
        where = f"{self.narratives_path}: narrative {file_index} (image_id {narrative.get('image_id')})"
        try:
            image_id = int(narrative["image_id"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{where}: bad image_id") from error
        if image_id not in images or image_id not in panoptic_anns:
            raise DataError(f"{where}: image {image_id} is missing from {self.panoptic_path}")
        category_of = {info["id"]: info["category_id"] for info in panoptic_anns[image_id].get("segments_info", [])}

        utterances: list[tuple[str, int]] = []  # (stripped text, k)
        segment_ids, plural, isthing = [], [], []
        for position, segment in enumerate(narrative["segments"]):
            utterance = segment.get("utterance", "")
            if not isinstance(utterance, str):  # str(None) would put "None" into the narrative
                raise DataError(f"{where}: segment {position} field 'utterance': expected a string, found "
                                f"{type(utterance).__name__} {str(utterance)[:80]}")
            text = " ".join(utterance.split())
            if not segment.get("segment_ids"):
                if text:
                    utterances.append((text, -1))
                continue
            if not text:
                raise DataError(f"{where}: segment {position} is grounded but its utterance is empty")
            if not isinstance(segment["segment_ids"], list):
                raise DataError(f"{where}: segment {position} field 'segment_ids': expected a list of ids, found "
                                f"{type(segment['segment_ids']).__name__}")
            ids = tuple(_segment_id(value, where=f"{where}: segment {position}") for value in segment["segment_ids"])
            absent = [segment_id for segment_id in ids if segment_id not in category_of]
            if absent:
                raise DataError(f"{where}: segment ids {absent} of segment {position} are not in the segments_info "
                                f"of image {image_id} in {self.panoptic_path}")
            is_plural = _flag(segment.get("plural", False), where=f"{where}: segment {position} field 'plural'")
            utterances.append((text, len(segment_ids)))
            segment_ids.append(ids)
            plural.append(is_plural)
            isthing.append(True if is_plural else category_isthing.get(category_of[ids[0]], False))
        parts = _narrative_parts(narrative.get("caption"), utterances)
        image = images[image_id]
        height, width = image.get("height"), image.get("width")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise DataError(f"{where}: image {image_id} in {self.panoptic_path} needs positive integer height and "
                            f"width, found {height!r} x {width!r}")
        self._image_info[image_id] = (str(image["file_name"]), height, width,
                                      str(panoptic_anns[image_id]["file_name"]))
        return _Narrative(file_index=file_index, image_id=image_id, parts=tuple(parts), segment_ids=tuple(segment_ids),
                          plural=tuple(plural), isthing=tuple(isthing))

    def __len__(self) -> int:
        return len(self._narratives)

    def set_epoch(self, epoch: int) -> None:
        """No per-epoch randomness in PNG; present so training code can call it on every dataset."""

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The item dict of narrative `index`, or None when it is bad data and on_error="skip"."""
        return self.skips.guard(self._build, index)

    def _build(self, index: int) -> dict[str, Any]:
        narrative = self._narratives[index]
        file_name, height, width, panoptic_file = self._image_info[narrative.image_id]
        sample = (f"png/{self.split} sample {index} (narrative {narrative.file_index}, image_id {narrative.image_id}, "
                  f"{file_name})")
        image = load_rgb(os.path.join(self.image_dir, file_name), expected_hw=(height, width), sample=sample)

        segment_map = read_panoptic_png(os.path.join(self.panoptic_dir, panoptic_file), sample=sample)  # (H, W)
        if segment_map.shape != (height, width):
            raise DataError(f"{sample}: panoptic PNG {os.path.join(self.panoptic_dir, panoptic_file)} is "
                            f"{segment_map.shape[0]}x{segment_map.shape[1]} (H x W) but {self.panoptic_path} says "
                            f"{height}x{width}")
        gt_masks = np.zeros((len(narrative.segment_ids), height, width), dtype=bool)  # (K, H, W)
        for k, ids in enumerate(narrative.segment_ids):
            for segment_id in ids:
                segment_mask = segment_map == segment_id  # (H, W)
                if not segment_mask.any():
                    raise DataError(f"{sample}: segment id {segment_id} of {self.panoptic_path} is absent from the "
                                    f"panoptic PNG {os.path.join(self.panoptic_dir, panoptic_file)}")
                gt_masks[k] |= segment_mask
        meta = dict(
            dataset="png", split=self.split, image_id=narrative.image_id, file_name=file_name,
            panoptic_file=panoptic_file, narrative_index=narrative.file_index,
            segment_ids=[list(ids) for ids in narrative.segment_ids], isthing=list(narrative.isthing),
            plural=list(narrative.plural),
        )
        return make_item(image=image, gt_masks=gt_masks, parts=list(narrative.parts), meta=meta,
                         tokenizer=self.tokenizer, image_processor=self.image_processor,
                         instruction=self.instruction, system=self.system, max_length=self.max_length, sample=sample)


def read_panoptic_png(path: str, *, sample: str = "") -> np.ndarray:
    """A COCO panoptic PNG as an (H, W) int64 map of segment ids, id = R + 256 * G + 256^2 * B."""
    where = f" ({sample})" if sample else ""
    if not os.path.isfile(path):
        raise DataError(f"missing panoptic PNG {path}{where}")
    try:
        with Image.open(path) as png:
            rgb = np.asarray(png.convert("RGB"), dtype=np.int64)  # (H, W, 3)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a bad file (decompression bomb included)
        raise DataError(f"cannot read panoptic PNG {path}{where}: {type(error).__name__}: {error}") from error
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # (H, W)


def _segment_id(value: Any, *, where: str) -> int:
    """A panoptic segment id from the narratives file: an integer, or the decimal digits of one (PNG writes them as
    strings). A float is taken only when integral: 1001.9 is no id (int() would read it as 1001)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    raise DataError(f"{where} has a non-integer segment id in field 'segment_ids': {value!r}")


def _flag(value: Any, *, where: str) -> bool:
    """A JSON boolean (or 0 / 1); a string such as "false" is refused, bool("false") being True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: expected true or false, found {type(value).__name__} {value!r}")


def _narrative_parts(caption: Any, utterances: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The answer parts of a narrative: its caption text, with each utterance marked by its object index.

    The utterances are located one after another in the caption, so the answer keeps the caption's own spacing and
    punctuation. If that fails (no caption, an utterance not found, or letters/digits between utterances that
    belong to none), the utterances are joined with single spaces instead.
    """
    if isinstance(caption, str):
        parts, cursor = [], 0
        for text, k in utterances:
            position = caption.find(text, cursor)
            gap = caption[cursor:position]
            if position < 0 or any(char.isalnum() for char in gap):
                break
            if gap:
                parts.append((gap, -1))
            parts.append((text, k))
            cursor = position + len(text)
        else:
            tail = caption[cursor:]
            if not any(char.isalnum() for char in tail):
                if tail.strip():
                    parts.append((tail.rstrip(), -1))
                return parts
    parts = []
    for text, k in utterances:
        if parts:
            parts.append((" ", -1))
        parts.append((text, k))
    return parts

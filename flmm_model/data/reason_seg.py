"""ReasonSeg (LISA's reasoning-segmentation data): an image, an implicit query, and polygons of the target.

Layout (LISA's release; every path configurable): `<root>/reason_seg/ReasonSeg/<split>/<name>.jpg` beside
`<name>.json` for split "train", "val" or "test". A JSON holds `text` (a list of queries; LISA's evaluation, and
this dataset, use the first), `is_sentence` (a full sentence, or a short phrase) and `shapes`: labelme polygons
`{"label": ..., "points": [[x, y], ...]}` with label "target" (the answer), "ignore" (pixels scored by nobody) or
"flag" (deprecated, skipped). The mask is drawn as LISA draws it: every polygon's area is measured alone, then the
polygons are drawn larger first (a smaller one drawn later wins its pixels), each as `cv2.polylines` (thickness 1,
closed) + `cv2.fillPoly` on int32 points (so the outline belongs to the shape); "ignore" polygons paint 255, the
others 1. Images keep their stored pixel frame (the polygons refer to it).

Items (see `flmm_model.data.item`) ground the query itself: the model's usual prompt with the query as the answer
phrase (one object). That is the `direct` protocol's input. The meta carries what the default protocol (F-LMM's:
answer, then ground the answer) needs: `generate` = {question, answer_prefix, max_new_tokens}, with the question
"What is {query} in this image? " when `is_sentence` is false (the query itself otherwise) followed by "Briefly
answer the question in a single sentence.", the answer prefix "It is" and at most 16 new tokens; and the ignore mask
(`ignore_mask`, (H, W) bool), which the metric leaves out of both intersection and union.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import cv2
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flmm_model.data.errors import DataError, SkipLog, record_errors
from flmm_model.data.images import load_rgb, read_image_size
from flmm_model.data.item import make_item
from flmm_model.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, expression_parts

IGNORE_VALUE = 255  # LISA's value of ignored pixels
FLMM_SUFFIX = "Briefly answer the question in a single sentence."
FLMM_ANSWER_PREFIX = "It is"
FLMM_MAX_NEW_TOKENS = 16
PROTOCOLS = ("flmm", "direct")


def flmm_question(query: str, is_sentence: bool) -> str:
    """F-LMM's ReasonSeg question: a phrase is wrapped as "What is {query} in this image? ", then the suffix
    "Briefly answer the question in a single sentence." is appended (to a sentence query directly, as F-LMM does)."""
    return (query if is_sentence else f"What is {query} in this image? ") + FLMM_SUFFIX


def draw_lisa_mask(shapes: list[dict[str, Any]], height: int, width: int, *, where: str) -> np.ndarray:
    """LISA's `get_mask_from_json`: (H, W) uint8 with 1 = target, 255 = ignore, 0 = background.

    Raises:
        DataError (naming `where` and the shape): malformed points, points far outside the image (beyond one image
            size from it, where int32 could wrap), or no target pixel at all.
    """
    polygons = []
    for index, shape in enumerate(shapes):
        label = shape.get("label") if isinstance(shape, dict) else None
        if not isinstance(label, str):
            raise DataError(f"{where}: shape {index} has no string 'label'")
        if label.lower() == "flag":  # deprecated annotations
            continue
        points = np.asarray(shape.get("points"), dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 1 or not np.isfinite(points).all():
            raise DataError(f"{where}: shape {index} ({label!r}) needs 'points' as a list of finite [x, y] pairs")
        xs, ys = points[:, 0], points[:, 1]
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
            # int32 would wrap such coordinates (1e12 becomes -2147483648), drawing a polygon nobody annotated
            raise DataError(f"{where}: shape {index} ({label!r}) field 'points' lies far outside the {width}x{height} "
                            f"(W x H) image (x in [{xs.min():g}, {xs.max():g}], y in [{ys.min():g}, {ys.max():g}]); "
                            f"it belongs to another image or is corrupt")
        polygon = np.array([points], dtype=np.int32)  # (1, P, 2), truncated as LISA's np.array(..., np.int32)
        alone = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(alone, polygon, True, 1, 1)
        cv2.fillPoly(alone, polygon, 1)
        polygons.append((int(alone.sum()), IGNORE_VALUE if "ignore" in label.lower() else 1, polygon))
    mask = np.zeros((height, width), dtype=np.uint8)
    for _, value, polygon in sorted(polygons, key=lambda p: -p[0]):  # larger first (stable for equal areas)
        cv2.polylines(mask, polygon, True, value, 1)
        cv2.fillPoly(mask, polygon, value)
    if not (mask == 1).any():
        raise DataError(f"{where}: the 'target' shapes cover no pixel of the {width}x{height} (W x H) image (they lie "
                        f"outside it, or 'ignore' shapes cover them); a sample needs a non-empty target")
    return mask


class ReasonSegDataset(torch.utils.data.Dataset):
    """ReasonSeg items (see the module docstring).

    Args:
        root: data root holding `reason_seg/ReasonSeg/<split>/`.
        split: "train", "val" or "test".
        tokenizer: Qwen tokenizer.
        image_processor: the backbone's image processor.
        image_dir: the folder of the split's jpg + json files; None = `<root>/reason_seg/ReasonSeg/<split>`.
        instruction, system, max_length: the model's grounding prompt (the `direct` protocol's input).
        protocol: "flmm" (F-LMM's: items carry the `generate` request, answer then ground) or "direct" (items are
            scored on their own prompt: the query grounded, no generation).
        on_error: "raise" or "skip" (see `flmm_model.data.errors`); a split without any file always raises.

    Meta keys: `dataset`, `split`, `image_id` (the file stem), `file_name`, `query`, `is_sentence`, `protocol`,
    `generate` (protocol "flmm" only), `ignore_mask`.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        image_dir: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = DEFAULT_SYSTEM,
        max_length: int | None = None,
        protocol: str = "flmm",
        on_error: str = "raise",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, found {protocol!r}")
        self.split, self.protocol = split, protocol
        self.folder = image_dir if image_dir is not None else os.path.join(root, "reason_seg", "ReasonSeg", split)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.instruction, self.system, self.max_length = instruction, system, max_length
        self.skips = SkipLog(on_error=on_error, dataset=f"reason_seg/{split}")
        if not os.path.isdir(self.folder):
            raise DataError(f"missing ReasonSeg folder {self.folder} (expected <root>/reason_seg/ReasonSeg/{split}/ "
                            f"with <name>.jpg + <name>.json files, LISA's layout)")
        json_files = sorted(glob.glob(os.path.join(self.folder, "*.json")))
        if not json_files:
            raise DataError(f"{self.folder}: no ReasonSeg .json file (expected <name>.jpg + <name>.json pairs)")
        self._samples: list[tuple[str, str, bool, list]] = []  # (json path, query, is_sentence, shapes)
        for path in json_files:
            try:
                with record_errors(f"{path}"):
                    self._samples.append(self._read(path))
            except DataError as error:
                self.skips.handle(error)
        if not self._samples:
            raise DataError(f"{self.folder}: no usable ReasonSeg sample ({self.skips.count} skipped)")

    @staticmethod
    def _read(path: str) -> tuple[str, str, bool, list]:
        """Read and check one annotation file (LISA reads utf-8, falling back to cp1252)."""
        try:
            with open(path, encoding="utf-8") as handle:
                annotation = json.load(handle)
        except UnicodeDecodeError:
            with open(path, encoding="cp1252") as handle:
                annotation = json.load(handle)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read annotation file {path}: {error}") from error
        if not isinstance(annotation, dict):
            raise DataError(f"{path}: expected a JSON object with 'text', 'is_sentence' and 'shapes'")
        text = annotation.get("text")
        queries = [text] if isinstance(text, str) else text
        if not isinstance(queries, list) or not queries or not isinstance(queries[0], str) or not queries[0].strip():
            raise DataError(f"{path}: 'text' must be a non-empty list of queries (or one query), found {text!r}")
        shapes = annotation.get("shapes")
        if not isinstance(shapes, list):
            raise DataError(f"{path}: 'shapes' must be a list of polygons, found {type(shapes).__name__}")
        labels = [shape.get("label", "") if isinstance(shape, dict) else "" for shape in shapes]
        if not any(isinstance(label, str) and label.lower() not in ("flag",) and "ignore" not in label.lower()
                   for label in labels):
            raise DataError(f"{path}: no target polygon (labels found: {labels})")
        image_path = os.path.splitext(path)[0] + ".jpg"
        if not os.path.isfile(image_path):
            raise DataError(f"{path}: missing image file {image_path}")
        is_sentence = annotation.get("is_sentence", False)
        if not isinstance(is_sentence, bool):  # bool("false") is True
            raise DataError(f"{path}: field 'is_sentence': expected true or false, found {type(is_sentence).__name__} "
                            f"{is_sentence!r}")
        return path, queries[0].strip(), is_sentence, shapes

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The item of sample `index`, or None when it is bad data and on_error="skip"."""
        return self.skips.guard(self._build, index)

    def _build(self, index: int) -> dict[str, Any]:
        path, query, is_sentence, shapes = self._samples[index]
        image_path = os.path.splitext(path)[0] + ".jpg"
        sample = f"reason_seg/{self.split} sample {index} ({os.path.basename(image_path)})"
        width, height = read_image_size(image_path, sample=sample)  # the stored frame, which the polygons refer to
        image = load_rgb(image_path, expected_hw=(height, width), sample=sample)
        with record_errors(f"{path} ({sample})"):
            mask = draw_lisa_mask(shapes, height, width, where=f"{path} ({sample})")
        name = os.path.splitext(os.path.basename(path))[0]
        meta = dict(dataset="reason_seg", split=self.split, image_id=name, file_name=os.path.basename(image_path),
                    query=query, is_sentence=is_sentence, protocol=self.protocol,
                    ignore_mask=torch.from_numpy(mask == IGNORE_VALUE))
        if self.protocol == "flmm":
            meta["generate"] = dict(question=flmm_question(query, is_sentence), answer_prefix=FLMM_ANSWER_PREFIX,
                                    max_new_tokens=FLMM_MAX_NEW_TOKENS)
        return make_item(image=image, gt_masks=(mask == 1)[None], parts=expression_parts([query]), meta=meta,
                         tokenizer=self.tokenizer, image_processor=self.image_processor, instruction=self.instruction,
                         system=self.system, max_length=self.max_length, sample=sample)

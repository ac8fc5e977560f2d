"""RefCOCO / RefCOCO+ / RefCOCOg from the REFER layout: `refs(<split_by>).p` + COCO `instances.json` + COCO images.

Layout (every path configurable): `<root>/<name>/refs(<split_by>).p`, `<root>/<name>/instances.json`, images in
`<root>/train2014/COCO_train2014_%012d.jpg` (the `file_name` of instances.json when present).

Samples:
    protocol="flmm": one sample per image holding all of the image's refs of the split, in refs-file order, one
        sentence per ref joined "s0. s1. s2." (F-LMM). With train=True the sentence of each ref is drawn at random:
        by default once for the whole run (`sentence_draw="once"`, deterministic in (seed, index), as F-LMM draws
        when its dataset is built), or anew every epoch (`sentence_draw="per_epoch"`, deterministic in (seed,
        epoch, index); call `set_epoch(epoch)` every epoch). With train=False it is the first sentence (F-LMM's
        evaluation protocol).
    protocol="per_sentence": one sample per (ref, sentence) with a single object (LISA's evaluation protocol);
        `train` has no effect.

Sentence text (`sentence`): "raw_lower" (default, F-LMM: REFER's `raw` field lower-cased, as mmdet's
RefCocoDataset gives it to F-LMM), "sent" (REFER's normalised text) or "raw".
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from flmm_model.data.coco_masks import decode_object_mask, decode_segmentation  # noqa: F401 - re-exported
from flmm_model.data.errors import DataError, SkipLog, expect_type, index_records, load_json, record_errors
from flmm_model.data.images import load_rgb
from flmm_model.data.item import make_item
from flmm_model.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, expression_parts

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
PROTOCOLS = ("flmm", "per_sentence")
SENTENCE_FIELDS = ("raw_lower", "sent", "raw")
SENTENCE_DRAWS = ("once", "per_epoch")


@dataclass(frozen=True)
class _Ref:
    ref_id: int
    ann_id: int
    image_id: int
    sentences: tuple[tuple[int, str], ...]  # (sent_id, text)


class RefCocoDataset(torch.utils.data.Dataset):
    """Referring expression segmentation items (see `flmm_model.data.item`) from REFER files.

    Args:
        root: data root holding `<name>/` and, by default, `train2014/`.
        name: "refcoco", "refcoco+" or "refcocog" (any folder name under `root` works with an explicit split_by).
        split: "train", "val", "testA", "testB" or "test" (whatever the refs file holds).
        tokenizer: Qwen tokenizer.
        image_processor: Qwen2-VL image processor.
        split_by: refs file variant: None = "unc" for refcoco / refcoco+, "umd" for refcocog; "google" when asked.
        image_dir: COCO 2014 image folder; None = `<root>/train2014`.
        protocol: "flmm" (all refs of an image in one sample) or "per_sentence" (one sample per sentence).
        train: draw one random sentence per ref (protocol "flmm"); False = the first sentence.
        seed: seed of the sentence draw.
        sentence: "raw_lower" (F-LMM), "sent" or "raw": which REFER field gives the text (see the module doc).
        sentence_draw: "once" (F-LMM: one draw per ref for the whole run) or "per_epoch".
        instruction: user instruction after the image.
        system: system prompt.
        on_error: "raise" or "skip" (see `flmm_model.data.errors`); an empty split always raises.
        max_length: longest allowed compact sequence; longer samples are bad data (raise or skip).

    Meta keys: `dataset` (name), `split`, `split_by`, `image_id`, `file_name`, `ref_ids`, `ann_ids`, `sent_ids`
    (lists of length K, in object order).
    """

    def __init__(
        self,
        root: str,
        name: str,
        split: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        split_by: str | None = None,
        image_dir: str | None = None,
        protocol: str = "flmm",
        train: bool,
        seed: int = 0,
        sentence: str = "raw_lower",
        sentence_draw: str = "once",
        instruction: str = DEFAULT_INSTRUCTION,
        system: str = DEFAULT_SYSTEM,
        on_error: str = "raise",
        max_length: int | None = None,
    ) -> None:
        if split_by is None:
            if name not in DEFAULT_SPLIT_BY:
                raise ValueError(f"split_by: required for dataset {name!r} (defaults exist for "
                                 f"{sorted(DEFAULT_SPLIT_BY)})")
            split_by = DEFAULT_SPLIT_BY[name]
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, found {protocol!r}")
        if sentence not in SENTENCE_FIELDS:
            raise ValueError(f"sentence: expected one of {SENTENCE_FIELDS}, found {sentence!r}")
        if sentence_draw not in SENTENCE_DRAWS:
            raise ValueError(f"sentence_draw: expected one of {SENTENCE_DRAWS}, found {sentence_draw!r}")
        self.sentence, self.sentence_draw = sentence, sentence_draw
        self.name, self.split, self.split_by, self.protocol = name, split, split_by, protocol
        self.train, self.seed, self.epoch = train, seed, 0
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.instruction, self.system, self.max_length = instruction, system, max_length
        self.image_dir = image_dir if image_dir is not None else os.path.join(root, "train2014")
        self.refs_path = os.path.join(root, name, f"refs({split_by}).p")
        self.instances_path = os.path.join(root, name, "instances.json")
        self.skips = SkipLog(on_error=on_error, dataset=f"{name}({split_by})/{split}")

        refs = _load_refs(self.refs_path)
        instances = expect_type(load_json(self.instances_path), dict, where=self.instances_path,
                                what="a COCO instances mapping with 'images' and 'annotations'")
        images = index_records(instances, "images", "id", path=self.instances_path, skips=self.skips)
        annotations = index_records(instances, "annotations", "id", path=self.instances_path, skips=self.skips)
        split_refs = [ref for ref in refs if isinstance(ref, dict) and ref.get("split") == split]
        for position, ref in enumerate(refs):
            if not isinstance(ref, dict):
                self.skips.handle(DataError(f"{self.refs_path}: ref {position} is a {type(ref).__name__}, "
                                            f"expected a dict"))
        if not split_refs:
            found = sorted({str(ref.get("split")) for ref in refs})
            raise DataError(f"{self.refs_path}: split {split!r} is empty (splits in the file: {found})")

        self._refs: list[_Ref] = []
        self._segmentations: dict[int, Any] = {}  # ann_id -> COCO segmentation
        self._images: dict[int, tuple[str, int, int]] = {}  # image_id -> (file_name, height, width)
        for ref in split_refs:
            try:
                with record_errors(f"{self.refs_path}: ref {ref.get('ref_id')} (split {split})"):
                    self._refs.append(self._check_ref(ref, images, annotations))
            except DataError as error:
                self.skips.handle(error)
        if not self._refs:
            raise DataError(f"{self.refs_path}: split {split!r} has no usable ref ({self.skips.count} skipped)")

        # Sample index: (image_id, ref indices, sentence index or None = chosen by protocol / train).
        self._samples: list[tuple[int, tuple[int, ...], int | None]] = []
        if protocol == "per_sentence":
            for ref_index, ref in enumerate(self._refs):
                for sent_index in range(len(ref.sentences)):
                    self._samples.append((ref.image_id, (ref_index,), sent_index))
        else:
            by_image: dict[int, list[int]] = {}
            for ref_index, ref in enumerate(self._refs):
                by_image.setdefault(ref.image_id, []).append(ref_index)
            self._samples = [(image_id, tuple(indices), None) for image_id, indices in by_image.items()]

    def _check_ref(self, ref: dict, images: dict, annotations: dict) -> _Ref:
        """Validate one REFER record against instances.json and keep what the samples need."""
        where = f"{self.refs_path}: ref {ref.get('ref_id')} (split {self.split})"
        ann_id, image_id = ref.get("ann_id"), ref.get("image_id")
        if ann_id not in annotations:
            raise DataError(f"{where}: its annotation {ann_id} is missing from {self.instances_path}")
        if image_id not in images:
            raise DataError(f"{where}: its image {image_id} is missing from {self.instances_path}")
        if annotations[ann_id].get("image_id") != image_id:
            raise DataError(f"{where}: annotation {ann_id} belongs to image {annotations[ann_id].get('image_id')}, "
                            f"not to the ref's image {image_id}")
        field = "sent" if self.sentence == "sent" else "raw"
        sentences = []
        listed = expect_type(ref.get("sentences", []), list, where=f"{where}: 'sentences'", what="a list of dicts")
        for position, sentence in enumerate(listed):
            if not isinstance(sentence, dict):
                raise DataError(f"{where}: sentence {position} is a {type(sentence).__name__}, expected a dict")
            if field not in sentence:
                raise DataError(f"{where}: sentence {sentence.get('sent_id')} has no {field!r} field")
            text = sentence[field]
            if not isinstance(text, str):  # str(None) would train the text "none"
                raise DataError(f"{where}: sentence {sentence.get('sent_id')} field {field!r}: expected a string, "
                                f"found {type(text).__name__} {str(text)[:80]}")
            text = text.lower() if self.sentence == "raw_lower" else text
            if text.strip():
                sentences.append((sentence.get("sent_id"), text))
        if not sentences:
            raise DataError(f"{where}: no non-empty sentence")
        image = images[image_id]
        file_name = image.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        height, width = image.get("height"), image.get("width")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
            raise DataError(f"{where}: image {image_id} in {self.instances_path} needs positive integer height and "
                            f"width, found {height!r} x {width!r}")
        if not isinstance(file_name, str):
            raise DataError(f"{where}: image {image_id} has a file_name of type {type(file_name).__name__}")
        self._images[image_id] = (file_name, height, width)
        self._segmentations[ann_id] = annotations[ann_id].get("segmentation")
        return _Ref(ref_id=ref.get("ref_id"), ann_id=ann_id, image_id=image_id, sentences=tuple(sentences))

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def changes_per_epoch(self) -> bool:
        """Whether a sample's text changes between epochs (training with `sentence_draw="per_epoch"`): the LMM-output
        cache refuses such a dataset (`data.lmm_cache.check_cacheable`)."""
        return self.train and self.sentence_draw == "per_epoch"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the training sentence draw (used with `sentence_draw="per_epoch"`)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """The item dict of sample `index`, or None when it is bad data and on_error="skip"."""
        return self.skips.guard(self._build, index)

    def _build(self, index: int) -> dict[str, Any]:
        image_id, ref_indices, sent_index = self._samples[index]
        file_name, height, width = self._images[image_id]
        sample = f"{self.name}({self.split_by})/{self.split} sample {index} (image_id {image_id}, {file_name})"
        refs = [self._refs[i] for i in ref_indices]
        if sent_index is not None:
            choices = [sent_index]
        elif self.train:
            key = [self.seed, index] if self.sentence_draw == "once" else [self.seed, self.epoch, index]
            rng = np.random.default_rng(key)
            choices = [int(rng.integers(len(ref.sentences))) for ref in refs]
        else:
            choices = [0] * len(refs)

        image = load_rgb(os.path.join(self.image_dir, file_name), expected_hw=(height, width), sample=sample)
        gt_masks = np.stack([
            decode_object_mask(self._segmentations[ref.ann_id], height=height, width=width,
                               where=f"{sample}, annotation {ref.ann_id} in {self.instances_path}")
            for ref in refs
        ])  # (K, H, W)
        phrases = [ref.sentences[choice][1] for ref, choice in zip(refs, choices, strict=True)]
        meta = dict(
            dataset=self.name, split=self.split, split_by=self.split_by, image_id=image_id, file_name=file_name,
            ref_ids=[ref.ref_id for ref in refs], ann_ids=[ref.ann_id for ref in refs],
            sent_ids=[ref.sentences[choice][0] for ref, choice in zip(refs, choices, strict=True)],
        )
        return make_item(image=image, gt_masks=gt_masks, parts=expression_parts(phrases), meta=meta,
                         tokenizer=self.tokenizer, image_processor=self.image_processor,
                         instruction=self.instruction, system=self.system, max_length=self.max_length, sample=sample)


class PlainUnpickler(pickle.Unpickler):
    """An unpickler for data files: the plain types pickle encodes without naming a class (dict, list, tuple, str,
    bytes, int, float, bool, None) load; anything that names a global (a class, a function: how a pickle runs code
    or imports a module) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; only plain dicts, lists, tuples, strings and numbers "
                                     f"are allowed in a refs file")


def _load_refs(path: str) -> list[dict]:
    """Read a REFER refs pickle (a list of dicts); REFER's files were written by Python 2.

    Read with `PlainUnpickler`: a refs file that names any class or function (a payload that would run a command,
    an object of another library) is a DataError, and nothing in it runs.
    """
    if not os.path.isfile(path):
        raise DataError(f"missing refs file {path}")
    try:
        with open(path, "rb") as handle:
            try:
                refs = PlainUnpickler(handle).load()
            except UnicodeDecodeError:  # Python 2 str holding non-ASCII bytes
                handle.seek(0)
                refs = PlainUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        raise DataError(f"cannot read refs file {path}: {error}") from error
    if not isinstance(refs, list):
        raise DataError(f"refs file {path}: expected a list of refs, found {type(refs).__name__}")
    return refs


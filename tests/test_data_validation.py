"""Bad data is refused with a DataError naming the file, the sample and the annotation, never decoded into a wrong
mask and never escaping as a bare library exception; under `on_error=skip` it is skipped and counted."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from dataset_files import CAT, _compressed_rle, _segments, _uncompressed_rle, write_png, write_refer
from pycocotools import mask as mask_utils

from flmm_model.data import Collator, DataError, PngDataset, RefCocoDataset
from flmm_model.data.coco_masks import decode_segmentation, rle_string_counts


def _random_mask(seed: int, height: int = 37, width: int = 53) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((height, width)) < rng.uniform(0.05, 0.95)


@pytest.mark.parametrize("seed", range(6))
def test_rle_string_counts_equal_the_hand_written_uncompressed_runs(seed):
    mask = _random_mask(seed)
    if seed == 0:
        mask[0, 0] = True  # starts with foreground: a zero-length first background run
    counts = rle_string_counts(_compressed_rle(mask)["counts"])
    assert counts == _uncompressed_rle(mask)["counts"]  # written by hand in dataset_files, not by pycocotools
    np.testing.assert_array_equal(decode_segmentation(_compressed_rle(mask), height=37, width=53, where="a"), mask)


def test_valid_segmentations_decode_as_pycocotools_does():
    mask = _random_mask(7)
    polygon = [[3.5, 2.0, 40.0, 5.5, 30.0, 33.0, 4.0, 30.0]]
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 37, 53))).astype(bool)
    np.testing.assert_array_equal(decode_segmentation(polygon, height=37, width=53, where="a"), reference)
    np.testing.assert_array_equal(decode_segmentation(_uncompressed_rle(mask), height=37, width=53, where="a"), mask)
    as_bytes = {"size": [37, 53], "counts": _compressed_rle(mask)["counts"].encode()}
    np.testing.assert_array_equal(decode_segmentation(as_bytes, height=37, width=53, where="a"), mask)


def _truncated_rle(mask: np.ndarray, keep: int) -> dict:
    rle = _compressed_rle(mask)
    return {"size": rle["size"], "counts": rle["counts"][:keep]}


@pytest.mark.parametrize("segmentation, message", [
    # pycocotools decodes these from uninitialised memory (a different mask on every call): refused.
    ({"size": [37, 53], "counts": ""}, r"compressed RLE counts sum to 0, expected 1961 pixels"),
    ("truncated_mid_count", r"compressed RLE string is malformed: the string ends inside count"),
    ("truncated_short", r"compressed RLE counts sum to \d+, expected 1961 pixels"),
    ({"size": [37, 53], "counts": "Y35?00000"}, r"compressed RLE"),
    ({"size": [37, 53], "counts": "ab c"}, r"compressed RLE string is malformed: character ' ' at position 2 is not"),
    ({"size": [37, 53], "counts": "é"}, r"compressed RLE string is malformed"),
    ({"size": [37, 53], "counts": [1960, -5, 6]}, r"uncompressed RLE count 1 is negative \(-5\)"),
    ({"size": [37, 53], "counts": [1000, 2.5]}, r"uncompressed RLE counts must be integers, found float 2.5"),
    ({"size": [37, 53], "counts": [1000, 900]}, r"uncompressed RLE counts sum to 1900, expected 1961"),
    ({"size": [37, 53], "counts": None}, r"RLE counts must be a list of integers or a compressed string"),
    ({"size": ["37", 53], "counts": [1961]}, r"RLE size must be \[height, width\] integers"),
    ({"size": [53, 37], "counts": [1961]}, r"RLE size \[53, 37\] differs from the image's \[37, 53\]"),
    ([[float("nan")] * 8], r"polygon 0 has a non-finite coordinate \(nan\)"),
    ([[1, 2, 3, 4, 5, float("inf")]], r"polygon 0 has a non-finite coordinate \(inf\)"),
    ([["1", "2", "3", "4", "5", "6"]], r"polygon 0 holds a str \('1'\), expected numbers"),
    ([[1, 2, 3, 4, 5, None]], r"polygon 0 holds a NoneType"),
    ([1.0, 2.0, 30.0, 4.0, 5.0, 20.0], r"the polygon segmentation is a flat list of numbers; COCO nests it"),
    ([[1, 2, 3, 4, 5, 6], 7], r"polygon 1 is a int \(7\), expected a list"),
    ([[1, 2, 3, 4, 5, 6, 7]], r"polygon 0 has an odd number of coordinates \(7\)"),
    ([[1, 2, 3e12, 4, 5, 6]], r"polygon 0 has points far outside the 53x37 \(W x H\) image"),
    ("polygon", r"unrecognised segmentation of type str"),
    (None, r"unrecognised segmentation of type NoneType"),
])
def test_malformed_segmentations_raise_data_error_naming_the_annotation(segmentation, message):
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:30, 10:40] = True  # long runs: counts of several characters each
    if segmentation == "truncated_mid_count":
        counts = _compressed_rle(mask)["counts"]
        cut = next(i for i in range(1, len(counts)) if ord(counts[i - 1]) - 48 & 0x20)  # right after a "more" char
        segmentation = {"size": [37, 53], "counts": counts[:cut]}
    elif segmentation == "truncated_short":
        segmentation = _truncated_rle(mask, 2)
    with pytest.raises(DataError, match=r"^refcoco sample 4, annotation 77: " + message):
        decode_segmentation(segmentation, height=37, width=53, where="refcoco sample 4, annotation 77")


def _write_annotations(root, update) -> None:
    path = root / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    for annotation in instances["annotations"]:
        if annotation["id"] in update:
            annotation["segmentation"] = update[annotation["id"]]
    path.write_text(json.dumps(instances))


def _refcoco(root, tokenizer, image_processor, **kwargs) -> RefCocoDataset:
    return RefCocoDataset(str(root), "refcoco", "val", tokenizer=tokenizer, image_processor=image_processor,
                          train=False, **kwargs)


def test_refcoco_malformed_segmentations_raise_with_file_sample_and_annotation_or_are_skipped(
        tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)
    # val: sample 0 = image 2 (annotation 21), sample 1 = image 3 (annotations 31, 32).
    _write_annotations(tmp_path, {21: {"size": [photos[1].height, photos[1].width], "counts": "Y35?00000"},
                                  32: [["a", "b", "c", "d", "e", "f"]]})
    dataset = _refcoco(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=r"refcoco\(unc\)/val sample 0 \(image_id 2, COCO_train2014_000000000002.jpg"
                                        r"\), annotation 21 in .*instances.json: compressed RLE"):
        dataset[0]
    with pytest.raises(DataError, match=r"sample 1 .*annotation 32 in .*instances.json: polygon 0 holds a str"):
        dataset[1]
    skipping = _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([skipping[0], skipping[1]])
    assert batch["num_skipped"] == 2 and skipping.skips.count == 2
    assert "annotation 21" in skipping.skips.report() and "annotation 32" in skipping.skips.report()


@pytest.mark.parametrize("instances, message", [
    ([], r"instances.json: expected a COCO instances mapping .*found list"),
    ({"images": {}, "annotations": []}, r"instances.json: 'images': expected a list of records, found dict"),
    ("binary", r"cannot read annotation file .*instances.json"),
])
def test_refcoco_instances_file_of_the_wrong_shape_raises_naming_it(tmp_path, photos, tokenizer, image_processor,
                                                                    instances, message):
    write_refer(tmp_path, photos)
    path = tmp_path / "refcoco" / "instances.json"
    if instances == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    else:
        path.write_text(json.dumps(instances))
    with pytest.raises(DataError, match=message):
        _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")


def test_refcoco_malformed_records_are_skipped_and_counted(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)
    path = tmp_path / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    instances["images"][2]["height"] = "tall"  # image 3: both of its val refs become unusable
    instances["annotations"].append(["not", "a", "record"])
    path.write_text(json.dumps(instances))
    refs_path = tmp_path / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes()) + ["not a ref", {"ref_id": 9, "split": "val", "ann_id": [1]}]
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DataError, match=r"annotations record 6 has no 'id'"):
        _refcoco(tmp_path, tokenizer, image_processor)
    dataset = _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")
    assert len(dataset) == 1 and dataset[0]["meta"]["image_id"] == 2
    report = dataset.skips.report()
    assert dataset.skips.count == 5, report  # the annotation record, the two refs of image 3, two bad refs
    assert "needs positive integer height and width, found 'tall'" in report
    assert "ref 9 (split val): malformed record (TypeError" in report and "ref 6 is a str, expected a dict" in report


def test_png_caption_spelling_a_control_token_across_utterances_is_bad_data(tmp_path, photos, tokenizer,
                                                                            image_processor):
    # The caption's text between the grounded phrase and the end spells <|im_end|> across three parts.
    narratives = [{"image_id": "285", "caption": "a cat<|im_end|>",
                   "segments": _segments(("a cat", [CAT], False), ("im_end", [], False))},
                  {"image_id": "285", "caption": "a cat sits.",
                   "segments": _segments(("a cat", [CAT], False), ("sits", [], False))}]
    write_png(tmp_path, photos, narratives=narratives)
    dataset = PngDataset(str(tmp_path), "val", tokenizer=tokenizer, image_processor=image_processor)
    with pytest.raises(DataError, match=r"png/val sample 0 \(narrative 0, .*joined from its parts contains the "
                                        r"special token '<\|im_end\|>'"):
        dataset[0]
    skipping = PngDataset(str(tmp_path), "val", tokenizer=tokenizer, image_processor=image_processor,
                          on_error="skip")
    assert skipping[0] is None and skipping[1] is not None and skipping.skips.count == 1


@pytest.mark.parametrize("panoptic, message", [
    ([], r"panoptic_val2017.json: expected a COCO panoptic mapping"),
    ({"images": [], "annotations": [], "categories": "x"}, r"'categories': expected a list of records, found str"),
])
def test_png_panoptic_file_of_the_wrong_shape_raises_naming_it(tmp_path, photos, tokenizer, image_processor,
                                                               panoptic, message):
    write_png(tmp_path, photos)
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(panoptic))
    with pytest.raises(DataError, match=message):
        PngDataset(str(tmp_path), "val", tokenizer=tokenizer, image_processor=image_processor, on_error="skip")


def test_png_malformed_narratives_are_skipped_and_counted(tmp_path, photos, tokenizer, image_processor):
    narratives = [{"image_id": "285", "segments": _segments(("a cat", [CAT], False))},
                  "not a narrative",
                  {"image_id": "285", "segments": "a cat"},
                  {"image_id": "285", "segments": [{"utterance": "a cat", "segment_ids": [["5000"]]}]}]
    write_png(tmp_path, photos, narratives=narratives)
    with pytest.raises(DataError, match=r"png_coco_val2017.json: narrative 1: expected a dict"):
        PngDataset(str(tmp_path), "val", tokenizer=tokenizer, image_processor=image_processor)
    dataset = PngDataset(str(tmp_path), "val", tokenizer=tokenizer, image_processor=image_processor,
                         on_error="skip")
    assert len(dataset) == 1 and dataset.skips.count == 3
    assert "narrative 3 (image_id 285): segment 0 has a non-integer segment id" in dataset.skips.report()

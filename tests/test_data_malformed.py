"""Malformed records that used to decode into a silently wrong sample (issue 22): each is a DataError naming the
file, the record and the field under `on_error=raise`, and is left out and counted under `on_error=skip`. Fixtures
are written in the datasets' real on-disk formats (`dataset_files`); images in modes I / I;16 / F are scaled to 8
bits by the range of their values, compared here against the rule computed by hand."""

from __future__ import annotations

import json
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from dataset_files import CAT, _segments, _uncompressed_rle, write_png, write_refer
from PIL import Image

import run
from flmm_model.data import DataError, PngDataset, ReasonSegDataset, RefCocoDataset
from flmm_model.data.images import load_rgb, read_image_size

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")

# ---------------------------------------------------------------------------------------------------------------
# RefCOCO (REFER refs pickle + COCO instances.json)


def _refcoco(root, tokenizer, image_processor, **kwargs) -> RefCocoDataset:
    return RefCocoDataset(str(root), "refcoco", "val", tokenizer=tokenizer, image_processor=image_processor,
                          train=False, **kwargs)


def _edit_refs(root, edit) -> None:
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def _edit_instances(root, edit) -> None:
    path = root / "refcoco" / "instances.json"
    instances = json.loads(path.read_text())
    edit(instances)
    path.write_text(json.dumps(instances))


@pytest.mark.parametrize("raw, found", [(None, "NoneType None"), (["a", "b"], r"list \['a', 'b'\]")])
def test_refer_sentence_raw_that_is_not_a_string_names_ref_sentence_and_field(tmp_path, photos, tokenizer,
                                                                              image_processor, raw, found):
    write_refer(tmp_path, photos)

    def edit(refs):
        ref = next(ref for ref in refs if ref["ref_id"] == 201)  # val, image 2
        ref["sentences"][0]["raw"] = raw  # sentence 2001

    _edit_refs(tmp_path, edit)
    with pytest.raises(DataError, match=r"refs\(unc\)\.p: ref 201 \(split val\): sentence 2001 field 'raw': expected "
                                        r"a string, found " + found):
        _refcoco(tmp_path, tokenizer, image_processor)
    skipping = _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")
    assert skipping.skips.count == 1 and "sentence 2001 field 'raw'" in skipping.skips.report()
    assert [skipping[i]["meta"]["image_id"] for i in range(len(skipping))] == [3]  # image 2 had only ref 201
    # The "sent" field of the same sentence is still a string: that protocol reads it.
    assert _refcoco(tmp_path, tokenizer, image_processor, sentence="sent")[0]["phrases"] == ["the astronaut"]


@pytest.mark.parametrize("segmentation, why", [
    ([], r"the segmentation is an empty list"),
    ("outside", r"its polygons lie wholly outside the image \(x in \[\d+, \d+\]"),
    ("background_rle", r"its RLE marks no pixel as foreground"),
])
def test_refer_annotation_with_an_empty_mask_is_bad_data(tmp_path, photos, tokenizer, image_processor,
                                                         segmentation, why):
    write_refer(tmp_path, photos)
    height, width = photos[1].height, photos[1].width  # image 2, annotation 21 (val sample 0)
    if segmentation == "outside":  # to the right of the image, within the "far outside" margin
        segmentation = [[width + 5.0, 5.0, width + 40.0, 5.0, width + 40.0, 30.0, width + 5.0, 30.0]]
    elif segmentation == "background_rle":
        segmentation = _uncompressed_rle(np.zeros((height, width), dtype=bool))

    def edit(instances):
        next(a for a in instances["annotations"] if a["id"] == 21)["segmentation"] = segmentation

    _edit_instances(tmp_path, edit)
    dataset = _refcoco(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=r"refcoco\(unc\)/val sample 0 \(image_id 2, .*\), annotation 21 in "
                                        r".*instances.json: 'segmentation' covers no pixel of the "
                                        rf"{width}x{height} \(W x H\) image: " + why):
        dataset[0]
    assert dataset[1]["gt_masks"].any(dim=(1, 2)).all()  # image 3's masks are untouched
    skipping = _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")
    assert skipping[0] is None and skipping[1] is not None and skipping.skips.count == 1


def test_two_annotations_with_one_id_are_bad_data_and_both_are_left_out(tmp_path, photos, tokenizer,
                                                                       image_processor):
    write_refer(tmp_path, photos)

    def edit(instances):
        twin = dict(next(a for a in instances["annotations"] if a["id"] == 21))
        twin["segmentation"] = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]  # another mask under the same id
        instances["annotations"].append(twin)  # position 6; the first is at position 2

    _edit_instances(tmp_path, edit)
    with pytest.raises(DataError, match=r"instances.json: annotations record 2: id 21 is shared by 2 records "
                                        r"\(positions \[2, 6\]\); ids must be unique"):
        _refcoco(tmp_path, tokenizer, image_processor)
    skipping = _refcoco(tmp_path, tokenizer, image_processor, on_error="skip")
    report = skipping.skips.report()
    # Both records of id 21 are left out (which is meant cannot be told), and so is the ref that points at it.
    assert skipping.skips.count == 3, report
    assert "record 6: id 21 is shared" in report and "its annotation 21 is missing" in report
    assert len(skipping) == 1 and skipping[0]["meta"]["image_id"] == 3


# ---------------------------------------------------------------------------------------------------------------
# PNG (narratives JSON + COCO panoptic JSON + panoptic PNGs)


def _png(root, tokenizer, image_processor, **kwargs) -> PngDataset:
    return PngDataset(str(root), "val", tokenizer=tokenizer, image_processor=image_processor, **kwargs)


GOOD_NARRATIVE = {"image_id": "285", "caption": "a cat.", "segments": _segments(("a cat", [CAT], False))}


@pytest.mark.parametrize("segment, message", [
    ({"utterance": None, "segment_ids": [], "plural": False}, r"segment 0 field 'utterance': expected a string, "
                                                               r"found NoneType None"),
    ({"utterance": None, "segment_ids": [str(CAT)], "plural": False}, r"segment 0 field 'utterance'"),
    ({"utterance": "a cat", "segment_ids": [1001.9], "plural": False}, r"segment 0 has a non-integer segment id in "
                                                                        r"field 'segment_ids': 1001.9"),
    ({"utterance": "a cat", "segment_ids": [str(CAT)], "plural": "false"}, r"segment 0 field 'plural': expected "
                                                                            r"true or false, found str 'false'"),
])
def test_png_malformed_segment_names_narrative_segment_and_field(tmp_path, photos, tokenizer, image_processor,
                                                                 segment, message):
    bad = {"image_id": "285", "segments": [segment, *_segments(("a wall", [6000], False))]}
    write_png(tmp_path, photos, narratives=[bad, GOOD_NARRATIVE])
    with pytest.raises(DataError, match=r"png_coco_val2017.json: narrative 0 \(image_id 285\): " + message):
        _png(tmp_path, tokenizer, image_processor)
    skipping = _png(tmp_path, tokenizer, image_processor, on_error="skip")
    assert len(skipping) == 1 and skipping.skips.count == 1 and skipping[0]["meta"]["narrative_index"] == 1


def test_png_integral_float_segment_id_is_the_same_segment(tmp_path, photos, tokenizer, image_processor):
    painted = write_png(tmp_path, photos, narratives=[
        {"image_id": "285", "segments": [{"utterance": "a cat", "segment_ids": [float(CAT)], "plural": False}]}])
    item = _png(tmp_path, tokenizer, image_processor)[0]
    assert item["meta"]["segment_ids"] == [[CAT]]
    np.testing.assert_array_equal(item["gt_masks"][0].numpy(), painted[285] == CAT)


# ---------------------------------------------------------------------------------------------------------------
# ReasonSeg (LISA's <name>.jpg + <name>.json, labelme polygons)


def _write_reason_seg(root, photo, annotations: dict[str, dict]):
    folder = root / "reason_seg" / "ReasonSeg" / "val"
    folder.mkdir(parents=True)
    for name, annotation in annotations.items():
        photo.save(folder / f"{name}.jpg", quality=95)
        (folder / f"{name}.json").write_text(json.dumps(annotation))
    return folder


def _reason_seg(root, tokenizer, image_processor, **kwargs) -> ReasonSegDataset:
    return ReasonSegDataset(str(root), "val", tokenizer=tokenizer, image_processor=image_processor, **kwargs)


def _box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _annotation(target, **extra):
    return {"text": ["the animal"], "is_sentence": False, "shapes": [{"label": "target", "points": target}], **extra}


@pytest.mark.parametrize("where, message", [
    ("outside", r"the 'target' shapes cover no pixel of the (\d+)x(\d+) \(W x H\) image"),
    ("huge", r"shape 0 \('target'\) field 'points' lies far outside the (\d+)x(\d+) \(W x H\) image \(x in "
             r"\[10, 1e\+12\]"),
])
def test_reason_seg_target_outside_the_image_or_beyond_int32_is_bad_data(tmp_path, photos, tokenizer,
                                                                        image_processor, where, message):
    width, height = photos[0].size
    target = (_box(width + 10, 10, width + 60, 50) if where == "outside"  # inside the margin: drawn, but empty
              else _box(10, 10, 1e12, 50))  # int32 would wrap 1e12 to a 1-pixel-wide sliver
    folder = _write_reason_seg(tmp_path, photos[0], {"a_bad": _annotation(target), "b_good": _annotation(
        _box(5, 5, 40, 30))})
    dataset = _reason_seg(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=re.escape(f"{folder / 'a_bad.json'} (reason_seg/val sample 0 (a_bad.jpg)): ")
                       + message) as error:
        dataset[0]
    assert f"{width}x{height} (W x H)" in str(error.value)
    assert dataset[1]["gt_masks"].sum() > 0
    skipping = _reason_seg(tmp_path, tokenizer, image_processor, on_error="skip")
    assert skipping[0] is None and skipping[1] is not None and skipping.skips.count == 1


@pytest.mark.parametrize("value", ["false", 0.0, None])
def test_reason_seg_is_sentence_that_is_not_a_boolean_is_bad_data(tmp_path, photos, tokenizer, image_processor,
                                                                  value):
    folder = _write_reason_seg(tmp_path, photos[0], {"a_bad": _annotation(_box(5, 5, 40, 30), is_sentence=value),
                                                     "b_good": _annotation(_box(5, 5, 40, 30), is_sentence=True)})
    with pytest.raises(DataError, match=re.escape(f"{folder / 'a_bad.json'}: field 'is_sentence': expected true or "
                                                  f"false, found {type(value).__name__}")):
        _reason_seg(tmp_path, tokenizer, image_processor)
    skipping = _reason_seg(tmp_path, tokenizer, image_processor, on_error="skip")
    assert len(skipping) == 1 and skipping.skips.count == 1
    assert skipping[0]["meta"]["image_id"] == "b_good" and skipping[0]["meta"]["is_sentence"] is True


# ---------------------------------------------------------------------------------------------------------------
# Images: 16-bit, 32-bit integer and float gray; a header too large to decode.

GRAY16 = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 20 + 100)  # (48, 64) values 100..61520


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", GRAY16.astype(np.uint16), np.round(GRAY16 * 255 / 65535)),  # 16-bit TIFF
    ("I", GRAY16.astype(np.int32), np.round(GRAY16 * 255 / 65535)),  # 16-bit values in a 32-bit TIFF
    ("I", (GRAY16 % 256).astype(np.int32), GRAY16 % 256),  # 8-bit values in a 32-bit TIFF: kept
    ("F", (GRAY16 / 65535).astype(np.float32),  # floats in [0, 1]: times 255
     np.round((GRAY16 / 65535).astype(np.float32).astype(np.float64) * 255)),
    ("F", (GRAY16 % 255).astype(np.float32) + 0.25, GRAY16 % 255),  # floats on the 8-bit scale: rounded
])
def test_gray_tiffs_are_scaled_to_8_bits_by_their_value_range(tmp_path, mode, values, expected):
    path = tmp_path / "gray.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode
    image = load_rgb(str(path), expected_hw=(48, 64), sample="sample 4")
    assert image.mode == "RGB"
    rgb = np.asarray(image)  # (48, 64, 3)
    np.testing.assert_array_equal(rgb, np.repeat(expected.astype(np.uint8)[..., None], 3, axis=-1))
    assert rgb.min() < 60 and rgb.max() > 200  # neither saturated to white nor read as black


@pytest.mark.parametrize("values, found", [
    (np.full((8, 8), 70000, dtype=np.int32), r"a mode I image with values in \[70000, 70000\]"),
    (np.full((8, 8), -3, dtype=np.int32), r"a mode I image with values in \[-3, -3\]"),
    (np.full((8, 8), 300.0, dtype=np.float32), r"a mode F image with values in \[300, 300\]"),
    (np.full((8, 8), np.nan, dtype=np.float32), r"a mode F image with NaN or infinite values"),
])
def test_gray_tiffs_outside_every_range_are_refused_naming_file_mode_and_range(tmp_path, values, found):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(DataError, match=r"image file .*odd.tif \(sample 9\): " + found + r"; only .* can be scaled"):
        load_rgb(str(path), expected_hw=(8, 8), sample="sample 9")


def _png_header(path, width: int, height: int) -> None:
    """A PNG whose header says width x height (8-bit RGB) and whose data is a few bytes: opened, never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_20000_by_20000_png_says_its_megapixels_and_the_limit(tmp_path, capsys):
    path = tmp_path / "huge.png"
    _png_header(path, 20000, 20000)
    message = r"huge.png is too large to decode safely: 400 megapixels, over the 179 megapixels PIL decodes"
    with pytest.raises(DataError, match=message):
        load_rgb(str(path))
    with pytest.raises(DataError, match=message):
        read_image_size(str(path))
    # predict checks the image before any checkpoint is read (this one does not exist): exit 2, the same message.
    status = run.cli(["predict", "--config", DEMO, "--checkpoint", str(tmp_path / "none"), "--image", str(path),
                      "--text", "a cat", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and "400 megapixels, over the 179 megapixels" in err and "Traceback" not in err, err

"""`data.video_sources`: Ref-YouTube-VOS, MeViS and ReVOS read from fixtures written here in their own layouts
(palette PNG annotations, `mask_dict.json` COCO RLE), masks checked against the arrays that were written, and the
bad-data battery (each a DataError naming the file, the video and the expression; skipped under on_error=skip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_model.data.errors import DataError
from flmm_model.data.video_sources import VideoSource

FRAMES = ["00000", "00005", "00010"]
HEIGHT, WIDTH = 24, 32


def object_ids(frame: int) -> np.ndarray:
    """Two objects moving right by 4 pixels a frame: id 1 a square, id 2 a bar (0: background)."""
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    ids[4:10, 2 + 4 * frame:8 + 4 * frame] = 1
    ids[14:18, 4 * frame:12 + 4 * frame] = 2
    return ids


def write_frames(folder: Path, video: str) -> None:
    (folder / video).mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(FRAMES):
        pixels = np.full((HEIGHT, WIDTH, 3), 40 * k, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / video / f"{frame}.jpg", quality=95)


def write_ytvos(root: Path, expressions: dict | None = None) -> Path:
    meta = {"videos": {"vid_a": {"expressions": expressions or {
        "0": {"exp": "the square moving right", "obj_id": "1"}, "1": {"exp": "a long bar", "obj_id": "2"}},
        "frames": FRAMES}}}
    (root / "meta_expressions" / "train").mkdir(parents=True)
    (root / "meta_expressions" / "train" / "meta_expressions.json").write_text(json.dumps(meta))
    write_frames(root / "train" / "JPEGImages", "vid_a")
    annotations = root / "train" / "Annotations" / "vid_a"
    annotations.mkdir(parents=True)
    for k, frame in enumerate(FRAMES):
        png = Image.fromarray(object_ids(k), mode="P")
        png.putpalette([0, 0, 0, 236, 95, 103, 249, 145, 87] + [0] * (256 - 3) * 3)
        png.save(annotations / f"{frame}.png")
    return root


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def mevis_records() -> tuple[dict, dict]:
    expressions = {"0": {"exp": "both moving things", "obj_id": [0, 1], "anno_id": [7, 9]},
                   "1": {"exp": "the bar", "obj_id": [1], "anno_id": [9]}}
    # Annotation 7 (the square) is not visible in the last frame: null there.
    masks = {"7": [rle(object_ids(0) == 1), rle(object_ids(1) == 1), None],
             "9": [rle(object_ids(k) == 2) for k in range(3)]}
    return expressions, masks


def write_mevis(root: Path, *, layout: str = "mevis", expressions: dict | None = None, masks: dict | None = None,
                split: str = "train") -> Path:
    default_expressions, default_masks = mevis_records()
    meta = {"videos": {"vid_b": {"expressions": expressions or default_expressions, "frames": FRAMES}}}
    base = root / split if layout == "mevis" else root
    base.mkdir(parents=True, exist_ok=True)
    meta_name = "meta_expressions.json" if layout == "mevis" else f"meta_expressions_{split}_.json"
    (base / meta_name).write_text(json.dumps(meta))
    (base / "mask_dict.json").write_text(json.dumps(masks if masks is not None else default_masks))
    write_frames(base / "JPEGImages", "vid_b")
    return root


def test_ref_youtube_vos_masks_are_the_painted_object_ids(tmp_path):
    source = VideoSource("ref_youtube_vos", str(write_ytvos(tmp_path)), "train")
    assert [(e.video, e.expression_id, e.text, e.objects) for e in source.expressions] == [
        ("vid_a", "0", "the square moving right", (1,)), ("vid_a", "1", "a long bar", (2,))]
    for expression, object_id in zip(source.expressions, (1, 2), strict=True):
        masks = source.read_masks(expression)
        expected = torch.from_numpy(np.stack([object_ids(k) == object_id for k in range(3)]))
        assert masks.dtype == torch.bool and torch.equal(masks, expected)
    frames = source.read_frames(source.expressions[0], [0, 2])
    assert [frame.size for frame in frames] == [(WIDTH, HEIGHT)] * 2 and frames[1].mode == "RGB"
    assert torch.equal(source.read_masks(source.expressions[1], [2]), torch.from_numpy(object_ids(2) == 2)[None])


@pytest.mark.parametrize("layout", ["mevis", "revos"])
def test_mevis_and_revos_masks_are_the_union_of_their_rle_annotations(tmp_path, layout):
    source = VideoSource(layout, str(write_mevis(tmp_path, layout=layout)), "train")
    both, bar = source.expressions
    assert both.objects == (7, 9) and bar.objects == (9,) and both.frames == tuple(FRAMES)
    expected_both = np.stack([(object_ids(0) > 0), (object_ids(1) > 0), object_ids(2) == 2])  # 7 is null in frame 2
    assert torch.equal(source.read_masks(both), torch.from_numpy(expected_both))
    assert torch.equal(source.read_masks(bar), torch.from_numpy(np.stack([object_ids(k) == 2 for k in range(3)])))


def test_a_split_without_ground_truth_reads_frames_and_no_masks(tmp_path):
    write_mevis(tmp_path, split="valid")
    (tmp_path / "valid" / "mask_dict.json").unlink()
    source = VideoSource("mevis", str(tmp_path), "valid")
    assert not source.has_masks and source.read_masks(source.expressions[0]) is None
    assert len(source.read_frames(source.expressions[0])) == 3


@pytest.mark.parametrize("entry, message", [
    ({"exp": None, "obj_id": "1"}, r"'exp' must be a non-empty text, found NoneType None"),
    ({"exp": "   ", "obj_id": "1"}, r"'exp' must be a non-empty text"),
    ({"exp": "the square", "obj_id": 1}, r"'obj_id' must be an object id in 1..255 written as a string, found int"),
    ({"exp": "the square", "obj_id": "300"}, r"'obj_id' must be an object id in 1..255"),
    ("the square", r"expected an expression record, found str"),
])
def test_bad_ref_youtube_vos_expressions_name_the_file_video_and_expression(tmp_path, entry, message):
    root = write_ytvos(tmp_path, expressions={"0": {"exp": "the square", "obj_id": "1"}, "3": entry})
    with pytest.raises(DataError, match=r"meta_expressions\.json: video 'vid_a' expression '3': " + message):
        VideoSource("ref_youtube_vos", str(root), "train")
    source = VideoSource("ref_youtube_vos", str(root), "train", on_error="skip")
    assert [e.expression_id for e in source.expressions] == ["0"] and source.skips.count == 1


def test_bad_mevis_records_and_masks_are_refused(tmp_path):
    bad = {"0": {"exp": "the bar", "anno_id": []}, "1": {"exp": "the bar", "anno_id": [True]},
           "2": {"exp": "the bar", "anno_id": [9]}}
    root = write_mevis(tmp_path / "a", expressions=bad)
    with pytest.raises(DataError, match=r"expression '0': 'anno_id' must be a non-empty list of annotation ids"):
        VideoSource("mevis", str(root), "train")
    source = VideoSource("mevis", str(root), "train", on_error="skip")
    assert [e.expression_id for e in source.expressions] == ["2"] and source.skips.count == 2

    _, masks = mevis_records()
    short = dict(masks, **{"9": masks["9"][:2]})  # one mask too few for the video's 3 frames
    source = VideoSource("mevis", str(write_mevis(tmp_path / "b", masks=short)), "train")
    with pytest.raises(DataError, match=r"annotation 9 must list one mask \(or null\) per frame of the video \(3\), "
                                        r"found 2 entries"):
        source.read_masks(source.expressions[1])
    wrong_size = dict(masks, **{"9": [rle(np.ones((HEIGHT, WIDTH + 1), bool))] * 3})
    source = VideoSource("mevis", str(write_mevis(tmp_path / "c", masks=wrong_size)), "train")
    with pytest.raises(DataError, match=r"vid_b.*frame '00000' annotation 9"):
        source.read_masks(source.expressions[1])


def test_bad_ref_youtube_vos_files_are_refused(tmp_path):
    root = write_ytvos(tmp_path / "a")
    annotation = root / "train" / "Annotations" / "vid_a" / "00005.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(annotation)  # RGB, not palette
    source = VideoSource("ref_youtube_vos", str(root), "train")
    with pytest.raises(DataError, match=r"frame '00005': .*00005\.png is a RGB image; Ref-YouTube-VOS annotations are "
                                        r"palette \(P\) PNGs"):
        source.read_masks(source.expressions[0])
    Image.fromarray(np.zeros((HEIGHT + 2, WIDTH), np.uint8), mode="P").save(annotation)
    with pytest.raises(DataError, match=r"annotation .*00005\.png is 26x32 \(H x W\), its frame 24x32"):
        source.read_masks(source.expressions[0])
    annotation.unlink()
    with pytest.raises(DataError, match=r"frame '00005': missing annotation file"):
        source.read_masks(source.expressions[0])
    (root / "train" / "JPEGImages" / "vid_a" / "00010.jpg").unlink()
    with pytest.raises(DataError, match=r"missing image file .*00010\.jpg \(ref_youtube_vos/train video 'vid_a'"):
        source.read_frames(source.expressions[0])


def test_a_missing_meta_file_or_bad_video_record_is_named(tmp_path):
    with pytest.raises(DataError, match=r"missing annotation file .*meta_expressions/valid/meta_expressions\.json"):
        VideoSource("ref_youtube_vos", str(tmp_path), "valid")
    root = write_ytvos(tmp_path / "a")
    meta_path = root / "meta_expressions" / "train" / "meta_expressions.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["vid_z"] = {"expressions": {"0": {"exp": "x", "obj_id": "1"}}, "frames": ["00000", "00000"]}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"video 'vid_z': 'frames' names a frame twice"):
        VideoSource("ref_youtube_vos", str(root), "train")
    assert len(VideoSource("ref_youtube_vos", str(root), "train", on_error="skip").expressions) == 2
    with pytest.raises(ValueError, match=r"kind must be one of \('ref_youtube_vos', 'mevis', 'revos'\)"):
        VideoSource("davis", str(root), "train")

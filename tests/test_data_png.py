"""PNG from files written here in the real formats: narratives JSON, COCO panoptic JSON, R + 256 G + 256^2 B PNGs."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_model.data import Collator, DataError, PngDataset

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1}, {"id": 17, "name": "cat", "isthing": 1},
    {"id": 187, "name": "sky-other-merged", "isthing": 0}, {"id": 193, "name": "grass-merged", "isthing": 0},
    {"id": 199, "name": "wall-other-merged", "isthing": 0},
]
# Segment ids chosen to use all three PNG channels: 3226956 = 76 + 256 * 61 + 256^2 * 49.
PERSON_A, PERSON_B, SKY, GRASS, CAT, WALL = 3226956, 65793, 1000, 2000, 5000, 6000


def _paint(height: int, width: int, boxes: dict[int, tuple[float, float, float, float]]) -> np.ndarray:
    """A segment id map: each id fills its (y0, x0, y1, x1) box in fractions of the image; 0 = unlabeled."""
    ids = np.zeros((height, width), dtype=np.int64)
    for segment_id, (y0, x0, y1, x1) in boxes.items():
        ids[int(y0 * height): int(y1 * height), int(x0 * width): int(x1 * width)] = segment_id
    return ids


def _encode_ids(ids: np.ndarray) -> Image.Image:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], axis=-1).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(rgb)


def _segments(*pieces) -> list[dict]:
    return [{"utterance": text, "segment_ids": [str(i) for i in ids], "plural": plural, "noun": bool(ids)}
            for text, ids, plural in pieces]


def write_png(root, photos, *, split: str = "val", narratives=None, extra_segments_info=(), png_sizes=None) -> dict:
    """PNG layout under `root`: <split>2017 JPEGs, annotations/{png_coco,panoptic}_<split>2017.json + PNG folder."""
    ann_dir = root / "annotations"
    os.makedirs(root / f"{split}2017", exist_ok=True)
    os.makedirs(ann_dir / f"panoptic_{split}2017", exist_ok=True)
    scenes = {
        139: (photos[0], {SKY: (0, 0, 0.3, 1), PERSON_A: (0.3, 0.1, 0.8, 0.3), PERSON_B: (0.35, 0.6, 0.9, 0.75),
                          GRASS: (0.8, 0, 1, 1)}),
        285: (photos[-1], {WALL: (0, 0, 0.5, 1), CAT: (0.4, 0.2, 0.9, 0.7)}),
    }
    images, annotations, painted = [], [], {}
    for image_id, (photo, boxes) in scenes.items():
        file_name = f"{image_id:012d}.jpg"
        photo.save(root / f"{split}2017" / file_name, quality=95)
        height, width = (png_sizes or {}).get(image_id, (photo.height, photo.width))
        ids = _paint(height, width, boxes)
        painted[image_id] = ids
        _encode_ids(ids).save(ann_dir / f"panoptic_{split}2017" / f"{image_id:012d}.png")
        category = {PERSON_A: 1, PERSON_B: 1, SKY: 187, GRASS: 193, CAT: 17, WALL: 199}
        infos = [{"id": i, "category_id": category[i], "iscrowd": 0, "bbox": [0, 0, 1, 1],
                  "area": int((ids == i).sum())} for i in boxes]
        infos += [extra["info"] for extra in extra_segments_info if extra["image_id"] == image_id]
        images.append({"id": image_id, "file_name": file_name, "height": photo.height, "width": photo.width})
        annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png", "segments_info": infos})
    with open(ann_dir / f"panoptic_{split}2017.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, handle)

    if narratives is None:
        narratives = [
            {"image_id": "139", "annotator_id": 7,
             "caption": "In this picture we can see two persons standing on the grass, and in the background we can "
                        "see the sky.",
             "segments": _segments(("In this picture we can see", [], False),
                                   ("two persons", [PERSON_A, PERSON_B], True), ("standing on", [], False),
                                   ("the grass", [GRASS], False),
                                   (", and in the background we can see", [], False), ("the sky", [SKY], False),
                                   (".", [], False))},
            {"image_id": "139", "caption": "A blurry picture.",
             "segments": _segments(("A blurry picture.", [], False))},
            {"image_id": "285",  # no caption: the utterances are joined with spaces
             "segments": _segments(("a cat", [CAT], False), ("in front of", [], False), ("a wall", [WALL], False))},
            {"image_id": "285", "caption": "Words that do not match the utterances.",
             "segments": _segments(("the wall", [WALL], False), ("behind", [], False), ("the cat", [CAT], False))},
        ]
    with open(ann_dir / f"png_coco_{split}2017.json", "w") as handle:
        json.dump(narratives, handle)
    return painted


@pytest.fixture(scope="module")
def png_root(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("png")
    painted = write_png(root, photos)
    return root, painted


def _dataset(root, tokenizer, image_processor, **kwargs) -> PngDataset:
    return PngDataset(str(root), "val", tokenizer=tokenizer, image_processor=image_processor, **kwargs)


def test_png_masks_equal_painted_ids_and_tokens_name_phrases(png_root, tokenizer, image_processor):
    root, painted = png_root
    dataset = _dataset(root, tokenizer, image_processor)
    assert len(dataset) == 3 and dataset.num_ungrounded == 1
    image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for index in range(len(dataset)):
        item = dataset[index]
        meta = item["meta"]
        ids = painted[meta["image_id"]]
        assert item["gt_masks"].dtype == torch.bool and item["gt_masks"].shape == (len(item["phrases"]), *ids.shape)
        for k, segment_ids in enumerate(meta["segment_ids"]):
            np.testing.assert_array_equal(item["gt_masks"][k].numpy(), np.isin(ids, segment_ids))
        assert int((item["input_ids"] == image_pad_id).sum()) == 1
        for k, phrase in enumerate(item["phrases"]):
            assert tokenizer.decode(item["input_ids"][item["mask_ids"] == k].tolist()).strip() == phrase
        assert item["image"].shape == (3, *ids.shape)
        assert {"image_id", "file_name", "dataset", "isthing", "plural"} <= set(meta)


def test_png_plural_union_flags_and_narrative_text(png_root, tokenizer, image_processor):
    root, painted = png_root
    dataset = _dataset(root, tokenizer, image_processor)
    first = dataset[0]
    assert first["phrases"] == ["two persons", "the grass", "the sky"]
    assert first["meta"]["plural"] == [True, False, False]
    assert first["meta"]["isthing"] == [True, False, False]  # plural counts as thing (F-LMM); grass / sky are stuff
    union = (painted[139] == PERSON_A) | (painted[139] == PERSON_B)
    np.testing.assert_array_equal(first["gt_masks"][0].numpy(), union)
    caption = ("In this picture we can see two persons standing on the grass, and in the background we can see "
               "the sky.")
    assert f"assistant\n{caption}<|im_end|>" in tokenizer.decode(first["input_ids"].tolist())

    assert dataset[1]["phrases"] == ["a cat", "a wall"]
    assert dataset[1]["meta"]["isthing"] == [True, False] and dataset[1]["meta"]["narrative_index"] == 2
    assert "assistant\na cat in front of a wall<|im_end|>" in tokenizer.decode(dataset[1]["input_ids"].tolist())
    # A caption the utterances cannot be found in falls back to the utterances joined by spaces.
    assert "assistant\nthe wall behind the cat<|im_end|>" in tokenizer.decode(dataset[2]["input_ids"].tolist())


def test_png_drops_ungrounded_narratives_with_a_logged_count(png_root, tokenizer, image_processor, caplog):
    root, _ = png_root
    with caplog.at_level(logging.INFO, logger="flmm_model.data.png"):
        _dataset(root, tokenizer, image_processor)
    assert "dropped 1 of 4 narratives without any grounded segment" in caplog.text


def test_png_collate_mixed_sizes(png_root, tokenizer, image_processor):
    root, _ = png_root
    dataset = _dataset(root, tokenizer, image_processor)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape == (2, 3)
    assert [masks.shape[0] for masks in batch["gt_masks"]] == [3, 2]


def test_png_segment_missing_from_png_raises_or_skips(tmp_path, photos, tokenizer, image_processor):
    ghost = {"image_id": 285, "info": {"id": 7777, "category_id": 17, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}}
    narratives = [{"image_id": "285", "caption": "a cat and a dog",
                   "segments": _segments(("a cat", [CAT], False), ("and", [], False), ("a dog", [7777], False))}]
    write_png(tmp_path, photos, narratives=narratives, extra_segments_info=[ghost])
    dataset = _dataset(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=r"segment id 7777 .* absent from the panoptic PNG .*000000000285.png"):
        dataset[0]
    skipping = _dataset(tmp_path, tokenizer, image_processor, on_error="skip")
    assert skipping[0] is None and skipping.skipped == 1


def test_png_size_mismatch_raises(tmp_path, photos, tokenizer, image_processor):
    write_png(tmp_path, photos, png_sizes={285: (photos[-1].height - 2, photos[-1].width)})
    dataset = _dataset(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=r"panoptic PNG .*000000000285.png is \d+x\d+ .* but .*panoptic_val2017.json"):
        dataset[1]


def test_png_segment_id_not_in_json_raises_at_load(tmp_path, photos, tokenizer, image_processor):
    narratives = [{"image_id": "285", "segments": _segments(("a cat", [CAT], False), ("a bird", [4444], False))}]
    write_png(tmp_path, photos, narratives=narratives)
    with pytest.raises(DataError, match=r"narrative 0 \(image_id 285\): segment ids \[4444\] .* segments_info"):
        _dataset(tmp_path, tokenizer, image_processor)


def test_png_empty_split_and_missing_image_raise(tmp_path, photos, tokenizer, image_processor):
    write_png(tmp_path, photos, narratives=[{"image_id": "139", "segments": _segments(("nothing", [], False))}])
    with pytest.raises(DataError, match=r"png_coco_val2017.json: split 'val' has no usable narrative"):
        _dataset(tmp_path, tokenizer, image_processor, on_error="skip")
    write_png(tmp_path, photos)
    os.remove(tmp_path / "val2017" / "000000000139.jpg")
    with pytest.raises(DataError, match=r"missing image file .*000000000139.jpg .*narrative 0"):
        _dataset(tmp_path, tokenizer, image_processor)[0]

"""RefCOCO family from REFER files written here in the real formats (pickle + COCO json + COCO_train2014 JPEGs)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from flmm_model.data import Collator, DataError, RefCocoDataset

IMAGE_IDS = (1, 2, 3)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with background), written by hand."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0


def _sentences(sent_ids: list[int], texts: list[str]) -> list[dict]:
    return [{"sent_id": i, "raw": text.capitalize(), "sent": text, "tokens": text.split()}
            for i, text in zip(sent_ids, texts, strict=True)]


def write_refer(root, photos, *, name: str = "refcoco", split_by: str = "unc", extra_refs=(), heights=None) -> dict:
    """REFER layout under `root`: train2014 JPEGs, <name>/instances.json, <name>/refs(<split_by>).p."""
    os.makedirs(root / "train2014", exist_ok=True)
    os.makedirs(root / name, exist_ok=True)
    images = []
    for image_id, photo in zip(IMAGE_IDS, photos[:3], strict=True):
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        photo.save(root / "train2014" / file_name, quality=95)
        height = (heights or {}).get(image_id, photo.height)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": photo.width})
    size = {image["id"]: (image["height"], image["width"]) for image in images}

    h1, w1 = size[1]
    h2, w2 = size[2]
    h3, w3 = size[3]
    rect = np.zeros((h2, w2), dtype=bool)
    rect[h2 // 4: h2 // 2, w2 // 3: w2 - 5] = True
    annotations = [
        # Two polygons (a triangle and a quadrilateral) for one object, plus a degenerate 2-point polygon.
        {"id": 11, "image_id": 1, "category_id": 47, "iscrowd": 0, "segmentation": [
            [10.0, 10.0, 0.4 * w1, 20.0, 30.0, 0.5 * h1],
            [0.6 * w1, 0.6 * h1, 0.9 * w1, 0.62 * h1, 0.85 * w1, 0.95 * h1, 0.62 * w1, 0.9 * h1],
            [5.0, 5.0, 8.0, 9.0]]},
        {"id": 12, "image_id": 1, "category_id": 47, "iscrowd": 0,
         "segmentation": _compressed_rle(_ellipse(h1, w1, h1 / 2, w1 / 2, h1 / 5, w1 / 4))},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": _uncompressed_rle(rect)},
        {"id": 31, "image_id": 3, "category_id": 17, "iscrowd": 0,
         "segmentation": [[0.1 * w3, 0.2 * h3, 0.5 * w3, 0.1 * h3, 0.45 * w3, 0.8 * h3, 0.15 * w3, 0.7 * h3]]},
        {"id": 32, "image_id": 3, "category_id": 17, "iscrowd": 0,
         "segmentation": _compressed_rle(_ellipse(h3, w3, 0.7 * h3, 0.7 * w3, 0.2 * h3, 0.1 * w3))},
        {"id": 33, "image_id": 3, "category_id": 17, "iscrowd": 0, "segmentation": [[1, 1, 40, 1, 40, 30, 1, 30]]},
    ]
    with open(root / name / "instances.json", "w") as handle:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]},
                  handle)
    refs = [
        {"ref_id": 101, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 47,
         "sentences": _sentences([1001, 1002], ["the cup on the left", "left mug"])},
        {"ref_id": 102, "ann_id": 12, "image_id": 1, "split": "train", "category_id": 47,
         "sentences": _sentences([1003, 1004, 1005], ["saucer", "the plate under it", "white round plate"])},
        {"ref_id": 201, "ann_id": 21, "image_id": 2, "split": "val", "category_id": 1,
         "sentences": _sentences([2001, 2002], ["the astronaut", "man in a white suit"])},
        {"ref_id": 301, "ann_id": 31, "image_id": 3, "split": "val", "category_id": 17,
         "sentences": _sentences([3001, 3002], ["the cat", "orange tabby"])},
        {"ref_id": 302, "ann_id": 32, "image_id": 3, "split": "val", "category_id": 17,
         "sentences": _sentences([3003, 3004], ["the cat's right side", "part near the edge"])},
        {"ref_id": 303, "ann_id": 33, "image_id": 3, "split": "testA", "category_id": 17,
         "sentences": _sentences([3005], ["the corner"])},
        *extra_refs,
    ]
    with open(root / name / f"refs({split_by}).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    return {"instances": str(root / name / "instances.json"), "refs": refs}


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("refer")
    write_refer(root, photos)
    return root


def _dataset(root, tokenizer, image_processor, **kwargs) -> RefCocoDataset:
    kwargs = {"split": "val", "train": False, **kwargs}
    return RefCocoDataset(str(root), "refcoco", kwargs.pop("split"), tokenizer=tokenizer,
                          image_processor=image_processor, **kwargs)


def _assert_tokens_name_phrases(item, tokenizer):
    image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((item["input_ids"] == image_pad_id).sum()) == 1
    for k, phrase in enumerate(item["phrases"]):
        assert tokenizer.decode(item["input_ids"][item["mask_ids"] == k].tolist()).strip() == phrase
    assert item["mask_ids"].max().item() == len(item["phrases"]) - 1


@pytest.mark.parametrize("split, protocol, train", [
    ("val", "flmm", False), ("val", "per_sentence", False), ("train", "flmm", True), ("testA", "flmm", False),
])
def test_refcoco_masks_equal_pycocotools_and_tokens_name_phrases(refer_root, tokenizer, image_processor, photos,
                                                                  split, protocol, train):
    coco = COCO(str(refer_root / "refcoco" / "instances.json"))
    dataset = _dataset(refer_root, tokenizer, image_processor, split=split, protocol=protocol, train=train)
    for index in range(len(dataset)):
        item = dataset[index]
        meta = item["meta"]
        height, width = coco.imgs[meta["image_id"]]["height"], coco.imgs[meta["image_id"]]["width"]
        num_objects = len(item["phrases"])
        assert item["gt_masks"].dtype == torch.bool and item["gt_masks"].shape == (num_objects, height, width)
        for k, ann_id in enumerate(meta["ann_ids"]):
            reference = coco.annToMask(coco.anns[ann_id]).astype(bool)
            assert reference.any()
            np.testing.assert_array_equal(item["gt_masks"][k].numpy(), reference)
        _assert_tokens_name_phrases(item, tokenizer)
        # The SAM-side image is the decoded JPEG itself, at its original size.
        with Image.open(refer_root / "train2014" / meta["file_name"]) as jpeg:
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), np.asarray(jpeg.convert("RGB")))
        t, h, w = item["image_grid_thw"][0].tolist()
        assert item["pixel_values"].shape == (t * h * w, 1176) and item["pixel_values"].dtype == torch.float32
        assert {"image_id", "file_name", "dataset", "ref_ids", "sent_ids"} <= set(meta)
        assert len(meta["ref_ids"]) == len(meta["sent_ids"]) == num_objects


def test_refcoco_flmm_eval_takes_first_sentence_of_every_ref_of_an_image(refer_root, tokenizer, image_processor):
    dataset = _dataset(refer_root, tokenizer, image_processor)
    assert len(dataset) == 2
    items = [dataset[0], dataset[1]]
    assert [item["meta"]["image_id"] for item in items] == [2, 3]
    assert [item["phrases"] for item in items] == [["the astronaut"], ["the cat", "the cat's right side"]]
    assert items[1]["meta"]["ref_ids"] == [301, 302] and items[1]["meta"]["sent_ids"] == [3001, 3003]
    answer = tokenizer.decode(items[1]["input_ids"].tolist())
    assert "assistant\nthe cat. the cat's right side.<|im_end|>" in answer


def test_refcoco_per_sentence_gives_one_sample_per_sentence(refer_root, tokenizer, image_processor):
    dataset = _dataset(refer_root, tokenizer, image_processor, protocol="per_sentence")
    assert len(dataset) == 6
    items = [dataset[i] for i in range(len(dataset))]
    assert all(len(item["phrases"]) == 1 for item in items)
    assert [item["meta"]["sent_ids"][0] for item in items] == [2001, 2002, 3001, 3002, 3003, 3004]
    assert items[3]["phrases"] == ["orange tabby"]


def test_refcoco_training_sentence_draw_is_seeded_per_epoch(refer_root, tokenizer, image_processor):
    def draws(seed: int, epochs: range) -> list[list[int]]:
        dataset = _dataset(refer_root, tokenizer, image_processor, split="train", train=True, seed=seed)
        result = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            result.append(dataset[0]["meta"]["sent_ids"])
        return result

    first = draws(0, range(8))
    assert first == draws(0, range(8))  # same (seed, epoch, index) -> same sentences
    assert len({tuple(ids) for ids in first}) > 1  # sentences change across epochs
    assert all(ids[0] in (1001, 1002) and ids[1] in (1003, 1004, 1005) for ids in first)
    assert first != draws(1, range(8))


def test_refcoco_split_by_defaults_and_google(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos, name="refcocog", split_by="umd")
    write_refer(tmp_path, photos, name="refcocog", split_by="google")
    umd = RefCocoDataset(str(tmp_path), "refcocog", "val", tokenizer=tokenizer, image_processor=image_processor,
                         train=False)
    google = RefCocoDataset(str(tmp_path), "refcocog", "val", tokenizer=tokenizer, image_processor=image_processor,
                            train=False, split_by="google")
    assert umd.refs_path.endswith("refs(umd).p") and google.refs_path.endswith("refs(google).p")
    with pytest.raises(DataError, match=r"missing refs file .*refs\(unc\).p"):
        RefCocoDataset(str(tmp_path), "refcocog", "val", tokenizer=tokenizer, image_processor=image_processor,
                       train=False, split_by="unc")


def test_refcoco_missing_image_raises_or_skips(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)
    os.remove(tmp_path / "train2014" / "COCO_train2014_000000000003.jpg")
    dataset = _dataset(tmp_path, tokenizer, image_processor)
    with pytest.raises(DataError, match=r"missing image file .*COCO_train2014_000000000003.jpg .*image_id 3"):
        dataset[1]
    skipping = _dataset(tmp_path, tokenizer, image_processor, on_error="skip")
    assert skipping[1] is None and skipping[0] is not None
    assert skipping.skipped == 1 and "COCO_train2014_000000000003.jpg" in skipping.skip_report()
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([skipping[0], skipping[1]])
    assert batch["num_skipped"] == 1 and batch["input_ids"].shape[0] == 1


def test_refcoco_unreadable_image_raises(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos)
    (tmp_path / "train2014" / "COCO_train2014_000000000002.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"cannot read image file .*COCO_train2014_000000000002.jpg .*sample 0"):
        _dataset(tmp_path, tokenizer, image_processor)[0]


def test_refcoco_image_size_differing_from_instances_raises(tmp_path, photos, tokenizer, image_processor):
    write_refer(tmp_path, photos, heights={2: photos[1].height + 4})
    with pytest.raises(DataError, match=r"COCO_train2014_000000000002.jpg .* but its annotation says"):
        _dataset(tmp_path, tokenizer, image_processor)[0]


def test_refcoco_ref_with_missing_annotation_raises_or_is_skipped(tmp_path, photos, tokenizer, image_processor):
    orphan = {"ref_id": 999, "ann_id": 4242, "image_id": 2, "split": "val", "category_id": 1,
              "sentences": _sentences([9991], ["ghost"])}
    write_refer(tmp_path, photos, extra_refs=[orphan])
    with pytest.raises(DataError, match=r"refs\(unc\).p: ref 999 .*annotation 4242 is missing from .*instances.json"):
        _dataset(tmp_path, tokenizer, image_processor)
    dataset = _dataset(tmp_path, tokenizer, image_processor, on_error="skip")
    assert dataset.skipped == 1 and len(dataset) == 2
    assert all("ghost" not in dataset[i]["phrases"] for i in range(len(dataset)))


def test_refcoco_empty_split_raises_naming_the_split(refer_root, tokenizer, image_processor):
    with pytest.raises(DataError, match=r"split 'testB' is empty .*'testA', 'train', 'val'"):
        _dataset(refer_root, tokenizer, image_processor, split="testB", on_error="skip")


def test_refcoco_too_long_sample_is_bad_data(refer_root, tokenizer, image_processor):
    dataset = _dataset(refer_root, tokenizer, image_processor, max_length=20)
    with pytest.raises(DataError, match=r"sample 0 .*tokens .*max_length is 20"):
        dataset[0]
    skipping = _dataset(refer_root, tokenizer, image_processor, max_length=20, on_error="skip")
    assert skipping[0] is None and skipping.skipped == 1


def test_decode_segmentation_rejects_malformed_records():
    from flmm_model.data.refcoco import decode_segmentation

    rle = _compressed_rle(np.ones((4, 5), dtype=bool))
    with pytest.raises(DataError, match=r"ann 7: RLE size \[4, 5\] differs from the image's \[4, 6\]"):
        decode_segmentation(rle, height=4, width=6, where="ann 7")
    with pytest.raises(DataError, match="counts sum to 20, expected 24"):
        decode_segmentation(_uncompressed_rle(np.ones((4, 5), dtype=bool)) | {"size": [4, 6]}, height=4, width=6,
                            where="ann 7")
    with pytest.raises(DataError, match="odd number of coordinates"):
        decode_segmentation([[1, 2, 3, 4, 5, 6, 7]], height=4, width=6, where="ann 7")
    with pytest.raises(DataError, match="unrecognised segmentation"):
        decode_segmentation("polygon", height=4, width=6, where="ann 7")
    assert not decode_segmentation([[1, 1, 3, 3]], height=4, width=6, where="ann 7").any()  # 2 points: no area

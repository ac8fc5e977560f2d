"""RefCOCO family from REFER files written here in the real formats (pickle + COCO json + COCO_train2014 JPEGs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from dataset_files import _compressed_rle, _sentences, _uncompressed_rle, write_refer
from PIL import Image
from pycocotools.coco import COCO

from flmm_model.data import Collator, DataError, RefCocoDataset


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


@pytest.mark.parametrize("sentence_draw", ["once", "per_epoch"])
def test_refcoco_training_sentence_draw_is_seeded_once_or_per_epoch(refer_root, tokenizer, image_processor,
                                                                    sentence_draw):
    def draws(seed: int, epochs: range) -> list[tuple[int, ...]]:
        dataset = _dataset(refer_root, tokenizer, image_processor, split="train", train=True, seed=seed,
                           sentence_draw=sentence_draw)
        result = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            result.append(tuple(dataset[0]["meta"]["sent_ids"]))
        return result

    first = draws(0, range(8))
    assert first == draws(0, range(8))  # same (seed, epoch, index) -> same sentences
    assert all(ids[0] in (1001, 1002) and ids[1] in (1003, 1004, 1005) for ids in first)
    if sentence_draw == "once":  # F-LMM: one draw per ref when the dataset is built, kept for every epoch
        assert len(set(first)) == 1
        assert len({draws(seed, range(1))[0] for seed in range(8)}) > 1  # but the seed decides it
    else:
        assert len(set(first)) > 1  # sentences change across epochs
        assert first != draws(1, range(8))


@pytest.mark.parametrize("sentence, expected", [
    ("raw_lower", "the cup on the left"), ("sent", "the cup on the left"), ("raw", "The cup on the left"),
])
def test_refcoco_sentence_field_choice(refer_root, tokenizer, image_processor, sentence, expected):
    # The fixture's `raw` is the capitalised `sent`; F-LMM reads raw.lower().
    dataset = _dataset(refer_root, tokenizer, image_processor, split="train", sentence=sentence)
    assert dataset[0]["phrases"][0] == expected


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
    assert skipping.skips.count == 1 and "COCO_train2014_000000000003.jpg" in skipping.skips.report()
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
    assert dataset.skips.count == 1 and len(dataset) == 2
    assert all("ghost" not in dataset[i]["phrases"] for i in range(len(dataset)))


def test_refcoco_empty_split_raises_naming_the_split(refer_root, tokenizer, image_processor):
    with pytest.raises(DataError, match=r"split 'testB' is empty .*'testA', 'train', 'val'"):
        _dataset(refer_root, tokenizer, image_processor, split="testB", on_error="skip")


def test_refcoco_too_long_sample_is_bad_data(refer_root, tokenizer, image_processor):
    dataset = _dataset(refer_root, tokenizer, image_processor, max_length=20)
    with pytest.raises(DataError, match=r"sample 0 .*tokens .*max_length is 20"):
        dataset[0]
    skipping = _dataset(refer_root, tokenizer, image_processor, max_length=20, on_error="skip")
    assert skipping[0] is None and skipping.skips.count == 1


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

"""PNG from files written here in the real formats: narratives JSON, COCO panoptic JSON, R + 256 G + 256^2 B PNGs."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from dataset_files import CAT, PERSON_A, PERSON_B, _segments, write_png

from flmm_model.data import Collator, DataError, PngDataset


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
    assert skipping[0] is None and skipping.skips.count == 1


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

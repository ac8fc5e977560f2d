"""Batching items with different image sizes and text lengths, both padding sides, skipped items."""

from __future__ import annotations

import pickle

import pytest
import torch

from flmm_model.data import Collator, SyntheticDataset, collate


@pytest.fixture(scope="module")
def items(tokenizer, image_processor) -> list[dict]:
    dataset = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=3, seed=0,
                               image_size=(96, 200))
    return [dataset[i] for i in range(3)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pads_tokens_and_concatenates_images(items, tokenizer, padding_side):
    assert len({item["input_ids"].numel() for item in items}) > 1  # different lengths
    assert len({tuple(item["image"].shape) for item in items}) > 1  # different image sizes
    pad = tokenizer.pad_token_id
    batch = collate(items, pad_token_id=pad, padding_side=padding_side)
    lengths = [item["input_ids"].numel() for item in items]
    batch_size, max_length = len(items), max(lengths)
    for key in ("input_ids", "attention_mask", "mask_ids"):
        assert batch[key].shape == (batch_size, max_length) and batch[key].dtype == torch.long
    for row, (item, length) in enumerate(zip(items, lengths, strict=True)):
        real = slice(0, length) if padding_side == "right" else slice(max_length - length, max_length)
        padded = slice(length, max_length) if padding_side == "right" else slice(0, max_length - length)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert torch.equal(batch["mask_ids"][row, real], item["mask_ids"])
        assert (batch["attention_mask"][row, real] == 1).all() and (batch["attention_mask"][row, padded] == 0).all()
        assert (batch["input_ids"][row, padded] == pad).all() and (batch["mask_ids"][row, padded] == -1).all()
    assert torch.equal(batch["pixel_values"], torch.cat([item["pixel_values"] for item in items]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([item["image_grid_thw"] for item in items]))
    assert batch["image_grid_thw"].shape == (batch_size, 3)
    assert int(batch["image_grid_thw"].prod(dim=1).sum()) == batch["pixel_values"].shape[0]
    assert [image.shape for image in batch["images"]] == [item["image"].shape for item in items]
    assert [masks.shape for masks in batch["gt_masks"]] == [item["gt_masks"].shape for item in items]
    assert batch["phrases"] == [item["phrases"] for item in items]
    assert batch["metas"] == [item["meta"] for item in items]
    assert batch["num_skipped"] == 0


def test_collator_drops_skipped_items_and_pickles(items, tokenizer):
    collator = pickle.loads(pickle.dumps(Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")))
    batch = collator([None, items[0], None, items[1]])
    assert batch["num_skipped"] == 2 and batch["input_ids"].shape[0] == 2
    assert batch["metas"] == [items[0]["meta"], items[1]["meta"]]
    empty = collator([None])
    assert empty["num_skipped"] == 1 and empty["input_ids"].shape == (0, 0) and empty["image_grid_thw"].shape == (0, 3)


def test_collator_in_a_dataloader(tokenizer, image_processor):
    dataset = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=3, image_size=(64, 96))
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator)
    assert [batch["input_ids"].shape[0] for batch in loader] == [2, 1]


def test_collate_rejects_a_bad_padding_side(tokenizer):
    with pytest.raises(ValueError, match="padding_side"):
        Collator(pad_token_id=tokenizer.pad_token_id, padding_side="middle")


class _EpochEcho(torch.utils.data.Dataset):
    """Items that say which epoch the copy that built them was set to."""

    def __init__(self) -> None:
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.epoch, index


def test_persistent_workers_see_every_epoch():
    """Persistent workers keep their dataset copy; the epoch travels with the indices (`set_epoch` in the main
    process alone would leave the workers drawing epoch 0's random choices forever)."""
    from flmm_model.data.loader import EpochIndexed, EpochSampler
    from flmm_model.distributed import ShardedSampler

    dataset = _EpochEcho()
    sampler = ShardedSampler(len(dataset), shuffle=False, pad=False)
    loader = torch.utils.data.DataLoader(EpochIndexed(dataset), sampler=EpochSampler(sampler), batch_size=2,
                                         num_workers=1, persistent_workers=True, collate_fn=list)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert [item for batch in loader for item in batch] == [(epoch, index) for index in range(4)]

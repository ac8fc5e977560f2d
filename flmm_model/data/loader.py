"""Batching items of different image sizes and text lengths (see `flmm_model.data.item` for the item dict), and the
DataLoader every training, validation and evaluation loop uses.

The collated batch is model-agnostic (compact ids, one placeholder per image). A model's host side comes in as a
plain callable, `prepare` (a `modeling.batch.BatchPreparer`, or `run.py cache-sam`'s SAM inputs), run here in the
loader's workers; this module imports nothing of the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PADDING_SIDES = ("right", "left")


def collate(items: list[dict[str, Any] | None], *, pad_token_id: int, padding_side: str = "right",
            prepare: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Pad the token tensors, concatenate the image patches in sample order, keep the rest as per-sample lists.

    `None` items (samples a dataset skipped as bad data) are dropped and counted in `num_skipped`. If every item was
    skipped the batch has B = 0 (check `batch["input_ids"].shape[0]` before running the model).

    Args:
        items: item dicts or None.
        pad_token_id: id written into padded `input_ids` positions (e.g. `tokenizer.pad_token_id`).
        padding_side: "right" or "left" (left for batched generation).
        prepare: run on the collated batch (B > 0) and stored as `prepared`: a model's `BatchPreparer` builds the
            whole host side of the step (`flmm_model.modeling.batch`) here, in the loader's workers.

    Returns:
        input_ids: (B, L) long, padded with `pad_token_id`; L is the longest compact sequence.
        attention_mask: (B, L) long, 1 on real tokens.
        mask_ids: (B, L) long, -1 on padding.
        pixel_values: (sum_i t_i*h_i*w_i, 1176) float32, samples concatenated in batch order (a multi-image
            item's images in its placeholder order).
        image_grid_thw: (I, 3) long, one row per image (I = B when every item holds one image).
        grounded_grid_thw: (B, 3) long, the row of each sample's grounded image.
        grounded_image: B ints, the image of each sample its phrases refer to (item key `grounded_image`,
            default 0: the first); `images` holds that image.
        images: B tensors (3, H_i, W_i) uint8.
        gt_masks: B tensors (K_i, H_i, W_i) bool.
        phrases: B lists of K_i strings.
        metas: B meta dicts.
        num_skipped: number of None items dropped.
        With clip items (`data.item.make_clip_item`; a batch may mix them with image items):
        pixel_values_videos: (sum_v t_v*h_v*w_v, 1176) float32, video_grid_thw: (V, 3) long,
        video_frame_times: V tensors (N_v,) float64, clips: B entries, (N, H, W, 3) uint8 or None (an image
        sample), has_gt: B entries, (N,) bool or None; a clip sample's `images` entry is its first frame and its
        `gt_masks` are (K, N, H, W); `pixel_values` / `image_grid_thw` hold only the image samples'.
        prepared: `prepare(batch)`, with `prepare` (B > 0).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side: expected one of {PADDING_SIDES}, found {padding_side!r}")
    kept = [item for item in items if item is not None]
    for index, item in enumerate(kept):
        if item["input_ids"].shape != item["mask_ids"].shape or item["input_ids"].ndim != 1:
            raise ValueError(f"collate: item {index} ({item.get('meta', {}).get('file_name')}) has input_ids "
                             f"{tuple(item['input_ids'].shape)} and mask_ids {tuple(item['mask_ids'].shape)}; "
                             f"expected equal 1-D shapes")
    batch_size = len(kept)
    max_length = max((item["input_ids"].numel() for item in kept), default=0)
    input_ids = torch.full((batch_size, max_length), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)  # (B, L)
    mask_ids = torch.full((batch_size, max_length), -1, dtype=torch.long)  # (B, L)
    for row, item in enumerate(kept):
        length = item["input_ids"].numel()
        columns = slice(0, length) if padding_side == "right" else slice(max_length - length, max_length)
        input_ids[row, columns] = item["input_ids"]
        attention_mask[row, columns] = 1
        mask_ids[row, columns] = item["mask_ids"]
    with_images = [item for item in kept if "pixel_values" in item]
    with_clips = [item for item in kept if "pixel_values_videos" in item]
    if with_images:
        pixel_values = torch.cat([item["pixel_values"] for item in with_images])  # (sum of patches, 1176)
        image_grid_thw = torch.cat([item["image_grid_thw"].reshape(-1, 3) for item in with_images]).long()  # (I, 3)
    else:
        patch_dim = with_clips[0]["pixel_values_videos"].shape[1] if with_clips else 0
        pixel_values = torch.zeros((0, patch_dim), dtype=torch.float32)
        image_grid_thw = torch.zeros((0, 3), dtype=torch.long)

    def grounded_grid(item: dict[str, Any]) -> torch.Tensor:
        if "pixel_values" not in item:  # a clip sample: its clip
            return item["video_grid_thw"].reshape(3)
        return item["image_grid_thw"].reshape(-1, 3)[int(item.get("grounded_image", 0))]

    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mask_ids=mask_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        grounded_image=[int(item.get("grounded_image", 0)) for item in kept],
        grounded_grid_thw=torch.stack([grounded_grid(item) for item in kept]).long() if kept else torch.zeros(
            (0, 3), dtype=torch.long),
        # a clip sample's `images` entry is its first frame (3, H, W), so every sample has one
        images=[item["image"] if "image" in item else item["frames"][0].permute(2, 0, 1) for item in kept],
        gt_masks=[item["gt_masks"] for item in kept],
        phrases=[item["phrases"] for item in kept],
        metas=[item["meta"] for item in kept],
        num_skipped=len(items) - batch_size,
    )
    if with_clips:
        batch.update(
            pixel_values_videos=torch.cat([item["pixel_values_videos"] for item in with_clips]),  # (sum_v t*h*w, 1176)
            video_grid_thw=torch.cat([item["video_grid_thw"].reshape(-1, 3) for item in with_clips]).long(),  # (V, 3)
            video_frame_times=[item["video_frame_times"] for item in with_clips],  # V tensors (N_v,) float64
            clips=[item.get("frames") for item in kept],  # per sample (N, H, W, 3) uint8, None for an image
            has_gt=[item.get("has_gt") for item in kept],  # per sample (N,) bool, None for an image
        )
    if prepare is not None and kept:
        batch["prepared"] = prepare(batch)
    return batch


@dataclass(frozen=True)
class Collator:
    """`collate` with fixed settings, picklable for DataLoader worker processes.

    Example: `DataLoader(dataset, batch_size=4, collate_fn=Collator(pad_token_id=tokenizer.pad_token_id))`.
    """

    pad_token_id: int
    padding_side: str = "right"
    prepare: Callable[[dict[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side: expected one of {PADDING_SIDES}, found {self.padding_side!r}")

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        return collate(items, pad_token_id=self.pad_token_id, padding_side=self.padding_side,
                       prepare=self.prepare)


class EpochIndexed(torch.utils.data.Dataset):
    """A dataset addressed by (epoch, index) pairs (from `EpochSampler`): persistent workers keep their copy of the
    dataset across epochs, where the main process's `set_epoch` never reaches, so the epoch travels with each index
    and the copy that builds the item selects it first."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self.epoch:
            for part in getattr(self.dataset, "datasets", [self.dataset]):
                if hasattr(part, "set_epoch"):
                    part.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs of a sampler with an `epoch` attribute (`ShardedSampler`), for `EpochIndexed`."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        return ((epoch, index) for index in self.sampler)


def make_loader(dataset: torch.utils.data.Dataset, *, sampler: torch.utils.data.Sampler, batch_size: int,
                num_workers: int, pad_token_id: int, padding_side: str = "right",
                prepare: Callable[[dict[str, Any]], Any] | None = None,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader with the project's collate. It draws its worker seeds from a private generator, so creating an
    iterator never advances the global torch RNG (exact resume depends on that).

    `prepare`: a model's `BatchPreparer`, run in the workers (see `collate`). `pin_memory`: batches come in
    page-locked memory, so their copies to a CUDA device run asynchronously (`non_blocking=True`). Worker processes
    persist across epochs (`EpochIndexed` hands them each epoch with the indices).
    """
    if num_workers > 0:
        dataset, sampler = EpochIndexed(dataset), EpochSampler(sampler)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=Collator(pad_token_id=pad_token_id, padding_side=padding_side, prepare=prepare),
        generator=torch.Generator().manual_seed(0), pin_memory=pin_memory, persistent_workers=num_workers > 0,
    )

"""What `cache-sam` and `cache-lmm` share: the training samples in dataset order, sharded across torchrun ranks, and
the summed counts of what was written and what was already there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flmm_model.config import ExperimentConfig
from flmm_model.data.item import PromptSettings
from flmm_model.data.loader import make_loader
from flmm_model.data.registry import NamedDataset, build_datasets
from flmm_model.distributed import DistInfo, ShardedSampler, all_reduce_sum


def training_datasets(cfg: ExperimentConfig, prompt: PromptSettings) -> list[NamedDataset]:
    """The `data.train` datasets as training builds them (train=True: the same samples, the same sentence draw)."""
    return build_datasets(cfg.data.train, data_root=cfg.data.root, prompt=prompt, train=True,
                          on_error=cfg.data.on_error)


def shard_loader(cfg: ExperimentConfig, info: DistInfo, dataset: torch.utils.data.Dataset, *, prompt: PromptSettings,
                 prepare: Callable[[dict[str, Any]], Any]) -> torch.utils.data.DataLoader:
    """This process's share of `dataset` in order (no shuffle, no padding: every sample once over all ranks), in
    batches of `data.batch_size` prepared by `prepare` in the loader's workers."""
    sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=False, pad=False)
    return make_loader(dataset, sampler=sampler, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                       pad_token_id=prompt.tokenizer.pad_token_id, padding_side=cfg.data.padding_side,
                       prepare=prepare, pin_memory=info.device.type == "cuda")


def report(info: DistInfo, counts: torch.Tensor, *, option: str, directory: str, noun: str) -> dict[str, Any]:
    """Sum the (written, already cached) `counts` over the processes, print them on the main one, and return the
    command's result."""
    written, present = all_reduce_sum(counts).tolist()
    if info.is_main:
        print(f"{option} {directory}: {written} {noun} written, {present} already cached")
    return {"directory": directory, "written": written, "cached": present}

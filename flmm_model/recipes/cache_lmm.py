"""`cache_lmm(cfg)` (`run.py cache-lmm`): fill `data.lmm_cache` with the frozen LMM's outputs for every training
sample (attention maps, phrase hidden states), so no training epoch runs the LMM (see `flmm_model.data.lmm_cache`).

Only the LMM is built (no SAM, no heads). The key is the one training computes (`FrozenQwenLMM.open_output_cache`
with the same `model.qwen` checkpoint or seeded preset, `model.dtype`, prompt, pixel budget, `train.precision` on
`train.device` and the training sets' sentence draws), so a training run with the same config reads every entry;
entries already present and whole are kept. Under torchrun each process computes its shard; with
`model.shard_lmm=fsdp` the LMM is sharded as in training, and every process runs as many forwards as the others.

The entries are the LMM's outputs for each sample in the batches of this command (in dataset order). The LMM's
rounding depends a little on a batch's padding, so a run trained on them matches an uncached run to float rounding
(exactly with `data.batch_size=1`); the cache written by the first training epoch matches it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from flmm_model.backbones import build_qwen
from flmm_model.build import check_model_paths, prompt_settings
from flmm_model.config import ConfigError, ExperimentConfig
from flmm_model.data.lmm_cache import LMMCacheWriter, check_cacheable, sentence_draws
from flmm_model.device import to_device
from flmm_model.distributed import (
    all_reduce_max,
    any_rank,
    autocast_context,
    check_device,
    frozen_mesh,
    in_turn,
    init_distributed,
    place_model,
    precision_of,
    shutdown_distributed,
)
from flmm_model.modeling.batch import BatchPreparer
from flmm_model.modeling.lmm import FrozenQwenLMM
from flmm_model.recipes.caching import report, shard_loader, training_datasets


@torch.no_grad()
def cache_lmm(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the frozen LMM on every `data.train` sample the cache lacks and store its outputs; returns the directory
    and the counts (`written`, `cached`).

    Raises:
        ConfigError: no `data.lmm_cache` set. LMMCacheError: the directory belongs to another LMM setup, or a
            training set changes its samples between epochs. StorageError: the cache does not fit on the disk.
    """
    if not cfg.data.lmm_cache:
        raise ConfigError("data.lmm_cache: set the cache directory (data.lmm_cache=/path/to/cache)")
    check_model_paths(cfg.model)
    check_device(cfg.train.device, key="train.device")
    info = init_distributed(cfg.train.device)
    try:
        prompt = prompt_settings(cfg.model)
        datasets = training_datasets(cfg, prompt)
        check_cacheable(datasets)
        dataset = torch.utils.data.ConcatDataset([entry.dataset for entry in datasets])
        autocast = autocast_context(info.device, cfg.train.precision)
        size = prompt.image_processor.size  # the pixel budget, as `GroundingModel.open_lmm_cache` reads it
        mesh = frozen_mesh(cfg.model.shard_lmm, info)  # every process together, before they take turns

        def build_and_place() -> tuple[FrozenQwenLMM, Any, str]:
            """The LMM on the CPU as `build_model` builds it, the cache opened against its whole weights, then onto
            the device (sharded with model.shard_lmm=fsdp)."""
            qwen = build_qwen(cfg.model.qwen, dtype=getattr(torch, cfg.model.dtype), attn_implementation="sdpa",
                              seed=cfg.model.seed)
            built = FrozenQwenLMM(qwen=qwen, attn_capture=cfg.model.attn_capture).eval()
            opened = built.open_output_cache(cfg.data.lmm_cache, instruction=prompt.instruction,
                                             system=prompt.system, sentence_draws=sentence_draws(cfg.data.train),
                                             min_pixels=size.shortest_edge, max_pixels=size.longest_edge,
                                             precision=precision_of(autocast))
            return built, opened, place_model(built, built, cfg.model.shard_lmm, info, mesh=mesh)

        lmm, cache, memory = in_turn(info, build_and_place, enabled=mesh is not None)
        if info.is_main and (info.distributed or cfg.model.shard_lmm != "none"):
            print(memory)
        writer = LMMCacheWriter(cache, samples=len(dataset))
        # Read in the workers: which samples miss. A sharded LMM keeps a cached batch's inputs: another process may
        # need this one's forward to pair with its own.
        preparer = BatchPreparer(qwen_config=lmm.qwen.config, coarse_size=cfg.model.mask_head_size, targets=False,
                                 lmm_cache=cache, keep_lmm_inputs=lmm.sharded)
        loader = shard_loader(cfg, info, dataset, prompt=prompt, prepare=preparer)
        counts = torch.zeros(2, dtype=torch.long)  # written, already cached
        # A sharded LMM: every process takes as many steps as the longest shard, and a step where any process needs
        # a forward runs one on every process (the shards' all-gathers pair up), on this process's latest batch
        # with images when its own has nothing to compute (the result dropped).
        steps = all_reduce_max(len(loader)) if lmm.sharded else len(loader)
        batches = iter(loader)
        runnable = None
        for _ in tqdm(range(steps), desc="cache-lmm", disable=not (info.is_main and cfg.train.progress)):
            batch = next(batches, None)  # None: this shard is done, the others are not
            prepared = batch["prepared"] if batch is not None else None
            has_images = batch is not None and len(batch["images"]) > 0
            if has_images:
                runnable = prepared
                counts[1] += len(prepared.lmm.num_objects) - len(prepared.lmm_missing)
            needed = has_images and prepared.lmm_cached is None
            if not (any_rank(needed) if lmm.sharded else needed):
                continue
            inputs = prepared.lmm if needed else _replayable(runnable).lmm
            with autocast:
                out = lmm.forward_prepared(to_device(inputs, info.device))
            if needed:
                writer.write([(name, out.attention_maps[b], out.phrase_rows[:, b, :tokens])
                              for b, name, tokens in prepared.lmm_missing])
                counts[0] += len(prepared.lmm_missing)
        return report(info, counts, option="data.lmm_cache", directory=cfg.data.lmm_cache, noun="samples")
    finally:
        shutdown_distributed(info)


def _replayable(prepared: Any) -> Any:
    """The batch a sharded LMM runs (result dropped) when this process has nothing to compute but another does."""
    if prepared is None:
        raise RuntimeError("model.shard_lmm=fsdp: this process has no sample with an image yet, so it cannot take "
                           "part in another process's sharded forward; use fewer processes or more samples")
    return prepared

"""`evaluate(cfg)`: score a checkpoint on `data.test` (RefCOCO / RefCOCO+ / RefCOCOg cIoU and gIoU, PNG Average
Recall, ReasonSeg gIoU and cIoU (by default answering first, F-LMM's protocol), each dataset with the metric its
registry entry names), sharded over torchrun processes with the metric
sums reduced; prints a table and writes the results into the run directory (`<run>/eval/step_N.json`) or
`eval.out_dir` (`eval.json`), never into the checkpoint. Its scoring (`recipes/scoring.py`: `score_dataset`,
`print_table`) is also training's validation.

Order: every cheap check first (config, device, the results directory, the checkpoint's config and trainable weights
read into memory, the data files), then the frozen weights load. The checkpoint is read at once, so a training run
pruning it meanwhile (keep_last) cannot make the evaluation fail (see `checkpoint.load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from flmm_model.checkpoint import atomic_write_text
from flmm_model.config import ConfigError, ExperimentConfig
from flmm_model.data.loader import make_loader
from flmm_model.data.registry import build_datasets
from flmm_model.distributed import (
    ShardedSampler,
    autocast_context,
    check_device,
    init_distributed,
    shutdown_distributed,
)
from flmm_model.recipes.inference import open_checkpoint
from flmm_model.recipes.scoring import answers_first, predict_batch, print_table, score_dataset
from flmm_model.run_dir import eval_results_path, prepare_output_dir

__all__ = ["evaluate", "predict_batch", "print_table", "score_dataset"]  # the scoring's names, as before


def evaluate(cfg: ExperimentConfig) -> dict[str, Any]:
    """Score `eval.checkpoint` on every `data.test` dataset.

    Returns:
        dict with `checkpoint`, `results` (label -> metric -> value in percent) and `eval_json` (path: `eval.json` in
        `eval.out_dir`, else `<run dir>/eval/<checkpoint name>.json`).
    """
    ec = cfg.eval
    if ec.checkpoint is None:
        raise ConfigError("eval.checkpoint: not set; pass --checkpoint DIR (a checkpoint or a run directory)")
    if not cfg.data.test:
        raise ConfigError("data.test: no dataset to evaluate")
    check_device(ec.device, key="eval.device")
    opened = open_checkpoint(ec.checkpoint, cfg.model)  # config + trainable weights, in memory
    checkpoint = opened.directory
    eval_json = eval_results_path(checkpoint, ec.out_dir)
    # The run's own model settings (pixel budget, instruction) drive the data too; only the paths and the length
    # limit are this config's.
    shard = cfg.model.shard_lmm  # how to run the LMM is this run's choice, not the checkpoint's
    cfg = dataclasses.replace(cfg, model=opened.config)
    info = init_distributed(ec.device)
    try:
        if info.is_main:
            prepare_output_dir(eval_json.parent, what="eval.out_dir" if ec.out_dir else "the results directory")
        # Data first: missing files fail before the frozen weights load.
        prompt = opened.prompt
        datasets = build_datasets(cfg.data.test, data_root=cfg.data.root, prompt=prompt, train=False,
                                  on_error=cfg.data.on_error)
        model, memory = opened.build_on(info, shard_lmm=shard)
        if info.is_main:
            print(memory)
        autocast = autocast_context(info.device, ec.precision)
        results: dict[str, dict[str, float]] = {}
        for entry, ds in zip(datasets, cfg.data.test, strict=True):
            # A sharded LMM answering each sample first (ReasonSeg's flmm protocol) generates in lockstep, one prompt
            # on every process: each process runs the whole dataset, the main one scores.
            replicated = model.lmm.sharded and answers_first(ds)
            rank, world = (0, 1) if replicated else (info.rank, info.world_size)
            sampler = ShardedSampler(len(entry.dataset), rank=rank, world_size=world, shuffle=False, pad=False)
            loader = make_loader(entry.dataset, sampler=sampler, batch_size=ec.batch_size,
                                 num_workers=cfg.data.num_workers, pad_token_id=prompt.tokenizer.pad_token_id,
                                 padding_side=cfg.data.padding_side, prepare=model.batch_preparer(targets=False),
                                 pin_memory=info.device.type == "cuda")
            results[entry.label] = score_dataset(model, loader, metric=entry.metric, autocast=autocast,
                                                 progress=ec.progress, desc=entry.label, replicated=replicated)
        if info.is_main:
            protocols = {entry.label: ds.protocol for entry, ds in zip(datasets, cfg.data.test, strict=True)}
            print_table(results, title=f"evaluation of {checkpoint}")
            skipped = {label: metrics["count_skipped"] for label, metrics in results.items()}
            if cfg.data.on_error == "skip" or any(skipped.values()):
                print(f"samples skipped as bad data (data.on_error={cfg.data.on_error}; the warnings name them): "
                      + ", ".join(f"{label} {count}" for label, count in skipped.items()))
            atomic_write_text(eval_json, json.dumps({"checkpoint": str(checkpoint), "protocols": protocols,
                                                     "results": results}, indent=2) + "\n")
            print(f"wrote {eval_json}")
        return {"checkpoint": str(checkpoint), "results": results, "eval_json": str(eval_json)}
    finally:
        shutdown_distributed(info)

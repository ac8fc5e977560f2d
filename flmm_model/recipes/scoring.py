"""Scoring shared by validation (`train`) and `eval`: predict a loader's samples and reduce the dataset's metric
over the processes (`score_dataset`), and the plain-text results table (`print_table`)."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from flmm_model.distributed import all_reduce_sum, lockstep_batches
from flmm_model.predictor import GroundingPredictor


@torch.no_grad()
def score_dataset(model: Any, loader: torch.utils.data.DataLoader, *, metric: type, autocast: Any,
                  baselines: bool = False, progress: bool = True, desc: str = "eval",
                  replicated: bool = False) -> dict[str, float]:
    """Predict every sample of this process's shard and return the metrics reduced over all processes.

    Args:
        model: the unwrapped FrozenQwenSAM in eval mode.
        loader: batches of this process's shard.
        metric: the metric class of the dataset (its registry entry's), e.g. `ReferSegMetric` (cIoU / gIoU),
            `PngRecallMetric` (Average Recall all / things / stuff / singulars / plurals) or `VideoSegMetric`
            (J / F / J&F of clips, over their sampled frames with ground truth).
        autocast: context manager entered around the prediction.
        baselines: also score the all-foreground and the empty mask (keys `baseline_full/...`, `baseline_empty/...`).
        progress: show a progress bar (rank 0).
        desc: progress bar label.
        replicated: every process runs the same `loader` (the whole dataset, in the same order) and only the main
            one scores: a sharded LMM that answers each sample first (generation in lockstep needs the same prompt
            on every process).
    Returns:
        Metric name -> value (percent), plus the counts: `count...` (objects scored, from the metric) and
        `count_skipped` (samples the dataset dropped as bad data under `data.on_error=skip`, over all processes).
    """
    metrics = {"": metric()}
    if baselines:
        metrics.update({"baseline_full/": metric(), "baseline_empty/": metric()})
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    skipped = 0  # samples of this process's shard the dataset dropped (data.on_error=skip)
    batches = lockstep_batches(loader, sharded=model.lmm.sharded)  # a sharded LMM: as many forwards on every rank
    for batch, scored in tqdm(batches, desc=desc, disable=not (progress and rank0), dynamic_ncols=True, leave=False,
                              total=len(loader)):
        if not scored:
            with autocast:
                model.predict_masks(batch)  # a replay: its collectives pair with another process's forward
            continue
        scoring = rank0 or not replicated  # replicated: the other processes only keep the forwards paired
        skipped += batch["num_skipped"] if scoring else 0
        if len(batch["images"]) == 0:
            continue
        with autocast:
            predictions = predict_batch(model, batch)
        if not scoring:
            continue
        flags = batch.get("has_gt") or [None] * len(predictions)
        for index, (pred, gt) in enumerate(zip(predictions, batch["gt_masks"], strict=True)):
            if flags[index] is not None:  # a clip: scored on the frames with ground truth, (K, T_gt, H, W)
                if not bool(flags[index].any()):
                    continue
                pred, gt = pred[:, flags[index].to(pred.device)], gt[:, flags[index]]
            candidates = {"": pred.cpu()}
            if baselines:
                candidates["baseline_full/"] = torch.ones_like(gt, dtype=torch.bool)
                candidates["baseline_empty/"] = torch.zeros_like(gt, dtype=torch.bool)
            for prefix, mask in candidates.items():
                metrics[prefix].update(mask, gt, batch["metas"][index])
    results: dict[str, float] = {}
    for prefix, metric in metrics.items():
        results.update({f"{prefix}{name}": float(value) for name, value in metric.compute().items()})
    results["count_skipped"] = int(all_reduce_sum(torch.tensor([skipped], dtype=torch.int64))[0])
    return results


def answers_first(ds: Any) -> bool:
    """Whether a dataset config's samples make the LMM answer before grounding (ReasonSeg's flmm protocol): under a
    sharded LMM they are scored `replicated` (see `score_dataset`)."""
    return ds.type == "reason_seg" and ds.protocol == "flmm"


def predict_batch(model: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
    """Per sample (K, H, W) bool masks. Samples whose meta requests an answer first (`meta["generate"]`, e.g.
    ReasonSeg's F-LMM protocol) are answered by the frozen LMM and the answer grounded (`GroundingPredictor.
    answer_then_ground`); the others are grounded on their own prompt (`model.predict_masks`)."""
    requests = [bool(meta.get("generate")) for meta in batch["metas"]]
    if all(requests):
        return GroundingPredictor(model).answer_then_ground(batch)
    if any(requests):
        raise ValueError("a batch mixes samples that request generation (meta 'generate') with samples that do not")
    return model.predict_masks(batch)


def print_table(scores: dict[str, dict[str, float]], *, title: str) -> str:
    """Print (and return) a plain-text table: one row per dataset, one column per metric (counts left out)."""
    columns: list[str] = []
    for metrics in scores.values():
        columns += [name for name in metrics
                    if name not in columns and not name.rsplit("/", 1)[-1].startswith("count")]
    width = max([len("dataset")] + [len(label) for label in scores]) + 2
    lines = [title, "dataset".ljust(width) + "".join(f"{c:>{max(10, len(c) + 2)}}" for c in columns)]
    for label, metrics in scores.items():
        cells = "".join(
            f"{metrics[c]:>{max(10, len(c) + 2)}.2f}" if c in metrics else " " * max(10, len(c) + 2) for c in columns
        )
        lines.append(label.ljust(width) + cells)
    text = "\n".join(lines)
    print(text)
    return text

"""`evaluate(cfg)`: score a checkpoint on `data.test` (RefCOCO / RefCOCO+ / RefCOCOg cIoU and gIoU, PNG Average
Recall), sharded over torchrun processes with the metric sums reduced; prints a table and writes `eval.json`.

Also home of what training's validation shares with it: building datasets from their configs, DataLoaders, autocast,
and scoring one dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flmm_model.checkpoint import atomic_write_text
from flmm_model.config import (
    REFCOCO_TYPES,
    DatasetConfig,
    ExperimentConfig,
    ModelConfig,
    check_model_paths,
    dataset_label,
    dataset_seed,
)
from flmm_model.distributed import ShardedSampler, all_reduce_sum, init_distributed, shutdown_distributed


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast on CUDA for precision `auto` or `bf16`; bf16 on CPU only when asked; otherwise fp32.

    The returned context manager is reusable (enter it around every forward)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class EpochSubset(torch.utils.data.Subset):
    """`torch.utils.data.Subset` that forwards `set_epoch` to the dataset it wraps, so a training set cut down with
    `max_samples` still draws new random choices (e.g. RefCOCO's sentence per ref) every epoch."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_dataset(ds: DatasetConfig, *, cfg: ExperimentConfig, tokenizer: Any, image_processor: Any,
                  train: bool) -> torch.utils.data.Dataset:
    """One dataset from its config entry (paths default to the layout under `data.root`)."""
    from flmm_model import data as flmm_data

    root = ds.root or cfg.data.root
    prompt = {"instruction": cfg.model.instruction} if cfg.model.instruction is not None else {}
    common = dict(tokenizer=tokenizer, image_processor=image_processor, **prompt)
    if ds.type in REFCOCO_TYPES:
        dataset = flmm_data.RefCocoDataset(root, ds.type, ds.split, split_by=ds.split_by, image_dir=ds.image_dir,
                                           protocol=ds.protocol, train=train, seed=dataset_seed(ds),
                                           on_error=cfg.data.on_error, **common)
    elif ds.type == "png":
        dataset = flmm_data.PngDataset(root, ds.split, image_dir=ds.image_dir, ann_dir=ds.ann_dir,
                                       on_error=cfg.data.on_error, **common)
    elif ds.type == "synthetic":
        shape_options = {"image_size": tuple(ds.image_size) if ds.image_size else None,
                         "max_objects": ds.max_objects,
                         "object_size": tuple(ds.object_size) if ds.object_size else None}
        dataset = flmm_data.SyntheticDataset(length=ds.length, seed=dataset_seed(ds), **common,
                                             **{k: v for k, v in shape_options.items() if v is not None})
    else:  # the schema's choices make this unreachable
        raise ValueError(f"dataset type {ds.type!r}")
    if ds.max_samples is not None and ds.max_samples < len(dataset):
        dataset = EpochSubset(dataset, range(ds.max_samples))
    return dataset


def build_datasets(entries: list[DatasetConfig], *, cfg: ExperimentConfig, tokenizer: Any, image_processor: Any,
                   train: bool) -> list[tuple[str, torch.utils.data.Dataset]]:
    """(label, dataset) for each config entry, in order."""
    return [(dataset_label(ds), build_dataset(ds, cfg=cfg, tokenizer=tokenizer, image_processor=image_processor,
                                              train=train)) for ds in entries]


def make_loader(dataset: torch.utils.data.Dataset, *, sampler: ShardedSampler, batch_size: int,
                cfg: ExperimentConfig) -> torch.utils.data.DataLoader:
    """A DataLoader with the project's collate. It draws its worker seeds from a private generator, so creating an
    iterator never advances the global torch RNG (exact resume depends on that)."""
    from flmm_model.data import Collator

    tokenizer_pad = _pad_token_id(cfg.model)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=Collator(pad_token_id=tokenizer_pad, padding_side=cfg.data.padding_side),
        generator=torch.Generator().manual_seed(0), pin_memory=False,
    )


_PAD_IDS: dict[str | None, int] = {}


def _pad_token_id(model_cfg: ModelConfig) -> int:
    if model_cfg.tokenizer not in _PAD_IDS:
        from flmm_model.build import load_tokenizer

        _PAD_IDS[model_cfg.tokenizer] = load_tokenizer(model_cfg.tokenizer).pad_token_id
    return _PAD_IDS[model_cfg.tokenizer]


def dataset_kind(ds: DatasetConfig) -> str:
    """How a dataset is scored (the `kind` of `score_dataset`): "png" (Average Recall) or "refer" (cIoU / gIoU)."""
    return "png" if ds.type == "png" else "refer"


@torch.no_grad()
def score_dataset(model: Any, loader: torch.utils.data.DataLoader, *, kind: str, autocast: Any,
                  baselines: bool = False, progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Predict every sample of this process's shard and return the metrics reduced over all processes.

    Args:
        model: the unwrapped FrozenQwenSAM in eval mode.
        loader: batches of this process's shard.
        kind: "refer" (cIoU / gIoU) or "png" (Average Recall all / things / stuff / singulars / plurals).
        autocast: context manager entered around the prediction.
        baselines: also score the all-foreground and the empty mask (keys `baseline_full/...`, `baseline_empty/...`).
        progress: show a progress bar (rank 0).
        desc: progress bar label.
    Returns:
        Metric name -> value (percent), plus the counts: `count...` (objects scored, from the metric) and
        `count_skipped` (samples the dataset dropped as bad data under `data.on_error=skip`, over all processes).
    """
    from flmm_model.metrics import PngRecallMetric, ReferSegMetric

    make_metric = PngRecallMetric if kind == "png" else ReferSegMetric
    metrics = {"": make_metric()}
    if baselines:
        metrics.update({"baseline_full/": make_metric(), "baseline_empty/": make_metric()})
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    skipped = 0  # samples of this process's shard the dataset dropped (data.on_error=skip)
    for batch in tqdm(loader, desc=desc, disable=not (progress and rank0), dynamic_ncols=True, leave=False):
        skipped += batch["num_skipped"]
        if len(batch["images"]) == 0:
            continue
        with autocast:
            predictions = model.predict_masks(batch)
        for index, (pred, gt) in enumerate(zip(predictions, batch["gt_masks"], strict=True)):
            candidates = {"": pred.cpu()}
            if baselines:
                candidates["baseline_full/"] = torch.ones_like(gt, dtype=torch.bool)
                candidates["baseline_empty/"] = torch.zeros_like(gt, dtype=torch.bool)
            for prefix, mask in candidates.items():
                if kind == "png":
                    meta = batch["metas"][index]
                    metrics[prefix].update(mask, gt, isthing=meta["isthing"], plural=meta["plural"])
                else:
                    metrics[prefix].update(mask, gt)
    results: dict[str, float] = {}
    for prefix, metric in metrics.items():
        results.update({f"{prefix}{name}": float(value) for name, value in metric.compute().items()})
    results["count_skipped"] = int(all_reduce_sum(torch.tensor([skipped], dtype=torch.int64))[0])
    return results


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


def checkpoint_model_config(checkpoint: str | Path, model_cfg: ModelConfig) -> ModelConfig:
    """The model config a checkpoint was trained with, with the local paths (`qwen`, `sam`, and `tokenizer` when
    set) taken from `model_cfg`: evaluation must use the training run's pixel budget, prompt and head sizes."""
    from omegaconf import OmegaConf

    from flmm_model.model import CONFIG_NAME

    saved = json.loads((Path(checkpoint) / CONFIG_NAME).read_text())["model"]
    saved.update(qwen=model_cfg.qwen, sam=model_cfg.sam)
    if model_cfg.tokenizer is not None:
        saved["tokenizer"] = model_cfg.tokenizer
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))


def load_model_for_inference(model_cfg: ModelConfig, checkpoint: str | Path, device: torch.device) -> Any:
    """FrozenQwenSAM with the trainable weights of `checkpoint` (a checkpoint dir or a run dir), in eval mode.

    Everything but the local paths comes from the checkpoint (see `checkpoint_model_config`); the frozen parts
    load from `model_cfg.qwen` / `model_cfg.sam` (the user's local paths or presets)."""
    from flmm_model.checkpoint import resolve_checkpoint
    from flmm_model.model import FrozenQwenSAM

    path = resolve_checkpoint(checkpoint)
    tokenizer = {"tokenizer": model_cfg.tokenizer} if model_cfg.tokenizer is not None else {}
    model = FrozenQwenSAM.from_pretrained(str(path), qwen_path=model_cfg.qwen, sam_path=model_cfg.sam,
                                          device=str(device), **tokenizer)
    return model.eval()


def evaluate(cfg: ExperimentConfig) -> dict[str, Any]:
    """Score `eval.checkpoint` on every `data.test` dataset.

    Returns:
        dict with `checkpoint`, `results` (label -> metric -> value in percent) and `eval_json` (path).
    """
    from flmm_model.build import load_image_processor, load_tokenizer
    from flmm_model.checkpoint import resolve_checkpoint

    ec = cfg.eval
    if ec.checkpoint is None:
        raise ValueError("eval.checkpoint: not set; pass --checkpoint DIR (a checkpoint or a run directory)")
    if not cfg.data.test:
        raise ValueError("data.test: no dataset to evaluate")
    check_model_paths(cfg.model)
    checkpoint = resolve_checkpoint(ec.checkpoint)
    # The run's own model settings (pixel budget, instruction) drive the data too; only the paths are this config's.
    cfg = dataclasses.replace(cfg, model=checkpoint_model_config(checkpoint, cfg.model))
    info = init_distributed(ec.device)
    try:
        # Data first: missing files fail before the weights load.
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        image_processor = load_image_processor(min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
        datasets = [(dataset_label(ds), ds, build_dataset(ds, cfg=cfg, tokenizer=tokenizer,
                                                          image_processor=image_processor, train=False))
                    for ds in cfg.data.test]
        model = load_model_for_inference(cfg.model, checkpoint, info.device)
        autocast = autocast_context(info.device, ec.precision)
        results: dict[str, dict[str, float]] = {}
        for label, ds, dataset in datasets:
            sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=False,
                                     pad=False)
            loader = make_loader(dataset, sampler=sampler, batch_size=ec.batch_size, cfg=cfg)
            results[label] = score_dataset(model, loader, kind=dataset_kind(ds), autocast=autocast,
                                           progress=ec.progress, desc=label)
        out_dir = Path(ec.out_dir) if ec.out_dir else checkpoint
        eval_json = out_dir / "eval.json"
        if info.is_main:
            protocols = {dataset_label(ds): ds.protocol for ds in cfg.data.test if ds.type in REFCOCO_TYPES}
            print_table(results, title=f"evaluation of {checkpoint}")
            skipped = {label: metrics["count_skipped"] for label, metrics in results.items()}
            if cfg.data.on_error == "skip" or any(skipped.values()):
                print(f"samples skipped as bad data (data.on_error={cfg.data.on_error}; the warnings name them): "
                      + ", ".join(f"{label} {count}" for label, count in skipped.items()))
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(eval_json, json.dumps({"checkpoint": str(checkpoint), "protocols": protocols,
                                                     "results": results}, indent=2) + "\n")
            print(f"wrote {eval_json}")
        return {"checkpoint": str(checkpoint), "results": results, "eval_json": str(eval_json)}
    finally:
        shutdown_distributed(info)

"""`train(cfg)`: the training loop, top to bottom in one function.

What it does, in order: join the torchrun process group (if any); build the datasets (a bad path fails here, before
any weights load); build the model; AdamW over the trainable parameters only; a 3% linear warm-up then cosine LR
schedule; resume from a checkpoint when asked; then steps of `grad_accum` micro-batches with gradient clipping,
bf16 autocast on CUDA, a progress bar, `metrics.jsonl` lines, periodic validation, a plot and atomic checkpoints.

Exact resume: the data order is a function of (seed, epoch) only (`ShardedSampler`), the dataset's random choices a
function of (seed, epoch, index), and the DataLoaders draw from private generators, so a resumed run that restores
the weights, optimizer, scheduler, RNG states and the position inside the epoch replays the same batches and the
same loss trajectory as a run that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flmm_model.build import check_model_paths, prompt_settings
from flmm_model.checkpoint import (
    atomic_write_text,
    capture_rng_state,
    delete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prepare_output_dir,
    restore_rng_state,
    save_checkpoint,
)
from flmm_model.config import ConfigError, ExperimentConfig, TrainConfig
from flmm_model.config_loader import config_to_yaml
from flmm_model.data.collate import make_loader
from flmm_model.data.registry import NamedDataset, build_datasets
from flmm_model.device import to_device
from flmm_model.distributed import (
    ShardedSampler,
    all_gather_objects,
    all_reduce_sum,
    autocast_context,
    barrier,
    check_device,
    init_distributed,
    precision_of,
    shutdown_distributed,
    wrap_ddp,
)
from flmm_model.errors import CheckpointError, UserError
from flmm_model.model import build_model
from flmm_model.recipes.evaluate import print_table, score_dataset
from flmm_model.recipes.pointing import pointing_rows, score_pointing

LOSS_KEYS = ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR factor for optimizer step `step` (0-based): linear warm-up to 1 over `warmup_steps`, then cosine to 0 at
    `total_steps`. Value range [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class WarmupCosine:
    """`warmup_cosine` as a picklable callable for LambdaLR (its attributes go into the scheduler state)."""

    def __init__(self, *, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file (empty list if it does not exist).

    A torn last line (a kill while appending) is dropped with a warning; resume rewrites the file without it. Any
    other undecodable line is damage the user must look at: UserError naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(f"{path}: line {number} is torn (a run killed while writing it?); dropped: {line[:80]!r}",
                              stacklevel=2)
                continue
            raise UserError(f"{path}: line {number} is not JSON ({error}); fix or delete that line (each line is one "
                            f"record) and run again") from error
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON record ({line[:80]!r}); fix or delete that line")
        records.append(record)
    return records


def plot_metrics(records: list[dict[str, Any]], out_png: str | Path) -> None:
    """Training losses (left) and validation metrics (right) against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax_loss.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    metric_keys = sorted({k for r in val for k in r if "/" in k and not k.rsplit("/", 1)[1].startswith("count")})
    for key in metric_keys:
        points = [(r["step"], r[key]) for r in val if key in r]
        steps, values = zip(*points, strict=True)
        baseline = "/baseline_" in key  # trivial predictions (all-foreground, empty) for reference
        ax_val.plot(steps, values, marker="" if baseline else "o", linestyle="--" if baseline else "-", label=key)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation metric (%)")
    if metric_keys:
        ax_val.legend(fontsize=8)
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


COLUMN_NAMES = {"gIoU": "mIoU (gIoU)"}  # table headers of metrics named otherwise in the results


def versus_baselines(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Rows `<dataset> model`, `<dataset> all-foreground`, `<dataset> empty` with the dataset's metric columns:
    mIoU (gIoU) and cIoU for RefCOCO-style sets, the Average Recalls for PNG (counts left out)."""
    rows: dict[str, dict[str, float]] = {}
    for label, metrics in scores.items():
        names = [name for name in metrics if "/" not in name and not name.startswith("count")]
        names.sort(key=lambda name: name != "gIoU")  # mIoU first; otherwise the metric's own order
        for prefix, row in (("", "model"), ("baseline_full/", "all-foreground"), ("baseline_empty/", "empty")):
            rows[f"{label} {row}"] = {COLUMN_NAMES.get(name, name): metrics[f"{prefix}{name}"] for name in names}
    return rows


def schedule_steps(tc: TrainConfig, *, micro_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) of a run whose epoch holds `micro_per_epoch` micro-batches per process:
    `train.max_steps`, else `train.epochs` epochs of `train.grad_accum` micro-batches per step.

    Raises:
        ConfigError: an epoch holds fewer micro-batches than one step accumulates.
    """
    steps_per_epoch = micro_per_epoch // tc.grad_accum
    if steps_per_epoch < 1:
        raise ConfigError(f"train.grad_accum: {tc.grad_accum} micro-batches per step, but an epoch has only "
                          f"{micro_per_epoch} per process")
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    return total_steps, max(1, round(tc.warmup_ratio * total_steps)) if tc.warmup_ratio > 0 else 0


def attention_only_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The attention-only ablation of a run: the same config with `model.attention_only=true` (the U-Net alone on
    the attention maps: no text prompts, no SAM, only the coarse-mask loss), in `<train.out_dir>/attention_only`.
    A resumed run resumes its ablation from the ablation's own newest checkpoint."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention_only=True),
        train=dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir) / "attention_only"),
                                  attention_only_baseline=False, resume="latest" if cfg.train.resume else None))


def earlier_run_error(ckpt_root: Path) -> FileExistsError:
    return FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run: pass --resume to continue it, set "
                           f"train.out_dir to a new directory, or train.overwrite=true to delete them")


def check_run_setup(cfg: ExperimentConfig) -> None:
    """The cheap checks of a training run, made before any weights load (or another run trains first): model paths,
    device, the run directory, and the checkpoint to resume (read and checked) or the earlier run's checkpoints
    (refused without train.overwrite). `train` makes them again as it starts."""
    tc = cfg.train
    check_model_paths(cfg.model)
    check_device(tc.device, key="train.device")
    if not cfg.data.train:
        raise ConfigError("data.train: no training dataset configured")
    ckpt_root = prepare_output_dir(tc.out_dir, what="train.out_dir") / "checkpoints"
    if tc.resume == "latest" and latest_checkpoint(ckpt_root) is not None:
        load_checkpoint(ckpt_root, trainer_state=True)
    elif tc.resume and tc.resume != "latest":
        load_checkpoint(tc.resume, trainer_state=True)
    elif not tc.resume and not tc.overwrite and latest_checkpoint(ckpt_root) is not None:
        raise earlier_run_error(ckpt_root)


def train_with_ablation(cfg: ExperimentConfig) -> dict[str, Any]:
    """`run.py train`: `train(cfg)`, preceded by its attention-only ablation (`attention_only_config`) when
    `train.attention_only_baseline` is set; the ablation's validation scores join the run's final table. The run's
    own mistakes (paths, device, out_dir, the checkpoint to resume) are reported before the ablation trains."""
    if not cfg.train.attention_only_baseline or cfg.model.attention_only:
        return train(cfg)
    check_run_setup(cfg)
    ablation = train(attention_only_config(cfg))
    return train(cfg, compare={"attention-only heads": ablation["val"]})


def report_rows(scores: dict[str, dict[str, float]], *, compare: dict[str, dict[str, dict[str, float]]],
                pointing: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The final table: per dataset the model, the runs in `compare` (name -> label -> scores), the trivial
    baselines, and the pointing accuracy of the LMM's raw attention next to chance."""
    rows: dict[str, dict[str, float]] = {}
    for label in scores:
        ours = versus_baselines({label: scores[label]})
        rows[f"{label} model"] = ours.pop(f"{label} model")
        for name, other in compare.items():
            if label in other:
                rows[f"{label} {name}"] = versus_baselines({label: other[label]})[f"{label} model"]
        rows.update(ours)
        if label in pointing:
            rows.update(pointing_rows(label, pointing[label]))
    return rows


def val_loader(entry: NamedDataset, *, cfg: ExperimentConfig, info: Any, pad_token_id: int,
               prepare: Any = None) -> torch.utils.data.DataLoader:
    """This process's shard of a validation dataset, in order, in batches of `eval.batch_size`."""
    sampler = ShardedSampler(len(entry.dataset), rank=info.rank, world_size=info.world_size, shuffle=False, pad=False)
    return make_loader(entry.dataset, sampler=sampler, batch_size=cfg.eval.batch_size,
                       num_workers=cfg.data.num_workers, pad_token_id=pad_token_id,
                       padding_side=cfg.data.padding_side, prepare=prepare,
                       pin_memory=info.device.type == "cuda")


def validate(model: torch.nn.Module, val_sets: list[NamedDataset], *, cfg: ExperimentConfig, info: Any,
             autocast: Any, pad_token_id: int) -> dict[str, dict[str, float]]:
    """Score every validation dataset with its own metric (sharded over ranks, metric sums reduced), with the
    trivial baselines."""
    scores: dict[str, dict[str, float]] = {}
    for entry in val_sets:
        loader = val_loader(entry, cfg=cfg, info=info, pad_token_id=pad_token_id,
                            prepare=model.batch_preparer(targets=False))
        scores[entry.label] = score_dataset(model, loader, metric=entry.metric, autocast=autocast, baselines=True,
                                            progress=False, desc=f"val {entry.label}")
    return scores


def check_resume_setup(state: dict[str, Any], *, checkpoint: str | Path, world_size: int, batch_size: int,
                       grad_accum: int, total_steps: int) -> None:
    """Raise CheckpointError (a ValueError naming the saved and the current values) when this run cannot continue
    the checkpoint's.

    The data position (`micro_in_epoch`) counts micro-batches of `batch_size` samples per process, so it means other
    samples under another world size, batch size or accumulation; the LR schedule spans `total_steps`, so another
    total would either stop early or train the extra steps at LR 0. Checkpoints written before `batch_size` and
    `grad_accum` were saved are checked on what they hold.
    """
    current = {"world_size": ("world size", world_size), "batch_size": ("data.batch_size", batch_size),
               "grad_accum": ("train.grad_accum", grad_accum)}
    differ = [f"{name} {state[key]} in the checkpoint, {value} now" for key, (name, value) in current.items()
              if key in state and state[key] != value]
    if differ:
        raise CheckpointError(f"train.resume: {checkpoint} was written by a run with another setup "
                              f"({'; '.join(differ)}); its position in the data would point at other samples. Resume "
                              f"with the same number of processes, data.batch_size and train.grad_accum, or start a "
                              f"new run")
    if state["total_steps"] != total_steps:
        raise CheckpointError(f"train.resume: {checkpoint} was written for {state['total_steps']} steps, this run "
                              f"has {total_steps} (from train.max_steps, or train.epochs and the data); its LR "
                              f"schedule cannot span both. Resume with the settings that give "
                              f"{state['total_steps']} steps, or start a new run")


def train(cfg: ExperimentConfig, *, compare: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """Train FrozenQwenSAM's heads as `cfg` says; returns the run's summary (and the trained, unwrapped model).

    Args:
        cfg: the experiment.
        compare: validation scores of other runs (name -> dataset label -> metrics, as this function's `val`),
            shown as rows of the final table (e.g. the attention-only ablation).

    Returns:
        dict with `out_dir`, `steps`, `checkpoint` (newest checkpoint dir), `stopped_early`, `last_loss`,
        `val` (label -> metrics of the model, and of the all-foreground / empty baselines), `pointing` (label ->
        pointing accuracy of the frozen LMM's attention and chance, `flmm_model.recipes.pointing`) and `model`.
    """
    tc = cfg.train
    check_model_paths(cfg.model)
    check_device(tc.device, key="train.device")
    info = init_distributed(tc.device)
    try:
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        seed_everything(tc.seed)
        out_dir = Path(tc.out_dir)
        ckpt_root = out_dir / "checkpoints"
        metrics_path = out_dir / "metrics.jsonl"
        log = print if info.is_main else (lambda *args, **kwargs: None)
        if info.is_main:  # a run directory that is a file or read-only fails now, not after the model is built
            prepare_output_dir(out_dir, what="train.out_dir")

        # ---- Data first: missing files or an empty split fail before any weights load.
        if not cfg.data.train:
            raise ConfigError("data.train: no training dataset configured")
        prompt = prompt_settings(cfg.model)
        data_options = dict(data_root=cfg.data.root, prompt=prompt, on_error=cfg.data.on_error)
        train_set = torch.utils.data.ConcatDataset(
            [entry.dataset for entry in build_datasets(cfg.data.train, train=True, **data_options)])
        val_sets = build_datasets(cfg.data.val, train=False, **data_options)  # each scored with its own metric
        pad_token_id = prompt.tokenizer.pad_token_id
        sampler = ShardedSampler(len(train_set), rank=info.rank, world_size=info.world_size, shuffle=True,
                                 seed=tc.seed, pad=True)
        micro_per_epoch = math.ceil(sampler.shard_size() / cfg.data.batch_size)
        total_steps, warmup_steps = schedule_steps(tc, micro_per_epoch=micro_per_epoch)

        # ---- Which checkpoint to resume from (or refuse to overwrite one), still before any weights load.
        # Everything is read into memory now: the checkpoint may be re-saved or pruned later in this run.
        resume = None
        if tc.resume == "latest":
            if latest_checkpoint(ckpt_root) is None:
                log(f"train.resume=latest: no checkpoint in {ckpt_root}; starting from scratch")
            else:
                resume = load_checkpoint(ckpt_root, trainer_state=True)
        elif tc.resume:
            resume = load_checkpoint(tc.resume, trainer_state=True)
        resume_from = resume.directory if resume is not None else None
        if resume is not None:
            check_resume_setup(resume.trainer_state, checkpoint=resume_from, world_size=info.world_size,
                               batch_size=cfg.data.batch_size, grad_accum=tc.grad_accum, total_steps=total_steps)
        if resume_from is None and latest_checkpoint(ckpt_root) is not None:
            if not tc.overwrite:
                raise earlier_run_error(ckpt_root)
            barrier()  # every rank has looked before rank 0 deletes
            if info.is_main:
                log(f"train.overwrite: deleting the earlier run's checkpoints in {ckpt_root}")
                delete_checkpoints(ckpt_root)

        # ---- Model, optimizer (trainable parameters only), schedule.
        model = build_model(cfg.model).to(info.device)
        if tc.compile:
            model.compile_parts()
        loss_keys = LOSS_KEYS if model.sam_refiner is not None else LOSS_KEYS[:3]  # attention-only: no SAM terms
        params = model.trainable_parameters()
        # Fused AdamW on CUDA: one kernel for all parameters (on the CPU: the default loop).
        optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                      fused=info.device.type == "cuda" or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps))
        autocast = autocast_context(info.device, tc.precision)

        # ---- Resume: weights, optimizer, scheduler, RNG states and the position in the data.
        step, epoch, micro_done = 0, 0, 0
        if resume is not None:
            state = resume.trainer_state  # checked against this run's setup before the model was built
            model.load_trainable_state_dict(resume.weights, strict=True)
            model.to(info.device)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, micro_done = state["step"], state["epoch"], state["micro_in_epoch"]
            restore_rng_state(state["rng"][info.rank])  # same world size (checked): each rank its own streams
            log(f"resumed from {resume_from} at step {step} (epoch {epoch}, micro-batch {micro_done})")
        if info.is_main:
            atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))
            # Records after the resumed step belong to the interrupted run's lost tail.
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            summary = model.parameter_summary()
            log("parameters (trainable / frozen): " + ", ".join(f"{part} {t:,} / {f:,}" for part, (t, f)
                                                                in summary.items()))
            log(f"{len(train_set)} training samples, {info.world_size} process(es) x {cfg.data.batch_size} images x "
                f"{tc.grad_accum} accumulation = {info.world_size * cfg.data.batch_size * tc.grad_accum} per step; "
                f"{total_steps} steps ({micro_per_epoch // tc.grad_accum} per epoch), warm-up {warmup_steps}")
        ddp_model = wrap_ddp(model, info, find_unused_parameters=tc.find_unused_parameters)
        model.train()
        sam_cache = None
        if cfg.data.sam_cache:  # refused here, before any step, if built for another SAM setup
            sam_cache = model.open_sam_cache(cfg.data.sam_cache, precision=precision_of(autocast))
        # The loader's workers also build the heads' image inputs and targets (and read the SAM cache); batches come
        # pinned on CUDA.
        loader = make_loader(train_set, sampler=sampler, batch_size=cfg.data.batch_size,
                             num_workers=cfg.data.num_workers, pad_token_id=pad_token_id,
                             padding_side=cfg.data.padding_side, prepare=model.batch_preparer(sam_cache=sam_cache),
                             pin_memory=info.device.type == "cuda")

        def log_record(record: dict[str, Any]) -> None:
            if info.is_main:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")

        def run_validation() -> dict[str, dict[str, float]]:
            model.eval()
            scores = validate(model, val_sets, cfg=cfg, info=info, autocast=autocast, pad_token_id=pad_token_id)
            model.train()
            record: dict[str, Any] = {"kind": "val", "step": step}
            for label, metrics in scores.items():
                record.update({f"{label}/{k}": v for k, v in metrics.items()})
                if metrics["count_skipped"]:
                    log(f"validation {label}: {metrics['count_skipped']} bad samples skipped (data.on_error=skip)")
            log_record(record)
            if info.is_main:
                plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
            return scores

        def checkpoint() -> Path:
            rng_states = all_gather_objects(capture_rng_state())  # every rank's, so each resumes its own streams
            trainer_state = {
                "step": step, "epoch": epoch, "micro_in_epoch": micro_done, "total_steps": total_steps,
                "world_size": info.world_size, "batch_size": cfg.data.batch_size, "grad_accum": tc.grad_accum,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states,
            }
            path = ckpt_root / f"step_{step:07d}"
            if info.is_main:
                path = save_checkpoint(root=ckpt_root, step=step, weights=model.trainable_state_dict(),
                                       model_config=model.build_config, trainer_state=trainer_state,
                                       config_yaml=config_to_yaml(cfg), keep_last=tc.keep_last)
            barrier()
            return path

        # ---- The loop: one optimizer step = grad_accum micro-batches on every rank.
        bar = tqdm(total=total_steps, initial=step, disable=not (info.is_main and tc.progress), desc="train",
                   dynamic_ncols=True)
        # Loss sums of the log window and the micro-batch count, on the device: read once per log step.
        window = torch.zeros(len(loss_keys) + 1, dtype=torch.float64, device=info.device)
        window_images, window_start = 0, time.perf_counter()
        last_saved, scores, stopped_early, last_loss = -1, {}, False, float("nan")
        skipped = 0  # bad samples dropped by the datasets (data.on_error=skip), this process
        while step < total_steps and not stopped_early:
            sampler.set_position(epoch, micro_done * cfg.data.batch_size)
            for dataset in train_set.datasets:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
            batches = iter(loader)
            while step < total_steps and micro_done + tc.grad_accum <= micro_per_epoch:
                for micro in range(tc.grad_accum):
                    batch = next(batches)
                    if len(batch["images"]) == 0:
                        raise UserError(f"epoch {epoch}: a batch with no usable sample (all skipped as bad data, "
                                        f"data.on_error=skip); see the warnings that name them")
                    last_micro = micro == tc.grad_accum - 1
                    # Validated and indexed on the host, then one asynchronous copy: the step reads nothing back.
                    prepared = to_device(batch["prepared"], info.device)
                    # DDP: all-reduce gradients only on the last micro-batch of the step.
                    sync = contextlib.nullcontext() if last_micro or ddp_model is model else ddp_model.no_sync()
                    with sync:
                        with autocast:
                            output = ddp_model(prepared)
                        (output["loss"] / tc.grad_accum).backward()
                    window[:-1] += torch.stack([output[k].detach() for k in loss_keys]).double()
                    window[-1] += 1
                    if "sam_new_embeddings" in output:  # images the cache missed: read back once, written for later
                        for name, embedding in zip(prepared.sam_missing_names, output["sam_new_embeddings"].cpu(),
                                                   strict=True):
                            sam_cache.write(name, embedding)
                    window_images += len(batch["images"])
                    skipped += batch["num_skipped"]
                micro_done += tc.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
                lr = scheduler.get_last_lr()[0]  # the LR this step uses (scheduler.step() sets the next one)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)

                if step % tc.log_every == 0 or step == total_steps:
                    totals = all_reduce_sum(window)  # sums over ranks: same mean on every rank
                    means = (totals[:-1] / totals[-1]).tolist()
                    elapsed = time.perf_counter() - window_start
                    images_per_s = window_images * info.world_size / max(elapsed, 1e-9)
                    last_loss = means[0]
                    record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr,
                              "grad_norm": float(grad_norm), "images_per_s": images_per_s}
                    record.update(dict(zip(loss_keys, means, strict=True)))
                    log_record(record)
                    bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.2f}")
                    window.zero_()
                    window_images, window_start = 0, time.perf_counter()
                if val_sets and tc.val_every and step % tc.val_every == 0 and step != total_steps:
                    scores = run_validation()
                if tc.save_every and step % tc.save_every == 0:
                    checkpoint()
                    last_saved = step
                if tc.stop_after_steps is not None and step >= tc.stop_after_steps:
                    stopped_early = True  # as if the job were killed here: no final validation or checkpoint
                    break
            if micro_done + tc.grad_accum > micro_per_epoch:  # epoch exhausted (leftover micro-batches dropped)
                total_skipped = int(all_reduce_sum(torch.tensor([skipped]))[0])
                if total_skipped:
                    log(f"epoch {epoch}: {total_skipped} bad samples skipped (data.on_error=skip); see the warnings")
                    log_record({"kind": "skipped", "step": step, "epoch": epoch, "samples": total_skipped})
                epoch, micro_done, skipped = epoch + 1, 0, 0
        bar.close()

        pointing: dict[str, dict[str, float]] = {}
        if not stopped_early:
            if val_sets:
                scores = run_validation()
                for entry in val_sets:  # the frozen LMM's own grounding, for the final table
                    pointing[entry.label] = score_pointing(
                        model.lmm, val_loader(entry, cfg=cfg, info=info, pad_token_id=pad_token_id))
                log_record({"kind": "pointing", "step": step, **{f"{label}/{k}": v for label, metrics in
                                                                  pointing.items() for k, v in metrics.items()}})
            if last_saved != step:
                checkpoint()
        final = latest_checkpoint(ckpt_root)
        if info.is_main:
            if not stopped_early:
                plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
            if scores:
                print_table(report_rows(scores, compare=compare or {}, pointing=pointing),
                            title=f"validation after {step} steps: the model against the all-foreground and "
                                  f"empty-mask baselines, and the pointing accuracy of the frozen LMM's attention (%)")
            log(f"run directory: {out_dir}  (metrics.jsonl, metrics.png, config.yaml); checkpoint: {final}")
        return {"out_dir": str(out_dir), "steps": step, "checkpoint": str(final) if final else None,
                "stopped_early": stopped_early, "last_loss": last_loss, "val": scores, "pointing": pointing,
                "model": model}
    finally:
        shutdown_distributed(info)

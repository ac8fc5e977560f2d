"""The training loop that `train` and `pretrain-lmm` share, and what surrounds it: the LR schedule, seeding, the
run's `metrics.jsonl` and its plot, the resume choice and its checks.

`run_loop` is the loop, top to bottom in one function: steps of `train.grad_accum` micro-batches with gradient
clipping and the schedule, a progress bar, the log window (loss sums kept on the device, read at log steps only),
periodic validation and checkpoints, `train.stop_after_steps`, and the epoch rollover. A recipe brings what differs
(`LoopParts`): the forward and backward of one micro-batch, its validation, and the model files of its checkpoints.

A run, in order: `resume_source` (which checkpoint, or refuse to overwrite an earlier run; before any weights load),
the recipe builds its model and optimizer, `restore_trainer_state` (when resuming), `start_run_files`, `run_loop`.

Exact resume: the data order is a function of (seed, epoch) only (`ShardedSampler`), the dataset's random choices a
function of (seed, epoch, index), and the DataLoaders draw from private generators, so a resumed run that restores
the weights, optimizer, scheduler, RNG states and the position inside the epoch replays the same batches and the
same loss trajectory as a run that never stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flmm_model.checkpoint import TRAINER_STATE, atomic_write_text, check_trainer_state, latest_checkpoint
from flmm_model.config import ConfigError, ExperimentConfig, TrainConfig
from flmm_model.config_loader import config_to_yaml
from flmm_model.data.loader import make_loader
from flmm_model.data.registry import NamedDataset
from flmm_model.distributed import DistInfo, ShardedSampler, all_gather_objects, all_reduce_sum, barrier
from flmm_model.errors import CheckpointError, NonFiniteLossError, UserError
from flmm_model.run_dir import capture_rng_state, delete_checkpoints, restore_rng_state, save_checkpoint

LOSS_KEYS = ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice")  # plotted when logged
METRICS_FILE = "metrics.jsonl"


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


def append_metrics(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a line of `metrics.jsonl` (the main process only calls it)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


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


def val_loader(entry: NamedDataset, *, cfg: ExperimentConfig, info: DistInfo, pad_token_id: int,
               prepare: Any = None, replicated: bool = False) -> torch.utils.data.DataLoader:
    """This process's shard of a validation dataset (with `replicated`: all of it, on every process), in order, in
    batches of `eval.batch_size`."""
    rank, world = (0, 1) if replicated else (info.rank, info.world_size)
    sampler = ShardedSampler(len(entry.dataset), rank=rank, world_size=world, shuffle=False, pad=False)
    return make_loader(entry.dataset, sampler=sampler, batch_size=cfg.eval.batch_size,
                       num_workers=cfg.data.num_workers, pad_token_id=pad_token_id,
                       padding_side=cfg.data.padding_side, prepare=prepare,
                       pin_memory=info.device.type == "cuda")


def earlier_run_error(path: Path, *, what: str = "checkpoints of an earlier run") -> FileExistsError:
    return FileExistsError(f"{path} holds {what}: pass --resume to continue it, set train.out_dir to a new "
                           f"directory, or train.overwrite=true to delete them")


def resume_source(tc: TrainConfig, *, info: DistInfo, earlier_outputs: Sequence[Path] = (),
                  what: str = "checkpoints of an earlier run") -> Path | None:
    """Where this run resumes from, decided before any weights load; None for a fresh start.

    `train.resume=latest`: the run's `checkpoints/` when it holds a complete checkpoint (the caller loads its newest),
    else a fresh start (said). A path: that checkpoint, or a run directory. Not set: a fresh start, refused while
    `<train.out_dir>/checkpoints` (or any of `earlier_outputs`) holds an earlier run's results, unless
    `train.overwrite`, which deletes them (rank 0, after every rank has looked).

    Raises:
        FileExistsError: an earlier run would be overwritten without `train.overwrite` (`what` names it).
    """
    ckpt_root = Path(tc.out_dir) / "checkpoints"
    log = print if info.is_main else (lambda *args, **kwargs: None)
    if tc.resume == "latest":
        if latest_checkpoint(ckpt_root) is not None:
            return ckpt_root
        log(f"train.resume=latest: no checkpoint in {ckpt_root}; starting from scratch")
    elif tc.resume:
        return Path(tc.resume)
    earlier = [path for path in earlier_outputs if path.exists()]
    if latest_checkpoint(ckpt_root) is not None or earlier:
        if not tc.overwrite:
            raise earlier_run_error(ckpt_root if not earlier else Path(tc.out_dir), what=what)
        barrier()  # every rank has looked before rank 0 deletes
        if info.is_main:
            log(f"train.overwrite: deleting the earlier run's checkpoints in {ckpt_root}"
                + "".join(f" and {path}" for path in earlier))
            delete_checkpoints(ckpt_root)
            for path in earlier:  # results of the earlier run must not pass for this one's
                shutil.rmtree(path, ignore_errors=True)
    return None


def check_resume_setup(state: dict[str, Any], *, checkpoint: str | Path, world_size: int, batch_size: int,
                       grad_accum: int, total_steps: int) -> None:
    """Raise CheckpointError (a ValueError naming the saved and the current values) when this run cannot continue
    the checkpoint's.

    The data position (`micro_in_epoch`) counts micro-batches of `batch_size` samples per process, so it means other
    samples under another world size, batch size or accumulation; the LR schedule spans `total_steps`, so another
    total would either stop early or train the extra steps at LR 0. Checkpoints written before `batch_size` and
    `grad_accum` were saved are checked on what they hold. A state missing a field a resume reads, or holding one
    of the wrong type, is refused first, naming the file (`checkpoint.check_trainer_state`).
    """
    check_trainer_state(state, path=Path(checkpoint) / TRAINER_STATE)
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


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimizer steps done, the epoch, and the micro-batches (per process) done in it."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0


def restore_trainer_state(state: dict[str, Any], *, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int) -> Position:
    """Load a checkpoint's optimizer and scheduler states and this rank's RNG streams; returns its position."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"][rank])  # same world size (checked): each rank its own streams
    return Position(step=state["step"], epoch=state["epoch"], micro_in_epoch=state["micro_in_epoch"])


def start_run_files(out_dir: Path, *, cfg: ExperimentConfig, resumed_step: int | None) -> None:
    """Write the run's `config.yaml`, and rewrite `metrics.jsonl` with the records up to the resumed step: those
    after it belong to the interrupted run's lost tail, and a fresh run (`resumed_step` None) keeps none."""
    atomic_write_text(out_dir / "config.yaml", config_to_yaml(cfg))
    path = out_dir / METRICS_FILE
    kept = [] if resumed_step is None else [r for r in read_metrics(path) if r.get("step", 0) <= resumed_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


@dataclass(frozen=True)
class LoopParts:
    """What a recipe brings to `run_loop`.

    Attributes:
        micro_step: `micro_step(batch, last)`: forward and backward of one collated micro-batch (`last`: the step's
            final micro-batch, where DDP all-reduces the gradients). Returns the batch's (len(loss_keys) + 1,)
            float64 window sums on the device: the loss sums, then the count they are means over (micro-batches,
            or target tokens). Nothing is read back to the host.
        loss_keys: names of the logged means, in the order of the sums.
        model_files: the model part of a checkpoint, as `save_checkpoint` keywords (`weights` and `model_config`, or
            `write_model`); called on the main process only.
        validate: `validate(step, final)` scores the validation sets and logs their record; None without any.
    """

    micro_step: Callable[[dict[str, Any], bool], torch.Tensor]
    loss_keys: tuple[str, ...]
    model_files: Callable[[], dict[str, Any]]
    validate: Callable[[int, bool], dict[str, dict[str, float]]] | None = None


@dataclass
class LoopResult:
    """How `run_loop` ended: steps done, whether `train.stop_after_steps` stopped it, the mean loss of the last log
    window, and the last validation scores (label -> metric -> value; empty without validation)."""

    step: int
    stopped_early: bool
    last_loss: float
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def run_loop(parts: LoopParts, *, cfg: ExperimentConfig, info: DistInfo, loader: torch.utils.data.DataLoader,
             sampler: ShardedSampler, datasets: Sequence[Any], micro_per_epoch: int, total_steps: int,
             optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
             params: list[nn.Parameter], start: Position, desc: str) -> LoopResult:
    """Train from `start` to `total_steps` (or `train.stop_after_steps`); one optimizer step = `train.grad_accum`
    micro-batches on every process. Then, unless stopped early, the final validation and checkpoint.

    Args:
        parts: the recipe's micro-batch step, validation and checkpoint contents.
        cfg: the run's config (`train` drives the loop; `data.batch_size` the data position).
        info: this process (rank 0 logs and writes).
        loader, sampler: the training batches of this process; `sampler.set_position` places each epoch's start.
        datasets: the training datasets, told each epoch (`set_epoch`) for their per-epoch random choices.
        micro_per_epoch: micro-batches of an epoch per process; a step never spans two epochs (the leftover
            micro-batches of an epoch are dropped).
        total_steps: the length of the run (`schedule_steps`).
        optimizer, scheduler, params: stepped once per step; `params` are clipped to `train.grad_clip`.
        start: the resumed position (Position() for a fresh run).
        desc: the progress bar's label.
    """
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / METRICS_FILE
    step, epoch, micro_done = start.step, start.epoch, start.micro_in_epoch

    def log(*args: Any) -> None:
        if info.is_main:
            print(*args)

    def log_record(record: dict[str, Any]) -> None:
        if info.is_main:
            append_metrics(metrics_path, record)

    def check_finite(*, weights: bool = False) -> None:
        """Stop the run at the first non-finite step (a loss or gradient norm of nan / inf; with `weights`, also
        a non-finite trainable weight): from there on the weights are garbage, so nothing after the last good
        checkpoint is logged as a result or saved."""
        bad = int(first_bad.item())  # a host read: only at log steps and before saves
        if bad < 0:
            if not weights or all(bool(torch.isfinite(param).all()) for param in params):
                return
            bad = step
        good = latest_checkpoint(ckpt_root)
        kept = f"the newest good one, {good}, is kept" if good else "none was saved before"
        raise NonFiniteLossError(
            f"train: the loss or its gradient became non-finite (nan / inf) at step {bad}; the run stops and writes "
            f"no checkpoint of the diverged weights ({kept}). Lower train.lr, set train.grad_clip, use "
            f"train.precision=fp32, or check the data of that step")

    def checkpoint() -> None:
        check_finite(weights=True)
        rng_states = all_gather_objects(capture_rng_state())  # every rank's, so each resumes its own streams
        trainer_state = {
            "step": step, "epoch": epoch, "micro_in_epoch": micro_done, "total_steps": total_steps,
            "world_size": info.world_size, "batch_size": cfg.data.batch_size, "grad_accum": tc.grad_accum,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states,
        }
        if info.is_main:
            save_checkpoint(root=ckpt_root, step=step, trainer_state=trainer_state, config_yaml=config_to_yaml(cfg),
                            keep_last=tc.keep_last, **parts.model_files())
        barrier()

    bar = tqdm(total=total_steps, initial=step, disable=not (info.is_main and tc.progress), desc=desc,
               dynamic_ncols=True)
    # Loss sums of the log window and their count, on the device: read once per log step.
    window = torch.zeros(len(parts.loss_keys) + 1, dtype=torch.float64, device=info.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=info.device)  # the first non-finite step, on the device
    window_images, window_start = 0, time.perf_counter()
    last_saved, scores, stopped_early, last_loss = -1, {}, False, float("nan")
    skipped = 0  # bad samples dropped by the datasets (data.on_error=skip), this process
    while step < total_steps and not stopped_early:
        sampler.set_position(epoch, micro_done * cfg.data.batch_size)
        for dataset in datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
        batches = iter(loader)
        while step < total_steps and micro_done + tc.grad_accum <= micro_per_epoch:
            step_sums = torch.zeros_like(window)
            for micro in range(tc.grad_accum):
                batch = next(batches)
                if len(batch["images"]) == 0:
                    raise UserError(f"epoch {epoch}: a batch with no usable sample (all skipped as bad data, "
                                    f"data.on_error=skip); see the warnings that name them")
                step_sums += parts.micro_step(batch, micro == tc.grad_accum - 1)
                window_images += len(batch["images"])
                skipped += batch["num_skipped"]
            micro_done += tc.grad_accum
            window += step_sums
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            finite = torch.isfinite(step_sums).all() & torch.isfinite(grad_norm)  # no host read in a step
            first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step + 1), first_bad)
            lr = scheduler.get_last_lr()[0]  # the LR this step uses (scheduler.step() sets the next one)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == total_steps:
                check_finite()
                totals = all_reduce_sum(window)  # sums over ranks: same mean on every rank
                means = (totals[:-1] / totals[-1]).tolist()
                images_per_s = window_images * info.world_size / max(time.perf_counter() - window_start, 1e-9)
                last_loss = means[0]
                record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr, "grad_norm": float(grad_norm),
                          "images_per_s": images_per_s}
                record.update(dict(zip(parts.loss_keys, means, strict=True)))
                log_record(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.2f}")
                window.zero_()
                window_images, window_start = 0, time.perf_counter()
            if parts.validate is not None and tc.val_every and step % tc.val_every == 0 and step != total_steps:
                scores = parts.validate(step, False)
            if tc.save_every and step % tc.save_every == 0:
                checkpoint()
                last_saved = step
            if tc.stop_after_steps is not None and step >= tc.stop_after_steps:
                stopped_early = True  # as if the job were killed here: no final validation, checkpoint or export
                break
        if micro_done + tc.grad_accum > micro_per_epoch:  # epoch exhausted (leftover micro-batches dropped)
            total_skipped = int(all_reduce_sum(torch.tensor([skipped]))[0])
            if total_skipped:
                log(f"epoch {epoch}: {total_skipped} bad samples skipped (data.on_error=skip); see the warnings")
                log_record({"kind": "skipped", "step": step, "epoch": epoch, "samples": total_skipped})
            epoch, micro_done, skipped = epoch + 1, 0, 0
    bar.close()

    if not stopped_early:
        if parts.validate is not None:
            scores = parts.validate(step, True)
        if last_saved != step:
            checkpoint()
    return LoopResult(step=step, stopped_early=stopped_early, last_loss=last_loss, scores=scores)

"""`train(cfg)`: train FrozenQwenSAM's heads, top to bottom in one function over the shared loop (`recipes/loop.py`).

What it does, in order: join the torchrun process group (if any); build the datasets (a bad path fails here, before
any weights load); choose the checkpoint to resume (or refuse to overwrite an earlier run); build the model; AdamW
over the trainable parameters only; a 3% linear warm-up then cosine LR schedule; restore the checkpoint; then
`loop.run_loop` with this recipe's micro-batch step (bf16 autocast on CUDA, DDP gradient sync on the last
micro-batch of a step), its validation (each dataset's own metric, with the trivial baselines; at the end also the
pointing accuracy of the frozen LMM's attention) and its checkpoint contents (the trainable tensors); last, the
final table. Resume is exact (see `recipes/loop.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from flmm_model.build import check_model_paths, prompt_settings
from flmm_model.checkpoint import (
    TRAINER_STATE,
    check_trainer_state,
    latest_checkpoint,
    load_checkpoint,
    settings_differ,
)
from flmm_model.config import ConfigError, ExperimentConfig
from flmm_model.data.lmm_cache import LMMCacheWriter, check_cacheable, sentence_draws
from flmm_model.data.loader import make_loader
from flmm_model.data.registry import NamedDataset, build_datasets
from flmm_model.device import to_device
from flmm_model.distributed import (
    ShardedSampler,
    any_rank,
    autocast_context,
    check_device,
    frozen_mesh,
    in_turn,
    init_distributed,
    place_model,
    precision_of,
    shutdown_distributed,
    wrap_ddp,
)
from flmm_model.errors import CheckpointError
from flmm_model.model import build_model
from flmm_model.recipes.loop import (
    LOSS_KEYS,
    LoopParts,
    Position,
    WarmupCosine,
    append_metrics,
    check_resume_setup,
    earlier_run_error,
    plot_metrics,
    read_metrics,
    restore_trainer_state,
    resume_source,
    run_loop,
    schedule_steps,
    seed_everything,
    start_run_files,
    val_loader,
    warmup_cosine,
)
from flmm_model.recipes.pointing import pointing_rows, score_pointing
from flmm_model.recipes.scoring import answers_first, print_table, score_dataset
from flmm_model.run_dir import acquire_run_lock, prepare_output_dir, release_run_lock

# The loop's helpers, importable from here as before the loop had its own module.
__all__ = ["LOSS_KEYS", "WarmupCosine", "check_resume_setup", "check_run_setup", "earlier_run_error",
           "plot_metrics", "read_metrics", "schedule_steps", "seed_everything", "train", "train_with_ablation",
           "val_loader", "validate", "warmup_cosine"]

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


def attention_only_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The attention-only ablation of a run: the same config with `model.attention_only=true` (the U-Net alone on
    the attention maps: no text prompts, no SAM, only the coarse-mask loss), in `<train.out_dir>/attention_only`.
    A resumed run resumes its ablation from the ablation's own newest checkpoint."""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, attention_only=True),
        data=dataclasses.replace(cfg.data, sam_cache=None),  # no SAM: no SAM embeddings to read
        train=dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir) / "attention_only"),
                                  attention_only_baseline=False, resume="latest" if cfg.train.resume else None))


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
    if tc.resume and (tc.resume != "latest" or latest_checkpoint(ckpt_root) is not None):
        resume = load_checkpoint(ckpt_root if tc.resume == "latest" else tc.resume, trainer_state=True)
        check_trainer_state(resume.trainer_state, path=resume.directory / TRAINER_STATE)
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


def validate(model: torch.nn.Module, val_sets: list[NamedDataset], *, cfg: ExperimentConfig, info: Any,
             autocast: Any, pad_token_id: int) -> dict[str, dict[str, float]]:
    """Score every validation dataset with its own metric (sharded over ranks, metric sums reduced), with the
    trivial baselines."""
    scores: dict[str, dict[str, float]] = {}
    for entry, ds in zip(val_sets, cfg.data.val, strict=True):
        replicated = model.lmm.sharded and answers_first(ds)  # see `score_dataset`
        loader = val_loader(entry, cfg=cfg, info=info, pad_token_id=pad_token_id,
                            prepare=model.batch_preparer(targets=False), replicated=replicated)
        scores[entry.label] = score_dataset(model, loader, metric=entry.metric, autocast=autocast, baselines=True,
                                            progress=False, desc=f"val {entry.label}", replicated=replicated)
    return scores


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
    lock = None
    threads = torch.get_num_threads()  # restored at the end: `run.main` called from Python leaves the process as it was
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
            lock = acquire_run_lock(out_dir)  # a second run on this directory refuses to start

        # ---- Data first: missing files or an empty split fail before any weights load.
        if not cfg.data.train:
            raise ConfigError("data.train: no training dataset configured")
        prompt = prompt_settings(cfg.model)
        data_options = dict(data_root=cfg.data.root, prompt=prompt, on_error=cfg.data.on_error)
        build_entries = build_datasets(cfg.data.train, train=True, **data_options)
        train_set = torch.utils.data.ConcatDataset([entry.dataset for entry in build_entries])
        val_sets = build_datasets(cfg.data.val, train=False, **data_options)  # each scored with its own metric
        pad_token_id = prompt.tokenizer.pad_token_id
        sampler = ShardedSampler(len(train_set), rank=info.rank, world_size=info.world_size, shuffle=True,
                                 seed=tc.seed, pad=True)
        micro_per_epoch = math.ceil(sampler.shard_size() / cfg.data.batch_size)
        total_steps, warmup_steps = schedule_steps(tc, micro_per_epoch=micro_per_epoch)

        # ---- Which checkpoint to resume from (or refuse to overwrite one), still before any weights load.
        # Everything is read into memory now: the checkpoint may be re-saved or pruned later in this run.
        source = resume_source(tc, info=info)
        resume = load_checkpoint(source, trainer_state=True) if source is not None else None
        if resume is not None:
            differ = settings_differ(resume.model_config(), cfg.model)
            if differ:
                raise CheckpointError(f"train.resume: {resume.directory} was trained with other model settings "
                                      f"({'; '.join(differ)}); its heads and optimizer state belong to those. Resume "
                                      f"with the checkpoint's settings, or start a new run")
            check_resume_setup(resume.trainer_state, checkpoint=resume.directory, world_size=info.world_size,
                               batch_size=cfg.data.batch_size, grad_accum=tc.grad_accum, total_steps=total_steps)

        # ---- Model, optimizer (trainable parameters only), schedule.
        autocast = autocast_context(info.device, tc.precision)
        mesh = frozen_mesh(cfg.model.shard_lmm, info)  # a sharded LMM's mesh, built by every process together

        def build_and_place() -> tuple[Any, Any, Any, str]:
            """The model on the CPU, the caches opened against its whole weights (their fingerprints), then onto
            the device, each process keeping its shard of the LMM's blocks with model.shard_lmm=fsdp."""
            built = build_model(cfg.model)
            sam, lmm = None, None
            if cfg.data.sam_cache:  # refused here, before any step, if built for another SAM setup
                sam = built.open_sam_cache(cfg.data.sam_cache, precision=precision_of(autocast))
            if cfg.data.lmm_cache:  # the same for the LMM's outputs, and for data that changes between epochs
                check_cacheable(build_entries)
                lmm = built.open_lmm_cache(cfg.data.lmm_cache, precision=precision_of(autocast),
                                           sentence_draws=sentence_draws(cfg.data.train))
            return built, sam, lmm, place_model(built, built.lmm, cfg.model.shard_lmm, info, mesh=mesh)

        # A sharded LMM: the processes load one at a time (each holds the whole checkpoint in host memory until
        # sharding sends its blocks to the device).
        model, sam_cache, lmm_cache, placement = in_turn(info, build_and_place, enabled=mesh is not None)
        log(placement)
        loss_keys = LOSS_KEYS if model.sam_refiner is not None else LOSS_KEYS[:3]  # attention-only: no SAM terms
        lmm_writer = LMMCacheWriter(lmm_cache, samples=len(train_set)) if lmm_cache is not None else None
        if tc.compile:
            model.compile_parts()
        params = model.trainable_parameters()
        # Fused AdamW on CUDA: one kernel for all parameters (on the CPU: the default loop).
        optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                      fused=info.device.type == "cuda" or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps))

        # ---- Resume: weights, optimizer, scheduler, RNG states and the position in the data.
        start = Position()
        if resume is not None:  # checked against this run's setup before the model was built
            model.load_trainable_state_dict(resume.weights, strict=True)  # copied into the placed parameters
            start = restore_trainer_state(resume.trainer_state, optimizer=optimizer, scheduler=scheduler,
                                          rank=info.rank)
            log(f"resumed from {resume.directory} at step {start.step} (epoch {start.epoch}, micro-batch "
                f"{start.micro_in_epoch})")
        if info.is_main:
            start_run_files(out_dir, cfg=cfg, resumed_step=start.step if resume is not None else None)
            summary = model.parameter_summary()
            log("parameters (trainable / frozen): " + ", ".join(f"{part} {t:,} / {f:,}" for part, (t, f)
                                                                in summary.items()))
            log(f"{len(train_set)} training samples, {info.world_size} process(es) x {cfg.data.batch_size} images x "
                f"{tc.grad_accum} accumulation = {info.world_size * cfg.data.batch_size * tc.grad_accum} per step; "
                f"{total_steps} steps ({micro_per_epoch // tc.grad_accum} per epoch), warm-up {warmup_steps}")
        ddp_model = wrap_ddp(model, info, find_unused_parameters=tc.find_unused_parameters)
        model.train()
        # The loader's workers also build the heads' image inputs and targets (and read the SAM cache); batches come
        # pinned on CUDA.
        loader = make_loader(train_set, sampler=sampler, batch_size=cfg.data.batch_size,
                             num_workers=cfg.data.num_workers, pad_token_id=pad_token_id,
                             padding_side=cfg.data.padding_side, prepare=model.batch_preparer(sam_cache=sam_cache,
                                                                                  lmm_cache=lmm_cache),
                             pin_memory=info.device.type == "cuda")
        one = torch.ones(1, dtype=torch.float64, device=info.device)  # the window counts micro-batches

        def micro_step(batch: dict[str, Any], last_micro: bool) -> torch.Tensor:
            # Validated and indexed on the host, then one asynchronous copy: the step reads nothing back.
            prepared = to_device(batch["prepared"], info.device)
            if model.lmm.sharded and lmm_cache is not None and any_rank(prepared.lmm_cached is None):
                prepared = dataclasses.replace(prepared, lmm_cached=None)  # another rank runs the LMM: so does this
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last_micro or ddp_model is model else ddp_model.no_sync()
            with sync:
                with autocast:
                    output = ddp_model(prepared)
                (output["loss"] / tc.grad_accum).backward()
            if "sam_new_embeddings" in output:  # images the cache missed: read back once, written for later
                for name, embedding in zip(prepared.sam_missing_names, output["sam_new_embeddings"].cpu(),
                                           strict=True):
                    sam_cache.write(name, embedding)
            if "lmm_new_entries" in output:  # samples the LMM-output cache missed (the first epoch)
                lmm_writer.write(output["lmm_new_entries"])
            return torch.cat([torch.stack([output[k].detach() for k in loss_keys]).double(), one])  # (K + 1,)

        pointing: dict[str, dict[str, float]] = {}

        def run_validation(step: int, final: bool) -> dict[str, dict[str, float]]:
            model.eval()
            scores = validate(model, val_sets, cfg=cfg, info=info, autocast=autocast, pad_token_id=pad_token_id)
            model.train()
            record: dict[str, Any] = {"kind": "val", "step": step}
            for label, metrics in scores.items():
                record.update({f"{label}/{k}": v for k, v in metrics.items()})
                if metrics["count_skipped"]:
                    log(f"validation {label}: {metrics['count_skipped']} bad samples skipped (data.on_error=skip)")
            if info.is_main:
                append_metrics(metrics_path, record)
                plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
            if final:  # the frozen LMM's own grounding, for the final table
                for entry in val_sets:
                    pointing[entry.label] = score_pointing(
                        model.lmm, val_loader(entry, cfg=cfg, info=info, pad_token_id=pad_token_id))
                if info.is_main:
                    append_metrics(metrics_path, {"kind": "pointing", "step": step, **{
                        f"{label}/{k}": v for label, metrics in pointing.items() for k, v in metrics.items()}})
            return scores

        parts = LoopParts(micro_step=micro_step, loss_keys=loss_keys, validate=run_validation if val_sets else None,
                          model_files=lambda: {"weights": model.trainable_state_dict(),
                                               "model_config": model.build_config})
        result = run_loop(parts, cfg=cfg, info=info, loader=loader, sampler=sampler, datasets=train_set.datasets,
                          micro_per_epoch=micro_per_epoch, total_steps=total_steps, optimizer=optimizer,
                          scheduler=scheduler, params=params, start=start, desc="train")

        final = latest_checkpoint(ckpt_root)
        if info.is_main:
            if not result.stopped_early:
                plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
            if result.scores:
                print_table(report_rows(result.scores, compare=compare or {}, pointing=pointing),
                            title=f"validation after {result.step} steps: the model against the all-foreground and "
                                  f"empty-mask baselines, and the pointing accuracy of the frozen LMM's attention (%)")
            log(f"run directory: {out_dir}  (metrics.jsonl, metrics.png, config.yaml); checkpoint: {final}")
        return {"out_dir": str(out_dir), "steps": result.step, "checkpoint": str(final) if final else None,
                "stopped_early": result.stopped_early, "last_loss": result.last_loss, "val": result.scores,
                "pointing": pointing, "model": model}
    finally:
        release_run_lock(lock)
        shutdown_distributed(info)
        torch.set_num_threads(threads)

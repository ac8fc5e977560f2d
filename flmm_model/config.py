"""The schema of every YAML in `configs/`: OmegaConf structured dataclasses and their cross-field checks.

Each dataclass field carries its help text (shown by `run.py <command> --help`) and, where the values are a closed
set, its choices. Reading a YAML, applying `key=value` overrides and checking types live in `config_loader.py`;
which dataset types exist is the data registry's business (`flmm_model.data.kinds`, `flmm_model.data.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from flmm_model.errors import UserError

# F-LMM's user instruction after the image, in every one of its configs (the frozen LMM's attention depends on it).
DEFAULT_INSTRUCTION = "Please give me a description of the image."

class ConfigError(UserError, ValueError):
    """A config file or an override does not fit the schema. The message names the key."""


def _field(default: Any = MISSING, *, help: str, choices: list[Any] | None = None, factory: Any = None) -> Any:
    """A dataclass field whose metadata carries the help text (shown by `run.py <command> --help`) and choices."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """What `flmm_model.model.build_model` needs to build a FrozenQwenSAM."""

    qwen: str = _field("tiny", help="local Qwen-VL checkpoint dir (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, "
                                    "Qwen3.5 or Qwen3.5-MoE: its config.json says which), or a preset with random "
                                    "weights: tiny | mid | qwen2_vl_tiny | qwen3_vl_tiny | qwen3_vl_moe_tiny | "
                                    "qwen3_5_tiny | qwen3_5_moe_tiny | qwen2_vl_2b | qwen2_vl_7b | qwen2_5_vl_3b | "
                                    "qwen2_5_vl_7b | qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b | qwen3_vl_30b_a3b | "
                                    "qwen3_5_9b | qwen3_5_27b | qwen3_5_35b_a3b")
    sam: str = _field("tiny", help="local SAM dir in the transformers layout (see `run.py convert-sam`), or preset: "
                                  "tiny | sam_vit_b | sam_vit_l | sam_vit_h; or a SAM2 / SAM2.1 dir (transformers "
                                  "layout, e.g. facebook/sam2.1-hiera-large) or preset: sam2_tiny | sam2.1_hiera_tiny "
                                  "| sam2.1_hiera_small | sam2.1_hiera_base_plus | sam2.1_hiera_large (random weights)")
    tokenizer: str | None = _field(None, help="tokenizer dir; null = the bundled real tokenizer of the "
                                   "model's vocabulary (Qwen2's, or Qwen3.5's)")
    dtype: str = _field("float32", help="dtype of the frozen Qwen and SAM encoder",
                        choices=["float32", "bfloat16", "float16"])
    attn_capture: str = _field("sdpa", help="text->image attention capture: sdpa (lean) | eager (F-LMM reference)",
                               choices=["sdpa", "eager"])
    shard_lmm: str = _field("none", help="under torchrun (train, eval, predict, chat): none (every process holds "
                                         "the whole frozen LMM) | fsdp (FSDP2 shards its vision blocks and decoder "
                                         "layers across the processes; for an LMM too large for one GPU); the heads "
                                         "stay under DDP",
                            choices=["none", "fsdp"])
    min_pixels: int = _field(3136, help="Qwen image processor: minimum pixels of the resized image")
    max_pixels: int = _field(451584, help="Qwen image processor: maximum pixels (672*672 = 576 vision tokens)")
    mask_head_widths: list[int] = _field(help="U-Net stage widths", factory=lambda: [64, 128, 256, 512])
    mask_head_size: int = _field(64, help="longest side of the attention maps fed to the U-Net")
    bce_weight: float = _field(1.0, help="weight of the BCE terms (coarse and SAM masks)")
    dice_weight: float = _field(1.0, help="weight of the Dice terms (coarse and SAM masks)")
    instruction: str = _field(DEFAULT_INSTRUCTION, help="user-turn instruction after the image (F-LMM's by "
                                                        "default: the frozen LMM's attention depends on every "
                                                        "character)")
    system: str | None = _field(None, help="system prompt; null = the backbone's chat-template default")
    max_length: int = _field(2048, help="longest compact token sequence (one token per image placeholder); a "
                                        "longer sample is bad data (raise or skip), a longer segment() text an "
                                        "error. eval / predict take it from this config, not the checkpoint")
    seed: int = _field(0, help="seed for the random weights of presets and the trainable heads")
    attention_only: bool = _field(False, help="ablation: masks from the U-Net on the attention maps alone (no "
                                              "hidden-state text prompts, no SAM; model.sam is not built)")
    qwen_pretrain: str | None = _field(None, help="a `run.py pretrain-lmm` config whose output is model.qwen; "
                                                  "`run.py train` runs it first when model.qwen does not exist")


@dataclass
class DatasetConfig:
    """One dataset split. Paths default to the layout under `data.root` (see README)."""

    type: str = _field(help="dataset type: a key of flmm_model.data.kinds.DATASET_KINDS (refcoco | refcoco+ | "
                            "refcocog | png | reason_seg | synthetic | ref_youtube_vos | mevis | revos | "
                            "synthetic_clips)")
    split: str = _field("train", help="refcoco*: train | val | testA | testB | test; png: train | val; "
                                      "reason_seg: train | val | test; "
                                      "synthetic: any name (without a seed, the name seeds the samples)")
    root: str | None = _field(None, help="data root of this dataset; null = data.root")
    split_by: str | None = _field(None, help="refcoco*: REFER split file (unc | umd | google); null = the "
                                                "usual one (unc, refcocog: umd)")
    image_dir: str | None = _field(None, help="image folder; null = the COCO folder under the root")
    ann_dir: str | None = _field(None, help="png: annotation folder; null = <root>/annotations")
    protocol: str = _field("flmm", help="evaluation protocol. refcoco*: flmm (first sentence per ref, all refs of "
                                        "an image in one sample) | per_sentence (one sample per sentence, LISA). "
                                        "reason_seg: flmm (answer the question, ground the answer) | direct "
                                        "(ground the query itself, no generation)",
                           choices=["flmm", "per_sentence", "direct"])
    sentence: str = _field("raw_lower", help="refcoco*: sentence field: raw_lower (F-LMM: REFER's raw text, lower "
                                             "case) | sent (REFER's normalised text) | raw",
                           choices=["raw_lower", "sent", "raw"])
    sentence_draw: str = _field("once", help="refcoco* training: once (F-LMM: one random sentence per ref for the "
                                             "whole run) | per_epoch (a new draw every epoch)",
                                choices=["once", "per_epoch"])
    length: int = _field(0, help="synthetic: number of samples")
    image_size: list[int] | None = _field(None, help="synthetic: [min, max] image side in pixels; null = the "
                                                     "dataset's default")
    max_objects: int | None = _field(None, help="synthetic: at most this many shapes per image; null = default")
    object_size: list[float] | None = _field(None, help="synthetic: [min, max] shape size as a fraction of the "
                                                        "shorter side; null = default")
    seed: int | None = _field(None, help="seed of random choices inside the dataset (sentence per ref, synthetic "
                                         "images); null = derived from the split name, so splits differ")
    max_frames: int = _field(16, help="video datasets: the frame budget of a clip; a longer clip is sampled "
                                      "evenly (data.clips.sample_frames), never cut")
    num_frames: int = _field(8, help="synthetic_clips: frames per clip")
    group_tokens: int = _field(256, help="video datasets: the most vision tokens per frame group (2 frames)")
    max_samples: int | None = _field(None, help="use only the first N samples (quick validation); null = all")
    name: str | None = _field(None, help="label in logs and tables; null = <type>_<split>")


@dataclass
class DataConfig:
    """Datasets and loading."""

    root: str = _field("", help="default data root of every dataset (the COCO-style layout in the README)")
    train: list[DatasetConfig] = _field(help="training datasets (concatenated)", factory=list)
    val: list[DatasetConfig] = _field(help="validation datasets scored during training", factory=list)
    test: list[DatasetConfig] = _field(help="datasets scored by `run.py eval`", factory=list)
    batch_size: int = _field(2, help="images per process and micro-batch")
    num_workers: int = _field(0, help="DataLoader worker processes")
    padding_side: str = _field("right", help="padding side of input_ids", choices=["right", "left"])
    on_error: str = _field("raise", help="bad sample: raise | skip (counted and reported)",
                           choices=["raise", "skip"])
    sam_cache: str | None = _field(None, help="directory of SAM image embeddings: read by the loader, missing ones "
                                              "computed and written in the step (`run.py cache-sam` fills it "
                                              "beforehand); refused if built for another SAM checkpoint, input size, "
                                              "precision or pixel budget; null = no cache")
    lmm_cache: str | None = _field(None, help="directory of the frozen LMM's outputs per training sample (attention "
                                              "maps, phrase hidden states): written in the first epoch (or by "
                                              "`run.py cache-lmm`), read in later ones, so a cached step runs the "
                                              "heads alone; refused if built for other LMM weights, prompt, "
                                              "sentence draw, pixel budget, dtype or precision, and for "
                                              "sentence_draw=per_epoch; null = no cache")


@dataclass
class TrainConfig:
    """The training loop (`run.py train`)."""

    out_dir: str = _field("runs/demo", help="run directory: config, metrics.jsonl, plot, checkpoints")
    epochs: int = _field(1, help="passes over the training data")
    max_steps: int | None = _field(None, help="total optimizer steps (overrides epochs; data repeats)")
    stop_after_steps: int | None = _field(None, help="stop after this many steps as if interrupted (the LR "
                                                        "schedule still spans the whole run); for resume tests")
    lr: float = _field(1e-4, help="AdamW peak learning rate")
    betas: list[float] = _field(help="AdamW betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = _field(0.01, help="AdamW weight decay")
    warmup_ratio: float = _field(0.03, help="fraction of the steps with linear warm-up (then cosine to 0)")
    grad_clip: float = _field(1.0, help="max global gradient norm; 0 = no clipping")
    grad_accum: int = _field(1, help="micro-batches per optimizer step")
    precision: str = _field("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16",
                            choices=["auto", "fp32", "bf16"])
    device: str = _field("auto", help="auto (cuda:<local rank> if available, else cpu) | cpu | cuda | cuda:N")
    num_threads: int | None = _field(None, help="CPU threads for torch; null = torch's default")
    log_every: int = _field(10, help="steps between metrics.jsonl lines")
    val_every: int = _field(0, help="steps between validations; 0 = only at the end")
    save_every: int = _field(0, help="steps between checkpoints; 0 = only at the end")
    keep_last: int = _field(2, help="checkpoints kept (older ones are deleted)")
    resume: str | None = _field(None, help="'latest' (newest checkpoint in out_dir) or a checkpoint dir")
    overwrite: bool = _field(False, help="a fresh run (no resume) may delete the checkpoints already in out_dir")
    seed: int = _field(0, help="seed of data order and RNGs")
    find_unused_parameters: bool = _field(True, help="DDP: tolerate trainable parameters without gradient "
                                                     "(e.g. SAM prompt embeddings a step does not use)")
    progress: bool = _field(True, help="show a progress bar (rank 0)")
    compile: bool = _field(False, help="torch.compile the vision blocks, text decoder layers, SAM encoder layers and "
                                       "the heads (dynamic shapes); off by default: not measured faster yet")
    attention_only_baseline: bool = _field(False, help="`run.py train` first trains the same heads with "
                                                       "model.attention_only=true (same data, steps, seed) in "
                                                       "<out_dir>/attention_only; its scores join the final table")


@dataclass
class EvalConfig:
    """Scoring `data.test` (`run.py eval`)."""

    checkpoint: str | None = _field(None, help="checkpoint dir (or a run dir: its newest checkpoint)")
    out_dir: str | None = _field(None, help="where eval.json goes; null = <run dir>/eval/<checkpoint>.json (never "
                                            "inside a checkpoint)")
    batch_size: int = _field(2, help="images per process and batch")
    device: str = _field("auto", help="auto | cpu | cuda | cuda:N")
    precision: str = _field("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16",
                            choices=["auto", "fp32", "bf16"])
    progress: bool = _field(True, help="show a progress bar (rank 0)")


@dataclass
class ExperimentConfig:
    """One complete experiment: every YAML in `configs/` is an instance of this."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SEED_LIMIT = 2**32  # numpy's global seed (`np.random.seed`, seeded with train.seed) takes 0 <= seed < 2**32


def _check_range(key: str, value: float, *, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False) -> None:
    """ConfigError naming `key` unless `value` is a finite number in the interval (low / high open or closed)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ConfigError(f"{key}: expected a value in {interval}, found {value}")


def check_values(cfg: ExperimentConfig) -> None:
    """Cross-field and range checks the types alone cannot express (per-dataset checks: the data registry).

    Every numeric key has its range here, checked when the config loads (before any file or weight is read): counts
    of steps, samples and batches are positive; learning rate positive; betas in [0, 1); weights, decay and clipping
    non-negative; seeds in [0, 2**32); every float finite.
    """
    positive = {
        "data.batch_size": cfg.data.batch_size, "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum, "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last, "eval.batch_size": cfg.eval.batch_size,
        "model.mask_head_size": cfg.model.mask_head_size, "model.max_length": cfg.model.max_length,
        "model.min_pixels": cfg.model.min_pixels, "model.max_pixels": cfg.model.max_pixels,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, found {value}")
    optional_positive = {"train.max_steps": cfg.train.max_steps, "train.stop_after_steps": cfg.train.stop_after_steps,
                         "train.num_threads": cfg.train.num_threads}
    for key, value in optional_positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: expected a positive integer or null, found {value}")
    non_negative = {"data.num_workers": cfg.data.num_workers, "train.val_every": cfg.train.val_every,
                    "train.save_every": cfg.train.save_every}
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: expected an integer >= 0, found {value}")
    for key, seed in (("model.seed", cfg.model.seed), ("train.seed", cfg.train.seed)):
        if not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"{key}: expected a seed in [0, 2**32), found {seed}")
    _check_range("train.lr", cfg.train.lr, low=0.0, low_open=True)
    _check_range("train.weight_decay", cfg.train.weight_decay, low=0.0)
    _check_range("train.grad_clip", cfg.train.grad_clip, low=0.0)
    _check_range("train.warmup_ratio", cfg.train.warmup_ratio, low=0.0, high=1.0, high_open=True)
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: expected 2 values, found {len(cfg.train.betas)}")
    for index, beta in enumerate(cfg.train.betas):
        _check_range(f"train.betas.{index}", beta, low=0.0, high=1.0, high_open=True)
    _check_range("model.bce_weight", cfg.model.bce_weight, low=0.0)
    _check_range("model.dice_weight", cfg.model.dice_weight, low=0.0)
    if cfg.model.bce_weight == 0 and cfg.model.dice_weight == 0:
        raise ConfigError("model.bce_weight, model.dice_weight: both are 0, so no loss would train the heads; set "
                          "at least one above 0")
    widths = cfg.model.mask_head_widths
    if len(widths) < 2 or any(width < 1 for width in widths):
        raise ConfigError(f"model.mask_head_widths: expected at least 2 positive widths (the U-Net's levels), found "
                          f"{widths}")
    if cfg.data.sam_cache and cfg.model.attention_only:
        raise ConfigError(f"data.sam_cache: set to {cfg.data.sam_cache!r}, but model.attention_only=true builds no "
                          f"SAM, so there are no SAM embeddings to cache or read; set data.sam_cache=null")
    if cfg.data.lmm_cache:
        for index, ds in enumerate(cfg.data.train):
            if ds.sentence_draw == "per_epoch" and ds.type.startswith("refcoco"):
                raise ConfigError(f"data.train.{index}.sentence_draw: per_epoch draws a sample's sentence anew every "
                                  f"epoch, so its LMM outputs change and data.lmm_cache ({cfg.data.lmm_cache!r}) "
                                  f"would never be read; use sentence_draw=once (F-LMM's recipe) or set "
                                  f"data.lmm_cache=null")
    if cfg.model.shard_lmm == "fsdp":
        if cfg.train.compile:
            raise ConfigError("train.compile: compiling a sharded LMM (model.shard_lmm=fsdp) is not supported yet; "
                              "set train.compile=false or model.shard_lmm=none")
    if cfg.model.min_pixels > cfg.model.max_pixels:
        raise ConfigError(f"model.min_pixels: expected at most model.max_pixels ({cfg.model.max_pixels}), "
                          f"found {cfg.model.min_pixels}")
    for section in ("train", "val", "test"):
        for index, ds in enumerate(getattr(cfg.data, section)):
            for name in ("image_size", "object_size"):
                value = getattr(ds, name)
                if value is not None and (len(value) != 2 or value[0] > value[1]):
                    raise ConfigError(f"data.{section}.{index}.{name}: expected [min, max], found {value}")
            if ds.seed is not None and not 0 <= ds.seed < SEED_LIMIT:
                raise ConfigError(f"data.{section}.{index}.seed: expected a seed in [0, 2**32) or null, found "
                                  f"{ds.seed}")
            for name in ("max_samples", "max_objects"):
                value = getattr(ds, name)
                if value is not None and value < 1:
                    raise ConfigError(f"data.{section}.{index}.{name}: expected a positive integer or null, found "
                                      f"{value}")

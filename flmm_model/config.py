"""The schema of every YAML in `configs/`: OmegaConf structured dataclasses, strict validation, `key=value` overrides.

A config is loaded in three steps, all before any weights load:
1. the YAML file is read as a plain container (interpolations such as `${data.root}` kept as text);
2. command-line overrides `a.b.c=value` (list items by index: `data.train.0.root=/data`) are applied to it;
3. the container is checked against the dataclasses below (unknown key -> error naming the key and the closest
   known keys; wrong type -> error naming the key, the expected and the found type; a value outside its choices ->
   error listing them), then merged into the schema and resolved.

`load_config(path, overrides)` returns a plain `ExperimentConfig` dataclass; `config_to_yaml(cfg)` writes it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or an override does not fit the schema. The message names the key."""


def _field(default: Any = MISSING, *, help: str, choices: list[Any] | None = None, factory: Any = None) -> Any:
    """A dataclass field whose metadata carries the help text (shown by `run.py <command> --help`) and choices."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DATASET_TYPES = ["refcoco", "refcoco+", "refcocog", "png", "synthetic"]
REFCOCO_TYPES = ["refcoco", "refcoco+", "refcocog"]


@dataclass
class ModelConfig:
    """What `flmm_model.build.build_model` needs to build a FrozenQwenSAM."""

    qwen: str = _field("tiny", help="local Qwen2.5-VL checkpoint dir, or preset: tiny | mid | qwen2_5_vl_3b | "
                                    "qwen2_5_vl_7b (random weights)")
    sam: str = _field("tiny", help="local SAM dir in the transformers layout (see `run.py convert-sam`), or preset: "
                                  "tiny | sam_vit_b | sam_vit_l | sam_vit_h (random weights)")
    tokenizer: str | None = _field(None, help="tokenizer dir; null = the bundled real Qwen tokenizer")
    dtype: str = _field("float32", help="dtype of the frozen Qwen and SAM encoder",
                        choices=["float32", "bfloat16", "float16"])
    attn_capture: str = _field("sdpa", help="text->image attention capture: sdpa (lean) | eager (F-LMM reference)",
                               choices=["sdpa", "eager"])
    min_pixels: int = _field(3136, help="Qwen image processor: minimum pixels of the resized image")
    max_pixels: int = _field(451584, help="Qwen image processor: maximum pixels (672*672 = 576 vision tokens)")
    mask_head_widths: list[int] = _field(help="U-Net stage widths", factory=lambda: [64, 128, 256, 512])
    mask_head_size: int = _field(64, help="longest side of the attention maps fed to the U-Net")
    bce_weight: float = _field(1.0, help="weight of the BCE terms (coarse and SAM masks)")
    dice_weight: float = _field(1.0, help="weight of the Dice terms (coarse and SAM masks)")
    instruction: str | None = _field(None, help="user-turn instruction; null = the built-in one")
    seed: int = _field(0, help="seed for the random weights of presets and the trainable heads")
    attention_only: bool = _field(False, help="ablation: masks from the U-Net on the attention maps alone (no "
                                              "hidden-state text prompts, no SAM; model.sam is not built)")
    qwen_pretrain: str | None = _field(None, help="a `run.py pretrain-lmm` config whose output is model.qwen; "
                                                  "`run.py train` runs it first when model.qwen does not exist")


@dataclass
class DatasetConfig:
    """One dataset split. Paths default to the layout under `data.root` (see README)."""

    type: str = _field(help="dataset kind", choices=DATASET_TYPES)
    split: str = _field("train", help="refcoco*: train | val | testA | testB | test; png: train | val; "
                                      "synthetic: any name (without a seed, the name seeds the samples)")
    root: str | None = _field(None, help="data root of this dataset; null = data.root")
    split_by: str | None = _field(None, help="refcoco*: REFER split file (unc | umd | google); null = the "
                                                "usual one (unc, refcocog: umd)")
    image_dir: str | None = _field(None, help="image folder; null = the COCO folder under the root")
    ann_dir: str | None = _field(None, help="png: annotation folder; null = <root>/annotations")
    protocol: str = _field("flmm", help="evaluation samples: flmm (first sentence per ref, all refs of an image in "
                                        "one sample) | per_sentence (one sample per sentence, LISA)",
                           choices=["flmm", "per_sentence"])
    length: int = _field(0, help="synthetic: number of samples")
    image_size: list[int] | None = _field(None, help="synthetic: [min, max] image side in pixels; null = the "
                                                     "dataset's default")
    max_objects: int | None = _field(None, help="synthetic: at most this many shapes per image; null = default")
    object_size: list[float] | None = _field(None, help="synthetic: [min, max] shape size as a fraction of the "
                                                        "shorter side; null = default")
    seed: int | None = _field(None, help="seed of random choices inside the dataset (sentence per ref, synthetic "
                                         "images); null = derived from the split name, so splits differ")
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
    attention_only_baseline: bool = _field(False, help="`run.py train` first trains the same heads with "
                                                       "model.attention_only=true (same data, steps, seed) in "
                                                       "<out_dir>/attention_only; its scores join the final table")


@dataclass
class EvalConfig:
    """Scoring `data.test` (`run.py eval`)."""

    checkpoint: str | None = _field(None, help="checkpoint dir (or a run dir: its newest checkpoint)")
    out_dir: str | None = _field(None, help="where eval.json goes; null = the checkpoint dir")
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


# ----------------------------------------------------------------------------------------------------------------
# Validation of a plain container against the dataclasses.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _found(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {value!r}" if not isinstance(value, (dict, list)) else kind


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, tp: Any, key: str) -> None:
    """Raise ConfigError when `value` (from YAML or an override) does not fit type `tp` at `key`."""
    if _is_interpolation(value):
        return  # checked after resolution by OmegaConf
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return
        _check(value, args[0], key)
        return
    if value is None:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        _check_dataclass(value, tp, key)
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        (item_type,) = typing.get_args(tp)
        for index, item in enumerate(value):
            _check(item, item_type, f"{key}.{index}")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        for sub_key, item in value.items():
            _check(item, typing.get_args(tp)[1], f"{key}.{sub_key}")
        return
    if tp is Any:
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"schema type {tp!r} at {key} is not supported by the validator")
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")


def _unknown_key_error(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{key}: unknown key{hint} (known keys here: {', '.join(known)})")


def _check_dataclass(value: dict[str, Any], cls: type, prefix: str) -> None:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, item in value.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key_error(key, str(name), list(fields))
        _check(item, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices and item is not None and not _is_interpolation(item) and item not in choices:
            raise ConfigError(f"{key}: expected one of {choices}, found {item!r}")
    for name, fld in fields.items():
        required = fld.default is MISSING and fld.default_factory is dataclasses.MISSING
        if required and name not in value:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key}: required key missing ({fld.metadata.get('help', '')})")


def validate_container(container: dict[str, Any]) -> None:
    """Check a plain dict (a loaded YAML with overrides applied) against `ExperimentConfig`."""
    if not isinstance(container, dict):
        raise ConfigError(f"config: expected a mapping at the top level, found {_found(container)}")
    _check_dataclass(container, ExperimentConfig, "")


# ----------------------------------------------------------------------------------------------------------------
# Overrides.

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override_value(text: str) -> Any:
    """YAML scalar / flow syntax: `3`, `1e-4`, `true`, `null`, `[64, 128]`, `"a string"`, `/a/path`."""
    if text.strip() == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 1e-4 (no dot) as a string
    return value


def _schema_type_at(parts: list[str]) -> Any:
    """The schema type at a dotted key path, or raise ConfigError naming the first unknown part."""
    tp: Any = ExperimentConfig
    walked: list[str] = []
    for part in parts:
        key = ".".join(walked + [part])
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise _unknown_key_error(key, part, names)
            tp = _hints(tp)[part]
        elif origin is list:
            if not part.isdigit():
                raise ConfigError(f"{key}: {'.'.join(walked)} is a list; index it with a number (e.g. "
                                  f"{'.'.join(walked)}.0)")
            tp = typing.get_args(tp)[0]
        else:
            raise ConfigError(f"{key}: {'.'.join(walked)} is a {_type_name(tp)}, it has no sub-keys")
        walked.append(part)
    return tp


def apply_overrides(container: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a plain container (in place; also returned)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key=value (e.g. train.lr=3e-4)")
        key, text = override.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(p == "" for p in parts):
            raise ConfigError(f"override {override!r}: empty key part")
        tp = _schema_type_at(parts)
        value = parse_override_value(text)
        _check(value, tp, key)
        node: Any = container
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = int(part)
                if index >= len(node):
                    where = ".".join(parts[:depth])
                    raise ConfigError(f"{key}: {where} has {len(node)} items, no item {index}")
                node = node[index]
            else:
                if node.get(part) is None and parts[depth + 1].isdigit():
                    raise ConfigError(f"{key}: {'.'.join(parts[: depth + 1])} has no items in the config")
                node = node.setdefault(part, {})
                if node is None:
                    raise ConfigError(f"{key}: {'.'.join(parts[: depth + 1])} is null in the config")
        last = parts[-1]
        if isinstance(node, list):
            index = int(last)
            if index >= len(node):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} has {len(node)} items, no item {index}")
            node[index] = value
        else:
            node[last] = value
    return container


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving.


def config_from_container(container: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain container, merge it into the schema, resolve interpolations: an `ExperimentConfig`."""
    validate_container(container)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(container))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from err
    check_values(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (None = all defaults), apply `key=value` overrides, validate and resolve it."""
    container: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML ({err})") from err
        container = loaded if loaded is not None else {}
    try:
        apply_overrides(container, list(overrides or []))
        return config_from_container(container)
    except ConfigError as err:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{err}{where}") from None


def check_values(cfg: ExperimentConfig) -> None:
    """Cross-field and range checks the types alone cannot express."""
    positive = {
        "data.batch_size": cfg.data.batch_size, "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum, "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last, "eval.batch_size": cfg.eval.batch_size,
        "model.mask_head_size": cfg.model.mask_head_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, found {value}")
    optional_positive = {"train.max_steps": cfg.train.max_steps, "train.stop_after_steps": cfg.train.stop_after_steps}
    for key, value in optional_positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: expected a positive integer or null, found {value}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: expected a value in [0, 1), found {cfg.train.warmup_ratio}")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: expected 2 values, found {len(cfg.train.betas)}")
    if cfg.model.min_pixels > cfg.model.max_pixels:
        raise ConfigError(f"model.min_pixels: expected at most model.max_pixels ({cfg.model.max_pixels}), "
                          f"found {cfg.model.min_pixels}")
    for section in ("train", "val", "test"):
        for index, ds in enumerate(getattr(cfg.data, section)):
            key = f"data.{section}.{index}"
            for name in ("image_size", "object_size"):
                value = getattr(ds, name)
                if value is not None and (len(value) != 2 or value[0] > value[1]):
                    raise ConfigError(f"{key}.{name}: expected [min, max], found {value}")
            if ds.type == "synthetic" and ds.length < 1:
                raise ConfigError(f"{key}.length: a synthetic dataset needs length >= 1, found {ds.length}")
            if ds.type != "synthetic" and not (ds.root or cfg.data.root):
                raise ConfigError(f"{key}.root: {ds.type} needs a data root; set data.root=/path/to/data "
                                  f"(or {key}.root)")


def check_model_paths(model_cfg: ModelConfig) -> None:
    """`model.qwen` / `model.sam` / `model.tokenizer` name a preset or an existing directory (checked before a run
    spends time on data or weights; not part of `load_config`, so configs with placeholder paths still load)."""
    from flmm_model.build import QWEN_ARCHS, SAM_ARCHS

    for key, value, presets in (("model.qwen", model_cfg.qwen, QWEN_ARCHS), ("model.sam", model_cfg.sam, SAM_ARCHS),
                                ("model.tokenizer", model_cfg.tokenizer, {})):
        if value is None or value in presets or Path(value).is_dir():
            continue
        names = f"a preset ({', '.join(presets)}) or " if presets else ""
        raise ConfigError(f"{key}: expected {names}an existing directory, found {value!r} (set it in the config or "
                          f"as {key}=/your/path)")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what goes into the run directory and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def dataset_seed(ds: DatasetConfig) -> int:
    """The seed a dataset is built with: `ds.seed` when set (used as is), else one derived from the split name.

    The derived seed is a stable hash (SHA-256, not Python's per-process salted `hash()`), the same in every process
    and run, and different for different split names: a synthetic `val` split without a seed is not a copy of the
    first samples of the `train` split. Two entries with the same explicit seed draw the same samples, whatever
    their splits.
    """
    if ds.seed is not None:
        return ds.seed
    digest = hashlib.sha256(f"split:{ds.split}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def dataset_label(ds: DatasetConfig) -> str:
    """Name of a dataset split in logs and tables."""
    if ds.name:
        return ds.name
    suffix = f"_{ds.protocol}" if ds.protocol != "flmm" and ds.type in REFCOCO_TYPES else ""
    return f"{ds.type}_{ds.split}{suffix}"


def describe_schema(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per key: `section.key (type, default): help`, for `--help`."""
    lines: list[str] = []
    hints = _hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}{fld.name}"
        tp = hints[fld.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {tp.__doc__.splitlines()[0] if tp.__doc__ else ''}")
            lines.extend(describe_schema(tp, f"{key}."))
            continue
        if fld.default is not MISSING and fld.default is not dataclasses.MISSING:
            default = "null" if fld.default is None else repr(fld.default)
        elif fld.default_factory is not dataclasses.MISSING:
            default = repr(fld.default_factory())
        else:
            default = "required"
        lines.append(f"  {key} ({_type_name(tp)}, {default}): {fld.metadata.get('help', '')}")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines.extend(describe_schema(typing.get_args(tp)[0], f"    {key}.N."))
    return lines

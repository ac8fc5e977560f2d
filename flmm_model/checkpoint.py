"""The checkpoint format, its one owner: model files, training checkpoints and run directories.

Model files (`save_pretrained` / `read_model_config` / `read_weights`; `FrozenQwenSAM.save_pretrained` and
`.from_pretrained` are thin wrappers over them): a directory with
- `model.safetensors`: exactly the trainable tensors, by their names in FrozenQwenSAM;
- `flmm_config.json`: `{"format": "flmm_model/2", "model": <the ModelConfig fields>}`, everything needed to rebuild
  the model around the weights except the frozen checkpoints themselves, whose local paths the loader may replace.

A training checkpoint is a directory `<out_dir>/checkpoints/step_<NNNNNNN>/` holding
- the model files above, so the same directory is what `eval`, `predict` and `FrozenQwenSAM.from_pretrained` load;
- `trainer_state.pt`: a plain dict with the optimizer and LR-scheduler states, the step, the data position (epoch and
  samples consumed in it) and the RNG states (python, numpy, torch, CUDA) of every rank;
- `config.yaml`: the resolved experiment config.

Writing them (crash-safe saving, pruning, recovery) is `flmm_model/run_dir.py`.

Readers of a run that is being trained into (`eval`, `predict`) call `load_checkpoint`: it reads the config and the
trainable weights into memory at once and, if keep_last deleted the chosen checkpoint meanwhile, picks the newest
complete one again. Results of `eval` go to the run directory (`run_dir.eval_results_path`), never into a
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flmm_model.config import ModelConfig
from flmm_model.errors import CheckpointError, MissingCheckpointError, storage_error

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "flmm_config.json"
FORMAT = "flmm_model/2"
# Format 1 saved `instruction: null` for the built-in instruction of that time (format 2 always saves the text).
_FORMAT_1_INSTRUCTION = "Please briefly describe the image."
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
STEP_DIR = re.compile(r"step_(\d+)")
BACKUP_DIR = re.compile(r"\.(?:old|tmp-old)-(step_\d+)-\d+")  # `.tmp-old-` was the name before backups were kept
_COMPLETE = (WEIGHTS_NAME, TRAINER_STATE)  # and one of _MODEL_CONFIGS
# The model config of a checkpoint: this project's, or a transformers `config.json` (caption pretraining's checkpoints
# are whole transformers checkpoints: `save_checkpoint(write_model=...)`).
_MODEL_CONFIGS = (CONFIG_NAME, "config.json")
T = TypeVar("T")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers (and a crash) see the old
    file or the new one, never a truncated one. StorageError (naming the file) when writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise storage_error(error, path=path.parent, doing=f"writing {path.name}") from error


def save_pretrained(directory: str | Path, *, weights: dict[str, torch.Tensor], model_config: dict[str, Any]) -> None:
    """Write model files (see the module docstring): trainable `weights` and the `model_config` they belong to.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a torn file.

    Raises:
        StorageError: writing failed (a full disk, no permission, a path that is a file).
    """
    directory = Path(directory)
    weights_path = directory / WEIGHTS_NAME
    tmp = weights_path.with_name(f".{WEIGHTS_NAME}.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, weights_path)
        atomic_write_text(directory / CONFIG_NAME, json.dumps({"format": FORMAT, "model": model_config}, indent=2))
    except (OSError, SafetensorError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise storage_error(error, path=directory, doing=f"writing the model files into {directory}") from error


def read_model_config(directory: str | Path, **replace: Any) -> ModelConfig:
    """The ModelConfig saved with a model's files, with the fields in `replace` that are not None changed.

    Typical use: the frozen checkpoints' local paths (`qwen`, `sam`, `tokenizer`) come from this machine's config,
    everything else (pixel budget, prompt, head sizes) from the training run, so data and model see what training saw.

    Raises:
        MissingCheckpointError (a FileNotFoundError): no `flmm_config.json` in `directory`.
        CheckpointError (a ValueError): a file that is not a model config of this project.
    """
    return model_config_from(read_model_fields(directory), **replace)


def read_model_fields(directory: str | Path) -> dict[str, Any]:
    """The saved ModelConfig fields of a model directory, as a plain dict (older formats brought up to date)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise MissingCheckpointError(f"{path}: missing; {directory} is not a model directory of flmm_model (expected "
                                     f"the output of save_pretrained or a training checkpoint)")
    try:
        saved = json.loads(path.read_text())
        fields = dict(saved["model"])
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a model config written by flmm_model ({type(error).__name__}: {error}); "
                              f"the checkpoint is damaged: use another one") from error
    if saved.get("format", "flmm_model/1") == "flmm_model/1" and fields.get("instruction") is None:
        fields["instruction"] = _FORMAT_1_INSTRUCTION
    return fields


def model_config_from(fields: dict[str, Any], **replace: Any) -> ModelConfig:
    """A ModelConfig from saved fields, with the fields in `replace` that are not None changed."""
    fields = {**fields, **{key: value for key, value in replace.items() if value is not None}}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields))
    except OmegaConfBaseException as error:
        raise CheckpointError(f"{CONFIG_NAME}: saved model config does not fit this version's schema "
                              f"({str(error).splitlines()[0]})") from error


def read_weights(directory: str | Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The trainable weights of a model directory (its single safetensors file), on `device`.

    Raises:
        MissingCheckpointError: no (or more than one) safetensors file. CheckpointError: a damaged or truncated one.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if len(files) != 1:
        raise MissingCheckpointError(f"{directory}: expected exactly one *.safetensors file, found {len(files)}")
    try:
        return load_file(str(files[0]), device=str(device))
    except SafetensorError as error:
        raise CheckpointError(f"{files[0]}: damaged or truncated ({error}); use another checkpoint (an older "
                              f"step_*), or train again") from error


# The model settings the trained heads depend on: the LMM's maps (family, capture, pixel budget, prompt) and the heads'
# own shapes. A resumed run or a prediction with other values would feed the heads inputs they were not trained on.
HEADS_SETTINGS = ("instruction", "system", "min_pixels", "max_pixels", "attn_capture", "mask_head_widths",
                  "mask_head_size", "attention_only")


def _family(qwen: str) -> str | None:
    """The Qwen-VL family of a preset or local checkpoint, or None when it cannot be told here (a path of another
    machine)."""
    from flmm_model.backbones import model_type_of  # transformers-heavy: only when a checkpoint is compared

    try:
        return model_type_of(qwen)
    except (ValueError, OSError):
        return None


def settings_differ(saved: ModelConfig, current: ModelConfig, *, keys: tuple[str, ...] = HEADS_SETTINGS) -> list[str]:
    """'field: saved X, now Y' for each setting of `keys` (and the LMM family) on which `current` differs from the
    checkpoint's `saved` config; empty when the heads can be used (or trained on) as they are."""
    differ = []
    saved_family, current_family = _family(saved.qwen), _family(current.qwen)
    if saved_family and current_family and saved_family != current_family:
        differ.append(f"model.qwen: a {saved_family} model in the checkpoint, a {current_family} model now")
    for key in keys:
        before, now = getattr(saved, key), getattr(current, key)
        if (list(before) if isinstance(before, (list, tuple)) else before) != \
                (list(now) if isinstance(now, (list, tuple)) else now):
            differ.append(f"model.{key}: {before!r} in the checkpoint, {now!r} now")
    return differ


def check_weights(weights: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Raise CheckpointError naming the tensor unless every trainable weight is a floating-point tensor of finite
    values (an integer tensor or a nan / inf would load and then give empty or garbage masks without a word)."""
    for name, tensor in weights.items():
        if not torch.is_floating_point(tensor):
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                  f"trainable weights are floating point: not a checkpoint of this model, or damaged")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} non-finite values (nan / inf) of "
                                  f"{tensor.numel()}: the weights of a diverged run; use an earlier checkpoint")


def step_of(path: Path) -> int:
    """The step of a checkpoint directory (`step_N`, or its hidden copy `.old-step_N-<pid>`)."""
    return int(checkpoint_name(path).split("_")[1])


def checkpoint_name(path: str | Path) -> str:
    """`step_NNNNNNN` of a checkpoint directory, also for its hidden copy during a re-save (ValueError otherwise)."""
    name = Path(path).name
    backup = BACKUP_DIR.fullmatch(name)
    if STEP_DIR.fullmatch(name):
        return name
    if backup:
        return backup.group(1)
    raise ValueError(f"{path}: not a checkpoint directory (expected a name like step_0000100)")


def is_complete(path: str | Path) -> bool:
    """A training checkpoint with all its files: weights, model config (`flmm_config.json`, or a transformers
    `config.json`) and trainer state."""
    path = Path(path)
    return (all((path / name).is_file() for name in _COMPLETE)
            and any((path / name).is_file() for name in _MODEL_CONFIGS))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (the `checkpoints/` dir of a run), oldest first.

    A `step_N` directory missing any file (e.g. left by an older version killed while deleting) is never listed. A
    checkpoint moved aside during a re-save of its step (`.old-step_N-<pid>`) stands in for `step_N` while no
    complete `step_N` exists, so a kill between the two renames loses nothing.
    """
    root = Path(root)
    try:
        names = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    visible: dict[int, Path] = {}
    hidden: dict[int, Path] = {}
    for name in names:
        path = root / name
        if STEP_DIR.fullmatch(name) and is_complete(path):
            visible[step_of(path)] = path
        elif BACKUP_DIR.fullmatch(name) and is_complete(path):
            hidden[step_of(path)] = path
    found = {**hidden, **visible}
    return [found[step] for step in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user passes: the checkpoint itself (any directory holding a safetensors
    file, e.g. the output of save_pretrained), a run directory or its `checkpoints/` folder (-> the newest complete
    checkpoint there). Raises MissingCheckpointError (a FileNotFoundError) naming the path otherwise."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "no such directory"
        raise MissingCheckpointError(f"checkpoint {str(path)!r}: {what} (expected a checkpoint directory or a run "
                                     f"directory)")
    if any(path.glob("*.safetensors")):
        return path
    for root in (path / CHECKPOINTS, path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise MissingCheckpointError(f"checkpoint {str(path)!r}: neither a checkpoint (no *.safetensors inside) nor a "
                                 f"run directory with a complete {CHECKPOINTS}/step_*")


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a training checkpoint belongs to (`<run>/checkpoints/step_N` -> `<run>`), else None."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == CHECKPOINTS:
        try:
            checkpoint_name(checkpoint)
        except ValueError:
            return None
        return checkpoint.parent.parent
    return None


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read into memory: once `load_checkpoint` returns, its files are not needed any more.

    Attributes:
        directory: where it was read from.
        model_fields: the saved ModelConfig fields (`model_config()` builds the ModelConfig).
        weights: the trainable tensors.
        trainer_state: `trainer_state.pt` (with `trainer_state=True`), else None.
    """

    directory: Path
    model_fields: dict[str, Any]
    weights: dict[str, torch.Tensor]
    trainer_state: dict[str, Any] | None = None

    def model_config(self, **replace: Any) -> ModelConfig:
        """The saved ModelConfig with the fields in `replace` that are not None changed (see `read_model_config`)."""
        return model_config_from(self.model_fields, **replace)


def load_checkpoint(path: str | Path, *, trainer_state: bool = False, device: str | torch.device = "cpu",
                    attempts: int = 5) -> LoadedCheckpoint:
    """Read a checkpoint (config, trainable weights and, if asked, the trainer state) into memory at once.

    `path` is resolved as `resolve_checkpoint` does. A run being trained into deletes checkpoints (keep_last) at any
    moment: if the chosen one vanishes while it is read and `path` named the run (not the checkpoint itself), the
    newest complete checkpoint is chosen again, up to `attempts` times. A deleted checkpoint is never re-created.

    Raises:
        MissingCheckpointError: nothing to load, or an explicitly named checkpoint deleted while being read.
        CheckpointError: a damaged file; a trainable tensor that is not floating point or not finite.
    """
    path = Path(path)

    def read(directory: Path) -> LoadedCheckpoint:
        state = load_trainer_state(directory) if trainer_state else None
        weights = read_weights(directory, device=device)
        check_weights(weights, source=directory / WEIGHTS_NAME)
        return LoadedCheckpoint(directory=directory, model_fields=read_model_fields(directory), weights=weights,
                                trainer_state=state)

    return _read_newest(path, read, attempts=attempts)


def _read_newest(path: Path, read: Callable[[Path], T], *, attempts: int) -> T:
    """`read(resolve_checkpoint(path))`, choosing again when the checkpoint vanished while being read."""
    for _ in range(attempts):
        directory = resolve_checkpoint(path)
        try:
            return read(directory)
        except (FileNotFoundError, CheckpointError):
            if directory.exists():
                raise  # a file really missing or damaged in a checkpoint that is still there
            if directory == path:
                raise MissingCheckpointError(f"checkpoint {path} was deleted while being read (a training run pruning "
                                             f"it with train.keep_last?); pass the run directory to load its newest "
                                             f"checkpoint") from None
    raise MissingCheckpointError(f"{path}: every checkpoint chosen was deleted while being read ({attempts} tries); "
                                 f"is a training run with train.keep_last writing into it very often?")


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The `trainer_state.pt` dict of a checkpoint (tensors on CPU), its fields' types checked
    (`check_trainer_state`; a resume also checks that none is missing).

    Raises:
        MissingCheckpointError: no trainer state (a model directory, not a training checkpoint).
        CheckpointError: a damaged, truncated or unreadable file, or one whose contents are not a trainer state.
    """
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise MissingCheckpointError(f"{path}: missing; {checkpoint} is not a training checkpoint (it cannot be "
                                     f"resumed)")
    again = "resume from another checkpoint (--resume DIR) or start a new run"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error.strerror or error}); "
                              f"{again}") from error
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"{path}: damaged or truncated ({type(error).__name__}: {str(error).splitlines()[0]}); "
                              f"{again}") from error
    check_trainer_state(state, path=path, complete=False)
    return state


# The fields of a trainer state (`recipes.loop.run_loop` writes them): counters, and the states of the optimizer, the
# LR scheduler and every rank's RNGs.
_STATE_COUNTERS = ("step", "epoch", "micro_in_epoch", "total_steps", "world_size", "batch_size", "grad_accum")
_STATE_REQUIRED = ("step", "epoch", "micro_in_epoch", "total_steps", "optimizer", "scheduler", "rng")


def check_trainer_state(state: Any, *, path: str | Path, complete: bool = True) -> None:
    """Raise CheckpointError naming `path` and the field when `state` is not a trainer state a run can continue.

    Every field present must have its type: the counters non-negative integers, `optimizer` a dict with `state` and
    `param_groups`, `scheduler` a dict, `rng` a list with one dict of python / numpy / torch states per rank. With
    `complete` (a resume), the fields a resume reads must all be there, and the step within the run's total.
    """
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a usable trainer state: {problem}; resume from another checkpoint "
                               f"(--resume DIR) or start a new run")

    if not isinstance(state, dict):
        raise fail(f"the file holds a {type(state).__name__}, expected a dict of the run's state")
    if complete:
        missing = [key for key in _STATE_REQUIRED if key not in state]
        if missing:
            raise fail(f"field {missing[0]!r} is missing (fields present: {sorted(map(str, state))})")
    for key in _STATE_COUNTERS:
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail(f"field {key!r} is {type(value).__name__} {str(value)[:40]}, expected an integer >= 0")
    if complete and state["total_steps"] < 1:
        raise fail("field 'total_steps' is 0, expected the run's length in steps (>= 1)")
    if state.get("step", 0) > state.get("total_steps", math.inf):
        raise fail(f"field 'step' {state['step']} is beyond field 'total_steps' {state['total_steps']}")
    optimizer = state.get("optimizer", {"state": {}, "param_groups": []})
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise fail(f"field 'optimizer' is not an optimizer state (a dict with 'state' and 'param_groups'), found "
                   f"{type(optimizer).__name__}")
    if not isinstance(state.get("scheduler", {}), dict):
        raise fail(f"field 'scheduler' is {type(state['scheduler']).__name__}, expected a dict")
    rng = state.get("rng", [])
    if not isinstance(rng, list) or (complete and not rng):
        raise fail(f"field 'rng' is {type(rng).__name__} {str(rng)[:40]}, expected a list of RNG states (one per rank)")
    for rank, entry in enumerate(rng):
        ok = (isinstance(entry, dict) and isinstance(entry.get("python"), (tuple, list)) and len(entry["python"]) == 3
              and isinstance(entry.get("numpy"), dict)
              and isinstance(entry["numpy"].get("key"), torch.Tensor)
              and isinstance(entry.get("torch"), torch.Tensor) and entry["torch"].dtype == torch.uint8)
        if not ok:
            raise fail(f"field 'rng' entry {rank} is not the python / numpy / torch RNG states capture_rng_state "
                       f"writes")

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

It is first written to a hidden temporary directory beside it and then renamed into place, so a crash at any moment
leaves either the complete old state or the complete new one, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from flmm_model.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "flmm_config.json"
FORMAT = "flmm_model/2"
# Format 1 saved `instruction: null` for the built-in instruction of that time (format 2 always saves the text).
_FORMAT_1_INSTRUCTION = "Please briefly describe the image."
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"step_(\d+)")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers (and a crash) see the old
    file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained(directory: str | Path, *, weights: dict[str, torch.Tensor], model_config: dict[str, Any]) -> None:
    """Write model files (see the module docstring): trainable `weights` and the `model_config` they belong to.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a torn file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / WEIGHTS_NAME
    tmp = weights_path.with_name(f".{WEIGHTS_NAME}.tmp")
    save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, weights_path)
    atomic_write_text(directory / CONFIG_NAME, json.dumps({"format": FORMAT, "model": model_config}, indent=2))


def read_model_config(directory: str | Path, **replace: Any) -> ModelConfig:
    """The ModelConfig saved with a model's files, with the fields in `replace` that are not None changed.

    Typical use: the frozen checkpoints' local paths (`qwen`, `sam`, `tokenizer`) come from this machine's config,
    everything else (pixel budget, prompt, head sizes) from the training run, so data and model see what training saw.

    Raises:
        FileNotFoundError: no `flmm_config.json` in `directory`.
        ValueError: a file that is not a model config of this project.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected the output of save_pretrained)")
    try:
        saved = json.loads(path.read_text())
        fields = dict(saved["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a model config written by flmm_model ({error})") from error
    if saved.get("format", "flmm_model/1") == "flmm_model/1" and fields.get("instruction") is None:
        fields["instruction"] = _FORMAT_1_INSTRUCTION
    fields.update({key: value for key, value in replace.items() if value is not None})
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields))


def read_weights(directory: str | Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The trainable weights of a model directory (its single safetensors file), on `device`."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{directory}: expected exactly one *.safetensors file, found {len(files)}")
    return load_file(str(files[0]), device=str(device))


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, as plain data loadable with `weights_only=True`."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint directory (expected a name like step_0000100)")
    return int(match.group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (the `checkpoints/` dir of a run), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=step_of)


def latest_checkpoint(root: str | Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from what a user passes: the checkpoint itself, a run directory or its
    `checkpoints/` folder (-> the newest checkpoint there). Raises FileNotFoundError with the path otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such directory")
    if any(path.glob("*.safetensors")):
        return path
    for root in (path / CHECKPOINTS, path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"checkpoint {str(path)!r}: neither a checkpoint (no *.safetensors inside) nor a run "
                            f"directory with {CHECKPOINTS}/step_*")


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves to disk before the rename publishes them."""
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())
        dir_fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(*, root: str | Path, step: int, weights: dict[str, torch.Tensor], model_config: dict[str, Any],
                    trainer_state: dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically and delete all but the newest `keep_last` checkpoints.

    Args:
        root: the run's `checkpoints/` directory (created if needed).
        step: optimizer steps done.
        weights: the trainable tensors (`FrozenQwenSAM.trainable_state_dict()`), saved as the model files...
        model_config: ...with the model config they belong to (`FrozenQwenSAM.build_config`).
        trainer_state: optimizer / scheduler / data position / RNG states (a plain dict of tensors and numbers).
        config_yaml: the resolved experiment config.
        keep_last: how many checkpoints to keep.
    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a crash while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_pretrained(tmp, weights=weights, model_config=model_config)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (a resumed run re-reaching it): swap, then delete the old one
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old_checkpoint in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old_checkpoint, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The `trainer_state.pt` dict of a checkpoint (tensors on CPU)."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {checkpoint} is not a training checkpoint (it cannot be resumed)")
    return torch.load(path, map_location="cpu", weights_only=True)

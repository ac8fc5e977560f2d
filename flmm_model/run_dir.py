"""Writing into a run directory: training checkpoints (saved, pruned and recovered crash-safely), the RNG states a
resume restores, output directories and where `eval` puts its results. The format itself, and reading it, is
`flmm_model/checkpoint.py`.

Crash safety: no kill at any point of saving, re-saving the same step, pruning or overwriting leaves the run without
its newest complete checkpoint, and no incomplete directory is ever chosen.
- A checkpoint is written into a hidden `.tmp-step_N-<pid>` directory, flushed, then renamed to `step_N`.
- Re-saving an existing step (a resumed finished run does) moves the old one aside to `.old-step_N-<pid>` first; if a
  kill comes between the two renames, that hidden copy stands in for `step_N` (`list_checkpoints` returns it) and the
  next save renames it back instead of deleting it.
- Deleting (keep_last pruning, `train.overwrite`) renames to `.trash-step_N-<pid>` first, so a half-deleted
  checkpoint is never visible under a `step_N` name; the next save sweeps `.tmp-*` and `.trash-*` leftovers.
- Only complete checkpoints (weights, model config and trainer state all present) are listed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from flmm_model.checkpoint import (
    BACKUP_DIR,
    CONFIG_FILE,
    STEP_DIR,
    TRAINER_STATE,
    checkpoint_name,
    is_complete,
    list_checkpoints,
    run_dir_of,
    save_pretrained,
)
from flmm_model.errors import StorageError, UserError, storage_error

EVAL_DIR = "eval"
_LEFTOVERS = (".tmp-step_", ".trash-")  # prefixes of directories a crash may leave behind; never complete


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


def eval_results_path(checkpoint: str | Path, out_dir: str | None) -> Path:
    """Where `eval` writes its results for `checkpoint`: `<out_dir>/eval.json` when set, else the run directory's
    `eval/step_NNNNNNN.json`. Never inside the checkpoint (keep_last would delete it with the checkpoint).

    Raises:
        UserError: no `out_dir` and a checkpoint outside a run directory (nowhere to put results).
    """
    if out_dir:
        return Path(out_dir) / "eval.json"
    run_dir = run_dir_of(checkpoint)
    if run_dir is None:
        raise UserError(f"eval.out_dir: not set, and {checkpoint} is not a checkpoint inside a run directory; set "
                        f"eval.out_dir=DIR for the results (they are never written into a checkpoint)")
    return run_dir / EVAL_DIR / f"{checkpoint_name(checkpoint)}.json"


def prepare_output_dir(path: str | Path, *, what: str) -> Path:
    """Create the output directory `path` (with its parents) and check that it is a writable directory.

    Called before anything expensive, so a path that is a file, a read-only place or a full disk fails at once.

    Args:
        path: the directory.
        what: how the user named it, for the message, e.g. "train.out_dir" or "--out".
    Raises:
        StorageError: naming `what`, the path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{what} {path}: exists and is not a directory; choose a directory path",
                           code=errno.ENOTDIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise StorageError(f"{what} {path}: cannot be created, a part of the path is a file ({error.filename})",
                           code=errno.ENOTDIR) from error
    except OSError as error:
        raise storage_error(error, path=path, doing=f"creating {what} {path}") from error
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise storage_error(error, path=path, doing=f"writing into {what} {path}") from error
    sweep_leftovers(path)
    return path


# Files a killed writer leaves in an output directory: `.tmp-<pid>-<name>` (an image or file being written, see
# `recipes.inference.save_image`) and `.write-test-<pid>` (the probe above). Never complete; their pid says whose.
_LEFTOVER_FILE = re.compile(r"^\.(?:tmp-(\d+)-.+|write-test-(\d+))$")


def sweep_leftovers(directory: str | Path) -> list[Path]:
    """Delete the temporary files of killed writers in `directory` (not in subdirectories): those named by a pid
    that no longer runs on this host. A live writer's files, and anything else, stay. Returns what was deleted."""
    removed = []
    for entry in Path(directory).iterdir():
        match = _LEFTOVER_FILE.match(entry.name)
        if match is None or not entry.is_file() or entry.is_symlink():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid != os.getpid() and not _alive(pid, socket.gethostname()):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry)
    return removed


def _fsync_dir(path: str | Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` and the directories themselves to disk before the rename publishes them."""
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(dirpath)


def delete_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint directory so that it is never seen half-deleted: rename it to a hidden `.trash-` name
    first (atomic), then delete that. Gone already: nothing to do."""
    path = Path(path)
    trash = path.with_name(f".trash-{checkpoint_name(path)}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def delete_checkpoints(root: str | Path) -> None:
    """Delete every checkpoint in `root` (`train.overwrite`), each one renamed away first (see `delete_checkpoint`)."""
    recover_checkpoints(root)
    for checkpoint in list_checkpoints(root):
        delete_checkpoint(checkpoint)
    for name in os.listdir(root) if Path(root).is_dir() else []:
        if STEP_DIR.fullmatch(name):  # incomplete ones too (left by an older version)
            delete_checkpoint(Path(root) / name)


def recover_checkpoints(root: str | Path) -> None:
    """Finish what a killed save, re-save or deletion left in `root` (the run's `checkpoints/` directory).

    A hidden copy of a re-saved step goes back to `step_N` unless a complete `step_N` exists (then it is deleted);
    half-written `.tmp-` and half-deleted `.trash-` directories are deleted. Only the process that writes
    checkpoints calls this (`save_checkpoint`, and training before it deletes anything).
    """
    root = Path(root)
    if not root.is_dir():
        return
    for name in sorted(os.listdir(root)):
        path = root / name
        backup = BACKUP_DIR.fullmatch(name)
        if backup:
            final = root / backup.group(1)
            if is_complete(final) or not is_complete(path):
                delete_checkpoint(path)
            else:
                if final.exists():  # an incomplete step_N (left by an older version): the copy is the real one
                    delete_checkpoint(final)
                os.rename(path, final)
        elif name.startswith(_LEFTOVERS):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(*, root: str | Path, step: int, weights: dict[str, torch.Tensor] | None = None,
                    model_config: dict[str, Any] | None = None, trainer_state: dict[str, Any], config_yaml: str,
                    keep_last: int, write_model: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `root/step_<step>` atomically and delete all but the newest `keep_last` checkpoints (never
    the one just written). See the module docstring for what a kill at any point leaves.

    Args:
        root: the run's `checkpoints/` directory (created if needed).
        step: optimizer steps done.
        weights: the trainable tensors (`FrozenQwenSAM.trainable_state_dict()`), saved as the model files...
        model_config: ...with the model config they belong to (`FrozenQwenSAM.build_config`).
        trainer_state: optimizer / scheduler / data position / RNG states (a plain dict of tensors and numbers).
        config_yaml: the resolved experiment config.
        keep_last: how many checkpoints to keep.
        write_model: instead of `weights` + `model_config`, a function that writes the model files into the
            directory it is given (`pretrain_lmm` writes a whole transformers checkpoint: model.safetensors and
            config.json as well).
    Returns:
        The checkpoint directory.
    Raises:
        StorageError: writing failed (a full disk, no permission); the temporary directory is removed and the
            earlier checkpoints are untouched.
    """
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(root)
        tmp.mkdir()
        if write_model is not None:
            write_model(tmp)
        else:
            save_pretrained(tmp, weights=weights, model_config=model_config)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        _fsync_tree(tmp)
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, RuntimeError, SafetensorError) as error:  # torch's zip writer: RuntimeError on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(error, path=root, doing=f"writing the checkpoint {final.name}") from error
    if final.exists():  # the same step written again (a resumed run re-reaching it): swap, keeping the old visible
        backup = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, backup)  # from here until the next rename, list_checkpoints returns the backup
        os.rename(tmp, final)
        _fsync_dir(root)
        delete_checkpoint(backup)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for old_checkpoint in list_checkpoints(root)[:-keep_last]:
        if old_checkpoint != final:
            delete_checkpoint(old_checkpoint)
    return final


LOCK_NAME = ".lock"


def acquire_run_lock(out_dir: str | Path, *, what: str = "train.out_dir") -> Path:
    """Take `<out_dir>/.lock` for this process (its pid and host inside), so a second run on the same directory
    refuses to start instead of deleting the first one's checkpoints and interleaving its metrics.

    A lock left by a process that no longer runs on this host (a killed run) is stale: it is replaced. A lock of
    another host cannot be checked from here and is respected; the message says how to remove it.

    Returns:
        the lock file, for `release_run_lock`.

    Raises:
        UserError: another live run holds the directory (naming its pid and host).
    """
    path = Path(out_dir) / LOCK_NAME
    owner = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and _alive(*holder):
                pid, host = holder
                raise UserError(f"{what}: {out_dir} is in use by another run (pid {pid} on {host}, {path}); wait for "
                                f"it, choose another {what}, or delete {path} if no such run exists") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its owner is gone
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(owner + "\n")
        return path
    raise UserError(f"{what}: could not take the lock {path} (another run keeps taking it)")


def release_run_lock(path: Path | None) -> None:
    """Remove a lock taken by `acquire_run_lock`, if this process still owns it."""
    if path is not None and _lock_holder(path) == (os.getpid(), socket.gethostname()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _lock_holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

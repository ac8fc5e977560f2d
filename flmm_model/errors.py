"""Errors a user can fix, as one family, so that `run.py` can tell them from bugs.

Every exception the library raises for something the user gave (a config key, an argument, a path, an input file,
a phrase, an image, a checkpoint) or for a condition of their machine they can fix (a full disk, a directory they
cannot write) is a `UserError`: its message names the file, key, image or phrase, says what was expected and what
was found, and what to do. `run.py` prints that message alone and exits with status 2; anything else is a bug and
exits with status 1 (`--debug` shows the traceback of either).

Each class also derives from the built-in exception callers already catch (`ValueError`, `OSError`,
`FileNotFoundError`), so `except ValueError` keeps working for code written before this module. The config and data
errors live beside their owners: `flmm_model.config.ConfigError`, `flmm_model.data.errors.DataError`.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """Base of every error the user can fix; `run.py` prints the message without a traceback and exits 2."""


class InputError(UserError, ValueError):
    """A bad argument or input: an empty phrase, a phrase with a control token, an unusable image, a device that
    does not exist on this machine."""


class MissingDependencyError(UserError, ImportError):
    """An optional extra the user asked for is not installed (spaCy and its English pipeline for noun phrases); the
    message says what to install."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: a damaged or truncated file, a directory that is not a checkpoint of this
    project, weights that do not fit the model, a resume that cannot continue the checkpoint's run."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (an image, a checkpoint)."""


class MissingCheckpointError(MissingFileError):
    """No checkpoint where the user pointed (no such directory, or a run directory without a complete one)."""


class NonFiniteLossError(UserError, ArithmeticError):
    """Training diverged: a loss or gradient norm became nan / inf. The run stops; no checkpoint of it is written."""


class StorageError(UserError, OSError):
    """Writing failed for a reason the user can fix: no space left, no permission, an output path that is a file.

    `str(error)` is the message alone; `error.errno` the cause's errno when there is one.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent); None if it cannot be told."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def storage_error(error: BaseException, *, path: str | Path, doing: str) -> StorageError:
    """A StorageError for a failed write under `path`, saying what to do.

    `error` is what the write raised: an OSError (ENOSPC, EDQUOT, EACCES, EROFS, ...) or the RuntimeError torch's
    zip writer raises when the disk fills up ("unexpected pos 4728128 vs 4728020"), which carries no errno; a full
    disk is then recognised by the free space left.

    Args:
        error: the exception the write raised.
        path: the directory (or file) being written.
        doing: what was being written, e.g. "writing the checkpoint step_0000100".
    """
    code = getattr(error, "errno", None)
    free = free_bytes(path)
    free_text = f"{free / 2**20:.0f} MiB free there" if free is not None else "free space unknown"
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and free is not None and free < 64 * 2**20):
        message = f"{doing} failed: no space left in {path} ({free_text}); free disk space there, or write elsewhere"
        return StorageError(message, code=errno.ENOSPC)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{doing} failed: {path} is not writable ({os.strerror(code)}); choose a directory you "
                            f"can write to", code=code)
    return StorageError(f"{doing} failed in {path}: {type(error).__name__}: {error} ({free_text})", code=code)

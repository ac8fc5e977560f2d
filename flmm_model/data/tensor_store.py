"""A directory of safetensors entries that all depend on one key: what the SAM-embedding cache (`sam_cache`) and the
LMM-output cache (`lmm_cache`) share.

Layout: `cache.json` (`{"format": ..., "key": {...}}`) and `<aa>/<name>.safetensors` entries, each with the key and
every tensor's SHA-256 in its metadata. A directory of another format or key is refused naming the differing fields;
an entry that does not read back whole (torn, damaged, another key, other tensors, a checksum that does not match)
reads as missing, so the caller computes it again and rewrites it. Writes are atomic (a temporary file in the same
directory, fsync, rename): a crash leaves the old entry or none, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flmm_model.errors import storage_error

MANIFEST = "cache.json"


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class KeyedTensorStore:
    """A cache directory opened for one key (picklable: the loader's workers read from it). Subclasses name what
    they store (the class attributes) and check the entries' shapes.

    Args:
        directory: the cache directory (created if missing).
        key_record: the key as a JSON-able mapping (field -> value).

    Raises:
        `error`: the directory holds a cache of another format or key.
        StorageError: the directory cannot be created or written.
    """

    format: ClassVar[str]  # e.g. "flmm_model/sam_cache/1"
    option: ClassVar[str]  # the config key, e.g. "data.sam_cache"
    what: ClassVar[str]  # with its article, e.g. "a SAM embedding cache"
    setup: ClassVar[str]  # e.g. "SAM setup"
    command: ClassVar[str]  # the command that fills it, e.g. "cache-sam"
    error: ClassVar[type[Exception]]

    def __init__(self, directory: str | Path, *, key_record: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self._key_record = key_record
        self._key_text = json.dumps(key_record, sort_keys=True)
        manifest = self.directory / MANIFEST
        if manifest.is_file():
            self._check_manifest(manifest)
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(manifest, json.dumps({"format": self.format, "key": key_record}, indent=2).encode())
        except OSError as error:
            raise storage_error(error, path=self.directory, doing=f"creating {self.what}") from error

    def _check_manifest(self, manifest: Path) -> None:
        try:
            stored = json.loads(manifest.read_text())
            stored_key = stored["key"]
            if not isinstance(stored_key, dict):
                raise TypeError("key is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self.error(f"{self.option}: {manifest} is not the manifest of {self.what} ({error}); point "
                             f"{self.option} at another directory or delete this one") from error
        if stored.get("format") != self.format:
            raise self.error(f"{self.option}: {self.directory} has format {stored.get('format')!r}, expected "
                             f"{self.format!r}; delete it or use another directory")
        differ = [f"{name}: {stored_key.get(name)!r} in the cache, {value!r} now"
                  for name, value in self._key_record.items() if stored_key.get(name) != value]
        if differ:
            raise self.error(f"{self.option}: {self.directory} was built for another {self.setup} "
                             f"({'; '.join(differ)}); its entries do not belong to this run. Use another "
                             f"directory, or delete this one to rebuild it (`run.py {self.command}`)")

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / f"{name}.safetensors"

    def read_entry(self, name: str, tensors: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """The tensors of entry `name`, or None when it is missing or does not read back whole: exactly the named
        `tensors`, written under this key, each matching its checksum."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if set(handle.keys()) != set(tensors):
                    return None
                entry = {tensor: handle.get_tensor(tensor) for tensor in tensors}
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        if metadata.get("key") != self._key_text:
            return None
        if any(metadata.get(f"{tensor}_sha256") != tensor_digest(value) for tensor, value in entry.items()):
            return None
        return entry

    def write_entry(self, name: str, tensors: dict[str, torch.Tensor], *, doing: str) -> None:
        """Store one entry's tensors atomically.

        Raises:
            StorageError: the entry cannot be written (a full disk, no permission); the old entry, if any, stays.
        """
        tensors = {tensor: value.detach().cpu().contiguous() for tensor, value in tensors.items()}
        metadata = {"key": self._key_text, "entry": name,
                    **{f"{tensor}_sha256": tensor_digest(value) for tensor, value in tensors.items()}}
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise storage_error(error, path=path.parent, doing=doing) from error


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

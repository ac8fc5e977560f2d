"""SAM image-embedding cache (`data.sam_cache: DIR`): the frozen image encoder's output for each image, computed once
(`run.py cache-sam`, or during the first epoch) and read by the loader's workers in later epochs, so a training step
skips SAM's encoder (about a fifth of the step with SAM ViT-L).

Layout of DIR:
- `cache.json`: `{"format": ..., "key": {...}}`, what every embedding depends on (`CacheKey`): a fingerprint of the
  image encoder's weights, SAM's input size, the encoder's dtype and precision, and the run's pixel budget. Opening
  a directory built under another key is refused with the differing fields named (`SamCacheError`): embeddings of
  another checkpoint would silently train the heads on other features.
- `<aa>/<sha256>.safetensors`: one image's (C, e, e) embedding, named by the SHA-256 of the image's pixels and size
  (the same image in two datasets is encoded once; a changed image file gets a new entry), with the cache key and
  the SHA-256 of the embedding's bytes in its metadata.

Writes are atomic (a temporary file in the same directory, flushed, then renamed). A missing entry, or one that does
not read back whole (a torn or damaged file, another key, another shape, a checksum that does not match), is a miss:
the embedding is computed again and the entry rewritten, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flmm_model.errors import UserError, storage_error

CACHE_FORMAT = "flmm_model/sam_cache/1"
MANIFEST = "cache.json"


class SamCacheError(UserError, ValueError):
    """`data.sam_cache` points at a cache built for another encoder, input size, precision or pixel budget."""


@dataclass(frozen=True)
class CacheKey:
    """What a SAM image embedding depends on besides the image.

    Attributes:
        encoder: SHA-256 of the image encoder's weights (names, shapes, dtypes, values): `encoder_fingerprint`.
        image_size: SAM's input side S.
        dtype: the encoder's weight dtype (the embeddings are stored as computed).
        precision: "bf16" when the encoder runs under bf16 autocast, else "fp32".
        min_pixels, max_pixels: the run's pixel budget (`model.min_pixels`, `model.max_pixels`).
    """

    encoder: str
    image_size: int
    dtype: str
    precision: str
    min_pixels: int
    max_pixels: int


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's state dict: names, shapes, dtypes and values (read once, on the CPU)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()



def sam_cache_key(*, encoder: torch.nn.Module, image_size: int, dtype: torch.dtype, precision: str, min_pixels: int,
                  max_pixels: int) -> CacheKey:
    """The key of a frozen SAM image `encoder` (its weights' fingerprint), SAM's input side, the encoder's weight
    `dtype` and `precision` ("bf16" / "fp32") and the run's pixel budget."""
    return CacheKey(encoder=encoder_fingerprint(encoder), image_size=int(image_size),
                    dtype=str(dtype).removeprefix("torch."), precision=precision, min_pixels=int(min_pixels),
                    max_pixels=int(max_pixels))

def image_digest(image: torch.Tensor) -> str:
    """SHA-256 of a (3, H, W) uint8 image's size and pixels: the name of its cache entry."""
    digest = hashlib.sha256(f"{tuple(image.shape)}".encode())
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class SamEmbeddingCache:
    """A cache directory opened for one `CacheKey` (picklable: DataLoader workers read from it).

    Args:
        directory: the cache directory (created if missing).
        key: what this run's embeddings depend on.
        embedding_shape: (C, e, e) of one embedding.

    Raises:
        SamCacheError: the directory holds a cache built under another key.
        StorageError: the directory cannot be created or written.
    """

    def __init__(self, directory: str | Path, *, key: CacheKey, embedding_shape: tuple[int, int, int]) -> None:
        self.directory = Path(directory)
        self.key = key
        self.embedding_shape = tuple(embedding_shape)
        manifest = self.directory / MANIFEST
        if manifest.is_file():
            self._check_manifest(manifest)
        else:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._write_atomic(manifest, json.dumps({"format": CACHE_FORMAT, "key": asdict(key)}, indent=2)
                                   .encode())
            except OSError as error:
                raise storage_error(error, path=self.directory, doing="creating the SAM embedding cache") from error

    def _check_manifest(self, manifest: Path) -> None:
        try:
            stored = json.loads(manifest.read_text())
            stored_key = stored["key"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SamCacheError(f"data.sam_cache: {manifest} is not a SAM embedding cache manifest ({error}); point "
                                f"data.sam_cache at another directory or delete this one") from error
        if stored.get("format") != CACHE_FORMAT:
            raise SamCacheError(f"data.sam_cache: {self.directory} has format {stored.get('format')!r}, expected "
                                f"{CACHE_FORMAT!r}; delete it or use another directory")
        wanted = asdict(self.key)
        differ = [f"{name}: {stored_key.get(name)!r} in the cache, {value!r} now" for name, value in wanted.items()
                  if stored_key.get(name) != value]
        if differ:
            raise SamCacheError(f"data.sam_cache: {self.directory} was built for another SAM setup "
                                f"({'; '.join(differ)}); its embeddings do not belong to this run. Use another "
                                f"directory, or delete this one to rebuild it (`run.py cache-sam`)")

    def path(self, name: str) -> Path:
        return self.directory / name[:2] / f"{name}.safetensors"

    def read(self, name: str) -> torch.Tensor | None:
        """The embedding of entry `name`, or None if it is missing or does not read back whole (then it is
        recomputed and rewritten by the caller)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                embedding = handle.get_tensor("embedding") if "embedding" in handle.keys() else None
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        if (embedding is None or tuple(embedding.shape) != self.embedding_shape
                or metadata.get("key") != json.dumps(asdict(self.key), sort_keys=True)
                or metadata.get("sha256") != _tensor_digest(embedding)):
            return None
        return embedding

    def write(self, name: str, embedding: torch.Tensor) -> None:
        """Store one (C, e, e) embedding atomically.

        Raises:
            StorageError: the entry cannot be written (a full disk, no permission).
        """
        embedding = embedding.detach().cpu().contiguous()
        metadata = {"key": json.dumps(asdict(self.key), sort_keys=True), "sha256": _tensor_digest(embedding),
                    "image": name}
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embedding": embedding}, str(tmp), metadata=metadata)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except (OSError, SafetensorError) as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise storage_error(error, path=path.parent, doing="writing a SAM embedding") from error

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

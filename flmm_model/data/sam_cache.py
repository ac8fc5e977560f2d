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
the embedding is computed again and the entry rewritten, never used (`data.tensor_store` holds this machinery).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flmm_model.data.tensor_store import KeyedTensorStore
from flmm_model.errors import UserError

CACHE_FORMAT = "flmm_model/sam_cache/2"  # 2: per-tensor checksums (`tensor_store`)


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


class SamEmbeddingCache(KeyedTensorStore):
    """A cache directory opened for one `CacheKey` (picklable: DataLoader workers read from it).

    Args:
        directory: the cache directory (created if missing).
        key: what this run's embeddings depend on.
        embedding_shape: (C, e, e) of one embedding.

    Raises:
        SamCacheError: the directory holds a cache built under another key.
        StorageError: the directory cannot be created or written.
    """

    format = CACHE_FORMAT
    option = "data.sam_cache"
    what = "a SAM embedding cache"
    setup = "SAM setup"
    command = "cache-sam"
    error = SamCacheError

    def __init__(self, directory: str | Path, *, key: CacheKey, embedding_shape: tuple[int, int, int]) -> None:
        self.key = key
        self.embedding_shape = tuple(embedding_shape)
        super().__init__(directory, key_record=asdict(key))

    def read(self, name: str) -> torch.Tensor | None:
        """The embedding of entry `name`, or None if it is missing or does not read back whole (then it is
        recomputed and rewritten by the caller)."""
        entry = self.read_entry(name, ("embedding",))
        if entry is None or tuple(entry["embedding"].shape) != self.embedding_shape:
            return None
        return entry["embedding"]

    def write(self, name: str, embedding: torch.Tensor) -> None:
        """Store one (C, e, e) embedding atomically.

        Raises:
            StorageError: the entry cannot be written (a full disk, no permission).
        """
        self.write_entry(name, {"embedding": embedding}, doing="writing a SAM embedding")


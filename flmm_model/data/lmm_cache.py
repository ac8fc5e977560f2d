"""LMM-output cache (`data.lmm_cache: DIR`): what the heads read from the frozen LMM for each training sample (its
attention maps and its phrase tokens' hidden states), computed once (`run.py cache-lmm`, or in the first epoch) and
read by the loader's workers in later epochs, so a cached step runs the heads alone (with `data.sam_cache` too: no
frozen network at all).

This is exact only when a sample's LMM inputs are the same in every epoch. F-LMM's recipe has that (one sentence
draw per ref for the whole run, no augmentation); a dataset that changes its samples between epochs (RefCOCO with
`sentence_draw=per_epoch`) refuses the cache (`check_cacheable`). Entries are also named by the SHA-256 of the
sample's LMM inputs, so a changed input can only miss, never read another input's outputs.

Layout of DIR:
- `cache.json`: `{"format": ..., "key": {...}}`, what every entry depends on besides the sample (`LMMCacheKey`): a
  fingerprint of the LMM's weights, its family, the prompt settings, the training sets' sentence-draw rules and
  seeds, the pixel budget, the LMM's dtype, the training precision and the capture implementation. A directory built
  under another key is refused naming the differing fields (`LMMCacheError`).
- `<aa>/<sha256>.safetensors`: one sample's `maps` (K, C, h, w) float32 (as captured) and `rows` (layers, P, D) in
  the LMM's compute dtype (P: the sample's phrase tokens), with the key and each tensor's SHA-256 in the metadata.

Writes are atomic (temporary file, fsync, rename). A missing entry, or one that does not read back whole (torn,
damaged, another key, another shape or dtype, a checksum that does not match) is a miss: the batch runs the LMM and
the entry is rewritten, never used. Before the first write the cache's total size is estimated from the first
entries and checked against the free disk (`LMMOutputCache.check_space`).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flmm_model.data.kinds import dataset_seed
from flmm_model.data.tensor_store import KeyedTensorStore
from flmm_model.errors import StorageError, UserError

CACHE_FORMAT = "flmm_model/lmm_cache/1"
FINGERPRINT_SAMPLES = 4096  # values read from every weight tensor for the fingerprint


class LMMCacheError(UserError, ValueError):
    """`data.lmm_cache` cannot be used: a cache built for another setup, or a run whose inputs change by epoch."""


@dataclass(frozen=True)
class LMMCacheKey:
    """What a sample's LMM outputs depend on besides the sample's own inputs (ids, phrases, pixels).

    Attributes:
        lmm: fingerprint of the LMM's weights (`lmm_fingerprint`).
        family: the backbone's `model_type`.
        instruction, system: the prompt settings (`model.instruction`, `model.system`).
        sentence_draws: per training dataset "<type>/<split>: <rule> seed <seed>" (the sentence-draw rule and seed).
        min_pixels, max_pixels: the pixel budget.
        dtype: the LMM's weight dtype; the hidden states are stored in it.
        precision: "bf16" when the LMM runs under bf16 autocast, else "fp32".
        attn_capture: "sdpa" or "eager" (their maps differ in rounding).
    """

    lmm: str
    family: str
    instruction: str
    system: str | None
    sentence_draws: tuple[str, ...]
    min_pixels: int
    max_pixels: int
    dtype: str
    precision: str
    attn_capture: str

    def as_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["sentence_draws"] = list(self.sentence_draws)
        return record


def lmm_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict: every tensor's name, shape and dtype and `FINGERPRINT_SAMPLES` evenly
    spaced values (all of a smaller tensor). Reading every value of a 72B model would take minutes; any fine-tune or
    other checkpoint changes the sampled values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            # Integer positions 0 .. numel - 1, first and last included (a float32 linspace rounds past the end
            # beyond 2**24 values).
            steps = torch.arange(FINGERPRINT_SAMPLES, device=flat.device, dtype=torch.int64)
            index = steps * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)
            flat = flat.index_select(0, index)
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sentence_draws(datasets: list[Any]) -> tuple[str, ...]:
    """The `LMMCacheKey.sentence_draws` entries of training `DatasetConfig`s (the seed as the dataset resolves it)."""
    return tuple(f"{ds.type}/{ds.split}: {ds.sentence_draw} seed {dataset_seed(ds)}" for ds in datasets)


def check_cacheable(datasets: list[Any]) -> None:
    """Refuse `data.lmm_cache` for training datasets whose samples change between epochs: built datasets (or
    `registry.NamedDataset`s) whose `changes_per_epoch` is True, looked up through wrappers (`.dataset`).

    Raises:
        LMMCacheError: naming the dataset and the reason.
    """
    for entry in datasets:
        label, dataset = getattr(entry, "label", type(entry).__name__), entry
        while not hasattr(dataset, "changes_per_epoch") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        if getattr(dataset, "changes_per_epoch", False):
            raise LMMCacheError(per_epoch_message(label))


def per_epoch_message(label: str) -> str:
    return (f"data.lmm_cache: training dataset {label} draws its sentences anew every epoch (sentence_draw="
            f"per_epoch), so a sample's LMM outputs change between epochs and its cache entries would never be read "
            f"again; use sentence_draw=once (F-LMM's recipe) or set data.lmm_cache=null")


def sample_digests(batch: dict[str, Any], *, images_per_sample: list[int]) -> list[str]:
    """Per sample of a collated batch, the SHA-256 of its LMM inputs: its unpadded compact ids and mask ids, its
    images' patch grids and pixel rows, and its grounded image (the name of its cache entry). `images_per_sample`:
    how many of the batch's images (in order) each sample holds."""
    grids = batch["image_grid_thw"].cpu()
    counts = grids.prod(1).tolist()  # pixel rows per image
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    pixels = batch["pixel_values"].cpu()
    ids, masks, keep = batch["input_ids"].cpu(), batch["mask_ids"].cpu(), batch["attention_mask"].cpu().bool()
    names, image = [], 0
    for b, num_images in enumerate(images_per_sample):
        digest = hashlib.sha256(b"flmm_model/lmm_sample/1")
        digest.update(ids[b][keep[b]].numpy().tobytes())
        digest.update(masks[b][keep[b]].numpy().tobytes())
        digest.update(f"grounded {int(batch['grounded_image'][b])}".encode())
        for i in range(image, image + num_images):
            digest.update(grids[i].numpy().tobytes())
            digest.update(pixels[starts[i]:starts[i + 1]].contiguous().numpy().tobytes())
        image += num_images
        names.append(digest.hexdigest())
    return names


@dataclass(frozen=True)
class LMMEntryShape:
    """What one entry must hold: maps (K, channels, h, w) float32 and rows (num_layers, P, hidden_size) (in the LMM's
    compute dtype, which the key fixes)."""

    channels: int
    num_layers: int
    hidden_size: int


class LMMOutputCache(KeyedTensorStore):
    """A cache directory opened for one `LMMCacheKey` (picklable: the loader's workers read from it).

    Args:
        directory: the cache directory (created if missing).
        key: what this run's entries depend on.
        shape: the channels, layers and hidden size every entry must have.

    Raises:
        LMMCacheError: the directory holds a cache built under another key.
        StorageError: the directory cannot be created or written.
    """

    format = CACHE_FORMAT
    option = "data.lmm_cache"
    what = "an LMM-output cache"
    setup = "LMM setup"
    command = "cache-lmm"
    error = LMMCacheError

    def __init__(self, directory: str | Path, *, key: LMMCacheKey, shape: LMMEntryShape) -> None:
        self.key = key
        self.shape = shape
        self.space_checked = False
        super().__init__(directory, key_record=key.as_json())

    def read(self, name: str, *, num_objects: int, grid_hw: tuple[int, int], num_tokens: int
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(maps (K, C, h, w), rows (layers, P, D)) of entry `name`, or None when it is missing or does not read
        back whole with the expected shapes (K = `num_objects`, (h, w) = `grid_hw`, P = `num_tokens`)."""
        entry = self.read_entry(name, ("maps", "rows"))
        if entry is None:
            return None
        maps, rows, shape = entry["maps"], entry["rows"], self.shape
        if (tuple(maps.shape) != (num_objects, shape.channels, *grid_hw) or maps.dtype != torch.float32
                or tuple(rows.shape) != (shape.num_layers, num_tokens, shape.hidden_size)):
            return None
        return maps, rows

    def entry_bytes(self, maps: torch.Tensor, rows: torch.Tensor) -> int:
        """The data bytes of one entry (the file adds a small header)."""
        return maps.numel() * maps.element_size() + rows.numel() * rows.element_size()

    def check_space(self, *, sample_bytes: float, samples: int) -> None:
        """Refuse to start filling the cache when `samples` more entries of about `sample_bytes` each (from the
        first computed batch) do not fit on the disk with 5% to spare.

        Raises:
            StorageError: naming the estimate, the free space and the directory.
        """
        self.space_checked = True
        needed = int(sample_bytes * samples * 1.05) + samples * 512  # entries + their headers
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            raise StorageError(f"data.lmm_cache: {samples} entries of about {sample_bytes / 2**20:.2f} MiB each need "
                               f"about {needed / 2**30:.2f} GiB in {self.directory}, which has "
                               f"{free / 2**30:.2f} GiB free; free disk space there, point data.lmm_cache at a "
                               f"larger disk, or set data.lmm_cache=null")

    def write(self, name: str, maps: torch.Tensor, rows: torch.Tensor) -> None:
        """Store one sample's (K, C, h, w) maps and (layers, P, D) rows atomically.

        Raises:
            StorageError: the entry cannot be written (a full disk, no permission).
        """
        self.write_entry(name, {"maps": maps, "rows": rows}, doing="writing an LMM-output cache entry")


class LMMCacheWriter:
    """Writes the entries a step computed (`lmm_new_entries` of the forward), checking the disk before the first.

    Args:
        cache: the opened cache.
        samples: how many samples the run will cache at most (the training set's size); with the entries already
            present and the first entries' size this gives the estimate `LMMOutputCache.check_space` checks.
    """

    def __init__(self, cache: LMMOutputCache, *, samples: int) -> None:
        self.cache = cache
        self.samples = samples

    def write(self, entries: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Store (name, maps, rows) entries (read back to the host here)."""
        entries = [(name, maps.detach().cpu(), rows.detach().cpu()) for name, maps, rows in entries]
        if not self.cache.space_checked and entries:
            present = sum(1 for _ in self.cache.directory.glob("*/*.safetensors"))
            sample_bytes = sum(self.cache.entry_bytes(maps, rows) for _, maps, rows in entries) / len(entries)
            self.cache.check_space(sample_bytes=sample_bytes, samples=max(self.samples - present, len(entries)))
        for name, maps, rows in entries:
            self.cache.write(name, maps, rows)

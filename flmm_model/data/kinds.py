"""Which dataset types exist and the config checks each needs, without importing torch or any dataset module.

`DATASET_KINDS` names every config `type`; `check_dataset_configs` runs when a config loads (`config_loader`), so
`run.py <command> --help` and config errors answer before torch loads. How each type is built and scored lives in
`flmm_model.data.registry.DATASETS`, which has exactly these keys (checked when the registry imports).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from flmm_model.config import ConfigError, DataConfig, DatasetConfig


@dataclass(frozen=True)
class DatasetKind:
    """The config-level facts of one dataset type.

    Attributes:
        needs_root: the dataset reads files under a data root (`data.root` or the entry's `root`).
        check: extra checks of a config entry, raising ConfigError naming `key` (None = no extra checks).
    """

    needs_root: bool = True
    check: Callable[[DatasetConfig, str], None] | None = None


def _check_protocol(*allowed: str) -> Callable[[DatasetConfig, str], None]:
    def check(ds: DatasetConfig, key: str) -> None:
        if ds.protocol not in allowed:
            raise ConfigError(f"{key}.protocol: {ds.type} takes one of {list(allowed)}, found {ds.protocol!r}")

    return check


def _check_synthetic(ds: DatasetConfig, key: str) -> None:
    """The ranges `SyntheticShapesDataset` takes, checked at load time so that they are config errors."""
    if ds.length < 1:
        raise ConfigError(f"{key}.length: a synthetic dataset needs length >= 1, found {ds.length}")
    if ds.image_size is not None and not 16 <= ds.image_size[0] <= ds.image_size[1]:
        raise ConfigError(f"{key}.image_size: a synthetic dataset needs [min, max] with 16 <= min <= max pixels, "
                          f"found {ds.image_size}")
    if ds.object_size is not None and not 0 < ds.object_size[0] <= ds.object_size[1] < 1:
        raise ConfigError(f"{key}.object_size: a synthetic dataset needs [min, max] with 0 < min <= max < 1 (fractions "
                          f"of the shorter side), found {ds.object_size}")


def _check_video(ds: DatasetConfig, key: str) -> None:
    if ds.max_frames < 2:
        raise ConfigError(f"{key}.max_frames: a clip needs a budget of at least 2 frames (one frame group), found "
                          f"{ds.max_frames}")
    if ds.group_tokens < 1:
        raise ConfigError(f"{key}.group_tokens: expected >= 1 vision tokens per frame group, found {ds.group_tokens}")


def _check_synthetic_clips(ds: DatasetConfig, key: str) -> None:
    _check_video(ds, key)
    if ds.length < 1 or ds.num_frames < 1:
        raise ConfigError(f"{key}: synthetic_clips needs length >= 1 and num_frames >= 1, found length {ds.length}, "
                          f"num_frames {ds.num_frames}")
    if ds.image_size is not None and not 16 <= ds.image_size[0] <= ds.image_size[1]:
        raise ConfigError(f"{key}.image_size: synthetic_clips needs [min, max] with 16 <= min <= max pixels, found "
                          f"{ds.image_size}")


_REFCOCO = DatasetKind(check=_check_protocol("flmm", "per_sentence"))

DATASET_KINDS: dict[str, DatasetKind] = {
    "refcoco": _REFCOCO,
    "refcoco+": _REFCOCO,
    "refcocog": _REFCOCO,
    "png": DatasetKind(),
    "reason_seg": DatasetKind(check=_check_protocol("flmm", "direct")),
    "synthetic": DatasetKind(needs_root=False, check=_check_synthetic),
    # referring video object segmentation (`data.video_sources`); root: the dataset's folder, default
    # <data.root>/<type>
    "ref_youtube_vos": DatasetKind(check=_check_video),
    "mevis": DatasetKind(check=_check_video),
    "revos": DatasetKind(check=_check_video),
    "synthetic_clips": DatasetKind(needs_root=False, check=_check_synthetic_clips),
}
VIDEO_TYPES = ("ref_youtube_vos", "mevis", "revos", "synthetic_clips")


def check_dataset_configs(data: DataConfig) -> None:
    """Config checks of every dataset entry (type known, data root set where needed, the type's own checks)."""
    for section in ("train", "val", "test"):
        for index, ds in enumerate(getattr(data, section)):
            key = f"data.{section}.{index}"
            if ds.type not in DATASET_KINDS:
                raise ConfigError(f"{key}.type: expected one of {sorted(DATASET_KINDS)}, found {ds.type!r}")
            kind = DATASET_KINDS[ds.type]
            if kind.needs_root and not (ds.root or data.root):
                raise ConfigError(f"{key}.root: {ds.type} needs a data root; set data.root=/path/to/data "
                                  f"(or {key}.root)")
            if kind.check is not None:
                kind.check(ds, key)


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
    """Name of a dataset split in logs and tables: `ds.name`, else `<type>_<split>` (+ `_<protocol>` when the
    protocol is not the default F-LMM one)."""
    if ds.name:
        return ds.name
    suffix = f"_{ds.protocol}" if ds.protocol != "flmm" else ""
    return f"{ds.type}_{ds.split}{suffix}"

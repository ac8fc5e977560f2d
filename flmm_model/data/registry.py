"""How each dataset type is built and scored: one `DatasetSpec` per config `type`.

A new dataset is one module in `flmm_model/data/` plus one entry in `DATASETS` (how to build it from its config
entry, how it is scored: its metric class) and one in `flmm_model.data.kinds.DATASET_KINDS` (the config checks it
needs, kept free of torch so a config is checked before torch loads). Training, validation and `run.py eval`
go through `build_dataset` and `DatasetSpec.metric`; nothing else switches on a dataset type.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flmm_model.config import DatasetConfig
from flmm_model.data.item import PromptSettings
from flmm_model.data.kinds import DATASET_KINDS, dataset_label, dataset_seed  # noqa: F401 (re-exported)
from flmm_model.data.png import PngDataset
from flmm_model.data.reason_seg import ReasonSegDataset
from flmm_model.data.refcoco import RefCocoDataset
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.data.video_grounding import VideoGroundingDataset
from flmm_model.data.video_sources import VideoSource
from flmm_model.metrics import PngRecallMetric, ReasonSegMetric, ReferSegMetric
from flmm_model.video_metrics import VideoSegMetric


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset type.

    Attributes:
        build: (config entry, data root, prompt settings, train, on_error) -> the dataset.
        metric: class whose instances score predictions (`update(pred_masks, gt_masks, meta)`, `compute()`).
    Its config-level facts (needs a data root, extra checks) are its `DatasetKind` in `flmm_model.data.kinds`.
    """

    build: Callable[..., torch.utils.data.Dataset]
    metric: type


def _build_refcoco(ds: DatasetConfig, *, root: str, prompt: PromptSettings, train: bool,
                   on_error: str) -> RefCocoDataset:
    return RefCocoDataset(root, ds.type, ds.split, split_by=ds.split_by, image_dir=ds.image_dir,
                          protocol=ds.protocol, train=train, seed=dataset_seed(ds), sentence=ds.sentence,
                          sentence_draw=ds.sentence_draw, on_error=on_error, **_prompt_kwargs(prompt))


def _build_png(ds: DatasetConfig, *, root: str, prompt: PromptSettings, train: bool, on_error: str) -> PngDataset:
    return PngDataset(root, ds.split, image_dir=ds.image_dir, ann_dir=ds.ann_dir, on_error=on_error,
                      **_prompt_kwargs(prompt))


def _build_synthetic(ds: DatasetConfig, *, root: str, prompt: PromptSettings, train: bool,
                     on_error: str) -> SyntheticDataset:
    shape_options = {"image_size": tuple(ds.image_size) if ds.image_size else None, "max_objects": ds.max_objects,
                     "object_size": tuple(ds.object_size) if ds.object_size else None}
    return SyntheticDataset(length=ds.length, seed=dataset_seed(ds), **_prompt_kwargs(prompt),
                            **{k: v for k, v in shape_options.items() if v is not None})


def _build_reason_seg(ds: DatasetConfig, *, root: str, prompt: PromptSettings, train: bool,
                      on_error: str) -> ReasonSegDataset:
    # The protocol travels in the items: `flmm` items carry a `generate` request in their meta (answer first, then
    # ground the answer: evaluate.score_dataset), `direct` items are scored on their own prompt (the query grounded).
    return ReasonSegDataset(root, ds.split, image_dir=ds.image_dir, protocol=ds.protocol, on_error=on_error,
                            **_prompt_kwargs(prompt))


def _build_video(ds: DatasetConfig, *, root: str, prompt: PromptSettings, train: bool,
                 on_error: str) -> VideoGroundingDataset:
    if ds.type == "synthetic_clips":
        options = {"image_size": tuple(ds.image_size) if ds.image_size else None, "max_objects": ds.max_objects,
                   "object_size": tuple(ds.object_size) if ds.object_size else None}
        source = SyntheticClips(length=ds.length, seed=dataset_seed(ds), num_frames=ds.num_frames,
                                **{k: v for k, v in options.items() if v is not None})
    else:  # the dataset's own folder: the entry's root, else <data.root>/<type>
        source = VideoSource(ds.type, ds.root or os.path.join(root, ds.type), ds.split, on_error=on_error)
    return VideoGroundingDataset(source, max_frames=ds.max_frames, on_error=on_error, prompt=prompt,
                                 group_tokens=ds.group_tokens)


def _prompt_kwargs(prompt: PromptSettings) -> dict[str, Any]:
    return dict(tokenizer=prompt.tokenizer, image_processor=prompt.image_processor, instruction=prompt.instruction,
                system=prompt.system, max_length=prompt.max_length)


DATASETS: dict[str, DatasetSpec] = {
    "refcoco": DatasetSpec(build=_build_refcoco, metric=ReferSegMetric),
    "refcoco+": DatasetSpec(build=_build_refcoco, metric=ReferSegMetric),
    "refcocog": DatasetSpec(build=_build_refcoco, metric=ReferSegMetric),
    "png": DatasetSpec(build=_build_png, metric=PngRecallMetric),
    "reason_seg": DatasetSpec(build=_build_reason_seg, metric=ReasonSegMetric),
    "synthetic": DatasetSpec(build=_build_synthetic, metric=ReferSegMetric),
    "ref_youtube_vos": DatasetSpec(build=_build_video, metric=VideoSegMetric),
    "mevis": DatasetSpec(build=_build_video, metric=VideoSegMetric),
    "revos": DatasetSpec(build=_build_video, metric=VideoSegMetric),
    "synthetic_clips": DatasetSpec(build=_build_video, metric=VideoSegMetric),
}
if set(DATASETS) != set(DATASET_KINDS):  # a type added on one side only would pass its config checks, then fail
    raise RuntimeError(f"data.registry.DATASETS {sorted(DATASETS)} and data.kinds.DATASET_KINDS "
                       f"{sorted(DATASET_KINDS)} name different dataset types")


def dataset_spec(ds: DatasetConfig) -> DatasetSpec:
    """The registry entry of a config entry's type (ValueError listing the known types otherwise)."""
    if ds.type not in DATASETS:
        raise ValueError(f"dataset type {ds.type!r}: expected one of {sorted(DATASETS)}")
    return DATASETS[ds.type]


class EpochSubset(torch.utils.data.Subset):
    """`torch.utils.data.Subset` that forwards `set_epoch` to the dataset it wraps, so a training set cut down with
    `max_samples` still draws new random choices every epoch when its dataset does."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_dataset(ds: DatasetConfig, *, data_root: str, prompt: PromptSettings, train: bool,
                  on_error: str) -> torch.utils.data.Dataset:
    """One dataset from its config entry (paths default to the layout under `ds.root` or `data_root`)."""
    dataset = dataset_spec(ds).build(ds, root=ds.root or data_root, prompt=prompt, train=train, on_error=on_error)
    if ds.max_samples is not None and ds.max_samples < len(dataset):
        dataset = EpochSubset(dataset, range(ds.max_samples))
    return dataset


@dataclass(frozen=True)
class NamedDataset:
    """A built dataset with its table label and its scoring metric class."""

    label: str
    dataset: torch.utils.data.Dataset
    metric: type


def build_datasets(entries: list[DatasetConfig], *, data_root: str, prompt: PromptSettings, train: bool,
                   on_error: str) -> list[NamedDataset]:
    """Every config entry built, in order (a missing file fails here, before any weights load)."""
    return [NamedDataset(label=dataset_label(ds), metric=dataset_spec(ds).metric,
                         dataset=build_dataset(ds, data_root=data_root, prompt=prompt, train=train,
                                               on_error=on_error))
            for ds in entries]

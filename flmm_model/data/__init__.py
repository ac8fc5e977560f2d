"""Datasets, prompts and batching for F-LMM grounding with Qwen2.5-VL.

Every dataset returns item dicts (keys in `flmm_model.data.item`) or, for bad data under `on_error="skip"`, None;
`Collator` / `collate` batch them and drop the Nones (see `flmm_model.data.errors`).

The names below are imported lazily (like the package's own `__init__`): importing a torch-free submodule such as
`flmm_model.data.kinds` (the config checks) loads neither torch nor the datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "Collator": "flmm_model.data.loader",
    "collate": "flmm_model.data.loader",
    "DataError": "flmm_model.data.errors",
    "image_tensor": "flmm_model.data.images",
    "load_rgb": "flmm_model.data.images",
    "qwen_image_inputs": "flmm_model.data.images",
    "to_rgb": "flmm_model.data.images",
    "make_item": "flmm_model.data.item",
    "PngDataset": "flmm_model.data.png",
    "DEFAULT_INSTRUCTION": "flmm_model.data.prompts",
    "DEFAULT_SYSTEM": "flmm_model.data.prompts",
    "encode_grounded": "flmm_model.data.prompts",
    "expression_parts": "flmm_model.data.prompts",
    "ReasonSegDataset": "flmm_model.data.reason_seg",
    "RefCocoDataset": "flmm_model.data.refcoco",
    "SyntheticDataset": "flmm_model.data.synthetic",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from flmm_model.data.errors import DataError  # noqa: F401
    from flmm_model.data.images import image_tensor, load_rgb, qwen_image_inputs, to_rgb  # noqa: F401
    from flmm_model.data.item import make_item  # noqa: F401
    from flmm_model.data.loader import Collator, collate  # noqa: F401
    from flmm_model.data.png import PngDataset  # noqa: F401
    from flmm_model.data.prompts import (  # noqa: F401
        DEFAULT_INSTRUCTION,
        DEFAULT_SYSTEM,
        encode_grounded,
        expression_parts,
    )
    from flmm_model.data.reason_seg import ReasonSegDataset  # noqa: F401
    from flmm_model.data.refcoco import RefCocoDataset  # noqa: F401
    from flmm_model.data.synthetic import SyntheticDataset  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flmm_model.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

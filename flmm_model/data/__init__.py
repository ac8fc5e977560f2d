"""Datasets, prompts and batching for F-LMM grounding with Qwen2.5-VL.

Every dataset returns item dicts (keys in `flmm_model.data.item`) or, for bad data under `on_error="skip"`, None;
`Collator` / `collate` batch them and drop the Nones (see `flmm_model.data.errors`).
"""

from flmm_model.data.collate import Collator, collate
from flmm_model.data.errors import DataError
from flmm_model.data.images import image_tensor, load_rgb, qwen_image_inputs, to_rgb
from flmm_model.data.item import make_item
from flmm_model.data.png import PngDataset
from flmm_model.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, encode_grounded, expression_parts
from flmm_model.data.reason_seg import ReasonSegDataset
from flmm_model.data.refcoco import RefCocoDataset
from flmm_model.data.synthetic import SyntheticDataset

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_SYSTEM",
    "Collator",
    "DataError",
    "PngDataset",
    "ReasonSegDataset",
    "RefCocoDataset",
    "SyntheticDataset",
    "collate",
    "encode_grounded",
    "expression_parts",
    "image_tensor",
    "load_rgb",
    "make_item",
    "qwen_image_inputs",
    "to_rgb",
]

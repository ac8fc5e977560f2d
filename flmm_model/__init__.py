"""flmm_model: F-LMM pixel grounding for a frozen Qwen-VL, in plain PyTorch + transformers.

Public API (imported lazily: `import flmm_model` loads neither torch nor transformers until a name is used, so
`run.py --help` answers at once):
    FrozenQwenSAM        the model (`forward`, `predict_masks`, `segment`, `chat`, `save_pretrained`, ...)
    GroundingPredictor   the inference API over a model: PIL image + phrases -> masks; chat; visual_cot
    ChatOutput, VisualCotOutput   what `FrozenQwenSAM.chat` / `.visual_cot` return
    LMMOutput            what the frozen LMM stage returns
    PreparedBatch, BatchPreparer  the host-side batch (`flmm_model.modeling.batch`)
    build_model          FrozenQwenSAM from a model config (ModelConfig / dict)
    build_qwen, build_sam, load_tokenizer, load_image_processor   the frozen pieces and their preprocessors

Layout: `modeling/` the network (tensors only), `backbones/` one adapter per Qwen-VL family, `data/` datasets and
caches, `recipes/` the jobs (train, eval, pretrain-lmm, cache-sam, convert-sam), `apps/` what users run on their
own images (predict, chat, the web demo).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "FrozenQwenSAM": "flmm_model.model",
    "build_model": "flmm_model.model",
    "GroundingPredictor": "flmm_model.predictor",
    "ChatOutput": "flmm_model.predictor",
    "VisualCotOutput": "flmm_model.predictor",
    "LMMOutput": "flmm_model.modeling.lmm",
    "PreparedBatch": "flmm_model.modeling.batch",
    "BatchPreparer": "flmm_model.modeling.batch",
    "build_qwen": "flmm_model.build",
    "build_sam": "flmm_model.build",
    "load_image_processor": "flmm_model.build",
    "load_tokenizer": "flmm_model.build",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from flmm_model.build import build_qwen, build_sam, load_image_processor, load_tokenizer  # noqa: F401
    from flmm_model.model import FrozenQwenSAM, build_model  # noqa: F401
    from flmm_model.modeling.batch import BatchPreparer, PreparedBatch  # noqa: F401
    from flmm_model.modeling.lmm import LMMOutput  # noqa: F401
    from flmm_model.predictor import ChatOutput, GroundingPredictor, VisualCotOutput  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flmm_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

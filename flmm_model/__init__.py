"""flmm_model: F-LMM pixel grounding for a frozen Qwen2.5-VL, in plain PyTorch + transformers.

Public API:
    FrozenQwenSAM        the model (`lmm_forward`, `forward`, `segment`, `save_pretrained`, `from_pretrained`)
    LMMOutput            what the frozen LMM stage returns
    build_model          FrozenQwenSAM from a model config (ModelConfig / dict)
    build_qwen, build_sam, load_tokenizer, load_image_processor   the frozen pieces and their preprocessors
"""

from flmm_model.build import build_model, build_qwen, build_sam, load_image_processor, load_tokenizer
from flmm_model.lmm import LMMOutput
from flmm_model.model import FrozenQwenSAM

__all__ = [
    "FrozenQwenSAM",
    "LMMOutput",
    "build_model",
    "build_qwen",
    "build_sam",
    "load_image_processor",
    "load_tokenizer",
]

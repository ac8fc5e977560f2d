"""flmm_model: F-LMM pixel grounding for a frozen Qwen2.5-VL, in plain PyTorch + transformers.

Public API:
    FrozenQwenSAM        the model (`lmm_forward`, `forward`, `segment`, `save_pretrained`, `from_pretrained`)
    GroundingPredictor   the inference API over a model: PIL image + phrases -> masks; chat; visual_cot
    ChatOutput, VisualCotOutput   what `FrozenQwenSAM.chat` / `.visual_cot` return
    LMMOutput            what the frozen LMM stage returns
    build_model          FrozenQwenSAM from a model config (ModelConfig / dict)
    build_qwen, build_sam, load_tokenizer, load_image_processor   the frozen pieces and their preprocessors
"""

from flmm_model.build import build_qwen, build_sam, load_image_processor, load_tokenizer
from flmm_model.lmm import LMMOutput
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.predictor import ChatOutput, GroundingPredictor, VisualCotOutput

__all__ = [
    "ChatOutput",
    "FrozenQwenSAM",
    "GroundingPredictor",
    "LMMOutput",
    "VisualCotOutput",
    "build_model",
    "build_qwen",
    "build_sam",
    "load_image_processor",
    "load_tokenizer",
]

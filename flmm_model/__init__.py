"""flmm_model: F-LMM pixel grounding for a frozen Qwen2.5-VL, in plain PyTorch + transformers."""

from flmm_model.build import build_qwen, build_sam, load_image_processor, load_tokenizer

__all__ = ["build_qwen", "build_sam", "load_image_processor", "load_tokenizer"]

"""FrozenQwenSAM: F-LMM grounding on a frozen Qwen-VL, with a U-Net mask head and a SAM refiner; and `build_model`.

The network is `modeling.grounding.GroundingModel` (a prepared batch -> losses / logits; it imports nothing that
uses it). This class adds what users call on top of it: the conveniences `segment`, `chat` and `visual_cot`
(one-line calls into the inference layer, `flmm_model.predictor.GroundingPredictor`, which sits over the network
and never imports this module) and the model files (`save_pretrained` / `from_pretrained`, format in
`checkpoint.py`). Modules take built parts; `build_model` is the one place that reads a model config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image

from flmm_model.build import build_qwen, build_sam, cast_sam_encoder, prompt_settings
from flmm_model.checkpoint import LoadedCheckpoint, load_checkpoint
from flmm_model.checkpoint import save_pretrained as save_model_files
from flmm_model.config import ModelConfig
from flmm_model.modeling.grounding import GroundingModel
from flmm_model.predictor import ChatOutput, GroundingPredictor, VisualCotOutput


class FrozenQwenSAM(GroundingModel):
    """Phrase grounding with a frozen Qwen-VL: attention maps -> U-Net coarse mask -> SAM refined mask.

    The network and its arguments: `modeling.grounding.GroundingModel`. Added here: `predictor()`, `segment`,
    `chat`, `visual_cot` (through `flmm_model.predictor`) and the model files.
    """

    def predictor(self) -> GroundingPredictor:
        """The inference API over this model (`flmm_model.predictor.GroundingPredictor`)."""
        return GroundingPredictor(self)

    def segment(self, image: Image.Image, phrases: str | Sequence[str]) -> torch.Tensor:
        """Masks for one or more phrases in a PIL image: (K, H, W) bool at the original size, on CPU.

        A convenience over `self.predictor().segment` (see `flmm_model.predictor`).
        """
        return self.predictor().segment(image, phrases)

    def segment_clip(self, frames: Sequence[Image.Image], phrases: str | Sequence[str], *,
                     key_frame: int | None = None, **options: Any) -> torch.Tensor:
        """Masks for phrases through a clip of PIL frames: (K, T, H, W) bool, on CPU. The frozen LMM watches the
        clip (or, with `key_frame`, grounds that frame alone) and SAM2's video memory tracks the masks when the
        refiner is SAM2 (see `GroundingPredictor.segment_clip`; `times=`, `max_frames=`)."""
        return self.predictor().segment_clip(frames, phrases, key_frame=key_frame, **options)

    def chat(self, image: Image.Image | Sequence[Image.Image], question: str, *, ground: Any = None,
             max_new_tokens: int = 512, **options: Any) -> ChatOutput:
        """Answer a question about the image(s), or a clip (`data.clips.ClipFrames`, e.g. `read_clip(path)`), with
        the frozen LMM and ground parts of the answer (a clip: masks (K, T, H, W) through its frames).

        A convenience over `self.predictor().chat` (see there for `ground`, `system`, `history`, ...).
        """
        return self.predictor().chat(image, question, ground=ground, max_new_tokens=max_new_tokens, **options)

    def visual_cot(self, image: Image.Image, question: str, **options: Any) -> VisualCotOutput:
        """F-LMM's visual chain-of-thought: ground the most relevant object, crop it, answer with both views.

        A convenience over `self.predictor().visual_cot`.
        """
        return self.predictor().visual_cot(image, question, **options)

    # ------------------------------------------------------------------ model files (format: checkpoint.py)

    def save_pretrained(self, directory: str) -> None:
        """Write the trainable weights and the build config (`flmm_model.checkpoint.save_pretrained`)."""
        save_model_files(directory, weights=self.trainable_state_dict(), model_config=self.build_config)

    @classmethod
    def from_pretrained(
        cls, path: str | LoadedCheckpoint, *, qwen_path: str | None = None, sam_path: str | None = None,
        tokenizer_path: str | None = None, device: str | None = None, **overrides: Any,
    ) -> FrozenQwenSAM:
        """Rebuild a saved model and load its trainable weights strictly.

        Args:
            path: a directory written by `save_pretrained`, a training checkpoint, or a run directory (its newest
                complete checkpoint, read at once: see `checkpoint.load_checkpoint`); or a checkpoint already read.
            qwen_path: local Qwen checkpoint (or preset name); default: the one recorded at save time.
            sam_path: local SAM directory (transformers layout) or preset name; default: the recorded one.
            tokenizer_path: tokenizer directory; default: the recorded one.
            device: where to put the model (default: CPU).
            overrides: other model-config fields to change (e.g. dtype="bfloat16").
        """
        loaded = path if isinstance(path, LoadedCheckpoint) else load_checkpoint(path)
        model_cfg = loaded.model_config(qwen=qwen_path, sam=sam_path, tokenizer=tokenizer_path, **overrides)
        model = build_model(model_cfg)
        if device is not None:
            model.to(device)
        model.load_trainable_state_dict(loaded.weights, strict=True)
        return model


def build_model(model_cfg: ModelConfig | dict[str, Any]) -> FrozenQwenSAM:
    """FrozenQwenSAM from a `ModelConfig` (or a dict / DictConfig with its fields): the one place that reads it.

    The frozen parts (Qwen, SAM's image encoder) get `model_cfg.dtype`; the trainable heads (U-Net, text projector,
    SAM prompt encoder and mask decoder) stay float32 (autocast handles mixed precision in training). Unknown keys and
    wrong types raise before anything is built.
    """
    schema = OmegaConf.structured(ModelConfig)
    cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(schema, model_cfg))
    dtype = getattr(torch, cfg.dtype)
    prompt = prompt_settings(cfg)  # tokenizer and image processor first: a mismatched tokenizer fails before weights
    qwen = build_qwen(cfg.qwen, dtype=dtype, attn_implementation="sdpa", seed=cfg.seed)
    sam = None  # attention-only ablation: the U-Net's masks, no text prompts and no SAM
    if not cfg.attention_only:
        sam = build_sam(cfg.sam, dtype=torch.float32, seed=cfg.seed)
        cast_sam_encoder(sam, dtype)
    torch.manual_seed(cfg.seed)  # the heads' initialization
    return FrozenQwenSAM(
        qwen=qwen,
        sam=sam,
        tokenizer=prompt.tokenizer,
        image_processor=prompt.image_processor,
        attn_capture=cfg.attn_capture,
        mask_head_widths=tuple(cfg.mask_head_widths),
        mask_head_size=cfg.mask_head_size,
        bce_weight=cfg.bce_weight,
        dice_weight=cfg.dice_weight,
        instruction=prompt.instruction,
        system=prompt.system,
        max_length=prompt.max_length,
        build_config=OmegaConf.to_container(OmegaConf.structured(cfg)),
    )

"""FrozenQwenSAM: F-LMM grounding on a frozen Qwen-VL, with a U-Net mask head and a SAM refiner; and `build_model`.

The forward path of a collated batch (`flmm_model.data.collate`) to the losses:
- `lmm.py`: compact ids -> expanded inputs -> one frozen forward -> attention maps and phrase hidden states (the
  backbone adapter in `backbones/` runs the family's vision tower and decoder; `attention.py` captures the maps);
- `mask_head.py`: attention maps -> coarse mask logits (U-Net);
- `sam_refiner.py`: phrase hidden states -> SAM prompt tokens; coarse logits + tokens -> refined logits;
- `losses.py`: BCE + Dice on both masks; this file glues them.
Per batch: the LMM runs once for all images; the U-Net runs per image (grids differ); SAM embeds all images in one
call and decodes each image's objects together. Inference on PIL images: `predictor.py`; model files:
`checkpoint.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from transformers import SamModel

from flmm_model.backbones import QwenVLModel
from flmm_model.build import build_qwen, build_sam, prompt_settings
from flmm_model.checkpoint import LoadedCheckpoint, load_checkpoint
from flmm_model.checkpoint import save_pretrained as save_model_files
from flmm_model.config import DEFAULT_INSTRUCTION, ModelConfig
from flmm_model.data.prompts import DEFAULT_SYSTEM
from flmm_model.errors import CheckpointError
from flmm_model.lmm import FrozenQwenLMM, LMMOutput
from flmm_model.losses import mask_loss_terms, resize_gt_masks
from flmm_model.mask_head import UNetMaskHead
from flmm_model.predictor import ChatOutput, GroundingPredictor, VisualCotOutput
from flmm_model.sam_refiner import SamRefiner, TextPromptProjector


class FrozenQwenSAM(nn.Module):
    """Phrase grounding with a frozen Qwen2.5-VL: attention maps -> U-Net coarse mask -> SAM refined mask.

    Trainable: the U-Net mask head, the text prompt projector (layer weights + Linear) and SAM's prompt encoder
    and mask decoder. Frozen (no grad, eval, run under no_grad): Qwen2.5-VL and SAM's image encoder.

    Args:
        qwen: Qwen2-VL, Qwen2.5-VL or Qwen3-VL (weights untouched; its text attention is routed through the capture
            functions).
        sam: transformers SamModel, or None for the LMM + U-Net stage alone (coarse masks only).
        tokenizer: Qwen tokenizer, used by `segment` (and kept so the model is self-contained).
        image_processor: Qwen2-VL image processor, used by `segment`.
        attn_capture: "sdpa" (default, lean) or "eager" (F-LMM reference); see `attention.py`.
        mask_head_widths: U-Net stage widths.
        mask_head_size: longest side of the attention maps fed to the U-Net.
        coarse_threshold: logit threshold of the coarse mask for SAM's box prompt.
        bce_weight: weight of both BCE terms. dice_weight: weight of both Dice terms.
        instruction, system: the prompt `segment` builds (the same as the datasets'; the model config's).
        max_length: longest compact token sequence `segment` accepts.
        build_config: the builder's config (a plain dict), saved with the weights so `from_pretrained` can rebuild.
    """

    def __init__(
        self,
        *,
        qwen: QwenVLModel,
        sam: SamModel | None,
        tokenizer=None,
        image_processor=None,
        attn_capture: str = "sdpa",
        mask_head_widths: Sequence[int] = (64, 128, 256, 512),
        mask_head_size: int = 64,
        coarse_threshold: float = 0.0,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = DEFAULT_SYSTEM,
        max_length: int = 2048,
        build_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.lmm = FrozenQwenLMM(qwen=qwen, attn_capture=attn_capture)
        # U-Net input channels come from the loaded Qwen config: layers x heads.
        self.mask_head = UNetMaskHead(in_channels=self.lmm.num_attention_channels, widths=tuple(mask_head_widths),
                                      upsample_size=mask_head_size)
        self.sam_refiner = SamRefiner(sam=sam, coarse_threshold=coarse_threshold) if sam is not None else None
        self.text_projector = None
        if sam is not None:
            self.text_projector = TextPromptProjector(num_layers=self.lmm.num_layers,
                                                      hidden_size=self.lmm.hidden_size,
                                                      prompt_dim=self.sam_refiner.prompt_dim)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.instruction = instruction
        self.system = system
        self.max_length = max_length
        self.build_config = dict(build_config or {})

    # ------------------------------------------------------------------ frozen / trainable bookkeeping

    @property
    def qwen(self) -> QwenVLModel:
        return self.lmm.qwen

    @property
    def device(self) -> torch.device:
        return next(self.mask_head.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer should see (everything that requires grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the trainable tensors, by their names in this module."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load trainable weights; with `strict`, missing or unexpected keys (or shapes) raise CheckpointError (a
        ValueError): the weights were trained around another backbone or with other head sizes."""
        own = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise CheckpointError(f"trainable weights do not match the model: missing {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                                  f"{' ...' if len(unexpected) > 8 else ''}")
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    continue
                if own[name].shape != value.shape:
                    raise CheckpointError(f"trainable weight {name}: expected shape {tuple(own[name].shape)}, found "
                                          f"{tuple(value.shape)} (a checkpoint of another backbone size? check "
                                          f"model.qwen)")
                own[name].copy_(value)

    def parameter_summary(self) -> dict[str, tuple[int, int]]:
        """Per part: (trainable, frozen) parameter counts."""
        parts = {"qwen": self.lmm, "mask_head": self.mask_head}
        if self.sam_refiner is not None:
            sam = self.sam_refiner.sam
            parts.update(text_projector=self.text_projector, sam_image_encoder=sam.vision_encoder,
                         sam_prompt_encoder=sam.prompt_encoder, sam_mask_decoder=sam.mask_decoder)
        summary, seen = {}, set()
        for name, module in parts.items():
            trainable = frozen = 0
            for p in module.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
            summary[name] = (trainable, frozen)
        rest = [p for p in self.parameters() if id(p) not in seen]
        if rest:
            summary["other"] = (sum(p.numel() for p in rest if p.requires_grad),
                                sum(p.numel() for p in rest if not p.requires_grad))
        return summary

    # ------------------------------------------------------------------ forward

    def lmm_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mask_ids: torch.Tensor,
        grounded_image: Sequence[int] | None = None,
    ) -> LMMOutput:
        """The frozen Qwen2.5-VL stage on compact (or pre-expanded) ids; see `FrozenQwenLMM.forward`."""
        return self.lmm(input_ids, attention_mask, pixel_values, image_grid_thw, mask_ids,
                        grounded_image=grounded_image)

    def predict_logits(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Coarse and refined logits for a collated batch (no losses).

        Returns:
            coarse_logits: per sample (K_b, h', w') U-Net logits over the whole image.
            mask_logits: per sample (K_b, H_b, W_b) float32 logits at the original image size (SAM-refined; the
                coarse logits upsampled when the model has no SAM).
        """
        lmm_out = self.lmm_forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                   batch["image_grid_thw"], batch["mask_ids"],
                                   grounded_image=batch.get("grounded_image"))
        sizes = [tuple(image.shape[-2:]) for image in batch["images"]]
        head_dtype = next(self.mask_head.parameters()).dtype
        coarse_logits = [self.mask_head(maps.to(self.device, head_dtype)) for maps in lmm_out.attention_maps]
        if self.sam_refiner is None:
            mask_logits = [
                nn.functional.interpolate(logits[:, None].float(), size=size, mode="bilinear",
                                          align_corners=False)[:, 0]  # (K, H, W)
                for logits, size in zip(coarse_logits, sizes, strict=True)
            ]
            return coarse_logits, mask_logits
        image_embeddings = self.sam_refiner.encode_images(self.sam_refiner.preprocess(list(batch["images"])))
        mask_logits = []
        for b, (coarse, size) in enumerate(zip(coarse_logits, sizes, strict=True)):
            text_prompts = [self.text_projector(states.to(self.device)) for states in lmm_out.phrase_hidden_states[b]]
            mask_logits.append(self.sam_refiner(image_embeddings=image_embeddings[b], coarse_logits=coarse,
                                                text_prompts=text_prompts, original_size=size))
        return coarse_logits, mask_logits

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Losses and logits for a collated batch (see `flmm_model.data.collate`).

        Returns:
            dict with `loss` (weighted sum of the four terms), `loss_mask_bce`, `loss_mask_dice` (coarse U-Net mask
            vs the ground truth resized to its grid), `loss_sam_bce`, `loss_sam_dice` (refined mask vs the
            ground truth at original size; absent without SAM), `coarse_logits` and `mask_logits` (per sample).
        """
        coarse_logits, mask_logits = self.predict_logits(batch)
        gt_masks = [m.to(self.device) for m in batch["gt_masks"]]
        for b, (gt, logits) in enumerate(zip(gt_masks, mask_logits, strict=True)):
            if gt.shape != logits.shape:
                raise ValueError(f"sample {b}: gt_masks shape {tuple(gt.shape)} does not match the "
                                 f"{logits.shape[0]} phrases at image size {tuple(logits.shape[1:])}")
        coarse_targets = [resize_gt_masks(gt, tuple(c.shape[-2:])) for gt, c in zip(gt_masks, coarse_logits,
                                                                                     strict=True)]
        coarse_terms = mask_loss_terms([c.float() for c in coarse_logits], coarse_targets)
        out = {"loss_mask_bce": coarse_terms["bce"], "loss_mask_dice": coarse_terms["dice"]}
        loss = self.bce_weight * coarse_terms["bce"] + self.dice_weight * coarse_terms["dice"]
        if self.sam_refiner is not None:
            sam_terms = mask_loss_terms(mask_logits, [gt.float() for gt in gt_masks])
            out.update(loss_sam_bce=sam_terms["bce"], loss_sam_dice=sam_terms["dice"])
            loss = loss + self.bce_weight * sam_terms["bce"] + self.dice_weight * sam_terms["dice"]
        out.update(loss=loss, coarse_logits=coarse_logits, mask_logits=mask_logits)
        return out

    @torch.no_grad()
    def predict_masks(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per sample (K_b, H_b, W_b) bool masks: sigmoid(logits) > 0.5 at the original size."""
        was_training = self.training
        self.eval()
        try:
            _, mask_logits = self.predict_logits(batch)
        finally:
            self.train(was_training)
        return [logits > 0 for logits in mask_logits]

    def segment(self, image: Image.Image, phrases: str | Sequence[str]) -> torch.Tensor:
        """Masks for one or more phrases in a PIL image: (K, H, W) bool at the original size, on CPU.

        A convenience over `GroundingPredictor(self).segment` (see `flmm_model.predictor`).
        """
        return GroundingPredictor(self).segment(image, phrases)

    # ------------------------------------------------------------------ generation and chat (issue 10)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        **generate_options: Any,
    ) -> torch.Tensor:
        """New token ids (B, T) from the frozen LMM on compact ids, expanded as the forward expands them; greedy
        unless `do_sample=True`. See `FrozenQwenLMM.generate`."""
        return self.lmm.generate(input_ids, attention_mask, pixel_values, image_grid_thw, **generate_options)

    def chat(self, image: Image.Image | Sequence[Image.Image], question: str, *, ground: Any = None,
             max_new_tokens: int = 512, **options: Any) -> ChatOutput:
        """Answer a question about the image(s) with the frozen LMM and ground parts of the answer.

        A convenience over `GroundingPredictor(self).chat` (see there for `ground`, `system`, `history`, ...).
        """
        return GroundingPredictor(self).chat(image, question, ground=ground, max_new_tokens=max_new_tokens,
                                             **options)

    def visual_cot(self, image: Image.Image, question: str, **options: Any) -> VisualCotOutput:
        """F-LMM's visual chain-of-thought: ground the most relevant object, crop it, answer with both views.

        A convenience over `GroundingPredictor(self).visual_cot`.
        """
        return GroundingPredictor(self).visual_cot(image, question, **options)

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
    qwen = build_qwen(cfg.qwen, dtype=dtype, attn_implementation="sdpa", seed=cfg.seed)
    sam = build_sam(cfg.sam, dtype=torch.float32, seed=cfg.seed)
    sam.vision_encoder.to(dtype)
    prompt = prompt_settings(cfg)
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

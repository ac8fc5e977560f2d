"""The grounding network: a (prepared) batch -> attention maps and hidden states of the frozen Qwen-VL -> U-Net
coarse logits -> SAM refined logits -> losses.

The parts are callees: `lmm.py` (the frozen LMM stage; the backbone adapter in `backbones/` runs the family's
vision tower and decoder, `attention.py` captures the maps), `mask_head.py` (attention maps -> coarse logits),
`sam_refiner.py` (phrase hidden states -> SAM prompt tokens; coarse logits + tokens -> refined logits) and
`losses.py`. What the forward reads beyond the weights comes from `batch.py`, built on the host (in the data
loader's workers during training) so the forward reads nothing back from the device. The LMM runs once for all
images (its vision tower one attention call per block); the U-Net once per distinct attention grid; the text
projection once; SAM embeds all images in one call (or reads them from `data.sam_cache`) and decodes all objects
of the batch in one prompt-encoder and one mask-decoder call; the four losses are computed on padded canvases in
one call each (`frames.py`).

This module knows no consumer: `flmm_model.model.FrozenQwenSAM` adds the user-facing conveniences (segment, chat,
visual CoT through `flmm_model.predictor`) and the model files on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2Model, Sam2VideoModel, SamModel

from flmm_model.backbones import QwenVLModel, VisionFeatures
from flmm_model.backbones.tokenizers import check_tokenizer
from flmm_model.backbones.video import TimestampTokens
from flmm_model.config import DEFAULT_INSTRUCTION
from flmm_model.data.lmm_cache import LMMOutputCache
from flmm_model.data.prompts import DEFAULT_SYSTEM
from flmm_model.data.sam_cache import SamEmbeddingCache, sam_cache_key
from flmm_model.device import to_device
from flmm_model.errors import CheckpointError
from flmm_model.modeling.batch import BatchPreparer, CachedLMMOutputs, PreparedBatch
from flmm_model.modeling.frames import resize_on_canvas, size_mask
from flmm_model.modeling.lmm import FrozenQwenLMM, LMMOutput
from flmm_model.modeling.losses import canvas_loss_terms
from flmm_model.modeling.mask_head import UNetMaskHead
from flmm_model.modeling.sam2_propagation import Sam2Propagator
from flmm_model.modeling.sam2_refiner import refiner_for
from flmm_model.modeling.text_prompt import TextPromptProjector


def _row_outputs(lmm_out: LMMOutput, prepared: PreparedBatch) -> CachedLMMOutputs:
    """What each head row reads of the LMM (batches with clips, see `modeling.batch`): its sample's maps (an image)
    or its frame group's slice of the clip's maps, (K_b, C, h, w), and its sample's phrase rows."""
    maps = [lmm_out.attention_maps[b] if group < 0 else lmm_out.attention_maps[b][:, :, group]
            for b, group in zip(prepared.row_sample, prepared.row_group, strict=True)]
    rows = torch.tensor(prepared.row_sample, device=lmm_out.phrase_rows.device)  # (R,), from a host list
    return CachedLMMOutputs(attention_maps=maps, phrase_rows=lmm_out.phrase_rows.index_select(1, rows))  # (L, R, P, D)


class GroundingModel(nn.Module):
    """Phrase grounding with a frozen Qwen2.5-VL: attention maps -> U-Net coarse mask -> SAM refined mask.

    Trainable: the U-Net mask head, the text prompt projector (layer weights + Linear) and SAM's prompt encoder
    and mask decoder. Frozen (no grad, eval, run under no_grad): Qwen2.5-VL and SAM's image encoder.

    Args:
        qwen: a Qwen-VL of any supported family (weights untouched; its text attention is routed through the capture
            functions).
        sam: transformers SamModel (refined by `SamRefiner`), Sam2Model or Sam2VideoModel (SAM2 / SAM2.1, refined by
            `Sam2Refiner`), or None for the LMM + U-Net stage alone (coarse masks only).
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
        sam: SamModel | Sam2Model | Sam2VideoModel | None,
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
        if tokenizer is not None:  # its image / vision-block ids must be the config's (another vocabulary fails here)
            check_tokenizer(tokenizer, qwen.config, family=self.lmm.adapter.name)
            if self.lmm.adapter.timestamped_video:  # Qwen3-VL / Qwen3.5 write each frame group's time as text
                self.lmm.timestamp_tokens = TimestampTokens.from_tokenizer(tokenizer)
        # U-Net input channels come from the loaded Qwen config: map layers x heads.
        self.mask_head = UNetMaskHead(in_channels=self.lmm.num_attention_channels, widths=tuple(mask_head_widths),
                                      upsample_size=mask_head_size)
        # the refiner adapter of the SAM's family (SamRefiner / Sam2Refiner)
        self.sam_refiner = refiner_for(sam, coarse_threshold=coarse_threshold) if sam is not None else None
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
        # Prediction on clips: True = a SAM2 video refiner propagates the key frames (the first frame of every frame
        # group) through the clip; False = every watched frame is refined from its group's maps (no memory).
        self.clip_propagation = True

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

    def compile_parts(self, *, backend: str = "inductor") -> None:
        """`torch.compile` in place (module names and checkpoints unchanged) the repeated blocks and the heads: the
        vision blocks, the text decoder layers, SAM's image-encoder layers, the U-Net and SAM's mask decoder.

        Shapes are dynamic (sequence lengths, grids and object counts change from batch to batch), so new shapes do
        not recompile. The capture and the padded-token mask run as plain Python between compiled pieces.
        """
        modules = [*self.qwen.model.visual.blocks, *self.qwen.model.language_model.layers, self.mask_head]
        if self.sam_refiner is not None:
            modules += [*self.sam_refiner.encoder_blocks, self.sam_refiner.sam.mask_decoder]
        for module in modules:
            module.compile(backend=backend, dynamic=True)

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

    def batch_preparer(self, *, targets: bool = True, sam_cache: SamEmbeddingCache | None = None,
                       lmm_cache: LMMOutputCache | None = None) -> BatchPreparer:
        """The host side of this model's batches (`modeling.batch.BatchPreparer`, picklable): give it to the loader
        (`make_loader(..., prepare=...)`) to prepare batches in its workers. `targets=False` for prediction (no
        ground-truth entries); `sam_cache`: read SAM embeddings from it (`open_sam_cache`); `lmm_cache`: read the
        LMM's outputs from it (`open_lmm_cache`)."""
        refiner = self.sam_refiner
        return BatchPreparer(qwen_config=self.qwen.config, coarse_size=self.mask_head.upsample_size,
                             sam_image_size=refiner.image_size if refiner is not None else None,
                             sam_mask_side=refiner.mask_input_size if refiner is not None else None,
                             sam_stretch=refiner is not None and refiner.stretch,
                             targets=targets, sam_cache=sam_cache, lmm_cache=lmm_cache,
                             keep_lmm_inputs=self.lmm.sharded, clip_frames="keys" if self.propagates else "all",
                             timestamp_tokens=self.lmm.timestamp_tokens, max_video_tokens=self.lmm.max_video_tokens)

    @property
    def propagates(self) -> bool:
        """Whether the refiner has a video memory (a SAM2 video model) and `clip_propagation` is on: a clip's key
        frames are refined and the masks propagated through the clip; otherwise every frame is refined on its own."""
        return (self.clip_propagation and self.sam_refiner is not None
                and isinstance(self.sam_refiner.sam, Sam2VideoModel))

    def open_lmm_cache(self, directory: str, *, precision: str, sentence_draws: Sequence[str]) -> LMMOutputCache:
        """The LMM-output cache in `directory` for this model's frozen LMM, prompt and pixel budget, the training
        sets' `sentence_draws` (`data.lmm_cache.sentence_draws`) and the LMM's `precision` ("bf16" / "fp32"): see
        `data.lmm_cache` and `FrozenQwenLMM.open_output_cache`.

        Raises:
            LMMCacheError: the directory holds a cache built for another setup.
        """
        size = self.image_processor.size
        return self.lmm.open_output_cache(directory, instruction=self.instruction, system=self.system,
                                          sentence_draws=sentence_draws, min_pixels=size.shortest_edge,
                                          max_pixels=size.longest_edge, precision=precision)

    def open_sam_cache(self, directory: str, *, precision: str) -> SamEmbeddingCache:
        """The SAM embedding cache in `directory` for this model's SAM image encoder, input size and pixel budget, and
        the encoder's `precision` ("bf16" under bf16 autocast, else "fp32"): see `data.sam_cache`.

        Raises:
            SamCacheError: the directory holds a cache built for another setup.
            ValueError: the model has no SAM.
        """
        if self.sam_refiner is None:
            raise ValueError("data.sam_cache: the model has no SAM refiner")
        refiner = self.sam_refiner
        size = self.image_processor.size  # the pixel budget: shortest_edge / longest_edge are min / max pixels
        key = sam_cache_key(encoder=refiner.frozen_encoder, image_size=refiner.image_size,
                            dtype=refiner.encoder_dtype, precision=precision, min_pixels=size.shortest_edge,
                            max_pixels=size.longest_edge)
        return SamEmbeddingCache(directory, key=key, embedding_shape=refiner.embedding_shape)

    def prepare_batch(self, batch: dict[str, Any]) -> PreparedBatch:
        """A collated CPU batch -> `PreparedBatch` on the host (`modeling.batch`): the one the loader's workers made
        (`batch["prepared"]`), else this model's `batch_preparer` run here (targets when the batch has ground truth).

        Raises:
            ValueError: inconsistent input (see `lmm_inputs.validate_lmm_inputs`), or ground-truth masks that do not
                match a sample's phrases or image size.
        """
        if isinstance(batch.get("prepared"), PreparedBatch):
            return batch["prepared"]
        return self.batch_preparer()(batch)

    def _prepared(self, batch: dict[str, Any] | PreparedBatch) -> PreparedBatch:
        if isinstance(batch, PreparedBatch):
            return batch
        return to_device(self.prepare_batch(batch), self.device)

    def _heads(self, prepared: PreparedBatch, vision: VisionFeatures | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, LMMOutput | CachedLMMOutputs]:
        """(K, h'_max, w'_max) coarse and (K, H_max, W_max) float32 refined logits canvases of a prepared batch, the
        SAM embeddings computed for the images the SAM cache missed (None without a cache), and what the LMM gave
        (its output, or the LMM-output cache's entries: then the LMM does not run)."""
        lmm_out = prepared.lmm_cached
        if lmm_out is None:
            lmm_out = self.lmm.forward_prepared(prepared.lmm, vision=vision)
        heads_in = lmm_out if prepared.row_sample is None else _row_outputs(lmm_out, prepared)
        head_dtype = next(self.mask_head.parameters()).dtype
        outputs = []
        for group in prepared.unet_groups:  # one U-Net call per distinct attention grid
            maps = [heads_in.attention_maps[b] for b in group.samples]
            maps = maps[0] if len(maps) == 1 else torch.cat(maps)  # (K_g, C, h, w)
            outputs.append(self.mask_head(maps.to(head_dtype)))  # (K_g, h', w')
        if prepared.coarse_order is None:
            coarse = outputs[0]  # (K, h', w'): one grid, objects in order
        else:
            height, width = prepared.coarse_canvas
            padded = [F.pad(logits, (0, width - logits.shape[2], 0, height - logits.shape[1])) for logits in outputs]
            coarse = torch.cat(padded).index_select(0, prepared.coarse_order)  # (K, h'_max, w'_max)
        frames = prepared.frames
        if self.sam_refiner is None:
            refined = resize_on_canvas(coarse[:, None].float(), frames.coarse, frames.original, prepared.canvas)
            return coarse, refined[:, 0], None, lmm_out
        refiner = self.sam_refiner
        image_embeddings, computed = prepared.sam_embeddings, None
        if image_embeddings is None or prepared.sam_missing.numel():  # a shape: no read of the device
            computed = refiner.encode_images(refiner.normalize(prepared.sam_pixels, prepared.sam_resized))
            if image_embeddings is None:
                image_embeddings, computed = computed, None
            else:  # cached rows + the misses encoded now
                image_embeddings = image_embeddings.index_copy(0, prepared.sam_missing,
                                                               computed.to(image_embeddings.dtype))
        text_tokens = self.text_projector(heads_in.phrase_rows)  # (rows, P, prompt_dim)
        num_objects = coarse.shape[0]
        text_tokens = text_tokens.flatten(0, 1).index_select(0, prepared.text_index).view(num_objects, -1,
                                                                                          text_tokens.shape[-1])
        refined = refiner.refine(image_embeddings=image_embeddings.index_select(0, prepared.object_image),
                                 coarse=coarse, frames=frames, text_tokens=text_tokens,
                                 text_valid=prepared.text_valid, canvas=prepared.canvas)
        return coarse, refined, computed, lmm_out

    def _split(self, prepared: PreparedBatch, coarse: torch.Tensor, refined: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample views of the canvases: (K_b, h'_b, w'_b) coarse and (K_b, H_b, W_b) refined logits."""
        coarse_logits, mask_logits = [], []
        per_sample = zip(prepared.object_offsets, prepared.num_objects, prepared.image_sizes, prepared.coarse_sizes,
                         strict=True)
        for offset, count, (height, width), (grid_height, grid_width) in per_sample:
            coarse_logits.append(coarse[offset:offset + count, :grid_height, :grid_width])
            mask_logits.append(refined[offset:offset + count, :height, :width])
        return coarse_logits, mask_logits

    def predict_logits(self, batch: dict[str, Any] | PreparedBatch, *, vision: VisionFeatures | None = None
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Coarse and refined logits for a collated batch, or a prepared one (no losses). `vision`: the batch's
        vision features already computed (`FrozenQwenLMM.generate(..., return_vision=True)` over the same images).

        Returns:
            coarse_logits: per sample (K_b, h', w') U-Net logits over the whole image.
            mask_logits: per sample (K_b, H_b, W_b) float32 logits at the original image size (SAM-refined; the
                coarse logits upsampled when the model has no SAM).
        """
        prepared = self._prepared(batch)
        coarse, refined, _, _ = self._heads(prepared, vision)
        return self._split(prepared, coarse, refined)

    def forward(self, batch: dict[str, Any] | PreparedBatch) -> dict[str, Any]:
        """Losses and logits for a collated batch (see `flmm_model.data.loader`), or one from `prepare_batch`
        moved to the device (what the training loop passes: then nothing is read back from the device).

        All objects of the batch go through each head at once: the U-Net once per distinct attention grid, the
        text projection, SAM's prompt encoder and mask decoder and the four losses once for the whole batch.

        Returns:
            dict with `loss` (weighted sum of the four terms), `loss_mask_bce`, `loss_mask_dice` (coarse U-Net mask
            vs the ground truth resized to its grid), `loss_sam_bce`, `loss_sam_dice` (refined mask vs the
            ground truth at original size; absent without SAM), each the mean over the batch's masks of the
            per-mask loss, `coarse_logits` and `mask_logits` (per sample), and with a SAM cache that missed images
            `sam_new_embeddings` (M, C, e, e), theirs (to write to the cache, `prepared.sam_missing_names`); with an
            LMM-output cache that missed samples, `lmm_new_entries`: (name, (K_b, C, h, w) maps, (layers, P_b, D)
            rows) of each (to write to it).
        """
        prepared = self._prepared(batch)
        if prepared.gt_canvas is None:
            raise ValueError("forward: the batch has no gt_masks (use predict_logits / predict_masks to predict)")
        coarse, refined, new_embeddings, lmm_out = self._heads(prepared)
        frames = prepared.frames
        coarse_terms = canvas_loss_terms(coarse, prepared.coarse_targets,
                                         size_mask(frames.coarse, *prepared.coarse_canvas), frames.coarse.prod(1))
        out = {"loss_mask_bce": coarse_terms["bce"].mean(), "loss_mask_dice": coarse_terms["dice"].mean()}
        loss = self.bce_weight * out["loss_mask_bce"] + self.dice_weight * out["loss_mask_dice"]
        if self.sam_refiner is not None:
            sam_terms = canvas_loss_terms(refined, prepared.gt_canvas, size_mask(frames.original, *prepared.canvas),
                                          frames.original.prod(1))
            out.update(loss_sam_bce=sam_terms["bce"].mean(), loss_sam_dice=sam_terms["dice"].mean())
            loss = loss + self.bce_weight * out["loss_sam_bce"] + self.dice_weight * out["loss_sam_dice"]
        coarse_logits, mask_logits = self._split(prepared, coarse, refined)
        out.update(loss=loss, coarse_logits=coarse_logits, mask_logits=mask_logits)
        if new_embeddings is not None:
            out["sam_new_embeddings"] = new_embeddings
        if prepared.lmm_missing:
            out["lmm_new_entries"] = [(name, lmm_out.attention_maps[b], lmm_out.phrase_rows[:, b, :tokens])
                                      for b, name, tokens in prepared.lmm_missing]
        return out

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode inside the block (the training mode the model had is restored after it, even on an error)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def clip_key_logits(self, batch: dict[str, Any]) -> list[dict[int, torch.Tensor] | torch.Tensor]:
        """Refined logits of the frames the heads see (no losses), per sample: for a clip sample {frame: (K_b, H, W)
        float32} over its key frames (the first frame of every frame group when the refiner propagates, else every
        frame; see `modeling.batch`), for an image sample its (K_b, H, W) logits. The frozen LMM watches each clip
        whole; each key frame reads its frame group's maps."""
        prepared = batch.get("prepared")
        if not isinstance(prepared, PreparedBatch):
            prepared = self.batch_preparer(targets=False)(batch)
        prepared = to_device(prepared, self.device)
        with self.evaluating():
            _, row_logits = self.predict_logits(prepared)  # per row (K, H, W)
        if prepared.row_sample is None:
            return row_logits
        out: list[dict[int, torch.Tensor] | torch.Tensor] = [{} for _ in batch["metas"]]
        for logits, b, frame in zip(row_logits, prepared.row_sample, prepared.row_frame, strict=True):
            if frame < 0:
                out[b] = logits
            else:
                out[b][frame] = logits
        return out

    @torch.no_grad()
    def complete_clip(self, frames: Sequence[torch.Tensor], key_logits: dict[int, torch.Tensor]) -> torch.Tensor:
        """(K, T, H, W) float32 logits on every frame of a clip from the key frames' logits: with a SAM2 video model
        as the refiner its memory propagates them (`Sam2Propagator`: forward from the first key frame, then back
        to frame 0; the key frames keep their own logits), otherwise each frame takes the logits of its nearest key
        frame (the earlier one on a tie). `frames`: T uint8 (3, H, W) tensors."""
        keys = sorted(key_logits)
        if not keys or not 0 <= keys[0] <= keys[-1] < len(frames):
            raise ValueError(f"complete_clip: key frames {keys} must lie in the clip's {len(frames)} frames")
        if self.propagates and len(keys) < len(frames):
            with self.evaluating():
                propagator = Sam2Propagator(sam2=self.sam_refiner.sam, freeze=False)  # the refiner keeps training
                logits = propagator.propagate([frame.to(self.device) for frame in frames], key_logits)
            for frame in keys:
                logits[:, frame] = key_logits[frame].to(logits.dtype)
            return logits  # (K, T, H, W)
        nearest = [min(keys, key=lambda k: (abs(k - t), k)) for t in range(len(frames))]
        return torch.stack([key_logits[k].float() for k in nearest], dim=1)  # (K, T, H, W)

    @torch.no_grad()
    def predict_clip_logits(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per sample float32 logits (no losses): (K_b, N_b, H, W) over every frame of a clip sample (its key frames
        refined, the rest completed by `complete_clip`), (K_b, H, W) for an image sample."""
        out = []
        for b, keys in enumerate(self.clip_key_logits(batch)):
            if isinstance(keys, dict):
                frames = [frame.permute(2, 0, 1) for frame in batch["clips"][b]]  # N (3, H, W) uint8
                keys = self.complete_clip(frames, keys)
            out.append(keys)
        return out

    @torch.no_grad()
    def predict_masks(self, batch: dict[str, Any], *, vision: VisionFeatures | None = None) -> list[torch.Tensor]:
        """Per sample (K_b, H_b, W_b) bool masks: sigmoid(logits) > 0.5 at the original size (`vision`: see
        `predict_logits`). A batch with clips: (K_b, N_b, H, W) for each clip sample (`predict_clip_logits`)."""
        if batch.get("pixel_values_videos") is not None:
            return [logits > 0 for logits in self.predict_clip_logits(batch)]
        with self.evaluating():
            _, mask_logits = self.predict_logits(batch, vision=vision)
        return [logits > 0 for logits in mask_logits]

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        **generate_options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, VisionFeatures]:
        """New token ids (B, T) from the frozen LMM on compact ids, expanded as the forward expands them; greedy
        unless `do_sample=True`. See `FrozenQwenLMM.generate` (`vision=`, `return_vision=`)."""
        return self.lmm.generate(input_ids, attention_mask, pixel_values, image_grid_thw, **generate_options)

"""SAM refiner: coarse U-Net logits + text prompt tokens -> refined mask logits at the original image size.

`SamRefiner` prompts SAM with the coarse mask and the phrase's text prompt tokens (`text_prompt.TextPromptProjector`:
one per phrase token, from the LMM's hidden states).

Frames (all sizes from `sam.config`, never hard-coded):
- original image: (H, W) pixels.
- SAM input frame: S x S (S = vision image_size, 1024 for the released checkpoints). The image is resized so its
  longest side is S, to (rh, rw) = (floor(H * S / max(H, W) + 0.5), floor(W * S / max(H, W) + 0.5)) as
  segment-anything does, and zero-padded bottom/right (after normalization).
- image embedding: e x e (e = prompt encoder image_embedding_size = S / patch, 64 for the released checkpoints).
- mask input / low-res masks: 4e x 4e (256); the resized image occupies its top-left (rh * 4e / S, rw * 4e / S).
- coarse grid: (h', w') from the mask head; it covers the WHOLE original image (Qwen's resize keeps all content).

Per object k the prompts are:
- dense: the coarse logits resized (bilinear) onto the image part of the 4e x 4e mask input, the padded part set
  to `pad_logit`; not detached, so SAM losses train the mask head through it.
- sparse: the box of the thresholded coarse mask (logits > coarse_threshold; the whole image when empty) in SAM
  input pixels (no gradient), embedded by SAM's prompt encoder (2 corner tokens), followed by the object's T_k
  text prompt tokens (one sparse token per phrase token).
The mask decoder predicts one mask (multimask_output=False) whose logits are mapped back like segment-anything's
postprocessing: upsample to S x S, crop the resized-image part, resize to (H, W).

All objects of a batch, of images of any sizes, are refined in one call of each SAM part (`SamRefiner.refine`):
each object carries its sizes (`frames.ObjectFrames`), its coarse logits and refined logits sit at the top left of
shared canvases, and the resizes above are one `grid_sample` each (`frames.resize_on_canvas`, the same bilinear
interpolation as `F.interpolate`). Text prompts are padded to the longest; the decoder's attention
(`decoder_attention`, registered with transformers like the LMM's capture) masks the padded tokens wherever tokens
are the keys, so every object's mask is the one it gets alone. The frozen encoder's relative-position tables are
looked up once on the device (`CachedRelativePositions`) instead of from a CPU index in every block.

What trains: the prompt encoder and the mask decoder. Frozen: the image encoder (three ways: requires_grad_(False),
kept in eval by `train()`, run under no_grad) and `shared_image_embedding`, the random Gaussian matrix of SAM's
Fourier positional encoding (segment-anything's `pe_layer`, a buffer there, never trained). In transformers it is a
Parameter tied to `prompt_encoder.shared_embedding`, so freezing it freezes both names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SamModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flmm_model.device import move_to
from flmm_model.modeling.frames import ObjectFrames, resize_on_canvas, sam_input_canvas, sam_resized_size, size_mask

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on 0-255 values, RGB
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# The mask decoder's attention: SDPA, with padded prompt tokens masked out where tokens are the keys.
DECODER_ATTENTION = "flmm_decoder_sdpa"
# (key_valid (N, tokens) bool, ids of the attention modules whose keys are the tokens) during a padded decode.
_PADDED_TOKENS: ContextVar[tuple[Tensor, frozenset[int]] | None] = ContextVar("flmm_padded_tokens", default=None)


def decoder_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention; inside `padded_tokens`, the attentions whose keys are the prompt tokens (the
    tokens' self-attention and the image-to-token attention) see only the real tokens, so padding changes nothing."""
    state = _PADDED_TOKENS.get()
    if state is not None and id(module) in state[1]:
        attention_mask = state[0][:, None, None, :]  # (N, 1, 1, tokens)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextlib.contextmanager
def padded_tokens(key_valid: Tensor | None, modules: frozenset[int]) -> Iterator[None]:
    """Mask the padded prompt tokens (`key_valid` (N, tokens) False) in the attention `modules` (by id)."""
    token = _PADDED_TOKENS.set(None if key_valid is None else (key_valid, modules))
    try:
        yield
    finally:
        _PADDED_TOKENS.reset(token)


class CachedRelativePositions:
    """`SamVisionAttention.get_rel_pos` computed once per table and size, then reused.

    The frozen image encoder looks up its relative-position tables in every attention block of every forward with
    an index built on the CPU (`torch.arange(q_size)`), a host-to-device copy each time. The tables are frozen, so
    the looked-up (q, k, channels) tensor is kept on their device and rebuilt only when a table moves or changes.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.tables: dict[tuple, Tensor] = {}

    def __call__(self, q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
        key = (q_size, k_size, id(rel_pos), rel_pos.data_ptr(), rel_pos.device, rel_pos.dtype, rel_pos._version)
        table = self.tables.get(key)
        if table is None:
            self.tables = {k: v for k, v in self.tables.items() if k[2] != id(rel_pos)}  # the stale one, if any
            with torch.no_grad():
                table = type(self.attention).get_rel_pos(self.attention, q_size, k_size, rel_pos)
            self.tables[key] = table
        return table


class SamRefiner(nn.Module):
    """Refine coarse mask logits with SAM, prompted by the coarse mask (dense + box) and text tokens.

    `refine` decodes all objects of a batch (of several images) in one prompt-encoder and one mask-decoder call;
    `forward` is the same for the objects of one image.

    Args:
        sam: a transformers SamModel (real weights or a tiny random one); its image encoder is frozen here.
        coarse_threshold: logit threshold on the coarse mask for the box prompt (0.0 = probability 0.5).
        pad_logit: mask-input logit for the padded (non-image) part of SAM's frame. -20 (probability ~2e-9) says
            "certainly background", like the strongly negative logits SAM itself predicts there.
    """

    family = "sam"
    stretch = False  # SAM's input frame keeps the aspect ratio (longest side S, padded)

    def __init__(self, *, sam: SamModel, coarse_threshold: float = 0.0, pad_logit: float = -20.0) -> None:
        super().__init__()
        config = sam.config
        self.image_size = config.vision_config.image_size  # S
        self.embedding_size = config.prompt_encoder_config.image_embedding_size  # e
        self.mask_input_size = 4 * self.embedding_size  # two stride-2 convs take the mask input down to e
        self.prompt_dim = config.prompt_encoder_config.hidden_size  # P
        patch_size = config.vision_config.patch_size
        if self.image_size // patch_size != self.embedding_size or config.prompt_encoder_config.image_size \
                != self.image_size:
            raise ValueError(f"SamRefiner: inconsistent SAM config: vision image_size {self.image_size} / patch "
                             f"{patch_size} must equal prompt encoder image_embedding_size {self.embedding_size}, "
                             f"and prompt encoder image_size {config.prompt_encoder_config.image_size} must equal "
                             f"{self.image_size}")
        self._hold(sam, coarse_threshold=coarse_threshold, pad_logit=pad_logit, pixel_mean=SAM_PIXEL_MEAN,
                   pixel_std=SAM_PIXEL_STD)
        sam.vision_encoder.requires_grad_(False)
        sam.shared_image_embedding.requires_grad_(False)
        sam.prompt_encoder.shared_embedding.requires_grad_(False)  # the same tied Parameter; explicit anyway
        sam.vision_encoder.eval()
        for layer in sam.vision_encoder.layers:  # frozen tables: looked up once on the device, not every forward
            layer.attn.get_rel_pos = CachedRelativePositions(layer.attn)
        self.output_tokens = sam.mask_decoder.num_mask_tokens + 1  # IoU token + mask tokens, before the prompts

    def _hold(self, sam: nn.Module, *, coarse_threshold: float, pad_logit: float, pixel_mean: tuple[float, ...],
              pixel_std: tuple[float, ...]) -> None:
        """What every refiner family sets up alike: the model, the thresholds, the input statistics (on 0-255
        values) and the mask decoder's attention routed through `decoder_attention`, with the attentions that take
        the prompt tokens as keys (the tokens' self-attention and the image-to-token attention) recorded."""
        self.sam = sam
        self.coarse_threshold = coarse_threshold
        self.pad_logit = pad_logit
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), persistent=False)
        ALL_ATTENTION_FUNCTIONS.register(DECODER_ATTENTION, decoder_attention)
        sam.mask_decoder.config._attn_implementation = DECODER_ATTENTION  # the decoder's attentions share it
        self.token_keyed = frozenset(id(module) for block in sam.mask_decoder.transformer.layers
                                     for module in (block.self_attn, block.cross_attn_image_to_token))

    def train(self, mode: bool = True) -> SamRefiner:
        """Set train/eval mode; the frozen image encoder always stays in eval."""
        super().train(mode)
        self.sam.vision_encoder.eval()
        return self

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(rh, rw): the size of an (H, W) image inside SAM's S x S frame (longest side S, rounded half up)."""
        return sam_resized_size(original_size[0], original_size[1], self.image_size, stretch=self.stretch)

    def frames(self, original_sizes: list[tuple[int, int]], coarse_sizes: list[tuple[int, int]]) -> ObjectFrames:
        """Per-object frames (host tensors) from each object's image size and coarse grid size."""
        return ObjectFrames.build(original_sizes, coarse_sizes, image_size=self.image_size,
                                  mask_side=self.mask_input_size, stretch=self.stretch)

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(C, e, e) of one image embedding."""
        return (self.sam.config.mask_decoder_config.hidden_size, self.embedding_size, self.embedding_size)

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.sam.vision_encoder.patch_embed.projection.weight.dtype

    @property
    def frozen_encoder(self) -> nn.Module:
        """Every frozen module the image embeddings depend on (what the SAM-embedding cache fingerprints)."""
        return self.sam.vision_encoder

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        """The image encoder's repeated blocks (what `GroundingModel.compile_parts` compiles)."""
        return list(self.sam.vision_encoder.layers)

    def normalize(self, canvas: Tensor, resized: Tensor) -> Tensor:
        """SAM input pixels from the uint8 canvas of `frames.sam_input_canvas`.

        Args:
            canvas: (B, 3, S, S) uint8, each image resized to (rh, rw) at the top left.
            resized: (B, 2) float (rh, rw) per image.

        Returns:
            (B, 3, S, S) pixels normalized with SAM's mean / std, zero outside each image, in the encoder's dtype.
        """
        pixels = (canvas.float() - self.pixel_mean) / self.pixel_std
        inside = size_mask(resized, self.image_size, self.image_size)[:, None]  # (B, 1, S, S)
        return (pixels * inside).to(self.encoder_dtype)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        """SAM input pixels for a batch of images, on this module's device.

        Args:
            images: B uint8 RGB tensors of shape (3, H, W), values 0-255, any sizes.

        Returns:
            (B, 3, S, S) normalized pixels in the image encoder's dtype: each image resized (bilinear, antialias,
            rounded back to 0-255 integers like segment-anything's uint8 resize) so its longest side is S,
            normalized with SAM's mean/std, zero-padded bottom/right.
        """
        canvas = sam_input_canvas([image.cpu() for image in images], self.image_size, stretch=self.stretch)
        resized = torch.tensor([self.resized_size(tuple(image.shape[1:])) for image in images],
                               dtype=torch.float32).reshape(-1, 2)
        return self.normalize(canvas.to(self.pixel_mean.device), resized.to(self.pixel_mean.device))

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Frozen SAM image encoder, batched across images.

        Args:
            pixels: (B, 3, S, S) output of `preprocess`.

        Returns:
            (B, C, e, e) image embeddings (no grad).
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"SamRefiner.encode_images: expected pixels (B, 3, {self.image_size}, "
                             f"{self.image_size}), found {tuple(pixels.shape)}")
        return self.sam.vision_encoder(pixel_values=pixels.to(self.encoder_dtype)).last_hidden_state

    # ------------------------------------------------------------------ prompts and masks of many objects at once

    def canvas_mask_inputs(self, coarse: Tensor, frames: ObjectFrames) -> Tensor:
        """Dense prompts: each object's coarse logits resized (bilinear) onto its image's part of the 4e x 4e mask
        input, `pad_logit` elsewhere; (K, hc, wc) coarse canvas (gradient kept) -> (K, 1, 4e, 4e)."""
        side = self.mask_input_size
        inside = resize_on_canvas(coarse[:, None].float(), frames.coarse, frames.mask_input, (side, side))
        valid = size_mask(frames.mask_input, side, side)[:, None]  # (K, 1, 4e, 4e)
        padded = torch.where(valid, inside, self.pad_logit)
        return padded.to(self.sam.prompt_encoder.mask_embed.conv1.weight.dtype)

    @torch.no_grad()
    def canvas_boxes(self, coarse: Tensor, frames: ObjectFrames) -> Tensor:
        """Box prompts, (K, 4) float32 (x_min, y_min, x_max, y_max) in SAM input pixels, of a (K, hc, wc) coarse
        canvas: see `boxes`."""
        _, height, width = coarse.shape
        foreground = (coarse.detach() > self.coarse_threshold) & size_mask(frames.coarse, height, width)
        rows = foreground.any(dim=2)  # (K, hc)
        cols = foreground.any(dim=1)  # (K, wc)
        row_index = torch.arange(height, device=coarse.device)
        col_index = torch.arange(width, device=coarse.device)
        y_first = torch.where(rows, row_index, height).amin(dim=1)
        y_last = torch.where(rows, row_index, -1).amax(dim=1)
        x_first = torch.where(cols, col_index, width).amin(dim=1)
        x_last = torch.where(cols, col_index, -1).amax(dim=1)

        scale = frames.resized / frames.coarse  # (K, 2): SAM input pixels per coarse cell, (y, x)
        x_min, y_min = x_first * scale[:, 1], y_first * scale[:, 0]
        x_max = torch.maximum((x_last + 1) * scale[:, 1] - 1, x_min)
        y_max = torch.maximum((y_last + 1) * scale[:, 0] - 1, y_min)
        boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1).float()  # (K, 4)
        whole_image = torch.stack([torch.zeros_like(x_min), torch.zeros_like(x_min), frames.resized[:, 1] - 1.0,
                                   frames.resized[:, 0] - 1.0], dim=1)  # (K, 4)
        empty = ~rows.any(dim=1)  # (K,)
        return torch.where(empty[:, None], whole_image, boxes)

    def canvas_postprocess(self, low_res_logits: Tensor, frames: ObjectFrames, canvas: tuple[int, int]) -> Tensor:
        """(K, 4e, 4e) low-res logits -> (K, H_max, W_max) float32 logits: each upsampled to S x S, its resized-image
        part resized to its image's (H, W) at the canvas's top left (the rest is filler)."""
        logits = F.interpolate(low_res_logits[:, None].float(), size=(self.image_size, self.image_size),
                               mode="bilinear", align_corners=False)  # (K, 1, S, S)
        return resize_on_canvas(logits, frames.resized, frames.original, canvas)[:, 0]  # (K, H_max, W_max)

    def refine(
        self, *, image_embeddings: Tensor, coarse: Tensor, frames: ObjectFrames, text_tokens: Tensor,
        text_valid: Tensor | None, canvas: tuple[int, int],
    ) -> Tensor:
        """Refine K objects, of any images, in one prompt-encoder and one mask-decoder call.

        Objects with fewer text tokens than the longest are padded; the padded tokens are masked out of every
        attention where tokens are the keys (`decoder_attention`), so each object's mask equals its mask decoded
        alone.

        Args:
            image_embeddings: (K, C, e, e) each object's image embedding (rows of `encode_images`, no grad).
            coarse: (K, hc, wc) coarse canvas: object k's logits cover its whole image in the top-left
                `frames.coarse[k]` part (gradient kept).
            frames: per-object sizes (on this module's device).
            text_tokens: (K, T, P) text prompt tokens (from `TextPromptProjector`), T >= 0.
            text_valid: (K, T) bool, False on padded tokens; None when every object has T tokens.
            canvas: (H_max, W_max) of the output.

        Returns:
            (K, H_max, W_max) float32 refined logits (not probabilities); object k's are the top-left (H_k, W_k).
        """
        num_objects = coarse.shape[0]
        expected = self.embedding_shape
        if image_embeddings.dim() != 4 or tuple(image_embeddings.shape[1:]) != expected \
                or image_embeddings.shape[0] != num_objects:
            raise ValueError(f"SamRefiner: expected image_embeddings of shape ({num_objects}, *{expected}) (one per "
                             f"object), found {tuple(image_embeddings.shape)}")
        if text_tokens.dim() != 3 or text_tokens.shape[0] != num_objects or text_tokens.shape[2] != self.prompt_dim:
            raise ValueError(f"SamRefiner: expected text_tokens of shape ({num_objects}, T, {self.prompt_dim}), found "
                             f"{tuple(text_tokens.shape)}")
        if num_objects == 0:
            return coarse.new_zeros((0, *canvas), dtype=torch.float32)

        dtype = self.sam.mask_decoder.iou_token.weight.dtype
        mask_inputs = self.canvas_mask_inputs(coarse, frames)  # (K, 1, 4e, 4e)
        boxes = self.canvas_boxes(coarse, frames)  # (K, 4)
        with torch.no_grad():
            image_pe = self.sam.get_image_wide_positional_embeddings()  # (1, C, e, e)
        box_tokens, dense = self.sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=boxes[:, None],
                                                    input_masks=mask_inputs)  # (K, 1, 2, P), (K, P, e, e)
        sparse = torch.cat([box_tokens.to(dtype), text_tokens.to(dtype)[:, None]], dim=2)  # (K, 1, 2 + T, P)
        key_valid = None
        if text_valid is not None:  # tokens: output tokens, 2 box corners, T text tokens
            key_valid = F.pad(text_valid, (self.output_tokens + box_tokens.shape[2], 0), value=True)
        with padded_tokens(key_valid, self.token_keyed):
            masks = self.decode(image_embeddings.to(dtype), image_pe.to(dtype).expand(num_objects, -1, -1, -1),
                                sparse, dense)  # (K, 4e, 4e)
        return self.canvas_postprocess(masks, frames, canvas)

    def decode(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
        """The mask decoder on (K, C, e, e) embeddings and positions, (K, 1, tokens, P) sparse and (K, P, e, e)
        dense prompts -> (K, 4e, 4e) low-res logits of the single mask."""
        masks, _ = self.sam.mask_decoder(image_embeddings=image_embeddings, image_positional_embeddings=image_pe,
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)  # (K, 1, 1, 4e, 4e)
        return masks[:, 0, 0]

    # ------------------------------------------------------------------ the same for the objects of one image

    def _frames_of(self, coarse_logits: Tensor, original_size: tuple[int, int]) -> ObjectFrames:
        count = coarse_logits.shape[0]
        frames = self.frames([tuple(original_size)] * count, [tuple(coarse_logits.shape[1:])] * count)
        return move_to(frames, coarse_logits.device)

    def mask_inputs(self, coarse_logits: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Dense prompt of one image's objects: (K, h', w') coarse logits covering the whole image (gradient kept)
        -> (K, 1, 4e, 4e) logits in SAM's prompt-encoder dtype (see `canvas_mask_inputs`)."""
        return self.canvas_mask_inputs(coarse_logits, self._frames_of(coarse_logits, original_size))

    @torch.no_grad()
    def boxes(self, coarse_logits: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Box prompts: the bounding box of each thresholded coarse mask, in SAM input pixels.

        Coarse cell i covers input pixels [i * rh / h', (i + 1) * rh / h') (same for x with rw / w'). A box is
        (x_min, y_min, x_max, y_max) with inclusive pixel indices, like segment-anything's mask-to-box: the first
        pixel of the first foreground cell to the last pixel of the last one. An empty mask gives the whole image
        (0, 0, rw - 1, rh - 1).

        Args:
            coarse_logits: (K, h', w') coarse logits (read only; no gradient flows through the box).
            original_size: (H, W) of the original image.

        Returns:
            (K, 4) float32 boxes.
        """
        return self.canvas_boxes(coarse_logits, self._frames_of(coarse_logits, original_size))

    def postprocess_masks(self, low_res_logits: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Map (K, 4e, 4e) low-res logits to (K, H, W) float32 logits: upsample to S x S, crop, resize."""
        frames = self._frames_of(low_res_logits[:, :1, :1], original_size)  # the coarse size is unused here
        return self.canvas_postprocess(low_res_logits, frames, tuple(original_size))

    def forward(
        self, *, image_embeddings: Tensor, coarse_logits: Tensor, text_prompts: list[Tensor],
        original_size: tuple[int, int],
    ) -> Tensor:
        """Refine the K objects of one image (`refine` on them; the image embedding is shared, computed once by
        `encode_images`).

        Args:
            image_embeddings: (C, e, e) this image's row of `encode_images` (no grad).
            coarse_logits: (K, h', w') coarse logits of the mask head, covering the whole image (gradient kept).
            text_prompts: K tensors (T_k, P) of text prompt tokens (from `TextPromptProjector`), T_k >= 0.
            original_size: (H, W) of the original image.

        Returns:
            (K, H, W) float32 refined mask logits (not probabilities) at the original size.
        """
        expected = self.embedding_shape
        if tuple(image_embeddings.shape) != expected:
            raise ValueError(f"SamRefiner: expected image_embeddings of shape {expected} (one image), found "
                             f"{tuple(image_embeddings.shape)}")
        if coarse_logits.dim() != 3 or len(text_prompts) != coarse_logits.shape[0]:
            raise ValueError(f"SamRefiner: expected coarse_logits (K, h', w') and K text prompts, found "
                             f"{tuple(coarse_logits.shape)} and {len(text_prompts)} text prompts")
        for index, prompt in enumerate(text_prompts):
            if prompt.dim() != 2 or prompt.shape[1] != self.prompt_dim:
                raise ValueError(f"SamRefiner: text prompt {index} must have shape (T, {self.prompt_dim}), found "
                                 f"{tuple(prompt.shape)}")
        num_objects = coarse_logits.shape[0]
        if num_objects == 0:
            return coarse_logits.new_zeros((0, *original_size), dtype=torch.float32)
        lengths = [prompt.shape[0] for prompt in text_prompts]
        longest = max(lengths)
        text_tokens = torch.stack([F.pad(prompt, (0, 0, 0, longest - prompt.shape[0])) for prompt in text_prompts])
        text_valid = None
        if min(lengths) != longest:
            text_valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # (K, T)
            text_valid = text_valid.to(coarse_logits.device)
        return self.refine(image_embeddings=image_embeddings[None].expand(num_objects, -1, -1, -1),
                           coarse=coarse_logits, frames=self._frames_of(coarse_logits, original_size),
                           text_tokens=text_tokens, text_valid=text_valid, canvas=tuple(original_size))

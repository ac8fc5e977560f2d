"""SAM refiner: coarse U-Net logits + text prompt tokens -> refined mask logits at the original image size.

Two modules: `TextPromptProjector` turns a phrase's LMM hidden states into SAM sparse prompt tokens (one per phrase
token: the hidden states of every decoder layer mixed by learnable softmax weights, then Linear(D -> P)), and
`SamRefiner` prompts SAM with them and the coarse mask.

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

What trains: the prompt encoder and the mask decoder. Frozen: the image encoder (three ways: requires_grad_(False),
kept in eval by `train()`, run under no_grad) and `shared_image_embedding`, the random Gaussian matrix of SAM's
Fourier positional encoding (segment-anything's `pe_layer`, a buffer there, never trained). In transformers it is a
Parameter tied to `prompt_encoder.shared_embedding`, so freezing it freezes both names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import SamModel

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on 0-255 values, RGB
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class SamRefiner(nn.Module):
    """Refine coarse mask logits with SAM, prompted by the coarse mask (dense + box) and text tokens.

    Args:
        sam: a transformers SamModel (real weights or a tiny random one); its image encoder is frozen here.
        coarse_threshold: logit threshold on the coarse mask for the box prompt (0.0 = probability 0.5).
        pad_logit: mask-input logit for the padded (non-image) part of SAM's frame. -20 (probability ~2e-9) says
            "certainly background", like the strongly negative logits SAM itself predicts there.
    """

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
        self.sam = sam
        self.coarse_threshold = coarse_threshold
        self.pad_logit = pad_logit
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(3, 1, 1), persistent=False)

        sam.vision_encoder.requires_grad_(False)
        sam.shared_image_embedding.requires_grad_(False)
        sam.prompt_encoder.shared_embedding.requires_grad_(False)  # the same tied Parameter; explicit anyway
        sam.vision_encoder.eval()

    def train(self, mode: bool = True) -> SamRefiner:
        """Set train/eval mode; the frozen image encoder always stays in eval."""
        super().train(mode)
        self.sam.vision_encoder.eval()
        return self

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(rh, rw): the size of an (H, W) image inside SAM's S x S frame (longest side S, rounded half up)."""
        height, width = original_size
        scale = self.image_size / max(height, width)
        return math.floor(height * scale + 0.5), math.floor(width * scale + 0.5)

    def preprocess(self, images: list[Tensor]) -> Tensor:
        """SAM input pixels for a batch of images, on this module's device.

        Args:
            images: B uint8 RGB tensors of shape (3, H_i, W_i), values 0-255, any sizes.

        Returns:
            (B, 3, S, S) normalized pixels in the image encoder's dtype: each image resized (bilinear, antialias,
            rounded back to 0-255 integers like segment-anything's uint8 resize) so its longest side is S,
            normalized with SAM's mean/std, zero-padded bottom/right.
        """
        dtype = self.sam.vision_encoder.patch_embed.projection.weight.dtype
        batch = []
        for index, image in enumerate(images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"SamRefiner.preprocess: image {index} must be a uint8 tensor (3, H, W), found "
                                 f"{image.dtype} {tuple(image.shape)}")
            resized_height, resized_width = self.resized_size((image.shape[1], image.shape[2]))
            pixels = image.to(self.pixel_mean.device, torch.float32)[None]  # (1, 3, H, W)
            pixels = F.interpolate(pixels, size=(resized_height, resized_width), mode="bilinear",
                                   align_corners=False, antialias=True).round_().clamp_(0.0, 255.0)
            pixels = (pixels - self.pixel_mean) / self.pixel_std  # (1, 3, rh, rw)
            pad = (0, self.image_size - resized_width, 0, self.image_size - resized_height)
            batch.append(F.pad(pixels, pad))  # (1, 3, S, S)
        if not batch:
            return torch.zeros((0, 3, self.image_size, self.image_size), device=self.pixel_mean.device, dtype=dtype)
        return torch.cat(batch).to(dtype)  # (B, 3, S, S)

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
        dtype = self.sam.vision_encoder.patch_embed.projection.weight.dtype
        return self.sam.vision_encoder(pixel_values=pixels.to(dtype)).last_hidden_state

    def mask_inputs(self, coarse_logits: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Dense prompt: coarse logits on the image part of the 4e x 4e mask input, `pad_logit` elsewhere.

        Args:
            coarse_logits: (K, h', w') coarse logits covering the whole original image (gradient kept).
            original_size: (H, W) of the original image.

        Returns:
            (K, 1, 4e, 4e) logits in SAM's prompt-encoder dtype.
        """
        resized_height, resized_width = self.resized_size(original_size)
        side = self.mask_input_size
        inside_height = min(side, max(1, math.floor(resized_height * side / self.image_size + 0.5)))
        inside_width = min(side, max(1, math.floor(resized_width * side / self.image_size + 0.5)))
        inside = F.interpolate(coarse_logits[:, None].float(), size=(inside_height, inside_width), mode="bilinear",
                               align_corners=False)  # (K, 1, mh, mw)
        padded = F.pad(inside, (0, side - inside_width, 0, side - inside_height), value=self.pad_logit)
        return padded.to(self.sam.prompt_encoder.mask_embed.conv1.weight.dtype)  # (K, 1, 4e, 4e)

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
        resized_height, resized_width = self.resized_size(original_size)
        foreground = coarse_logits.detach() > self.coarse_threshold  # (K, h', w')
        _, grid_height, grid_width = foreground.shape
        rows = foreground.any(dim=2)  # (K, h')
        cols = foreground.any(dim=1)  # (K, w')
        row_index = torch.arange(grid_height, device=foreground.device)
        col_index = torch.arange(grid_width, device=foreground.device)
        y_first = torch.where(rows, row_index, grid_height).amin(dim=1)
        y_last = torch.where(rows, row_index, -1).amax(dim=1)
        x_first = torch.where(cols, col_index, grid_width).amin(dim=1)
        x_last = torch.where(cols, col_index, -1).amax(dim=1)

        scale_y, scale_x = resized_height / grid_height, resized_width / grid_width
        x_min, y_min = x_first * scale_x, y_first * scale_y
        x_max = torch.maximum((x_last + 1) * scale_x - 1, x_min)
        y_max = torch.maximum((y_last + 1) * scale_y - 1, y_min)
        boxes = torch.stack([x_min, y_min, x_max, y_max], dim=1).float()  # (K, 4)
        whole_image = boxes.new_tensor([0.0, 0.0, resized_width - 1.0, resized_height - 1.0])
        empty = ~rows.any(dim=1)  # (K,)
        return torch.where(empty[:, None], whole_image, boxes)

    def postprocess_masks(self, low_res_logits: Tensor, original_size: tuple[int, int]) -> Tensor:
        """Map (K, 4e, 4e) low-res logits to (K, H, W) float32 logits: upsample to S x S, crop, resize."""
        resized_height, resized_width = self.resized_size(original_size)
        logits = F.interpolate(low_res_logits[:, None].float(), size=(self.image_size, self.image_size),
                               mode="bilinear", align_corners=False)  # (K, 1, S, S)
        logits = logits[..., :resized_height, :resized_width]  # (K, 1, rh, rw)
        logits = F.interpolate(logits, size=tuple(original_size), mode="bilinear", align_corners=False)
        return logits[:, 0]  # (K, H, W)

    def forward(
        self, *, image_embeddings: Tensor, coarse_logits: Tensor, text_prompts: list[Tensor],
        original_size: tuple[int, int],
    ) -> Tensor:
        """Refine the K objects of one image.

        Objects with the same number of text tokens are decoded together (the decoder has no attention mask, so
        sparse prompts are never padded); the image embedding is shared, computed once by `encode_images`.

        Args:
            image_embeddings: (C, e, e) this image's row of `encode_images` (no grad).
            coarse_logits: (K, h', w') coarse logits of the mask head, covering the whole image (gradient kept).
            text_prompts: K tensors (T_k, P) of text prompt tokens (from `TextPromptProjector`), T_k >= 0.
            original_size: (H, W) of the original image.

        Returns:
            (K, H, W) float32 refined mask logits (not probabilities) at the original size.
        """
        channels = self.sam.config.mask_decoder_config.hidden_size
        expected = (channels, self.embedding_size, self.embedding_size)
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
        height, width = original_size
        if num_objects == 0:
            return coarse_logits.new_zeros((0, height, width), dtype=torch.float32)

        dtype = self.sam.mask_decoder.iou_token.weight.dtype
        mask_inputs = self.mask_inputs(coarse_logits, original_size)  # (K, 1, 4e, 4e)
        boxes = self.boxes(coarse_logits, original_size)  # (K, 4)
        with torch.no_grad():
            image_pe = self.sam.get_image_wide_positional_embeddings()  # (1, C, e, e)

        groups: dict[int, list[int]] = {}
        for index, prompt in enumerate(text_prompts):
            groups.setdefault(prompt.shape[0], []).append(index)
        order, group_masks = [], []
        for indices in groups.values():
            index_tensor = torch.tensor(indices, device=coarse_logits.device)
            group_size = len(indices)
            box_tokens, dense = self.sam.prompt_encoder(
                input_points=None, input_labels=None, input_boxes=boxes[index_tensor][:, None],  # (G, 1, 4)
                input_masks=mask_inputs[index_tensor],
            )  # box_tokens (G, 1, 2, P), dense (G, P, e, e)
            text_tokens = torch.stack([text_prompts[i] for i in indices]).to(dtype)  # (G, T, P)
            sparse = torch.cat([box_tokens.to(dtype), text_tokens[:, None]], dim=2)  # (G, 1, 2 + T, P)
            masks, _ = self.sam.mask_decoder(
                image_embeddings=image_embeddings[None].to(dtype).expand(group_size, -1, -1, -1),  # (G, C, e, e)
                image_positional_embeddings=image_pe.to(dtype).expand(group_size, -1, -1, -1),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )  # (G, 1, 1, 4e, 4e)
            order.extend(indices)
            group_masks.append(masks[:, 0, 0])  # (G, 4e, 4e)
        low_res_logits = torch.cat(group_masks)  # (K, 4e, 4e), grouped order
        inverse = torch.argsort(torch.tensor(order, device=low_res_logits.device))
        return self.postprocess_masks(low_res_logits[inverse], original_size)  # (K, H, W)


class TextPromptProjector(nn.Module):
    """Softmax-weighted mix over LMM layers, then Linear(hidden_size -> prompt_dim).

    Args:
        num_layers: number of LMM decoder layers whose outputs are mixed (embedding output excluded).
        hidden_size: LMM hidden size D.
        prompt_dim: SAM prompt embedding size P (256 for the released SAM checkpoints).
    """

    def __init__(self, *, num_layers: int, hidden_size: int, prompt_dim: int) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1 or prompt_dim < 1:
            raise ValueError(f"TextPromptProjector: num_layers, hidden_size and prompt_dim must be >= 1, found "
                             f"{num_layers}, {hidden_size}, {prompt_dim}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.prompt_dim = prompt_dim
        # Pre-softmax logits of the layer weights; zeros give equal weights 1 / num_layers at init.
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.proj = nn.Linear(hidden_size, prompt_dim)

    @property
    def layer_weights(self) -> Tensor:
        """(num_layers,) softmax weights of the layers, summing to 1."""
        return self.layer_logits.softmax(dim=0)

    def forward(self, phrase_hidden: Tensor) -> Tensor:
        """Project one phrase's tokens to SAM sparse prompt tokens.

        Args:
            phrase_hidden: (num_layers, T, D) hidden states of the phrase's T tokens at every decoder layer's
                output (any float dtype; cast to the projection's dtype). Extra middle dims are allowed:
                (num_layers, *, D).

        Returns:
            (T, prompt_dim) prompt tokens (or (*, prompt_dim)) in the projection's dtype.
        """
        if phrase_hidden.dim() < 2 or phrase_hidden.shape[0] != self.num_layers \
                or phrase_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"TextPromptProjector: expected phrase_hidden of shape ({self.num_layers}, T, "
                             f"{self.hidden_size}), found {tuple(phrase_hidden.shape)}")
        hidden = phrase_hidden.to(self.proj.weight.dtype)
        weights = self.layer_weights.to(hidden.dtype)
        mixed = torch.einsum("l,l...d->...d", weights, hidden)  # (num_layers, T, D) -> (T, D)
        return self.proj(mixed)  # (T, prompt_dim)

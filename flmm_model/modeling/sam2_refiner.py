"""SAM2 refiner: the same job as `sam_refiner.SamRefiner` (coarse U-Net logits + text prompt tokens -> refined mask
logits at the original image size) with SAM2 / SAM2.1 (transformers' `Sam2Model`, or the image parts of a
`Sam2VideoModel`, so one checkpoint serves image refining and video propagation).

What differs from SAM, and so what this adapter owns:
- Input frame: SAM2 resizes every image to S x S whatever its aspect ratio (transformers' Sam2ImageProcessor, and the
  original `SAM2Transforms`), bilinear, with ImageNet mean / std on 0-1 values. So the resized image fills the whole
  frame (`stretch`): the mask input's image part is the whole 4e x 4e, the box is the coarse box scaled per axis, and
  nothing is padded.
- Encoder: the Hiera trunk + FPN neck give three levels (4e, 2e and e cells a side). The lowest-resolution level gets
  `no_memory_embedding` added (an image refined without video memory, as `Sam2Model` does); the two high-resolution
  levels go through the mask decoder's `conv_s0` / `conv_s1` projections, which transformers and SAM2 both compute
  once per image, with the image features. They are part of the frozen encoder here (frozen three ways with it), so
  the embeddings can be cached.
- One tensor per image: the three levels are packed into (4C, e, e) by `pixel_unshuffle` (level 0: C/8 channels at
  4e -> 2C at e; level 1: C/4 at 2e -> C at e; level 2: C at e), so the SAM-embedding cache and the batching that
  picks one embedding per object are the same as SAM's. `unpack` gives the levels back.
- Decoder: `multimask_output=False` with SAM2's dynamic multimask switch turned off: the single-mask token is the one
  the losses train, in training and in evaluation alike (the switch would pick an untrained token at eval time).
- Postprocessing: the low-res logits are resized straight to (H, W), as SAM2's `post_process_masks` does.

Prompts are F-LMM's, as for SAM: the coarse logits as the dense prompt, their box, and the phrase's text prompt
tokens appended after the box's sparse tokens, padded tokens masked out of the decoder attentions
(`sam_refiner.decoder_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Sam2Model, Sam2VideoModel, SamModel

from flmm_model.modeling.frames import ObjectFrames, resize_on_canvas
from flmm_model.modeling.sam_refiner import SamRefiner

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM2's input statistics, on 0-1 values, RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM2_PIXEL_MEAN = tuple(255 * value for value in IMAGENET_MEAN)  # the same on 0-255 values
SAM2_PIXEL_STD = tuple(255 * value for value in IMAGENET_STD)


class Sam2Refiner(SamRefiner):
    """Refine coarse mask logits with SAM2, prompted by the coarse mask (dense + box) and text tokens.

    The interface is `SamRefiner`'s (`preprocess`, `normalize`, `encode_images`, `refine`, `forward`, the frames);
    image embeddings are the packed (4C, e, e) tensors described in the module docstring.

    Args:
        sam: a transformers Sam2Model or Sam2VideoModel (real weights or a tiny random one). Trainable: the prompt
            encoder (but its Fourier matrix) and the mask decoder (but `conv_s0` / `conv_s1`); everything else is
            frozen here (the trunk, the neck, the projections three ways; a video model's memory parts unused).
        coarse_threshold: logit threshold on the coarse mask for the box prompt (0.0 = probability 0.5).
        pad_logit: kept for the interface; SAM2's frame has no padded part.
    """

    family = "sam2"
    stretch = True

    def __init__(self, *, sam: Sam2Model | Sam2VideoModel, coarse_threshold: float = 0.0,
                 pad_logit: float = -20.0) -> None:
        nn.Module.__init__(self)
        config = sam.config
        prompt_config = config.prompt_encoder_config
        self.image_size = prompt_config.image_size  # S
        self.embedding_size = prompt_config.image_size // prompt_config.patch_size  # e
        self.mask_input_size = 4 * self.embedding_size
        self.prompt_dim = prompt_config.hidden_size  # P
        sizes = [tuple(size) for size in config.vision_config.backbone_feature_sizes]
        expected = [(4 * self.embedding_size,) * 2, (2 * self.embedding_size,) * 2, (self.embedding_size,) * 2]
        if sizes != expected:
            raise ValueError(f"Sam2Refiner: the vision config's backbone_feature_sizes {sizes} must be {expected} "
                             f"(4e, 2e, e for prompt encoder image_size {self.image_size} / patch "
                             f"{prompt_config.patch_size})")
        self._hold(sam, coarse_threshold=coarse_threshold, pad_logit=pad_logit, pixel_mean=SAM2_PIXEL_MEAN,
                   pixel_std=SAM2_PIXEL_STD)
        decoder = sam.mask_decoder
        self._frozen = nn.ModuleDict(dict(vision_encoder=sam.vision_encoder, conv_s0=decoder.conv_s0,
                                          conv_s1=decoder.conv_s1))
        sam.requires_grad_(False)  # a Sam2VideoModel's memory parts too: they do not refine images
        sam.prompt_encoder.requires_grad_(True)
        decoder.requires_grad_(True)
        self._frozen.requires_grad_(False)
        sam.prompt_encoder.shared_embedding.requires_grad_(False)  # Fourier features' random matrix, never trained
        sam.vision_encoder.eval()
        decoder.dynamic_multimask_via_stability = False
        self.output_tokens = decoder.num_mask_tokens + 2  # object-score token, IoU token, mask tokens

    def train(self, mode: bool = True) -> Sam2Refiner:
        """Set train/eval mode; the frozen image encoder always stays in eval."""
        nn.Module.train(self, mode)
        self.sam.vision_encoder.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return self.sam.config.mask_decoder_config.hidden_size  # C

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(4C, e, e) of one packed image embedding."""
        return (4 * self.hidden_size, self.embedding_size, self.embedding_size)

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.sam.mask_decoder.conv_s0.weight.dtype

    @property
    def frozen_encoder(self) -> nn.Module:
        """The trunk, the neck and the two high-resolution projections (what the packed embeddings depend on)."""
        return self._frozen

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        """The Hiera trunk's blocks (what `GroundingModel.compile_parts` compiles)."""
        return list(self.sam.vision_encoder.backbone.blocks)

    def normalize(self, canvas: Tensor, resized: Tensor) -> Tensor:
        """SAM2 input pixels: (B, 3, S, S) uint8 canvas (every image resized to S x S) -> normalized, encoder dtype."""
        return ((canvas.float() - self.pixel_mean) / self.pixel_std).to(self.encoder_dtype)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Frozen SAM2 image features, batched across images.

        Args:
            pixels: (B, 3, S, S) output of `preprocess` / `normalize`.

        Returns:
            (B, 4C, e, e) packed embeddings (no grad): see `unpack`.
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"Sam2Refiner.encode_images: expected pixels (B, 3, {self.image_size}, "
                             f"{self.image_size}), found {tuple(pixels.shape)}")
        levels = self.sam.vision_encoder(pixel_values=pixels.to(self.encoder_dtype)).fpn_hidden_states
        decoder = self.sam.mask_decoder
        high0 = decoder.conv_s0(levels[0])  # (B, C/8, 4e, 4e)
        high1 = decoder.conv_s1(levels[1])  # (B, C/4, 2e, 2e)
        low = levels[2] + self.sam.no_memory_embedding.view(1, -1, 1, 1)  # (B, C, e, e)
        return torch.cat([F.pixel_unshuffle(high0, 4), F.pixel_unshuffle(high1, 2), low], dim=1)

    def unpack(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(K, 4C, e, e) packed -> (K, C/8, 4e, 4e), (K, C/4, 2e, 2e) high-resolution features, (K, C, e, e)."""
        channels = self.hidden_size
        high0, high1, low = embeddings.split([2 * channels, channels, channels], dim=1)
        return F.pixel_shuffle(high0, 4), F.pixel_shuffle(high1, 2), low

    def decode(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
        """SAM2's mask decoder on packed (K, 4C, e, e) embeddings -> (K, 4e, 4e) low-res logits of the single mask."""
        high0, high1, low = self.unpack(image_embeddings)
        masks, _, _, _ = self.sam.mask_decoder(image_embeddings=low, image_positional_embeddings=image_pe,
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=False, high_resolution_features=[high0, high1])
        return masks[:, 0, 0]

    def canvas_postprocess(self, low_res_logits: Tensor, frames: ObjectFrames, canvas: tuple[int, int]) -> Tensor:
        """(K, 4e, 4e) low-res logits -> (K, H_max, W_max) float32 logits, each resized straight to its image's (H, W)
        at the canvas's top left (SAM2's postprocessing; the rest is filler)."""
        return resize_on_canvas(low_res_logits[:, None].float(), frames.mask_input, frames.original, canvas)[:, 0]


def refiner_for(sam: SamModel | Sam2Model | Sam2VideoModel, *, coarse_threshold: float = 0.0) -> SamRefiner:
    """The refiner adapter of a built SAM's family: `Sam2Refiner` for SAM2 / SAM2.1 (Sam2Model, Sam2VideoModel),
    else `SamRefiner`."""
    if isinstance(sam, (Sam2Model, Sam2VideoModel)):
        return Sam2Refiner(sam=sam, coarse_threshold=coarse_threshold)
    return SamRefiner(sam=sam, coarse_threshold=coarse_threshold)

"""The inference API over a FrozenQwenSAM, as segment-anything's `SamPredictor` sits over `Sam`.

`GroundingPredictor(model)` takes PIL images and text, builds exactly the prompt training builds (the chat template
with one compact image placeholder, the phrases joined in the assistant turn), runs the model once and returns
masks at the image's original size. The model stays a pure batch -> logits / losses module; `FrozenQwenSAM.segment`
is a one-line convenience over this class.

An image whose aspect ratio the Qwen processor refuses (beyond 200:1) is letterboxed: padded at the bottom or right,
segmented, and its masks cropped back, so they are exact at the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from flmm_model.data.collate import collate
from flmm_model.data.images import image_tensor, letterbox, qwen_image_inputs, to_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.errors import InputError

if TYPE_CHECKING:  # annotations only: the model module builds predictors, this module never imports it at run time
    from flmm_model.model import FrozenQwenSAM


class GroundingPredictor:
    """Segment phrases in PIL images with a FrozenQwenSAM.

    Args:
        model: the model; its `tokenizer`, `image_processor`, `instruction`, `system` and `max_length` (what it was
            trained with) define the prompt.
    """

    def __init__(self, model: FrozenQwenSAM) -> None:
        if model.tokenizer is None or model.image_processor is None:
            raise ValueError("GroundingPredictor needs the model's tokenizer and image processor: build the model "
                             "with `build_model` / `FrozenQwenSAM.from_pretrained`, or pass tokenizer= and "
                             "image_processor= to FrozenQwenSAM")
        self.model = model

    def encode(self, image: Image.Image, phrases: Sequence[str]) -> dict[str, Any]:
        """The collated one-sample batch for `image` and `phrases` (the model's input; no gt_masks).

        The batch's image is `image` letterboxed when its aspect ratio needs it (see the module docstring); its meta
        holds the original `size` (H, W) to crop the masks to.

        Raises:
            InputError (a ValueError): no phrase, an empty or non-string phrase (named by its index), a special
                token in a phrase, or a text longer than the model's `max_length` tokens.
        """
        model = self.model
        input_ids, mask_ids = encode_grounded(model.tokenizer, expression_parts(list(phrases)),
                                              instruction=model.instruction, system=model.system,
                                              max_length=model.max_length)
        image = to_rgb(image)
        padded = letterbox(image)
        pixel_values, image_grid_thw = qwen_image_inputs(padded, model.image_processor)
        item = dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    image=image_tensor(padded), gt_masks=None, phrases=list(phrases),
                    meta={"size": (image.height, image.width)})
        return collate([item], pad_token_id=model.tokenizer.pad_token_id)

    @torch.no_grad()
    def segment(self, image: Image.Image, phrases: str | Sequence[str]) -> torch.Tensor:
        """Masks for one or more phrases: (K, H, W) bool at the image's original size, on the CPU.

        Raises:
            InputError (a ValueError): see `encode`.
        """
        phrase_list = [phrases] if isinstance(phrases, str) else list(phrases)
        if not phrase_list:
            raise InputError("segment(): expected at least one phrase, found none")
        batch = self.encode(image, phrase_list)
        height, width = batch["metas"][0]["size"]
        return self.model.predict_masks(batch)[0][:, :height, :width].cpu()  # (K, H, W): letterbox cropped off

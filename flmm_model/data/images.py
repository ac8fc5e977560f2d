"""Images: read a file as upright RGB, and turn an RGB image into the tensors the model consumes.

Every dataset and the model's `segment(image, phrases)` go through these functions, so the Qwen input and the SAM
input (the original RGB image) always come from the same pixels.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from flmm_model.data.errors import DataError

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Gray, CMYK and YCbCr convert directly; palette images go through RGBA so palette transparency is kept; images
    with alpha are composited on white (as Qwen's own image loading does); 16-bit gray is scaled to 8 bits.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        gray = np.asarray(image, dtype=np.float32) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(gray), 0, 255).astype(np.uint8))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str, *, expected_hw: tuple[int, int] | None = None, sample: str = "") -> Image.Image:
    """Read an image file as upright 8-bit RGB (EXIF orientation applied).

    Args:
        path: image file.
        expected_hw: (height, width) the annotations were made at, when known. If the upright image differs but the
            stored (un-rotated) pixels match, the annotation frame wins: the stored pixels are returned and a
            warning is logged, so image and masks stay aligned. Any other mismatch raises.
        sample: a description of the sample for error messages, e.g. "refcoco/val sample 3 (image_id 42)".

    Returns:
        An RGB PIL image, fully decoded.

    Raises:
        DataError: the file is missing, cannot be decoded, or does not have the annotated size.
    """
    where = f" ({sample})" if sample else ""
    if not os.path.isfile(path):
        raise DataError(f"missing image file {path}{where}")
    try:
        with Image.open(path) as stored:
            stored.load()
            orientation = stored.getexif().get(_EXIF_ORIENTATION, 1)
            upright = ImageOps.exif_transpose(stored)
            if orientation != 1 and expected_hw is not None and upright.size[::-1] != tuple(expected_hw) \
                    and stored.size[::-1] == tuple(expected_hw):
                logger.warning("%s: EXIF orientation %d ignored: the annotations use the stored %dx%d (H x W) "
                               "pixels%s", path, orientation, expected_hw[0], expected_hw[1], where)
                upright = stored.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image file {path}{where}: {error}") from error
    if expected_hw is not None and upright.size[::-1] != tuple(expected_hw):
        raise DataError(f"image file {path}{where} is {upright.height}x{upright.width} (H x W) but its annotation "
                        f"says {expected_hw[0]}x{expected_hw[1]}")
    return to_rgb(upright)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """The RGB image as a (3, H, W) uint8 tensor (the SAM-side input, at original resolution)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def qwen_image_inputs(image: Image.Image, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Qwen2-VL image processor on one RGB image.

    Args:
        image: RGB PIL image.
        image_processor: a `Qwen2VLImageProcessorPil` (its min/max pixels set the token budget).

    Returns:
        pixel_values: (t*H*W, 3*2*14*14 = 1176) float32 patches, normalised.
        image_grid_thw: (1, 3) long, (t, H, W) in 14-px patches; the LMM sees t*H*W / 4 image tokens.
    """
    processed = image_processor(images=to_rgb(image), return_tensors="pt")
    pixel_values = processed["pixel_values"].to(torch.float32)  # (t*H*W, 1176)
    image_grid_thw = processed["image_grid_thw"].to(torch.long).reshape(1, 3)  # (1, 3)
    return pixel_values, image_grid_thw

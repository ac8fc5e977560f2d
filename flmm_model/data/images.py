"""Images: read a file as RGB in the frame its masks use, and turn an RGB image into the tensors the model consumes.

Every dataset and the model's `segment(image, phrases)` go through these functions, so the Qwen input and the SAM
input (the original RGB image) always come from the same pixels.

EXIF orientation policy (`load_rgb`): with annotations (`expected_hw` given) the image stays in the stored pixel
frame whatever its EXIF orientation, because COCO-style annotations (RefCOCO/+/g, PNG / COCO panoptic) were made on
the stored pixel array -- the COCO toolkit and pycocotools never apply EXIF -- so rotating or mirroring the image
would silently misalign it with its masks. An ignored orientation is logged once per file. Without annotations
(`expected_hw` None: a user's photo for predict / segment) the orientation is applied, so the image is upright.

Limits, checked before anything expensive (`check_image_size`, reusable by any front end):
- pixels: an image over twice `PIL.Image.MAX_IMAGE_PIXELS` (about 179 megapixels by default) is refused as PIL
  refuses it (its decompression-bomb guard), with a message that gives its size and the limit in megapixels and
  what to do (`read_image_size` reads a file's header the same way, for front ends that check before loading);
- aspect ratio: Qwen2-VL's image processor (`smart_resize` in transformers) refuses a longest / shortest side ratio
  above 200. A dataset image beyond it is bad data (DataError: raise or skip); a user's image for prediction is
  letterboxed instead (`letterbox`: padded at the bottom or right up to 200:1, masks cropped back, so they stay
  exact at the original size).

Integer and float gray images (`to_rgb`): PIL's own conversion clips mode I (32-bit integers) to 0..255, so a
16-bit scan stored as I turns white, and truncates mode F (32-bit floats) to integers, so a float image in [0, 1]
turns black. They are scaled by the range their values lie in instead, one rule for the whole image:
- I;16 (and I;16B / I;16L / I;16N): 16-bit, v * 255 / 65535;
- I: values in [0, 255] are 8-bit already (kept); values in [0, 65535] are 16-bit (v * 255 / 65535); anything
  else (negative, or beyond 16 bits) is refused;
- F: values in [0, 1] are scaled by 255; values in [0, 255] are 8-bit already (rounded); anything else (negative,
  above 255, NaN or infinite) is refused.
A refused image raises DataError naming the image, its mode and its value range.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from flmm_model.data.errors import DataError

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_MOVING_ORIENTATIONS = frozenset(range(2, 9))  # 1 = as stored; 2-8 mirror and / or rotate; other values are invalid
_warned_orientation: set[str] = set()  # files whose ignored EXIF orientation was already logged (per process)
MAX_ASPECT_RATIO = 200  # transformers' qwen2_vl smart_resize: ValueError when max(h, w) / min(h, w) > 200
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")  # PIL's DecompressionBombError message


def max_image_pixels() -> int | None:
    """The largest image PIL decodes: twice `Image.MAX_IMAGE_PIXELS` (None when the user disabled the guard)."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


def check_image_size(width: int, height: int, *, where: str, aspect_ratio: bool = True) -> None:
    """Raise DataError (naming `where`) for an image size this project cannot use.

    Args:
        width, height: the image size in pixels.
        where: the image, for the message (a file name, "sample 3 (...)").
        aspect_ratio: also refuse a longest / shortest side ratio above `MAX_ASPECT_RATIO` (Qwen's processor
            limit); pass False when the image will be letterboxed.
    """
    if width < 1 or height < 1:
        raise DataError(f"{where}: the image is {width}x{height} (W x H); it has no pixels")
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        side = math.isqrt(limit)
        raise DataError(f"{where}: the image is {width}x{height} (W x H), {width * height / 1e6:.0f} megapixels, "
                        f"over the {limit / 1e6:.0f} megapixels PIL decodes (its decompression-bomb guard); "
                        f"downscale it (the model sees at most model.max_pixels anyway), e.g. to fit {side}x{side}")
    ratio = max(width, height) / min(width, height)
    if aspect_ratio and ratio > MAX_ASPECT_RATIO:
        raise DataError(f"{where}: the image is {width}x{height} (W x H), aspect ratio {ratio:.0f}:1, beyond the "
                        f"{MAX_ASPECT_RATIO}:1 the Qwen image processor accepts; crop or pad it (prediction pads "
                        f"such an image itself: flmm_model.data.images.letterbox)")


def letterbox(image: Image.Image, *, max_aspect_ratio: int = MAX_ASPECT_RATIO,
              fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """`image` padded at the bottom or on the right so that its aspect ratio is at most `max_aspect_ratio`.

    The original pixels keep their coordinates, so a mask predicted on the padded image, cropped to
    `[:height, :width]` of the original, is exactly the mask of the original. An image within the limit is returned
    unchanged (the same object).

    Args:
        image: RGB PIL image (W x H).
        max_aspect_ratio: largest longest / shortest side ratio allowed.
        fill: RGB colour of the padding.
    Returns:
        The RGB image, padded to (W, max(H, ceil(W / ratio))) or (max(W, ceil(H / ratio)), H).
    """
    width, height = image.size
    padded_width = max(width, math.ceil(height / max_aspect_ratio))
    padded_height = max(height, math.ceil(width / max_aspect_ratio))
    if (padded_width, padded_height) == (width, height):
        return image
    canvas = Image.new("RGB", (padded_width, padded_height), fill)
    canvas.paste(to_rgb(image), (0, 0))
    return canvas


def _gray_to_8bit(image: Image.Image, *, where: str) -> Image.Image:
    """An I;16*, I or F image as 8-bit gray ("L"), scaled by the range of its values (see the module docstring).

    Raises:
        DataError: values outside every range of the rule (negative, beyond 16 bits, above 255 for floats, NaN).
    """
    values = np.asarray(image)  # (H, W): uint16, int32 or float32
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        finite = bool(np.isfinite(values).all())
        low, high = (float(values.min()), float(values.max())) if values.size and finite else (0.0, 0.0)
        top = 255.0 if image.mode == "F" else 65535.0  # the largest value the rule can scale
        if not finite or low < 0 or high > top:
            found = "NaN or infinite values" if not finite else f"values in [{low:g}, {high:g}]"
            ranges = "[0, 1] or [0, 255]" if image.mode == "F" else "[0, 255] (8-bit) or [0, 65535] (16-bit)"
            raise DataError(f"{where}: a mode {image.mode} image with {found}; only {ranges} can be scaled to 8 "
                            f"bits without guessing. Convert it to an 8-bit RGB or gray image first")
        if image.mode == "F":
            scale = 255.0 if high <= 1.0 else 1.0  # [0, 1] floats, or floats on the 8-bit scale
        else:
            scale = 1.0 if high <= 255.0 else 255.0 / 65535.0  # 8-bit values, or 16-bit ones
    gray = np.round(values.astype(np.float64) * scale)  # (H, W) in [0, 255]
    return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))  # mode L


def to_rgb(image: Image.Image, *, where: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Gray, CMYK and YCbCr convert directly; palette images go through RGBA so palette transparency is kept; images
    with alpha are composited on white (as Qwen's own image loading does); 16-bit, 32-bit integer and float gray
    images are scaled to 8 bits by the range of their values (the rule in the module docstring).

    Args:
        image: a PIL image of any mode.
        where: the image, for error messages (a file name and sample).
    Raises:
        DataError: an I or F image whose values fit no range of the rule (e.g. negative, or NaN).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _gray_to_8bit(image, where=where)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def too_large_error(error: Image.DecompressionBombError, *, where: str) -> DataError:
    """The DataError for an image PIL refuses to open as a decompression bomb: its size and the limit in megapixels.

    PIL refuses such an image while reading its header, before it gives the size; its message holds the pixel count.
    """
    limit = max_image_pixels()
    found = _BOMB_PIXELS.search(str(error))
    size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "over the limit"
    limit_text = f"{limit / 1e6:.0f} megapixels" if limit is not None else "PIL's limit"
    fit = f", e.g. to fit {math.isqrt(limit)}x{math.isqrt(limit)}" if limit is not None else ""
    return DataError(f"{where} is too large to decode safely: {size}, over the {limit_text} PIL decodes ({error}) "
                     f"Downscale it (the model sees at most model.max_pixels anyway){fit}")


def read_image_size(path: str, *, sample: str = "") -> tuple[int, int]:
    """The (width, height) in an image file's header, without decoding the pixels.

    Raises:
        DataError: a missing or unreadable file, or one too large for PIL (`too_large_error`: its megapixels and the
            limit), naming `path` and `sample`.
    """
    where = f" ({sample})" if sample else ""
    if not os.path.isfile(path):
        raise DataError(f"missing image file {path}{where}")
    try:
        with Image.open(path) as stored:
            return stored.size
    except Image.DecompressionBombError as error:
        raise too_large_error(error, where=f"image file {path}{where}") from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image file {path}{where}: {error} (not an image, or a damaged one)") from error


def load_rgb(path: str, *, expected_hw: tuple[int, int] | None = None, sample: str = "") -> Image.Image:
    """Read an image file as 8-bit RGB, in the frame its annotations refer to.

    Args:
        path: image file.
        expected_hw: (height, width) of the image in its annotation file (COCO `height` / `width`), when known.
            Annotations refer to the stored pixel array (as COCO's are), so the stored pixels are returned
            unchanged whatever the EXIF orientation; a mirroring / rotating orientation (2-8) is ignored with a
            warning logged once per file. The stored size must equal `expected_hw`, else DataError. When None (no
            annotations, e.g. a user's photo), the EXIF orientation is applied and the image comes back upright.
        sample: a description of the sample for error messages, e.g. "refcoco/val sample 3 (image_id 42)".

    Returns:
        An RGB PIL image, fully decoded: stored frame if `expected_hw` is given, upright otherwise.

    Raises:
        DataError: the file is missing, cannot be decoded, is too large (`check_image_size`; checked on the
            header, before decoding), or its stored size is not `expected_hw`. With `expected_hw`, an aspect ratio
            beyond the Qwen processor's limit is refused too (a user's photo is letterboxed by the predictor).
    """
    where = f" ({sample})" if sample else ""
    if not os.path.isfile(path):
        raise DataError(f"missing image file {path}{where}")
    try:
        with Image.open(path) as stored:
            check_image_size(*stored.size, where=f"image file {path}{where}", aspect_ratio=expected_hw is not None)
            stored.load()
            orientation = stored.getexif().get(_EXIF_ORIENTATION, 1)
            image = stored.copy() if expected_hw is not None else ImageOps.exif_transpose(stored)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise too_large_error(error, where=f"image file {path}{where}") from error
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image file {path}{where}: {error} (not an image, or a damaged one)") from error
    if expected_hw is None:
        return to_rgb(image, where=f"image file {path}{where}")

    expected = (int(expected_hw[0]), int(expected_hw[1]))
    moves = orientation in _MOVING_ORIENTATIONS
    if image.size[::-1] != expected:
        hint = ""
        if moves and orientation >= 5 and image.size == expected:
            hint = (f"; its EXIF orientation {orientation} would transpose it to the annotated size, but annotations "
                    f"must refer to the stored pixels (as COCO's do), so the masks would not be aligned")
        raise DataError(f"image file {path}{where} is {image.height}x{image.width} (H x W) but its annotation "
                        f"says {expected[0]}x{expected[1]}{hint}")
    if moves:
        for field in ("exif", "XML:com.adobe.xmp", "xmp"):  # so nothing downstream rotates the stored frame again
            image.info.pop(field, None)
        key = os.path.abspath(path)
        if key not in _warned_orientation:
            _warned_orientation.add(key)
            logger.warning("%s: EXIF orientation %d ignored to keep image and masks aligned: the annotations refer "
                           "to the stored %dx%d (H x W) pixels%s", path, orientation, expected[0], expected[1], where)
    return to_rgb(image, where=f"image file {path}{where}")


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

"""`predict(...)`: masks for phrases on one image: one PNG per phrase plus an overlay with contours and labels.

Every cheap check runs before the frozen weights load: the phrases, the device, the image (read, size limits), the
checkpoint's config and trainable weights (read into memory), the phrases encoded with the checkpoint's prompt
(control tokens, `model.max_length`), and the output directory (created, checked writable).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from flmm_model.build import check_model_paths, prompt_settings
from flmm_model.checkpoint import load_checkpoint, prepare_output_dir
from flmm_model.config import ModelConfig
from flmm_model.data.images import load_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.distributed import check_device, resolve_device
from flmm_model.errors import InputError, MissingFileError
from flmm_model.model import FrozenQwenSAM

# Distinct, colour-blind-friendly colours (Okabe-Ito), cycled for more phrases.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255)]


def slugify(text: str, *, max_len: int = 40) -> str:
    """A file-name-safe version of a phrase: lower case, words joined by '_'."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len] or "phrase"


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by the 4-neighbourhood."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def contour(mask: np.ndarray, *, width: int = 2) -> np.ndarray:
    """(H, W) bool: the pixels of `mask` within `width` pixels of its outside, i.e. its outline."""
    outside = ~mask
    for _ in range(width):
        outside = _shift_or(outside)
    return mask & outside


def draw_overlay(image: Image.Image, masks: np.ndarray, phrases: list[str], *, alpha: float = 0.45) -> Image.Image:
    """The image with each mask tinted in its colour, outlined, and labelled with its phrase.

    Args:
        image: RGB PIL image (H, W).
        masks: (K, H, W) bool.
        phrases: K labels.
        alpha: tint opacity in [0, 1].
    """
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()  # (H, W, 3)
    height, width = masks.shape[1:]
    line = max(1, round(min(height, width) / 250))
    for k, mask in enumerate(masks):
        colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        canvas[contour(mask, width=line)] = colour
    overlay = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(12, round(min(height, width) / 30)))
    for k, (mask, phrase) in enumerate(zip(masks, phrases, strict=True)):
        colour = PALETTE[k % len(PALETTE)]
        ys, xs = np.nonzero(mask)
        label = f"{k}: {phrase}" if len(ys) else f"{k}: {phrase} (no mask)"
        x, y = (int(xs.min()), int(ys.min())) if len(ys) else (4, 4 + k * (font.size + 6))
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        shift_x = min(0, width - 1 - right)  # keep the label inside the image
        box = (left + shift_x - 2, top - 2, right + shift_x + 2, bottom + 2)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x + shift_x, y), label, fill=colour, font=font)
    return overlay


def load_image(path: str | Path) -> Image.Image:
    """An upright RGB PIL image, read exactly as the datasets read theirs (`flmm_model.data.load_rgb`: EXIF
    orientation applied, transparency composited on white), so a prediction sees the pixels training saw."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise InputError(f"image {str(path)!r}: is a directory, not an image file")
        raise MissingFileError(f"image {str(path)!r}: no such file")
    return load_rgb(str(path))


def predict(model_cfg: ModelConfig, *, checkpoint: str, image: str, phrases: list[str], out_dir: str,
            device: str = "auto", model: Any = None) -> dict[str, Any]:
    """Segment `phrases` in `image` with the checkpoint's model and write the results into `out_dir`.

    Args:
        model_cfg: where the frozen parts come from (`model.qwen`, `model.sam`; the user's paths or presets) and the
            longest text (`model.max_length`); everything else comes from the checkpoint.
        checkpoint: checkpoint dir, or a run dir (its newest checkpoint).
        image: image file path.
        phrases: one or more referring phrases.
        out_dir: output directory (created): `mask_<k>_<phrase>.png` (0 / 255) per phrase and `overlay.png`.
        device: auto | cpu | cuda | cuda:N.
        model: an already loaded FrozenQwenSAM (skips loading `checkpoint`).
    Returns:
        dict with `masks` (file paths), `overlay` (file path) and `areas` (foreground pixels per phrase).
    """
    if not phrases:
        raise InputError("predict: give at least one phrase (--text)")
    try:
        parts = expression_parts(list(phrases))
    except InputError as error:
        raise InputError(f"--text: {error}") from error
    check_device(device, key="--device")
    picture = load_image(image)
    if model is None:
        check_model_paths(model_cfg)
        loaded = load_checkpoint(checkpoint)  # config + trainable weights, in memory
        run_cfg = loaded.model_config(qwen=model_cfg.qwen, sam=model_cfg.sam, tokenizer=model_cfg.tokenizer,
                                      max_length=model_cfg.max_length)
        prompt = prompt_settings(run_cfg)
        instruction, system, max_length, tokenizer = (prompt.instruction, prompt.system, prompt.max_length,
                                                      prompt.tokenizer)
    else:
        instruction, system, max_length, tokenizer = model.instruction, model.system, model.max_length, model.tokenizer
    try:  # the very encoding segment() will do: a control token or a too long text fails here
        encode_grounded(tokenizer, parts, instruction=instruction, system=system, max_length=max_length)
    except InputError as error:
        raise InputError(f"--text {list(phrases)}: {error}") from error
    out = prepare_output_dir(out_dir, what="--out")
    if model is None:
        model = FrozenQwenSAM.from_pretrained(loaded, qwen_path=run_cfg.qwen, sam_path=run_cfg.sam,
                                              tokenizer_path=run_cfg.tokenizer, max_length=run_cfg.max_length,
                                              device=str(resolve_device(device))).eval()
    with torch.no_grad():
        masks = model.segment(picture, list(phrases)).cpu().numpy().astype(bool)  # (K, H, W)
    mask_paths = []
    for k, (mask, phrase) in enumerate(zip(masks, phrases, strict=True)):
        path = out / f"mask_{k:02d}_{slugify(phrase)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        mask_paths.append(str(path))
    overlay_path = out / "overlay.png"
    draw_overlay(picture, masks, list(phrases)).save(overlay_path)
    areas = [int(mask.sum()) for mask in masks]
    for phrase, path, area in zip(phrases, mask_paths, areas, strict=True):
        print(f"{phrase!r}: {area} px -> {path}")
    print(f"overlay -> {overlay_path}")
    return {"masks": mask_paths, "overlay": str(overlay_path), "areas": areas}

"""`predict(...)`: masks for phrases on one image: one PNG per phrase plus an overlay with contours and labels
(drawn by `flmm_model.overlay`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flmm_model.config import ModelConfig, check_model_paths
from flmm_model.data import load_rgb
from flmm_model.distributed import resolve_device
from flmm_model.overlay import draw_overlay


def slugify(text: str, *, max_len: int = 40) -> str:
    """A file-name-safe version of a phrase: lower case, words joined by '_'."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len] or "phrase"


def load_image(path: str | Path) -> Image.Image:
    """An upright RGB PIL image, read exactly as the datasets read theirs (`flmm_model.data.load_rgb`: EXIF
    orientation applied, transparency composited on white), so a prediction sees the pixels training saw."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r}: no such file")
    return load_rgb(str(path))


def predict(model_cfg: ModelConfig, *, checkpoint: str, image: str, phrases: list[str], out_dir: str,
            device: str = "auto", model: Any = None) -> dict[str, Any]:
    """Segment `phrases` in `image` with the checkpoint's model and write the results into `out_dir`.

    Args:
        model_cfg: where the frozen parts come from (`model.qwen`, `model.sam`; the user's paths or presets).
        checkpoint: checkpoint dir, or a run dir (its newest checkpoint).
        image: image file path.
        phrases: one or more referring phrases.
        out_dir: output directory (created): `mask_<k>_<phrase>.png` (0 / 255) per phrase and `overlay.png`.
        device: auto | cpu | cuda | cuda:N.
        model: an already loaded FrozenQwenSAM (skips loading `checkpoint`).
    Returns:
        dict with `masks` (file paths), `overlay` (file path) and `areas` (foreground pixels per phrase).
    """
    from flmm_model.evaluate import load_model_for_inference

    if not phrases:
        raise ValueError("predict: give at least one phrase (--text)")
    check_model_paths(model_cfg)
    picture = load_image(image)  # fails before any weights load
    if model is None:
        model = load_model_for_inference(model_cfg, checkpoint, resolve_device(device))
    with torch.no_grad():
        masks = model.segment(picture, list(phrases)).cpu().numpy().astype(bool)  # (K, H, W)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask_paths = []
    for k, (mask, phrase) in enumerate(zip(masks, phrases, strict=True)):
        path = out / f"mask_{k:02d}_{slugify(phrase)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        mask_paths.append(str(path))
    overlay_path = out / "overlay.png"
    draw_overlay(picture, masks, [f"{k}: {phrase}" for k, phrase in enumerate(phrases)]).save(overlay_path)
    areas = [int(mask.sum()) for mask in masks]
    for phrase, path, area in zip(phrases, mask_paths, areas, strict=True):
        print(f"{phrase!r}: {area} px -> {path}")
    print(f"overlay -> {overlay_path}")
    return {"masks": mask_paths, "overlay": str(overlay_path), "areas": areas}

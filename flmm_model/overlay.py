"""Drawing masks for people: one colour per phrase, tinted and outlined, with labels that never overlap.

Used by `run.py predict` (overlay.png) and the web demo. Labels sit next to their object (above it, below it, or
inside its top-left corner, whichever spot is free); a label that finds no free spot near its object takes the
nearest free spot anywhere in the image, and only when the image is full does it go into a legend strip added below
the image. Placed labels are checked against each other, so no two ever overlap, whatever the masks look like.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, colour-blind-friendly colours (Okabe-Ito) for the first phrases; golden-ratio hues after them.
PALETTE: tuple[tuple[int, int, int], ...] = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
                                             (0, 114, 178), (213, 94, 0), (204, 121, 167), (255, 255, 255))

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 / y1 exclusive


def colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of phrase `index` (>= 0): the palette, then hues spaced by the golden ratio (never repeats
    within any realistic number of phrases)."""
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (0.11 + (index - len(PALETTE)) * 0.618034) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.7, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def hex_colour(index: int) -> str:
    """`colour(index)` as '#rrggbb' (for HTML legends)."""
    return "#{:02x}{:02x}{:02x}".format(*colour(index))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background` (by relative luminance)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


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


def mask_box(mask: np.ndarray) -> Box | None:
    """The bounding box (x0, y0, x1, y1), exclusive ends, of an (H, W) bool mask; None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _free(xs: np.ndarray, ys: np.ndarray, size: tuple[int, int], placed: list[Box], gap: int) -> np.ndarray:
    """Which of the candidate top-left corners (xs[i], ys[i]) give a box of `size` that keeps `gap` pixels away from
    every placed box: (N,) bool."""
    free = np.ones(xs.shape, dtype=bool)
    w, h = size
    for x0, y0, x1, y1 in placed:
        free &= (xs + w + gap <= x0) | (x1 + gap <= xs) | (ys + h + gap <= y0) | (y1 + gap <= ys)
    return free


def layout_labels(sizes: Sequence[tuple[int, int]], anchors: Sequence[Box | None], *, width: int, height: int,
                  gap: int = 1) -> list[tuple[int, int] | None]:
    """Top-left corners for label boxes so that no two overlap and all lie inside the (width x height) image.

    Labels are placed in order. Label k first tries spots next to `anchors[k]` (its object's box): above it, below
    it, inside its top-left corner, then the same on the right edge; when all are taken, the free spot nearest to
    the first one on a grid over the whole image; when none is free, None (the caller puts it elsewhere, e.g. in a
    legend strip).

    Args:
        sizes: K label box sizes (w, h) in pixels.
        anchors: K object boxes (x0, y0, x1, y1), or None for a label without an object (placed from the top left).
        width, height: the image size.
        gap: pixels kept free between two labels.

    Returns:
        K corners (x, y), or None for a label that fits nowhere (wider or taller than the image, or no room left).
    """
    placed: list[Box] = []
    corners: list[tuple[int, int] | None] = []
    for (w, h), anchor in zip(sizes, anchors, strict=True):
        if w > width or h > height:
            corners.append(None)
            continue
        if anchor is None:
            wanted = [(0, 0)]
        else:
            x0, y0, x1, y1 = anchor
            wanted = [(x0, y0 - h), (x0, y1), (x0, y0), (x1 - w, y0 - h), (x1 - w, y1), (x1 - w, y0)]
        xs = np.clip(np.array([x for x, _ in wanted]), 0, width - w)  # (C,) candidate corners, C <= 6
        ys = np.clip(np.array([y for _, y in wanted]), 0, height - h)  # (C,)
        free = _free(xs, ys, (w, h), placed, gap)
        if free.any():
            first = int(np.argmax(free))
            corner = int(xs[first]), int(ys[first])
        else:
            step = max(2, h // 2)
            grid_x = np.unique(np.append(np.arange(0, width - w + 1, step), width - w))
            grid_y = np.unique(np.append(np.arange(0, height - h + 1, step), height - h))
            gx, gy = np.meshgrid(grid_x, grid_y)  # (Ny, Nx) each
            gx, gy = gx.ravel(), gy.ravel()  # (Ny*Nx,)
            free = _free(gx, gy, (w, h), placed, gap)
            if not free.any():
                corners.append(None)
                continue
            distance = (gx - xs[0]) ** 2 + (gy - ys[0]) ** 2
            best = int(np.argmin(np.where(free, distance, np.iinfo(np.int64).max)))
            corner = int(gx[best]), int(gy[best])
        placed.append((corner[0], corner[1], corner[0] + w, corner[1] + h))
        corners.append(corner)
    return corners


def label_font(width: int, height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at a size that scales with the image (at least 12 px)."""
    return ImageFont.load_default(size=max(12, round(min(width, height) / 30)))


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """`text`, shortened with '...' at the end until it is at most `max_width` pixels wide (never empty)."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    for cut in range(len(text) - 1, 0, -1):
        shorter = text[:cut].rstrip() + "..."
        if draw.textlength(shorter, font=font) <= max_width:
            return shorter
    return text[:1]


def draw_overlay(image: Image.Image, masks: np.ndarray, labels: Sequence[str], *, alpha: float = 0.45,
                 pad: int = 2) -> Image.Image:
    """The image with mask k tinted and outlined in `colour(k)` and labelled `labels[k]`; labels never overlap.

    A label is a box filled with its colour holding its text (black or white, whichever reads better), placed by
    `layout_labels` next to its mask. Labels of empty masks get " (no mask)". Whitespace (line breaks too) is drawn
    as single spaces. A label wider than the image is shortened with "...". Labels with no free spot in the image go
    into a legend strip below it, one per row; only then is the result taller than the image.

    Args:
        image: RGB PIL image (W x H).
        masks: (K, H, W) bool.
        labels: K texts, e.g. the phrases.
        alpha: tint opacity in [0, 1].
        pad: pixels between a label's text and its box edge.

    Returns:
        RGB PIL image, W x H (or W x (H + legend strip) when some labels did not fit in the image).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != (image.height, image.width):
        raise ValueError(f"draw_overlay: masks must be (K, {image.height}, {image.width}) for a "
                         f"{image.width}x{image.height} image, found {masks.shape}")
    if len(labels) != len(masks):
        raise ValueError(f"draw_overlay: {len(masks)} masks but {len(labels)} labels")
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()  # (H, W, 3)
    height, width = masks.shape[1:]
    line = max(1, round(min(height, width) / 250))
    for k, mask in enumerate(masks):
        tint = np.array(colour(k), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * tint
        canvas[contour(mask, width=line)] = tint
    overlay = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(overlay)
    font = label_font(width, height)
    anchors = [mask_box(mask) for mask in masks]
    one_line = [" ".join(str(text).split()) for text in labels]  # an answer's phrase may span a line break
    texts = [fit_text(draw, text if anchor is not None else f"{text} (no mask)", font, max(1, width - 2 * pad))
             for text, anchor in zip(one_line, anchors, strict=True)]
    text_boxes = [draw.textbbox((0, 0), text, font=font) for text in texts]  # (left, top, right, bottom) each
    sizes = [(right - left + 2 * pad, bottom - top + 2 * pad) for left, top, right, bottom in text_boxes]
    corners = layout_labels(sizes, anchors, width=width, height=height)

    leftovers = [k for k, corner in enumerate(corners) if corner is None]
    if leftovers:  # a legend strip below the image, one row per label that found no room inside it
        row = max(sizes[k][1] for k in leftovers) + 1
        grown = Image.new("RGB", (width, height + row * len(leftovers) + 1), (0, 0, 0))
        grown.paste(overlay, (0, 0))
        overlay, draw = grown, ImageDraw.Draw(grown)
        for rank, k in enumerate(leftovers):
            corners[k] = (0, height + 1 + rank * row)
    for k, (x, y) in enumerate(corners):
        (left, top, _, _), (w, h) = text_boxes[k], sizes[k]
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour(k))
        draw.text((x + pad - left, y + pad - top), texts[k], fill=text_colour(colour(k)), font=font)
    return overlay

"""A synthetic referring-segmentation set for the demo and smoke tests: coloured shapes on textured backgrounds.

Each image holds 1..max_objects non-overlapping circles / squares / triangles in six colours on a noisy, striped,
low-saturation background. Expressions name colour and shape ("the red circle"); two shapes of the same colour and
shape are named either together ("the two green triangles", mask = their union) or apart by position ("the blue
square on the left" / "... at the top"); three are always named together. Masks are exact: the pixels painted for
an object are its mask. Objects cover a modest part of the image (each about 1-5%), so all-foreground or empty
predictions score low. Everything is generated on the fly, deterministic in (seed, index); nothing is stored.
Shapes and backgrounds are rasterised in numpy (`shape_mask`, `upsample_bilinear`): the pixels depend on no
imaging library's version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from flmm_model.data.item import make_item
from flmm_model.data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, expression_parts

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
_COUNT_WORDS = {2: "two", 3: "three"}
_MAX_SAME = 3  # at most three objects share a colour and shape
# How two same-kind shapes are told apart: side by side (horizontal) or one above the other (vertical).
_POSITION_WORDS = {"horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom")}


@dataclass
class Scene:
    """One generated image and its K referring expressions.

    Attributes:
        image: RGB PIL image (W x H).
        gt_masks: (K, H, W) bool, one mask per phrase (a plural phrase's mask is the union of its shapes).
        phrases: K referring expressions.
        plural: K flags, True for phrases naming several shapes.
    """

    image: Image.Image
    gt_masks: np.ndarray
    phrases: list[str]
    plural: list[bool]


def make_scene(
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int] = (128, 320),
    max_objects: int = 4,
    object_size: tuple[float, float] = (0.12, 0.25),
) -> Scene:
    """Draw one scene from `rng`.

    Args:
        rng: numpy generator (the only source of randomness).
        image_size: (min, max) side length in pixels; height and width are drawn independently.
        max_objects: at most this many shapes (at least one; fewer when they do not fit).
        object_size: (min, max) shape size as a fraction of the shorter image side.
    """
    height, width = (int(side) for side in rng.integers(image_size[0], image_size[1] + 1, size=2))
    canvas = _background(rng, height, width)  # (H, W, 3) float

    # Shapes: (colour, shape) drawn at random, sometimes repeating an earlier pair so that duplicates occur.
    kinds: list[tuple[str, str]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if kinds and rng.random() < 0.35:
            kind = kinds[int(rng.integers(len(kinds)))]
        else:
            kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if kinds.count(kind) < _MAX_SAME:
            kinds.append(kind)

    boxes: list[tuple[int, int, int, int]] = []  # (x0, y0, x1, y1) inclusive
    objects: list[tuple[tuple[str, str], np.ndarray, tuple[float, float]]] = []  # (kind, mask, centre)
    for kind in kinds:
        box = _place(rng, height, width, object_size, boxes)
        if box is None:
            continue
        boxes.append(box)
        mask = _shape_mask(kind[1], box, height, width)  # (H, W)
        colour = np.array(COLOURS[kind[0]], dtype=np.float64) + rng.normal(0.0, 6.0, size=3)
        canvas[mask] = colour + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
        objects.append((kind, mask, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)))

    phrases, masks, plural = _expressions(rng, objects)
    image = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    return Scene(image=image, gt_masks=np.stack(masks), phrases=phrases, plural=plural)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A muted colour with smooth blotches, faint stripes and pixel noise: (H, W, 3) float in about [0, 255]."""
    base = rng.uniform(90, 170) + rng.uniform(-15, 15, size=3)  # low saturation
    cells = rng.normal(0.0, 25.0, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    blotches = upsample_bilinear(cells, height, width)  # (H, W, 3)
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 24)
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]  # (H, 1), (1, W)
    stripes = 12.0 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)  # (H, W)
    canvas = base + blotches  # (H, W, 3) float64; the sums in place, in the same order (the same values, faster)
    canvas += stripes[..., None]
    canvas += rng.normal(0.0, 10.0, size=(height, width, 3))  # pixel noise
    return canvas


def _place(
    rng: np.random.Generator, height: int, width: int, object_size: tuple[float, float],
    boxes: list[tuple[int, int, int, int]], tries: int = 50,
) -> tuple[int, int, int, int] | None:
    """A square box for a new shape, 3 px clear of the others, or None when none fits in `tries` draws."""
    for _ in range(tries):
        side = max(6, int(rng.uniform(*object_size) * min(height, width)))
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if all(box[0] > other[2] + 3 or other[0] > box[2] + 3 or box[1] > other[3] + 3 or other[1] > box[3] + 3
               for other in boxes):
            return box
    return None


def _shape_mask(shape: str, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of a shape filling `box` (see `shape_mask`), placed in an H x W image."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = shape_mask(shape, x1 - x0 + 1, y1 - y0 + 1)
    return mask


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """The (height, width) bool mask of a shape that fills a box of that size, rasterised by pixel centres.

    Pixel (x, y) has its centre at (x, y); the box spans x in [0, width - 1], y in [0, height - 1]. A pixel is in
    the shape when its centre is, edges included:
    - square: every pixel of the box;
    - circle: the ellipse with centre ((width - 1) / 2, (height - 1) / 2) and semi-axes width / 2, height / 2;
    - triangle: apex at the top centre, base along the bottom row: row y spans |x - (width - 1) / 2| <=
      (width - 1) / 2 * y / (height - 1).
    Pure numpy, so the pixels do not depend on any imaging library's rasteriser or version.
    """
    ys = np.arange(height, dtype=np.float64)[:, None]  # (h, 1)
    xs = np.arange(width, dtype=np.float64)[None, :]  # (1, w)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return ((xs - cx) / (width / 2)) ** 2 + ((ys - cy) / (height / 2)) ** 2 <= 1.0  # (h, w)
    if shape == "triangle":
        return np.abs(xs - cx) <= cx * ys / max(height - 1, 1)  # (h, w)
    raise ValueError(f"shape: expected one of {SHAPES}, found {shape!r}")


def upsample_bilinear(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (h, w, C) `cells` to (height, width, C), sampling at pixel centres (half-pixel offsets,
    edges clamped): output pixel i reads the input at (i + 0.5) * h / height - 0.5. Pure numpy."""

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)  # (out,)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, position - low

    rows_low, rows_high, row_weight = axis(cells.shape[0], height)  # (H,)
    cols_low, cols_high, col_weight = axis(cells.shape[1], width)  # (W,)
    col_weight = col_weight[None, :, None]  # (1, W, 1)
    top = cells[rows_low][:, cols_low] * (1 - col_weight) + cells[rows_low][:, cols_high] * col_weight  # (H, W, C)
    bottom = cells[rows_high][:, cols_low] * (1 - col_weight) + cells[rows_high][:, cols_high] * col_weight
    return top * (1 - row_weight[:, None, None]) + bottom * row_weight[:, None, None]  # (H, W, C)


def _expressions(
    rng: np.random.Generator, objects: list[tuple[tuple[str, str], np.ndarray, tuple[float, float]]]
) -> tuple[list[str], list[np.ndarray], list[bool]]:
    """Referring expressions for the shapes, grouped by (colour, shape) in order of first appearance."""
    groups: dict[tuple[str, str], list[tuple[np.ndarray, tuple[float, float]]]] = {}
    for kind, mask, centre in objects:
        groups.setdefault(kind, []).append((mask, centre))
    phrases, masks, plural = [], [], []
    for (colour, shape), members in groups.items():
        if len(members) == 1:
            phrases.append(f"the {colour} {shape}")
            masks.append(members[0][0])
            plural.append(False)
        elif len(members) == 2 and rng.random() < 0.5:
            (_, (ax, ay)), (_, (bx, by)) = members
            horizontal = abs(ax - bx) >= abs(ay - by)
            ordered = sorted(members, key=lambda member: member[1][0] if horizontal else member[1][1])
            words = _POSITION_WORDS["horizontal" if horizontal else "vertical"]
            for (mask, _), word in zip(ordered, words, strict=True):
                phrases.append(f"the {colour} {shape} {word}")
                masks.append(mask)
                plural.append(False)
        else:
            phrases.append(f"the {_COUNT_WORDS[len(members)]} {colour} {shape}s")
            masks.append(np.logical_or.reduce([mask for mask, _ in members]))
            plural.append(True)
    return phrases, masks, plural


def all_phrases() -> list[str]:
    """Every referring expression `make_scene` can produce (the vocabulary a captioning model of the scenes needs)."""
    phrases = []
    for colour in COLOURS:
        for shape in SHAPES:
            phrases.append(f"the {colour} {shape}")
            phrases += [f"the {colour} {shape} {word}" for pair in _POSITION_WORDS.values() for word in pair]
            phrases += [f"the {count} {colour} {shape}s" for count in _COUNT_WORDS.values()]
    return phrases


class SyntheticDataset(torch.utils.data.Dataset):
    """Synthetic items (see `flmm_model.data.item`), generated on the fly and deterministic in (seed, index).

    Args:
        tokenizer: Qwen tokenizer.
        image_processor: Qwen2-VL image processor.
        length: number of samples.
        seed: dataset seed; sample i is drawn from `np.random.default_rng([seed, i])`.
        image_size: (min, max) image side in pixels.
        max_objects: at most this many shapes per image.
        object_size: (min, max) shape size as a fraction of the shorter image side.
        instruction: user instruction after the image.
        system: system prompt.
        max_length: longest allowed compact sequence (the expressions are short; None = no limit).

    Meta keys: `dataset` ("synthetic"), `image_id` (the index), `file_name` (a made-up name), `seed`, and per
    object `plural`, `isthing` (all True).
    """

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        length: int,
        seed: int = 0,
        image_size: tuple[int, int] = (128, 320),
        max_objects: int = 4,
        object_size: tuple[float, float] = (0.12, 0.25),
        instruction: str = DEFAULT_INSTRUCTION,
        system: str = DEFAULT_SYSTEM,
        max_length: int | None = None,
    ) -> None:
        if length < 0:
            raise ValueError(f"length: expected >= 0, found {length}")
        if not 16 <= image_size[0] <= image_size[1]:
            raise ValueError(f"image_size: expected 16 <= min <= max, found {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects: expected >= 1, found {max_objects}")
        if not 0 < object_size[0] <= object_size[1] < 1:
            raise ValueError(f"object_size: expected 0 < min <= max < 1, found {object_size}")
        self.length, self.seed = length, seed
        self.image_size, self.max_objects, self.object_size = image_size, max_objects, object_size
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.instruction, self.system, self.max_length = instruction, system, max_length

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Samples do not change across epochs; present so training code can call it on every dataset."""

    def scene(self, index: int) -> Scene:
        """The raw scene of sample `index` (image, masks, phrases), without tokenization."""
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic sample {index} out of range [0, {self.length})")
        return make_scene(np.random.default_rng([self.seed, index]), image_size=self.image_size,
                          max_objects=self.max_objects, object_size=self.object_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        meta = dict(dataset="synthetic", image_id=index, file_name=f"synthetic-{self.seed}-{index:06d}.png",
                    seed=self.seed, plural=scene.plural, isthing=[True] * len(scene.phrases))
        return make_item(image=scene.image, gt_masks=scene.gt_masks, parts=expression_parts(scene.phrases),
                         meta=meta, tokenizer=self.tokenizer, image_processor=self.image_processor,
                         instruction=self.instruction, system=self.system, max_length=self.max_length,
                         sample=f"synthetic sample {index} (seed {self.seed})")

"""Synthetic referring video clips: the demo's coloured shapes (`data.synthetic`) moving over a still background, for
tests and a CPU demo of video grounding (masks that must follow the named shape from frame to frame).

Each clip holds 1..max_objects shapes moving in straight lines, bouncing off the image border. Every shape has its
own (colour, shape) kind, named "the red circle", except that a kind may appear twice, moving in opposite
directions, and then each is named by its motion: "the blue square moving left" / "... moving right" (or "up" /
"down"), which no single frame can tell apart. A shape painted later covers an earlier one where they cross; masks
are the visible pixels of each shape in each frame (a hidden shape has an empty mask there). Deterministic in
(seed, index); nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from flmm_model.data.synthetic import COLOURS, SHAPES, _background, _place, shape_mask

# A shape's motion words by the sign of its main velocity component.
_MOTION_WORDS = {("x", 1): "moving right", ("x", -1): "moving left", ("y", 1): "moving down", ("y", -1): "moving up"}


@dataclass
class Clip:
    """One generated clip and its K referring expressions.

    Attributes:
        frames: T RGB PIL images of one size (W x H).
        gt_masks: (K, T, H, W) bool, the visible pixels of each named shape in each frame.
        phrases: K referring expressions.
        velocities: (K, 2) float, each shape's (dx, dy) in pixels per frame before any bounce.
    """

    frames: list[Image.Image]
    gt_masks: np.ndarray
    phrases: list[str]
    velocities: np.ndarray


def make_clip(
    rng: np.random.Generator,
    *,
    num_frames: int = 8,
    image_size: tuple[int, int] = (128, 256),
    max_objects: int = 3,
    object_size: tuple[float, float] = (0.15, 0.25),
    speed: tuple[float, float] = (3.0, 8.0),
) -> Clip:
    """Draw one clip from `rng`.

    Args:
        rng: numpy generator (the only source of randomness).
        num_frames: frames per clip (T >= 1).
        image_size: (min, max) side length in pixels; height and width are drawn independently.
        max_objects: at most this many shapes (fewer when they do not fit in the first frame).
        object_size: (min, max) shape size as a fraction of the shorter image side.
        speed: (min, max) pixels per frame along the shape's main direction.
    """
    if num_frames < 1:
        raise ValueError(f"make_clip: num_frames must be at least 1, found {num_frames}")
    height, width = (int(side) for side in rng.integers(image_size[0], image_size[1] + 1, size=2))
    background = _background(rng, height, width)  # (H, W, 3) float, the same in every frame

    kinds: list[tuple[str, str]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if kinds and kinds.count(kinds[-1]) == 1 and rng.random() < 0.35:
            kinds.append(kinds[-1])  # a twin, told apart by its motion
        else:
            kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
            if kind not in kinds:
                kinds.append(kind)

    boxes: list[tuple[int, int, int, int]] = []
    shapes: list[tuple[tuple[str, str], tuple[int, int, int, int], np.ndarray, np.ndarray]] = []
    axis = "x" if rng.random() < 0.5 else "y"  # twins move apart along one axis
    for kind in kinds:
        box = _place(rng, height, width, object_size, boxes)
        if box is None:
            continue
        boxes.append(box)
        twin = next((v for k, _, v, _ in shapes if k == kind), None)
        main = rng.uniform(*speed) * (1 if rng.random() < 0.5 else -1)
        side_speed = rng.uniform(-1.0, 1.0)
        velocity = np.array([main, side_speed] if axis == "x" else [side_speed, main])
        if twin is not None:  # opposite to its twin along the main axis
            index = 0 if axis == "x" else 1
            velocity[index] = -np.sign(twin[index]) * abs(velocity[index])
        colour = np.array(COLOURS[kind[0]], dtype=np.float64) + rng.normal(0.0, 6.0, size=3)
        shapes.append((kind, box, velocity, colour))

    frames, visible = [], np.zeros((len(shapes), num_frames, height, width), dtype=bool)
    for t in range(num_frames):
        canvas = background.copy()
        painted = np.full((height, width), -1)  # which shape shows at each pixel
        for k, (kind, box, velocity, colour) in enumerate(shapes):
            mask = _shape_at(kind[1], box, velocity, t, height, width)
            canvas[mask] = colour + rng.normal(0.0, 5.0, size=(int(mask.sum()), 3))
            painted[mask] = k
        for k in range(len(shapes)):
            visible[k, t] = painted == k
        frames.append(Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8)))

    phrases = []
    for kind, _, velocity, _ in shapes:
        phrase = f"the {kind[0]} {kind[1]}"
        if sum(other[0] == kind for other in shapes) > 1:
            index = 0 if axis == "x" else 1
            phrase += " " + _MOTION_WORDS[(axis, int(np.sign(velocity[index])))]
        phrases.append(phrase)
    velocities = np.stack([v for _, _, v, _ in shapes]) if shapes else np.zeros((0, 2))
    return Clip(frames=frames, gt_masks=visible, phrases=phrases, velocities=velocities)


def _shape_at(shape: str, box: tuple[int, int, int, int], velocity: np.ndarray, t: int, height: int,
              width: int) -> np.ndarray:
    """The (H, W) bool mask of a shape that started in `box` after t frames at `velocity`, bouncing off the border
    (its position reflected back into the image on each axis)."""
    x0, y0, x1, y1 = box
    side_x, side_y = x1 - x0 + 1, y1 - y0 + 1
    left = _bounce(x0 + velocity[0] * t, width - side_x)
    top = _bounce(y0 + velocity[1] * t, height - side_y)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + side_y, left:left + side_x] = shape_mask(shape, side_x, side_y)
    return mask


def _bounce(position: float, limit: int) -> int:
    """`position` folded into [0, limit] as a ball bouncing between two walls."""
    if limit <= 0:
        return 0
    period = 2 * limit
    folded = position % period
    return int(round(folded if folded <= limit else period - folded))


class SyntheticClips:
    """`length` clips, clip i drawn from numpy's generator seeded with (seed, i): `clips[i]` is a `Clip`."""

    def __init__(self, *, length: int, seed: int = 0, **clip_options) -> None:
        self.length, self.seed, self.clip_options = length, seed, clip_options

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Clip:
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic clips: index {index} out of range for {self.length} clips")
        return make_clip(np.random.default_rng([self.seed, index]), **self.clip_options)

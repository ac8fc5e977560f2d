"""flmm_model.overlay: tint and outline per mask in its own colour, and labels that never overlap."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

from flmm_model.overlay import colour, contour, draw_overlay, fit_text, hex_colour, label_font, layout_labels, mask_box


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_never_overlap_and_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(40):
        width, height = (int(side) for side in rng.integers(40, 400, size=2))
        count = int(rng.integers(1, 30))
        sizes = [(int(rng.integers(10, 160)), int(rng.integers(10, 24))) for _ in range(count)]
        anchors = []
        for _ in range(count):
            if rng.random() < 0.15:
                anchors.append(None)  # a phrase with an empty mask
                continue
            x0, y0 = int(rng.integers(0, width - 5)), int(rng.integers(0, height - 5))
            anchors.append((x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))))
        corners = layout_labels(sizes, anchors, width=width, height=height)
        boxes = [(x, y, x + w, y + h) for corner, (w, h) in zip(corners, sizes, strict=True) if corner
                 for x, y in [corner]]
        for box in boxes:
            assert 0 <= box[0] and 0 <= box[1] and box[2] <= width and box[3] <= height, (box, width, height)
        for a, b in itertools.combinations(boxes, 2):
            assert not _overlaps(a, b), (a, b)
        for corner, (w, h) in zip(corners, sizes, strict=True):  # None only for labels larger than the image ...
            if corner is None and w <= width and h <= height:  # ... or when no free spot was left on the grid
                step = max(2, h // 2)
                grid = [(x, y) for x in range(0, width - w + 1, step) for y in range(0, height - h + 1, step)]
                assert all(any(_overlaps((x - 1, y - 1, x + w + 1, y + h + 1), box) for box in boxes)
                           for x, y in grid)


def test_a_label_sits_just_above_its_object_when_there_is_room():
    corners = layout_labels([(50, 12), (50, 12)], [(30, 40, 90, 80), (35, 45, 60, 70)], width=200, height=150)
    assert corners[0] == (30, 28)  # above the first object, left-aligned
    assert corners[1] == (35, 70)  # above the second is taken by the first label: below its object


def test_overlay_tints_and_outlines_each_mask_in_its_own_colour():
    grey = (100, 110, 120)
    image = Image.new("RGB", (240, 180), grey)
    masks = np.zeros((2, 180, 240), dtype=bool)
    yy, xx = np.mgrid[0:180, 0:240]
    masks[0] = (yy - 120) ** 2 + (xx - 60) ** 2 < 35 ** 2  # a disc, bottom left
    masks[1, 100:170, 150:230] = True  # a rectangle, bottom right
    overlay = np.asarray(draw_overlay(image, masks, ["the disc", "the box"], alpha=0.5)).astype(int)
    assert overlay.shape == (180, 240, 3)
    for k, (y, x) in enumerate([(125, 60), (150, 190)]):  # inside, far from the edge and from the labels
        assert np.abs(overlay[y, x] - (np.array(grey) + np.array(colour(k))) / 2).max() <= 0.5 + 1e-9
    line = max(1, round(180 / 250))
    for k in range(2):
        outline = find_boundaries(masks[k], mode="inner") & masks[k]  # skimage's inner boundary as the reference
        assert np.array_equal(contour(masks[k], width=line), outline)
        assert (overlay[outline] == colour(k)).all()
    assert (overlay[5:60, 100:140] == grey).all()  # untouched away from masks and labels
    assert mask_box(masks[1]) == (150, 100, 230, 170) and mask_box(np.zeros((3, 3), bool)) is None


def test_labels_are_boxes_in_their_colour_and_the_overflow_goes_to_a_strip_below():
    image = Image.new("RGB", (120, 40), (0, 0, 0))
    masks = np.zeros((6, 40, 120), dtype=bool)
    for k in range(6):
        masks[k, 15:25, 20 * k:20 * k + 10] = True
    overlay = draw_overlay(image, masks, [f"a rather long label {k}" for k in range(6)])
    assert overlay.width == 120 and overlay.height > 40  # six wide labels cannot all fit in 120 x 40
    pixels = np.asarray(overlay)
    strip_colours = {tuple(pixels[y, 0]) for y in range(41, overlay.height)}
    in_image_colours = {tuple(c) for c in pixels[:40].reshape(-1, 3)}
    for k in range(6):  # every label is drawn once: its colour fills a box, in the image or in the strip
        assert colour(k) in strip_colours or colour(k) in in_image_colours
    # Nothing to move: the same scene with short labels keeps the image size.
    assert draw_overlay(image, masks[:2], ["a", "b"]).size == (120, 40)


def test_labels_wider_than_the_image_are_shortened_with_dots():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    draw, font = ImageDraw.Draw(image), label_font(64, 48)
    short = fit_text(draw, "x" * 200, font, 60)
    kept = len(short) - 3
    assert short == "x" * kept + "..." and draw.textlength(short, font=font) <= 60  # the longest cut that fits
    assert draw.textlength("x" * (kept + 1) + "...", font=font) > 60
    assert fit_text(draw, "ok", font, 60) == "ok"
    assert draw_overlay(image, np.zeros((1, 48, 64), dtype=bool), ["x" * 200]).size == (64, 48)


def test_a_label_with_line_breaks_is_drawn_on_one_line():
    # A chat answer's noun phrase can span a line break ("the red\ncircle"): drawn as "the red circle".
    image = Image.new("RGB", (96, 64), (0, 0, 0))
    masks = np.zeros((1, 64, 96), dtype=bool)
    masks[0, 30:50, 20:60] = True
    drawn = draw_overlay(image, masks, ["the red\n circle"])
    expected = draw_overlay(image, masks, ["the red circle"])
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_colours_are_distinct_for_many_phrases():
    colours = [colour(k) for k in range(64)]
    assert len(set(colours)) == 64
    assert all(0 <= channel <= 255 for rgb in colours for channel in rgb)
    assert hex_colour(0) == "#e69f00"

"""Synthetic shapes: deterministic, exact masks, expressions that name their masks, and not trivially solvable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flmm_model.data import SyntheticDataset
from flmm_model.data.synthetic import COLOURS, SHAPES, make_scene
from flmm_model.metrics import ReferSegMetric


@pytest.fixture(scope="module")
def synthetic(tokenizer, image_processor) -> SyntheticDataset:
    return SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=8, seed=3)


def test_synthetic_is_deterministic_in_seed_and_index(synthetic, tokenizer, image_processor):
    again = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=8, seed=3)
    for index in (0, 7):
        first, second = synthetic[index], again[index]
        for key in ("input_ids", "mask_ids", "pixel_values", "image_grid_thw", "image", "gt_masks"):
            assert torch.equal(first[key], second[key])
        assert first["phrases"] == second["phrases"]
    other = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=16, seed=4)
    assert not torch.equal(other[0]["image"], synthetic[0]["image"]) or other[0]["phrases"] != synthetic[0]["phrases"]


def test_synthetic_items_follow_the_item_contract(synthetic, tokenizer):
    image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for index in range(len(synthetic)):
        item = synthetic[index]
        num_objects, height, width = item["gt_masks"].shape
        assert item["gt_masks"].dtype == torch.bool and item["image"].shape == (3, height, width)
        assert 128 <= height <= 320 and 128 <= width <= 320
        assert len(item["phrases"]) == num_objects == len(item["meta"]["plural"]) >= 1
        assert int((item["input_ids"] == image_pad_id).sum()) == 1
        for k, phrase in enumerate(item["phrases"]):
            assert tokenizer.decode(item["input_ids"][item["mask_ids"] == k].tolist()).strip() == phrase
        t, h, w = item["image_grid_thw"][0].tolist()
        assert item["pixel_values"].shape == (t * h * w, 1176)


def test_synthetic_masks_are_exact_painted_pixels():
    seen_plural = seen_position = False
    for index in range(24):
        scene = make_scene(np.random.default_rng([11, index]))
        pixels = np.asarray(scene.image).astype(np.float64)  # (H, W, 3)
        assert not np.logical_and(scene.gt_masks[:, None], scene.gt_masks[None, :]).any(axis=(2, 3))[
            ~np.eye(len(scene.phrases), dtype=bool)].any()  # objects never overlap
        for mask, phrase, plural in zip(scene.gt_masks, scene.phrases, scene.plural, strict=True):
            words = phrase.split()
            colour = next(word for word in words if word in COLOURS)
            assert any(word.rstrip("s") in SHAPES for word in words)
            inside = pixels[mask]  # (N, 3)
            # Every mask pixel was painted with the named colour (+ small noise) ...
            assert np.abs(inside.mean(axis=0) - COLOURS[colour]).max() < 25
            assert np.abs(inside - COLOURS[colour]).max(axis=1).mean() < 20
            # ... and the ring just outside it was not.
            ring = np.zeros_like(mask)
            ring[1:] |= mask[:-1]
            ring[:-1] |= mask[1:]
            ring[:, 1:] |= mask[:, :-1]
            ring[:, :-1] |= mask[:, 1:]
            ring &= ~mask
            assert (np.abs(pixels[ring] - COLOURS[colour]).max(axis=1) > 30).mean() > 0.8
            seen_plural |= plural
            seen_position |= "left" in words or "top" in words
            if plural:
                assert words[1] in ("two", "three")
    assert seen_plural and seen_position


def test_synthetic_position_words_match_the_masks():
    for index in range(60):
        scene = make_scene(np.random.default_rng([5, index]))
        centres = {phrase: np.argwhere(mask).mean(axis=0) for phrase, mask in zip(scene.phrases, scene.gt_masks,
                                                                                strict=True)}  # (y, x)
        for phrase, centre in centres.items():
            if phrase.endswith(" on the left"):
                assert centre[1] < centres[phrase.replace(" on the left", " on the right")][1]
            if phrase.endswith(" at the top"):
                assert centre[0] < centres[phrase.replace(" at the top", " at the bottom")][0]


def test_synthetic_trivial_predictions_score_low(synthetic):
    full, empty = ReferSegMetric(), ReferSegMetric()
    for index in range(len(synthetic)):
        gt_masks = synthetic[index]["gt_masks"]
        full.update(torch.ones_like(gt_masks), gt_masks)
        empty.update(torch.zeros_like(gt_masks), gt_masks)
    assert full.compute()["cIoU"] < 10 and full.compute()["gIoU"] < 10
    assert empty.compute()["cIoU"] == 0 and empty.compute()["gIoU"] == 0


def test_synthetic_validates_arguments(tokenizer, image_processor):
    with pytest.raises(ValueError, match="object_size"):
        SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=2, object_size=(0.5, 1.5))
    with pytest.raises(IndexError):
        SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=2)[2]


def test_background_is_the_documented_sum_of_blotches_stripes_and_noise():
    """The background draws (base, blotch cells, stripe angle and period, pixel noise) in a fixed order and sums them
    in that order: the same scenes whatever the implementation's speed-ups. The blotches' reference is torch's
    bilinear resize (half-pixel centres, edges clamped), an implementation independent of the module's."""
    from flmm_model.data.synthetic import _background

    height, width = 37, 53
    background = _background(np.random.default_rng(7), height, width)
    rng = np.random.default_rng(7)
    base = rng.uniform(90, 170) + rng.uniform(-15, 15, size=3)
    cells = rng.normal(0.0, 25.0, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    blotches = torch.nn.functional.interpolate(torch.from_numpy(cells).permute(2, 0, 1)[None], size=(height, width),
                                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 24)
    ys, xs = np.mgrid[0:height, 0:width]
    stripes = 12.0 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    expected = base + blotches + stripes[..., None] + rng.normal(0.0, 10.0, size=(height, width, 3))
    assert background.shape == (height, width, 3)
    np.testing.assert_allclose(background, expected, rtol=0, atol=1e-9)


def test_bilinear_upsampling_matches_a_hand_computed_case():
    from flmm_model.data.synthetic import upsample_bilinear

    cells = np.array([[0.0, 4.0], [8.0, 12.0]])[..., None]  # (2, 2, 1)
    # 2 -> 4 samples the input at (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to 0, 0.25, 0.75, 1.
    expected = np.array([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], dtype=np.float64)
    np.testing.assert_array_equal(upsample_bilinear(cells, 4, 4)[..., 0], expected)
    # 2 x 2 -> 3 x 1: rows at -1/6, 1/2, 7/6 (clamped to 0, 1/2, 1), the one column at 1/2 (the rows' means 2, 10).
    assert upsample_bilinear(cells, 3, 1)[:, 0, 0].tolist() == [2.0, 6.0, 10.0]


def test_shapes_are_rasterised_by_pixel_centres_as_hand_computed():
    from flmm_model.data.synthetic import _shape_mask, shape_mask

    # A 5 x 5 box: the circle's centre is (2, 2), its radius 2.5; (0, 0) lies at 2.83 from it (out), (1, 0) and
    # (0, 1) at 2.24 (in). The triangle's row y spans |x - 2| <= y / 2.
    circle = ["01110", "11111", "11111", "11111", "01110"]
    triangle = ["00100", "00100", "01110", "01110", "11111"]
    as_rows = lambda mask: ["".join(str(int(v)) for v in row) for row in mask]  # noqa: E731
    assert as_rows(shape_mask("circle", 5, 5)) == circle
    assert as_rows(shape_mask("triangle", 5, 5)) == triangle
    assert shape_mask("square", 3, 2).all() and shape_mask("square", 3, 2).shape == (2, 3)
    # An ellipse 7 wide, 3 high: centre (3, 1), semi-axes 3.5 and 1.5; the corners' (3/3.5)^2 + (1/1.5)^2 > 1.
    assert as_rows(shape_mask("circle", 7, 3)) == ["0111110", "1111111", "0111110"]
    # Placed in an image: the box (x0, y0, x1, y1) = (2, 1, 6, 5), inclusive, of a 7 x 9 image.
    placed = _shape_mask("triangle", (2, 1, 6, 5), 7, 9)
    assert placed.shape == (7, 9) and placed.sum() == sum(row.count("1") for row in triangle)
    assert as_rows(placed[1:6, 2:7]) == triangle and not placed[0].any() and not placed[:, :2].any()
    with pytest.raises(ValueError, match="shape"):
        shape_mask("star", 4, 4)

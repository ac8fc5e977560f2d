"""`run.py predict`: one mask PNG per phrase at the image size, equal to `segment()`, plus an overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run
from flmm_model.apps.predict import load_image
from flmm_model.config import ModelConfig
from flmm_model.data import load_rgb
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.overlay import contour, draw_overlay
from flmm_model.recipes.inference import slugify

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")  # tiny random LMM


def test_predict_writes_masks_equal_to_segment_and_an_overlay(tmp_path, photos):
    checkpoint = tmp_path / "ckpt"
    build_model(ModelConfig(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)) \
        .save_pretrained(str(checkpoint))
    image_path = tmp_path / "photo.jpg"
    photo = photos[0]  # a real photo, not square
    photo.save(image_path)
    width, height = photo.size
    out = tmp_path / "pred"
    result = run.main(["predict", "--config", DEMO, "--checkpoint", str(checkpoint), "--image", str(image_path),
                       "--text", "the cup", "--text", "the saucer's left edge", "--out", str(out), "--device", "cpu"])
    assert [Path(p).name for p in result["masks"]] == ["mask_00_the_cup.png", "mask_01_the_saucer_s_left_edge.png"]

    model = FrozenQwenSAM.from_pretrained(str(checkpoint), qwen_path="tiny", sam_path="tiny")
    with Image.open(image_path) as image:
        expected = model.segment(image.convert("RGB"), ["the cup", "the saucer's left edge"])  # (2, H, W)
    for k, path in enumerate(result["masks"]):
        with Image.open(path) as mask_png:
            mask = np.asarray(mask_png)
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, expected[k].numpy())
        assert result["areas"][k] == int(expected[k].sum())
    with Image.open(result["overlay"]) as overlay:
        assert overlay.size == (width, height) and overlay.mode == "RGB"


def test_predict_missing_image_fails_before_weights_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        run.main(["predict", "--config", DEMO, "--checkpoint", str(tmp_path), "--image", str(tmp_path / "no.jpg"),
                  "--text", "x"])
    with pytest.raises(run.UsageError, match="--text"):
        run.main(["predict", "--config", DEMO, "--checkpoint", str(tmp_path), "--image", "x.jpg"])


def test_overlay_tints_masks_draws_contours_and_labels():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    masks = np.zeros((2, 48, 64), dtype=bool)
    masks[0, 10:30, 5:25] = True
    overlay = np.asarray(draw_overlay(image, masks, ["a", "nothing here"]))
    assert overlay[28, 22].any() and not overlay[40, 60].any()  # tinted inside (below the label), untouched outside
    outline = contour(masks[0], width=1)
    assert outline[10, 15] and outline[20, 5] and not outline[20, 15]
    assert slugify("The Cat's  left-ear!") == "the_cat_s_left_ear"


def test_load_image_reads_pixels_as_the_datasets_do(tmp_path):
    # A transparent PNG: the datasets (and Qwen's own loading) composite it on white, not on black.
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (8, 10, 3)
    assert (pixels[:4] == [200, 0, 0]).all() and (pixels[4:] == 255).all()
    assert np.array_equal(pixels, np.asarray(load_rgb(str(path))))


def test_predict_letterboxes_an_extreme_aspect_ratio_and_crops_the_masks_back(tmp_path):
    from flmm_model.data.images import letterbox

    checkpoint = tmp_path / "ckpt"
    build_model(ModelConfig(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)) \
        .save_pretrained(str(checkpoint))
    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 256, (10, 3000, 3), dtype=np.uint8))  # 300:1, beyond Qwen's 200:1
    strip.save(tmp_path / "strip.png")
    result = run.main(["predict", "--config", DEMO, "--checkpoint", str(checkpoint), "--image",
                       str(tmp_path / "strip.png"), "--text", "the left end", "--out", str(tmp_path / "pred"),
                       "--device", "cpu"])
    with Image.open(result["masks"][0]) as mask_png:
        mask = np.asarray(mask_png) == 255
    assert mask.shape == (10, 3000)
    # The reference: segment the letterboxed image by hand (3000 x 15), then cut the padding rows off.
    model = FrozenQwenSAM.from_pretrained(str(checkpoint), qwen_path="tiny", sam_path="tiny")
    padded = letterbox(strip)
    assert padded.size == (3000, 15)
    expected = model.segment(padded, ["the left end"])[0, :10, :3000].numpy()
    assert np.array_equal(mask, expected)

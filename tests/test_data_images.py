"""Image loading: EXIF orientation, mode conversion to RGB, errors, and the Qwen / SAM-side tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_model.data import DataError
from flmm_model.data.images import image_tensor, load_rgb, qwen_image_inputs, to_rgb


def _save_with_orientation(image: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


def test_load_rgb_applies_exif_orientation(tmp_path, photos):
    stored = photos[0]  # landscape
    width, height = stored.size
    path = tmp_path / "rotated.png"  # PNG: lossless, so pixels can be compared exactly
    _save_with_orientation(stored, path, 6)  # 6 = rotate 90 degrees clockwise to display
    upright = load_rgb(str(path))
    assert upright.size == (height, width)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    assert load_rgb(str(path), expected_hw=(width, height)).size == (height, width)


def test_load_rgb_keeps_stored_pixels_when_the_annotation_uses_them(tmp_path, photos, caplog):
    stored = photos[0]
    path = tmp_path / "rotated.png"
    _save_with_orientation(stored, path, 6)
    image = load_rgb(str(path), expected_hw=(stored.height, stored.width), sample="sample 7")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stored))
    assert "EXIF orientation 6 ignored" in caplog.text


def test_load_rgb_size_mismatch_names_file_and_sample(tmp_path, photos):
    path = tmp_path / "photo.jpg"
    photos[0].save(path)
    width, height = photos[0].size
    with pytest.raises(DataError, match=rf"photo.jpg \(sample 3\) is {height}x{width} .* says {height + 1}x{width}"):
        load_rgb(str(path), expected_hw=(height + 1, width), sample="sample 3")


def test_load_rgb_missing_and_unreadable_files_raise(tmp_path):
    with pytest.raises(DataError, match="missing image file .*nope.jpg"):
        load_rgb(str(tmp_path / "nope.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match="cannot read image file .*broken.jpg"):
        load_rgb(str(broken))


def test_to_rgb_converts_gray_palette_rgba_and_16_bit():
    gray = Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(to_rgb(gray)), np.repeat(np.asarray(gray)[..., None], 3, axis=2))

    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[0, 1] = (10, 20, 30, 0)  # transparent: white, as Qwen's loader composites
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba))), [[[10, 20, 30], [255, 255, 255]]])

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)), [[[255, 255, 255], [200, 100, 50]]])

    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(to_rgb(deep)), [[[0, 0, 0], [255, 255, 255]]])


def test_image_tensor_and_qwen_inputs_shapes(photos, image_processor):
    image = photos[-1]
    tensor = image_tensor(image)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, image.height, image.width)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(image))
    pixel_values, grid = qwen_image_inputs(image, image_processor)
    assert grid.dtype == torch.long and grid.shape == (1, 3)
    t, h, w = grid[0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and h * w * 14 * 14 <= 224 * 224
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (t * h * w, 1176)

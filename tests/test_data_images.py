"""Image loading: EXIF orientation, mode conversion to RGB, errors, and the Qwen / SAM-side tensors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from flmm_model.data import DataError
from flmm_model.data.images import image_tensor, load_rgb, qwen_image_inputs, to_rgb


def _save_with_orientation(image: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


def test_load_rgb_applies_exif_orientation_without_annotations(tmp_path, photos):
    stored = photos[0]  # landscape
    width, height = stored.size
    path = tmp_path / "rotated.png"  # PNG: lossless, so pixels can be compared exactly
    _save_with_orientation(stored, path, 6)  # 6 = rotate 90 degrees clockwise to display
    upright = load_rgb(str(path))  # expected_hw None: a user's photo, shown upright
    assert upright.size == (height, width)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))

    _save_with_orientation(stored, tmp_path / "flipped.png", 3)  # 3 = rotate 180 degrees
    np.testing.assert_array_equal(np.asarray(load_rgb(str(tmp_path / "flipped.png"))),
                                  np.asarray(stored.transpose(Image.Transpose.ROTATE_180)))


def test_load_rgb_orientation_6_keeps_stored_frame_of_non_square_annotation(tmp_path, photos, caplog):
    stored = photos[0]  # 600 x 400: the rotation would change the size
    path = tmp_path / "rotated.png"
    _save_with_orientation(stored, path, 6)
    image = load_rgb(str(path), expected_hw=(stored.height, stored.width), sample="sample 7")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stored))
    assert "EXIF orientation 6 ignored" in caplog.text and "sample 7" in caplog.text
    assert ImageOps.exif_transpose(image).size == stored.size  # the returned image carries no orientation any more


def test_load_rgb_orientation_3_with_matching_size_stays_stored_and_warns_once(tmp_path, photos, caplog):
    path = tmp_path / "upside_down.jpg"  # the reviewer's case: a JPEG whose rotation keeps the size
    _save_with_orientation(photos[3], path, 3)
    with Image.open(path) as handle:
        stored = np.asarray(handle.convert("RGB"))  # the stored pixel array, EXIF not applied
    height, width = stored.shape[:2]
    with caplog.at_level(logging.WARNING, logger="flmm_model.data.images"):
        image = load_rgb(str(path), expected_hw=(height, width), sample="sample 1")
        again = load_rgb(str(path), expected_hw=(height, width), sample="sample 2")
    np.testing.assert_array_equal(np.asarray(image), stored)
    np.testing.assert_array_equal(np.asarray(again), stored)
    warnings = [r for r in caplog.records if "EXIF orientation 3 ignored" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per file
    assert "keep image and masks aligned" in warnings[0].getMessage()


@pytest.mark.parametrize("orientation", range(2, 9))
def test_load_rgb_square_image_stays_stored_for_every_orientation(tmp_path, photos, caplog, orientation):
    stored = photos[2]  # 512 x 512: no orientation changes the size, so the size cannot tell the frames apart
    path = tmp_path / f"square_{orientation}.png"
    _save_with_orientation(stored, path, orientation)
    image = load_rgb(str(path), expected_hw=(stored.height, stored.width))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(stored))
    assert f"EXIF orientation {orientation} ignored" in caplog.text
    assert not np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(stored))  # without annotations: applied


def test_load_rgb_annotation_in_the_upright_frame_is_a_size_mismatch(tmp_path, photos):
    stored = photos[0]
    width, height = stored.size
    path = tmp_path / "rotated.png"
    _save_with_orientation(stored, path, 6)
    # COCO annotations refer to the stored pixels; one sized like the upright image is not aligned with them.
    with pytest.raises(DataError, match=rf"is {height}x{width} .* says {width}x{height}; its EXIF orientation 6"):
        load_rgb(str(path), expected_hw=(width, height))


def test_load_rgb_without_orientation_does_not_warn(tmp_path, photos, caplog):
    path = tmp_path / "plain.png"
    _save_with_orientation(photos[1], path, 1)
    image = load_rgb(str(path), expected_hw=(photos[1].height, photos[1].width))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(photos[1]))
    assert "EXIF" not in caplog.text


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


def test_load_rgb_refuses_a_decompression_bomb_with_a_clear_message(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (16000, 12000)).save(path)  # 192 megapixels, a 1-bit PNG of a few kB
    with pytest.raises(DataError, match=r"huge.png .*too large to decode safely: .*192000000 pixels.* Downscale it"):
        load_rgb(str(path))
    with pytest.raises(DataError, match=r"huge.png \(sample 2\) is too large"):
        load_rgb(str(path), expected_hw=(12000, 16000), sample="sample 2")


def test_check_image_size_names_the_image_and_the_limits():
    from flmm_model.data.images import check_image_size

    with pytest.raises(DataError, match=r"upload: the image is 16000x12000 \(W x H\), 192 megapixels, over the 179 "
                                        r"megapixels PIL decodes"):
        check_image_size(16000, 12000, where="upload")
    with pytest.raises(DataError, match=r"upload: the image is 3000x10 \(W x H\), aspect ratio 300:1, beyond the "
                                        r"200:1 the Qwen image processor accepts"):
        check_image_size(3000, 10, where="upload")
    check_image_size(3000, 10, where="upload", aspect_ratio=False)  # to be letterboxed: fine
    check_image_size(2000, 10, where="upload")  # 200:1 exactly is what the processor still takes


def test_dataset_image_beyond_the_qwen_aspect_ratio_is_bad_data(tmp_path, image_processor):
    path = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10), (9, 9, 9)).save(path)
    with pytest.raises(DataError, match=r"strip.png \(sample 5\): the image is 3000x10 .* aspect ratio 300:1"):
        load_rgb(str(path), expected_hw=(10, 3000), sample="sample 5")
    assert load_rgb(str(path)).size == (3000, 10)  # a user's image loads; the predictor letterboxes it


@pytest.mark.parametrize("size, padded", [((3000, 10), (3000, 15)), ((10, 3000), (15, 3000)),
                                          ((2000, 10), (2000, 10)), ((640, 480), (640, 480))])
def test_letterbox_pads_bottom_or_right_to_the_processor_limit(size, padded, image_processor):
    from flmm_model.data.images import letterbox

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    boxed = letterbox(image)
    assert boxed.size == padded
    if padded == size:
        assert boxed is image
    canvas = np.asarray(boxed)
    np.testing.assert_array_equal(canvas[: size[1], : size[0]], np.asarray(image))  # original pixels in place
    assert not canvas[size[1]:].any() and not canvas[:, size[0]:].any()  # black padding
    qwen_image_inputs(boxed, image_processor)  # the processor takes it

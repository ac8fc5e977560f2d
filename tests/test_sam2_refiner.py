"""Sam2Refiner (SAM2 / SAM2.1 as the refiner) against transformers' own Sam2Model forward on tiny random weights:
the image features, point / box / mask prompts, F-LMM's prompts end to end, padded text tokens, freezing, the whole
model and the SAM-embedding cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Sam2Model

from flmm_model.build import build_sam, check_model_paths, sam2_config, sam_family
from flmm_model.config import ConfigError, ModelConfig
from flmm_model.data.sam_cache import SamCacheError
from flmm_model.modeling.sam2_refiner import Sam2Refiner, refiner_for
from flmm_model.modeling.sam_refiner import SamRefiner

S, MASK_SIDE, PROMPT_DIM = 256, 64, 128  # the sam2_tiny preset: input side, mask input side (4e), prompt dim


def _image_model() -> Sam2Model:
    """transformers' image model with the tiny preset's weights (a fresh Sam2VideoModel's image parts, copied)."""
    torch.manual_seed(0)
    video = build_sam("sam2_tiny", seed=0)
    config = sam2_config("sam2_tiny")
    image = Sam2Model(config)
    missing, _ = image.load_state_dict(video.state_dict(), strict=False)
    assert not missing  # every image part has its weights from the video model
    for parameter in image.parameters():  # larger random weights, so differences show above float noise
        with torch.no_grad():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return image.eval()


@pytest.fixture
def pair() -> tuple[Sam2Refiner, Sam2Model]:
    """Our refiner around a Sam2Model, and a separate copy of the same weights for transformers' reference path."""
    reference = _image_model()
    ours = Sam2Model(reference.config)
    ours.load_state_dict(reference.state_dict())
    # the refiner turns SAM2's dynamic single-mask switch off (the trained token, in eval as in training): the same
    # single-mask decode for the reference
    reference.mask_decoder.dynamic_multimask_via_stability = False
    return Sam2Refiner(sam=ours).eval(), reference


def _photo_tensor(seed: int, height: int, width: int) -> torch.Tensor:
    from skimage import data

    photo = [data.astronaut(), data.coffee(), data.chelsea()][seed]
    tensor = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)
    return F.interpolate(tensor[None].float(), size=(height, width), mode="bilinear", antialias=True)[0].round() \
        .clamp(0, 255).to(torch.uint8)


def test_preprocess_stretches_to_the_square_frame_with_imagenet_statistics(pair):
    """SAM2's processor: resize to S x S (aspect ratio not kept, bilinear), ImageNet mean / std on 0-1 values.
    Reference: Pillow's bilinear resize of the same photo (transformers' processor needs torchvision)."""
    from PIL import Image

    refiner, _ = pair
    image = _photo_tensor(0, 150, 230)
    resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((S, S), Image.BILINEAR)
    values = torch.from_numpy(np.asarray(resized).astype(np.float32) / 255.0).permute(2, 0, 1)
    expected = (values - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225]
                                                                                             )[:, None, None]
    ours = refiner.preprocess([image])
    assert ours.shape == (1, 3, S, S) and refiner.resized_size((150, 230)) == (S, S)
    grey_level = 1 / (0.225 * 255)
    assert (ours[0] - expected).abs().mean() < grey_level  # the same picture, every pixel of the frame
    assert (ours[0] - expected).abs().max() < 12 * grey_level  # resampling kernels differ at edges only


def test_image_features_equal_transformers(pair):
    refiner, reference = pair
    pixels = torch.randn(2, 3, S, S)
    packed = refiner.encode_images(pixels)
    assert packed.shape == (2, *refiner.embedding_shape)
    with torch.no_grad():
        expected = reference.get_image_embeddings(pixels)  # [(2, C/8, 4e, 4e), (2, C/4, 2e, 2e), (2, C, e, e)]
    for ours, theirs in zip(refiner.unpack(packed), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prompt", ["points", "boxes", "boxes+masks"])
def test_decoder_equals_transformers_forward(pair, prompt):
    refiner, reference = pair
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, S, S)
    kwargs = {}
    if prompt == "points":
        kwargs.update(input_points=torch.tensor([[[[40.0, 60.0], [200.0, 100.0]]], [[[128.0, 128.0], [10.0, 250.0]]]]),
                      input_labels=torch.tensor([[[1, 0]], [[1, 1]]]))
    else:
        kwargs.update(input_boxes=torch.tensor([[[20.0, 30.0, 180.0, 200.0]], [[0.0, 0.0, 255.0, 255.0]]]))
    if prompt == "boxes+masks":
        kwargs.update(input_masks=torch.randn(2, 1, MASK_SIDE, MASK_SIDE) * 4)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, multimask_output=False, **kwargs).pred_masks[:, 0, 0]
        sparse, dense = refiner.sam.prompt_encoder(input_points=kwargs.get("input_points"),
                                                   input_labels=kwargs.get("input_labels"),
                                                   input_boxes=kwargs.get("input_boxes"),
                                                   input_masks=kwargs.get("input_masks"))
        image_pe = refiner.sam.get_image_wide_positional_embeddings().expand(2, -1, -1, -1)
        ours = refiner.decode(refiner.encode_images(pixels), image_pe, sparse, dense)
    assert ours.shape == (2, MASK_SIDE, MASK_SIDE)
    assert expected.std() > 1e-3  # a real signal, not noise around zero
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_flmm_prompts_end_to_end_equal_transformers_with_the_same_prompts(pair):
    """refine() from coarse logits (no text tokens) = transformers' forward given the box and the dense prompt the
    refiner derives, post-processed to the original size as SAM2's processor does."""
    refiner, reference = pair
    image = _photo_tensor(1, 120, 200)
    torch.manual_seed(2)
    coarse = torch.randn(2, 10, 16) * 3
    coarse[1] = -5.0
    coarse[1, 2:5, 3:9] = 5.0  # a box away from the border
    pixels = refiner.preprocess([image])
    embeddings = refiner.encode_images(pixels)
    with torch.no_grad():
        ours = refiner(image_embeddings=embeddings[0], coarse_logits=coarse,
                       text_prompts=[torch.zeros(0, PROMPT_DIM)] * 2, original_size=(120, 200))
        boxes = refiner.boxes(coarse, (120, 200))  # (2, 4) in SAM2's S x S frame
        masks = refiner.mask_inputs(coarse, (120, 200))  # (2, 1, 4e, 4e)
        expected = reference(pixel_values=pixels.expand(2, -1, -1, -1), input_boxes=boxes[:, None],
                             input_masks=masks, multimask_output=False).pred_masks[:, 0]  # (2, 1, 4e, 4e)
        expected = F.interpolate(expected, size=(120, 200), mode="bilinear", align_corners=False)[:, 0]
    # the stretched frame: object 1's box is its 6 x 3 coarse cells scaled per axis to S x S
    torch.testing.assert_close(boxes[1], torch.tensor([3 * S / 16, 2 * S / 10, 9 * S / 16 - 1, 5 * S / 10 - 1]))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_padded_text_tokens_give_each_object_its_alone_mask(pair):
    refiner, _ = pair
    embeddings = refiner.encode_images(torch.randn(1, 3, S, S))[0]
    torch.manual_seed(3)
    coarse = torch.randn(3, 12, 8)
    prompts = [torch.randn(4, PROMPT_DIM), torch.randn(1, PROMPT_DIM), torch.randn(0, PROMPT_DIM)]
    with torch.no_grad():
        together = refiner(image_embeddings=embeddings, coarse_logits=coarse, text_prompts=prompts,
                           original_size=(90, 60))
        for k in range(3):
            alone = refiner(image_embeddings=embeddings, coarse_logits=coarse[k:k + 1], text_prompts=[prompts[k]],
                            original_size=(90, 60))
            torch.testing.assert_close(together[k:k + 1], alone, rtol=1e-4, atol=1e-5)
        unmasked = refiner.refine(image_embeddings=embeddings[None].expand(3, -1, -1, -1), coarse=coarse,
                                  frames=refiner._frames_of(coarse, (90, 60)),
                                  text_tokens=torch.stack([F.pad(p, (0, 0, 0, 4 - p.shape[0])) for p in prompts]),
                                  text_valid=None, canvas=(90, 60))
    assert (unmasked[2] - together[2]).abs().max() > 1e-4  # the mask matters: zero tokens change the decode


def test_only_the_prompt_encoder_and_decoder_train(pair):
    refiner, _ = pair
    refiner.train()
    assert not refiner.sam.vision_encoder.training  # kept in eval
    embeddings = refiner.encode_images(torch.randn(1, 3, S, S))
    assert not embeddings.requires_grad
    coarse = torch.randn(1, 8, 8, requires_grad=True)
    text = torch.randn(2, PROMPT_DIM, requires_grad=True)
    out = refiner(image_embeddings=embeddings[0], coarse_logits=coarse, text_prompts=[text], original_size=(64, 64))
    out.sum().backward()
    assert coarse.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    trained = {name for name, p in refiner.sam.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("prompt_encoder.", "mask_decoder.")) for name in trained)
    assert not any(name.startswith(("mask_decoder.conv_s0", "mask_decoder.conv_s1", "prompt_encoder.shared"))
                   for name in trained)
    assert all(p.grad is not None for name, p in refiner.sam.named_parameters()
               if name.startswith("mask_decoder.output_hypernetworks_mlps.0"))


def test_family_from_config_and_presets(tmp_path):
    assert sam_family("tiny") == "sam" and sam_family("sam2_tiny") == "sam2"
    assert sam_family("sam2.1_hiera_large") == "sam2"
    assert isinstance(refiner_for(build_sam("tiny")), SamRefiner)
    assert not isinstance(refiner_for(build_sam("tiny")), Sam2Refiner)
    assert isinstance(refiner_for(build_sam("sam2_tiny")), Sam2Refiner)
    for model_type, family in (("sam", "sam"), ("sam2", "sam2"), ("sam2_video", "sam2")):
        directory = tmp_path / model_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert sam_family(str(directory)) == family
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ConfigError, match=r"model_type 'qwen2_5_vl'; expected one of"):
        check_model_paths(ModelConfig(qwen="tiny", sam=str(wrong)))
    with pytest.raises(ConfigError, match="sam2.1_hiera_large"):
        sam_family("sam3_huge")


def test_hiera_large_preset_has_the_released_size():
    with torch.device("meta"):
        model = build_sam("sam2.1_hiera_large")
    trunk = sum(p.numel() for p in model.vision_encoder.backbone.parameters())
    # SAM2.1-Hiera-L: 224.4 M parameters in all (SAM2's model card), the Hiera-L trunk ~212 M of them
    total = sum(p.numel() for p in model.parameters())
    assert 2.0e8 < trunk < 2.2e8 and 2.2e8 < total < 2.3e8, (trunk, total)


def test_whole_model_trains_with_a_sam2_refiner_and_its_cache_is_its_own(photos, tmp_path):
    from flmm_model.model import build_model
    from tests.test_model import make_batch

    model = build_model(dict(qwen="tiny", sam="sam2_tiny", max_pixels=224 * 224, seed=0))
    assert isinstance(model.sam_refiner, Sam2Refiner)
    batch = make_batch(model, photos)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and "loss_sam_dice" in out
    for refined, image in zip(out["mask_logits"], photos, strict=False):
        assert refined.shape[1:] == (image.size[1], image.size[0])
    out["loss"].backward()
    assert model.mask_head.parameters().__next__().grad is not None
    assert model.sam_refiner.sam.mask_decoder.iou_token.weight.grad is not None
    assert all(p.grad is None for p in model.sam_refiner.sam.vision_encoder.parameters())
    directory = str(tmp_path / "cache")
    model.open_sam_cache(directory, precision="fp32")
    sam_model = build_model(dict(qwen="tiny", sam="tiny", max_pixels=224 * 224, seed=0))
    with pytest.raises(SamCacheError, match="another SAM setup"):
        sam_model.open_sam_cache(directory, precision="fp32")

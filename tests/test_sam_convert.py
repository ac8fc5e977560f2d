"""segment-anything -> transformers SAM conversion, checked against the real segment-anything modules.

A tiny original-layout model is built with segment-anything's own classes (same sizes as the `tiny` preset), its
state dict saved as a `.pth`, converted, loaded with `build_sam`, and the image encoder, prompt encoder, positional
encoding and mask decoder outputs compared numerically.
"""

from __future__ import annotations

import pytest
import torch
from sam_original import import_segment_anything, tiny_original_sam

from flmm_model.build import build_sam
from flmm_model.modeling.sam_refiner import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from flmm_model.recipes.convert_sam import convert_sam_checkpoint, convert_sam_state_dict, validate_sam_state_dict


@pytest.fixture(scope="module")
def original_and_converted(tmp_path_factory):
    original = tiny_original_sam()
    state = dict(original.state_dict())
    # The released files also carry the normalization buffers.
    state["pixel_mean"] = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    directory = tmp_path_factory.mktemp("sam")
    torch.save(state, directory / "sam_tiny_original.pth")
    convert_sam_checkpoint(str(directory / "sam_tiny_original.pth"), str(directory / "hf"), arch="tiny")
    return original, build_sam(str(directory / "hf")).eval(), state


def test_every_converted_weight_is_loaded(original_and_converted):
    _, converted, state = original_and_converted
    expected = convert_sam_state_dict(state)
    loaded = converted.state_dict()
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)
    # Spot checks of renames that change structure.
    torch.testing.assert_close(loaded["prompt_encoder.mask_embed.conv3.weight"],
                               state["prompt_encoder.mask_downscaling.6.weight"])
    torch.testing.assert_close(loaded["mask_decoder.output_hypernetworks_mlps.2.proj_out.bias"],
                               state["mask_decoder.output_hypernetworks_mlps.2.layers.2.bias"])
    assert converted.shared_image_embedding.positional_embedding is \
        converted.prompt_encoder.shared_embedding.positional_embedding


def test_image_encoder_and_positional_encoding_match_the_original(original_and_converted):
    original, converted, _ = original_and_converted
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original.image_encoder(pixels)
        found = converted.vision_encoder(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(converted.get_image_wide_positional_embeddings(),
                                   original.prompt_encoder.get_dense_pe(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multimask_output", [False, True])
def test_prompt_encoder_and_mask_decoder_match_the_original(original_and_converted, multimask_output):
    original, converted, _ = original_and_converted
    generator = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 255.0, 170.0]])  # (B, 4) in SAM input pixels
    mask_inputs = torch.randn(2, 1, 64, 64, generator=generator)
    image_embeddings = torch.randn(1, 32, 16, 16, generator=generator)
    text_tokens = torch.randn(2, 3, 32, generator=generator)  # extra sparse tokens, like the text prompts
    with torch.no_grad():
        sparse_expected, dense_expected = original.prompt_encoder(points=None, boxes=boxes, masks=mask_inputs)
        sparse_found, dense_found = converted.prompt_encoder(
            input_points=None, input_labels=None, input_boxes=boxes[:, None], input_masks=mask_inputs
        )
        torch.testing.assert_close(sparse_found[:, 0], sparse_expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense_found, dense_expected, rtol=1e-4, atol=1e-4)

        sparse = torch.cat([sparse_expected, text_tokens], dim=1)  # (B, 2 + 3, C)
        masks_expected, iou_expected = original.mask_decoder(
            image_embeddings=image_embeddings, image_pe=original.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense_expected,
            multimask_output=multimask_output,
        )  # (B, M, 64, 64), (B, M)
        masks_found, iou_found = converted.mask_decoder(
            image_embeddings=image_embeddings.expand(2, -1, -1, -1),
            image_positional_embeddings=converted.get_image_wide_positional_embeddings().expand(2, -1, -1, -1),
            sparse_prompt_embeddings=sparse[:, None], dense_prompt_embeddings=dense_expected,
            multimask_output=multimask_output,
        )  # (B, 1, M, 64, 64), (B, 1, M)
    # Not bit-exact: transformers' two-way attention blocks use LayerNorm eps 1e-6, segment-anything 1e-5.
    torch.testing.assert_close(masks_found[:, 0], masks_expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou_found[:, 0], iou_expected, rtol=1e-4, atol=1e-4)


def test_unmapped_keys_are_listed():
    state = {"image_encoder.pos_embed": torch.zeros(1), "image_encoder.extra.weight": torch.zeros(1),
             "mask_decoder.foo": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"2 segment-anything keys .*image_encoder\.extra\.weight.*mask_decoder\.foo"):
        convert_sam_state_dict(state)


def test_non_standard_pixel_mean_is_rejected():
    with pytest.raises(ValueError, match="pixel_mean"):
        convert_sam_state_dict({"pixel_mean": torch.zeros(3, 1, 1)})


def test_shape_mismatch_names_the_key_and_both_shapes(original_and_converted, tmp_path):
    _, _, state = original_and_converted
    state = dict(state, **{"mask_decoder.iou_token.weight": torch.zeros(1, 31)})
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"mask_decoder\.iou_token\.weight.*\(1, 31\).*\(1, 32\)"):
        convert_sam_checkpoint(str(tmp_path / "bad.pth"), str(tmp_path / "out"), arch="tiny")


def test_wrong_arch_lists_missing_keys(original_and_converted, tmp_path):
    _, _, state = original_and_converted
    torch.save(state, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"does not match arch 'sam_vit_b': missing \[.*vision_encoder\.layers\.11"):
        convert_sam_checkpoint(str(tmp_path / "tiny.pth"), str(tmp_path / "out"), arch="sam_vit_b")


@pytest.mark.parametrize("arch", ["sam_vit_b", "sam_vit_l", "sam_vit_h"])
def test_released_layouts_map_onto_the_presets(arch):
    # segment-anything's own builders on the meta device: the real key set and shapes, no memory, no weights.
    build_original = import_segment_anything("build_sam")
    with torch.device("meta"):
        original = build_original.sam_model_registry[arch.removeprefix("sam_")](checkpoint=None)
    state = dict(original.state_dict())
    state["pixel_mean"] = torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1)  # real values: they are checked
    state["pixel_std"] = torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1)
    validate_sam_state_dict(convert_sam_state_dict(state), arch=arch)

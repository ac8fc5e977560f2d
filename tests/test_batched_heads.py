"""The batched forward equals each sample computed alone: logits, losses and gradients.

`FrozenQwenSAM.forward` runs every head once for the whole batch (the U-Net per distinct attention grid, one text
projection, one SAM prompt-encoder and mask-decoder call with padded text tokens masked out, the losses on padded
canvases). The reference below is written independently: one sample at a time, one object at a time, with plain
`F.interpolate` / `F.pad` resizes, the box of the thresholded coarse mask computed by hand, SAM's prompt encoder and
mask decoder called on unpadded prompts, and the per-mask `bce_loss` / `dice_loss` averaged over all masks of the
batch, exactly as the per-sample code before batching did. The batch mixes image sizes (two samples share a grid,
so a U-Net call covers two samples and the group order differs from the sample order), 1 to 3 objects per sample,
phrases of different token counts, and left and right padding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flmm_model.data import collate, image_tensor, qwen_image_inputs
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.model import build_model
from flmm_model.modeling.losses import bce_loss, dice_loss, resize_gt_masks
from flmm_model.modeling.sam_refiner import SAM_PIXEL_MEAN, SAM_PIXEL_STD

# Sample 3 repeats sample 0's photo: the two share an attention grid (one U-Net call, out of sample order).
PHOTO_OF_SAMPLE = [0, 1, 2, 0]
PHRASES = [["the cup of coffee", "the saucer"], ["a man in a white space suit"],
           ["the cat", "its left ear", "the wall behind the animal"], ["the spoon"]]


def make_items(model, photos) -> list[dict]:
    items = []
    for photo_index, phrases in zip(PHOTO_OF_SAMPLE, PHRASES, strict=True):
        image = photos[photo_index]
        input_ids, mask_ids = encode_grounded(model.tokenizer, expression_parts(phrases))
        pixel_values, grid = qwen_image_inputs(image, model.image_processor)
        width, height = image.size
        gt = torch.zeros(len(phrases), height, width, dtype=torch.bool)
        for k in range(len(phrases)):  # a different region per object
            gt[k, height * k // 5: height * (k + 3) // 5, width * (k + 1) // 6: width * (k + 4) // 6] = True
        items.append(dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=grid,
                          image=image_tensor(image), gt_masks=gt, phrases=phrases, meta={"image_id": len(items)}))
    return items


def reference_sample(model, item: dict, lmm_out=None, b: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Coarse logits (K, h', w'), refined logits (K, H, W) and per-mask loss terms of one sample, alone; the LMM
    stage run on the sample alone, or sample `b` of a given `lmm_out`."""
    if lmm_out is None:
        batch = collate([item], pad_token_id=model.tokenizer.pad_token_id)
        lmm_out = model.lmm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["image_grid_thw"], batch["mask_ids"])
    coarse = model.mask_head(lmm_out.attention_maps[b])  # (K, h', w')
    refiner, sam = model.sam_refiner, model.sam_refiner.sam
    image = item["image"]
    height, width = image.shape[1:]
    size = refiner.image_size
    resized_height = math.floor(height * size / max(height, width) + 0.5)
    resized_width = math.floor(width * size / max(height, width) + 0.5)
    pixels = F.interpolate(image[None].float(), size=(resized_height, resized_width), mode="bilinear",
                           align_corners=False, antialias=True).round().clamp(0, 255)
    pixels = (pixels - torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    pixels = F.pad(pixels, (0, size - resized_width, 0, size - resized_height))
    with torch.no_grad():
        embeddings = sam.vision_encoder(pixel_values=pixels).last_hidden_state  # (1, C, e, e)
        image_pe = sam.get_image_wide_positional_embeddings()
    side = refiner.mask_input_size
    refined, terms = [], []
    grid_height, grid_width = coarse.shape[1:]
    for k, states in enumerate(lmm_out.phrase_hidden_states[b]):
        text = model.text_projector(states)  # (T_k, P)
        mask_height = min(side, max(1, math.floor(resized_height * side / size + 0.5)))
        mask_width = min(side, max(1, math.floor(resized_width * side / size + 0.5)))
        mask_input = F.interpolate(coarse[k][None, None], size=(mask_height, mask_width), mode="bilinear",
                                   align_corners=False)
        mask_input = F.pad(mask_input, (0, side - mask_width, 0, side - mask_height), value=refiner.pad_logit)
        foreground = coarse[k].detach() > refiner.coarse_threshold
        if foreground.any():
            rows, cols = foreground.any(1).nonzero().flatten(), foreground.any(0).nonzero().flatten()
            scale_y, scale_x = resized_height / grid_height, resized_width / grid_width
            x_min, y_min = float(cols[0]) * scale_x, float(rows[0]) * scale_y
            box = [x_min, y_min, max((float(cols[-1]) + 1) * scale_x - 1, x_min),
                   max((float(rows[-1]) + 1) * scale_y - 1, y_min)]
        else:
            box = [0.0, 0.0, resized_width - 1.0, resized_height - 1.0]
        box_tokens, dense = sam.prompt_encoder(input_points=None, input_labels=None,
                                               input_boxes=torch.tensor([[box]]), input_masks=mask_input)
        masks, _ = sam.mask_decoder(image_embeddings=embeddings, image_positional_embeddings=image_pe,
                                    sparse_prompt_embeddings=torch.cat([box_tokens, text[None, None]], dim=2),
                                    dense_prompt_embeddings=dense, multimask_output=False)
        low_res = F.interpolate(masks[:, 0], size=(size, size), mode="bilinear", align_corners=False)
        logits = F.interpolate(low_res[..., :resized_height, :resized_width], size=(height, width), mode="bilinear",
                               align_corners=False)[0, 0]  # (H, W)
        refined.append(logits)
        gt = item["gt_masks"][k][None].float()
        coarse_gt = resize_gt_masks(item["gt_masks"][k][None], (grid_height, grid_width))
        terms.append(dict(mask_bce=bce_loss(coarse[k][None], coarse_gt),
                          mask_dice=dice_loss(coarse[k][None], coarse_gt),
                          sam_bce=bce_loss(logits[None], gt), sam_dice=dice_loss(logits[None], gt)))
    return coarse, torch.stack(refined), terms


@pytest.fixture(scope="module")
def model():
    return build_model(dict(qwen="tiny", sam="tiny", max_pixels=224 * 224, seed=0)).train()


def gradients(model) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
            if p.requires_grad}


def check_gradients(batched: dict, reference: dict, rtol: float) -> None:
    """Each parameter's gradient within `rtol` of the reference in norm (fp32 sums in other orders); parameters that
    no prompt uses get none on both sides."""
    assert sum(float(g.abs().sum()) for g in reference.values() if g is not None) > 0
    for name, expected in reference.items():
        found = batched[name]
        assert (found is None) == (expected is None), name
        if expected is not None:  # 1e-12: gradients that are zero in exact arithmetic (a key bias under softmax)
            assert float((found - expected).norm()) <= rtol * float(expected.norm()) + 1e-12, name


def run_both(model, items, padding_side, *, shared_lmm: bool):
    """The batched forward and the per-sample reference: logits, loss terms and gradients of each."""
    batch = collate(items, pad_token_id=model.tokenizer.pad_token_id, padding_side=padding_side)
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    batched_grads = gradients(model)

    model.zero_grad(set_to_none=True)
    lmm_out = None
    if shared_lmm:  # the same LMM outputs as the batched forward: only the heads differ
        lmm_out = model.lmm.forward_prepared(model.prepare_batch(batch).lmm)
    all_terms, reference_logits = [], []
    for b, item in enumerate(items):
        coarse, refined, terms = reference_sample(model, item, lmm_out, b if shared_lmm else 0)
        reference_logits.append((coarse, refined))
        all_terms += terms
    means = {name: torch.cat([terms[name] for terms in all_terms]).mean() for name in all_terms[0]}
    sum(means.values()).backward()
    reference_grads = gradients(model)
    model.zero_grad(set_to_none=True)
    return out, batched_grads, reference_logits, means, reference_grads


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_forward_equals_per_sample_logits_losses_and_gradients(model, photos, padding_side):
    items = make_items(model, photos)
    prepared = model.prepare_batch(collate(items, pad_token_id=model.tokenizer.pad_token_id))
    assert len(prepared.unet_groups) == 3 and prepared.coarse_order is not None  # samples 0 and 3 share a grid
    assert prepared.text_valid is not None  # phrases of different token counts: padded tokens masked
    out, batched_grads, reference_logits, means, reference_grads = run_both(model, items, padding_side,
                                                                          shared_lmm=False)
    for b, (coarse, refined) in enumerate(reference_logits):
        torch.testing.assert_close(out["coarse_logits"][b], coarse, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["mask_logits"][b], refined, rtol=1e-4, atol=1e-4)
    for name, key in (("mask_bce", "loss_mask_bce"), ("mask_dice", "loss_mask_dice"), ("sam_bce", "loss_sam_bce"),
                      ("sam_dice", "loss_sam_dice")):
        torch.testing.assert_close(out[key], means[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], sum(means.values()), rtol=1e-5, atol=1e-6)
    # The LMM run on a padded batch or alone differs by ~1e-6 relative in the attention maps; the U-Net's first
    # weights sum those maps over every pixel and object, which takes the difference to ~3e-4 of the gradient.
    check_gradients(batched_grads, reference_grads, rtol=2e-3)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_heads_equal_per_sample_heads_on_the_same_lmm_outputs(model, photos, padding_side):
    """The heads alone, on the batched LMM's outputs: batching the heads changes the gradients by fp32 rounding."""
    out, batched_grads, reference_logits, means, reference_grads = run_both(model, make_items(model, photos),
                                                                          padding_side, shared_lmm=True)
    for b, (coarse, refined) in enumerate(reference_logits):
        torch.testing.assert_close(out["coarse_logits"][b], coarse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["mask_logits"][b], refined, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], sum(means.values()), rtol=1e-6, atol=1e-7)
    # The U-Net's first weights sum products over every pixel of every object, with cancellation: the reduction
    # order oneDNN picks for the batched and the per-sample convolutions (by CPU model: 3.6e-4 on an AMD EPYC, under
    # 1e-4 on the CPU of an earlier CI run) moves that gradient by a few 1e-4 relative; an indexing mistake moves
    # it by O(1).
    check_gradients(batched_grads, reference_grads, rtol=1e-3)

"""FrozenQwenSAM end to end on tiny models: shapes, freezing, gradient paths, segment(), checkpoints."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from flmm_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from flmm_model.data import collate, image_tensor, qwen_image_inputs
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.device import to_device
from flmm_model.model import FrozenQwenSAM, build_model

PHRASES = [["the cup of coffee", "the saucer"], ["a man in a space suit"], ["the cat", "its left ear", "the wall"]]
MODEL_CFG = dict(qwen="tiny", sam="tiny", max_pixels=224 * 224, seed=0)


def make_batch(model: FrozenQwenSAM, photos: list[Image.Image], padding_side: str = "left") -> dict:
    """A collated batch of three real photos of different sizes with 2, 1 and 3 objects (boxes as masks)."""
    items = []
    for image, phrases in zip(photos[:3], PHRASES, strict=True):
        input_ids, mask_ids = encode_grounded(model.tokenizer, expression_parts(phrases))
        pixel_values, grid = qwen_image_inputs(image, model.image_processor)
        width, height = image.size
        gt = torch.zeros(len(phrases), height, width, dtype=torch.bool)
        for k in range(len(phrases)):  # a different box per object
            gt[k, height * k // 4: height * (k + 2) // 4, width // 5: width * (k + 3) // 5] = True
        items.append(dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=grid,
                          image=image_tensor(image), gt_masks=gt, phrases=phrases, meta={"image_id": len(items)}))
    return collate(items, pad_token_id=model.tokenizer.pad_token_id, padding_side=padding_side)


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG)


def test_forward_shapes_for_mixed_image_sizes(model, photos):
    batch = make_batch(model, photos)
    out = model(batch)
    assert set(out) >= {"loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice",
                        "coarse_logits", "mask_logits"}
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    expected = sum(out[k] for k in ("loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice"))
    torch.testing.assert_close(out["loss"], expected)
    for phrases, image, coarse, refined in zip(PHRASES, photos, out["coarse_logits"], out["mask_logits"],
                                               strict=False):
        width, height = image.size
        assert refined.shape == (len(phrases), height, width)
        assert coarse.shape[0] == len(phrases) and max(coarse.shape[1:]) == 64  # longest side = mask_head_size


def test_frozen_parts_unchanged_and_heads_updated_after_step(photos):
    model = build_model(MODEL_CFG)
    model.train()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    heads = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("lmm.qwen.") for name in frozen)
    assert any(name.startswith("sam_refiner.sam.vision_encoder.") for name in frozen)
    assert not any(name.startswith(("lmm.qwen.", "sam_refiner.sam.vision_encoder.")) for name in heads)

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model(make_batch(model, photos))["loss"].backward()
    optimizer.step()

    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), f"frozen parameter {name} changed"
    changed = {name for name, p in model.named_parameters() if name in heads and not torch.equal(p, heads[name])}
    for prefix in ("mask_head.", "text_projector.", "sam_refiner.sam.mask_decoder.", "sam_refiner.sam.prompt_encoder."):
        assert any(name.startswith(prefix) for name in changed), f"no {prefix} parameter was updated"


def test_train_mode_keeps_frozen_parts_in_eval(model):
    model.train()
    try:
        assert model.mask_head.training and model.sam_refiner.sam.mask_decoder.training
        assert not any(m.training for m in model.qwen.modules())
        assert not any(m.training for m in model.sam_refiner.sam.vision_encoder.modules())
    finally:
        model.eval()


def test_sam_losses_send_gradient_into_unet_through_dense_prompt(model, photos):
    batch = make_batch(model, photos)
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["loss_sam_bce"] + out["loss_sam_dice"]).backward()  # SAM terms only
    grads = [p.grad for p in model.mask_head.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.zero_grad(set_to_none=True)


def test_segment_returns_masks_at_original_size(model, photos):
    masks = model.segment(photos[0], ["the cup", "the spoon"])
    width, height = photos[0].size
    assert masks.shape == (2, height, width) and masks.dtype == torch.bool
    assert model.segment(photos[1], "the man").shape == (1, photos[1].size[1], photos[1].size[0])


def test_segment_rejects_empty_phrase_and_too_long_input(model, photos):
    with pytest.raises(ValueError, match="phrase 1 is empty"):
        model.segment(photos[0], ["the cup", "  "])
    with pytest.raises(ValueError, match="at least one phrase"):
        model.segment(photos[0], [])
    with pytest.raises(ValueError, match=str(model.max_length)):
        model.segment(photos[0], [f"the object number {i}" for i in range(600)])


def test_save_load_round_trip_gives_identical_masks(tmp_path, photos):
    model = build_model(MODEL_CFG)
    with torch.no_grad():  # move the heads away from their seeded init so the load really matters
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / WEIGHTS_NAME)
    assert set(weights) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert (tmp_path / CONFIG_NAME).is_file()

    loaded = FrozenQwenSAM.from_pretrained(str(tmp_path))
    for name, p in loaded.trainable_state_dict().items():
        assert torch.equal(p, weights[name]), name
    batch = make_batch(model, photos)
    _, expected = model.eval().predict_logits(batch)
    _, found = loaded.eval().predict_logits(batch)
    for a, b in zip(expected, found, strict=True):
        assert torch.equal(a, b)
    phrases = ["the cup", "the saucer"]
    assert torch.equal(model.segment(photos[0], phrases), loaded.segment(photos[0], phrases))


def test_strict_load_rejects_missing_and_unexpected_keys(model):
    state = model.trainable_state_dict()
    name = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unexpected"):
        model.load_trainable_state_dict({**state, "extra.weight": torch.zeros(1)})


def test_parameter_summary_counts_every_part(model):
    summary = model.parameter_summary()
    assert summary["qwen"][0] == 0 and summary["qwen"][1] > 0
    assert summary["sam_image_encoder"][0] == 0
    assert summary["mask_head"][0] > 0 and summary["sam_mask_decoder"][0] > 0
    total_trainable = sum(t for t, _ in summary.values())
    assert total_trainable == sum(p.numel() for p in model.trainable_parameters())
    assert sum(t + f for t, f in summary.values()) == sum(p.numel() for p in model.parameters())


def test_lmm_stage_alone_without_sam(photos):
    """sam=None: LMM + U-Net only; losses are the coarse terms, masks the upsampled coarse logits."""
    from flmm_model.build import build_qwen, load_image_processor, load_tokenizer

    model = FrozenQwenSAM(qwen=build_qwen("tiny"), sam=None, tokenizer=load_tokenizer(),
                          image_processor=load_image_processor(max_pixels=224 * 224))
    assert model.sam_refiner is None and model.text_projector is None
    out = model(make_batch(model, photos))
    assert "loss_sam_bce" not in out
    torch.testing.assert_close(out["loss"], out["loss_mask_bce"] + out["loss_mask_dice"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.mask_head.parameters())
    width, height = photos[0].size
    assert model.segment(photos[0], "the cup").shape == (1, height, width)


class _HostReads(TorchFunctionMode):
    """Records every read of tensor values into Python and every op whose output size depends on tensor values."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                    "masked_select", "unique", "unique_consecutive"):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_training_step_on_a_prepared_batch_reads_nothing_back_from_the_device(model, photos, padding_side):
    """Everything the step needs is built on the host (`prepare_batch`); the forward and backward on the device then
    never wait for it (on a GPU each read would be a host sync)."""
    batch = make_batch(model, photos, padding_side=padding_side)
    prepared = to_device(model.prepare_batch(batch), model.device)
    model.train()
    with _HostReads() as recorder:
        out = model(prepared)
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    assert recorder.reads == []

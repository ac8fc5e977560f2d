"""The attention-only ablation (`model.attention_only`): no SAM, no text prompts, masks from attention maps alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flmm_model.data import Collator, SyntheticDataset
from flmm_model.model import FrozenQwenSAM, build_model

MODEL_CFG = dict(qwen="tiny", sam="tiny", max_pixels=224 * 224, mask_head_widths=[8, 16, 32, 64], seed=0)


@pytest.fixture(scope="module")
def attention_only():
    return build_model(dict(MODEL_CFG, attention_only=True))


def make_batch(model: FrozenQwenSAM) -> dict:
    """Three synthetic scenes of different sizes, with 1 to 4 phrases each, collated."""
    scenes = SyntheticDataset(tokenizer=model.tokenizer, image_processor=model.image_processor, length=3, seed=5)
    return Collator(pad_token_id=model.tokenizer.pad_token_id)([scenes[i] for i in range(3)])


def test_attention_only_model_has_no_sam_and_no_text_projector(attention_only):
    assert attention_only.sam_refiner is None and attention_only.text_projector is None
    names = [name for name, _ in attention_only.named_parameters()]
    assert not [name for name in names if "sam" in name or "text_projector" in name]
    trainable = [name for name, p in attention_only.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("mask_head.") for name in trainable)
    assert set(attention_only.parameter_summary()) == {"qwen", "mask_head"}


def test_attention_only_loss_is_the_coarse_mask_terms(attention_only):
    out = attention_only(make_batch(attention_only))
    assert not any(key.startswith("loss_sam") for key in out)
    torch.testing.assert_close(out["loss"], out["loss_mask_bce"] + out["loss_mask_dice"])


def _perturbed_hidden_states(model: FrozenQwenSAM, monkeypatch) -> None:
    """Make the LMM stage return random hidden states (attention maps untouched)."""
    real = model.lmm.forward_prepared
    generator = torch.Generator().manual_seed(0)

    def noise(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator) * 10

    def forward_prepared(prepared, **options):
        out = real(prepared, **options)
        return dataclasses.replace(
            out, phrase_rows=noise(out.phrase_rows), last_hidden_state=noise(out.last_hidden_state),
            phrase_hidden_states=[[noise(states) for states in sample] for sample in out.phrase_hidden_states])

    monkeypatch.setattr(model.lmm, "forward_prepared", forward_prepared)


def test_attention_only_masks_do_not_depend_on_hidden_states(attention_only, monkeypatch):
    batch = make_batch(attention_only)
    attention_only.eval()
    with torch.no_grad():
        _, before = attention_only.predict_logits(batch)
        _perturbed_hidden_states(attention_only, monkeypatch)
        _, after = attention_only.predict_logits(batch)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_full_model_masks_do_depend_on_hidden_states(monkeypatch):
    # The check above is not vacuous: the same perturbation changes the full model's (SAM-refined) masks.
    full = build_model(MODEL_CFG).eval()
    batch = make_batch(full)
    with torch.no_grad():
        _, before = full.predict_logits(batch)
        _perturbed_hidden_states(full, monkeypatch)
        _, after = full.predict_logits(batch)
    assert any(not torch.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_attention_only_round_trip_holds_the_mask_head_only(attention_only, tmp_path):
    attention_only.save_pretrained(str(tmp_path))
    loaded = FrozenQwenSAM.from_pretrained(str(tmp_path))
    assert loaded.sam_refiner is None
    state = loaded.trainable_state_dict()
    assert set(state) == set(attention_only.trainable_state_dict())
    assert all(name.startswith("mask_head.") for name in state)
    for name, value in attention_only.trainable_state_dict().items():
        assert torch.equal(state[name], value)

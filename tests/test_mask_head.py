"""UNetMaskHead (coarse logits from attention maps) and TextPromptProjector (SAM text prompt tokens)."""

from __future__ import annotations

import pytest
import torch

from flmm_model.modeling.mask_head import UNetMaskHead
from flmm_model.modeling.text_prompt import TextPromptProjector


@pytest.fixture(scope="module")
def head() -> UNetMaskHead:
    # Narrow widths keep the CPU tests fast; the default widths are covered by the two tests below.
    torch.manual_seed(0)
    return UNetMaskHead(in_channels=8, widths=(8, 16, 32, 64)).eval()


def test_square_grid_gives_64x64_logits_at_default_widths():
    head = UNetMaskHead(in_channels=8)
    assert head(torch.rand(2, 8, 8, 8)).shape == (2, 64, 64)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [((6, 9), (43, 64)), ((9, 6), (64, 43)), ((5, 7), (46, 64)), ((16, 12), (64, 48))],
)
def test_non_square_grid_keeps_aspect_with_longest_side_64(head, grid, expected):
    attn_maps = torch.rand(3, 8, *grid)
    logits = head(attn_maps)
    assert logits.shape == (3, *expected)
    assert head.output_size(*grid) == expected
    assert torch.isfinite(logits).all()


def test_upsample_size_is_configurable():
    head = UNetMaskHead(in_channels=4, widths=(8, 16, 32, 64), upsample_size=32)
    assert head(torch.rand(1, 4, 6, 9)).shape == (1, 21, 32)


def test_param_count_at_576_channels_is_7_to_8_million():
    head = UNetMaskHead(in_channels=576)
    num_params = sum(p.numel() for p in head.parameters())
    assert 7_000_000 <= num_params <= 8_000_000, num_params


def test_scaling_a_channel_does_not_change_logits(head):
    torch.manual_seed(1)
    attn_maps = torch.rand(2, 8, 6, 9)
    scaled = attn_maps.clone()
    scaled[:, 3] *= 37.0
    scaled[1, 5] *= 0.01
    torch.testing.assert_close(head(scaled), head(attn_maps), rtol=1e-4, atol=1e-5)


def test_all_zero_channel_gives_finite_logits(head):
    attn_maps = torch.rand(1, 8, 6, 9)
    attn_maps[:, 2] = 0.0
    assert torch.isfinite(head(attn_maps)).all()


def test_zero_objects_give_empty_logits(head):
    assert head(torch.rand(0, 8, 6, 9)).shape == (0, 43, 64)


def test_bf16_attention_maps_are_accepted(head):
    logits = head(torch.rand(1, 8, 6, 9).to(torch.bfloat16))
    assert logits.dtype == torch.float32 and logits.shape == (1, 43, 64)


def test_wrong_channel_count_raises(head):
    with pytest.raises(ValueError, match=r"\(K, 8, h, w\)"):
        head(torch.rand(1, 7, 6, 9))


def test_gradient_reaches_first_conv():
    torch.manual_seed(0)
    head = UNetMaskHead(in_channels=4, widths=(8, 16, 32, 64))
    head(torch.rand(2, 4, 6, 9)).square().sum().backward()
    assert head.stem.block[0].weight.grad.abs().sum() > 0


def test_text_projector_layer_weights_equal_at_init():
    projector = TextPromptProjector(num_layers=5, hidden_size=16, prompt_dim=8)
    torch.testing.assert_close(projector.layer_weights, torch.full((5,), 0.2))


def test_text_projector_gives_one_prompt_token_per_phrase_token():
    projector = TextPromptProjector(num_layers=3, hidden_size=16, prompt_dim=8)
    phrase_hidden = torch.randn(3, 4, 16, dtype=torch.bfloat16)  # (num_layers, T, D), another dtype than params
    prompts = projector(phrase_hidden)
    assert prompts.shape == (4, 8) and prompts.dtype == torch.float32


def test_text_projector_mixes_layers_by_softmax_weights():
    torch.manual_seed(0)
    projector = TextPromptProjector(num_layers=3, hidden_size=16, prompt_dim=8)
    phrase_hidden = torch.randn(3, 2, 16)
    # Equal weights at init: the mean over layers.
    torch.testing.assert_close(projector(phrase_hidden), projector.proj(phrase_hidden.mean(dim=0)))
    # A dominant logit selects one layer.
    with torch.no_grad():
        projector.layer_logits.copy_(torch.tensor([0.0, 50.0, 0.0]))
    torch.testing.assert_close(projector(phrase_hidden), projector.proj(phrase_hidden[1]))


def test_text_projector_rejects_wrong_layer_count():
    projector = TextPromptProjector(num_layers=3, hidden_size=16, prompt_dim=8)
    with pytest.raises(ValueError, match=r"\(3, T, 16\)"):
        projector(torch.randn(4, 2, 16))


def test_cpu_channels_last_forward_equals_the_layers_run_in_contiguous_layout():
    """On the CPU the head runs its convolutions channels-last (faster in oneDNN); the logits and the gradients equal
    the same layers composed by hand on contiguous tensors."""
    torch.manual_seed(0)
    head = UNetMaskHead(in_channels=8, widths=(8, 16, 32, 64))
    maps = torch.rand(3, 8, 6, 9)

    def reference(attn_maps: torch.Tensor) -> torch.Tensor:
        normalized = attn_maps / (attn_maps.sum(dim=(2, 3), keepdim=True) + 1e-6)
        grid = torch.nn.functional.interpolate(normalized, size=(43, 64), mode="bilinear", align_corners=False)
        features = head.stem(torch.nn.functional.pad(grid, (0, 0, 0, 5)).contiguous())  # 43 -> 48 rows
        assert features.is_contiguous()
        skips = []
        for stage in head.down_stages:
            skips.append(features)
            features = stage(torch.nn.functional.max_pool2d(features, kernel_size=2))
        for stage in head.up_stages:
            features = stage(features, skips.pop())
        return head.out_conv(features)[:, 0, :43, :64]

    logits = head(maps)
    expected = reference(maps)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(logits.square().sum(), list(head.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(head.parameters()))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):  # float32 sums in another order
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3 * float(expected_grad.abs().max()))

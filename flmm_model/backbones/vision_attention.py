"""Vision-tower attention with a constant number of attention calls per layer, whatever the number of windows and
images, and no host sync: registered with transformers' `AttentionInterface` as the text capture is.

Why: the Qwen-VL vision towers attend within segments of a packed sequence (each image; in Qwen2.5-VL's window
blocks each 112-pixel window), described by `cu_seqlens`. Unless the attention implementation's name contains
"flash", transformers splits the sequence with `cu_seqlens.tolist()` (a host sync per layer) and makes one SDPA
call per segment: 36 windows x 8 images = 288 calls per window block of Qwen2.5-VL-3B at 672 x 672. A name with
"flash" (`VISION_ATTENTION`) gets the packed call instead: one call per layer with `cu_seq_lens_q` and
`max_length_q`, which `packed_attention` serves
- on CUDA in bf16 / fp16: with `torch.nn.attention.varlen.varlen_attn` (flash attention over the packed sequence);
- elsewhere: with one batched SDPA call over the segments padded to the longest one, padded keys masked out; the
  padded layout (`PackedLayout`) is built once per forward from `cu_seqlens` on the host (`VisionPlan`, passed down
  as the `flmm_vision_plan` keyword like the text capture's `flmm_capture`), or from the device tensor itself
  without a sync when no plan comes (e.g. a plain `get_image_features` call).

The vision towers hand every attention call q / k / v of shape (1, heads, T, d) (T = patches of all images, after
the rotary embedding) and expect (1, T, heads, d) back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # torch >= 2.9; the CUDA flash kernel over packed sequences
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

# The name must contain "flash": transformers' vision attention gives only such implementations the packed call.
VISION_ATTENTION = "flmm_packed_flash"


@dataclass
class PackedLayout:
    """Where each token of a packed sequence goes when its W segments are padded to the longest one (M tokens).

    Attributes:
        cu_seqlens: (W + 1,) int32, the segment boundaries this layout was built from.
        max_length: M, the longest segment.
        gather: (W * M,) long, the token at each padded slot (row-major over (segment, slot); padding repeats a token).
        key_valid: (W, M) bool, True on real slots.
        token_segment: (T,) long, the segment of each token. token_slot: (T,) long, its slot in the segment.
    """

    cu_seqlens: torch.Tensor
    max_length: int
    gather: torch.Tensor
    key_valid: torch.Tensor
    token_segment: torch.Tensor
    token_slot: torch.Tensor

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_length: int, num_tokens: int) -> PackedLayout:
        """The layout of `cu_seqlens` for T = `num_tokens` tokens (any device; vectorized, no host sync)."""
        device = cu_seqlens.device
        starts = cu_seqlens[:-1].long()  # (W,)
        lengths = cu_seqlens[1:].long() - starts  # (W,)
        slots = torch.arange(max_length, device=device)  # (M,)
        key_valid = slots[None, :] < lengths[:, None]  # (W, M)
        gather = starts[:, None] + torch.where(key_valid, slots[None, :], 0)  # (W, M): padding repeats a real token
        tokens = torch.arange(num_tokens, device=device)  # (T,)
        token_segment = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)  # (T,)
        token_slot = tokens - starts[token_segment]
        return cls(cu_seqlens, max_length, gather.flatten(), key_valid, token_segment, token_slot)


@dataclass
class VisionPlan:
    """The padded layouts of one vision forward, one per segmentation the tower uses (Qwen2.5-VL: the images and the
    windows; Qwen2-VL and Qwen3-VL: the images).

    A layout is found by its number of segments and longest segment: two segmentations of the same patches into
    images (each image split into one or more windows) with equally many segments are the same segmentation.
    """

    layouts: list[PackedLayout] = field(default_factory=list)

    @classmethod
    def build(cls, segmentations: list[tuple[torch.Tensor, int]], num_tokens: int) -> VisionPlan:
        """From (cu_seqlens, max_length) pairs of the T = `num_tokens` patches (on the host, before the forward)."""
        return cls([PackedLayout.build(cu_seqlens, max_length, num_tokens) for cu_seqlens, max_length in segmentations])

    def layout_for(self, cu_seqlens: torch.Tensor, max_length: int, num_tokens: int) -> PackedLayout:
        for layout in self.layouts:
            if layout.cu_seqlens.shape == cu_seqlens.shape and layout.max_length == max_length:
                return layout
        layout = PackedLayout.build(cu_seqlens, max_length, num_tokens)
        self.layouts.append(layout)  # the next layers with the same segments reuse it
        return layout


def padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                     scaling: float) -> torch.Tensor:
    """Attention within segments by one SDPA call over the padded segments.

    Args:
        query, key, value: (T, heads, d) packed.

    Returns:
        (T, heads, d).
    """
    num_segments, max_length = layout.key_valid.shape
    heads, head_dim = query.shape[1:]

    def pad(states: torch.Tensor) -> torch.Tensor:  # (T, heads, d) -> (W, heads, M, d)
        return states.index_select(0, layout.gather).view(num_segments, max_length, heads, head_dim).transpose(1, 2)

    mask = layout.key_valid[:, None, None, :]  # (W, 1, 1, M): every query row sees only its segment's real keys
    output = F.scaled_dot_product_attention(pad(query), pad(key), pad(value), attn_mask=mask, scale=scaling)
    return output.transpose(1, 2)[layout.token_segment, layout.token_slot]  # (W, M, heads, d) -> (T, heads, d)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The vision towers' attention over a packed sequence (see the module docstring): (1, heads, T, d) q / k / v
    with `cu_seq_lens_q` and `max_length_q` -> (1, T, heads, d), None."""
    plan: VisionPlan | None = kwargs.get("flmm_vision_plan")
    cu_seqlens, max_length = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # (1, heads, T, d) -> (T, heads, d)
    query, key, value = (states[0].transpose(0, 1) for states in (query, key, value))
    if (varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and abs(scale - query.shape[-1] ** -0.5) < 1e-12):  # varlen_attn's default scale (older torch has no arg)
        output = varlen_attn(query.contiguous(), key.contiguous(), value.contiguous(), cu_seqlens, cu_seqlens,
                             max_length, max_length)
    else:
        layout = (plan or VisionPlan()).layout_for(cu_seqlens, max_length, query.shape[0])
        output = padded_attention(query, key, value, layout, scale)
    return output.unsqueeze(0), None  # (1, T, heads, d)


def register_vision_attention() -> None:
    """Register `VISION_ATTENTION` with transformers. Idempotent."""
    ALL_ATTENTION_FUNCTIONS.register(VISION_ATTENTION, packed_attention)


def use_packed_vision_attention(model: Any) -> None:
    """Route a Qwen-VL model's vision tower through `packed_attention` (the text decoder is left alone)."""
    register_vision_attention()
    model.config.vision_config._attn_implementation = VISION_ATTENTION

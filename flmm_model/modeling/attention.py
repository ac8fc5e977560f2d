"""Text-to-image attention capture for the frozen Qwen-VL text decoder (every family in `flmm_model.backbones`).

F-LMM reads, for every object k, the post-softmax attention weights from k's phrase tokens to the image tokens,
in every layer and head. Running the model with eager attention and `output_attentions=True` keeps every layer's
full (heads, L, L) map until the forward ends: gigabytes per sample at real sizes. Here the capture happens inside
the attention call, layer by layer, through two functions registered with transformers' `AttentionInterface`:

- `flmm_sdpa` (default): the layer output comes from `scaled_dot_product_attention` (flash / memory-efficient
  kernels on GPU); the weights are recomputed as softmax(q k^T * scale + mask) for the phrase-token query rows
  only: a (B, heads, P, L) tensor per layer instead of (B, heads, L, L).
- `flmm_eager`: the F-LMM reference. Eager attention computes the full weights of the layer, which give both the
  output and the captured rows; the full map is freed when the layer ends.

Both read a `CaptureState` passed as the `flmm_capture` keyword of the text model's forward (transformers hands
unknown keywords down to every attention call). Without it they behave exactly like plain sdpa / eager attention.

The three families call the attention function the same way: `(module, query, key, value, attention_mask,
dropout=..., scaling=..., **kwargs)` with query (B, heads, L, d) and key / value (B, kv_heads, L, d) after RoPE
(Qwen3-VL applies its q/k RMS norms before RoPE, so the capture sees exactly the q/k its softmax uses). Qwen2-VL
also passes `sliding_window` and `position_ids`; they stay in `kwargs`. Qwen3.5's full-attention layers call it the
same way (their sigmoid output gate multiplies the attention output afterwards, so the captured weights are the
layer's softmax); its linear-attention layers never call it, so a forward captures one map per full layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_IMPLEMENTATIONS = {"sdpa": "flmm_sdpa", "eager": "flmm_eager"}


@dataclass
class PhraseQueries:
    """Which query rows and key columns to capture, padded to rectangular per-batch tensors.

    Attributes:
        query_index: (B, P) long, positions of phrase tokens (P = most phrase tokens in a sample; padded with 0).
        query_valid: (B, P) bool, False on padded entries.
        object_pool: (B, K, P) float, row k averages the tokens of object k (1 / num_tokens on k's tokens, else 0).
        image_index: (B, N) long, positions of the image tokens in order (N = most image tokens; padded with 0).
        key_valid: (B, L) bool, the attention mask of the expanded sequence (padding keys are never attended).
        key_allowed: (B, P, L) bool, the keys each phrase slot attends: causal (key position <= query position)
            and not padding. Built once, used by every layer.
    """

    query_index: torch.Tensor
    query_valid: torch.Tensor
    object_pool: torch.Tensor
    image_index: torch.Tensor
    key_valid: torch.Tensor
    key_allowed: torch.Tensor

    @classmethod
    def build(
        cls, *, mask_ids: torch.Tensor, image_mask: torch.Tensor, attention_mask: torch.Tensor, num_objects: int
    ) -> PhraseQueries:
        """Gather indices from expanded `mask_ids` (B, L), `image_mask` (B, L) bool and `attention_mask` (B, L)."""
        query_index, query_valid = _first_true_positions(mask_ids >= 0)  # (B, P) each
        image_index, _ = _first_true_positions(image_mask)  # (B, N)
        query_object = mask_ids.gather(1, query_index)  # (B, P), object id of each phrase token (junk where padded)
        one_hot = (query_object.unsqueeze(1) == torch.arange(num_objects, device=mask_ids.device)[None, :, None])
        one_hot = (one_hot & query_valid.unsqueeze(1)).float()  # (B, K, P)
        object_pool = one_hot / one_hot.sum(-1, keepdim=True).clamp(min=1.0)
        key_valid = attention_mask.bool()
        positions = torch.arange(mask_ids.shape[1], device=mask_ids.device)
        key_allowed = (positions[None, None, :] <= query_index[:, :, None]) & key_valid[:, None, :]  # (B, P, L)
        return cls(query_index, query_valid, object_pool, image_index, key_valid, key_allowed)


@dataclass
class CaptureState:
    """Per-forward capture buffer: `PhraseQueries` in, one (B, K, heads, N) map per layer out (in layer order)."""

    queries: PhraseQueries
    layer_maps: list[torch.Tensor] = field(default_factory=list)

    def add_rows(self, weight_rows: torch.Tensor) -> None:
        """Pool post-softmax weights of the phrase rows, (B, heads, P, L), into per-object float32 image maps."""
        queries = self.queries
        batch, heads, num_queries, _ = weight_rows.shape
        image_index = queries.image_index[:, None, None, :].expand(batch, heads, num_queries, -1)
        image_weights = weight_rows.gather(3, image_index)  # (B, heads, P, N)
        with torch.autocast(weight_rows.device.type, enabled=False):  # fp32 even inside a training autocast
            maps = torch.einsum("bkp,bhpn->bkhn", queries.object_pool, image_weights.float())  # (B, K, heads, N)
        self.layer_maps.append(maps)

    def stacked(self) -> torch.Tensor:
        """(B, K, layers * heads, N) with channel = layer * heads + head (layer: the rank among the captured layers)."""
        maps = torch.stack(self.layer_maps, dim=2)  # (B, K, layers, heads, N)
        return maps.flatten(2, 3)


def _first_true_positions(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of True entries per row, left-aligned: flags (B, L) bool -> index (B, M) long, valid (B, M) bool.

    A stable sort puts each row's True positions first in order; M is the largest count of a row (at least 1).
    """
    counts = flags.sum(1)  # (B,)
    width = max(int(counts.max()), 1) if flags.numel() else 1
    order = torch.sort(flags.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]  # (B, M)
    valid = torch.arange(width, device=flags.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _phrase_weight_rows(
    query: torch.Tensor, key: torch.Tensor, scaling: float, queries: PhraseQueries
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) for the phrase rows only, in fp32: (B, heads, P, L).

    query (B, heads, L, d) and key (B, kv_heads, L, d) are after RoPE. The rows are computed per key-value head group
    (query heads h*rep .. (h+1)*rep - 1 share kv head h), so K is never repeated over the heads; only K itself is
    cast to fp32. The mask is `queries.key_allowed` (causal + padding). Autocast is switched off here, so the scores
    stay fp32 when the forward runs under a bf16 training autocast.
    """
    batch, heads, _, head_dim = query.shape
    num_kv_heads, length = key.shape[1], key.shape[2]
    num_queries = queries.query_index.shape[1]
    row_index = queries.query_index[:, None, :, None].expand(batch, heads, -1, head_dim)
    with torch.autocast(query.device.type, enabled=False):
        query_rows = query.gather(2, row_index).float()  # (B, heads, P, d)
        query_rows = query_rows.view(batch, num_kv_heads, heads // num_kv_heads * num_queries, head_dim)
        scores = torch.matmul(query_rows, key.float().transpose(2, 3)) * scaling  # (B, kv_heads, rep * P, L)
        scores = scores.view(batch, heads, num_queries, length)  # (B, heads, P, L)
        scores = torch.where(queries.key_allowed[:, None], scores, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


def eager_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, *, scaling: float, dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with its full weights: softmax(q k^T * scale + mask) in fp32, cast back, times v.

    The computation that each family's modeling file defines as its own `eager_attention_forward` (the same in
    qwen2_vl, qwen2_5_vl and qwen3_vl), written once here so the capture is not tied to one family's module.

    Args:
        query: (B, heads, L, d). key, value: (B, kv_heads, L, d); kv head h serves query heads h*rep..(h+1)*rep-1.
        attention_mask: (B, 1, L, L) additive float mask (0 or the dtype's min), or None.

    Returns:
        output (B, L, heads, d) and weights (B, heads, L, L) post-softmax in the query dtype.
    """
    repeats = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(repeats, dim=1)  # (B, heads, L, d)
    value = value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, heads, L, L)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, L, heads, d)
    return output, weights


def capture_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for the layer output; phrase-row weights recomputed for the capture (see module docstring)."""
    capture: CaptureState | None = kwargs.pop("flmm_capture", None)
    output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    if capture is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        capture.add_rows(_phrase_weight_rows(query, key, scale, capture.queries))
    return output, None


def capture_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (full weights of this layer, F-LMM style); the phrase rows are pooled, the rest is freed."""
    capture: CaptureState | None = kwargs.pop("flmm_capture", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output, weights = eager_attention(module, query, key, value, attention_mask, scaling=scale, dropout=dropout)
    if capture is not None:
        batch, heads, num_queries = weights.shape[0], weights.shape[1], capture.queries.query_index.shape[1]
        row_index = capture.queries.query_index[:, None, :, None].expand(batch, heads, num_queries, weights.shape[-1])
        capture.add_rows(weights.gather(2, row_index))  # (B, heads, P, L)
    return output, None


def register_capture_attention() -> None:
    """Register `flmm_sdpa` / `flmm_eager` (and their mask builders) with transformers. Idempotent."""
    ALL_ATTENTION_FUNCTIONS.register("flmm_sdpa", capture_sdpa_attention)
    ALL_ATTENTION_FUNCTIONS.register("flmm_eager", capture_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("flmm_sdpa", sdpa_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register("flmm_eager", eager_mask)

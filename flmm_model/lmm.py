"""The frozen LMM stage: compact `input_ids` -> expanded inputs -> one teacher-forced forward -> captures.

Works for every supported Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): what differs between them (vision
forward, decoder call, positions, patch size) comes from the model's backbone adapter (`flmm_model.backbones`),
chosen from `config.model_type`.

Data pipelines tokenize the chat text with ONE `<|image_pad|>` per image (what the chat template emits). Qwen needs
N = t * H * W / merge^2 pads per image, N depending on the image size. `FrozenQwenLMM` expands ids, attention mask
and `mask_ids` itself, on the model's device, with vectorized tensor ops, then builds the 3-D M-RoPE positions and
runs the text decoder on `inputs_embeds`. Pre-expanded input (N pads already there, as the HF processor makes it)
passes through unchanged, so both give identical results.

Shapes: B samples, L compact length, L' expanded length, D hidden size, K objects, P phrase tokens, N image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flmm_model.attention import CAPTURE_IMPLEMENTATIONS, CaptureState, PhraseQueries, register_capture_attention
from flmm_model.backbones import QwenVLModel, adapter_for
from flmm_model.backbones.vision_attention import use_packed_vision_attention
from flmm_model.device import move_to


@dataclass
class LMMOutput:
    """What the frozen LMM forward gives the mask decoders. All tensors are detached (the LMM runs under no_grad).

    Attributes:
        input_ids: (B, L') expanded ids.
        attention_mask: (B, L') long, 1 on real tokens.
        mask_ids: (B, L') long, object index k on phrase k's tokens, -1 elsewhere (image tokens included).
        position_ids: (3, B, L') long M-RoPE positions (rows t, h, w); 0 on padding.
        last_hidden_state: (B, L', D) after the final norm, as the family's `...VLModel(...).last_hidden_state`.
        attention_maps: per sample, float32 (K_b, num_layers * num_heads, h_b, w_b): post-softmax weights from
            object k's tokens to the image tokens, averaged over k's tokens; channel = layer * num_heads + head;
            image tokens row-major on the merged grid (h_b = H / merge, w_b = W / merge).
        phrase_hidden_states: per sample, per object, (num_layers, T_k, D): the hidden states of k's T_k tokens
            after every decoder layer (as `output_hidden_states[1:]`: the last one after the final norm).
        grid_hw: per sample, the merged image grid (h_b, w_b).
        phrase_rows: (num_layers, B, P, D), the same hidden states for every phrase-token slot of the batch at once
            (slot p of sample b is token `queries.query_index[b, p]`; padded slots hold junk).
        queries: the `PhraseQueries` of the batch (slots, objects, image tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_ids: torch.Tensor
    position_ids: torch.Tensor
    last_hidden_state: torch.Tensor
    attention_maps: list[torch.Tensor]
    phrase_hidden_states: list[list[torch.Tensor]]
    grid_hw: list[tuple[int, int]]
    phrase_rows: torch.Tensor | None = None
    queries: PhraseQueries | None = None


@dataclass
class PreparedLMMInputs:
    """The LMM stage's inputs after validation, vision-token expansion and indexing, built on the host from the
    compact CPU batch by `FrozenQwenLMM.prepare` and moved to the device in one go (`to`): the forward then reads no
    value back from the device.

    Attributes:
        input_ids, attention_mask, mask_ids: (B, L') expanded, as in `LMMOutput`.
        image_mask: (B, L') bool, True on the image tokens of real positions.
        image_positions: (sum_b N_b,) long, flat (b * L' + position) index of every image token, in feature order.
        position_ids: (3, B, L') long M-RoPE positions.
        pixel_values, image_grid_thw: as given (pixel rows of all images; (B, 3) grid).
        queries: `PhraseQueries` (phrase slots, object pooling, image tokens, causal + padding key mask).
        vision_inputs: the vision tower's precomputed keyword inputs (`BackboneAdapter.vision_inputs`).
        num_vision_tokens, num_objects: per sample N_b and K_b. grid_hw: per sample merged grid (h_b, w_b).
        object_slots: per sample, per object, its phrase slots: a `slice` when they are consecutive (the usual
            case), else a (T_k,) long tensor.
        has_padding: whether any sample is padded (without padding the decoder runs plain causal attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_ids: torch.Tensor
    image_mask: torch.Tensor
    image_positions: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    queries: PhraseQueries
    vision_inputs: dict[str, Any]
    num_vision_tokens: list[int]
    num_objects: list[int]
    grid_hw: list[tuple[int, int]]
    object_slots: list[list[slice | torch.Tensor]]
    has_padding: bool = True

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PreparedLMMInputs:
        """Every tensor moved to `device` (`non_blocking` from pinned memory: no host wait)."""
        return move_to(self, device, non_blocking=non_blocking)


class FrozenQwenLMM(nn.Module):
    """A frozen Qwen-VL (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) that takes compact ids and returns `LMMOutput`.

    Frozen three ways: no parameter requires grad, `train()` keeps it in eval, and the forward runs under no_grad.

    Args:
        qwen: a `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or
            `Qwen3VLForConditionalGeneration` (any dtype / device; weights untouched).
        attn_capture: "sdpa" (default: SDPA forward, phrase rows recomputed) or "eager" (F-LMM reference).

    Raises:
        ValueError: an unknown `attn_capture`, or a model of an unsupported family.
    """

    def __init__(self, *, qwen: QwenVLModel, attn_capture: str = "sdpa") -> None:
        super().__init__()
        if attn_capture not in CAPTURE_IMPLEMENTATIONS:
            raise ValueError(f"attn_capture: expected one of {sorted(CAPTURE_IMPLEMENTATIONS)}, found {attn_capture!r}")
        self.adapter = adapter_for(qwen)  # everything family-specific: vision forward, decoder call, positions
        register_capture_attention()
        self.qwen = qwen.requires_grad_(False).eval()
        self.attn_capture = attn_capture
        config = qwen.config
        self.image_token_id = config.image_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        vision = config.vision_config
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2  # 1176 or 1536
        self.num_layers = config.text_config.num_hidden_layers
        self.num_heads = config.text_config.num_attention_heads
        self.hidden_size = config.text_config.hidden_size
        # The text decoder dispatches on this name (the vision tower keeps its own implementation).
        config.text_config._attn_implementation = CAPTURE_IMPLEMENTATIONS[attn_capture]
        # The vision tower: one attention call per layer over all windows and images (`vision_attention.py`).
        use_packed_vision_attention(qwen)

    @property
    def num_attention_channels(self) -> int:
        """Channels of an attention map: num_layers * num_heads (576 for the 3B, 784 for the 7B)."""
        return self.num_layers * self.num_heads

    def train(self, mode: bool = True) -> FrozenQwenLMM:
        super().train(mode)
        self.qwen.eval()  # frozen: dropout and friends stay off
        return self

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mask_ids: torch.Tensor,
    ) -> LMMOutput:
        """Expand, position, run the frozen model once and capture attention maps and phrase hidden states.

        `prepare` on the host, then `forward_prepared` on the model's device. Inputs already on the device are read
        back first (host syncs): a training step prepares its CPU batch itself and calls `forward_prepared`.

        Args:
            input_ids: (B, L) long, compact (one `<|image_pad|>` per sample) or pre-expanded (N_b pads).
            attention_mask: (B, L), 1 on real tokens, a contiguous block (left or right padding).
            pixel_values: (sum_b t*H*W, 3 * temporal_patch * patch^2) from the family's image processor.
            image_grid_thw: (B, 3) long, (t, H, W) in patches, one image per sample in sample order.
            mask_ids: (B, L) long, k >= 0 on the tokens of the sample's k-th phrase, -1 elsewhere.

        Raises:
            ValueError: on inconsistent input (see `validate_lmm_inputs`), before the model runs.
        """
        host = [t.cpu() for t in (input_ids, attention_mask, image_grid_thw, mask_ids)]
        prepared = self.prepare(host[0], host[1], pixel_values, host[2], host[3])
        return self.forward_prepared(prepared.to(self.qwen.device))

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mask_ids: torch.Tensor,
    ) -> PreparedLMMInputs:
        """Validate the compact batch and build every index the forward needs, on the host (CPU tensors, arguments
        as in `forward`): the values are read here, where reading them costs no device sync.

        Raises:
            ValueError: on inconsistent input (see `validate_lmm_inputs`).
        """
        num_vision_tokens, num_objects = validate_lmm_inputs(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mask_ids=mask_ids, merge_size=self.merge_size,
            image_token_id=self.image_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, patch_dim=self.patch_dim,
        )
        input_ids, attention_mask, mask_ids = expand_vision_tokens(
            input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids,
            num_vision_tokens=num_vision_tokens, image_token_id=self.image_token_id,
        )
        image_mask = (input_ids == self.image_token_id) & attention_mask.bool()  # (B, L')
        grid_hw = (image_grid_thw[:, 1:] // self.merge_size).tolist()
        position_ids = self.adapter.position_ids(
            image_mask=image_mask, attention_mask=attention_mask, grid_thw=image_grid_thw, merge_size=self.merge_size
        )
        queries = PhraseQueries.build(
            mask_ids=mask_ids, image_mask=image_mask, attention_mask=attention_mask, num_objects=max(num_objects)
        )
        return PreparedLMMInputs(
            input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, image_mask=image_mask,
            image_positions=image_mask.flatten().nonzero().flatten(), position_ids=position_ids,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, queries=queries,
            vision_inputs=self.adapter.vision_inputs(self.qwen.config.vision_config, image_grid_thw),
            num_vision_tokens=num_vision_tokens, num_objects=num_objects, grid_hw=[tuple(hw) for hw in grid_hw],
            object_slots=_object_slots(queries, num_objects), has_padding=not bool(attention_mask.all()),
        )

    @torch.no_grad()
    def forward_prepared(self, prepared: PreparedLMMInputs) -> LMMOutput:
        """The device part of `forward`, on inputs from `prepare` moved to the model's device: no host sync."""
        input_ids, attention_mask, image_mask = prepared.input_ids, prepared.attention_mask, prepared.image_mask
        queries = prepared.queries

        # Embeddings with the image features copied in, in (sample, position) order.
        inputs_embeds = self.qwen.model.get_input_embeddings()(input_ids)  # (B, L', D)
        vision = self.adapter.encode_images(self.qwen, prepared.pixel_values, prepared.image_grid_thw,
                                            prepared.vision_inputs)
        image_features = vision.image_embeds.to(inputs_embeds.dtype)  # (sum_b N_b, D)
        inputs_embeds = inputs_embeds.flatten(0, 1).index_copy(0, prepared.image_positions, image_features)
        inputs_embeds = inputs_embeds.view(*input_ids.shape, -1)  # (B * L', D) -> (B, L', D)

        capture = CaptureState(queries=queries)
        layer_rows: list[torch.Tensor] = []  # per layer (B, P, D): phrase-token hidden states
        row_index = queries.query_index.unsqueeze(-1).expand(-1, -1, inputs_embeds.shape[-1])  # (B, P, D)

        def keep_phrase_rows(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            layer_rows.append(hidden.gather(1, row_index))

        text_model = self.qwen.model.language_model
        hooks = [layer.register_forward_hook(keep_phrase_rows) for layer in text_model.layers[:-1]]
        try:
            # Attention capture: every text attention layer looks up `config.text_config._attn_implementation`
            # ("flmm_sdpa" / "flmm_eager", set in __init__) in transformers' ALL_ATTENTION_FUNCTIONS, where
            # `register_capture_attention` put `attention.capture_sdpa_attention` / `attention.capture_eager_attention`.
            # The adapter's decoder call passes `flmm_capture=capture` on to the text model, which hands unknown
            # keywords down to every attention call: the capture functions pop it from their `**kwargs`.
            decoder_mask = None  # no padding: transformers runs plain causal attention (flash on GPU)
            if prepared.has_padding:
                decoder_mask = _decoder_mask(attention_mask, additive=self.attn_capture == "eager",
                                             dtype=inputs_embeds.dtype)
            last_hidden_state = self.adapter.run_decoder(
                text_model, inputs_embeds=inputs_embeds, attention_mask=decoder_mask,
                position_ids=prepared.position_ids, image_mask=image_mask, vision=vision, flmm_capture=capture,
            )  # (B, L', D)
        finally:
            for hook in hooks:
                hook.remove()
        layer_rows.append(last_hidden_state.gather(1, row_index))  # the last layer after the final norm
        phrase_rows = torch.stack(layer_rows)  # (layers, B, P, D)

        return LMMOutput(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mask_ids=prepared.mask_ids,
            position_ids=prepared.position_ids,
            last_hidden_state=last_hidden_state,
            attention_maps=_split_maps(capture.stacked(), prepared.num_objects, prepared.num_vision_tokens,
                                       prepared.grid_hw),
            phrase_hidden_states=_split_phrase_states(phrase_rows, prepared.object_slots),
            grid_hw=list(prepared.grid_hw),
            phrase_rows=phrase_rows,
            queries=queries,
        )


def validate_lmm_inputs(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    mask_ids: torch.Tensor,
    merge_size: int,
    image_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    patch_dim: int | None = None,
) -> tuple[list[int], list[int]]:
    """Check a batch before the model runs; return (N_b vision tokens, K_b objects) per sample.

    A handful of per-sample scalars come to the host (counts, never per-token loops).

    Raises:
        ValueError: naming the sample, the expected and the found value.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, L), found {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("mask_ids", mask_ids)):
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"found {tuple(tensor.shape)}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape != (batch, 3):
        raise ValueError(f"image_grid_thw: expected one (t, H, W) row per sample, shape ({batch}, 3), "
                         f"found {tuple(image_grid_thw.shape)}")
    grids = image_grid_thw.tolist()
    for b, (t, h, w) in enumerate(grids):
        if t != 1:
            raise ValueError(f"sample {b}: image_grid_thw t = {t}, expected 1 (still images)")
        if h % merge_size or w % merge_size:
            raise ValueError(f"sample {b}: image_grid_thw (H, W) = ({h}, {w}) must be divisible by the spatial "
                             f"merge size {merge_size}")
    expected_rows = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or pixel_values.shape[0] != expected_rows:
        raise ValueError(f"pixel_values: expected {expected_rows} rows (sum of t*H*W over image_grid_thw), "
                         f"found shape {tuple(pixel_values.shape)}")
    if patch_dim is not None and pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values: expected {patch_dim} values per patch (3 * temporal_patch_size * "
                         f"patch_size^2, from this backbone's image processor), found {pixel_values.shape[1]}")
    num_vision_tokens = [t * h * w // merge_size**2 for t, h, w in grids]

    valid = attention_mask.bool()
    lengths = valid.sum(1)
    columns = torch.arange(valid.shape[1], device=valid.device)
    first_valid = torch.where(valid, columns, valid.shape[1]).amin(1)
    last_valid = torch.where(valid, columns, -1).amax(1)
    span_ok = last_valid - first_valid + 1 == lengths  # real tokens form one block: no holes
    counts = torch.stack([
        (input_ids.eq(image_token_id) & valid).sum(1),
        (input_ids.eq(vision_start_token_id) & valid).sum(1),
        (input_ids.eq(vision_end_token_id) & valid).sum(1),
        (mask_ids.ge(0) & ~valid).sum(1),  # phrase tokens on padding
        (mask_ids.ge(0) & input_ids.eq(image_token_id)).sum(1),  # phrase tokens on image pads
        (mask_ids < -1).sum(1),
        mask_ids.amax(1) + 1,  # K_b
        lengths,
        first_valid,
        span_ok.long(),
    ], dim=1).tolist()  # one host transfer for the whole batch
    num_objects = []
    for b, (pads, starts, ends, on_padding, on_image, below, objects, length, first, span) in enumerate(counts):
        n = num_vision_tokens[b]
        if not span or length == 0:
            raise ValueError(f"sample {b}: attention_mask must be one contiguous block of 1s (left or right padding)")
        if starts > 1 or ends > 1:
            raise ValueError(f"sample {b}: expected exactly one image placeholder block "
                             f"(<|vision_start|><|image_pad|><|vision_end|>), found {starts} vision starts and "
                             f"{ends} vision ends; one image per sample is supported")
        if pads == 0:
            raise ValueError(f"sample {b}: no <|image_pad|> placeholder (id {image_token_id}) found, expected 1 "
                             f"(compact) or {n} (expanded for image_grid_thw {tuple(grids[b])})")
        row = input_ids[b, first:first + length]
        pad_positions = row.eq(image_token_id).nonzero().flatten()
        start = int(pad_positions[0]) - 1
        end = int(pad_positions[-1]) + 1
        if end >= length or int(row[end]) != vision_end_token_id:
            raise ValueError(f"sample {b}: the sequence ends inside the vision block (<|vision_end|> missing after "
                             f"the image pads): was it truncated by max_length?")
        if start < 0 or int(row[start]) != vision_start_token_id or end - start - 1 != pads:
            raise ValueError(f"sample {b}: image pads must sit in one run between <|vision_start|> and "
                             f"<|vision_end|>, as the chat template emits")
        if pads not in (1, n):
            raise ValueError(f"sample {b}: found {pads} <|image_pad|> tokens, expected 1 (compact) or {n} "
                             f"(expanded for image_grid_thw {tuple(grids[b])})")
        if below:
            raise ValueError(f"sample {b}: mask_ids must be -1 or an object index >= 0, found values below -1")
        if on_padding:
            raise ValueError(f"sample {b}: {on_padding} phrase tokens (mask_ids >= 0) lie on padding "
                             f"(attention_mask == 0)")
        if on_image:
            raise ValueError(f"sample {b}: {on_image} phrase tokens (mask_ids >= 0) lie on <|image_pad|>")
        if objects < 1:
            raise ValueError(f"sample {b}: no phrase token (mask_ids >= 0): expected at least one object")
        present = torch.unique(mask_ids[b][mask_ids[b] >= 0]).tolist()
        if len(present) != objects:
            missing = sorted(set(range(objects)) - set(present))
            raise ValueError(f"sample {b}: object index {missing[0]} has no token in mask_ids (expected every "
                             f"index 0..{objects - 1} to mark at least one token)")
        num_objects.append(objects)
    return num_vision_tokens, num_objects


def expand_vision_tokens(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ids: torch.Tensor,
    num_vision_tokens: list[int],
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each sample's single `<|image_pad|>` N_b times (no-op for pre-expanded samples).

    The padding side is kept: left-padded batches (every sample ends at the last column) stay left-padded.
    Expanded image positions get mask_ids -1; padding gets the pad id of the input (the id found under the
    attention mask's zeros, else 0).

    Returns:
        (input_ids, attention_mask, mask_ids), each (B, L') with L' the longest expanded sample.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    n = torch.tensor(num_vision_tokens, device=device)  # (B,)
    is_pad = input_ids.eq(image_token_id) & valid
    compact = is_pad.sum(1) == 1  # (B,), pre-expanded samples keep one copy per pad
    repeats = torch.where(is_pad & compact[:, None], n[:, None], 1) * valid  # (B, L), 0 drops padding
    new_lengths = repeats.sum(1)  # (B,)
    total = int(new_lengths.sum())
    out_length = int(new_lengths.max())

    source = torch.repeat_interleave(torch.arange(batch * length, device=device), repeats.flatten(),
                                     output_size=total)  # (T,), flat index of the token each output copies
    sample = source // length  # (T,)
    sample_start = new_lengths.cumsum(0) - new_lengths  # (B,)
    column = torch.arange(total, device=device) - sample_start[sample]  # (T,), position inside the sample
    left_padded = bool(valid[:, -1].all()) and not bool(valid.all())
    if left_padded:
        column = column + (out_length - new_lengths)[sample]

    pad_values = input_ids[~valid]
    pad_id = int(pad_values[0]) if pad_values.numel() else 0
    new_ids = torch.full((batch, out_length), pad_id, dtype=input_ids.dtype, device=device)
    new_mask = torch.zeros((batch, out_length), dtype=attention_mask.dtype, device=device)
    new_mask_ids = torch.full((batch, out_length), -1, dtype=mask_ids.dtype, device=device)
    new_ids[sample, column] = input_ids.flatten()[source]
    new_mask[sample, column] = 1
    new_mask_ids[sample, column] = mask_ids.flatten()[source]
    new_mask_ids[new_ids.eq(image_token_id)] = -1
    return new_ids, new_mask, new_mask_ids


def _split_maps(
    maps: torch.Tensor, num_objects: list[int], num_vision_tokens: list[int], grid_hw: list[list[int]]
) -> list[torch.Tensor]:
    """(B, K, C, N) padded maps -> per sample (K_b, C, h_b, w_b), image tokens row-major on the merged grid."""
    out = []
    for b, (k, n, (h, w)) in enumerate(zip(num_objects, num_vision_tokens, grid_hw, strict=True)):
        out.append(maps[b, :k, :, :n].reshape(k, maps.shape[2], h, w))  # (K_b, C, h_b, w_b)
    return out


def _decoder_mask(attention_mask: torch.Tensor, *, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """The text decoder's (B, 1, L', L') attention mask, built on the device without reading it back (transformers'
    own mask builder reads the padding mask to decide whether it can skip it: a host sync): query i attends key j
    iff j <= i and j is a real token; a padding query also attends itself, so no row is empty (an empty row would
    give NaN that 0-weighted keys still spread). Bool (True = attend), or additive 0 / dtype min with `additive`
    (the eager capture). transformers takes a 4-D mask as is."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (L', L'), [query, key]
    keys = attention_mask.bool()[:, None, :] | (positions[None, :] == positions[:, None])  # (B, L', L')
    allowed = (causal & keys)[:, None]  # (B, 1, L', L')
    if not additive:
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def _object_slots(queries: PhraseQueries, num_objects: list[int]) -> list[list[slice | torch.Tensor]]:
    """Per sample, per object, its phrase slots (host tensors in): a slice when consecutive, else an index tensor."""
    pool = queries.object_pool > 0  # (B, K, P)
    slots = []
    for b, count in enumerate(num_objects):
        per_object = []
        for k in range(count):
            index = pool[b, k].nonzero().flatten()  # (T_k,)
            first, last = int(index[0]), int(index[-1])
            consecutive = last - first + 1 == index.numel()
            per_object.append(slice(first, last + 1) if consecutive else index)
        slots.append(per_object)
    return slots


def _split_phrase_states(
    layer_rows: torch.Tensor, object_slots: list[list[slice | torch.Tensor]]
) -> list[list[torch.Tensor]]:
    """(layers, B, P, D) phrase rows -> per sample, per object (layers, T_k, D): views for consecutive slots."""
    return [
        [layer_rows[:, b, slots] if isinstance(slots, slice) else layer_rows[:, b].index_select(1, slots)
         for slots in sample_slots]  # (layers, T_k, D)
        for b, sample_slots in enumerate(object_slots)
    ]

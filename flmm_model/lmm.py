"""The frozen LMM stage: compact `input_ids` -> expanded inputs -> one teacher-forced forward -> captures.

Works for every supported Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): what differs between them (vision
forward, decoder call, positions, patch size) comes from the model's backbone adapter (`flmm_model.backbones`),
chosen from `config.model_type`.

Data pipelines tokenize the chat text with ONE `<|image_pad|>` per image (what the chat template emits). Qwen needs
N = t * H * W / merge^2 pads per image, N depending on the image size. `FrozenQwenLMM` expands ids, attention mask
and `mask_ids` itself, with vectorized tensor ops, then builds the 3-D M-RoPE positions and
runs the text decoder on `inputs_embeds`. Pre-expanded input (N pads already there, as the HF processor makes it)
passes through unchanged, so both give identical results.

A sample may hold several images (one placeholder block each; `image_grid_thw` has one row per image, in sample
and placeholder order). Grounding reads the attention to ONE image per sample: the first, unless `grounded_image`
names another. `prepare` is the one expansion path: the teacher-forced `forward` (with attention capture) and
`generate` (transformers' generation on the expanded embeddings and positions) both start from it.

`prepare` runs on the host (CPU tensors in): validation, expansion, positions and every index are built where
reading a value costs no device sync; `PreparedLMMInputs.to(device)` moves them in one go, and `forward_prepared`
then runs on the device without reading anything back. A training step prepares its batch in the data loader's
process and calls `forward_prepared`; `forward` does both (inputs already on the device are read back first).

Shapes: B samples, I images, L compact length, L' expanded length, D hidden size, K objects, P phrase tokens,
N image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flmm_model.attention import CAPTURE_IMPLEMENTATIONS, CaptureState, PhraseQueries, register_capture_attention
from flmm_model.backbones import QwenVLModel, VisionFeatures, adapter_for
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
        grid_hw: per sample, the merged grid (h_b, w_b) of the sample's grounded image.
        grounded_image: per sample, the index (among the sample's images) of the image the maps refer to.
        phrase_rows: (num_layers, B, P, D), the same hidden states for every phrase-token slot of the batch at once
            (slot p of sample b is token `queries.query_index[b, p]`; padded slots hold junk).
        queries: the `PhraseQueries` of the batch (slots, objects, grounded image tokens).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_ids: torch.Tensor
    position_ids: torch.Tensor
    last_hidden_state: torch.Tensor
    attention_maps: list[torch.Tensor]
    phrase_hidden_states: list[list[torch.Tensor]]
    grid_hw: list[tuple[int, int]]
    grounded_image: list[int] = field(default_factory=list)
    phrase_rows: torch.Tensor | None = None
    queries: PhraseQueries | None = None


@dataclass
class PreparedLMMInputs:
    """The LMM stage's inputs after validation, vision-token expansion and indexing, built on the host from the
    compact CPU batch by `FrozenQwenLMM.prepare` and moved to the device in one go (`to`): the forward then reads no
    value back from the device.

    Attributes:
        input_ids, attention_mask, mask_ids: (B, L') expanded, as in `LMMOutput` (mask_ids all -1 for generation).
        image_mask: (B, L') bool, True on the image tokens of every image.
        grounded_mask: (B, L') bool, the image tokens of each sample's grounded image.
        image_positions: (sum_i N_i,) long, flat (b * L' + position) index of every image token, in feature order.
        position_ids: (3, B, L') long M-RoPE positions.
        pixel_values, image_grid_thw: as given (pixel rows of all images; (I, 3) grid).
        queries: `PhraseQueries` (phrase slots, object pooling, grounded image tokens, causal + padding key mask);
            None for generation (no phrase).
        vision_inputs: the vision tower's precomputed keyword inputs (`BackboneAdapter.vision_inputs`).
        num_vision_tokens: per image (I), N_i. grid_hw: per image, the merged grid (h_i, w_i).
        num_objects: per sample, K_b (0 for generation).
        images_per_sample: per sample, its number of images.
        grounded_image: per sample, the grounded image's index among the sample's images.
        grounded_index: per sample, the grounded image's index among all I images.
        object_slots: per sample, per object, its phrase slots: a `slice` when they are consecutive (the usual
            case), else a (T_k,) long tensor.
        has_padding: whether any sample is padded (without padding the decoder runs plain causal attention).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_ids: torch.Tensor
    image_mask: torch.Tensor
    grounded_mask: torch.Tensor
    image_positions: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    queries: PhraseQueries | None
    vision_inputs: dict[str, Any]
    num_vision_tokens: list[int]
    grid_hw: list[tuple[int, int]]
    num_objects: list[int]
    images_per_sample: list[int]
    grounded_image: list[int]
    grounded_index: list[int]
    object_slots: list[list[slice | torch.Tensor]]
    has_padding: bool = True

    @property
    def grounded_grid_hw(self) -> list[tuple[int, int]]:
        """Per sample, the merged grid (h_b, w_b) of its grounded image."""
        return [self.grid_hw[i] for i in self.grounded_index]

    @property
    def grounded_grid_thw(self) -> torch.Tensor:
        """(B, 3) long, per sample the (t, H, W) patch grid of its grounded image."""
        return self.image_grid_thw[self.grounded_index]

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
        self.patch_dim = patch_dim_of(vision)  # 1176 or 1536
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
        grounded_image: Sequence[int] | torch.Tensor | None = None,
    ) -> LMMOutput:
        """Expand, position, run the frozen model once and capture attention maps and phrase hidden states.

        `prepare` on the host, then `forward_prepared` on the model's device. Inputs already on the device are read
        back first (host syncs): a training step prepares its CPU batch itself and calls `forward_prepared`.

        Args:
            input_ids: (B, L) long; each image of a sample is one `<|vision_start|>...<|vision_end|>` block holding
                one `<|image_pad|>` (compact) or N_i of them (pre-expanded, as the HF processor makes it).
            attention_mask: (B, L), 1 on real tokens, a contiguous block (left or right padding).
            pixel_values: (sum_i t*H*W, 3 * temporal_patch * patch^2) from the family's image processor, all images
                of all samples concatenated in (sample, placeholder) order.
            image_grid_thw: (I, 3) long, (t, H, W) in patches: one row per image, in the same order (I = B when
                every sample holds one image).
            mask_ids: (B, L) long, k >= 0 on the tokens of the sample's k-th phrase, -1 elsewhere.
            grounded_image: per sample, which of its images the attention maps are read from (index among the
                sample's images); None = the first image of every sample. `grid_hw` refers to that image.

        Raises:
            ValueError: on inconsistent input (see `validate_lmm_inputs`), before the model runs.
        """
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, mask_ids=mask_ids,
                                grounded_image=grounded_image)
        return self.forward_prepared(prepared.to(self.qwen.device))

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        *,
        mask_ids: torch.Tensor | None = None,
        grounded_image: Sequence[int] | torch.Tensor | None = None,
    ) -> PreparedLMMInputs:
        """`prepare_lmm_inputs` for this model: validation and every index the forward (or `generate`) needs, built
        on the host. Arguments as in `forward`; `mask_ids` None means no phrase (generation)."""
        return prepare_lmm_inputs(self.qwen, input_ids, attention_mask, pixel_values, image_grid_thw,
                                  mask_ids=mask_ids, grounded_image=grounded_image)

    @torch.no_grad()
    def embed(self, prepared: PreparedLMMInputs) -> tuple[torch.Tensor, VisionFeatures]:
        """(B, L', D) token embeddings with every image's features copied in (in (sample, position) order = image
        order), and the vision tower's output, for prepared inputs on the model's device."""
        input_ids = prepared.input_ids
        inputs_embeds = self.qwen.model.get_input_embeddings()(input_ids)  # (B, L', D)
        vision = self.adapter.encode_images(self.qwen, prepared.pixel_values, prepared.image_grid_thw,
                                            prepared.vision_inputs)
        image_features = vision.image_embeds.to(inputs_embeds.dtype)  # (sum_i N_i, D)
        inputs_embeds = inputs_embeds.flatten(0, 1).index_copy(0, prepared.image_positions, image_features)
        return inputs_embeds.view(*input_ids.shape, -1), vision  # (B * L', D) -> (B, L', D)

    @torch.no_grad()
    def forward_prepared(self, prepared: PreparedLMMInputs) -> LMMOutput:
        """The device part of `forward`, on inputs from `prepare` moved to the model's device: no host sync."""
        if prepared.queries is None:
            raise ValueError("forward_prepared: the inputs were prepared without mask_ids (for generation)")
        attention_mask, queries = prepared.attention_mask, prepared.queries
        inputs_embeds, vision = self.embed(prepared)
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
                position_ids=prepared.position_ids, image_mask=prepared.image_mask, vision=vision,
                flmm_capture=capture,
            )  # (B, L', D)
        finally:
            for hook in hooks:
                hook.remove()
        layer_rows.append(last_hidden_state.gather(1, row_index))  # the last layer after the final norm
        phrase_rows = torch.stack(layer_rows)  # (layers, B, P, D)

        grounded_tokens = [prepared.num_vision_tokens[i] for i in prepared.grounded_index]
        grid_hw = prepared.grounded_grid_hw
        return LMMOutput(
            input_ids=prepared.input_ids,
            attention_mask=attention_mask,
            mask_ids=prepared.mask_ids,
            position_ids=prepared.position_ids,
            last_hidden_state=last_hidden_state,
            attention_maps=_split_maps(capture.stacked(), prepared.num_objects, grounded_tokens, grid_hw),
            phrase_hidden_states=_split_phrase_states(phrase_rows, prepared.object_slots),
            grid_hw=list(grid_hw),
            grounded_image=list(prepared.grounded_image),
            phrase_rows=phrase_rows,
            queries=queries,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        **generate_options: Any,
    ) -> torch.Tensor:
        """Generate with the frozen model from compact (or pre-expanded) ids, expanded exactly as `forward` expands.

        The prompt goes through `prepare` and `embed` (the same expansion, positions and image features as the forward),
        is left-aligned (decoding appends on the right), and the family's adapter runs transformers' `generate` on
        it with the expanded M-RoPE positions: `generate` extends each position row by +1 per new token, which is
        exactly what the model's own 3-D positions do after the last prompt token. No attention is captured.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw: as `forward` (no phrases).
            generate_options: passed to transformers' `generate` on top of the checkpoint's generation config
                (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `eos_token_id`, `stopping_criteria`, ...);
                greedy (`do_sample=False`) unless given.

        Returns:
            (B, T) long on the model's device: the new tokens only (eos included where generation stopped on it;
            shorter rows padded with the generation config's pad id).

        Raises:
            ValueError: on inconsistent input, before the model runs; or a `return_dict_in_generate` option.
        """
        if generate_options.get("return_dict_in_generate"):
            raise ValueError("generate: returns the new token ids; return_dict_in_generate is not supported")
        generate_options.setdefault("do_sample", False)
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        right_padded = not bool(prepared.attention_mask[:, -1].all())  # read on the host, before the copy
        prepared = prepared.to(self.qwen.device)
        inputs_embeds, vision = self.embed(prepared)
        ids, mask, positions, image_mask = (prepared.input_ids, prepared.attention_mask, prepared.position_ids,
                                            prepared.image_mask)
        if right_padded:  # roll each row so its padding comes first
            width = mask.shape[1]
            shift = width - mask.sum(1)  # (B,)
            columns = (torch.arange(width, device=shift.device)[None, :] - shift[:, None]) % width  # (B, L')

            def roll(tensor: torch.Tensor, dim: int) -> torch.Tensor:
                return tensor.gather(dim, _expand_index(columns, tensor, dim))

            ids, mask, positions = roll(ids, 1), roll(mask, 1), roll(positions, 2)
            inputs_embeds, image_mask = roll(inputs_embeds, 1), roll(image_mask, 1)
        return self.adapter.generate(
            self.qwen, input_ids=ids, attention_mask=mask, position_ids=positions, inputs_embeds=inputs_embeds,
            image_mask=image_mask, vision=vision, **generate_options,
        )



@dataclass
class BatchLayout:
    """What `validate_lmm_inputs` reads off a batch (host-side ints).

    Attributes:
        num_vision_tokens: per image (I), N_i = t * H * W / merge^2.
        num_objects: per sample, K_b (0 where no phrase is marked and none is required).
        images_per_sample: per sample, its number of image blocks.
        grounded_image: per sample, the index (among its images) of the image grounding refers to.
        grounded_index: per sample, the same image's index among all I images.
    """

    num_vision_tokens: list[int]
    num_objects: list[int]
    images_per_sample: list[int]
    grounded_image: list[int]
    grounded_index: list[int]


def patch_dim_of(vision_config: Any) -> int:
    """Values per row of `pixel_values` for a vision config: channels * temporal_patch_size * patch_size^2."""
    return vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def prepare_lmm_inputs(
    qwen: QwenVLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    mask_ids: torch.Tensor | None = None,
    grounded_image: Sequence[int] | torch.Tensor | None = None,
) -> PreparedLMMInputs:
    """Validate a compact batch for `qwen` and build every index its forward (or `generate`) needs, on the host: the
    values are read here, where reading them costs no device sync. The one expansion path of the project: the frozen
    LMM (`FrozenQwenLMM.prepare`) and caption pretraining (`pretrain_lmm.CaptionLM`) both start from it.

    Arguments as in `FrozenQwenLMM.forward` (moved to the CPU first; `pixel_values` stays where it is); `mask_ids`
    None means no phrase (generation), and no object is required.

    Raises:
        ValueError: on inconsistent input (see `validate_lmm_inputs`).
    """
    adapter, config = adapter_for(qwen), qwen.config
    vision = config.vision_config
    image_token_id, merge_size = config.image_token_id, vision.spatial_merge_size
    input_ids, attention_mask, image_grid_thw = (t.cpu() for t in (input_ids, attention_mask, image_grid_thw))
    needs_objects = mask_ids is not None
    mask_ids = torch.full_like(input_ids, -1) if mask_ids is None else mask_ids.cpu()
    layout = validate_lmm_inputs(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
        image_grid_thw=image_grid_thw, mask_ids=mask_ids, merge_size=merge_size, image_token_id=image_token_id,
        vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
        patch_dim=patch_dim_of(vision),
        grounded_image=grounded_image, require_objects=needs_objects,
    )
    input_ids, attention_mask, mask_ids = expand_vision_tokens(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids,
        num_vision_tokens=layout.num_vision_tokens, image_token_id=image_token_id,
    )
    image_mask = (input_ids == image_token_id) & attention_mask.bool()  # (B, L'), every image's tokens
    position_ids = adapter.position_ids(
        image_mask=image_mask, attention_mask=attention_mask, grid_thw=image_grid_thw, merge_size=merge_size
    )
    block = image_block_index(image_mask)  # (B, L'), global image index of each image token
    grounded_mask = image_mask & (block == torch.tensor(layout.grounded_index)[:, None])  # (B, L')
    queries, object_slots = None, []
    if needs_objects:
        queries = PhraseQueries.build(mask_ids=mask_ids, image_mask=grounded_mask, attention_mask=attention_mask,
                                      num_objects=max(layout.num_objects))
        object_slots = _object_slots(queries, layout.num_objects)
    return PreparedLMMInputs(
        input_ids=input_ids, attention_mask=attention_mask, mask_ids=mask_ids, image_mask=image_mask,
        grounded_mask=grounded_mask, image_positions=image_mask.flatten().nonzero().flatten(),
        position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, queries=queries,
        vision_inputs=adapter.vision_inputs(vision, image_grid_thw),
        num_vision_tokens=layout.num_vision_tokens,
        grid_hw=[tuple(hw) for hw in (image_grid_thw[:, 1:] // merge_size).tolist()],
        num_objects=layout.num_objects, images_per_sample=layout.images_per_sample,
        grounded_image=layout.grounded_image, grounded_index=layout.grounded_index, object_slots=object_slots,
        has_padding=not bool(attention_mask.all()),
    )


def _expand_index(columns: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`columns` (B, L) broadcast to gather `tensor` along `dim` (its sequence dimension; batch is dim - 1)."""
    shape = [1] * tensor.dim()
    shape[dim - 1], shape[dim] = columns.shape
    index = columns.view(shape)
    return index.expand(*[s if i not in (dim - 1, dim) else -1 for i, s in enumerate(tensor.shape)])


def image_block_index(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool image tokens -> (B, L) long: the global index (in (sample, position) order) of the image block
    each image token belongs to; -1 elsewhere. Blocks are maximal runs of image tokens."""
    previous = torch.nn.functional.pad(image_mask[:, :-1], (1, 0), value=False)
    run_start = image_mask & ~previous  # (B, L), first token of each block
    block = run_start.flatten().long().cumsum(0).view_as(image_mask) - 1  # (B, L)
    return torch.where(image_mask, block, -1)


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
    grounded_image: Sequence[int] | torch.Tensor | None = None,
    require_objects: bool = True,
) -> BatchLayout:
    """Check a batch before the model runs; return its layout (images per sample, tokens per image, objects).

    Every sample holds one or more image blocks `<|vision_start|>` + pads + `<|vision_end|>`, each with one pad
    (compact) or N_i pads (pre-expanded); `image_grid_thw` has one row per block, in (sample, position) order.
    The checks run as tensor ops; a handful of per-sample and per-image counts come to the host in one transfer.

    Raises:
        ValueError: naming the sample (and the image: "sample 1, image 2" = the sample's second image, counted
            from 1), the expected and the found value.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, L), found {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    for name, tensor in (("attention_mask", attention_mask), ("mask_ids", mask_ids)):
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {tuple(input_ids.shape)}, "
                             f"found {tuple(tensor.shape)}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw: expected one (t, H, W) row per image, shape (num_images, 3), found "
                         f"{tuple(image_grid_thw.shape)}")

    valid = attention_mask.bool()
    ids = input_ids.masked_fill(~valid, -1)  # padding can never look like a vision token
    is_pad, is_start, is_end = ids.eq(image_token_id), ids.eq(vision_start_token_id), ids.eq(vision_end_token_id)
    before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)  # (B, L), the previous real token or -1
    after = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-1)  # (B, L), the next real token or -1
    pad_run_start = is_pad & before.eq(vision_start_token_id)  # first pad of each block
    lengths = valid.sum(1)
    columns = torch.arange(valid.shape[1], device=valid.device)
    first_valid = torch.where(valid, columns, valid.shape[1]).amin(1)
    last_valid = torch.where(valid, columns, -1).amax(1)
    counts = torch.stack([
        lengths,
        (last_valid - first_valid + 1 == lengths).long(),  # real tokens form one block: no holes
        is_pad.sum(1), is_start.sum(1), is_end.sum(1), pad_run_start.sum(1),
        (is_pad & after.eq(-1)).sum(1),  # the sequence ends inside a vision block (truncated)
        (is_pad & ~(before.eq(image_token_id) | before.eq(vision_start_token_id))).sum(1)
        + (is_pad & ~(after.eq(image_token_id) | after.eq(vision_end_token_id) | after.eq(-1))).sum(1)
        + (is_start & ~after.eq(image_token_id)).sum(1) + (is_end & ~before.eq(image_token_id)).sum(1),
        (mask_ids.ge(0) & ~valid).sum(1),  # phrase tokens on padding
        (mask_ids.ge(0) & is_pad).sum(1),  # phrase tokens on image pads
        (mask_ids < -1).sum(1),
        mask_ids.amax(1) + 1,  # K_b
    ], dim=1)  # (B, 12)
    pad_run = pad_run_start.flatten().long().cumsum(0).view_as(is_pad) - 1  # (B, L), block index of each pad
    run_lengths = torch.bincount(pad_run[is_pad].clamp(min=0), minlength=int(pad_run_start.sum()))  # (blocks,)
    counts, run_lengths = counts.tolist(), run_lengths.tolist()  # the host transfer

    images_per_sample = []
    for b, (length, span, pads, starts, ends, runs, truncated, misplaced, *_rest) in enumerate(counts):
        if not span or length == 0:
            raise ValueError(f"sample {b}: attention_mask must be one contiguous block of 1s (left or right padding)")
        if pads == 0:
            raise ValueError(f"sample {b}: no <|image_pad|> placeholder (id {image_token_id}) found, expected 1 per "
                             f"image (compact) or N per image (expanded)")
        if truncated:
            raise ValueError(f"sample {b}: the sequence ends inside the vision block (<|vision_end|> missing after "
                             f"the image pads): was it truncated by max_length?")
        if misplaced or starts != ends or starts != runs:
            raise ValueError(f"sample {b}: image pads must sit in runs between <|vision_start|> and <|vision_end|>, "
                             f"one block per image as the chat template emits; found {starts} vision starts, {ends} "
                             f"vision ends and {runs} runs of <|image_pad|>")
        images_per_sample.append(runs)
    num_images = sum(images_per_sample)
    if image_grid_thw.shape[0] != num_images:
        raise ValueError(f"image_grid_thw: expected one (t, H, W) row per image, shape ({num_images}, 3) for the "
                         f"image blocks of the batch (per sample: {images_per_sample}), found "
                         f"{tuple(image_grid_thw.shape)}")
    image_names = [f"sample {b}, image {i + 1}" if n > 1 else f"sample {b}"
                   for b, n in enumerate(images_per_sample) for i in range(n)]
    grids = image_grid_thw.tolist()
    for name, (t, h, w) in zip(image_names, grids, strict=True):
        if t != 1:
            raise ValueError(f"{name}: image_grid_thw t = {t}, expected 1 (still images)")
        if h % merge_size or w % merge_size:
            raise ValueError(f"{name}: image_grid_thw (H, W) = ({h}, {w}) must be divisible by the spatial merge "
                             f"size {merge_size}")
    expected_rows = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or pixel_values.shape[0] != expected_rows:
        raise ValueError(f"pixel_values: expected {expected_rows} rows (sum of t*H*W over image_grid_thw), "
                         f"found shape {tuple(pixel_values.shape)}")
    if patch_dim is not None and pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values: expected {patch_dim} values per patch (3 * temporal_patch_size * "
                         f"patch_size^2, from this backbone's image processor), found {pixel_values.shape[1]}")
    num_vision_tokens = [t * h * w // merge_size**2 for t, h, w in grids]
    for name, pads, n, grid in zip(image_names, run_lengths, num_vision_tokens, grids, strict=True):
        if pads not in (1, n):
            raise ValueError(f"{name}: found {pads} <|image_pad|> tokens, expected 1 (compact) or {n} "
                             f"(expanded for image_grid_thw {tuple(grid)})")

    if grounded_image is None:
        chosen = [0] * batch
    else:
        chosen = [int(g) for g in (grounded_image.tolist() if torch.is_tensor(grounded_image) else grounded_image)]
        if len(chosen) != batch:
            raise ValueError(f"grounded_image: expected one image index per sample ({batch}), found {len(chosen)}")
    first_image = [sum(images_per_sample[:b]) for b in range(batch)]
    for b, (index, available) in enumerate(zip(chosen, images_per_sample, strict=True)):
        if not 0 <= index < available:
            raise ValueError(f"sample {b}: grounded_image {index} does not exist; the sample holds {available} "
                             f"image(s), indices 0..{available - 1}")

    num_objects = []
    for b, (*_layout, on_padding, on_image, below, objects) in enumerate(counts):
        if below:
            raise ValueError(f"sample {b}: mask_ids must be -1 or an object index >= 0, found values below -1")
        if on_padding:
            raise ValueError(f"sample {b}: {on_padding} phrase tokens (mask_ids >= 0) lie on padding "
                             f"(attention_mask == 0)")
        if on_image:
            raise ValueError(f"sample {b}: {on_image} phrase tokens (mask_ids >= 0) lie on <|image_pad|>")
        if objects < 1 and require_objects:
            raise ValueError(f"sample {b}: no phrase token (mask_ids >= 0): expected at least one object")
        if objects >= 1:
            present = torch.unique(mask_ids[b][mask_ids[b] >= 0]).tolist()
            if len(present) != objects:
                missing = sorted(set(range(objects)) - set(present))
                raise ValueError(f"sample {b}: object index {missing[0]} has no token in mask_ids (expected every "
                                 f"index 0..{objects - 1} to mark at least one token)")
        num_objects.append(max(objects, 0))
    return BatchLayout(num_vision_tokens=num_vision_tokens, num_objects=num_objects,
                       images_per_sample=images_per_sample, grounded_image=chosen,
                       grounded_index=[first + index for first, index in zip(first_image, chosen, strict=True)])


def expand_vision_tokens(
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ids: torch.Tensor,
    num_vision_tokens: list[int],
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each image block's single `<|image_pad|>` N_i times (blocks already holding N_i pads stay as they are).

    Blocks are numbered in (sample, position) order, the order of `num_vision_tokens` (one entry per image). The
    padding side is kept: left-padded batches (every sample ends at the last column) stay left-padded. Expanded
    image positions get mask_ids -1; padding gets the pad id of the input (the id found under the attention mask's
    zeros, else 0).

    Returns:
        (input_ids, attention_mask, mask_ids), each (B, L') with L' the longest expanded sample.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    is_pad = input_ids.eq(image_token_id) & valid  # (B, L)
    block = image_block_index(is_pad)  # (B, L), image index of each pad
    n = torch.tensor(num_vision_tokens, device=device, dtype=torch.long)  # (I,)
    block_pads = torch.bincount(block[is_pad], minlength=n.numel())  # (I,), pads each block holds now
    compact = block_pads == 1  # (I,), pre-expanded blocks keep one copy per pad
    pad_block = block.clamp(min=0)
    repeats = torch.where(is_pad & compact[pad_block], n[pad_block], 1) * valid  # (B, L), 0 drops padding
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

"""The frozen LMM stage on the device: prepared inputs -> one teacher-forced forward -> attention maps and phrase
hidden states (`LMMOutput`); and generation from the same inputs.

Works for every supported Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE): what
differs between them (vision forward, decoder call, positions, patch size, which layers give maps) comes from the
model's backbone adapter (`flmm_model.backbones`), chosen from `config.model_type`.

The host half, `modeling.lmm_inputs.prepare_lmm_inputs`, validates the compact batch, expands each image's single
`<|image_pad|>` to its N vision tokens and builds the 3-D M-RoPE positions and every index on CPU tensors;
`PreparedLMMInputs.to(device)` moves them in one go, and `forward_prepared` then runs without reading anything
back. `forward` does both (inputs already on the device are read back first); a training step gets its batch
prepared in the data loader's workers (`modeling.batch`) and calls `forward_prepared`.

Clips (`pixel_values_videos`, `video_grid_thw`, `video_frame_times`, all keyword-only and optional, as the images
are) take the same way: expanded on the host (`lmm_inputs`: Qwen3-VL / Qwen3.5 also get their timestamp tokens,
from the `TimestampTokens` given at build time), the vision tower run on their rows as HF's `get_video_features`
does, their features scattered at the video tokens. A sample grounded on a clip gets maps (K_b, C, G, h, w).

Shapes: B samples, I images, L compact length, L' expanded length, D hidden size, K objects, P phrase tokens,
N image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flmm_model.backbones import QwenVLModel, VisionFeatures, adapter_for
from flmm_model.backbones.video import DEFAULT_MAX_VIDEO_TOKENS, TimestampTokens
from flmm_model.backbones.vision_attention import use_packed_vision_attention
from flmm_model.data.lmm_cache import LMMCacheKey, LMMEntryShape, LMMOutputCache, lmm_fingerprint
from flmm_model.distributed import lockstep_generation
from flmm_model.modeling.attention import (
    CAPTURE_IMPLEMENTATIONS,
    CaptureState,
    PhraseQueries,
    register_capture_attention,
)
from flmm_model.modeling.lmm_inputs import PreparedLMMInputs, patch_dim_of, prepare_lmm_inputs


@dataclass
class LMMOutput:
    """What the frozen LMM forward gives the mask decoders. All tensors are detached (the LMM runs under no_grad).

    Attributes:
        input_ids: (B, L') expanded ids.
        attention_mask: (B, L') long, 1 on real tokens.
        mask_ids: (B, L') long, object index k on phrase k's tokens, -1 elsewhere (image tokens included).
        position_ids: (3, B, L') long M-RoPE positions (rows t, h, w); 0 on padding.
        last_hidden_state: (B, L', D) after the final norm, as the family's `...VLModel(...).last_hidden_state`.
        attention_maps: per sample, float32 (K_b, map_layers * num_heads, h_b, w_b): post-softmax weights from
            object k's tokens to the image tokens, averaged over k's tokens; channel = layer * num_heads + head;
            image tokens row-major on the merged grid (h_b = H / merge, w_b = W / merge). A sample grounded on a
            clip: (K_b, C, G_b, h_b, w_b), the clip's video tokens by frame group, then row-major.
        phrase_hidden_states: per sample, per object, (num_layers, T_k, D): the hidden states of k's T_k tokens
            after every decoder layer (as `output_hidden_states[1:]`: the last one after the final norm).
        grid_hw: per sample, the merged grid (h_b, w_b) of the sample's grounded image (or clip's frames).
        grounded_image: per sample, the index (among the sample's images) of the image the maps refer to; -1 when
            they refer to a clip.
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
    grounded_clip: list[int] = field(default_factory=list)
    grounded_grid: list[tuple[int, ...]] = field(default_factory=list)


class FrozenQwenLMM(nn.Module):
    """A frozen Qwen-VL (any family of `flmm_model.backbones`) that takes compact ids and returns `LMMOutput`.

    Frozen three ways: no parameter requires grad, `train()` keeps it in eval, and the forward runs under no_grad.

    Args:
        qwen: a `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or
            `Qwen3VLForConditionalGeneration` (any dtype / device; weights untouched).
        attn_capture: "sdpa" (default: SDPA forward, phrase rows recomputed) or "eager" (F-LMM reference).
        timestamp_tokens: the timestamp token ids of the tokenizer's vocabulary
            (`TimestampTokens.from_tokenizer(tokenizer)`), needed to prepare clips for Qwen3-VL / Qwen3.5, whose
            processor writes each frame group's time as text; None: those families refuse clips.
        max_video_tokens: the most video tokens a sample's clips may hold; a sample over it is refused (ValueError,
            before the model runs), never truncated. None: no limit.

    Raises:
        ValueError: an unknown `attn_capture`, or a model of an unsupported family.
    """

    def __init__(
        self, *, qwen: QwenVLModel, attn_capture: str = "sdpa", timestamp_tokens: TimestampTokens | None = None,
        max_video_tokens: int | None = DEFAULT_MAX_VIDEO_TOKENS,
    ) -> None:
        super().__init__()
        if attn_capture not in CAPTURE_IMPLEMENTATIONS:
            raise ValueError(f"attn_capture: expected one of {sorted(CAPTURE_IMPLEMENTATIONS)}, found {attn_capture!r}")
        self.adapter = adapter_for(qwen)  # everything family-specific: vision forward, decoder call, positions
        register_capture_attention()
        self.qwen = qwen.requires_grad_(False).eval()
        self.attn_capture = attn_capture
        self.timestamp_tokens = timestamp_tokens
        self.max_video_tokens = max_video_tokens
        self.sharded = False  # `distributed.shard_lmm`: its blocks sharded across the processes (FSDP2)
        config = qwen.config
        self.image_token_id = config.image_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        vision = config.vision_config
        self.patch_dim = patch_dim_of(vision)  # 1176 or 1536
        self.num_layers = config.text_config.num_hidden_layers
        self.num_heads = config.text_config.num_attention_heads
        # The layers whose attention calls the capture sees (all, or a hybrid decoder's full-attention layers).
        self.map_layers = self.adapter.map_layers(config.text_config)
        self.hidden_size = config.text_config.hidden_size
        # The text decoder dispatches on this name (the vision tower keeps its own implementation).
        config.text_config._attn_implementation = CAPTURE_IMPLEMENTATIONS[attn_capture]
        # The vision tower: one attention call per layer over all windows and images (`vision_attention.py`).
        use_packed_vision_attention(qwen)

    @property
    def num_attention_channels(self) -> int:
        """Channels of an attention map: map layers x heads (576 for Qwen2.5-VL-3B's 36 x 16, 784 for the 7B; Qwen3.5
        maps its full-attention layers only, e.g. 8 x 16 = 128 for the 9B)."""
        return len(self.map_layers) * self.num_heads

    def shardable_blocks(self) -> list[nn.Module]:
        """The vision blocks and decoder layers: nearly all the weights, the units `model.shard_lmm=fsdp` shards
        (`distributed.shard_lmm`; the embeddings, norms, merger and LM head stay whole in every process)."""
        model = self.qwen.model
        return [*model.visual.blocks, *model.language_model.layers]

    def open_output_cache(self, directory: str, *, instruction: str, system: str | None,
                          sentence_draws: Sequence[str], min_pixels: int, max_pixels: int, precision: str
                          ) -> LMMOutputCache:
        """The LMM-output cache (`data.lmm_cache`) in `directory` for this LMM's weights (fingerprint), family, dtype
        and capture, the prompt (`instruction`, `system`), the training sets' `sentence_draws`, the pixel budget and
        the `precision` it runs under ("bf16" / "fp32").

        Raises:
            LMMCacheError: the directory holds a cache built for another setup.
        """
        key = LMMCacheKey(lmm=lmm_fingerprint(self.qwen), family=self.qwen.config.model_type,
                          instruction=instruction, system=system, sentence_draws=tuple(sentence_draws),
                          min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                          dtype=str(self.qwen.dtype).removeprefix("torch."), precision=precision,
                          attn_capture=self.attn_capture)
        shape = LMMEntryShape(channels=self.num_attention_channels, num_layers=self.num_layers,
                              hidden_size=self.hidden_size)
        return LMMOutputCache(directory, key=key, shape=shape)

    def train(self, mode: bool = True) -> FrozenQwenLMM:
        super().train(mode)
        self.qwen.eval()  # frozen: dropout and friends stay off
        return self

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mask_ids: torch.Tensor | None = None,
        grounded_image: Sequence[int] | torch.Tensor | None = None,
        *,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_frame_times: Sequence[torch.Tensor] | None = None,
        grounded_clip: Sequence[int | None] | None = None,
    ) -> LMMOutput:
        """Expand, position, run the frozen model once and capture attention maps and phrase hidden states.

        `prepare` on the host, then `forward_prepared` on the model's device. Inputs already on the device are read
        back first (host syncs): a training step prepares its CPU batch itself and calls `forward_prepared`.

        Args:
            input_ids: (B, L) long; each image of a sample is one `<|vision_start|>...<|vision_end|>` block holding
                one `<|image_pad|>` (compact) or N_i of them (pre-expanded, as the HF processor makes it).
            attention_mask: (B, L), 1 on real tokens, a contiguous block (left or right padding).
            pixel_values: (sum_i t*H*W, 3 * temporal_patch * patch^2) from the family's image processor, all images
                of all samples concatenated in (sample, placeholder) order; None when no sample holds an image.
            image_grid_thw: (I, 3) long, (t, H, W) in patches: one row per image, in the same order (I = B when
                every sample holds one image); None without images.
            mask_ids: (B, L) long, k >= 0 on the tokens of the sample's k-th phrase, -1 elsewhere (required).
            grounded_image: per sample, which of its images the attention maps are read from (index among the
                sample's images); None = the first image of every sample. `grid_hw` refers to that image.
            pixel_values_videos: (sum_v t*H*W, patch_dim) the clips' rows as the family's video processor gives
                them, all clips in (sample, placeholder) order; each clip is one compact
                `<|vision_start|><|video_pad|><|vision_end|>` in `input_ids` (Qwen2-VL / Qwen2.5-VL also take it
                pre-expanded, N_v pads in the block).
            video_grid_thw: (V, 3) long, (t, H, W) per clip: t frame groups of temporal_patch_size frames.
            video_frame_times: per clip a 1-D float tensor (seconds, float64 best), the time of each sampled frame
                (t * temporal_patch_size of them, or one fewer: the processor repeats the last frame).
            grounded_clip: per sample, the index (among its clips) of the clip to read the maps from, or None: the
                sample's first clip when it holds no image, else its image (`grounded_image`).

        Raises:
            ValueError: on inconsistent input (see `validate_lmm_inputs`), before the model runs.
        """
        if mask_ids is None:
            raise ValueError("forward: mask_ids is required (the phrases to ground); generate() takes none")
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, mask_ids=mask_ids,
                                grounded_image=grounded_image, pixel_values_videos=pixel_values_videos,
                                video_grid_thw=video_grid_thw, video_frame_times=video_frame_times,
                                grounded_clip=grounded_clip)
        return self.forward_prepared(prepared.to(self.qwen.device))

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        *,
        mask_ids: torch.Tensor | None = None,
        grounded_image: Sequence[int] | torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_frame_times: Sequence[torch.Tensor] | None = None,
        grounded_clip: Sequence[int | None] | None = None,
    ) -> PreparedLMMInputs:
        """`prepare_lmm_inputs` for this model: validation and every index the forward (or `generate`) needs, built
        on the host. Arguments as in `forward`; `mask_ids` None means no phrase (generation)."""
        return prepare_lmm_inputs(self.qwen, input_ids, attention_mask, pixel_values, image_grid_thw,
                                  mask_ids=mask_ids, grounded_image=grounded_image,
                                  pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                  video_frame_times=video_frame_times, grounded_clip=grounded_clip,
                                  timestamp_tokens=self.timestamp_tokens, max_video_tokens=self.max_video_tokens)

    @torch.no_grad()
    def embed(self, prepared: PreparedLMMInputs, *, vision: VisionFeatures | None = None
              ) -> tuple[torch.Tensor, VisionFeatures]:
        """(B, L', D) token embeddings with every image's features copied in (in (sample, position) order = image
        order), and every clip's at its video tokens, and the vision tower's output, for prepared inputs on the
        model's device.

        `vision`: the vision tower's output for the same images and clips, e.g. from an earlier
        `generate(..., return_vision=True)` over them: the tower is not run again (a chat turn's grounding forward
        reuses its generation's features)."""
        input_ids = prepared.input_ids
        inputs_embeds = self.qwen.model.get_input_embeddings()(input_ids)  # (B, L', D)
        if vision is None:
            vision = self.encode_visuals(prepared)
        positions, features = [], []
        if vision.image_embeds is not None:
            positions.append(prepared.image_positions)
            features.append(vision.image_embeds)  # (sum_i N_i, D)
        if vision.video_embeds is not None:
            positions.append(prepared.video_positions)
            features.append(vision.video_embeds)  # (sum_v N_v, D)
        if len(positions) == 1:
            positions, features = positions[0], features[0]
        else:
            positions, features = torch.cat(positions), torch.cat(features)
        inputs_embeds = inputs_embeds.flatten(0, 1).index_copy(0, positions, features.to(inputs_embeds.dtype))
        return inputs_embeds.view(*input_ids.shape, -1), vision  # (B * L', D) -> (B, L', D)

    @torch.no_grad()
    def encode_visuals(self, prepared: PreparedLMMInputs) -> VisionFeatures:
        """The vision tower on the images' rows and, in a second call (as HF's `get_video_features`), on the clips'
        rows: one `VisionFeatures` holding both (a batch without images or without clips skips that call)."""
        vision = VisionFeatures(image_embeds=None)
        if prepared.image_grid_thw.shape[0]:
            vision = self.adapter.encode_images(self.qwen, prepared.pixel_values, prepared.image_grid_thw,
                                                prepared.vision_inputs)
        if prepared.has_clips:
            clips = self.adapter.encode_images(self.qwen, prepared.pixel_values_videos, prepared.video_grid_thw,
                                               prepared.video_vision_inputs)
            vision.video_embeds, vision.video_deepstack_embeds = clips.image_embeds, clips.deepstack_embeds
        return vision

    @staticmethod
    def decoder_vision(prepared: PreparedLMMInputs, vision: VisionFeatures) -> tuple[torch.Tensor, VisionFeatures]:
        """What the decoder call reads of the vision features: the (B, L') mask of every vision token and the
        features whose deepstack rows follow that mask's (sample, position) order (images and clips joined; the
        images' features as they are for a batch without clips)."""
        if vision.video_embeds is None:
            return prepared.image_mask, vision
        if vision.image_embeds is None:
            return prepared.video_mask, VisionFeatures(image_embeds=vision.video_embeds,
                                                       deepstack_embeds=vision.video_deepstack_embeds)
        joined = []
        for image, video in zip(vision.deepstack_embeds, vision.video_deepstack_embeds, strict=True):
            rows = torch.cat([image, video])  # (sum N_i + sum N_v, D), images first
            joined.append(torch.empty_like(rows).index_copy(0, prepared.visual_order, rows))  # in token order
        return prepared.visual_mask, VisionFeatures(image_embeds=None, deepstack_embeds=joined)

    @torch.no_grad()
    def forward_prepared(self, prepared: PreparedLMMInputs, *, vision: VisionFeatures | None = None) -> LMMOutput:
        """The device part of `forward`, on inputs from `prepare` moved to the model's device: no host sync.
        `vision`: the images' vision features already computed (see `embed`), or None to run the tower."""
        if prepared.queries is None:
            raise ValueError("forward_prepared: the inputs were prepared without mask_ids (for generation)")
        attention_mask, queries = prepared.attention_mask, prepared.queries
        inputs_embeds, vision = self.embed(prepared, vision=vision)
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
            decoder_mask = padding_mask = None  # no padding: transformers runs plain causal attention (flash on GPU)
            if prepared.has_padding:
                decoder_mask = _decoder_mask(attention_mask, additive=self.attn_capture == "eager",
                                             dtype=inputs_embeds.dtype)
                padding_mask = attention_mask  # (B, L'), for linear-attention layers (they zero padded states)
            visual_mask, decoder_vision = self.decoder_vision(prepared, vision)
            last_hidden_state = self.adapter.run_decoder(
                text_model, inputs_embeds=inputs_embeds, attention_mask=decoder_mask, padding_mask=padding_mask,
                position_ids=prepared.position_ids, image_mask=visual_mask, vision=decoder_vision,
                flmm_capture=capture,
            )  # (B, L', D)
        finally:
            for hook in hooks:
                hook.remove()
        layer_rows.append(last_hidden_state.gather(1, row_index))  # the last layer after the final norm
        phrase_rows = torch.stack(layer_rows)  # (layers, B, P, D)

        grounded_tokens = prepared.num_grounded_tokens
        grid_hw = prepared.grounded_grid_hw
        return LMMOutput(
            input_ids=prepared.input_ids,
            attention_mask=attention_mask,
            mask_ids=prepared.mask_ids,
            position_ids=prepared.position_ids,
            last_hidden_state=last_hidden_state,
            attention_maps=_split_maps(capture.stacked(), prepared.num_objects, grounded_tokens,
                                       prepared.grounded_grid or grid_hw),
            phrase_hidden_states=_split_phrase_states(phrase_rows, prepared.object_slots),
            grid_hw=list(grid_hw),
            grounded_image=list(prepared.grounded_image),
            phrase_rows=phrase_rows,
            queries=queries,
            grounded_clip=[c - sum(prepared.clips_per_sample[:b]) if c >= 0 else -1
                           for b, c in enumerate(prepared.grounded_clip)],
            grounded_grid=list(prepared.grounded_grid),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        *,
        vision: VisionFeatures | None = None,
        return_vision: bool = False,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_frame_times: Sequence[torch.Tensor] | None = None,
        **generate_options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, VisionFeatures]:
        """Generate with the frozen model from compact (or pre-expanded) ids, expanded exactly as `forward` expands.

        The prompt goes through `prepare` and `embed` (the same expansion, positions and image features as the forward),
        is left-aligned (decoding appends on the right), and the family's adapter runs transformers' `generate` on
        it with the expanded M-RoPE positions: `generate` extends each position row by +1 per new token, which is
        exactly what the model's own 3-D positions do after the last prompt token. No attention is captured.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw: as `forward` (no phrases).
            pixel_values_videos, video_grid_thw, video_frame_times: the clips, as `forward`.
            vision: the images' vision features already computed (see `embed`), or None to run the tower.
            return_vision: also return the vision features (to ground the answer without running the tower again).
            generate_options: passed to transformers' `generate` on top of the checkpoint's generation config
                (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `eos_token_id`, `stopping_criteria`, ...);
                greedy (`do_sample=False`) unless given.

        Returns:
            (B, T) long on the model's device: the new tokens only (eos included where generation stopped on it;
            shorter rows padded with the generation config's pad id). With `return_vision`: (ids, VisionFeatures).

        Raises:
            ValueError: on inconsistent input, before the model runs; or a `return_dict_in_generate` option.
        """
        if generate_options.get("return_dict_in_generate"):
            raise ValueError("generate: returns the new token ids; return_dict_in_generate is not supported")
        generate_options.setdefault("do_sample", False)
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw,
                                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                                video_frame_times=video_frame_times)
        right_padded = not bool(prepared.attention_mask[:, -1].all())  # read on the host, before the copy
        prepared = prepared.to(self.qwen.device)
        inputs_embeds, vision = self.embed(prepared, vision=vision)
        ids, mask, positions, image_mask = (prepared.input_ids, prepared.attention_mask, prepared.position_ids,
                                            prepared.visual_mask)
        if right_padded:  # roll each row so its padding comes first
            width = mask.shape[1]
            shift = width - mask.sum(1)  # (B,)
            columns = (torch.arange(width, device=shift.device)[None, :] - shift[:, None]) % width  # (B, L')

            def roll(tensor: torch.Tensor, dim: int) -> torch.Tensor:
                return tensor.gather(dim, _expand_index(columns, tensor, dim))

            ids, mask, positions = roll(ids, 1), roll(mask, 1), roll(positions, 2)
            inputs_embeds, image_mask = roll(inputs_embeds, 1), roll(image_mask, 1)
        if self.sharded and torch.distributed.is_initialized():  # every process decodes the same tokens
            generate_options = lockstep_generation(generate_options)
        new_ids = self.adapter.generate(
            self.qwen, input_ids=ids, attention_mask=mask, position_ids=positions, inputs_embeds=inputs_embeds,
            image_mask=image_mask, vision=vision, **generate_options,
        )
        return (new_ids, vision) if return_vision else new_ids


def _expand_index(columns: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """`columns` (B, L) broadcast to gather `tensor` along `dim` (its sequence dimension; batch is dim - 1)."""
    shape = [1] * tensor.dim()
    shape[dim - 1], shape[dim] = columns.shape
    index = columns.view(shape)
    return index.expand(*[s if i not in (dim - 1, dim) else -1 for i, s in enumerate(tensor.shape)])


def _split_maps(
    maps: torch.Tensor, num_objects: list[int], num_vision_tokens: list[int], grids: list[tuple[int, ...]]
) -> list[torch.Tensor]:
    """(B, K, C, N) padded maps -> per sample (K_b, C, h_b, w_b) for an image, (K_b, C, G_b, h_b, w_b) for a clip:
    vision tokens by frame group, then row-major on the merged grid."""
    out = []
    for b, (k, n, grid) in enumerate(zip(num_objects, num_vision_tokens, grids, strict=True)):
        out.append(maps[b, :k, :, :n].reshape(k, maps.shape[2], *grid))  # (K_b, C, [G_b,] h_b, w_b)
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


def _split_phrase_states(
    layer_rows: torch.Tensor, object_slots: list[list[slice | torch.Tensor]]
) -> list[list[torch.Tensor]]:
    """(layers, B, P, D) phrase rows -> per sample, per object (layers, T_k, D): views for consecutive slots."""
    return [
        [layer_rows[:, b, slots] if isinstance(slots, slice) else layer_rows[:, b].index_select(1, slots)
         for slots in sample_slots]  # (layers, T_k, D)
        for b, sample_slots in enumerate(object_slots)
    ]

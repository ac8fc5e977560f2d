"""What a backbone adapter is: the data and the few functions in which the Qwen-VL families differ.

The frozen LMM stage (`flmm_model/lmm.py`) is written once for every family; it asks the adapter of the loaded
model (chosen from `config.model_type`) for everything family-specific:

- builders and presets: the transformers config and model classes, and named configs (random weights);
- the image processor: patch, merge and temporal patch sizes, normalization mean / std;
- the chat template: the image block and the default system prompt;
- the vision forward: `pixel_values` -> merged image features (plus Qwen3-VL's deepstack features), and the
  grid-derived inputs of the vision tower computed on the host beforehand (no host sync inside the forward);
- the decoder call: how the text model is run on `inputs_embeds` (Qwen3-VL also takes its deepstack inputs);
- the M-RoPE positions: one shared function today (`mrope.py`), referenced by each adapter;
- clips (`video.py`): how far apart a clip's frame groups lie in M-RoPE time (Qwen2.5-VL scales by the frame rate),
  and whether each frame group is a block of its own after its timestamp text (Qwen3-VL, Qwen3.5);
- generation: how transformers' `generate` is called on the expanded prompt (Qwen3-VL's deepstack inputs reach the
  decoder only through the model's own forward, so its adapter hands the image features over differently);
- which text layers give attention maps (every layer, or Qwen3.5's full-attention layers: its linear-attention
  layers have no softmax map) and the bundled tokenizer of the family's vocabulary.

An adapter is a frozen dataclass instance per family (`qwen2_vl.ADAPTER`, ...); its function fields are plain
functions of that family's module. Nothing inherits from anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class VisionFeatures:
    """What the vision tower gives the text decoder, for all images (and clips) of a batch in sample order.

    Attributes:
        image_embeds: (sum_b N_b, D) merged image features, one row per image token, scattered into the
            embeddings at the image-token positions in (sample, position) order; None when the batch has no image.
        deepstack_embeds: Qwen3-VL only (empty for the other families): one (sum_b N_b, D) tensor per deepstack
            layer of the vision tower, added to the image-token hidden states after text layer i (i = 0, 1, ...).
        video_embeds: (sum_v N_v, D) the clips' features (the tower run on `pixel_values_videos`, HF's
            `get_video_features`), one row per video token in (sample, position) order; None without clips.
        video_deepstack_embeds: Qwen3-VL only: the clips' deepstack features, as `deepstack_embeds`.
    """

    image_embeds: torch.Tensor | None
    deepstack_embeds: list[torch.Tensor] = field(default_factory=list)
    video_embeds: torch.Tensor | None = None
    video_deepstack_embeds: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class BackboneAdapter:
    """One Qwen-VL family: its classes, presets, image processor settings, chat template and forward calls.

    Attributes:
        model_type: `config.model_type` of the family ("qwen2_vl", "qwen2_5_vl", "qwen3_vl").
        name: how people write it ("Qwen2.5-VL"), for messages.
        config_class: the family's top-level transformers config class.
        model_class: the family's `...ForConditionalGeneration` class (what builders instantiate / load).
        presets: preset name -> a function returning that preset's config (random weights when instantiated).
        patch_size: pixels per patch side (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        merge_size: patches per merged image token side (2: one image token covers merge x merge patches).
        temporal_patch_size: frames per patch (2; a still image is repeated).
        image_mean, image_std: per-channel normalization of the image processor (RGB, values in [0, 1]).
        image_block: the chat template's text for one image, with a single `<|image_pad|>`.
        default_system: the system prompt the chat template adds when none is given, or None (no system turn).
        encode_images: (model, pixel_values, image_grid_thw, vision_inputs=None) -> `VisionFeatures`; runs the
            vision tower (its attention: `vision_attention.packed_attention` once `FrozenQwenLMM` is built on it).
        vision_inputs: (vision_config, CPU image_grid_thw) -> the tower's precomputed keyword inputs (rotary
            positions, segment boundaries, windows, the packed-attention plan), built on the host.
        run_decoder: (text_model, *, inputs_embeds, attention_mask, padding_mask, position_ids, image_mask, vision,
            **attention_kwargs) -> (B, L', D) last hidden state after the final norm; `attention_mask` is the
            (B, 1, L', L') decoder mask or None (no padding), `padding_mask` the (B, L') 1 / 0 mask of real tokens or
            None (what linear-attention layers read); `attention_kwargs` reach every attention call of the decoder.
        position_ids: (*, image_mask, attention_mask, grid_thw, merge_size, time_interval=None) -> (3, B, L') M-RoPE
            positions (`image_mask`: every vision token; `grid_thw` and `time_interval` one row per vision block, in
            (sample, position) order; a sample may hold several images and clips).
        video_time_interval: (config, frame times of a clip in seconds) -> the M-RoPE temporal step between the
            clip's frame groups (1.0, or Qwen2.5-VL's `tokens_per_second * second_per_grid_ts`).
        timestamped_video: each frame group of a clip is a vision block of its own, after its `<{t:.1f} seconds>`
            text (Qwen3-VL, Qwen3.5); else a clip is one block of all its groups (Qwen2-VL, Qwen2.5-VL).
        generate: (model, *, input_ids, attention_mask, position_ids, inputs_embeds, image_mask, vision,
            **generate_options) -> (B, T) new token ids; the prompt is expanded and left-aligned (no padding on the
            right), `position_ids` its (3, B, L') M-RoPE positions, `inputs_embeds` with the image features in.
        default_tokenizer: () -> the bundled real tokenizer of the family's vocabulary (`model.tokenizer: null`).
        map_layers: (text_config) -> the indices of the text layers whose attention gives word-to-image maps, in
            order: every layer (`all_layers`), or the full-attention layers of a hybrid decoder. The capture sees
            exactly these layers' attention calls; the U-Net's input channels are len(map_layers) x heads.
    """

    model_type: str
    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    presets: Mapping[str, Callable[[], PretrainedConfig]]
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_block: str
    default_system: str | None
    encode_images: Callable[..., VisionFeatures]
    vision_inputs: Callable[[PretrainedConfig, torch.Tensor], dict[str, Any]]
    run_decoder: Callable[..., torch.Tensor]
    position_ids: Callable[..., torch.Tensor]
    generate: Callable[..., torch.Tensor]
    default_tokenizer: Callable[[], PreTrainedTokenizerBase]
    map_layers: Callable[[PretrainedConfig], tuple[int, ...]]
    video_time_interval: Callable[[PretrainedConfig, Sequence[float]], float]
    timestamped_video: bool

    @property
    def patch_dim(self) -> int:
        """Values per row of `pixel_values`: 3 channels * temporal_patch_size * patch_size^2 (1176 or 1536)."""
        return 3 * self.temporal_patch_size * self.patch_size**2


def all_layers(text_config: PretrainedConfig) -> tuple[int, ...]:
    """Every text layer gives attention maps (the families whose decoder is softmax attention throughout)."""
    return tuple(range(text_config.num_hidden_layers))


def full_attention_layers(text_config: PretrainedConfig) -> tuple[int, ...]:
    """The layers a hybrid decoder marks "full_attention" in `layer_types` (Qwen3.5: every 4th by default); its
    "linear_attention" layers (gated delta rule) compute no softmax map."""
    layer_types = list(text_config.layer_types)[: text_config.num_hidden_layers]
    return tuple(i for i, kind in enumerate(layer_types) if kind == "full_attention")

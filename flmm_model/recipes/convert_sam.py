"""Convert an original segment-anything checkpoint (e.g. `sam_vit_l_0b3195.pth`) to a transformers SamModel directory.

F-LMM users hold the original checkpoints; this project runs SAM through transformers' `SamModel`. The key mapping
(segment-anything -> transformers), derived from the two module trees:

    image_encoder.patch_embed.proj                      -> vision_encoder.patch_embed.projection
    image_encoder.pos_embed                             -> vision_encoder.pos_embed
    image_encoder.blocks.N.norm{1,2}                    -> vision_encoder.layers.N.layer_norm{1,2}
    image_encoder.blocks.N.attn.{qkv,proj,rel_pos_h,w}  -> vision_encoder.layers.N.attn.{same}
    image_encoder.blocks.N.mlp.lin{1,2}                 -> vision_encoder.layers.N.mlp.lin{1,2}
    image_encoder.neck.{0,1,2,3}                        -> vision_encoder.neck.{conv1,layer_norm1,conv2,layer_norm2}
    prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
                                                        -> shared_image_embedding.positional_embedding and its tied
                                                           copy prompt_encoder.shared_embedding.positional_embedding
    prompt_encoder.point_embeddings.N                   -> prompt_encoder.point_embed.N
    prompt_encoder.mask_downscaling.{0,1,3,4,6}         -> prompt_encoder.mask_embed.{conv1,layer_norm1,conv2,
                                                           layer_norm2,conv3}
    prompt_encoder.{not_a_point_embed,no_mask_embed}    -> same names
    mask_decoder.{iou_token,mask_tokens}                -> same names
    mask_decoder.transformer.layers.N.norm{1..4}        -> mask_decoder.transformer.layers.N.layer_norm{1..4}
    mask_decoder.transformer.norm_final_attn            -> mask_decoder.transformer.layer_norm_final_attn
    mask_decoder.transformer.(attention blocks, mlp)    -> same names
    mask_decoder.output_upscaling.{0,1,3}               -> mask_decoder.{upscale_conv1,upscale_layer_norm,upscale_conv2}
    mask_decoder.{output_hypernetworks_mlps.N,iou_prediction_head}.layers.{0, 1..n-2, n-1}
                                                        -> .{proj_in, layers.{0..n-3}, proj_out}

`pixel_mean` / `pixel_std` (present in the released files) have no transformers counterpart: they are checked to
be SAM's standard values (the ones `SamRefiner.preprocess` uses) and dropped.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch
from torch import Tensor
from transformers import SamModel

from flmm_model.build import sam_config
from flmm_model.errors import InputError
from flmm_model.modeling.sam_refiner import SAM_PIXEL_MEAN, SAM_PIXEL_STD

_WB = r"(weight|bias)"
_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"

# (pattern on the full segment-anything key, replacement): one-to-one renames.
_RENAMES: list[tuple[str, str]] = [
    (rf"image_encoder\.patch_embed\.proj\.{_WB}", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.pos_embed", r"vision_encoder.pos_embed"),
    (rf"image_encoder\.blocks\.(\d+)\.norm([12])\.{_WB}", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (rf"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.{_WB}", r"vision_encoder.layers.\1.attn.\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_h|rel_pos_w)", r"vision_encoder.layers.\1.attn.\2"),
    (rf"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.{_WB}", r"vision_encoder.layers.\1.mlp.\2.\3"),
    (r"image_encoder\.neck\.0\.weight", r"vision_encoder.neck.conv1.weight"),
    (rf"image_encoder\.neck\.1\.{_WB}", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.weight", r"vision_encoder.neck.conv2.weight"),
    (rf"image_encoder\.neck\.3\.{_WB}", r"vision_encoder.neck.layer_norm2.\1"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (rf"prompt_encoder\.mask_downscaling\.0\.{_WB}", r"prompt_encoder.mask_embed.conv1.\1"),
    (rf"prompt_encoder\.mask_downscaling\.1\.{_WB}", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (rf"prompt_encoder\.mask_downscaling\.3\.{_WB}", r"prompt_encoder.mask_embed.conv2.\1"),
    (rf"prompt_encoder\.mask_downscaling\.4\.{_WB}", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (rf"prompt_encoder\.mask_downscaling\.6\.{_WB}", r"prompt_encoder.mask_embed.conv3.\1"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.{_WB}",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.{_ATTN}\.{_PROJ}\.{_WB}",
     r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.{_WB}",
     r"mask_decoder.transformer.layers.\1.mlp.\2.\3"),
    (rf"mask_decoder\.transformer\.final_attn_token_to_image\.{_PROJ}\.{_WB}",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    (rf"mask_decoder\.transformer\.norm_final_attn\.{_WB}", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    (rf"mask_decoder\.output_upscaling\.0\.{_WB}", r"mask_decoder.upscale_conv1.\1"),
    (rf"mask_decoder\.output_upscaling\.1\.{_WB}", r"mask_decoder.upscale_layer_norm.\1"),
    (rf"mask_decoder\.output_upscaling\.3\.{_WB}", r"mask_decoder.upscale_conv2.\1"),
]
# segment-anything's MLP keeps all its Linear layers in one list; transformers' SamFeedForward splits off the first
# (proj_in) and the last (proj_out), so the new index depends on the MLP's depth.
_MLP = re.compile(rf"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.{_WB}")
_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_TIED_GAUSSIAN = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_PIXEL_STATS = {"pixel_mean": SAM_PIXEL_MEAN, "pixel_std": SAM_PIXEL_STD}


def _convert_with_sources(sa_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The converted state dict and, for each transformers key, the segment-anything key it came from."""
    mlp_depth: dict[str, int] = {}
    for key in sa_state:
        match = _MLP.fullmatch(key)
        if match:
            mlp_depth[match.group(1)] = max(mlp_depth.get(match.group(1), 0), int(match.group(2)) + 1)

    converted: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unmapped: list[str] = []
    for key, tensor in sa_state.items():
        new_keys: tuple[str, ...] = ()
        if key == _GAUSSIAN:
            new_keys = _TIED_GAUSSIAN
        elif key in _PIXEL_STATS:
            expected = torch.tensor(_PIXEL_STATS[key], dtype=torch.float32)
            if tensor.numel() != 3 or not torch.allclose(tensor.float().flatten(), expected):
                raise InputError(f"convert_sam_state_dict: {key} is {tensor.flatten().tolist()}, expected SAM's "
                                 f"standard {list(_PIXEL_STATS[key])} (SamRefiner normalizes with those)")
            continue
        elif match := _MLP.fullmatch(key):
            prefix, index, kind = match.group(1), int(match.group(2)), match.group(3)
            last = mlp_depth[prefix] - 1
            name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            new_keys = (f"mask_decoder.{prefix}.{name}.{kind}",)
        else:
            for pattern, replacement in _RENAMES:
                if re.fullmatch(pattern, key):
                    new_keys = (re.sub(f"^{pattern}$", replacement, key),)
                    break
        if not new_keys:
            unmapped.append(key)
        for new_key in new_keys:
            converted[new_key] = tensor
            sources[new_key] = key
    if unmapped:
        raise InputError(f"convert_sam_state_dict: {len(unmapped)} segment-anything keys have no transformers "
                         f"counterpart: {sorted(unmapped)}")
    return converted, sources


def convert_sam_state_dict(sa_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a segment-anything state dict to transformers' SamModel layout (see the module docstring's table).

    Args:
        sa_state: the original checkpoint's state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`,
            optionally `pixel_mean` / `pixel_std`).

    Returns:
        A new dict keyed by SamModel state-dict names; tensors are shared with the input, not copied. The Gaussian
        matrix appears under both tied names.

    Raises:
        ValueError: listing every key that does not map, or if pixel_mean / pixel_std are not SAM's standard ones.
    """
    return _convert_with_sources(sa_state)[0]


def _load_original(pth_path: str) -> dict[str, Tensor]:
    try:
        state = torch.load(pth_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise InputError(f"convert_sam_checkpoint: {pth_path} is not a readable PyTorch checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0]}); expected segment-anything's "
                         f"sam_vit_*.pth") from error
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise InputError(f"convert_sam_checkpoint: {pth_path} does not hold a state dict of tensors")
    return dict(state)


def validate_sam_state_dict(hf_state: Mapping[str, Tensor], *, arch: str, sources: Mapping[str, str] | None = None
                            ) -> SamModel:
    """Check a transformers-layout SAM state dict against a preset's config: same keys, same shapes.

    Works on meta tensors too (only shapes are read).

    Args:
        hf_state: state dict in SamModel's layout (e.g. from `convert_sam_state_dict`).
        arch: SAM preset name (`flmm_model.build.SAM_ARCHS`).
        sources: optional original key of each key, to name it in errors.

    Returns:
        An empty SamModel of `arch` on the meta device (to load `hf_state` into with `assign=True`).

    Raises:
        ValueError: naming the missing / unexpected keys, or the first key whose shape differs (expected vs found).
    """
    config = sam_config(arch)
    with torch.device("meta"):
        model = SamModel(config)  # shapes only: no memory, no random init cost
    expected = model.state_dict()
    missing = sorted(set(expected) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(expected))
    if missing or unexpected:
        raise InputError(f"SAM checkpoint does not match arch {arch!r}: missing {missing}, unexpected {unexpected}")
    for key, reference in expected.items():
        if tuple(hf_state[key].shape) != tuple(reference.shape):
            origin = f"{sources[key]} (-> {key})" if sources and key in sources else key
            raise InputError(f"SAM checkpoint: {origin} has shape {tuple(hf_state[key].shape)}, arch {arch!r} "
                             f"expects {tuple(reference.shape)}")
    return model


def convert_sam_checkpoint(pth_path: str, out_dir: str, *, arch: str) -> str:
    """Convert an original segment-anything `.pth` to a transformers SamModel directory (config + safetensors).

    Args:
        pth_path: the original checkpoint, e.g. `sam_vit_l_0b3195.pth`.
        out_dir: directory to write (created if needed); `build_sam(out_dir)` loads it.
        arch: the SAM preset whose config the checkpoint must match (`sam_vit_l`, `sam_vit_b`, `sam_vit_h`,
            or `tiny`; see `flmm_model.build.SAM_ARCHS`).

    Returns:
        `out_dir`.

    Raises:
        InputError (a ValueError): a file that is not a PyTorch checkpoint, unmapped keys, keys missing for `arch`,
            or a shape that does not match `arch` (naming the key, the expected and the found shape).
    """
    converted, sources = _convert_with_sources(_load_original(pth_path))
    model = validate_sam_state_dict(converted, arch=arch, sources=sources)
    model.load_state_dict(converted, strict=True, assign=True)
    # `assign` wraps each tensor in its own Parameter: re-tie the shared Gaussian matrix.
    model.prompt_encoder.shared_embedding.positional_embedding = model.shared_image_embedding.positional_embedding
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir

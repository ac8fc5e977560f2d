"""The original segment-anything model at the `tiny` preset's sizes: the independent reference of the converter tests.

segment-anything's package `__init__` imports torchvision (absent beside the CPU torch wheel), so only its modeling
submodules are imported, under a bare package object.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import partial

import torch

from flmm_model.build import sam_config


def import_segment_anything(submodule: str) -> types.ModuleType:
    """`segment_anything.<submodule>` without the package `__init__`, which imports torchvision (absent here)."""
    name = f"segment_anything.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")
    assert spec is not None, "segment-anything is missing: pip install -e '.[test]'"
    saved = sys.modules.get("segment_anything")
    package = types.ModuleType("segment_anything")  # a bare package object: its __init__ is never run
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["segment_anything"] = package
    try:
        return importlib.import_module(name)
    finally:
        if saved is None:
            del sys.modules["segment_anything"]
        else:
            sys.modules["segment_anything"] = saved


def tiny_original_sam():
    """segment-anything's Sam with the sizes of the `tiny` preset, every weight random (seeded)."""
    modeling = import_segment_anything("modeling")
    config = sam_config("tiny")
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    image_encoder = modeling.ImageEncoderViT(
        img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.hidden_size,
        depth=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
        mlp_ratio=vision.mlp_dim / vision.hidden_size, out_chans=vision.output_channels, qkv_bias=vision.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=vision.layer_norm_eps), use_rel_pos=vision.use_rel_pos,
        window_size=vision.window_size, global_attn_indexes=tuple(vision.global_attn_indexes),
    )
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=prompt.hidden_size, image_embedding_size=(prompt.image_embedding_size,) * 2,
        input_image_size=(prompt.image_size,) * 2, mask_in_chans=prompt.mask_input_channels,
    )
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=decoder.num_multimask_outputs,
        transformer=modeling.TwoWayTransformer(depth=decoder.num_hidden_layers, embedding_dim=decoder.hidden_size,
                                               mlp_dim=decoder.mlp_dim, num_heads=decoder.num_attention_heads),
        transformer_dim=decoder.hidden_size, iou_head_depth=decoder.iou_head_depth,
        iou_head_hidden_dim=decoder.iou_head_hidden_dim,
    )
    sam = modeling.Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialized pos_embed / rel_pos would hide a wrong mapping
        for tensor in sam.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return sam.eval()

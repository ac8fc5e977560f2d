"""Checks only a CUDA machine can make (the test suite runs on the CPU); run by `gpu_check.sh`.

1. The packed vision attention on CUDA in bf16 (`varlen_attn` when this torch has it, and the padded SDPA path)
   against the stock transformers vision tower (one SDPA call per window), on images of different sizes.
2. A training step of a prepared batch (forward, backward, clipping, fused AdamW) under
   `torch.cuda.set_sync_debug_mode("error")`: any host sync in it raises.

    python benchmarks/cuda_checks.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flmm_model.backbones.vision_attention as vision_attention  # noqa: E402
from flmm_model.backbones import adapter_for  # noqa: E402
from flmm_model.build import build_qwen  # noqa: E402
from flmm_model.data import Collator, SyntheticDataset  # noqa: E402
from flmm_model.device import to_device  # noqa: E402
from flmm_model.model import build_model  # noqa: E402


def vision_check(preset: str, grids: torch.Tensor) -> bool:
    device = torch.device("cuda")
    with device:
        reference = build_qwen(preset, dtype=torch.bfloat16).eval()
        packed = build_qwen(preset, dtype=torch.bfloat16).eval()
    vision_attention.use_packed_vision_attention(packed)
    adapter = adapter_for(packed)
    pixels = torch.randn(int(grids.prod(-1).sum()), adapter.patch_dim, generator=torch.Generator().manual_seed(0))
    pixels, grids_device = pixels.to(device, torch.bfloat16), grids.to(device)
    inputs = to_device(adapter.vision_inputs(packed.config.vision_config, grids), device)
    ok = True
    with torch.no_grad():
        expected = torch.cat(reference.model.get_image_features(pixels, grids_device).pooler_output).float()
        for path in ("varlen", "padded"):
            saved = vision_attention.varlen_attn
            if path == "padded":
                vision_attention.varlen_attn = None
            elif saved is None:
                print(f"vision {preset}: varlen_attn not in torch {torch.__version__}; padded path only")
                continue
            try:
                found = adapter.encode_images(packed, pixels, grids_device, inputs).image_embeds.float()
            finally:
                vision_attention.varlen_attn = saved
            error = float((found - expected).abs().max() / expected.abs().max())
            ok &= error < 5e-2
            print(f"vision {preset} {path}: max |packed - stock| / max |stock| = {error:.2e} (bf16; < 5e-2 passes)")
    return ok


def sync_check() -> bool:
    device = torch.device("cuda")
    with device:
        model = build_model(dict(qwen="tiny", sam="tiny", max_pixels=224 * 224))
    model.to(device).train()
    dataset = SyntheticDataset(tokenizer=model.tokenizer, image_processor=model.image_processor, length=4)
    batch = Collator(pad_token_id=model.tokenizer.pad_token_id, prepare=model.batch_preparer())(
        [dataset[i] for i in range(4)])
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> None:
        prepared = to_device(model.prepare_batch(batch), device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(prepared)
        output["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisations (cuBLAS handles, SAM's relative-position tables)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        print(f"sync check: a host sync in the training step: {error}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("sync check: no host sync in a training step (forward, backward, clipping, fused AdamW)")
    return True


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_checks: no CUDA device")
        return 1
    grids = torch.tensor([[1, 18, 22], [1, 10, 6], [1, 48, 48]])
    ok = vision_check("tiny", grids)
    ok &= vision_check("qwen2_5_vl_3b_narrow", grids)
    ok &= sync_check()
    print("cuda checks:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

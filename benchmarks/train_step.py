"""Throughput and peak memory of full FrozenQwenSAM training steps, split into the frozen LMM, the frozen SAM image
encoder and the trainable heads; on GPU also the model FLOPs utilisation (MFU) of the frozen parts.

A training step is what `flmm_model.train` does: forward (LMM once for the batch, U-Net per image, SAM encoder for
all images, SAM decoder per image), the four losses, backward through the heads, gradient clipping and an AdamW
step; bf16 autocast on CUDA, fp32 on CPU. The parts are timed on their own with the same inputs: the LMM forward
(`model.lmm_forward`, no grad) and the SAM image encoder (no grad); "heads" is the rest of the step (U-Net, text
prompts, SAM prompt encoder + mask decoder, losses, backward, optimizer). FLOPs come from
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention as executed); MFU = FLOPs / time /
peak bf16 dense FLOP/s of the GPU. Weights are random (presets): speed and memory do not depend on their values.

    python benchmarks/train_step.py --arch demo                          # CPU, the demo's shapes
    python benchmarks/train_step.py --arch 3b_sam_l --device cuda        # Qwen2.5-VL-3B + SAM ViT-L shapes
    python benchmarks/train_step.py --arch 7b_sam_l --device cuda --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peak_memory import PeakMemory  # noqa: E402  (benchmarks/, the script's folder)

from flmm_model.build import load_image_processor, load_tokenizer  # noqa: E402
from flmm_model.config import ModelConfig  # noqa: E402
from flmm_model.data import Collator, SyntheticDataset  # noqa: E402
from flmm_model.distributed import autocast_context  # noqa: E402
from flmm_model.model import build_model  # noqa: E402

# Named architectures: the model config and the default image side (px) of the synthetic batch.
ARCHS: dict[str, dict[str, Any]] = {
    "demo": dict(model=dict(qwen="tiny", sam="tiny", dtype="float32", max_pixels=224 * 224,
                            mask_head_widths=[32, 64, 128, 256]), image_size=224),
    "3b_sam_l": dict(model=dict(qwen="qwen2_5_vl_3b", sam="sam_vit_l", dtype="bfloat16", max_pixels=672 * 672),
                     image_size=672),
    "7b_sam_l": dict(model=dict(qwen="qwen2_5_vl_7b", sam="sam_vit_l", dtype="bfloat16", max_pixels=672 * 672),
                     image_size=672),
}

# Peak dense bf16 tensor FLOP/s by GPU name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def timed(fn, *, device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds per call over `repeats` calls after `warmup` calls, and the peak memory (MiB) seen."""
    for _ in range(warmup):
        fn()
    times = []
    with PeakMemory(device, interval_s=0.002) as memory:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak_mib


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step")
    parser.add_argument("--image-size", type=int, default=None, help="side of the square synthetic images (px)")
    parser.add_argument("--objects", type=int, default=3, help="at most this many objects per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    arch = ARCHS[args.arch]
    device = torch.device(args.device)
    side = args.image_size or arch["image_size"]
    model_cfg = ModelConfig(**arch["model"])
    with device:  # random weights initialised where they will run (fast on GPU, no CPU copy of a 7B model)
        model = build_model(model_cfg)
    model.to(device).train()
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    image_processor = load_image_processor(min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                                           backbone=model_cfg.qwen)
    dataset = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=args.batch_size,
                               image_size=(side, side), max_objects=args.objects)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(args.batch_size)])
    num_vision = int((batch["image_grid_thw"].prod(dim=1) // 4).sum())
    num_objects = sum(len(p) for p in batch["phrases"])
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    autocast = autocast_context(device, "auto")

    def train_step() -> None:
        with autocast:
            loss = model(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    device_batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def lmm_forward() -> None:
        with autocast, torch.no_grad():
            model.lmm_forward(device_batch["input_ids"], device_batch["attention_mask"], device_batch["pixel_values"],
                              device_batch["image_grid_thw"], device_batch["mask_ids"])

    def sam_encoder() -> None:
        refiner = model.sam_refiner
        with autocast, torch.no_grad():
            refiner.encode_images(refiner.preprocess(list(batch["images"])))

    step_s, step_mib = timed(train_step, device=device, repeats=args.repeats, warmup=args.warmup)
    lmm_s, lmm_mib = timed(lmm_forward, device=device, repeats=args.repeats, warmup=1)
    sam_s, sam_mib = timed(sam_encoder, device=device, repeats=args.repeats, warmup=1)
    lmm_flops, sam_flops = count_flops(lmm_forward), count_flops(sam_encoder)
    peak = peak_flops(device)

    def mfu(flops: float, seconds: float) -> str:
        return f"{100 * flops / seconds / peak:6.1f}%" if peak else "     -"

    heads_s = max(step_s - lmm_s - sam_s, 0.0)
    trainable = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"arch {args.arch}: qwen {model_cfg.qwen} + sam {model_cfg.sam}, frozen dtype {model_cfg.dtype}, "
          f"{trainable / 1e6:.2f} M trainable parameters; device {where}")
    print(f"batch: {args.batch_size} images {side}x{side} ({num_vision} vision tokens in all, "
          f"{batch['input_ids'].shape[1]} compact tokens per sample), {num_objects} objects; "
          f"precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"{'part':38s}{'ms/step':>10s}{'share':>8s}{'peak MiB':>10s}{'GFLOP':>10s}{'MFU':>8s}")
    rows = [("LMM forward (frozen, no grad)", lmm_s, lmm_mib, lmm_flops, mfu(lmm_flops, lmm_s)),
            ("SAM image encoder (frozen, no grad)", sam_s, sam_mib, sam_flops, mfu(sam_flops, sam_s)),
            ("heads fwd+bwd+AdamW (rest of the step)", heads_s, float("nan"), None, "     -"),
            ("full training step", step_s, step_mib, None, mfu(lmm_flops + sam_flops, step_s))]
    for name, seconds, mib, flops, utilisation in rows:
        gflop = f"{flops / 1e9:10.1f}" if flops is not None else f"{'-':>10s}"
        mem = f"{mib:10.0f}" if mib == mib else f"{'-':>10s}"
        print(f"{name:38s}{1e3 * seconds:10.1f}{100 * seconds / step_s:7.0f}%{mem}{gflop}{utilisation:>8s}")
    samples_per_s = args.batch_size / step_s
    print(f"throughput: {samples_per_s:.2f} samples/s; peak memory of a training step: {step_mib:.0f} MiB"
          + ("" if device.type == "cuda" else " (process RSS)"))
    return {"samples_per_s": samples_per_s, "step_s": step_s, "lmm_s": lmm_s, "sam_encoder_s": sam_s,
            "heads_s": heads_s, "step_peak_mib": step_mib, "lmm_gflop": lmm_flops / 1e9,
            "sam_gflop": sam_flops / 1e9}


if __name__ == "__main__":
    main()

"""Throughput of full FrozenQwenSAM training steps, per region: time, and with `--count-ops` the kernel-launching ops
and host syncs (torch.profiler and `op_count.SyncCounter`, meant for the CPU, where launches and syncs cannot hide).

A step is what `flmm_model.recipes.train` does for one micro-batch of the loader (collated, with the heads' image inputs
and targets built as the loader's workers build them): the host preparation and the copy to the device, the
forward (LMM once for the batch, the heads, the four losses), backward through the heads, the loss bookkeeping of
the log window, gradient clipping and an AdamW step; bf16 autocast on CUDA, fp32 on CPU. Weights are random
(presets): speed does not depend on their values. AdamW and clipping run their `foreach` versions, as on CUDA.

Regions (each op counts for the innermost one): `host prep + copy` (validation and indices of the CPU batch, then
the asynchronous copy: its ops run on the host even on a GPU machine, so they launch no kernel and are left out of
the totals), `vision tower` (Qwen's ViT + merger), `text decoder + capture` (the text model with the attention
capture), `SAM encoder` (frozen image encoder), `glue + heads fwd` (the rest of the forward: embeddings, U-Net, text
prompts, SAM prompt encoder + mask decoder, losses), `heads bwd`, `optimizer` (clipping, AdamW, zero_grad) and
`loss bookkeeping`.

    python benchmarks/train_step.py --arch demo                                      # CPU, the demo's shapes
    python benchmarks/train_step.py --arch 3b_narrow --count-ops --repeats 1         # 3B + SAM-L structure, CPU
    python benchmarks/train_step.py --arch 3b_sam_l --device cuda --trace /tmp/trace  # H200: 3B + SAM ViT-L shapes
    python benchmarks/train_step.py --arch 3b_narrow --lmm-cache --sam-cache          # cached vs full step, one run
    torchrun --nproc_per_node 2 benchmarks/train_step.py --arch 7b_sam_l --shard-lmm fsdp   # 2 GPUs, sharded LMM

With `--lmm-cache` and / or `--sam-cache` the caches are filled first (as the first epoch or `run.py cache-lmm` /
`cache-sam` would), then the full step (no cache) and the cached step are both timed on the same batch in this run:
with both caches the cached step runs the heads alone (no frozen network). The region table and the last line are
the cached step's, and a `cached:` line gives both times and their ratio.

Under torchrun every process trains on its own copy of the batch (samples/s counts all of them); `--shard-lmm fsdp`
shards the frozen LMM as `model.shard_lmm=fsdp` does and prints its memory per process, `--shard-lmm none` keeps it
whole in every process (the DDP baseline).

The last line is machine-readable: `throughput: samples/s=<x> step_ms=<y> peak_mib=<z>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from op_count import Regions, SyncCounter, count_kernel_ops  # noqa: E402  (benchmarks/, the script's folder)
from peak_memory import PeakMemory  # noqa: E402

from flmm_model.build import QWEN_ARCHS, load_image_processor, load_tokenizer  # noqa: E402
from flmm_model.config import ModelConfig  # noqa: E402
from flmm_model.data import Collator, SyntheticDataset  # noqa: E402
from flmm_model.device import to_device  # noqa: E402
from flmm_model.distributed import (  # noqa: E402
    autocast_context,
    init_distributed,
    place_model,
    precision_of,
    shutdown_distributed,
    wrap_ddp,
)
from flmm_model.model import build_model  # noqa: E402

# Named architectures: the model config, the default image side (px) and images per step.
ARCHS: dict[str, dict[str, Any]] = {
    "demo": dict(model=dict(qwen="tiny", sam="tiny", dtype="float32", max_pixels=224 * 224,
                            mask_head_widths=[8, 16, 32, 64]), image_size=224, batch_size=4),
    # The real layer structure of Qwen2.5-VL-3B + SAM ViT-L at tiny widths: op and sync counts on the CPU.
    "3b_narrow": dict(model=dict(qwen="qwen2_5_vl_3b_narrow", sam="sam_vit_l_narrow", dtype="float32",
                                 max_pixels=672 * 672, mask_head_widths=[16, 32, 64, 128]),
                      image_size=672, batch_size=8),
    "3b_sam_l": dict(model=dict(qwen="qwen2_5_vl_3b", sam="sam_vit_l", dtype="bfloat16", max_pixels=672 * 672),
                     image_size=672, batch_size=8),
    "7b_sam_l": dict(model=dict(qwen="qwen2_5_vl_7b", sam="sam_vit_l", dtype="bfloat16", max_pixels=672 * 672),
                     image_size=672, batch_size=8),
}
LOSS_KEYS = ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice")
HOST_REGION = "host prep + copy"
REGION_ORDER = (HOST_REGION, "vision tower", "text decoder + capture", "SAM encoder", "glue + heads fwd", "heads bwd",
                "optimizer", "loss bookkeeping", "outside")

# Peak dense bf16 tensor FLOP/s by GPU name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


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
    parser.add_argument("--qwen", default=None, choices=sorted(QWEN_ARCHS),
                        help="another Qwen-VL preset instead of the arch's (any family, e.g. qwen3_vl_4b, qwen2_vl_7b)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the arch's)")
    parser.add_argument("--image-size", type=int, default=None, help="side of the square synthetic images (px)")
    parser.add_argument("--objects", type=int, default=3, help="at most this many objects per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--count-ops", action="store_true", help="profile one more step: ops and syncs per region")
    parser.add_argument("--trace", default=None, help="write a profiler trace (chrome JSON) of one step here")
    parser.add_argument("--sam-cache", nargs="?", const="", default=None, metavar="DIR",
                        help="read SAM embeddings from a cache (in DIR, default a temporary directory), filled before "
                             "the timed steps (warm cache)")
    parser.add_argument("--lmm-cache", nargs="?", const="", default=None, metavar="DIR",
                        help="read the LMM's outputs from a cache (in DIR, default a temporary directory), filled "
                             "before the timed steps (warm cache)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the parts (train.compile)")
    parser.add_argument("--shard-lmm", choices=["none", "fsdp"], default=None,
                        help="under torchrun: the frozen LMM whole in every process (none) or sharded (fsdp, "
                             "model.shard_lmm), the heads under DDP; every process times its own copy of the batch and "
                             "the main one prints")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    arch = ARCHS[args.arch]
    info = init_distributed(args.device)  # a world of one without torchrun
    device = info.device
    if not info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the main process prints the tables)
    side = args.image_size or arch["image_size"]
    batch_size = args.batch_size or arch["batch_size"]
    model_cfg = ModelConfig(**{**arch["model"], **({"qwen": args.qwen} if args.qwen else {})})
    if args.shard_lmm:  # built on the CPU: placing shards each LMM block on its way to the device
        model = build_model(model_cfg)
    else:
        with device:  # random weights initialised where they will run (fast on GPU, no CPU copy of a 7B model)
            model = build_model(model_cfg)
    tokenizer = load_tokenizer(model_cfg.tokenizer, backbone=model_cfg.qwen)
    image_processor = load_image_processor(min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                                           backbone=model_cfg.qwen)
    dataset = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=batch_size,
                               image_size=(side, side), max_objects=args.objects)
    autocast = autocast_context(device, "auto")
    scratch = tempfile.TemporaryDirectory(prefix="train_step_caches_")  # where a cache without a DIR goes
    precision = precision_of(autocast)
    sam_cache = lmm_cache = None
    if args.sam_cache is not None:
        sam_cache = model.open_sam_cache(args.sam_cache or os.path.join(scratch.name, "sam"), precision=precision)
    if args.lmm_cache is not None:
        lmm_cache = model.open_lmm_cache(args.lmm_cache or os.path.join(scratch.name, "lmm"), precision=precision,
                                         sentence_draws=[])
    cached = sam_cache is not None or lmm_cache is not None
    # After the caches' fingerprints of the whole weights: onto the device (the LMM sharded with --shard-lmm fsdp).
    placement = place_model(model, model.lmm, args.shard_lmm or "none", info)
    model.train()
    if args.compile:
        model.compile_parts()
    step_model = wrap_ddp(model, info)  # the heads' gradients all-reduced, as in training
    collator = Collator(pad_token_id=tokenizer.pad_token_id,
                        prepare=model.batch_preparer(sam_cache=sam_cache, lmm_cache=lmm_cache))
    items = [dataset[i] for i in range(batch_size)]
    if cached:  # fill the caches as the first epoch (or `run.py cache-sam` / `cache-lmm`) would
        prepared = to_device(model.prepare_batch(collator(items)), device)
        with torch.no_grad(), autocast:
            output = step_model(prepared)
        for name, embedding in zip(prepared.sam_missing_names, output.get("sam_new_embeddings", []), strict=False):
            sam_cache.write(name, embedding.cpu())
        for name, maps, rows in output.get("lmm_new_entries", []):
            lmm_cache.write(name, maps, rows)
    batch = collator(items)  # what the loader's workers hand the train loop (with warm caches: what they read)
    full_batch = Collator(pad_token_id=tokenizer.pad_token_id, prepare=model.batch_preparer())(items)
    num_vision = int((batch["image_grid_thw"].prod(dim=1) // 4).sum())
    num_objects = sum(len(p) for p in batch["phrases"])
    params = model.trainable_parameters()
    # foreach: what AdamW and clipping do on CUDA by default (one op over all tensors), also on the CPU here.
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, foreach=True)
    window = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=device)

    def train_step(regions: Regions | None = None, step_batch: dict[str, Any] = batch) -> None:
        regions = regions or Regions()
        with regions.region(HOST_REGION):
            prepared = to_device(model.prepare_batch(step_batch), device)
        with regions.region("glue + heads fwd"), autocast:
            output = step_model(prepared)
        with regions.region("heads bwd"):
            output["loss"].backward()
        with regions.region("loss bookkeeping"):
            window[:-1] += torch.stack([output[k].detach() for k in LOSS_KEYS]).double()
            window[-1] += 1
        with regions.region("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def hooked(regions: Regions) -> list[Any]:
        handles = regions.hook(model.qwen.model.visual, "vision tower")
        handles += regions.hook(model.qwen.model.language_model, "text decoder + capture")
        if model.sam_refiner is not None:
            handles += regions.hook(model.sam_refiner.sam.vision_encoder, "SAM encoder")
        return handles

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_steps(step_batch: dict[str, Any]) -> tuple[float, float]:
        """The median step time (s) over `--repeats` steps after `--warmup` ones, and the peak memory (MiB)."""
        for _ in range(args.warmup):
            train_step(step_batch=step_batch)
        synchronize()
        times = []
        with PeakMemory(device, interval_s=0.002) as memory:
            for _ in range(args.repeats):
                start = time.perf_counter()
                train_step(step_batch=step_batch)
                synchronize()
                times.append(time.perf_counter() - start)
        return statistics.median(times), memory.peak_mib

    full_s, full_mib = timed_steps(full_batch) if cached else (None, None)  # the baseline, in this run
    step_s, peak_mib = timed_steps(batch)

    timed = Regions(timed=True, device=device)  # one more step, timed per region
    handles = hooked(timed)
    train_step(timed)
    region_s = timed.times()
    for handle in handles:
        handle.remove()

    ops = syncs = None
    if args.count_ops:
        regions = Regions()
        handles = hooked(regions)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            with SyncCounter(regions, host_regions=(HOST_REGION,)) as counter:
                counter.mark_host(batch)  # the CPU batch from the loader
                # Host tensors on a GPU too: AdamW's step counts.
                counter.mark_host([state["step"] for state in optimizer.state.values()])
                train_step(regions)
        for handle in handles:
            handle.remove()
        ops, syncs = count_kernel_ops(profile), counter.counts
        sync_kinds = counter.kinds
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            train_step()
            synchronize()
        os.makedirs(args.trace, exist_ok=True)
        profile.export_chrome_trace(os.path.join(args.trace, f"train_step_{args.arch}.json"))
    with FlopCounterMode(display=False) as flop_counter:
        train_step()
    step_flops = flop_counter.get_total_flops()

    trainable = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"arch {args.arch}: qwen {model_cfg.qwen} + sam {model_cfg.sam}, frozen dtype {model_cfg.dtype}, "
          f"{trainable / 1e6:.2f} M trainable parameters; device {where}; torch {torch.__version__}")
    print(f"batch: {batch_size} images {side}x{side} ({num_vision} vision tokens in all, "
          f"{batch['input_ids'].shape[1]} compact tokens per sample), {num_objects} objects; "
          f"precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{'; SAM cache warm' if sam_cache is not None else ''}{'; LMM cache warm' if lmm_cache is not None else ''}"
          f"{'; compiled' if args.compile else ''}")
    if args.shard_lmm:
        print(f"{placement}; {info.world_size} processes, heads under DDP" if info.distributed else placement)
    header = f"{'region':26s}{'ms':>10s}{'share':>8s}"
    if ops is not None:
        header += f"{'ops':>8s}{'syncs':>7s}  sync kinds"
    print(header)
    total = sum(seconds for name, seconds in region_s.items() if name != HOST_REGION)
    names = [n for n in REGION_ORDER if n in region_s or (ops and n in ops) or (syncs and n in syncs)]
    for name in names:
        line = f"{name:26s}{1e3 * region_s.get(name, 0.0):10.1f}{100 * region_s.get(name, 0.0) / total:7.0f}%"
        if ops is not None:
            kinds = ", ".join(f"{k} {v}" for k, v in sync_kinds[name].most_common())
            line += f"{ops.get(name, 0):8d}{syncs.get(name, 0):7d}  {kinds}"
        print(line)
    if ops is not None:
        heads = sum(ops.get(n, 0) for n in ("glue + heads fwd", "heads bwd", "loss bookkeeping", "outside"))
        device_ops = sum(count for name, count in ops.items() if name != HOST_REGION)
        print(f"{'total (without host prep)':26s}{1e3 * total:10.1f}{100:7.0f}%{device_ops:8d}"
              f"{sum(syncs.values()):7d}")
        print(f"targets: vision tower ops {ops.get('vision tower', 0)} (<= 1500), heads + glue ops {heads} (<= 3000, "
              f"fwd + bwd + bookkeeping), syncs {sum(syncs.values())} (<= 30)")
    peak = peak_flops(device)
    mfu = f", {100 * step_flops / step_s / peak:.1f}% MFU" if peak else ""
    print(f"step: {step_flops / 1e12:.2f} TFLOP{mfu}")
    speedup = full_s / step_s if cached else None
    if cached:
        print(f"cached: full step {1e3 * full_s:.1f} ms ({full_mib:.0f} MiB peak), cached step {1e3 * step_s:.1f} ms "
              f"({peak_mib:.0f} MiB peak): {speedup:.2f}x faster (target >= 5x with both caches, 3b_narrow)")
    scratch.cleanup()
    samples_per_s = batch_size * info.world_size / step_s  # every process trains on its own batch
    shutdown_distributed(info)
    print(f"throughput: samples/s={samples_per_s:.2f} step_ms={1e3 * step_s:.1f} peak_mib={peak_mib:.0f}")
    return {"samples_per_s": samples_per_s, "step_s": step_s, "peak_mib": peak_mib, "regions_s": region_s,
            "ops": ops, "syncs": syncs, "full_step_s": full_s, "speedup": speedup, "placement": placement}


if __name__ == "__main__":
    main()

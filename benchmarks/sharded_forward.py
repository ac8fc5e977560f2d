"""The frozen LMM's forward sharded across the processes (`model.shard_lmm=fsdp`) next to the whole LMM, in one run
under torchrun: the largest differences of the attention maps and phrase hidden states, the median forward time of
each, and the LMM's weights per process.

Every process builds the same seeded preset on the CPU and runs the same batch (synthetic scenes of `--batch-size`
images, `--image-size` pixels square, up to 3 phrases each, as `train_step.py`'s): first the whole LMM (a copy on
the device; skip it with `--no-whole` when the LMM does not fit one device), then the sharded one (placed block by
block from the CPU copy).

    torchrun --nproc_per_node 2 benchmarks/sharded_forward.py --arch mid --device cpu          # CPU, gloo
    torchrun --nproc_per_node 2 benchmarks/sharded_forward.py --arch qwen2_5_vl_7b             # 2 GPUs, bf16

The last line is machine-readable: `sharded: maps_diff=<a> rows_rel_diff=<b> whole_ms=<c> sharded_ms=<d>
whole_gib=<e> sharded_gib=<f>`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flmm_model.build import QWEN_ARCHS, load_image_processor, load_tokenizer  # noqa: E402
from flmm_model.config import ModelConfig  # noqa: E402
from flmm_model.data import Collator, SyntheticDataset  # noqa: E402
from flmm_model.device import to_device  # noqa: E402
from flmm_model.distributed import init_distributed, local_bytes, place_model, shutdown_distributed  # noqa: E402
from flmm_model.model import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mid", choices=sorted(QWEN_ARCHS), help="a Qwen-VL preset of any family")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="the LMM's dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-pixels", type=int, default=672 * 672)
    parser.add_argument("--batch-size", type=int, default=4, help="images in the batch")
    parser.add_argument("--image-size", type=int, default=448, help="side of the square synthetic images (px)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards of each (median)")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole LMM (it does not fit one device)")
    args = parser.parse_args(argv)

    info = init_distributed(args.device)
    if not info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the main process prints)
    dtype = args.dtype or ("bfloat16" if info.device.type == "cuda" else "float32")
    # The heads are tiny and unused here: the batch goes through the model's own host-side preparation.
    model_cfg = ModelConfig(qwen=args.arch, sam="tiny", dtype=dtype, max_pixels=args.max_pixels,
                            mask_head_widths=[8, 16, 32, 64], seed=0)
    model = build_model(model_cfg).eval()
    tokenizer = load_tokenizer(model_cfg.tokenizer, backbone=model_cfg.qwen)
    image_processor = load_image_processor(min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                                           backbone=model_cfg.qwen)
    dataset = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=args.batch_size,
                               image_size=(args.image_size, args.image_size), max_objects=3)
    batch = Collator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(args.batch_size)])
    prepared = model.prepare_batch(batch).lmm

    def timed(lmm: torch.nn.Module) -> tuple[Any, float]:
        inputs = to_device(prepared, info.device)
        with torch.no_grad():
            out = lmm.forward_prepared(inputs)  # warm-up
            times = []
            for _ in range(args.repeats):
                if info.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = lmm.forward_prepared(inputs)
                if info.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return out, statistics.median(times)

    whole = whole_s = None
    whole_gib = local_bytes(model.lmm) / 2**30
    if not args.no_whole:
        whole_lmm = copy.deepcopy(model.lmm).to(info.device)
        whole, whole_s = timed(whole_lmm)
        whole = (to_cpu(whole.attention_maps), whole.phrase_rows.float().cpu())
        del whole_lmm
    line = place_model(model.lmm, model.lmm, "fsdp", info)
    sharded, sharded_s = timed(model.lmm)
    sharded_gib = local_bytes(model.lmm) / 2**30
    maps_diff = rows_diff = float("nan")
    if whole is not None:
        maps_diff = max(float((a - b).abs().max()) for a, b in zip(whole[0], to_cpu(sharded.attention_maps),
                                                                   strict=True))
        rows = sharded.phrase_rows.float().cpu()
        rows_diff = float((whole[1] - rows).abs().max() / whole[1].abs().max().clamp_min(1e-12))
    where = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    print(f"arch {args.arch} ({dtype}), {info.world_size} processes on {where}; torch {torch.__version__}; "
          f"{args.batch_size} images {args.image_size}x{args.image_size}")
    print(line)
    print(f"{'':10s}{'forward ms':>12s}{'LMM GiB per process':>22s}")
    if whole_s is not None:
        print(f"{'whole':10s}{1e3 * whole_s:12.1f}{whole_gib:22.2f}")
    print(f"{'sharded':10s}{1e3 * sharded_s:12.1f}{sharded_gib:22.2f}")
    print(f"sharded: maps_diff={maps_diff:.3g} rows_rel_diff={rows_diff:.3g} "
          f"whole_ms={1e3 * whole_s if whole_s else float('nan'):.1f} sharded_ms={1e3 * sharded_s:.1f} "
          f"whole_gib={whole_gib:.2f} sharded_gib={sharded_gib:.2f}")
    shutdown_distributed(info)
    return dict(maps_diff=maps_diff, rows_rel_diff=rows_diff, whole_s=whole_s, sharded_s=sharded_s,
                whole_gib=whole_gib, sharded_gib=sharded_gib)


def to_cpu(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m.float().cpu() for m in maps]


if __name__ == "__main__":
    main()

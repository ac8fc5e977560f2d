"""Wall time and peak memory of `lmm_forward` per attention-capture mode, against the F-LMM-style baseline.

Any Qwen-VL preset works (`--arch`, all families: see `flmm_model.backbones.PRESETS`); the model is built with
random weights from the preset's config.

Modes, all on the same model and batch in one run:
  sdpa      the default: SDPA forward, softmax recomputed for the phrase-token query rows only; the vision tower
            with the packed attention (one call per block); timed as training runs it: `forward_prepared` on a
            batch prepared on the host beforehand (`FrozenQwenLMM.prepare`, then one copy to the device)
  eager     the reference mode: eager attention, each layer's phrase rows pooled and its full map freed (timed
            the same way)
  baseline  F-LMM style: the stock transformers forward (SDPA vision tower, one call per window) with eager
            attention and `output_attentions=True` (+ hidden states), every layer's (B, heads, L, L) map kept until
            the forward ends, pooled afterwards

Each mode runs in its own process. Peak memory is the rise above the level before the call (model and inputs
excluded): `torch.cuda.max_memory_allocated` on GPU, the process RSS sampled every millisecond on CPU (a coarser
measure). Time is the median of `--repeats` calls after a warm-up. Examples:

    python benchmarks/lmm_forward.py --arch tiny --seq-len 256
    python benchmarks/lmm_forward.py --arch mid --seq-len 1024
    python benchmarks/lmm_forward.py --arch qwen3_vl_tiny --seq-len 256
    python benchmarks/lmm_forward.py --arch qwen3_5_tiny --seq-len 1024   # Qwen3.5: maps from the full-attention layers
    python benchmarks/lmm_forward.py --arch qwen2_5_vl_7b --seq-len 1500 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peak_memory import PeakMemory  # noqa: E402  (benchmarks/, the script's folder)

from flmm_model.backbones import PRESETS, adapter_for, qwen_config  # noqa: E402
from flmm_model.device import to_device  # noqa: E402
from flmm_model.modeling.attention import CaptureState, PhraseQueries  # noqa: E402
from flmm_model.modeling.lmm import FrozenQwenLMM  # noqa: E402

MODES = ("baseline", "eager", "sdpa")


def make_batch(config, *, seq_len: int, batch_size: int, objects: int, tokens_per_object: int, generator):
    """Compact ids with one image block whose vision tokens fill ~75% of `seq_len`, K phrases at the end."""
    merge = config.vision_config.spatial_merge_size
    side = max(1, int(math.sqrt(0.75 * seq_len)))  # merged grid side
    n_vision = side * side
    n_text = max(seq_len - n_vision, objects * tokens_per_object + 8)
    grid = torch.tensor([[1, side * merge, side * merge]] * batch_size)
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    pixel_values = torch.randn(batch_size * int(grid[0].prod()), patch_dim, generator=generator)
    ids = torch.randint(1000, 100000, (batch_size, n_text + 3), generator=generator)
    ids[:, 2:5] = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    mask_ids = torch.full_like(ids, -1)
    for k in range(objects):
        start = ids.shape[1] - (objects - k) * tokens_per_object - 1
        mask_ids[:, start:start + tokens_per_object] = k
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_grid_thw=grid, mask_ids=mask_ids), n_vision


def baseline_forward(lmm: FrozenQwenLMM, batch: dict, expanded: dict) -> list[torch.Tensor]:
    """F-LMM style: the HF forward with eager attention and output_attentions=True, pooled afterwards."""
    model = lmm.qwen.model
    image_mask = expanded["input_ids"] == lmm.image_token_id
    with torch.no_grad():
        out = model(input_ids=expanded["input_ids"], attention_mask=expanded["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=image_mask.long(), output_attentions=True, output_hidden_states=True)
        num_objects = int(expanded["mask_ids"].max()) + 1
        capture = CaptureState(queries=PhraseQueries.build(
            mask_ids=expanded["mask_ids"], image_mask=image_mask, attention_mask=expanded["attention_mask"],
            num_objects=num_objects))
        index = capture.queries.query_index
        for layer in out.attentions:  # (B, heads, L, L) each, all alive at once
            rows = layer.gather(2, index[:, None, :, None].expand(-1, layer.shape[1], -1, layer.shape[-1]))
            capture.add_rows(rows)
    return list(capture.stacked())


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Median wall time (s) over `repeats` calls after one warm-up, the largest peak-memory rise, the last result."""
    result = fn()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        del result
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(memory.rise_mib)
    return statistics.median(times), max(peaks), result


def run_mode(args: argparse.Namespace) -> None:
    """Child process: build the model, measure one mode, save its maps and print one RESULT line."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = qwen_config(args.arch, attn_implementation="sdpa")
    with device:
        qwen = adapter_for(config).model_class(config).to(dtype).eval()
    batch, n_vision = make_batch(config, seq_len=args.seq_len, batch_size=args.batch_size, objects=args.objects,
                                 tokens_per_object=args.tokens_per_object,
                                 generator=torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    lmm = FrozenQwenLMM(qwen=qwen, attn_capture="eager" if args.only == "baseline" else args.only)
    if args.only == "baseline":
        out = lmm(**batch)  # the expanded ids the HF path needs, computed outside the measured region
        expanded = dict(input_ids=out.input_ids, attention_mask=out.attention_mask, mask_ids=out.mask_ids)
        del out
        config.text_config._attn_implementation = "eager"
        config.vision_config._attn_implementation = "sdpa"  # the stock vision attention, one call per window
        seconds, peak, maps = measure(lambda: baseline_forward(lmm, batch, expanded), device, args.repeats)
    else:
        host = {k: v.cpu() for k, v in batch.items()}
        prepared = to_device(lmm.prepare(host["input_ids"], host["attention_mask"], batch["pixel_values"],
                                         host["image_grid_thw"], mask_ids=host["mask_ids"]), device)
        seconds, peak, out = measure(lambda: lmm.forward_prepared(prepared), device, args.repeats)
        maps = [m.flatten(2) for m in out.attention_maps]
    torch.save([m.float().cpu().flatten(2) for m in maps], args.maps_file)
    seq_len = int(batch["input_ids"].shape[1]) + n_vision - 1
    print(f"RESULT {seconds} {peak} {seq_len} {n_vision}")


def run_modes(script: str, argv: list[str] | None, modes: tuple[str, ...]) -> tuple[dict[str, list[str]], dict]:
    """Run `script` once per mode, each in a fresh process (memory one mode freed cannot hide the next one's peak),
    with this invocation's arguments + `--only <mode> --maps-file <file>`: per mode the fields of its last
    `RESULT ...` line and the maps it saved."""
    results, maps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            maps_file = os.path.join(tmp, f"{mode}.pt")
            child_args = list(argv if argv is not None else sys.argv[1:])
            command = [sys.executable, os.path.abspath(script), *child_args, "--only", mode, "--maps-file", maps_file]
            done = subprocess.run(command, capture_output=True, text=True)
            result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not result:
                raise RuntimeError(f"mode {mode} failed:\n{done.stdout}\n{done.stderr}")
            results[mode] = result[-1].split()[1:]
            maps[mode] = torch.load(maps_file, weights_only=True)
    return results, maps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=sorted(PRESETS), help="a Qwen-VL preset of any family")
    parser.add_argument("--seq-len", type=int, default=256, help="expanded sequence length (vision + text tokens)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--tokens-per-object", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)  # child process: one mode
    parser.add_argument("--maps-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        run_mode(args)
        return {}

    results, maps = run_modes(__file__, argv, MODES)
    rows = {mode: (float(fields[0]), float(fields[1])) for mode, fields in results.items()}
    seq_len, n_vision = results[MODES[-1]][2:4]

    text = qwen_config(args.arch).text_config
    map_layers = adapter_for(qwen_config(args.arch)).map_layers(text)
    print(f"arch={args.arch} ({PRESETS[args.arch][0]}) layers={text.num_hidden_layers} map_layers={len(map_layers)} "
          f"heads={text.num_attention_heads} kv_heads={text.num_key_value_heads} hidden={text.hidden_size} "
          f"batch={args.batch_size} "
          f"seq_len={seq_len} vision_tokens={n_vision} objects={args.objects} device={args.device} "
          f"dtype={args.dtype} repeats={args.repeats}")
    print(f"{'mode':<10}{'time_s':>10}{'peak_MiB':>12}{'max|maps - baseline|':>24}")
    for mode, (seconds, peak) in rows.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(maps[mode], maps["baseline"], strict=True))
        print(f"{mode:<10}{seconds:>10.4f}{peak:>12.1f}{diff:>24.2e}")
    time_ratio = rows["sdpa"][0] / rows["baseline"][0]
    memory_ratio = rows["sdpa"][1] / max(rows["baseline"][1], 1e-9)
    print(f"ratio default/baseline: time={time_ratio:.3f} memory={memory_ratio:.3f}")
    return dict(rows=rows, time_ratio=time_ratio, memory_ratio=memory_ratio)


if __name__ == "__main__":
    main()

"""One chat turn with grounding: our way against F-LMM's way, measured in the same run.

  ours  generate with the frozen LMM (SDPA, nothing kept: `FrozenQwenLMM.generate`), then ONE teacher-forced capture
        forward over prompt + answer (`FrozenQwenLMM.forward`, the answer tokens as one phrase): attention maps from
        the answer to the image and the answer's hidden states of every layer.
  flmm  F-LMM's demo: generate with eager attention and `output_attentions=True` + `output_hidden_states=True`
        (`return_dict_in_generate`), every step's attention and hidden states of every layer kept, then the maps of
        the generated tokens pooled from them.

Both start from the same random-weight model of a preset (`--arch`), the same image (random pixels of
`--image-size`^2) and question, and generate exactly `--new-tokens` tokens (greedy, end of turn suppressed until
then), so they produce the same answer. The heads after the LMM (U-Net, SAM) are the same for both and left out.
Each way runs in its own process; time = median of `--repeats` turns after a warm-up, split into generation and
grounding; peak = the largest rise, over all turns including the warm-up, of the CUDA allocator peak (GPU) or of
the sampled process RSS (CPU: in practice the first turn's, since later turns reuse the heap the allocator kept; the
model and inputs are loaded before, so they are not counted). The last line reads
`ratio ours/flmm: time=<x> memory=<y>` (total time, peak rise).

    python benchmarks/chat.py --arch tiny
    python benchmarks/chat.py --arch mid --image-size 448 --new-tokens 32
    python benchmarks/chat.py --arch qwen2_5_vl_7b --image-size 672 --new-tokens 64 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peak_memory import PeakMemory  # noqa: E402  (benchmarks/, the script's folder)

from flmm_model.backbones import PRESETS, adapter_for, load_image_processor, qwen_config  # noqa: E402
from flmm_model.build import load_tokenizer  # noqa: E402
from flmm_model.data.images import qwen_image_inputs  # noqa: E402
from flmm_model.data.prompts import build_chat_prompt, encode_chat  # noqa: E402
from flmm_model.modeling.lmm import FrozenQwenLMM  # noqa: E402

WAYS = ("ours", "flmm")
QUESTION = "What is happening in this picture? Describe every object you can see."


def inputs(args: argparse.Namespace, adapter, device: torch.device, dtype: torch.dtype) -> dict:
    """Compact and processor-style expanded prompt ids, pixel values and grid of one random image."""
    tokenizer = load_tokenizer()
    image_processor = load_image_processor(adapter, min_pixels=56 * 56, max_pixels=args.image_size ** 2)
    pixels = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    pixel_values, grid = qwen_image_inputs(Image.fromarray(pixels), image_processor)
    prompt = build_chat_prompt(tokenizer, [[None, QUESTION]], system=adapter.default_system,
                               image_block=adapter.image_block)
    compact, _ = encode_chat(tokenizer, prompt)
    n_vision = int(grid.prod()) // adapter.merge_size**2
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at = int((compact == pad).nonzero()[0, 0])
    expanded = torch.cat([compact[:at], compact.new_full((n_vision,), pad), compact[at + 1:]])
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    return dict(compact=compact[None].to(device), expanded=expanded[None].to(device), n_vision=n_vision,
                pixel_values=pixel_values.to(device, dtype), grid=grid.to(device), generate=generate)


def our_turn(lmm: FrozenQwenLMM, data: dict) -> tuple[float, float, list]:
    """Generate, then one capture forward with the answer as one phrase; (generate s, ground s, maps)."""
    start = time.perf_counter()
    answer = lmm.generate(data["compact"], torch.ones_like(data["compact"]), data["pixel_values"], data["grid"],
                          **data["generate"])  # (1, T)
    _sync(answer.device)
    middle = time.perf_counter()
    ids = torch.cat([data["compact"], answer], dim=1)
    mask_ids = torch.full_like(ids, -1)
    mask_ids[:, data["compact"].shape[1]:] = 0
    out = lmm(ids, torch.ones_like(ids), data["pixel_values"], data["grid"], mask_ids)
    _sync(answer.device)
    return middle - start, time.perf_counter() - middle, [out.attention_maps, out.phrase_hidden_states]


def flmm_turn(qwen, data: dict) -> tuple[float, float, list]:
    """F-LMM: generate keeping every step's attentions and hidden states, then pool the generated tokens' maps."""
    ids = data["expanded"]
    image_mask = ids == qwen.config.image_token_id
    start = time.perf_counter()
    out = qwen.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=data["pixel_values"],
                        image_grid_thw=data["grid"], mm_token_type_ids=image_mask.long(), output_attentions=True,
                        output_hidden_states=True, return_dict_in_generate=True, **data["generate"])
    _sync(ids.device)
    middle = time.perf_counter()
    image_positions = image_mask[0].nonzero().flatten()
    # out.attentions: per step, per layer (1, heads, q, keys); the first step is the prompt (q = prompt length) and
    # its last row attends for the first generated token, as F-LMM reads it.
    steps = [[layer[0, :, -1:, image_positions] for layer in step] for step in out.attentions]  # (heads, 1, N)
    maps = torch.stack([torch.cat([step[layer] for step in steps], dim=1).float().mean(1)
                        for layer in range(len(steps[0]))])  # (layers, heads, N): mean over generated tokens
    hidden = torch.stack([torch.cat([step[layer + 1][0, -1:] for step in out.hidden_states])
                          for layer in range(len(out.hidden_states[0]) - 1)])  # (layers, T, D)
    _sync(ids.device)
    return middle - start, time.perf_counter() - middle, [maps, hidden]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_way(args: argparse.Namespace) -> None:
    """Child process: build the model, time `--repeats` turns of one way, print one RESULT line."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = qwen_config(args.arch, attn_implementation="eager" if args.only == "flmm" else "sdpa")
    adapter = adapter_for(config)
    with device:
        qwen = adapter.model_class(config).to(dtype).eval()
    data = inputs(args, adapter, device, dtype)
    with torch.no_grad():
        if args.only == "ours":
            lmm = FrozenQwenLMM(qwen=qwen)
            turn = lambda: our_turn(lmm, data)  # noqa: E731
        else:
            turn = lambda: flmm_turn(qwen, data)  # noqa: E731
        with PeakMemory(device) as memory:
            result = turn()  # warm-up (timed out, but its memory counts: on CPU the first turn's RSS rise is the
            # honest one, later turns reuse the heap the allocator kept)
        rows, peaks = [], [memory.rise_mib]
        for _ in range(args.repeats):
            del result
            with PeakMemory(device) as memory:
                result = turn()
            rows.append(result[:2])
            peaks.append(memory.rise_mib)
    generate_s = statistics.median(r[0] for r in rows)
    ground_s = statistics.median(r[1] for r in rows)
    total_s = statistics.median(r[0] + r[1] for r in rows)
    prompt_tokens = data["expanded"].shape[1]
    print(f"RESULT {generate_s} {ground_s} {total_s} {max(peaks)} {prompt_tokens} {data['n_vision']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=sorted(PRESETS), help="a Qwen-VL preset of any family")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square random image (pixels)")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer length in tokens (both ways)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=WAYS, help=argparse.SUPPRESS)  # child process: one way
    args = parser.parse_args(argv)
    if args.only:
        run_way(args)
        return {}

    rows = {}
    for way in WAYS:  # each in a fresh process: memory freed by one cannot hide the other's peak
        child_args = list(argv if argv is not None else sys.argv[1:])
        command = [sys.executable, os.path.abspath(__file__), *child_args, "--only", way]
        done = subprocess.run(command, capture_output=True, text=True)
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not result:
            raise RuntimeError(f"way {way} failed:\n{done.stdout}\n{done.stderr}")
        generate_s, ground_s, total_s, peak, prompt_tokens, n_vision = result[-1].split()[1:]
        rows[way] = (float(generate_s), float(ground_s), float(total_s), float(peak))

    text = qwen_config(args.arch).text_config
    print(f"arch={args.arch} ({PRESETS[args.arch][0]}) layers={text.num_hidden_layers} "
          f"heads={text.num_attention_heads} hidden={text.hidden_size} prompt_tokens={prompt_tokens} "
          f"vision_tokens={n_vision} new_tokens={args.new_tokens} device={args.device} dtype={args.dtype} "
          f"repeats={args.repeats}")
    print(f"{'way':<6}{'generate_s':>12}{'ground_s':>10}{'total_s':>10}{'peak_MiB':>11}")
    for way, (generate_s, ground_s, total_s, peak) in rows.items():
        print(f"{way:<6}{generate_s:>12.4f}{ground_s:>10.4f}{total_s:>10.4f}{peak:>11.1f}")
    time_ratio = rows["ours"][2] / rows["flmm"][2]
    memory_ratio = rows["ours"][3] / max(rows["flmm"][3], 1e-9)
    print(f"ratio ours/flmm: time={time_ratio:.3f} memory={memory_ratio:.3f}")
    return dict(rows=rows, time_ratio=time_ratio, memory_ratio=memory_ratio)


if __name__ == "__main__":
    main()

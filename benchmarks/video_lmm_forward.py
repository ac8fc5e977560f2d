"""Per-clip wall time and peak memory of the clip forward (`FrozenQwenLMM` on video inputs), against the F-LMM-style
baseline: the frozen LMM run with eager attention and `output_attentions=True` over the same clip.

Any Qwen-VL preset works (`--arch` / `--preset`; every family: see `flmm_model.backbones.PRESETS`); the model is
built with random weights from the preset's config. One sample, one clip: `--frames` frames panning across
scikit-image's astronaut photo, `--fps` apart, turned into `pixel_values_videos` / `video_grid_thw` by
`data.clip_pixels.qwen_clip_inputs` with at most `--group-tokens` merged tokens per frame group; the prompt is the
chat text with one compact `<|vision_start|><|video_pad|><|vision_end|>` and the phrases (`--phrases`) in the
answer, tokenized with the family's bundled tokenizer.

Modes, all on the same model and clip in one run, each in its own process (as `lmm_forward.py`):
  sdpa      the default: SDPA forward, softmax recomputed for the phrase-token query rows only; `forward_prepared`
            on the clip prepared on the host beforehand (`FrozenQwenLMM.prepare`, then one copy to the device)
  eager     the reference mode: eager attention, each layer's phrase rows pooled and its full map freed
  baseline  the stock transformers forward over the same expanded inputs (our expanded ids, `mm_token_type_ids`,
            the clip's rows and grid, Qwen2.5-VL's `second_per_grid_ts`) with eager attention, output_attentions=True
            and output_hidden_states=True: every layer's (1, heads, L', L') map alive until the forward ends; the
            word-to-video-token maps pooled afterwards (each phrase's rows averaged, the video-token columns kept)

The maps of every mode are checked against the baseline's (max abs difference <= `--atol`) before the table is
printed: the times compare the cost of one result. Peak memory is the rise above the level before the call (model
and inputs excluded): `torch.cuda.max_memory_allocated` on GPU, the process RSS sampled every millisecond on CPU (a
coarser measure). Time is the median of `--repeats` calls after a warm-up. Examples:

    python benchmarks/video_lmm_forward.py --arch tiny --frames 16
    python benchmarks/video_lmm_forward.py --arch mid --frames 8 --group-tokens 64
    python benchmarks/video_lmm_forward.py --arch qwen3_vl_tiny --frames 8   # timestamp tokens between groups
    python benchmarks/video_lmm_forward.py --arch qwen2_5_vl_3b --frames 32 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmm_forward import measure, run_modes  # noqa: E402  (benchmarks/, the script's folder)

from flmm_model.backbones import PRESETS, adapter_for, load_image_processor, qwen_config  # noqa: E402
from flmm_model.backbones.video import TimestampTokens  # noqa: E402
from flmm_model.build import load_tokenizer  # noqa: E402
from flmm_model.data.clip_pixels import qwen_clip_inputs  # noqa: E402
from flmm_model.modeling.lmm import FrozenQwenLMM  # noqa: E402

MODES = ("baseline", "eager", "sdpa")
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"


def panned_frames(*, frames: int, size: int = 448) -> list[Image.Image]:
    """`frames` size x size crops sliding diagonally across the astronaut photo (512 x 512), upscaled first."""
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut()).resize((size + size // 2,) * 2, Image.BICUBIC)
    step = (photo.width - size) / max(frames - 1, 1)
    return [photo.crop((round(i * step), round(i * step), round(i * step) + size, round(i * step) + size))
            for i in range(frames)]


def make_clip(adapter, tokenizer, *, frames: int, group_tokens: int, fps: float, phrases: list[str]) -> dict:
    """The compact inputs of one sample holding one clip: ids and mask_ids (1, L), the clip's rows, grid, times."""
    factor = adapter.patch_size * adapter.merge_size
    processor = load_image_processor(adapter, min_pixels=factor * factor, max_pixels=group_tokens * factor * factor)
    pixel_values_videos, video_grid_thw = qwen_clip_inputs(panned_frames(frames=frames), processor,
                                                           group_tokens=group_tokens)  # (t*H*W, patch_dim), (1, 3)
    system = adapter.default_system
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    head += f"<|im_start|>user\n{VIDEO_BLOCK}Describe the clip.<|im_end|>\n<|im_start|>assistant\n"
    pieces = [(head, -1)]
    for k, phrase in enumerate(phrases):
        pieces += [(". " if k else "", -1), (phrase, k)]
    pieces.append((".<|im_end|>\n", -1))
    ids, marks = [], []
    for text, k in pieces:  # each piece tokenized on its own: its tokens are exactly phrase k's
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        marks += [k] * len(piece)
    input_ids = torch.tensor([ids])  # (1, L)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mask_ids=torch.tensor([marks]),
                pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                video_frame_times=[torch.arange(frames, dtype=torch.float64) / fps])


def baseline_forward(model, inputs: dict, phrase_rows: list[torch.Tensor], video_columns: torch.Tensor
                     ) -> torch.Tensor:
    """F-LMM style: the HF forward with eager attention and output_attentions=True, pooled afterwards: (K, C, N)."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        layers = [layer[0] for layer in out.attentions]  # (heads, L', L') each, all alive at once
        maps = [torch.cat([layer[:, rows][:, :, video_columns].float().mean(1) for layer in layers])
                for rows in phrase_rows]  # per object (layers * heads, N), channel = layer * heads + head
    return torch.stack(maps)


def run_mode(args: argparse.Namespace) -> None:
    """Child process: build the model and the clip, measure one mode, save its maps and print one RESULT line."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = qwen_config(args.arch, attn_implementation="sdpa")
    adapter = adapter_for(config)
    with device:
        qwen = adapter.model_class(config).to(dtype).eval()
    tokenizer = load_tokenizer(backbone=args.arch)
    lmm = FrozenQwenLMM(qwen=qwen, attn_capture="eager" if args.only == "baseline" else args.only,
                        timestamp_tokens=TimestampTokens.from_tokenizer(tokenizer), max_video_tokens=None)
    clip = make_clip(adapter, tokenizer, frames=args.frames, group_tokens=args.group_tokens, fps=args.fps,
                     phrases=args.phrases)
    clip["pixel_values_videos"] = clip["pixel_values_videos"].to(dtype)
    prepared = lmm.prepare(clip.pop("input_ids"), clip.pop("attention_mask"), mask_ids=clip.pop("mask_ids"),
                           **clip)  # on the host: expanded ids (1, L'), positions, video mask
    prepared = prepared.to(device)
    if args.only == "baseline":
        video_mask = prepared.video_mask  # (1, L') bool
        inputs = dict(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                      pixel_values_videos=prepared.pixel_values_videos, video_grid_thw=prepared.video_grid_thw,
                      mm_token_type_ids=2 * video_mask.long())  # 2: video token, as the HF processors mark it
        if config.model_type == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = prepared.second_per_grid_ts
        phrase_rows = [(prepared.mask_ids[0] == k).nonzero().flatten() for k in range(len(args.phrases))]
        video_columns = video_mask[0].nonzero().flatten()  # (N,), timestamp tokens between groups excluded
        config.text_config._attn_implementation = "eager"
        config.vision_config._attn_implementation = "sdpa"  # the stock vision attention, one call per window
        seconds, peak, maps = measure(lambda: baseline_forward(lmm.qwen.model, inputs, phrase_rows, video_columns),
                                      device, args.repeats)
    else:
        seconds, peak, out = measure(lambda: lmm.forward_prepared(prepared), device, args.repeats)
        maps = out.attention_maps[0].flatten(2)  # (K, C, G, h, w) -> (K, C, N)
    torch.save(maps.float().cpu(), args.maps_file)
    t, h, w = prepared.video_grid_thw[0].tolist()
    print(f"RESULT {seconds} {peak} {prepared.input_ids.shape[1]} {prepared.num_video_tokens[0]} {t} {h} {w}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", "--preset", default="tiny", choices=sorted(PRESETS),
                        help="a Qwen-VL preset of any family (random weights)")
    parser.add_argument("--frames", type=int, default=8, help="frames of the clip (2 per frame group)")
    parser.add_argument("--group-tokens", type=int, default=256, help="most merged video tokens per frame group")
    parser.add_argument("--fps", type=float, default=2.0, help="the sampled frames' rate (their times)")
    parser.add_argument("--phrases", nargs="+", default=["the astronaut", "her helmet", "the flag"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--atol", type=float, help="largest map difference allowed (default: 1e-4, 5e-2 in 16 bit)")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)  # child process: one mode
    parser.add_argument("--maps-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        run_mode(args)
        return {}
    atol = args.atol if args.atol is not None else 5e-2 if args.dtype in ("bfloat16", "float16") else 1e-4

    results, maps = run_modes(__file__, argv, MODES)  # each mode in a fresh process; maps (K, C, N)
    rows = {mode: (float(fields[0]), float(fields[1])) for mode, fields in results.items()}
    seq_len, n_video, t, h, w = results[MODES[-1]][2:7]

    diffs = {mode: float((maps[mode] - maps["baseline"]).abs().max()) for mode in MODES}
    if any(maps[mode].shape != maps["baseline"].shape for mode in MODES) or max(diffs.values()) > atol:
        raise RuntimeError(f"the maps differ from the baseline's: shapes {[tuple(m.shape) for m in maps.values()]}, "
                           f"max abs differences {diffs} (atol {atol})")
    config = qwen_config(args.arch)
    text, merge = config.text_config, config.vision_config.spatial_merge_size
    print(f"arch={args.arch} ({PRESETS[args.arch][0]}) layers={text.num_hidden_layers} "
          f"heads={text.num_attention_heads} kv_heads={text.num_key_value_heads} hidden={text.hidden_size} "
          f"frames={args.frames} groups*h*w={t}*{int(h) // merge}*{int(w) // merge} video_tokens={n_video} "
          f"seq_len={seq_len} phrases={len(args.phrases)} channels={maps['baseline'].shape[1]} "
          f"device={args.device} dtype={args.dtype} repeats={args.repeats}")
    print(f"{'mode':<10}{'s/clip':>10}{'peak_MiB':>12}{'time/base':>11}{'mem/base':>10}{'max|maps - baseline|':>24}")
    base_seconds, base_peak = rows["baseline"]
    for mode, (seconds, peak) in rows.items():
        print(f"{mode:<10}{seconds:>10.4f}{peak:>12.1f}{seconds / base_seconds:>11.3f}"
              f"{peak / max(base_peak, 1e-9):>10.3f}{diffs[mode]:>24.2e}")
    time_ratio = rows["sdpa"][0] / base_seconds
    memory_ratio = rows["sdpa"][1] / max(base_peak, 1e-9)
    print(f"ratio default/baseline: time={time_ratio:.3f} memory={memory_ratio:.3f}")
    return dict(rows=rows, diffs=diffs, video_tokens=int(n_video), seq_len=int(seq_len), time_ratio=time_ratio,
                memory_ratio=memory_ratio)


if __name__ == "__main__":
    main()

"""SAM2 propagation on synthetic clips: J&F of the ground-truth first-frame mask propagated by SAM2 vs copied to every
frame (the no-propagation baseline), with time and peak memory per clip.

    PYTHONPATH=. python benchmarks/video_propagation.py [--sam2 DIR_OR_PRESET] [--clips 2] [--frames 4]

By default the model is the `sam2_tiny` preset, RANDOM weights: its numbers show the pipeline runs, not tracking
quality (a real SAM2.1 directory: --sam2 /ckpt/sam2.1-hiera-large). Peak memory is CUDA's when on a GPU, else the
process's max RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from flmm_model.build import build_sam
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.modeling.sam2_propagation import Sam2Propagator
from flmm_model.video_metrics import VideoSegMetric


def run(*, sam2: str = "sam2_tiny", clips: int = 2, frames: int = 4, seed: int = 0) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    model = build_sam(sam2, seed=seed)  # a Sam2VideoModel: a directory's weights, or a preset's random ones
    propagator = Sam2Propagator(sam2=model).to(device)
    dataset = SyntheticClips(length=clips, seed=seed, num_frames=frames, image_size=(64, 96), max_objects=2)
    propagated, copied, seconds, peaks = VideoSegMetric(), VideoSegMetric(), [], []
    for index in range(clips):
        clip = dataset[index]
        frame_tensors = [torch.from_numpy(np.array(f)).permute(2, 0, 1).contiguous() for f in clip.frames]
        gt = torch.from_numpy(clip.gt_masks)  # (K, T, H, W) bool
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        logits = propagator.propagate(frame_tensors, {0: gt[:, 0]})
        seconds.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        propagated.update((logits > 0).cpu(), gt)
        copied.update(gt[:, :1].expand_as(gt).clone(), gt)
    name = "sam2_tiny (random weights)" if sam2 == "sam2_tiny" else sam2
    return {"model": name, "device": device, "clips": clips, "frames": frames,
            "propagated": propagated.compute(), "copied": copied.compute(),
            "seconds_per_clip": sum(seconds) / clips, "peak_mib": max(peaks)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam2", default="sam2_tiny", help="SAM2 video checkpoint dir or preset (default: sam2_tiny, "
                                                             "random weights)")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args(argv)
    result = run(sam2=args.sam2, clips=args.clips, frames=args.frames)
    print(f"model: {result['model']} on {result['device']}, {result['clips']} synthetic clips x {result['frames']} "
          "frames, first-frame GT mask as the key")
    print("| method | J&F | J | F | s/clip | peak MiB |\n|---|---|---|---|---|---|")
    for name in ("propagated", "copied"):
        m = result[name]
        timing = f"{result['seconds_per_clip']:.1f} | {result['peak_mib']:.0f}" if name == "propagated" else "- | -"
        print(f"| {name} | {m['J&F']:.1f} | {m['J']:.1f} | {m['F']:.1f} | {timing} |")
    return result


if __name__ == "__main__":
    main()

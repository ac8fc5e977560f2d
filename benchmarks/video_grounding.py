"""Video grounding of a trained model on synthetic moving-shapes clips: J&F of the masks the model gives when the
frozen LMM watches each clip, three ways, with time and peak memory per clip.

    PYTHONPATH=. python benchmarks/video_grounding.py --checkpoint runs/demo_video [--clips 32] [--frames 8]

Rows (the same clips, the same trained heads, one run):
- propagated (a SAM2 video refiner only): key frames (the first frame of every frame group) refined from their
  group's maps, the rest carried by SAM2's video memory (`GroundingModel.complete_clip`; the model's default then);
- per-frame: every frame refined from its frame group's maps, no memory (`model.clip_propagation = False`; the
  only route of a SAM refiner);
- copied: frame 0's mask of the model's default route copied to every frame (the no-tracking baseline);
- all-foreground: the trivial mask, for scale.
The clips are the test split of configs/demo_video.yaml unless --seed / --frames / --size say otherwise. Peak
memory is CUDA's when on a GPU, else the process's max RSS (a high-water mark over the whole run).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from flmm_model.data.item import PromptSettings
from flmm_model.data.loader import collate
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.data.video_grounding import VideoGroundingDataset
from flmm_model.model import FrozenQwenSAM
from flmm_model.video_metrics import VideoSegMetric


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def run(*, checkpoint: str, clips: int = 32, frames: int = 8, size: tuple[int, int] = (160, 256), seed: int = 2,
        max_objects: int = 2, group_tokens: int = 64, device: str = "cpu") -> dict:
    model = FrozenQwenSAM.from_pretrained(checkpoint, device=device).eval()
    prompt = PromptSettings(tokenizer=model.tokenizer, image_processor=model.image_processor,
                            instruction=model.instruction, system=model.system, max_length=model.max_length)
    source = SyntheticClips(length=clips, seed=seed, num_frames=frames, image_size=size, max_objects=max_objects)
    dataset = VideoGroundingDataset(source, max_frames=frames, prompt=prompt, group_tokens=group_tokens)
    routes = [("propagated", True), ("per-frame", False)] if model.propagates else [("per-frame", False)]
    rows = [name for name, _ in routes] + ["copied", "all-foreground"]
    metrics = {row: VideoSegMetric() for row in rows}
    seconds = {name: 0.0 for name, _ in routes}
    for index in range(clips):
        item = dataset[index]
        batch = collate([item], pad_token_id=model.tokenizer.pad_token_id)
        flags, gt = item["has_gt"], item["gt_masks"]  # (N,), (K, N, H, W)
        for position, (row, propagate) in enumerate(routes):
            model.clip_propagation = propagate
            start = time.perf_counter()
            masks = model.predict_masks(batch)[0].cpu()  # (K, N, H, W)
            seconds[row] += time.perf_counter() - start
            metrics[row].update(masks[:, flags], gt[:, flags])
            if position == 0:  # the default route's frame 0 on every frame
                first = masks[:, :1].expand_as(masks)
                metrics["copied"].update(first[:, flags], gt[:, flags])
        metrics["all-foreground"].update(torch.ones_like(gt[:, flags]), gt[:, flags])
    model.clip_propagation = True
    return {"checkpoint": checkpoint, "device": device, "clips": clips, "frames": frames,
            "scores": {row: metric.compute() for row, metric in metrics.items()},
            "seconds_per_clip": {row: value / clips for row, value in seconds.items()}, "peak_mib": peak_mib(device)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint of a video-trained model")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[160, 256], help="[min, max] frame side (pixels)")
    parser.add_argument("--seed", type=int, default=2, help="clip seed (2: configs/demo_video.yaml's test split)")
    parser.add_argument("--group-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    result = run(checkpoint=args.checkpoint, clips=args.clips, frames=args.frames, size=tuple(args.size),
                 seed=args.seed, group_tokens=args.group_tokens, device=args.device)
    print(f"{args.checkpoint} on {result['device']}: {result['clips']} synthetic clips x {result['frames']} frames, "
          f"peak memory {result['peak_mib']:.0f} MiB")
    print(f"{'row':<16}{'J&F':>8}{'J':>8}{'F':>8}{'s / clip':>10}")
    for row, score in result["scores"].items():
        timing = result["seconds_per_clip"].get(row)
        print(f"{row:<16}{score['J&F']:>8.2f}{score['J']:>8.2f}{score['F']:>8.2f}"
              f"{'' if timing is None else f'{timing:.3f}':>10}")
    return result


if __name__ == "__main__":
    main()

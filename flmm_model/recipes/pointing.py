"""Does the frozen LMM's raw attention point at the object a phrase names? The pointing game over a dataset.

For each object: the attention maps F-LMM captures (every layer and head, from the phrase's tokens to the image
tokens, averaged over the phrase's tokens) are averaged over all layers and heads into one (h, w) map, and the
argmax cell is checked against the ground-truth mask (`flmm_model.metrics.pointing_hits`). No training is
involved: the number says how much grounding the LMM's attention carries before any head sees it. Chance is the
hit rate of a uniformly random cell.
"""

from __future__ import annotations

from typing import Any

import torch

from flmm_model.distributed import lockstep_batches
from flmm_model.metrics import PointingMetric
from flmm_model.modeling.lmm import FrozenQwenLMM


@torch.no_grad()
def score_pointing(lmm: FrozenQwenLMM, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Pointing accuracy of the LMM's layer- and head-averaged attention over every object of `loader`.

    Args:
        lmm: the frozen LMM stage (e.g. `FrozenQwenSAM.lmm`).
        loader: collated batches with `gt_masks` (this process's shard; the sums are reduced over processes). A
            clip sample counts each frame with ground truth, read from its frame group's maps.

    Returns:
        {"pointing", "pointing_chance"} in percent and "count" (objects).
    """
    metric = PointingMetric()
    for batch, scored in lockstep_batches(loader, sharded=lmm.sharded):  # a sharded LMM: as many forwards per rank
        if len(batch["images"]) == 0:
            continue
        clips = {key: batch[key] for key in ("pixel_values_videos", "video_grid_thw", "video_frame_times")
                 if key in batch}  # a batch with clips
        out = lmm(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                  batch["mask_ids"], grounded_image=batch.get("grounded_image"), **clips)
        if not scored:
            continue
        flags = batch.get("has_gt") or [None] * len(out.attention_maps)
        temporal = lmm.qwen.config.vision_config.temporal_patch_size if clips else 1
        for maps, gt_masks, has_gt in zip(out.attention_maps, batch["gt_masks"], flags, strict=True):
            if has_gt is None:
                metric.update(maps.mean(dim=1), gt_masks)  # (K, C, h, w) -> (K, h, w): all layers and heads
                continue
            for frame in torch.nonzero(has_gt).flatten().tolist():  # a clip: each frame with ground truth
                metric.update(maps[:, :, frame // temporal].mean(dim=1), gt_masks[:, frame])  # its group's maps
    return metric.compute()


def pointing_rows(label: str, scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Table rows `<label> LMM attention pointing` and `<label> pointing chance` (column "pointing (%)")."""
    return {f"{label} LMM attention pointing": {"pointing (%)": scores["pointing"]},
            f"{label} pointing chance": {"pointing (%)": scores["pointing_chance"]}}

"""Key-frame masks -> masks on every frame of a clip, tracked by SAM2's video memory (transformers' Sam2VideoModel).

The refiner segments the key frames; `Sam2Propagator.propagate` hands those masks to SAM2 as mask prompts and lets
its memory attention carry them through the clip. The tracking itself is transformers' own inference session
(`Sam2VideoInferenceSession` + `Sam2VideoModel.propagate_in_video_iterator`); what lives here is the interface:

- frames: T uint8 (3, H, W) tensors of one size -> SAM2 input, (T, 3, S, S) float: resized (bilinear, antialiased)
  to S x S (S = the prompt encoder's image_size, 1024 for the released checkpoints; no aspect-preserving pad, as
  `Sam2VideoVideoProcessor` does), scaled to [0, 1] and normalized with ImageNet's mean / std.
- key masks: (K, H, W) logits (> 0 = object) or bool -> (1, 1, S, S) {0, 1} per object, the way
  `Sam2VideoProcessor.process_new_mask_for_video_frame` maps them (antialiased bilinear, then >= 0.5).
- all K objects share one session (object ids 0..K-1); propagation runs forward from the first key frame to the
  last frame, then (reverse=True) backward from it to frame 0.
- output: SAM2's low-res logits (K, 1, s, s) per frame -> (K, T, H, W) float32 logits: bilinear to S x S, then to
  (H, W), as `Sam2VideoVideoProcessor.post_process_masks` does (without binarizing).

Frozen three ways: requires_grad_(False), kept in eval by `train()`, run under no_grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Sam2VideoConfig, Sam2VideoInferenceSession, Sam2VideoModel

from flmm_model.modeling.sam2_refiner import IMAGENET_MEAN, IMAGENET_STD


class Sam2Propagator(nn.Module):
    """Propagate key-frame masks of K objects through a clip with a frozen SAM2 video model.

    Args:
        sam2: a built transformers Sam2VideoModel (real weights or a tiny random one); frozen here.
        freeze: freeze `sam2` (requires_grad_(False), eval). False borrows a model whose parameters belong to
            someone else, e.g. a `Sam2Refiner` whose prompt encoder and decoder train: the caller puts it in eval,
            and `propagate` runs under no_grad either way.
    """

    def __init__(self, *, sam2: Sam2VideoModel, freeze: bool = True) -> None:
        super().__init__()
        self.sam2 = sam2
        self.image_size = int(sam2.config.prompt_encoder_config.image_size)  # S
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if freeze:
            sam2.requires_grad_(False)
            sam2.eval()

    def train(self, mode: bool = True) -> Sam2Propagator:
        super().train(mode)
        self.sam2.eval()  # frozen: always in eval
        return self

    def preprocess(self, frames: list[Tensor]) -> Tensor:
        """T uint8 (3, H, W) -> (T, 3, S, S) float32 normalized SAM2 input on the model's device."""
        device = self.pixel_mean.device
        video = torch.stack(list(frames)).to(device=device, dtype=torch.float32)  # (T, 3, H, W), 0-255
        video = F.interpolate(video, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)  # (T, 3, S, S)
        return (video / 255.0 - self.pixel_mean) / self.pixel_std

    def prompt_mask(self, mask: Tensor) -> Tensor:
        """(H, W) logits or bool -> (1, 1, S, S) float {0, 1} mask prompt (Sam2VideoProcessor's mapping)."""
        binary = (mask > 0 if mask.dtype != torch.bool else mask).float()[None, None]  # (1, 1, H, W)
        resized = F.interpolate(binary.to(self.pixel_mean.device), size=(self.image_size, self.image_size),
                                mode="bilinear", align_corners=False, antialias=True)  # (1, 1, S, S)
        return (resized >= 0.5).float()

    def check(self, frames: list[Tensor], key_masks: dict[int, Tensor]) -> tuple[int, int, int]:
        """Validate inputs; returns (K, H, W)."""
        if len(frames) == 0:
            raise ValueError("Sam2Propagator.propagate: frames is empty")
        for t, frame in enumerate(frames):
            if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[0] != 3:
                raise ValueError(f"Sam2Propagator.propagate: frame {t} must be a uint8 (3, H, W) tensor, found "
                                 f"{frame.dtype} of shape {tuple(frame.shape)}")
            if frame.shape != frames[0].shape:
                raise ValueError(f"Sam2Propagator.propagate: frames differ in size: frame 0 is "
                                 f"{tuple(frames[0].shape[1:])}, frame {t} is {tuple(frame.shape[1:])}")
        if not key_masks:
            raise ValueError("Sam2Propagator.propagate: key_masks has no key frame")
        height, width = frames[0].shape[1:]
        num_objects = None
        for index, masks in key_masks.items():
            if not 0 <= index < len(frames):
                raise ValueError(f"Sam2Propagator.propagate: key frame index {index} out of range for "
                                 f"{len(frames)} frames")
            if masks.dim() != 3 or tuple(masks.shape[1:]) != (height, width):
                raise ValueError(f"Sam2Propagator.propagate: key_masks[{index}] must be (K, {height}, {width}), "
                                 f"found {tuple(masks.shape)}")
            if num_objects is None:
                num_objects = masks.shape[0]
            if masks.shape[0] != num_objects or num_objects == 0:
                raise ValueError(f"Sam2Propagator.propagate: every key frame must hold the same K >= 1 objects, "
                                 f"key_masks[{index}] has {masks.shape[0]}, expected {num_objects}")
        return num_objects, height, width

    @torch.no_grad()
    def propagate(self, frames: list[Tensor], key_masks: dict[int, Tensor], *, reverse: bool = True) -> Tensor:
        """Track K objects through the clip from their key-frame masks.

        Args:
            frames: T uint8 (3, H, W) tensors of one clip, all of one size.
            key_masks: {frame index: (K, H, W) float logits (> 0 = object) or bool masks}, the same K objects.
            reverse: also propagate backward from the first key frame to frame 0 (else earlier frames stay at
                -inf-like logits, -1e4).

        Returns:
            (K, T, H, W) float32 mask logits at the original size, on the model's device.
        """
        num_objects, height, width = self.check(frames, key_masks)
        device = self.pixel_mean.device
        dtype = next(self.sam2.parameters()).dtype
        session = Sam2VideoInferenceSession(
            video=self.preprocess(frames), video_height=height, video_width=width, inference_device=device,
            inference_state_device=device, video_storage_device=device, dtype=dtype)
        obj_ids = list(range(num_objects))
        for index in sorted(key_masks):
            for obj_id in obj_ids:
                obj_idx = session.obj_id_to_idx(obj_id)
                session.add_mask_inputs(obj_idx, index, self.prompt_mask(key_masks[index][obj_id]).to(dtype))
                session.remove_point_inputs(obj_idx, index)
            session.obj_with_new_inputs = list(obj_ids)
            self.sam2(session, frame_idx=index)  # the key frame's conditioning output and memory

        low_res: dict[int, Tensor] = {}
        start = min(key_masks)
        directions = [False, True] if reverse else [False]
        for backward in directions:
            for output in self.sam2.propagate_in_video_iterator(session, start_frame_idx=start, reverse=backward):
                low_res.setdefault(output.frame_idx, output.pred_masks)  # (K, 1, s, s)

        logits = torch.full((num_objects, len(frames), height, width), -1e4, dtype=torch.float32, device=device)
        for t, masks in low_res.items():
            upsampled = F.interpolate(masks.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                      align_corners=False)  # (K, 1, S, S)
            logits[:, t] = F.interpolate(upsampled, size=(height, width), mode="bilinear",
                                         align_corners=False)[:, 0]  # (K, H, W)
        return logits


def sam2_video_tiny_config() -> Sam2VideoConfig:
    """A tiny random SAM2 video config for tests: five Hiera blocks, hidden 128, memory 64 (transformers' object
    pointer split needs memory < hidden, and its memory attention takes 64-channel memories); S stays 1024 so the
    processor's sizes apply unchanged (what the reference test against transformers' processor path needs; the
    `sam2_tiny` preset of `flmm_model.build`, 256 px, is the one model and demo use)."""
    return Sam2VideoConfig(
        vision_config={
            "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": 8,
                                "blocks_per_stage": [1, 1, 2, 1],
                                "embed_dim_per_stage": [8, 16, 32, 64], "num_attention_heads_per_stage": [1, 1, 1, 1],
                                "window_size_per_stage": [8, 4, 14, 7], "global_attention_blocks": [3]},
            "backbone_channel_list": [64, 32, 16, 8], "fpn_hidden_size": 128,
        },
        prompt_encoder_config={"hidden_size": 128},
        mask_decoder_config={"hidden_size": 128, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
        memory_attention_hidden_size=128, memory_attention_num_layers=1, memory_attention_num_attention_heads=1,
        memory_attention_feed_forward_hidden_size=64, memory_encoder_hidden_size=128, memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
        num_maskmem=3,
    )

"""Clips expanded model-side, against the HF processor path, for each family that takes video.

Reference: the family's real HF processor (`Qwen2VLProcessor`, `Qwen2_5_VLProcessor`, `Qwen3VLProcessor`; Qwen3.5
uses Qwen3-VL's) on the chat text with one `<|vision_start|><|video_pad|><|vision_end|>` per clip: it expands the
pads, writes Qwen3-VL's `<t seconds>` timestamps, derives Qwen2.5-VL's `second_per_grid_ts` and the
`mm_token_type_ids`; the family's model then runs on that expanded input (HF's `get_rope_index`, its video features,
its generate). Ours starts from the compact ids and `video_frame_times`.

The HF video processors need torchvision, which these machines cannot install beside the CPU torch (see
shared/notes/qwen2_5_vl.md). The processors get `FramesVideoProcessor` instead: a `BaseVideoProcessor` that resizes
frames with PIL to the family's `smart_resize` size and lays the patches out as the HF video processor does
(last frame repeated to an even count). Pixels only feed the vision tower, the same rows on both sides; everything
the model side reproduces (ids, timestamps, timing, positions) comes from the real processor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_lmm_forward import encode  # padded ids and mask_ids from character offsets
from test_multi_image import with_answer
from transformers import BatchFeature
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen3_vl import Qwen3VLProcessor
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from flmm_model.backbones import PRESETS, adapter_for, load_image_processor
from flmm_model.backbones.video import TimestampTokens, group_timestamps, second_per_grid, timestamp_text
from flmm_model.build import build_qwen, load_tokenizer
from flmm_model.modeling.lmm import FrozenQwenLMM

# Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE
FAMILY_PRESETS = ["qwen2_vl_tiny", "tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]
PROCESSORS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor,
              "qwen3_vl_moe": Qwen3VLProcessor, "qwen3_5": Qwen3VLProcessor, "qwen3_5_moe": Qwen3VLProcessor}
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
# Per sample: (clip (frames, total frames of the source, its fps, frame size (W, H)) or None, has an image, phrases).
# Clip 0: 4 of 8 frames at 4 fps (t = 2); clip 1: 5 of 10 frames at 0.4 fps (odd: t = 3, timestamps up to 20 s);
# clip 2: 2 of 6 frames at 3 fps, beside an image in the same sample.
SAMPLES = [(dict(frames=4, total=8, fps=4.0, size=(150, 100)), False, ["the man", "his helmet"]),
           (dict(frames=5, total=10, fps=0.4, size=(90, 130)), False, ["the flag"]),
           (dict(frames=2, total=6, fps=3.0, size=(120, 120)), True, ["the cat", "a man"])]
GENERATE = dict(max_new_tokens=5, do_sample=False)


class FramesVideoProcessor(BaseVideoProcessor):
    """The HF video processor's output layout without torchvision: every frame resized (PIL, bicubic) to the clip's
    `smart_resize` size, rescaled and normalized, the frame count padded to a multiple of `temporal_patch_size` with
    the last frame, patches in (group, row block, column block, merge row, merge column, channel, frame, y, x) order;
    with the clips' `VideoMetadata` (what the processors read the fps and frame indices from)."""

    def __init__(self, *, patch_size: int, merge_size: int, temporal_patch_size: int, image_mean, image_std,
                 max_pixels: int, metadata: list[VideoMetadata]) -> None:
        super().__init__()
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        self.mean, self.std = np.array(image_mean), np.array(image_std)
        self.max_pixels, self.metadata = max_pixels, metadata

    def __call__(self, videos, **kwargs) -> BatchFeature:
        rows, grids = [], []
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        for clip in videos:  # (F, H, W, 3) uint8
            h, w = smart_resize(clip.shape[1], clip.shape[2], factor=p * m, min_pixels=p * p * m * m,
                                max_pixels=self.max_pixels)
            frames = np.stack([np.asarray(Image.fromarray(frame).resize((w, h), Image.BICUBIC)) for frame in clip])
            frames = ((frames / 255.0 - self.mean) / self.std).transpose(0, 3, 1, 2)  # (F, 3, h, w)
            frames = np.concatenate([frames, frames[-1:].repeat(-len(frames) % tp, 0)])  # (t * tp, 3, h, w)
            t, gh, gw = len(frames) // tp, h // p, w // p
            patches = frames.reshape(t, tp, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
            rows.append(patches.reshape(t * gh * gw, 3 * tp * p * p))
            grids.append([t, gh, gw])
        return BatchFeature({"pixel_values_videos": torch.tensor(np.concatenate(rows), dtype=torch.float32),
                             "video_grid_thw": torch.tensor(grids), "video_metadata": self.metadata})


def with_frames_video_processor(processor_class: type) -> type:
    """`processor_class` accepting `FramesVideoProcessor` (its constructor checks the video processor against the
    auto classes, which are torchvision placeholders here); everything else is the class's own code."""

    class Processor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, FramesVideoProcessor):
                return FramesVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    return Processor


def make_clips(photos) -> list[tuple[np.ndarray, VideoMetadata, list[float]]]:
    """Each clip: frames panning over a photo, its metadata, and its frame times (index / fps)."""
    clips = []
    for (clip, _, _), photo in zip(SAMPLES, photos, strict=False):
        width, height = clip["size"]
        source = np.asarray(photo.resize((width + 8 * clip["frames"], height)))
        frames = np.stack([source[:, 8 * i: 8 * i + width] for i in range(clip["frames"])])
        indices = [int(i) for i in np.arange(0, clip["total"], clip["total"] / clip["frames"])]
        metadata = VideoMetadata(total_num_frames=clip["total"], fps=clip["fps"], frames_indices=indices)
        clips.append((frames, metadata, [i / clip["fps"] for i in indices]))
    return clips


def chat(phrases: list[str], *, has_image: bool, system: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Chat text with the clip (and the image) right after the user turn's header, and each phrase's span."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    image = "<|vision_start|><|image_pad|><|vision_end|>" if has_image else ""
    text += f"<|im_start|>user\n{image}{VIDEO_BLOCK}Describe the clip.<|im_end|>\n<|im_start|>assistant\n"
    return with_answer(text, phrases)


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def setup(preset, photos):
    """Tokenizer, processor, the compact batch, the processor's expanded batch, HF's and our models."""
    model_type = PRESETS[preset][0]
    adapter = adapter_for(model_type)
    tokenizer = load_tokenizer(backbone=preset)
    clips = make_clips(photos)
    image_processor = load_image_processor(adapter, min_pixels=56 * 56, max_pixels=112 * 112)
    video_processor = FramesVideoProcessor(
        patch_size=adapter.patch_size, merge_size=adapter.merge_size, temporal_patch_size=adapter.temporal_patch_size,
        image_mean=adapter.image_mean, image_std=adapter.image_std, max_pixels=112 * 112,
        metadata=[metadata for _, metadata, _ in clips])
    processor = with_frames_video_processor(PROCESSORS[model_type])(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)
    texts, spans = zip(*[chat(phrases, has_image=has_image, system=adapter.default_system)
                         for _, has_image, phrases in SAMPLES], strict=True)
    images = [photos[3]]  # the third sample's image
    # float64 for Qwen3.5, whose tiny recurrent layers grow kernel rounding past 1e-4 (as tests/test_lmm_forward.py)
    dtype = torch.float64 if model_type.startswith("qwen3_5") else torch.float32
    hf, hf_eager, ours = (build_qwen(preset, attn_implementation=attention).eval().to(dtype)
                          for attention in ("sdpa", "eager", "sdpa"))
    if dtype == torch.float64 and "moe" in preset:  # the grouped-GEMM experts take float32 / bf16 / fp16 only
        for model in (hf, hf_eager, ours):
            model.set_experts_implementation("eager")
    lmm = FrozenQwenLMM(qwen=ours, timestamp_tokens=TimestampTokens.from_tokenizer(tokenizer))
    return dict(adapter=adapter, tokenizer=tokenizer, processor=processor, texts=list(texts), spans=spans,
                images=images, clips=clips, frame_times=[torch.tensor(t, dtype=torch.float64) for _, _, t in clips],
                hf=hf, hf_eager=hf_eager, lmm=lmm, dtype=dtype)


def processed(setup, padding_side: str) -> BatchFeature:
    """The HF processor's batch for the chat texts, images and clips."""
    tokenizer = setup["tokenizer"]
    tokenizer.padding_side = padding_side
    try:
        return setup["processor"](text=setup["texts"], images=setup["images"],
                                  videos=[frames for frames, _, _ in setup["clips"]], padding=True,
                                  return_tensors="pt", return_metadata=True)
    finally:
        tokenizer.padding_side = "right"


def hf_inputs(setup, batch: BatchFeature) -> dict:
    """The model keywords of the processor's batch (Qwen2.5-VL also reads `second_per_grid_ts`)."""
    dtype = setup["dtype"]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"],
                  pixel_values_videos=batch["pixel_values_videos"].to(dtype), video_grid_thw=batch["video_grid_thw"],
                  mm_token_type_ids=batch["mm_token_type_ids"])
    if "second_per_grid_ts" in batch:
        inputs["second_per_grid_ts"] = batch["second_per_grid_ts"]
    return inputs


def hf_positions(setup, batch: BatchFeature) -> torch.Tensor:
    kwargs = dict(image_grid_thw=batch["image_grid_thw"], video_grid_thw=batch["video_grid_thw"],
                  attention_mask=batch["attention_mask"], mm_token_type_ids=batch["mm_token_type_ids"])
    if "second_per_grid_ts" in batch:
        kwargs["second_per_grid_ts"] = batch["second_per_grid_ts"]
    positions, _ = setup["hf"].model.get_rope_index(batch["input_ids"], **kwargs)
    return positions


def compact(setup, padding_side: str) -> dict:
    """Our compact batch: the chat texts tokenized as they are (one pad per image and per clip)."""
    ids, attn, mask_ids = encode(setup["tokenizer"], setup["texts"], setup["spans"], padding_side)
    return dict(input_ids=ids, attention_mask=attn, mask_ids=mask_ids)


def clip_kwargs(setup, batch: BatchFeature) -> dict:
    dtype = setup["dtype"]
    return dict(pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"],
                pixel_values_videos=batch["pixel_values_videos"].to(dtype), video_grid_thw=batch["video_grid_thw"],
                video_frame_times=setup["frame_times"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_clip_forward_matches_hf_processor_path(setup, padding_side):
    batch = processed(setup, padding_side)
    inputs = compact(setup, padding_side)
    out = setup["lmm"](inputs["input_ids"], inputs["attention_mask"], mask_ids=inputs["mask_ids"],
                       **clip_kwargs(setup, batch))

    assert torch.equal(out.input_ids, batch["input_ids"])
    assert torch.equal(out.attention_mask, batch["attention_mask"])
    assert torch.equal(out.position_ids, hf_positions(setup, batch))
    with torch.no_grad():
        reference = setup["hf"].model(**hf_inputs(setup, batch)).last_hidden_state
    valid = batch["attention_mask"].bool()
    tolerance = 1e-8 if setup["dtype"] == torch.float64 else 1e-4
    torch.testing.assert_close(out.last_hidden_state[valid], reference[valid], atol=tolerance, rtol=tolerance)

    # Grounding: the clip-only samples on their clip, (K, C, G, h, w); the third on its image, (K, C, h, w).
    merge = setup["adapter"].merge_size
    for b, maps in enumerate(out.attention_maps):
        if SAMPLES[b][1]:
            _, h, w = batch["image_grid_thw"][0].tolist()
            assert maps.shape[2:] == (h // merge, w // merge) and out.grounded_clip[b] == -1
        else:
            t, h, w = batch["video_grid_thw"][b].tolist()
            assert maps.shape[2:] == (t, h // merge, w // merge) and out.grounded_clip[b] == 0
            assert out.grounded_image[b] == -1 and out.grid_hw[b] == (h // merge, w // merge)
        assert maps.shape[:2] == (len(SAMPLES[b][2]), setup["lmm"].num_attention_channels)


def pooled_reference_maps(setup, batch: BatchFeature, mask_ids: torch.Tensor, grounded: list[torch.Tensor]):
    """Eager HF attention pooled by hand: per sample (K, C, N) over the given token positions."""
    with torch.no_grad():
        attentions = setup["hf_eager"].model(**hf_inputs(setup, batch), output_attentions=True).attentions
    maps = []
    for b, positions in enumerate(grounded):
        per_object = []
        for k in range(int(mask_ids[b].max()) + 1):
            rows = (mask_ids[b] == k).nonzero().flatten()
            per_object.append(torch.stack([layer[b, head][rows][:, positions].mean(0)
                                           for layer in attentions for head in range(layer.shape[1])]))
        maps.append(torch.stack(per_object))  # (K, C, N)
    return maps


def test_clip_attention_maps_match_eager_reference(setup):
    """Every sample grounded on its clip (the third explicitly: it also holds an image): the maps are the eager
    weights from each phrase to all the clip's video tokens (all frame groups, timestamps between them excluded)."""
    batch = processed(setup, "right")
    inputs = compact(setup, "right")
    out = setup["lmm"](inputs["input_ids"], inputs["attention_mask"], mask_ids=inputs["mask_ids"],
                       grounded_clip=[None, None, 0], **clip_kwargs(setup, batch))
    video_token_id = setup["hf"].config.video_token_id
    grounded = [(batch["input_ids"][b] == video_token_id).nonzero().flatten() for b in range(len(SAMPLES))]
    reference = pooled_reference_maps(setup, batch, out.mask_ids, grounded)
    tolerance = 1e-8 if setup["dtype"] == torch.float64 else 1e-5
    for b, maps in enumerate(out.attention_maps):
        t, h, w = (batch["video_grid_thw"][b] // torch.tensor([1, 2, 2])).tolist()
        assert maps.shape[2:] == (t, h, w) and out.grounded_clip[b] == 0
        torch.testing.assert_close(maps.flatten(2).to(reference[b].dtype), reference[b], atol=tolerance,
                                   rtol=1e-4)


def test_clip_generate_matches_hf_generate(setup):
    tokenizer = setup["tokenizer"]
    options = dict(GENERATE, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tokenizer.pad_token_id)
    batch = processed(setup, "left")
    with torch.no_grad():
        expected = setup["hf"].generate(**hf_inputs(setup, batch), **options)[:, batch["input_ids"].shape[1]:]
    for padding_side in ("left", "right"):
        inputs = compact(setup, padding_side)
        found = setup["lmm"].generate(inputs["input_ids"], inputs["attention_mask"], **clip_kwargs(setup, batch),
                                      **options)
        assert torch.equal(found, expected), padding_side


def test_timing_inputs_match_the_processor(setup):
    """second_per_grid_ts (Qwen2.5-VL) and the timestamps (Qwen3-VL / Qwen3.5) from the frame times alone."""
    batch = processed(setup, "right")
    inputs = compact(setup, "right")
    prepared = setup["lmm"].prepare(inputs["input_ids"], inputs["attention_mask"], **clip_kwargs(setup, batch))
    if "second_per_grid_ts" in batch:
        assert torch.equal(prepared.second_per_grid_ts, batch["second_per_grid_ts"].float())
    tokenizer = setup["tokenizer"]
    text = tokenizer.decode(batch["input_ids"][0])
    if setup["adapter"].timestamped_video:
        for stamps in prepared.clip_timestamps[:1]:
            assert all(timestamp_text(t) in text for t in stamps)
        assert prepared.clip_timestamps[1] == [2.5, 12.5, 20.0]
    else:
        assert "seconds>" not in text


def test_pre_expanded_clips(setup):
    """The processor's own expanded ids: Qwen2-VL / Qwen2.5-VL take them as they are (as pre-expanded images);
    Qwen3-VL / Qwen3.5 clips must be compact (the model writes the timestamps), and say so."""
    batch = processed(setup, "left")
    lmm = setup["lmm"]
    if setup["adapter"].timestamped_video:
        with pytest.raises(ValueError, match=r"video_grid_thw: expected one \(t, H, W\) row per clip, shape \(6, 3\).*"
                                             r"a clip must be compact here"):
            lmm.prepare(batch["input_ids"], batch["attention_mask"], **clip_kwargs(setup, batch))
        return
    prepared = lmm.prepare(batch["input_ids"], batch["attention_mask"], **clip_kwargs(setup, batch))
    assert torch.equal(prepared.input_ids, batch["input_ids"])
    assert torch.equal(prepared.position_ids, hf_positions(setup, batch))


# ---------------------------------------------------------------- refusals: ValueError before the model runs


def test_wrong_video_pad_count_is_refused(setup):
    batch = processed(setup, "right")
    inputs = compact(setup, "right")
    video_token_id = setup["hf"].config.video_token_id
    length = int(inputs["attention_mask"][0].sum())
    ids, marks = inputs["input_ids"][:1, :length], inputs["mask_ids"][:1, :length]  # sample 0 alone: one clip
    pad = int((ids[0] == video_token_id).nonzero()[0, 0])
    ids = torch.cat([ids[:, :pad], torch.full((1, 2), video_token_id), ids[:, pad:]], 1)  # 3 pads in its block
    marks = torch.cat([marks[:, :pad], torch.full((1, 2), -1), marks[:, pad:]], 1)
    rows = int(batch["video_grid_thw"][0].prod())
    clip = dict(pixel_values_videos=batch["pixel_values_videos"][:rows].to(setup["dtype"]),
                video_grid_thw=batch["video_grid_thw"][:1], video_frame_times=setup["frame_times"][:1])
    expected = "1 \\(compact: the model inserts" if setup["adapter"].timestamped_video else "1 \\(compact\\) or"
    with pytest.raises(ValueError, match=f"sample 0: found 3 <\\|video_pad\\|> tokens, expected {expected}"):
        setup["lmm"].prepare(ids, torch.ones_like(ids), mask_ids=marks, **clip)


def call(setup, batch, **changes):
    inputs = compact(setup, "right")
    kwargs = clip_kwargs(setup, batch) | changes
    return setup["lmm"].prepare(inputs["input_ids"], inputs["attention_mask"], mask_ids=inputs["mask_ids"], **kwargs)


def test_video_pads_without_grid_rows_are_refused(setup):
    batch = processed(setup, "right")
    with pytest.raises(ValueError, match=r"video_grid_thw: expected one \(t, H, W\) row per clip, shape \(3, 3\)"):
        call(setup, batch, video_grid_thw=batch["video_grid_thw"][:2])
    with pytest.raises(ValueError, match="video_grid_thw: .* found none"):
        call(setup, batch, video_grid_thw=None)


def test_video_pixel_rows_are_checked(setup):
    batch = processed(setup, "right")
    expected = int(batch["video_grid_thw"].prod(-1).sum())
    with pytest.raises(ValueError, match=rf"pixel_values_videos: expected {expected} rows .* found shape"):
        call(setup, batch, pixel_values_videos=batch["pixel_values_videos"][:-3])
    with pytest.raises(ValueError, match="pixel_values_videos: expected .* values per patch"):
        call(setup, batch, pixel_values_videos=batch["pixel_values_videos"][:, :10])


def test_frame_count_must_match_temporal_groups(setup):
    batch = processed(setup, "right")
    times = list(setup["frame_times"])
    times[0] = torch.arange(7, dtype=torch.float64)  # 7 frames make 4 groups; the grid says 2
    with pytest.raises(ValueError, match=r"video_frame_times: sample 0 has 7 frame times, which make 4 frame groups "
                                         r"of temporal_patch_size 2, but video_grid_thw t = 2 \(expected 3..4 frames"):
        call(setup, batch, video_frame_times=times)
    with pytest.raises(ValueError, match=r"video_frame_times: expected one 1-D tensor .* per clip \(3\), found 2"):
        call(setup, batch, video_frame_times=times[:2])
    times[0] = torch.tensor([0.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-decreasing"):
        call(setup, batch, video_frame_times=times)


def test_video_token_budget_refuses_long_clips(setup):
    batch = processed(setup, "right")
    tokens = (batch["video_grid_thw"].prod(-1) // 4).tolist()
    lmm = setup["lmm"]
    budget = lmm.max_video_tokens
    try:
        lmm.max_video_tokens = tokens[1] - 1
        with pytest.raises(ValueError, match=rf"sample 1: its clip\(s\) hold {tokens[1]} video tokens \(3 frame "
                                             rf"groups x .*, over the max_video_tokens budget of {tokens[1] - 1} per "
                                             r"sample; the model refuses such a sample and never drops frames"):
            call(setup, batch)
        lmm.max_video_tokens = tokens[1]
        call(setup, batch)  # at the budget: accepted
    finally:
        lmm.max_video_tokens = budget


def test_timestamped_families_need_timestamp_tokens(setup):
    if not setup["adapter"].timestamped_video:
        pytest.skip("Qwen2-VL / Qwen2.5-VL write no timestamps")
    batch = processed(setup, "right")
    lmm = setup["lmm"]
    tokens, lmm.timestamp_tokens = lmm.timestamp_tokens, None
    try:
        with pytest.raises(ValueError, match="needs the timestamp token ids of the tokenizer"):
            call(setup, batch)
    finally:
        lmm.timestamp_tokens = tokens


def test_grounded_clip_out_of_range(setup):
    batch = processed(setup, "right")
    with pytest.raises(ValueError, match=r"sample 2: grounded_clip 1 does not exist; the sample holds 1 clip"):
        call(setup, batch, grounded_clip=[None, None, 1])


# ---------------------------------------------------------------- timing helpers on their own


def test_timestamp_tokens_compose_like_the_tokenizer():
    for backbone in ("qwen2_5_vl", "qwen3_5"):
        tokenizer = load_tokenizer(backbone=backbone)
        tokens = TimestampTokens.from_tokenizer(tokenizer)
        for seconds in (0.25, 3.0, 42.75, 1234.5):
            assert tokens.encode(seconds) == tokenizer.encode(timestamp_text(seconds), add_special_tokens=False)


def test_group_timestamps_and_second_per_grid():
    assert group_timestamps([0.0, 0.5, 1.0, 1.5], 2) == [0.25, 1.25]
    assert group_timestamps([0.0, 1.0, 2.0], 2) == [0.5, 2.0]  # the last frame repeated
    assert second_per_grid([0.0, 0.5, 1.0, 1.5], 2) == 1.0  # 2 fps
    assert second_per_grid([3.0], 2) == 1.0

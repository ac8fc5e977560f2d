"""`run.py predict --video` and `FrozenQwenSAM.segment_clip`: the frozen LMM watching the clip (key frames refined
from their frame group's maps, SAM2's memory completing the clip), or one key frame grounded as an image and tracked
(any other refiner: every frame grounded on its own); per-frame PNGs and a GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from flmm_model.config import ModelConfig
from flmm_model.data.clips import DEFAULT_FPS
from flmm_model.data.images import image_tensor
from flmm_model.data.item import make_clip_item
from flmm_model.data.loader import collate
from flmm_model.data.prompts import expression_parts, video_instruction
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.errors import UserError
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.modeling.sam2_propagation import Sam2Propagator

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")  # tiny random LMM
HEADS = dict(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)


@pytest.fixture(scope="module")
def clip():
    return SyntheticClips(length=1, seed=3, num_frames=4, image_size=(64, 96), max_objects=2)[0]


def _gif(frames: list[Image.Image], path: Path) -> Path:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)
    return path


def _read_masks(out: Path, objects: int, frames: int) -> np.ndarray:
    masks = np.zeros((objects, frames), dtype=object)
    for k in range(objects):
        for t in range(frames):
            with Image.open(out / f"object{k}" / f"{t:05d}.png") as png:
                masks[k, t] = np.asarray(png) > 0
    return np.stack([np.stack(list(row)) for row in masks])  # (K, T, H, W)


def test_predict_video_with_sam2_grounds_the_key_frame_and_tracks_it(tmp_path, clip):
    checkpoint = tmp_path / "ckpt"
    build_model(ModelConfig(sam="sam2_tiny", **HEADS)).save_pretrained(str(checkpoint))
    gif = _gif(clip.frames, tmp_path / "clip.gif")
    out = tmp_path / "pred"
    result = run.main(["predict", "--config", DEMO, "--checkpoint", str(checkpoint), "--video", str(gif),
                       "--text", clip.phrases[0], "--key-frame", "1", "--out", str(out), "--device", "cpu",
                       "model.sam=sam2_tiny"])
    assert len(result["masks"]) == 4 and len(result["areas"][0]) == 4
    with Image.open(result["overlay"]) as overlay:
        assert overlay.n_frames == 4
    written = _read_masks(out, 1, 4)

    model = FrozenQwenSAM.from_pretrained(str(checkpoint), qwen_path="tiny", sam_path="sam2_tiny")
    with Image.open(gif) as animation:  # the frames as the GIF holds them (palette colours)
        frames = []
        for t in range(animation.n_frames):
            animation.seek(t)
            frames.append(animation.convert("RGB"))
    key = model.segment(frames[1], [clip.phrases[0]])  # the image path, on the key frame
    assert np.array_equal(written[:, 1], key.numpy())
    batch = model.predictor().encode(frames[1], [clip.phrases[0]])
    with torch.no_grad():
        height, width = batch["metas"][0]["size"]
        logits = model.predict_logits(batch)[1][0][:, :height, :width]
        expected = Sam2Propagator(sam2=model.sam_refiner.sam).propagate([image_tensor(f) for f in frames],
                                                                       {1: logits}) > 0
    expected[:, 1] = key
    assert np.array_equal(written, expected.numpy())


def clip_batch(model, frames, phrases, positions=None):
    """The dataset route's batch of a clip watched whole (`make_clip_item`, as VideoGroundingDataset builds it);
    `positions`: each frame's index in its source clip (its time = position / fps)."""
    stacked = torch.from_numpy(np.stack([np.asarray(frame) for frame in frames]))  # (T, H, W, 3)
    count, height, width = stacked.shape[:3]
    positions = torch.arange(count) if positions is None else torch.as_tensor(positions)
    item = make_clip_item(frames=stacked, times=positions.to(torch.float64) / DEFAULT_FPS,
                          gt_masks=torch.zeros((len(phrases), count, height, width), dtype=torch.bool),
                          has_gt=torch.zeros(count, dtype=torch.bool), parts=expression_parts(list(phrases)),
                          meta={"dataset": "test", "video": "v"}, tokenizer=model.tokenizer,
                          image_processor=model.image_processor, instruction=video_instruction(model.instruction),
                          system=model.system, max_length=model.max_length)
    return collate([item], pad_token_id=model.tokenizer.pad_token_id)


@pytest.mark.parametrize("sam", ["sam2_tiny", "tiny"])
def test_segment_clip_watches_the_clip_as_the_dataset_route_does(clip, sam):
    model = build_model(ModelConfig(sam=sam, **HEADS))
    masks = model.segment_clip(clip.frames, clip.phrases)  # 4 frames: within the budget, all watched
    expected = model.predict_masks(clip_batch(model, clip.frames, clip.phrases))[0]  # (K, 4, H, W)
    assert torch.equal(masks, expected.cpu())


def test_segment_clip_samples_a_long_clip_and_masks_every_frame():
    long_clip = SyntheticClips(length=1, seed=5, num_frames=11, image_size=(64, 96), max_objects=1)[0]
    model = build_model(ModelConfig(sam="tiny", **HEADS))
    predictor = model.predictor()
    batch, sample = predictor.encode_clip(long_clip.frames, long_clip.phrases, max_frames=6)
    assert sample.indices.tolist() == [0, 2, 4, 6, 8, 10]  # round(linspace(0, 10, 6))
    assert batch["video_grid_thw"][0, 0] == 3  # 6 watched frames, 3 frame groups
    masks = model.segment_clip(long_clip.frames, long_clip.phrases, max_frames=6)
    width, height = long_clip.frames[0].size
    assert masks.shape == (1, 11, height, width)
    watched = model.predict_masks(clip_batch(model, [long_clip.frames[i] for i in sample.indices],
                                             long_clip.phrases, sample.indices))[0]  # the source times
    for position, source in enumerate(sample.indices.tolist()):
        assert torch.equal(masks[:, source], watched[:, position].cpu())
    for t in range(11):  # a frame left out takes its nearest watched frame's (the earlier on a tie)
        assert torch.equal(masks[:, t], masks[:, sample.indices[sample.nearest[t]]])
    with pytest.raises(UserError, match="max_frames must be at least"):
        model.segment_clip(long_clip.frames, long_clip.phrases, max_frames=1)


def test_segment_clip_without_sam2_grounds_every_frame_and_keeps_sam2_trainable(clip):
    model = build_model(ModelConfig(**HEADS))  # SAM: no video memory
    masks = model.segment_clip(clip.frames, clip.phrases, key_frame=0)
    width, height = clip.frames[0].size
    assert masks.shape == (len(clip.phrases), 4, height, width) and masks.dtype == torch.bool
    for t, frame in enumerate(clip.frames):
        assert torch.equal(masks[:, t], model.segment(frame, clip.phrases))

    sam2_model = build_model(ModelConfig(sam="sam2_tiny", **HEADS))
    sam2_model.train()
    trainable = {name for name, p in sam2_model.named_parameters() if p.requires_grad}
    sam2_model.segment_clip(clip.frames, clip.phrases[:1], key_frame=1)
    assert {name for name, p in sam2_model.named_parameters() if p.requires_grad} == trainable
    sam2_model.segment_clip(clip.frames, clip.phrases[:1])  # watched: key frames refined, SAM2 propagates
    assert {name for name, p in sam2_model.named_parameters() if p.requires_grad} == trainable
    assert sam2_model.training and any("mask_decoder" in name for name in trainable)


def test_predict_video_checks_before_loading_weights(tmp_path, clip):
    missing_checkpoint = str(tmp_path / "no_checkpoint")
    with pytest.raises(UserError, match="no such file or directory"):
        run.main(["predict", "--config", DEMO, "--checkpoint", missing_checkpoint, "--video",
                  str(tmp_path / "absent.gif"), "--text", "the cup", "--device", "cpu"])
    gif = _gif(clip.frames, tmp_path / "clip.gif")
    with pytest.raises(UserError, match=r"--key-frame 9: the clip .* has 4 frames \(0..3\)"):
        run.main(["predict", "--config", DEMO, "--checkpoint", missing_checkpoint, "--video", str(gif),
                  "--text", "the cup", "--key-frame", "9", "--device", "cpu"])
    with pytest.raises(run.UsageError, match="--image: not allowed with argument --video"):
        run.main(["predict", "--config", DEMO, "--checkpoint", missing_checkpoint, "--video", str(gif),
                  "--image", str(gif), "--text", "the cup"])


def test_predict_video_file_without_pyav_is_a_user_error(tmp_path):
    try:
        import av  # noqa: F401
        pytest.skip("PyAV is installed here")
    except ImportError:
        pass
    clip_file = tmp_path / "clip.mp4"
    clip_file.write_bytes(b"")
    with pytest.raises(UserError, match=r"needs PyAV, the optional extra 'video'"):  # one message, no traceback
        run.main(["predict", "--config", DEMO, "--checkpoint", str(tmp_path / "no_checkpoint"), "--video",
                  str(clip_file), "--text", "the cup", "--device", "cpu"])

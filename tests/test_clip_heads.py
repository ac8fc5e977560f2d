"""Clips through the heads (`modeling.batch` head rows, `GroundingModel.clip_key_logits` / `complete_clip` /
`predict_clip_logits`): each frame row reads its frame group of the frozen LMM's clip maps, losses read only the
frames with ground truth, an image beside a clip is unchanged, SAM2's memory completes the clip from the key frames.

References are independent of the route under test: the LMM's own clip forward (`FrozenQwenLMM`) sliced by hand,
the U-Net on those slices, `Sam2Propagator` called directly, and hand-computed J for the all-foreground mask."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_video_sources import HEIGHT, WIDTH, object_ids, write_mevis, write_ytvos

import run
from flmm_model.build import prompt_settings
from flmm_model.config import ModelConfig
from flmm_model.data.item import PromptSettings
from flmm_model.data.loader import collate
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.data.video_grounding import VideoGroundingDataset
from flmm_model.data.video_sources import VideoSource
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.modeling.sam2_propagation import Sam2Propagator
from flmm_model.recipes.scoring import score_dataset
from flmm_model.video_metrics import VideoSegMetric

HEADS = dict(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)
VIDEO_DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_video.yaml")


def setup(sam: str, qwen: str = "tiny"):
    cfg = ModelConfig(sam=sam, qwen=qwen, **HEADS)
    torch.manual_seed(0)
    return build_model(cfg).eval(), prompt_settings(cfg)


@pytest.fixture(scope="module")
def sam2_model():
    return setup("sam2_tiny")


def clip_items(prompt, *, count: int = 2, frames: int = 5):
    source = SyntheticClips(length=count, seed=3, num_frames=frames, image_size=(64, 96), max_objects=2)
    return [VideoGroundingDataset(source, max_frames=8, prompt=prompt)[i] for i in range(count)]


def image_item(prompt):
    return SyntheticDataset(length=1, seed=0, tokenizer=prompt.tokenizer, image_processor=prompt.image_processor,
                            instruction=prompt.instruction, system=prompt.system)[0]


def batch_of(items, prompt):
    return collate(items, pad_token_id=prompt.tokenizer.pad_token_id)


def test_rows_read_their_frame_group_of_the_clip_maps(sam2_model):
    model, prompt = sam2_model
    items = clip_items(prompt)
    batch = batch_of(items, prompt)
    prepared = model.batch_preparer()(batch)  # training rows: the frames with ground truth
    expected_rows = [(b, t) for b, item in enumerate(items) for t in np.flatnonzero(item["has_gt"].numpy())]
    assert list(zip(prepared.row_sample, prepared.row_frame, strict=True)) == expected_rows
    assert not items[0]["has_gt"][-1]  # 5 frames padded to 6: the repeat counts once
    coarse_rows, _ = model.predict_logits(prepared)

    lmm_out = model.lmm(batch["input_ids"], batch["attention_mask"], mask_ids=batch["mask_ids"],
                        pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                        video_frame_times=batch["video_frame_times"])
    for (b, t), coarse in zip(expected_rows, coarse_rows, strict=True):
        maps = lmm_out.attention_maps[b]  # (K, C, G, h, w)
        assert maps.shape[2] == 3
        with torch.no_grad():
            reference = model.mask_head(maps[:, :, t // 2])  # (K, h', w')
        torch.testing.assert_close(coarse, reference, atol=1e-5, rtol=1e-4)


def test_losses_read_only_the_frames_with_ground_truth(sam2_model):
    model, prompt = sam2_model
    items = clip_items(prompt, count=1)
    items[0]["has_gt"][1] = False

    def loss(item):
        with torch.no_grad():
            return model(batch_of([item], prompt))["loss"]

    base = loss(items[0])
    unread = {**items[0], "gt_masks": items[0]["gt_masks"].clone()}
    unread["gt_masks"][:, 1] = True  # a frame without ground truth: never read
    torch.testing.assert_close(loss(unread), base)
    read = {**items[0], "gt_masks": items[0]["gt_masks"].clone()}
    read["gt_masks"][:, 0] = True
    assert not torch.allclose(loss(read), base)

    nothing = {**items[0], "has_gt": torch.zeros_like(items[0]["has_gt"])}
    with pytest.raises(ValueError, match="no frame of its clip has ground truth"):
        model(batch_of([nothing], prompt))


def test_an_image_beside_a_clip_is_unchanged(sam2_model):
    model, prompt = sam2_model
    image = image_item(prompt)
    alone = model.predict_logits(batch_of([image], prompt))
    mixed = model.predict_logits(batch_of([clip_items(prompt, count=1)[0], image], prompt))
    row = len(mixed[0]) - 1  # the clip's key rows come first, the image is the last row
    torch.testing.assert_close(mixed[0][row], alone[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mixed[1][row], alone[1][0], atol=1e-3, rtol=1e-3)


def test_key_frames_are_refined_and_sam2_propagates_them(sam2_model):
    model, prompt = sam2_model
    item = clip_items(prompt, count=1)[0]
    batch = batch_of([item], prompt)
    keys = model.clip_key_logits(batch)[0]
    assert sorted(keys) == [0, 2, 4]  # the first frame of every frame group
    logits = model.predict_clip_logits(batch)[0]  # (K, N, H, W)
    frames = [frame.permute(2, 0, 1) for frame in item["frames"]]
    reference = Sam2Propagator(sam2=model.sam_refiner.sam, freeze=False).propagate(frames, keys)
    for t in keys:
        reference[:, t] = keys[t]
    torch.testing.assert_close(logits, reference)
    masks = model.predict_masks(batch)[0]
    assert masks.shape == item["gt_masks"].shape and masks.dtype == torch.bool


def test_without_video_memory_every_frame_is_refined():
    model, prompt = setup("tiny")
    item = clip_items(prompt, count=1)[0]
    batch = batch_of([item], prompt)
    keys = model.clip_key_logits(batch)[0]
    assert sorted(keys) == list(range(6))
    torch.testing.assert_close(model.predict_clip_logits(batch)[0], torch.stack([keys[t] for t in range(6)], 1))
    nearest = model.complete_clip([f.permute(2, 0, 1) for f in item["frames"]], {1: keys[1], 4: keys[4]})
    assert [torch.equal(nearest[:, t], keys[k]) for t, k in enumerate([1, 1, 1, 4, 4, 4])] == [True] * 6


@pytest.mark.parametrize("qwen", ["qwen3_vl_tiny", "qwen3_5_tiny"])
def test_timestamped_families_train_on_clips(qwen):
    model, prompt = setup("sam2_tiny", qwen)
    assert model.lmm.timestamp_tokens is not None  # read from the tokenizer at build time
    out = model(batch_of([*clip_items(prompt, count=1), image_item(prompt)], prompt))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in model.mask_head.parameters())


def test_a_clip_refuses_the_lmm_output_cache(sam2_model, tmp_path):
    model, prompt = sam2_model
    cache = model.open_lmm_cache(str(tmp_path / "cache"), precision="fp32", sentence_draws=[])
    with pytest.raises(ValueError, match="image samples only"):
        model.batch_preparer(lmm_cache=cache)(batch_of(clip_items(prompt, count=1), prompt))


def test_train_and_eval_video_datasets_through_run_py(tmp_path):
    """Synthetic clips train and validate; Ref-YouTube-VOS and MeViS fixtures score with J / F / J&F, the
    all-foreground row equal to its hand-computed J (the mask's area over the frame, per frame and expression)."""
    out = tmp_path / "run"
    small = ["model.mask_head_size=32", "data.train.0.length=4", "data.val.0.length=2", "data.batch_size=2",
             "train.max_steps=2", "train.val_every=2", "train.save_every=2", "data.num_workers=0",
             f"train.out_dir={out}", "train.log_every=1"]
    run.main(["train", "--config", VIDEO_DEMO, *small])
    (root := tmp_path / "data").mkdir()
    write_ytvos(root / "ref_youtube_vos")
    write_mevis(root / "mevis")
    tests = "data.test=[{type: ref_youtube_vos, split: train}, {type: mevis, split: train}]"
    result = run.main(["eval", "--config", VIDEO_DEMO, "--checkpoint", str(out), f"data.root={root}", tests,
                       f"eval.out_dir={tmp_path / 'eval'}", "eval.progress=false", "model.mask_head_size=32"])
    results = result["results"]
    assert set(results) == {"ref_youtube_vos_train", "mevis_train"}
    for metrics in results.values():
        assert metrics["count"] == 2 and set(metrics) >= {"J&F", "J", "F"}
        assert 0 <= metrics["J&F"] <= 100 and metrics["J&F"] == pytest.approx((metrics["J"] + metrics["F"]) / 2)

    # the scoring route's all-foreground row against its hand-computed J
    model = FrozenQwenSAM.from_pretrained(str(out / "checkpoints" / "step_0000002"))  # the recorded presets
    dataset = VideoGroundingDataset(VideoSource("ref_youtube_vos", str(root / "ref_youtube_vos"), "train"),
                                    max_frames=8, prompt=PromptSettings(
                                        tokenizer=model.tokenizer, image_processor=model.image_processor,
                                        instruction=model.instruction, system=model.system, max_length=None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=lambda items: batch_of_model(items, model))
    scores = score_dataset(model, loader, metric=VideoSegMetric, autocast=contextlib.nullcontext(), baselines=True,
                           progress=False)
    areas = [[(object_ids(k) == obj).sum() / (HEIGHT * WIDTH) for k in range(3)] for obj in (1, 2)]
    assert scores["baseline_full/J"] == pytest.approx(100 * np.mean([np.mean(a) for a in areas]), abs=1e-9)
    assert scores["baseline_full/count"] == 2 and scores["J&F"] == pytest.approx(
        results["ref_youtube_vos_train"]["J&F"], abs=1e-9)


def batch_of_model(items, model):
    return collate(items, pad_token_id=model.tokenizer.pad_token_id)

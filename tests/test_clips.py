"""`data.clips`: clips read from frame folders (natural order), GIFs (times from durations) and video files (PyAV,
skipped without it), with clear errors; the frame budget rule on hand-computed cases."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_model.data.clips import DEFAULT_FPS, natural_key, read_clip, sample_frames
from flmm_model.data.errors import DataError


def _solid(value: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, (value, 255 - value, 40))


def test_frame_folder_is_read_in_natural_order_at_fps(tmp_path):
    for number, value in ((10, 200), (2, 100), (1, 50)):  # listed out of order; "10" sorts after "2"
        _solid(value).save(tmp_path / f"{number}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    clip = read_clip(str(tmp_path), fps=4.0)
    assert clip.frames.shape == (3, 6, 8, 3) and clip.frames.dtype == np.uint8
    assert clip.frames[:, 0, 0, 0].tolist() == [50, 100, 200]
    assert clip.times.tolist() == [0.0, 0.25, 0.5]
    assert read_clip(str(tmp_path)).times[1] == pytest.approx(1 / DEFAULT_FPS)
    assert sorted(["00010.jpg", "00002.jpg", "00000.jpg"], key=natural_key) == ["00000.jpg", "00002.jpg",
                                                                                 "00010.jpg"]


def test_jpeg_frames_in_the_dataset_layout(tmp_path):
    for index in range(4):
        _solid(60 * index, size=(16, 12)).save(tmp_path / f"{index:05d}.jpg", quality=95)
    clip = read_clip(str(tmp_path))
    assert clip.frames.shape == (4, 12, 16, 3)
    assert np.abs(clip.frames[:, 6, 8, 0].astype(int) - [0, 60, 120, 180]).max() <= 3  # JPEG is lossy


def test_folder_errors_name_the_path_and_what_was_found(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"expected image files .* found readme\.md"):
        read_clip(str(tmp_path))
    _solid(0, size=(8, 6)).save(tmp_path / "0.png")
    _solid(0, size=(9, 6)).save(tmp_path / "1.png")
    with pytest.raises(DataError, match=r"frames of different sizes: 0\.png is 8x6 \(W x H\), 1\.png is 9x6"):
        read_clip(str(tmp_path))
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image file .*1.png"):
        read_clip(str(tmp_path))
    with pytest.raises(DataError, match="no such folder or file"):
        read_clip(str(tmp_path / "missing"))
    (tmp_path / "clip.txt").write_text("x")
    with pytest.raises(DataError, match="found a .txt file"):
        read_clip(str(tmp_path / "clip.txt"))


def test_gif_times_are_the_running_sum_of_durations(tmp_path):
    path = str(tmp_path / "clip.gif")
    frames = [_solid(value) for value in (0, 120, 240)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    clip = read_clip(path)
    assert clip.frames.shape == (3, 6, 8, 3)
    assert clip.times.tolist() == pytest.approx([0.0, 0.1, 0.3])
    assert np.abs(clip.frames[:, 0, 0, 1].astype(int) - [255, 135, 15]).max() <= 8  # palette quantisation
    (tmp_path / "bad.gif").write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match="bad.gif: cannot read it as an animation"):
        read_clip(str(tmp_path / "bad.gif"))


def test_mp4_frames_and_times_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
        for value in (0, 100, 200, 250):
            frame = av.VideoFrame.from_ndarray(np.full((16, 32, 3), value, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = read_clip(path)
    assert clip.frames.shape == (4, 16, 32, 3)
    assert clip.times.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert np.abs(clip.frames[:, 8, 16, 0].astype(int) - [0, 100, 200, 250]).max() <= 12


def test_video_without_pyav_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"optional extra 'video': pip install 'flmm_model\[video\]'"):
        read_clip(str(path))


def test_within_budget_every_frame_and_odd_counts_repeat_the_last():
    sample = sample_frames(4, max_frames=8)
    assert sample.indices.tolist() == [0, 1, 2, 3] and not sample.padded
    sample = sample_frames(7, max_frames=8)
    assert sample.indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 6] and sample.padded
    assert sample.nearest.tolist() == [0, 1, 2, 3, 4, 5, 6]  # frame 6 maps to its first copy
    assert sample_frames(1, max_frames=2).indices.tolist() == [0, 0]


def test_over_budget_uniform_over_the_whole_clip():
    sample = sample_frames(10, max_frames=4)  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert sample.indices.tolist() == [0, 3, 6, 9] and not sample.padded
    assert sample.nearest.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]  # 4 and 5: 1 away from 3 and 6 -> 3 and 6
    assert sample_frames(10, max_frames=5).indices.tolist() == [0, 3, 6, 9]  # an odd budget rounds down to even
    # linspace(0, 8, 6) = 0, 1.6, 3.2, 4.8, 6.4, 8 -> rounded
    assert sample_frames(9, max_frames=6).indices.tolist() == [0, 2, 3, 5, 6, 8]


def test_nearest_uses_the_times_and_spread_maps_back():
    times = np.array([0.0, 0.1, 0.2, 1.0, 1.1, 1.2])  # a gap between 0.2 and 1.0
    sample = sample_frames(6, times, max_frames=2)  # indices 0 and 5
    assert sample.indices.tolist() == [0, 5]
    assert sample.nearest.tolist() == [0, 0, 0, 1, 1, 1]  # frame 3 (1.0 s) is nearer to 1.2 s than to 0 s
    assert sample.spread(np.array(["a", "b"])).tolist() == ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="expected 2 sampled frames, found 3"):
        sample.spread(np.zeros(3))
    with pytest.raises(ValueError, match="max_frames must be at least temporal_patch = 2"):
        sample_frames(5, max_frames=1)
    with pytest.raises(ValueError, match="times must have shape"):
        sample_frames(5, np.zeros(4), max_frames=4)



def _moving_square_clip() -> tuple[np.ndarray, np.ndarray]:
    frames = np.full((3, 40, 60, 3), 30, dtype=np.uint8)  # (T, H, W, 3) dark gray
    masks = np.zeros((1, 3, 40, 60), dtype=bool)  # (K, T, H, W)
    for t in range(3):
        masks[0, t, 20:36, 10 * t + 5:10 * t + 21] = True  # a 16 px square moving right 10 px a frame
    return frames, masks


def test_clip_overlay_gif_has_every_frame_and_the_tint_where_the_mask_is(tmp_path):
    from flmm_model.overlay import colour
    from flmm_model.video_overlay import write_clip_overlay

    frames, masks = _moving_square_clip()
    path = write_clip_overlay(frames, masks, ["the square"], str(tmp_path / "clip.gif"))
    with Image.open(path) as stored:
        assert stored.n_frames == 3
        for t in range(3):
            stored.seek(t)
            rgb = np.asarray(stored.convert("RGB")).astype(int)
            inside, outside = rgb[30, 10 * t + 13], rgb[30, 10 * t + 40 if t < 2 else 2]
            tint = 0.55 * 30 + 0.45 * np.array(colour(0))  # draw_overlay's alpha 0.45 over the gray
            assert np.abs(inside - tint).max() <= 12
            assert np.abs(outside - 30).max() <= 6
    with pytest.raises(ValueError, match=r"masks must be \(K, 3, 40, 60\)"):
        write_clip_overlay(frames, masks[:, :2], ["the square"], str(tmp_path / "bad.gif"))
    with pytest.raises(ValueError, match="expected a .gif or .mp4 path"):
        write_clip_overlay(frames, masks, ["the square"], str(tmp_path / "clip.avi"))


def test_clip_overlay_mp4_with_pyav(tmp_path):
    pytest.importorskip("av")
    from flmm_model.video_overlay import write_clip_overlay

    frames, masks = _moving_square_clip()
    clip = read_clip(write_clip_overlay(frames, masks, ["the square"], str(tmp_path / "clip.mp4")))
    assert clip.frames.shape == (3, 40, 60, 3)


def test_frame_masks_one_png_per_object_per_frame(tmp_path):
    from flmm_model.video_overlay import write_frame_masks

    frames, masks = _moving_square_clip()
    masks = np.concatenate([masks, ~masks])  # (2, 3, H, W)
    paths = write_frame_masks(masks, str(tmp_path / "masks"))
    assert [os.path.relpath(p, tmp_path / "masks") for p in paths] == [
        os.path.join(f"object{k}", f"{t:05d}.png") for k in range(2) for t in range(3)]
    with Image.open(tmp_path / "masks" / "object0" / "00002.png") as stored:
        assert stored.mode == "L"
        assert np.array_equal(np.asarray(stored) == 255, masks[0, 2])


def test_grounding_items_over_ref_youtube_vos_flag_unannotated_frames(tmp_path):
    from test_video_sources import object_ids, write_ytvos

    from flmm_model.data.video_grounding import VideoGroundingDataset
    from flmm_model.data.video_sources import VideoSource

    root = write_ytvos(tmp_path)
    (root / "train" / "Annotations" / "vid_a" / "00005.png").unlink()  # frame 1 not annotated
    dataset = VideoGroundingDataset(VideoSource("ref_youtube_vos", str(root), "train"), max_frames=4, fps=2.0)
    item = dataset[1]  # "a long bar", object 2; 3 frames -> 0, 1, 2, 2 (padded)
    assert item["frame_indices"].tolist() == [0, 1, 2, 2] and item["times"].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert item["frames"].shape == (4, 24, 32, 3) and item["frames"].dtype == torch.uint8
    assert item["has_gt"].tolist() == [True, False, True, False]  # the padding repeat of frame 2 counts once
    assert torch.equal(item["gt_masks"][0, 0], torch.from_numpy(object_ids(0) == 2))
    assert not item["gt_masks"][0, 1].any()
    assert torch.equal(item["gt_masks"][0, 3], torch.from_numpy(object_ids(2) == 2))
    assert item["phrases"] == ["a long bar"] and item["parts"] == [("a long bar", 0), (".", -1)]
    assert item["meta"]["frame_names"] == ["00000", "00005", "00010", "00010"]


def test_grounding_items_over_synthetic_clips_hold_every_shape():
    from flmm_model.data.synthetic_clips import SyntheticClips
    from flmm_model.data.video_grounding import VideoGroundingDataset

    clips = SyntheticClips(length=2, seed=1, num_frames=9)
    item = VideoGroundingDataset(clips, max_frames=6)[0]
    clip = clips[0]
    assert item["frame_indices"].tolist() == [0, 2, 3, 5, 6, 8]
    assert torch.equal(item["gt_masks"], torch.from_numpy(clip.gt_masks[:, [0, 2, 3, 5, 6, 8]]))
    assert np.array_equal(item["frames"][1].numpy(), np.asarray(clip.frames[2]))
    assert item["phrases"] == clip.phrases and item["has_gt"].all()


def test_grounding_items_over_mevis_have_ground_truth_everywhere_and_skip_bad_frames(tmp_path):
    from test_video_sources import object_ids, write_mevis

    from flmm_model.data.video_grounding import VideoGroundingDataset
    from flmm_model.data.video_sources import VideoSource

    root = write_mevis(tmp_path)
    dataset = VideoGroundingDataset(VideoSource("mevis", str(root), "train", on_error="skip"), max_frames=2)
    item = dataset[0]  # "both moving things": annotations 7 and 9; 3 frames over a budget of 2 -> 0 and 2
    assert item["frame_indices"].tolist() == [0, 2] and item["nearest"].tolist() == [0, 0, 1]
    assert item["has_gt"].tolist() == [True, True]
    assert torch.equal(item["gt_masks"][0, 1], torch.from_numpy(object_ids(2) == 2))  # 7 is null in frame 2
    (root / "train" / "JPEGImages" / "vid_b" / "00010.jpg").write_bytes(b"broken")
    assert dataset[1] is None and dataset.skips.count == 1

"""`data.synthetic_clips`: the moving-shapes clips are deterministic, their masks are the visible pixels painted in
the shape's colour, the background stays still, the shapes move at their velocity, and twins are named by motion."""

from __future__ import annotations

import numpy as np
import pytest

from flmm_model.data.synthetic import COLOURS
from flmm_model.data.synthetic_clips import SyntheticClips, make_clip


def test_clips_are_deterministic_and_well_formed():
    clips = SyntheticClips(length=6, seed=3, num_frames=5)
    for index in range(len(clips)):
        clip, again = clips[index], clips[index]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip.frames, again.frames,
                                                                              strict=True))
        assert np.array_equal(clip.gt_masks, again.gt_masks) and clip.phrases == again.phrases
        k, t, h, w = clip.gt_masks.shape
        assert clip.gt_masks.dtype == bool and k == len(clip.phrases) >= 1 and t == 5
        assert {frame.size for frame in clip.frames} == {(w, h)}
        assert clip.gt_masks.sum(0).max() <= 1  # one shape visible per pixel
    with pytest.raises(IndexError, match="index 6 out of range for 6 clips"):
        clips[6]
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        make_clip(np.random.default_rng(0), num_frames=0)


def test_masks_are_the_shapes_pixels_over_a_still_background():
    for index in range(6):
        clip = SyntheticClips(length=6, seed=11, num_frames=6)[index]
        pixels = np.stack([np.asarray(frame, dtype=np.float64) for frame in clip.frames])  # (T, H, W, 3)
        for mask, phrase in zip(clip.gt_masks, clip.phrases, strict=True):
            colour = np.array(COLOURS[phrase.split()[1]])
            shown = mask.any(axis=(1, 2))
            assert shown.any()
            mean = np.stack([pixels[t][mask[t]].mean(0) for t in np.flatnonzero(shown)])
            assert np.abs(mean - colour).max() < 20, phrase  # painted in its colour (with a little noise)
        uncovered = ~clip.gt_masks.any(0)  # (T, H, W): background in that frame
        both = uncovered[0] & uncovered[-1]
        assert np.array_equal(pixels[0][both], pixels[-1][both])  # the background does not move


def test_shapes_move_at_their_velocity():
    moved = 0
    for index in range(8):
        clip = SyntheticClips(length=8, seed=5, num_frames=4)[index]
        areas = clip.gt_masks.sum(axis=(2, 3))  # (K, T)
        for k, velocity in enumerate(clip.velocities):
            for t in range(3):
                if areas[k, t] == 0 or areas[k, t] != areas[k, t + 1] or areas[k, t] != areas[k].max():
                    continue  # hidden in part by another shape in one of the two frames
                before = np.argwhere(clip.gt_masks[k, t]).mean(0)[::-1]  # (x, y)
                after = np.argwhere(clip.gt_masks[k, t + 1]).mean(0)[::-1]
                step = np.linalg.norm(after - before)
                assert step <= np.linalg.norm(velocity) + 1.5  # at most one frame's motion (a bounce folds it back)
                moved += step > 1.0
    assert moved > 10


def test_twins_are_named_by_their_motion():
    twins = 0
    for index in range(60):
        clip = SyntheticClips(length=60, seed=0, num_frames=3)[index]
        for phrase, velocity in zip(clip.phrases, clip.velocities, strict=True):
            if "moving" not in phrase:
                continue
            twins += 1
            word = phrase.rsplit(" ", 1)[1]
            axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[word]
            assert np.sign(velocity[axis]) == sign, (phrase, velocity)
        assert len(set(clip.phrases)) == len(clip.phrases)  # every phrase names one shape
    assert twins >= 4

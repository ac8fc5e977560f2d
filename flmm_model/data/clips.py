"""Video clips: read one from a folder of frames, an animated GIF / WebP or a video file, and choose the frames the
model sees under a frame budget.

`read_clip(path, fps=...)` returns a `ClipFrames`: (T, H, W, 3) uint8 RGB frames and (T,) float64 times in seconds.
- a folder: its image files (.jpg .jpeg .png .bmp .webp), in natural order of their names ("2.jpg" before
  "10.jpg", so 00000.jpg, 00001.jpg, ... as Ref-YouTube-VOS / MeViS store them), at `fps` frames per second
  (default `DEFAULT_FPS` = 6: Ref-YouTube-VOS's and MeViS's frames are every 5th of 30 fps video); frame i is at
  i / fps seconds;
- a .gif / animated .webp (Pillow): times are the running sum of the frames' stored durations (frame 0 at 0 s);
  a frame without a duration counts as 1 / fps;
- a .mp4 / .webm / .mov / .mkv / .avi (PyAV, the optional extra `video`: `pip install flmm_model[video]`): the
  decoded frames of the first video stream, times from their pts and the stream's time base.

The frame budget (`sample_frames`), the one rule, never a silent cut:
- T <= max_frames: every frame, in order;
- T > max_frames: `round(linspace(0, T - 1, n))` with n = max_frames rounded down to an even count: uniform over
  the whole clip, the first and the last frame always in (numpy rounds halves to even);
- then, when the count is odd (T odd and within budget), the last index is repeated once, because Qwen2-VL groups
  frames by temporal_patch_size = 2, and the HF video processor pads an odd clip the same way (it repeats the last
  frame).
The result is a `FrameSample`: the indices into the source clip and, for every source frame, the position of the
nearest sampled frame (`nearest`, ties to the earlier one by time), so a prediction on the sampled frames maps back
to every source frame (`FrameSample.spread`); a caller that propagates masks (SAM2) can use `indices` alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from flmm_model.data.errors import DataError
from flmm_model.data.images import load_rgb, to_rgb
from flmm_model.errors import MissingDependencyError

DEFAULT_FPS = 6.0
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ANIMATION_EXTENSIONS = (".gif", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
TEMPORAL_PATCH = 2  # Qwen2-VL / Qwen2.5-VL `temporal_patch_size`


@dataclass(frozen=True)
class ClipFrames:
    """One clip as read.

    Attributes:
        frames: (T, H, W, 3) uint8 RGB.
        times: (T,) float64 seconds from the clip's start, increasing.
        source: the path it was read from.
    """

    frames: np.ndarray
    times: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.frames)


def natural_key(name: str) -> list:
    """Sort key ordering digit runs by value: "frame2.jpg" < "frame10.jpg"."""
    return [int(run) if run.isdigit() else run.lower() for run in re.split(r"(\d+)", name)]


def read_clip(path: str, *, fps: float = DEFAULT_FPS) -> ClipFrames:
    """Read a clip from a folder of frames, an animated GIF / WebP, or a video file (see the module docstring).

    Args:
        path: a folder, or a file whose extension says its kind.
        fps: frames per second of a folder's frames (and of GIF frames without a duration).

    Raises:
        DataError: a missing path, an empty folder, frames of different sizes, an unreadable file or an unknown
            extension, naming the path, what was expected and what was found.
        MissingDependencyError (an ImportError): a video file without PyAV installed (the message names the `video`
            extra).
    """
    if fps <= 0:
        raise ValueError(f"read_clip: fps must be positive, found {fps}")
    if os.path.isdir(path):
        return _read_folder(path, fps=fps)
    if not os.path.isfile(path):
        raise DataError(f"clip {path}: no such folder or file")
    extension = os.path.splitext(path)[1].lower()
    if extension in ANIMATION_EXTENSIONS:
        return _read_animation(path, fps=fps)
    if extension in VIDEO_EXTENSIONS:
        return _read_video(path)
    raise DataError(f"clip {path}: expected a folder of frames, a {'/'.join(ANIMATION_EXTENSIONS)} animation or a "
                    f"{'/'.join(VIDEO_EXTENSIONS)} video, found a {extension or 'extension-less'} file")


def _stack(frames: list[np.ndarray], names: list[str], path: str) -> np.ndarray:
    """(T, H, W, 3) uint8; DataError naming the first frame whose size differs from frame 0's."""
    for frame, name in zip(frames, names, strict=True):
        if frame.shape != frames[0].shape:
            raise DataError(f"clip {path}: frames of different sizes: {names[0]} is {frames[0].shape[1]}x"
                            f"{frames[0].shape[0]} (W x H), {name} is {frame.shape[1]}x{frame.shape[0]}")
    return np.stack(frames)


def _read_folder(path: str, *, fps: float) -> ClipFrames:
    names = sorted((name for name in os.listdir(path) if name.lower().endswith(FRAME_EXTENSIONS)
                    and os.path.isfile(os.path.join(path, name))), key=natural_key)
    if not names:
        found = sorted(os.listdir(path))
        raise DataError(f"clip {path}: expected image files ({' '.join(FRAME_EXTENSIONS)}) in the folder, found "
                        f"{'nothing' if not found else ', '.join(found[:5]) + (' ...' if len(found) > 5 else '')}")
    frames = [np.asarray(load_rgb(os.path.join(path, name), expected_hw=None, sample=f"clip {path}"))
              for name in names]
    times = np.arange(len(names), dtype=np.float64) / fps
    return ClipFrames(frames=_stack(frames, names, path), times=times, source=path)


def _read_animation(path: str, *, fps: float) -> ClipFrames:
    frames, durations = [], []
    try:
        with Image.open(path) as stored:
            for frame in ImageSequence.Iterator(stored):
                durations.append(frame.info.get("duration"))
                frames.append(np.asarray(to_rgb(frame.copy(), where=f"clip {path}")))
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"clip {path}: cannot read it as an animation: {error} (not an image, or a damaged "
                        f"one)") from error
    seconds = [duration / 1000.0 if duration else 1.0 / fps for duration in durations]
    times = np.concatenate([[0.0], np.cumsum(seconds[:-1])]).astype(np.float64)  # frame k starts after k durations
    return ClipFrames(frames=_stack(frames, [f"frame {k}" for k in range(len(frames))], path), times=times,
                      source=path)


def _read_video(path: str) -> ClipFrames:
    try:
        import av  # noqa: PLC0415 - the optional extra, needed only for video files
    except ImportError as error:
        raise MissingDependencyError(f"clip {path}: reading video files needs PyAV, the optional extra 'video': "
                          f"pip install 'flmm_model[video]' (or pip install av); a folder of frames or a GIF needs "
                          f"nothing more") from error
    frames, times = [], []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"clip {path}: expected a video stream, found none")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3) uint8
                times.append(float(frame.pts * stream.time_base) if frame.pts is not None else np.nan)
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise DataError(f"clip {path}: cannot decode it as a video: {error}") from error
    if not frames:
        raise DataError(f"clip {path}: expected video frames, found none")
    times_array = np.asarray(times, dtype=np.float64)
    if np.isnan(times_array).any():  # no pts: count frames at the stream's average rate
        rate = float(stream.average_rate or DEFAULT_FPS)
        times_array = np.arange(len(frames), dtype=np.float64) / rate
    times_array -= times_array[0]
    return ClipFrames(frames=_stack(frames, [f"frame {k}" for k in range(len(frames))], path), times=times_array,
                      source=path)


@dataclass(frozen=True)
class FrameSample:
    """The frames chosen under a budget (`sample_frames`).

    Attributes:
        indices: (N,) int64 source frame indices, N even, non-decreasing (the last one repeated when padded).
        nearest: (T,) int64: for every source frame, the position in `indices` of the nearest sampled frame.
        padded: whether the last index was repeated to make N even.
    """

    indices: np.ndarray
    nearest: np.ndarray
    padded: bool

    def spread(self, per_sample: np.ndarray) -> np.ndarray:
        """Per-sampled-frame values (N, ...) onto every source frame (T, ...), each from its nearest sample."""
        if len(per_sample) != len(self.indices):
            raise ValueError(f"FrameSample.spread: expected {len(self.indices)} sampled frames, found "
                             f"{len(per_sample)}")
        return np.asarray(per_sample)[self.nearest]


def sample_frames(num_frames: int, times: np.ndarray | None = None, *, max_frames: int,
                  temporal_patch: int = TEMPORAL_PATCH) -> FrameSample:
    """The frames a clip of `num_frames` frames shows the model: the budget rule of the module docstring.

    Args:
        num_frames: T >= 1, the source frame count.
        times: (T,) seconds of the source frames, for `nearest` (None: evenly spaced).
        max_frames: the budget, >= temporal_patch.
        temporal_patch: frames per temporal patch (2 for Qwen2-VL); the count is padded to a multiple of it.

    Returns:
        A FrameSample (indices, nearest, padded).
    """
    if num_frames < 1:
        raise ValueError(f"sample_frames: expected at least one frame, found {num_frames}")
    if max_frames < temporal_patch:
        raise ValueError(f"sample_frames: max_frames must be at least temporal_patch = {temporal_patch}, found "
                         f"{max_frames}")
    if num_frames <= max_frames:
        indices = np.arange(num_frames, dtype=np.int64)
    else:
        count = max_frames - max_frames % temporal_patch
        indices = np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64)
    padding = (-len(indices)) % temporal_patch
    if padding:
        indices = np.concatenate([indices, np.full(padding, indices[-1], dtype=np.int64)])
    times = np.arange(num_frames, dtype=np.float64) if times is None else np.asarray(times, dtype=np.float64)
    if times.shape != (num_frames,):
        raise ValueError(f"sample_frames: times must have shape ({num_frames},), found {times.shape}")
    distance = np.abs(times[:, None] - times[indices][None, :])  # (T, N)
    nearest = np.argmin(distance, axis=1).astype(np.int64)  # first minimum: the earlier sample on a tie
    return FrameSample(indices=indices, nearest=nearest, padded=bool(padding))

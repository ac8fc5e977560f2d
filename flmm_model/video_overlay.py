"""Writing a clip's predicted masks for people and for tools (`run.py predict --video`).

`write_clip_overlay` draws every frame with `overlay.draw_overlay` (one colour per phrase, labels that never
overlap) and writes an animated GIF (Pillow), or an MP4 when the path ends in .mp4 (PyAV, the optional extra
`video`). `write_frame_masks` writes one 8-bit PNG per object per frame: `<out_dir>/object<k>/<t:05d>.png`, 255
inside the mask and 0 outside, k the phrase index and t the frame index (the layout of Ref-YouTube-VOS / MeViS
submissions: one folder per object, one file per frame).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from flmm_model.overlay import draw_overlay


def _check(frames: np.ndarray, masks: np.ndarray, phrases: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    frames, masks = np.asarray(frames), np.asarray(masks, dtype=bool)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_clip_overlay: frames must be (T, H, W, 3) uint8, found {frames.shape} "
                         f"{frames.dtype}")
    if masks.ndim != 4 or masks.shape[1:] != frames.shape[:3]:
        raise ValueError(f"write_clip_overlay: masks must be (K, {frames.shape[0]}, {frames.shape[1]}, "
                         f"{frames.shape[2]}) for these frames, found {masks.shape}")
    if len(phrases) != len(masks):
        raise ValueError(f"write_clip_overlay: {len(masks)} masks but {len(phrases)} phrases")
    return frames, masks


def write_clip_overlay(frames: np.ndarray, masks: np.ndarray, phrases: Sequence[str], path: str, *,
                       fps: float = 6.0) -> str:
    """Write the clip with its masks drawn on every frame.

    Args:
        frames: (T, H, W, 3) uint8 RGB.
        masks: (K, T, H, W) bool, object k in frame t.
        phrases: K labels.
        path: .gif (Pillow) or .mp4 (PyAV, the `video` extra).
        fps: frames per second of the written clip.

    Returns:
        path.

    Raises:
        ValueError: shapes that do not match, or another extension. ImportError: .mp4 without PyAV.
    """
    frames, masks = _check(frames, masks, phrases)
    drawn = [draw_overlay(Image.fromarray(frame), masks[:, t], phrases) for t, frame in enumerate(frames)]
    # A legend strip may make some frames taller: pad all to the tallest so the clip has one size.
    height = max(image.height for image in drawn)
    drawn = [image if image.height == height else _pad_to(image, height) for image in drawn]
    extension = os.path.splitext(path)[1].lower()
    if extension == ".gif":
        drawn[0].save(path, save_all=True, append_images=drawn[1:], duration=round(1000 / fps), loop=0)
    elif extension == ".mp4":
        _write_mp4(drawn, path, fps=fps)
    else:
        raise ValueError(f"write_clip_overlay: {path}: expected a .gif or .mp4 path, found {extension or 'none'}")
    return path


def _pad_to(image: Image.Image, height: int) -> Image.Image:
    canvas = Image.new("RGB", (image.width, height), (0, 0, 0))
    canvas.paste(image, (0, 0))
    return canvas


def _write_mp4(images: list[Image.Image], path: str, *, fps: float) -> None:
    try:
        import av  # noqa: PLC0415 - the optional extra, needed only for .mp4
    except ImportError as error:
        raise ImportError(f"{path}: writing MP4 needs PyAV, the optional extra 'video': pip install "
                          f"'flmm_model[video]' (or write a .gif)") from error
    width, height = images[0].size
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for image in images:
            array = np.asarray(image)[: stream.height, : stream.width]  # yuv420p needs even sides
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frame_masks(masks: np.ndarray, out_dir: str) -> list[str]:
    """Write `<out_dir>/object<k>/<t:05d>.png` (mode L, 255 = mask) for every object k and frame t.

    Args:
        masks: (K, T, H, W) bool.
        out_dir: created when missing.

    Returns:
        The K * T paths written, object-major.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4:
        raise ValueError(f"write_frame_masks: masks must be (K, T, H, W), found {masks.shape}")
    paths = []
    for k, object_masks in enumerate(masks):
        folder = os.path.join(out_dir, f"object{k}")
        os.makedirs(folder, exist_ok=True)
        for t, mask in enumerate(object_masks):
            path = os.path.join(folder, f"{t:05d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(path)
            paths.append(path)
    return paths

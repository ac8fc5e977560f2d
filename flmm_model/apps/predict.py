"""`predict(...)`: masks for phrases on one image: one PNG per phrase plus an overlay with contours and labels
(drawn by `flmm_model.overlay`); `predict_video(...)`: the same through a clip (per-frame PNGs, an overlay GIF).
`chat(...)`: the frozen LMM answers a question about the image(s), phrases of the answer are grounded, and the same
files (plus `answer.json`) are written.

Every cheap check runs before the frozen weights load: the phrases, the device, the image (read, size limits), the
checkpoint's config and trainable weights (read into memory), the phrases encoded with the checkpoint's prompt
(control tokens, `model.max_length`), and the output directory (created, checked writable).

Under torchrun with `model.shard_lmm=fsdp` (a frozen LMM too large for one GPU) every process runs the same image
and text through its shard of the LMM (generation takes the main process's scores, so every process decodes the
same tokens and runs the same forwards), and the main process prints and writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flmm_model.checkpoint import atomic_write_text
from flmm_model.config import ModelConfig
from flmm_model.data.images import load_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts, reject_control_tokens
from flmm_model.distributed import DistInfo, check_device, init_distributed, resolve_device, shutdown_distributed
from flmm_model.errors import InputError, MissingDependencyError, MissingFileError
from flmm_model.overlay import draw_overlay
from flmm_model.phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASES, spacy_missing_message
from flmm_model.recipes.inference import OpenedCheckpoint, open_checkpoint, save_image, write_masks
from flmm_model.run_dir import prepare_output_dir


def load_image(path: str | Path) -> Image.Image:
    """An upright RGB PIL image, read exactly as the datasets read theirs (`flmm_model.data.load_rgb`: EXIF
    orientation applied, transparency composited on white), so a prediction sees the pixels training saw."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise InputError(f"image {str(path)!r}: is a directory, not an image file")
        raise MissingFileError(f"image {str(path)!r}: no such file")
    return load_rgb(str(path))


def predict(model_cfg: ModelConfig, *, checkpoint: str, image: str, phrases: list[str], out_dir: str,
            device: str = "auto", model: Any = None) -> dict[str, Any]:
    """Segment `phrases` in `image` with the checkpoint's model and write the results into `out_dir`.

    Args:
        model_cfg: where the frozen parts come from (`model.qwen`, `model.sam`; the user's paths or presets) and the
            longest text (`model.max_length`); everything else comes from the checkpoint.
        checkpoint: checkpoint dir, or a run dir (its newest checkpoint).
        image: image file path.
        phrases: one or more referring phrases.
        out_dir: output directory (created): `mask_<k>_<phrase>.png` (0 / 255) per phrase and `overlay.png`.
        device: auto | cpu | cuda | cuda:N.
        model: an already loaded FrozenQwenSAM (skips loading `checkpoint`).
    Returns:
        dict with `masks` (file paths), `overlay` (file path) and `areas` (foreground pixels per phrase).
    """
    parts = _checked_phrases(phrases, device)
    picture = load_image(image)
    opened = _open_for(checkpoint, model_cfg, model, parts, phrases)
    with _processes(device, loaded=model is not None) as info:
        out = prepare_output_dir(out_dir, what="--out") if info.is_main else None
        if model is None:
            model = _build(opened, model_cfg, info)
        with torch.no_grad():
            masks = model.segment(picture, list(phrases)).cpu().numpy().astype(bool)  # (K, H, W)
        areas = [int(mask.sum()) for mask in masks]
        if out is None:  # another process of a sharded LMM: the main process writes
            return {"masks": [], "overlay": None, "areas": areas}
        mask_paths = write_masks(out, masks, phrases)
        overlay_path = save_image(draw_overlay(picture, masks, [f"{k}: {phrase}" for k, phrase in
                                                                enumerate(phrases)]), out / "overlay.png")
        for phrase, path, area in zip(phrases, mask_paths, areas, strict=True):
            print(f"{phrase!r}: {area} px -> {path}")
        print(f"overlay -> {overlay_path}")
        return {"masks": mask_paths, "overlay": str(overlay_path), "areas": areas}


def predict_video(model_cfg: ModelConfig, *, checkpoint: str, video: str, phrases: list[str], out_dir: str,
                  device: str = "auto", key_frame: int | None = None, fps: float | None = None,
                  max_frames: int = 16, model: Any = None) -> dict[str, Any]:
    """Segment `phrases` through a clip and write per-frame masks and an overlay GIF into `out_dir`.

    The frozen LMM watches the clip (up to `max_frames` frames, sampled evenly beyond that) and the heads ground
    the phrases on the first frame of every frame group; a SAM2 refiner (`model.sam` a SAM2 / SAM2.1 checkpoint or
    preset) tracks them through every frame with its video memory, any other refiner refines every watched frame
    (`FrozenQwenSAM.segment_clip`). With `key_frame` the phrases are grounded on that frame alone, as on an image.
    Every frame of the clip gets a mask: nothing is dropped.

    Args:
        video: a frames directory (natural order of the file names), an animated GIF / WebP, or a video file (PyAV:
            `pip install -e ".[video]"`); read by `data.clips.read_clip`.
        key_frame: ground the phrases on this frame alone (index into the clip); None: the LMM watches the clip.
        max_frames: the frames the LMM watches (`predictor.DEFAULT_MAX_FRAMES`).
        fps: frame rate of a frames directory (for the overlay's timing); default `data.clips.DEFAULT_FPS`.
        out_dir: output directory (created): `object<k>/<t:05d>.png` (0 / 255) per object and frame, `overlay.gif`,
            `clip.json` (phrases, frame count, key frame, per-frame areas).
        The rest: see `predict`.

    Returns:
        dict with `masks` (file paths), `overlay` (file path), `areas` (per phrase, foreground pixels per frame).
    """
    from flmm_model.data.clips import DEFAULT_FPS, read_clip
    from flmm_model.video_overlay import write_clip_overlay, write_frame_masks

    parts = _checked_phrases(phrases, device)
    if not Path(video).exists():
        raise MissingFileError(f"--video {str(video)!r}: no such file or directory")
    clip = read_clip(video, fps=fps or DEFAULT_FPS)
    if max_frames < 2:
        raise InputError(f"--max-frames {max_frames}: the LMM watches frames in groups of 2; give at least 2")
    if key_frame is not None and not 0 <= key_frame < len(clip):
        raise InputError(f"--key-frame {key_frame}: the clip {video!r} has {len(clip)} frames (0..{len(clip) - 1})")
    opened = _open_for(checkpoint, model_cfg, model, parts, phrases)
    with _processes(device, loaded=model is not None) as info:
        out = prepare_output_dir(out_dir, what="--out") if info.is_main else None
        if model is None:
            model = _build(opened, model_cfg, info)
        pictures = [Image.fromarray(frame) for frame in clip.frames]
        with torch.no_grad():
            masks = model.segment_clip(pictures, list(phrases), key_frame=key_frame, times=clip.times,
                                       max_frames=max_frames).numpy()  # (K, T, H, W)
        areas = [[int(frame.sum()) for frame in mask] for mask in masks]
        if out is None:
            return {"masks": [], "overlay": None, "areas": areas}
        mask_paths = write_frame_masks(masks, str(out))
        overlay_path = write_clip_overlay(clip.frames, masks, [f"{k}: {phrase}" for k, phrase in enumerate(phrases)],
                                          str(out / "overlay.gif"), fps=fps or DEFAULT_FPS)
        atomic_write_text(out / "clip.json", json.dumps(dict(video=str(video), phrases=list(phrases),
                                                             frames=len(clip), key_frame=key_frame,
                                                             max_frames=max_frames, areas=areas),
                                                        indent=2))
        for phrase, area in zip(phrases, areas, strict=True):
            print(f"{phrase!r}: {len(area)} frames, {sum(a > 0 for a in area)} with the object")
        print(f"masks -> {out}/object<k>/<frame>.png, overlay -> {overlay_path}")
        return {"masks": mask_paths, "overlay": str(overlay_path), "areas": areas}


def _checked_phrases(phrases: list[str], device: str) -> list[Any]:
    """The phrases' expression parts and the device, checked (no weights read)."""
    if not phrases:
        raise InputError("predict: give at least one phrase (--text)")
    try:
        parts = expression_parts(list(phrases))
    except InputError as error:
        raise InputError(f"--text: {error}") from error
    check_device(device, key="--device")
    return parts


def _open_for(checkpoint: str, model_cfg: ModelConfig, model: Any, parts: list[Any], phrases: list[str]
              ) -> OpenedCheckpoint | None:
    """The checkpoint's config and weights read into memory (None when a model is given), and the phrases encoded
    with its prompt: the very encoding segment() will do, so a control token or a too long text fails here."""
    opened = open_checkpoint(checkpoint, model_cfg) if model is None else None
    prompt = opened.prompt if opened is not None else model
    try:
        encode_grounded(prompt.tokenizer, parts, instruction=prompt.instruction, system=prompt.system,
                        max_length=prompt.max_length)
    except InputError as error:
        raise InputError(f"--text {list(phrases)}: {error}") from error
    return opened


@contextmanager
def _processes(device: str, *, loaded: bool) -> Iterator[DistInfo]:
    """This process's place: under torchrun the process group (every process runs the same inputs through its shard
    of the LMM, the main one prints and writes), else a world of one; `loaded` (a model passed in) joins no group."""
    if loaded:
        yield DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device))
        return
    info = init_distributed(device)
    try:
        yield info
    finally:
        shutdown_distributed(info)


def _build(opened: OpenedCheckpoint, model_cfg: ModelConfig, info: DistInfo) -> Any:
    """The checkpoint's model on this process's device, its LMM sharded when `model.shard_lmm=fsdp` under torchrun."""
    model, memory = opened.build_on(info, shard_lmm=model_cfg.shard_lmm)
    if info.is_main and (info.distributed or model_cfg.shard_lmm != "none"):
        print(memory)
    return model


def chat(model_cfg: ModelConfig, *, checkpoint: str, images: list[str], question: str, ground: list[str] | None = None,
         noun_phrases: bool = False, out_dir: str | None = None, device: str = "auto",
         max_new_tokens: int | None = None, spacy_model: str = DEFAULT_SPACY_MODEL, visual_cot: bool = False,
         box_scale: float = 1.0, model: Any = None) -> dict[str, Any]:
    """Answer `question` about the image(s) with the checkpoint's frozen LMM, ground phrases of the answer, print the
    answer with the grounded phrases marked ("[phrase]{k}") and write the results into `out_dir`.

    Every cheap check runs before the frozen weights load: the question and phrases (control tokens of the chat
    template), spaCy for `noun_phrases`, the device, the images, the checkpoint, and `out_dir`.

    Args:
        model_cfg: where the frozen parts come from and `model.max_length`; the rest comes from the checkpoint.
        checkpoint: checkpoint dir, or a run dir (its newest checkpoint).
        images: one or more image files; masks are for the first.
        question: the user's question.
        ground: phrases of the answer to ground (each must occur in it, in order), or None.
        noun_phrases: ground every noun phrase of the answer (spaCy; the [nlp] extra).
        out_dir: where to write `answer.json`, `mask_<k>_<phrase>.png` (0 / 255, first image's size) and
            `overlay.png`; None writes nothing.
        device: auto | cpu | cuda | cuda:N.
        max_new_tokens: longest answer; None = 512 (visual_cot: 32, F-LMM's).
        spacy_model: spaCy English pipeline for `noun_phrases`.
        visual_cot: run F-LMM's visual chain-of-thought instead (`FrozenQwenSAM.visual_cot`): the thought is the
            grounded phrase, `crop.png` the region looked at, and the answer comes from both views.
        box_scale: the visual chain-of-thought's box scale.
        model: an already loaded FrozenQwenSAM (skips loading `checkpoint`).

    Returns:
        dict with `answer`, `marked` (the answer with phrases marked), `phrases`, `spans`, `areas`, `masks` and
        `overlay` (file paths, when written), `answer_json`.
    """
    if ground and noun_phrases:
        raise InputError("chat: give either --ground phrases or --noun-phrases, not both")
    if visual_cot and (ground or noun_phrases or len(images) != 1):
        raise InputError("chat: --visual-cot takes one --image and grounds its own thought (no --ground, "
                         "--noun-phrases)")
    if box_scale <= 0:
        raise InputError(f"--box-scale: expected a positive number, found {box_scale}")
    if not isinstance(question, str) or not question.strip():
        raise InputError("chat: --question must be a non-empty text")
    for k, phrase in enumerate(ground or []):
        if not phrase.strip():
            raise InputError(f"--ground: phrase {k} is empty ({phrase!r})")
    if noun_phrases:
        problem = spacy_missing_message(spacy_model)
        if problem:
            raise MissingDependencyError(problem)
    check_device(device, key="--device")
    if not images:
        raise InputError("chat: give at least one --image")
    pictures = [load_image(path) for path in images]
    opened = open_checkpoint(checkpoint, model_cfg) if model is None else None  # config + weights, in memory
    tokenizer = opened.prompt.tokenizer if opened is not None else model.tokenizer
    for text, name in [(question, "--question")] + [(phrase, f"--ground {phrase!r}") for phrase in ground or []]:
        reject_control_tokens(tokenizer, text, what=name)  # what chat() would refuse after loading: refuse it now
    with _processes(device, loaded=model is not None) as info:
        out = prepare_output_dir(out_dir, what="--out") if out_dir is not None and info.is_main else None
        if model is None:
            model = _build(opened, model_cfg, info)
        return _chat_turn(model, pictures, question, images=images, ground=ground, noun_phrases=noun_phrases,
                          out=out, max_new_tokens=max_new_tokens, spacy_model=spacy_model, visual_cot=visual_cot,
                          box_scale=box_scale, main=info.is_main)


def _chat_turn(model: Any, pictures: list[Image.Image], question: str, *, images: list[str], ground: list[str] | None,
               noun_phrases: bool, out: Path | None, max_new_tokens: int | None, spacy_model: str, visual_cot: bool,
               box_scale: float, main: bool) -> dict[str, Any]:
    """`chat` once the checks passed and the model is loaded; `main` False (another process of a sharded LMM) prints
    nothing."""
    cot = None
    if visual_cot:
        cot = model.visual_cot(pictures[0], question, box_scale=box_scale, max_new_tokens=max_new_tokens or 32)
        result = cot.thought_output
        if main:
            print(f"thought: {mark_phrases(result.answer, result.spans)}\nbox: {list(cot.box)}")
    else:
        result = model.chat(pictures, question, max_new_tokens=max_new_tokens or 512, spacy_model=spacy_model,
                            ground=NOUN_PHRASES if noun_phrases else (list(ground) if ground else None))
    marked = mark_phrases(result.answer, result.spans)
    masks = result.masks.numpy().astype(bool)  # (K, H, W)
    areas = [int(mask.sum()) for mask in masks]
    summary: dict[str, Any] = dict(answer=result.answer, marked=marked, phrases=result.phrases,
                                   spans=[list(span) for span in result.spans], areas=areas)
    if cot is not None:
        summary.update(thought=cot.thought, box=list(cot.box), answer=cot.answer, marked=cot.answer)
    if main:
        print(f"answer: {summary['marked']}")
    if out is not None:
        mask_paths = write_masks(out, masks, result.phrases)
        for k, (phrase, path) in enumerate(zip(result.phrases, mask_paths, strict=True)):
            print(f"{k}: {phrase!r}: {areas[k]} px -> {path}")
        overlay_path = save_image(draw_overlay(pictures[0], masks, [f"{k}: {phrase}" for k, phrase in
                                                                    enumerate(result.phrases)]), out / "overlay.png")
        if cot is not None:
            summary["crop"] = str(save_image(cot.crop, out / "crop.png"))
        answer_path = out / "answer.json"
        atomic_write_text(answer_path, json.dumps(dict(question=question, images=list(images), **summary,
                                                       token_ids=result.token_ids.tolist(), masks=mask_paths),
                                                  indent=2))
        print(f"overlay -> {overlay_path}\nanswer -> {answer_path}")
        summary.update(masks=mask_paths, overlay=str(overlay_path), answer_json=str(answer_path))
    return summary


def mark_phrases(answer: str, spans: list[tuple[int, int]]) -> str:
    """The answer with grounded span k written as "[text]{k}"."""
    marked, cursor = "", 0
    for k, (start, end) in enumerate(spans):
        marked += answer[cursor:start] + f"[{answer[start:end]}]{{{k}}}"
        cursor = end
    return marked + answer[cursor:]

"""The web demo's session, no Gradio: `DemoModel` owns one loaded FrozenQwenSAM and a lock, checks the user's input
before the model runs (`read_image`, `check_phrases`, `check_question`, `read_clip`, `check_key_frame`,
`check_frame_budget`: every bad input becomes an `InputError` whose message the page shows), and runs `segment`
(phrases -> masks), `chat` (a question, with the conversation so far -> the answer and the masks of its typed or
noun phrases, from `FrozenQwenSAM.chat`) and `segment_video` (a clip and phrases -> per-frame masks and an overlay
GIF, from `FrozenQwenSAM.segment_clip` on the frames `data.clips.sample_frames` picks under the frame budget). Huge
images are downscaled for the model; masks come back at the original size. Also here: the example scenes and clips
and the per-request folders of the files offered for download. The Gradio app over it is `apps/demo/app.py`.
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flmm_model.data.clips import (
    ANIMATION_EXTENSIONS,
    DEFAULT_FPS,
    TEMPORAL_PATCH,
    VIDEO_EXTENSIONS,
    ClipFrames,
    sample_frames,
)
from flmm_model.data.clips import read_clip as load_clip  # `DemoModel.read_clip` checks, then calls it
from flmm_model.data.errors import DataError
from flmm_model.data.images import MAX_ASPECT_RATIO, load_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts, reject_control_tokens
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.data.synthetic_clips import SyntheticClips
from flmm_model.errors import InputError, MissingDependencyError
from flmm_model.overlay import draw_overlay
from flmm_model.phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASES, Span, search_phrases, spacy_missing_message
from flmm_model.video_overlay import write_clip_overlay

MAX_SIDE = 2048  # longest image side the model sees by default; larger images are downscaled for it
MAX_INPUT_PIXELS = 50_000_000  # larger uploads are refused before they are decoded
MAX_PHRASES = 20
NO_IMAGE = "No image: upload an image (or pick an example) first."
NO_QUESTION = "No question: type a question about the image."
MAX_NEW_TOKENS = 512  # longest answer of the Chat tab, in tokens (FrozenQwenSAM.chat's default)
# Tokens of the chat template around the texts (system turn, role headers, image block, turn ends), counted
# generously: a conversation is refused before generating when it would not fit the model with a full answer.
TEMPLATE_TOKENS, TURN_TOKENS = 64, 16
EXAMPLE_SEED = 2  # the demo's test split (configs/demo.yaml data.test): scenes the demo model never trained on
EXAMPLE_COUNT = 4
NO_CLIP = "No clip: upload an animated GIF / WebP or a video file (or pick an example) first."
CLIP_EXTENSIONS = ANIMATION_EXTENSIONS + VIDEO_EXTENSIONS  # what the Video tab takes (read by `data.clips.read_clip`)
FRAME_BUDGET = 16  # the Video tab's default frame budget: longer clips are sampled (`data.clips.sample_frames`)
MAX_FRAME_BUDGET = 64  # the largest budget a request may ask for
MAX_CLIP_PIXELS = 1_000_000_000  # decoded pixels of a whole clip (frames x width x height): longer ones are refused
OVERLAY_FPS = (0.2, 50.0)  # the overlay GIF's frame rate is kept in this range (browsers slow down faster GIFs)


@dataclass
class Segmentation:
    """What `DemoModel.segment` returns.

    Attributes:
        phrases: K phrases, in order (phrase k has `overlay.colour(k)`).
        masks: (K, H, W) bool at the original image size.
        overlay: RGB PIL image at the size the model saw (`model_size`): masks tinted, outlined and labelled.
        image_size: (W, H) of the original image.
        model_size: (W, H) of the image the model saw (smaller than `image_size` when it was downscaled).
        seconds: time spent in the model.
    """

    phrases: list[str]
    masks: np.ndarray
    overlay: Image.Image
    image_size: tuple[int, int]
    model_size: tuple[int, int]
    seconds: float

    @property
    def areas(self) -> list[int]:
        """Foreground pixels per phrase, at the original size."""
        return [int(mask.sum()) for mask in self.masks]

    @property
    def shares(self) -> list[float]:
        """Fraction of the image's pixels per phrase, in [0, 1]."""
        return [area / (self.image_size[0] * self.image_size[1]) for area in self.areas]


@dataclass
class ChatTurn:
    """What `DemoModel.chat` returns.

    Attributes:
        answer: the model's answer to the question.
        spans: K (start, end) character spans of the grounded phrases in `answer`, in answer order.
        grounding: the grounded phrases (`answer[start:end]`), their masks at the original image size and the
            overlay (phrase k in `overlay.colour(k)`).
        missing: typed phrases that do not occur in the answer (not grounded).
        history: the conversation's (question, answer) turns, this one last: the next turn's `history`.
    """

    answer: str
    spans: list[Span]
    grounding: Segmentation
    missing: list[str]
    history: list[tuple[str, str]]


@dataclass
class ClipSegmentation:
    """What `DemoModel.segment_video` returns: the masks of the N frames the model segmented, out of the clip's T.

    Attributes:
        phrases: K phrases, in order (phrase k has `overlay.colour(k)`).
        masks: (K, N, H, W) bool at the clip's frame size, frame n of the N segmented ones.
        overlays: N RGB PIL images at the model's size (`model_size`): frame n with its masks drawn.
        overlay_path: the animated GIF of `overlays` (one GIF frame per segmented frame).
        indices: (N,) int64, the source frame of each segmented frame (every frame when T <= the budget).
        times: (N,) float64 seconds of the segmented frames from the clip's start.
        source_frames: T, the clip's frame count.
        frame_budget: the budget the frames were chosen under (`data.clips.sample_frames`' max_frames).
        key_frame: the source frame the user asked to ground the phrases on, or None: the frozen LMM watched the
            segmented frames as one clip (the first of every frame pair refined, the rest as the refiner does).
        key_position: the segmented frame they were grounded on (n; `indices[n]` is `key_frame`, or the sampled
            frame nearest to it in time when the clip was sampled without it); None when the LMM watched.
        frame_size: (W, H) of the clip's frames.
        model_size: (W, H) of the frames the model saw (smaller than `frame_size` when they were downscaled).
        seconds: time spent in the model.
    """

    phrases: list[str]
    masks: np.ndarray
    overlays: list[Image.Image]
    overlay_path: str
    indices: np.ndarray
    times: np.ndarray
    source_frames: int
    frame_budget: int
    key_frame: int | None
    key_position: int | None
    frame_size: tuple[int, int]
    model_size: tuple[int, int]
    seconds: float

    @property
    def sampled(self) -> bool:
        """Whether only some of the clip's frames were segmented (the clip is longer than the budget)."""
        return len(self.indices) < self.source_frames

    @property
    def frames_with_object(self) -> list[int]:
        """Per phrase, how many of the segmented frames have a non-empty mask."""
        return [int(mask.any(axis=(1, 2)).sum()) for mask in self.masks]

    @property
    def mean_shares(self) -> list[float]:
        """Per phrase, the mean over the segmented frames of the mask's fraction of the frame, in [0, 1]."""
        return [float(mask.mean()) for mask in self.masks]

    def sampling_note(self) -> str:
        """One sentence saying which frames were segmented: all of them, or how many under which budget."""
        count = len(self.indices)
        if not self.sampled:
            return f"All {count} frames of the clip were segmented."
        shown = ", ".join(str(int(index)) for index in self.indices)
        return (f"The clip has {self.source_frames} frames, more than the frame budget of {self.frame_budget}: "
                f"{count} frames sampled uniformly over the whole clip were segmented (source frames {shown}); "
                f"the overlay and the gallery show those {count} frames.")

    def key_note(self) -> str:
        """One sentence naming the frame the phrases were grounded on."""
        if self.key_frame is None:
            return (f"The model watched the {len(self.indices)} segmented frames as one clip and grounded the "
                    f"phrases on every frame pair.")
        grounded = int(self.indices[self.key_position])
        if grounded == self.key_frame:
            return f"The phrases were grounded on frame {self.key_frame}."
        return (f"Key frame {self.key_frame} is not among the sampled frames: the phrases were grounded on the "
                f"nearest sampled frame, source frame {grounded}.")


class DemoModel:
    """One loaded FrozenQwenSAM for the web demo: input checks, a lock, `segment`, `chat` and `segment_video`.

    Args:
        model: FrozenQwenSAM in eval mode, with its tokenizer and image processor.
        max_side: longest image (or frame) side the model sees; larger ones are downscaled (masks come back at full
            size).
        max_input_pixels: larger images (or clip frames) are refused before they are decoded.
        max_phrases: most phrases per request.
        max_new_tokens: longest answer of `chat`, in tokens.
        spacy_model: the spaCy English pipeline that finds the answer's noun phrases (name or path).
        max_clip_pixels: clips with more decoded pixels (frames x width x height) are refused, before they are
            decoded when the file's header tells the frame count.
    """

    def __init__(self, model: Any, *, max_side: int = MAX_SIDE, max_input_pixels: int = MAX_INPUT_PIXELS,
                 max_phrases: int = MAX_PHRASES, max_new_tokens: int = MAX_NEW_TOKENS,
                 spacy_model: str = DEFAULT_SPACY_MODEL, max_clip_pixels: int = MAX_CLIP_PIXELS) -> None:
        if max_side < 28:
            raise ValueError(f"max_side: expected >= 28 (two 14-pixel patches), found {max_side}")
        if not 1 <= max_new_tokens <= model.max_length // 2:
            raise InputError(f"max_new_tokens: expected 1 to {model.max_length // 2} (half the model's "
                             f"{model.max_length} tokens, the rest for the conversation), found {max_new_tokens}")
        self.model = model
        self.max_side, self.max_input_pixels, self.max_phrases = max_side, max_input_pixels, max_phrases
        self.max_new_tokens, self.spacy_model, self.max_clip_pixels = max_new_tokens, spacy_model, max_clip_pixels
        self.lock = threading.Lock()  # held while the model runs: never two requests on it at once

    def read_image(self, path: str | None, name: str | None = None) -> Image.Image:
        """The uploaded file as an upright RGB image (EXIF orientation applied, transparency on white), exactly as
        `run.py predict` reads it.

        Raises:
            InputError: no file, a file Pillow cannot read as an image, one over `max_input_pixels` or with an
                aspect ratio of `MAX_ASPECT_RATIO` or more (both checked from the header, before decoding).
        """
        if not path:
            raise InputError(NO_IMAGE)
        name = name or Path(path).name
        try:
            with Image.open(path) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as error:  # too large for PIL even to report its size
            raise InputError(f"{name!r} is over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels; this demo "
                             f"takes at most {self.max_input_pixels / 1e6:.0f} megapixels. Downscale it first.") \
                from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise InputError(f"{name!r} is not an image this demo can read (PNG, JPEG, WebP, BMP, TIFF, GIF ...): "
                             f"{type(error).__name__}") from error
        if width * height > self.max_input_pixels:
            raise InputError(f"{name!r} is {width} x {height} = {width * height / 1e6:.0f} megapixels; this demo "
                             f"takes at most {self.max_input_pixels / 1e6:.0f} megapixels. Downscale it first.")
        if max(width, height) >= MAX_ASPECT_RATIO * min(width, height):  # Qwen's image processor refuses these
            raise InputError(f"{name!r} is {width} x {height}: the model takes images whose long side is less than "
                             f"{MAX_ASPECT_RATIO} times the short one. Crop it first.")
        try:
            return load_rgb(str(path))
        except DataError as error:
            raise InputError(f"{name!r} could not be decoded as an image (a damaged or truncated file?)") from error

    def check_text(self, text: str, what: str) -> None:
        """Raise InputError if `text` holds a control token of the chat template (e.g. `<|im_end|>`,
        `<|image_pad|>`): it would be read as structure, not as words (`data.prompts.reject_control_tokens`)."""
        reject_control_tokens(self.model.tokenizer, text, what=what)

    def check_phrases(self, text: str | None) -> list[str]:
        """The phrases of `text`, one per non-blank line (whitespace collapsed), checked against the model.

        Raises:
            InputError: no phrase, more than `max_phrases`, a control token in a line, or a prompt longer than the
                model's `max_length` tokens (naming the longest line).
        """
        phrases = [" ".join(line.split()) for line in (text or "").splitlines()]
        numbered = [(number, phrase) for number, phrase in enumerate(phrases, start=1) if phrase]
        if not numbered:
            raise InputError("No phrase: type at least one phrase, one per line (e.g. 'the red circle').")
        if len(numbered) > self.max_phrases:
            raise InputError(f"{len(numbered)} phrases; this demo takes at most {self.max_phrases} per request.")
        for number, phrase in numbered:
            self.check_text(phrase, f"Line {number}")
        phrases = [phrase for _, phrase in numbered]
        model = self.model
        try:
            input_ids, _ = encode_grounded(model.tokenizer, expression_parts(phrases), instruction=model.instruction,
                                           system=model.system)
        except ValueError as error:
            raise InputError(f"The phrases cannot be encoded: {error}") from error
        if input_ids.numel() > model.max_length:
            lengths = [len(model.tokenizer(phrase, add_special_tokens=False)["input_ids"]) for _, phrase in numbered]
            longest = int(np.argmax(lengths))
            raise InputError(f"The phrases are too long for the model: {input_ids.numel()} tokens with the prompt, "
                             f"the model takes at most {model.max_length}. Line {numbered[longest][0]} alone is "
                             f"{lengths[longest]} tokens; shorten it.")
        return phrases

    def check_question(self, question: str | None, history: Sequence[tuple[str, str]] = ()) -> str:
        """The question without surrounding whitespace, checked: not empty, no control token, and short enough that
        the conversation (earlier turns, the question and an answer of `max_new_tokens`) fits the model.

        Raises:
            InputError: an empty question, a control token, a question or conversation too long for the model.
        """
        question = (question or "").strip()
        if not question:
            raise InputError(NO_QUESTION)
        self.check_text(question, "The question")
        tokenizer, max_length = self.model.tokenizer, self.model.max_length
        asked = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        earlier = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for turn in history for text in turn)
        alone = max_length - self.max_new_tokens - TEMPLATE_TOKENS - TURN_TOKENS  # room in a new conversation
        if asked > alone:
            raise InputError(f"The question is {asked} tokens; with room for a {self.max_new_tokens}-token answer the "
                             f"model takes at most {max(alone, 0)}. Shorten it.")
        if asked + earlier > alone - TURN_TOKENS * len(history):
            raise InputError(f"The conversation is too long for the model: {len(history)} earlier turns and the "
                             f"question are {asked + earlier} tokens, and the model takes {max_length} with the "
                             f"answer. Press Clear to start a new conversation.")
        return question

    def model_image(self, image: Image.Image) -> Image.Image:
        """`image`, downscaled (aspect kept) so that its longest side is at most `max_side`."""
        scale = self.max_side / max(image.size)
        if scale >= 1:
            return image
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)

    def segment(self, image: Image.Image, phrases: list[str]) -> Segmentation:
        """Masks for checked `phrases` (see `check_phrases`) in an RGB image, from `FrozenQwenSAM.segment`.

        An image larger than `max_side` is downscaled for the model and its masks scaled back (nearest) to the
        original size; the overlay stays at the model's size.
        """
        seen = self.model_image(image)
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            masks = self.model.segment(seen, phrases).numpy().astype(bool)  # (K, h, w)
            seconds = time.perf_counter() - start
        return segmentation(image, seen, masks, phrases, seconds=seconds)

    def chat(self, image: Image.Image, question: str | None, phrases: str | None = None,
             history: Sequence[tuple[str, str]] = ()) -> ChatTurn:
        """Answer `question` about an RGB image, continuing the conversation `history`, with `FrozenQwenSAM.chat`,
        and ground phrases of the answer: the typed `phrases` (one per line) that occur in it, or, when none are
        typed, its noun phrases (spaCy).

        Typed phrases are found as `FrozenQwenSAM.chat(ground=phrases)` finds them (see `find_phrases`); one that
        does not occur is reported in `missing` instead of failing the turn. The image is downscaled for the model as
        in `segment`; masks come back at the original size.

        Raises:
            InputError, before the model runs: see `check_question` and `check_phrases`; no typed phrase while spaCy
                or its pipeline is missing (the message says what to install).
        """
        question = self.check_question(question, history)
        typed = self.check_phrases(phrases) if (phrases or "").strip() else None
        problem = spacy_missing_message(self.spacy_model) if typed is None else None
        if problem:
            raise InputError(f"No phrase typed, and the answer's noun phrases cannot be found: {problem}. Or type "
                             f"the phrases of the answer to ground, one per line.")
        # A picklable rule (a sharded demo sends the call to its other processes: `apps/demo/lockstep.py`).
        ground = NOUN_PHRASES if typed is None else functools.partial(typed_spans, phrases=typed)
        seen = self.model_image(image)
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            out = self.model.chat(seen, question, ground=ground, history=list(history),
                                  max_new_tokens=self.max_new_tokens, spacy_model=self.spacy_model)
            seconds = time.perf_counter() - start
        masks = out.masks.numpy().astype(bool)  # (K, h, w)
        return ChatTurn(answer=out.answer, spans=out.spans, missing=find_phrases(out.answer, typed)[1] if typed else [],
                        grounding=segmentation(image, seen, masks, out.phrases, seconds=seconds),
                        history=list(out.history))


    # ------------------------------------------------------------------ the Video tab

    def read_clip(self, path: str | None, name: str | None = None) -> ClipFrames:
        """The uploaded clip's frames, read by `data.clips.read_clip` (an animated GIF / WebP, or a video file with
        the optional PyAV), as `run.py predict --video` reads them.

        Raises:
            InputError: no file, an extension the demo does not take, a video file while PyAV is missing, a file
                that cannot be decoded, frames over `max_input_pixels` or too elongated for the model, a clip over
                `max_clip_pixels` (checked from the header before decoding when the header tells the frame count).
        """
        if not path:
            raise InputError(NO_CLIP)
        name = name or Path(path).name
        extension = Path(path).suffix.lower()
        if extension not in CLIP_EXTENSIONS:
            raise InputError(f"{name!r} is not a clip this demo can read: expected an animated GIF / WebP or a "
                             f"video file ({' '.join(CLIP_EXTENSIONS)}), found a {extension or 'extension-less'} "
                             f"file.")
        header = clip_header(path)
        if header is not None:
            self.check_clip_size(name, *header)
        try:
            clip = load_clip(path)
        except MissingDependencyError as error:
            raise InputError(f"{name!r} is a video file, and this server cannot decode video files: PyAV (the "
                             f"optional extra 'video') is not installed. Upload an animated GIF or WebP instead "
                             f"(or install it on the server: pip install 'flmm_model[video]').") from error
        except DataError as error:
            # The server-side path says nothing to the user (and is no business of other users): the name instead.
            detail = str(error).removeprefix(f"clip {path}: ").replace(str(path), name)
            raise InputError(f"{name!r} could not be read as a clip: {detail}") from error
        self.check_clip_size(name, clip.frames.shape[2], clip.frames.shape[1], len(clip))
        return clip

    def check_clip_size(self, name: str, width: int, height: int, frames: int | None) -> None:
        """Raise InputError if a clip's W x H frames are over `max_input_pixels`, too elongated for the model, or
        (when `frames` is known) the whole clip is over `max_clip_pixels`."""
        if width * height > self.max_input_pixels:
            raise InputError(f"{name!r} has {width} x {height} frames = {width * height / 1e6:.0f} megapixels; this "
                             f"demo takes at most {self.max_input_pixels / 1e6:.0f} megapixels. Downscale it first.")
        if max(width, height) >= MAX_ASPECT_RATIO * min(width, height):
            raise InputError(f"{name!r} has {width} x {height} frames: the model takes frames whose long side is "
                             f"less than {MAX_ASPECT_RATIO} times the short one. Crop it first.")
        if frames is not None and frames * width * height > self.max_clip_pixels:
            raise InputError(f"{name!r} is {frames} frames of {width} x {height} = {frames * width * height / 1e6:,.0f}"
                             f" megapixels decoded; this demo takes clips of at most {self.max_clip_pixels / 1e6:,.0f}"
                             f" megapixels. Shorten or downscale it first.")

    def check_key_frame(self, value: Any, frames: int) -> int | None:
        """The key frame as an int, checked against a clip of `frames` frames; None (an empty box): the model
        watches the clip.

        Raises:
            InputError: not a whole number, or outside 0 .. frames - 1.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        key = whole_number(value, "Key frame", hint=f"a frame number from 0 to {frames - 1}")
        if not 0 <= key < frames:
            raise InputError(f"Key frame {key}: the clip has {frames} frames, numbered 0 to {frames - 1}.")
        return key

    def check_frame_budget(self, value: Any) -> int:
        """The frame budget as an int (the most frames the model segments; longer clips are sampled).

        Raises:
            InputError: no number, not a whole number, or outside TEMPORAL_PATCH .. MAX_FRAME_BUDGET.
        """
        limits = f"{TEMPORAL_PATCH} to {MAX_FRAME_BUDGET}"
        budget = whole_number(value, "Frame budget", hint=f"a number of frames from {limits}")
        if not TEMPORAL_PATCH <= budget <= MAX_FRAME_BUDGET:
            raise InputError(f"Frame budget {budget}: expected {limits} frames.")
        return budget

    def segment_video(self, path: str | None, phrases: str | None, *, out_dir: str | Path, key_frame: Any = None,
                      frame_budget: Any = FRAME_BUDGET, name: str | None = None) -> ClipSegmentation:
        """The Video tab's request: an uploaded clip and phrases (one per line) -> masks through the clip and the
        overlay GIF written into `out_dir`.

        Every check runs before the model, the cheap ones first: the file, the phrases (`check_phrases`), the
        budget (`check_frame_budget`), the clip (`read_clip`), the key frame (`check_key_frame`, a source frame).

        Args:
            path: the uploaded file (None: nothing uploaded).
            phrases: one phrase per line.
            out_dir: an existing folder for `overlay.gif`.
            key_frame: the source frame to ground the phrases on alone; None (default): the LMM watches the clip.
            frame_budget: the most frames to segment; a longer clip is sampled (see `segment_clip`).
            name: the file's name as uploaded, for messages (default: the path's).
        """
        if not path:
            raise InputError(NO_CLIP)
        phrase_list = self.check_phrases(phrases)
        budget = self.check_frame_budget(frame_budget)
        clip = self.read_clip(path, name)
        key = self.check_key_frame(key_frame, len(clip))
        return self.segment_clip(clip, phrase_list, key_frame=key, frame_budget=budget, out_dir=out_dir)

    def segment_clip(self, clip: ClipFrames, phrases: list[str], *, key_frame: int | None, frame_budget: int,
                     out_dir: str | Path) -> ClipSegmentation:
        """Masks for checked `phrases` through a read clip, from `FrozenQwenSAM.segment_clip`, and the overlay GIF.

        The frames are those `data.clips.sample_frames` picks under `frame_budget`: every frame of a clip within the
        budget, else the budget's count sampled uniformly over the whole clip (the repeat that pads an odd count
        for the LMM's frame pairs is not a frame of its own here). `key_frame` None: the frozen LMM watches those
        frames as one clip, with their times; else the phrases are grounded on the sampled frame nearest in time
        to `key_frame` (itself whenever it was sampled). Frames larger than `max_side` are
        downscaled for the model as images are in `segment`; the masks come back at the clip's size, the overlay
        stays at the model's.
        """
        sample = sample_frames(len(clip), clip.times, max_frames=frame_budget)
        count = len(sample.indices) - int(sample.padded)
        indices = sample.indices[:count]
        key_position = None if key_frame is None else int(sample.nearest[key_frame])  # never the padding repeat
        frames = [Image.fromarray(clip.frames[index]) for index in indices]
        seen = [self.model_image(frame) for frame in frames]
        with self.lock, torch.no_grad():
            start = time.perf_counter()
            watch = dict(times=clip.times[indices], max_frames=max(2, count + count % 2)) if key_frame is None else {}
            masks = self.model.segment_clip(seen, phrases, key_frame=key_position, **watch).numpy().astype(bool)
            seconds = time.perf_counter() - start
        overlays = [draw_overlay(picture, masks[:, n], phrases) for n, picture in enumerate(seen)]
        times = clip.times[indices]
        overlay_path = write_clip_overlay(np.stack([np.asarray(picture) for picture in seen]), masks, phrases,
                                          str(Path(out_dir) / "overlay.gif"), fps=overlay_fps(times))
        if seen[0].size != frames[0].size:
            phrase_count, _, height, width = masks.shape
            full = resize_masks(masks.reshape(phrase_count * count, height, width), frames[0].size)
            masks = full.reshape(phrase_count, count, *full.shape[1:])  # (K, N, H, W)
        return ClipSegmentation(phrases=phrases, masks=masks, overlays=overlays, overlay_path=overlay_path,
                                indices=indices, times=times, source_frames=len(clip), frame_budget=frame_budget,
                                key_frame=key_frame, key_position=key_position, frame_size=frames[0].size,
                                model_size=seen[0].size, seconds=seconds)


def whole_number(value: Any, what: str, *, hint: str) -> int:
    """`value` (an int, or a float without a fraction, as a number box sends it) as an int; else InputError naming
    `what` and saying what is expected (`hint`)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"No {what.lower()}: type {hint}.")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{what} {value!r}: expected {hint}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InputError(f"{what} {value!r}: expected {hint}.")
    return int(value)


def clip_header(path: str) -> tuple[int, int, int | None] | None:
    """(width, height, frame count or None) of a clip file from its header, without decoding its frames; None when
    the header cannot be read here (`read_clip` then says why, or PyAV is missing for a video file)."""
    extension = Path(path).suffix.lower()
    if extension not in CLIP_EXTENSIONS:
        return None
    if extension in ANIMATION_EXTENSIONS:
        try:
            with Image.open(path) as probe:
                return probe.width, probe.height, int(getattr(probe, "n_frames", 1))
        except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            return None
    try:
        import av  # noqa: PLC0415 - the optional extra `video`
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            frames = stream.frames or None  # 0: the container does not say
            if frames is None and stream.duration and stream.average_rate:
                frames = round(float(stream.duration * stream.time_base) * float(stream.average_rate))
            return stream.codec_context.width, stream.codec_context.height, frames
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return None


def describe_clip(path: str, name: str | None = None) -> str:
    """One line (Markdown) about an uploaded clip from its header, nothing decoded: its frame count and size, so the
    key frame can be chosen; "" when the header does not tell (`read_clip` then reads the clip or says why not)."""
    header = clip_header(path)
    if header is None:
        return ""
    width, height, frames = header
    shown = (name or Path(path).name).replace("`", "'")
    if frames is None:
        return f"`{shown}`: frames of {width} x {height}."
    return f"`{shown}`: {frames} frames of {width} x {height} (key frame 0 to {frames - 1})."


def overlay_fps(times: np.ndarray) -> float:
    """Frames per second of the overlay GIF: the segmented frames at the clip's own pace (their mean spacing in
    `times`, seconds), kept within `OVERLAY_FPS`; `DEFAULT_FPS` for a single frame."""
    if len(times) < 2 or times[-1] <= times[0]:
        return DEFAULT_FPS
    return float(np.clip((len(times) - 1) / (times[-1] - times[0]), *OVERLAY_FPS))


def segmentation(image: Image.Image, seen: Image.Image, masks: np.ndarray, phrases: list[str], *,
                 seconds: float) -> Segmentation:
    """The Segmentation of (K, h, w) bool `masks` of `phrases` in `seen` (the image the model saw): the overlay at
    that size, the masks scaled back (nearest) to the original `image`'s size."""
    overlay = draw_overlay(seen, masks, phrases)
    if seen.size != image.size:
        masks = resize_masks(masks, image.size)  # (K, H, W)
    return Segmentation(phrases=phrases, masks=masks, overlay=overlay, image_size=image.size, model_size=seen.size,
                        seconds=seconds)


def find_phrases(answer: str, phrases: Sequence[str]) -> tuple[list[Span], list[str]]:
    """Spans of the typed `phrases` in `answer` (sorted), and the phrases not found: `phrases.search_phrases`, not
    strict and ignoring case (a person types a phrase without knowing how the answer capitalises it). Whenever chat
    would find every phrase with the case it was typed in, the two agree."""
    return search_phrases(answer, phrases, ignore_case=True, strict=False)


def typed_spans(answer: str, phrases: Sequence[str]) -> list[Span]:
    """The spans of the typed `phrases` found in `answer` (`find_phrases`), the Chat tab's grounding rule."""
    return find_phrases(answer, phrases)[0]


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (K, h, w) masks to `size` = (W, H), sampling at pixel centres: (K, H, W)."""
    _, height, width = masks.shape
    rows = np.minimum(((np.arange(size[1]) + 0.5) * height / size[1]).astype(np.int64), height - 1)  # (H,)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * width / size[0]).astype(np.int64), width - 1)  # (W,)
    return masks[:, rows[:, None], cols[None, :]]  # (K, H, W)


def example_scenes(directory: str | Path, *, count: int = EXAMPLE_COUNT, seed: int = EXAMPLE_SEED) -> list[list[str]]:
    """Synthetic demo scenes with two or more phrases, written as PNGs into `directory`: [[path, phrases], ...]
    (phrases one per line), in the form `gr.Examples` takes."""
    scenes = SyntheticDataset(tokenizer=None, image_processor=None, length=1000, seed=seed)
    examples = []
    for index in range(len(scenes)):
        scene = scenes.scene(index)
        if len(scene.phrases) < 2:
            continue
        path = Path(directory) / f"synthetic_{seed}_{index:03d}.png"
        scene.image.save(path)
        examples.append([str(path), "\n".join(scene.phrases)])
        if len(examples) == count:
            break
    return examples


def example_clips(directory: str | Path, *, count: int = 2, seed: int = EXAMPLE_SEED,
                  frames: int = 12) -> list[list[str]]:
    """Synthetic demo clips (moving shapes, `data.synthetic_clips`) with two or more phrases, written as animated
    GIFs into `directory`: [[path, phrases], ...] (phrases one per line), in the form `gr.Examples` takes."""
    clips = SyntheticClips(length=100, seed=seed, num_frames=frames)
    examples = []
    for index in range(len(clips)):
        clip = clips[index]
        if len(clip.phrases) < 2:
            continue
        path = Path(directory) / f"clip_{seed}_{index:03d}.gif"
        clip.frames[0].save(path, save_all=True, append_images=clip.frames[1:], duration=round(1000 / DEFAULT_FPS),
                            loop=0)
        examples.append([str(path), "\n".join(clip.phrases)])
        if len(examples) == count:
            break
    return examples


class RequestFiles:
    """Per-request folders for the files the page offers (mask PNGs, overlay GIFs); only the newest `keep` are kept
    (Gradio copies what a request returns into its own cache)."""

    def __init__(self, root: str | Path, *, keep: int = 16) -> None:
        self.root, self.keep, self.count = Path(root), keep, 0
        self.lock = threading.Lock()

    def new(self) -> Path:
        with self.lock:
            self.count += 1
            folder = self.root / f"request_{self.count:06d}"
            folder.mkdir(parents=True)
            stale = sorted(self.root.glob("request_*"))[:-self.keep]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return folder

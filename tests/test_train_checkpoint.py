"""Training checkpoints (atomic, keep-last-k, resolvable), RNG state round trip and the LR schedule; no model needed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flmm_model import checkpoint
from flmm_model.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    read_weights,
    resolve_checkpoint,
)
from flmm_model.recipes.train import WarmupCosine, plot_metrics, warmup_cosine
from flmm_model.run_dir import capture_rng_state, restore_rng_state, save_checkpoint


def _save(root, step, value, *, keep_last=2):
    state = {"step": step, "optimizer": {"state": {}, "param_groups": []}, "rng": [capture_rng_state()]}
    return save_checkpoint(root=root, step=step, weights={"head.weight": torch.full((2, 2), value)}, model_config={},
                           trainer_state=state, config_yaml="train: {}\n", keep_last=keep_last)


def test_checkpoints_keep_last_k_and_resolve_from_run_dir(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        _save(root, step, float(step))
    assert [p.name for p in list_checkpoints(root)] == ["step_0000020", "step_0000030"]
    latest = latest_checkpoint(root)
    assert resolve_checkpoint(tmp_path / "run") == latest == resolve_checkpoint(latest)
    assert load_trainer_state(latest)["step"] == 30
    assert read_weights(latest)["head.weight"][0, 0] == 30.0
    assert (latest / "config.yaml").read_text() == "train: {}\n"


class Killed(BaseException):
    """A SIGKILL at an exact point: nothing after it runs (not even an `except Exception` cleanup)."""


def test_crash_while_writing_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 10, 1.0)

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_text", killed)  # after the weights, before the model config
        with pytest.raises(Killed):
            _save(root, 20, 2.0)
    assert [p.name for p in list_checkpoints(root)] == ["step_0000010"]  # no torn step_0000020
    assert read_weights(latest_checkpoint(root))["head.weight"][0, 0] == 1.0
    _save(root, 20, 2.0)  # the next save sweeps the leftover temporary directory
    assert not list(root.glob(".tmp-*"))
    assert latest_checkpoint(root).name == "step_0000020"


def test_rewriting_same_step_replaces_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10, 1.0)
    _save(root, 10, 5.0)
    assert read_weights(latest_checkpoint(root))["head.weight"][0, 0] == 5.0


def test_resolve_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        resolve_checkpoint(tmp_path / "file")


def test_rng_state_round_trip_through_checkpoint_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_warmup_then_cosine_to_zero():
    total, warmup = 100, 3
    factors = [warmup_cosine(s, warmup_steps=warmup, total_steps=total) for s in range(total + 1)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))  # non-increasing after warm-up
    assert factors[total] == pytest.approx(0.0, abs=1e-12)
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=0.02)


def test_lambda_lr_with_warmup_cosine_state_round_trip():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps=3, total_steps=10))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    fresh_opt = torch.optim.AdamW([param], lr=1e-4)
    fresh_opt.load_state_dict(optimizer.state_dict())
    fresh = torch.optim.lr_scheduler.LambdaLR(fresh_opt, WarmupCosine(warmup_steps=3, total_steps=10))
    fresh.load_state_dict(state)
    optimizer.step()
    scheduler.step()
    fresh_opt.step()
    fresh.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_plot_metrics_writes_png(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 3.0 / s, "loss_mask_bce": 1.0 / s} for s in range(1, 6)]
    records += [{"kind": "val", "step": 5, "val/gIoU": 10.0, "val/cIoU": 12.0, "val/count": 3}]
    plot_metrics(records, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

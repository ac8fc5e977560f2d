"""Every numeric config key has a range, checked when the config loads: a value outside it is a ConfigError naming
the key (exit 2 from `run.py`, before any weights load). A damaged `trainer_state.pt` is a CheckpointError naming
the file, for `train --resume` and `pretrain-lmm --resume` alike (issue 22 item 5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flmm_model.model
import flmm_model.recipes.pretrain_lmm
import flmm_model.recipes.train
import run
from flmm_model.checkpoint import TRAINER_STATE, check_trainer_state, load_trainer_state
from flmm_model.config import ConfigError
from flmm_model.config_loader import load_config
from flmm_model.errors import CheckpointError
from flmm_model.run_dir import capture_rng_state, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_random_lmm.yaml")
PRETRAIN = str(REPO / "configs" / "demo_lmm.yaml")

# (override, the message's start): the key, then the range it must have and the value found.
OUT_OF_RANGE = [
    ("train.lr=-1", r"train\.lr: expected a value in \(0, inf\), found -1"),
    ("train.lr=0", r"train\.lr: expected a value in \(0, inf\), found 0"),
    ("train.lr=.nan", r"train\.lr: expected a value in \(0, inf\), found nan"),
    ("train.betas=[1.5,0.5]", r"train\.betas\.0: expected a value in \[0, 1\), found 1\.5"),
    ("train.betas=[0.9,1.0]", r"train\.betas\.1: expected a value in \[0, 1\), found 1\.0"),
    ("train.betas=[-0.1,0.9]", r"train\.betas\.0: expected a value in \[0, 1\), found -0\.1"),
    ("train.weight_decay=-0.01", r"train\.weight_decay: expected a value in \[0, inf\), found -0\.01"),
    ("train.grad_clip=-1", r"train\.grad_clip: expected a value in \[0, inf\), found -1"),
    ("train.grad_clip=.inf", r"train\.grad_clip: expected a value in \[0, inf\), found inf"),
    ("train.warmup_ratio=-0.1", r"train\.warmup_ratio: expected a value in \[0, 1\), found -0\.1"),
    ("train.epochs=0", r"train\.epochs: expected a positive integer, found 0"),
    ("train.max_steps=0", r"train\.max_steps: expected a positive integer or null, found 0"),
    ("train.stop_after_steps=-2", r"train\.stop_after_steps: expected a positive integer or null, found -2"),
    ("train.grad_accum=0", r"train\.grad_accum: expected a positive integer, found 0"),
    ("train.log_every=0", r"train\.log_every: expected a positive integer, found 0"),
    ("train.val_every=-1", r"train\.val_every: expected an integer >= 0, found -1"),
    ("train.save_every=-5", r"train\.save_every: expected an integer >= 0, found -5"),
    ("train.keep_last=0", r"train\.keep_last: expected a positive integer, found 0"),
    ("train.num_threads=0", r"train\.num_threads: expected a positive integer or null, found 0"),
    ("train.seed=-1", r"train\.seed: expected a seed in \[0, 2\*\*32\), found -1"),
    ("train.seed=4294967296", r"train\.seed: expected a seed in \[0, 2\*\*32\), found 4294967296"),
    ("model.seed=-3", r"model\.seed: expected a seed in \[0, 2\*\*32\), found -3"),
    ("data.batch_size=0", r"data\.batch_size: expected a positive integer, found 0"),
    ("data.num_workers=-1", r"data\.num_workers: expected an integer >= 0, found -1"),
    ("eval.batch_size=-4", r"eval\.batch_size: expected a positive integer, found -4"),
    ("model.min_pixels=0", r"model\.min_pixels: expected a positive integer, found 0"),
    ("model.max_pixels=-1", r"model\.max_pixels: expected a positive integer, found -1"),
    ("model.max_length=0", r"model\.max_length: expected a positive integer, found 0"),
    ("model.mask_head_size=0", r"model\.mask_head_size: expected a positive integer, found 0"),
    ("model.mask_head_widths=[8]", r"model\.mask_head_widths: expected at least 2 positive widths"),
    ("model.mask_head_widths=[8,0,32]", r"model\.mask_head_widths: expected at least 2 positive widths"),
    ("model.bce_weight=-1", r"model\.bce_weight: expected a value in \[0, inf\), found -1"),
    ("model.dice_weight=.nan", r"model\.dice_weight: expected a value in \[0, inf\), found nan"),
    ("data.train.0.seed=-1", r"data\.train\.0\.seed: expected a seed in \[0, 2\*\*32\) or null, found -1"),
    ("data.train.0.max_samples=0", r"data\.train\.0\.max_samples: expected a positive integer or null, found 0"),
    ("data.train.0.max_objects=0", r"data\.train\.0\.max_objects: expected a positive integer or null, found 0"),
    ("data.train.0.image_size=[8,64]", r"data\.train\.0\.image_size: a synthetic dataset needs \[min, max\] with "
                                       r"16 <= min <= max pixels, found \[8, 64\]"),
    ("data.train.0.object_size=[0.1,1.5]", r"data\.train\.0\.object_size: a synthetic dataset needs \[min, max\] "
                                           r"with 0 < min <= max < 1"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[case[0] for case in OUT_OF_RANGE])
def test_a_value_out_of_range_is_a_config_error_naming_the_key(override, message):
    load_config(DEMO, [])  # the config itself is in range: the override alone makes it fail
    with pytest.raises(ConfigError, match="^" + message):
        load_config(DEMO, [override])


def test_values_at_the_edges_of_their_ranges_load():
    cfg = load_config(DEMO, ["train.betas=[0.0,0.999]", "train.weight_decay=0", "train.grad_clip=0",
                             "data.num_workers=0", "train.seed=4294967295", "model.bce_weight=0",
                             "train.val_every=0", "train.save_every=0", "train.lr=1e-12"])
    assert cfg.train.betas == [0.0, 0.999] and cfg.train.seed == 2**32 - 1 and cfg.model.bce_weight == 0


def test_both_loss_weights_zero_and_sam_cache_without_sam_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.bce_weight, model\.dice_weight: both are 0"):
        load_config(DEMO, ["model.bce_weight=0", "model.dice_weight=0"])
    with pytest.raises(ConfigError, match=r"^data\.sam_cache: set to .*, but model\.attention_only=true builds no "
                                          r"SAM"):
        load_config(DEMO, [f"data.sam_cache={tmp_path}", "model.attention_only=true"])
    cfg = load_config(DEMO, [f"data.sam_cache={tmp_path}", "train.attention_only_baseline=true"])
    ablation = flmm_model.recipes.train.attention_only_config(cfg)  # the baseline run drops the cache it cannot use
    assert ablation.model.attention_only and ablation.data.sam_cache is None and cfg.data.sam_cache == str(tmp_path)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any weights is a failure of the check order (AssertionError: exit 1, not 2)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the cheap checks")

    for module in (flmm_model.model, flmm_model.recipes.train):
        monkeypatch.setattr(module, "build_model", forbidden)
    monkeypatch.setattr(flmm_model.recipes.pretrain_lmm, "build_qwen", forbidden)


@pytest.mark.parametrize("command, overrides, message", [
    ("train", ["train.lr=-1"], r"train\.lr: expected a value in \(0, inf\), found -1"),
    ("train", ["train.betas=[1.5,0.5]"], r"train\.betas\.0: expected a value in \[0, 1\)"),
    ("train", ["data.num_workers=-1"], r"data\.num_workers: expected an integer >= 0, found -1"),
    ("train", ["data.sam_cache={tmp}/cache", "model.attention_only=true"], r"data\.sam_cache: set to"),
    ("eval", ["eval.batch_size=0"], r"eval\.batch_size: expected a positive integer, found 0"),
    ("eval", ["data.num_workers=-1"], r"data\.num_workers: expected an integer >= 0"),
    ("pretrain-lmm", ["train.lr=-1"], r"train\.lr: expected a value in \(0, inf\)"),
    ("cache-sam", ["data.sam_cache={tmp}/cache", "model.attention_only=true"], r"data\.sam_cache: set to"),
])
def test_run_py_exits_2_naming_the_key_before_anything_loads(tmp_path, capsys, no_weights, command, overrides,
                                                            message):
    overrides = [override.format(tmp=tmp_path) for override in overrides]
    status = run.cli([command, "--config", PRETRAIN if command == "pretrain-lmm" else DEMO, *overrides,
                      f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing was written


# ---------------------------------------------------------------------------------------------------------------
# trainer_state.pt


def _state(**change) -> dict:
    """A trainer state with every field `recipes.loop.run_loop` writes (one rank)."""
    state = {"step": 3, "epoch": 0, "micro_in_epoch": 3, "total_steps": 10, "world_size": 1, "batch_size": 4,
             "grad_accum": 1, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3},
             "rng": [capture_rng_state()]}
    for key, value in change.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    return state


DAMAGED = {
    "no total_steps": (_state(total_steps=KeyError), r"field 'total_steps' is missing"),
    "no rng": (_state(rng=KeyError), r"field 'rng' is missing"),
    "step is a string": (_state(step="3"), r"field 'step' is str 3, expected an integer >= 0"),
    "negative epoch": (_state(epoch=-1), r"field 'epoch' is int -1, expected an integer >= 0"),
    "step beyond the run": (_state(step=11), r"field 'step' 11 is beyond field 'total_steps' 10"),
    "optimizer is a list": (_state(optimizer=[1, 2]), r"field 'optimizer' is not an optimizer state"),
    "scheduler is a tensor": (_state(scheduler=torch.zeros(2)), r"field 'scheduler' is Tensor, expected a dict"),
    "rng entry not a state": (_state(rng=[{"torch": 1}]), r"field 'rng' entry 0 is not the python / numpy / torch"),
    "a list, not a dict": ([1, 2, 3], r"the file holds a list, expected a dict"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_check_trainer_state_names_the_file_and_the_field(tmp_path, case):
    path = tmp_path / TRAINER_STATE
    check_trainer_state(_state(), path=path)  # the complete state passes
    state, message = DAMAGED[case]
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": not a usable trainer state: " + message):
        check_trainer_state(state, path=path)


def _run_with_checkpoint(root: Path, state) -> Path:
    """A run directory whose one checkpoint (step 3) holds `state` as its trainer state."""
    save_checkpoint(root=root / "checkpoints", step=3, weights={"head.weight": torch.zeros(2, 2)}, model_config={},
                    trainer_state=state, config_yaml="{}\n", keep_last=1)
    return root / "checkpoints" / "step_0000003" / TRAINER_STATE


def test_load_trainer_state_refuses_unreadable_and_wrongly_typed_files(tmp_path):
    path = _run_with_checkpoint(tmp_path / "run", _state())
    assert load_trainer_state(path.parent)["total_steps"] == 10
    path.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": damaged or truncated"):
        load_trainer_state(path.parent)
    torch.save({"step": "three"}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + r": not a usable trainer state: field 'step'"):
        load_trainer_state(path.parent)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=r"the file holds a Tensor, expected a dict"):
        load_trainer_state(path.parent)


RESUME_DAMAGE = {"no total_steps": "not a usable trainer state: field 'total_steps' is missing",
                 "step is a string": "not a usable trainer state: field 'step' is str 3",
                 "unreadable": "damaged or truncated"}


@pytest.mark.parametrize("command", ["train", "pretrain-lmm"])
@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_from_a_damaged_trainer_state_exits_2_naming_the_file(tmp_path, capsys, no_weights, command, damage):
    state = _state() if damage == "unreadable" else DAMAGED[damage][0]
    path = _run_with_checkpoint(tmp_path / "run", state)
    if damage == "unreadable":
        path.write_bytes(b"PK\x03\x04 truncated zip")
    small = ["data.train=[{type: synthetic, length: 8, seed: 0, image_size: [64, 80]}]", "data.val=[]",
             "data.batch_size=4", "train.max_steps=10", "train.progress=false", "data.num_workers=0"]
    config = PRETRAIN if command == "pretrain-lmm" else DEMO
    status = run.cli([command, "--config", config, f"train.out_dir={tmp_path / 'run'}", *small, "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert f"{path}: {RESUME_DAMAGE[damage]}" in err, err

"""`run.py train` end to end on tiny models: run directory contents, checkpoints, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from dataset_files import write_png
from PIL import Image
from safetensors.torch import load_file

import flmm_model.recipes.train
import run
from flmm_model.checkpoint import TRAINER_STATE, list_checkpoints, load_trainer_state
from flmm_model.config import ConfigError, TrainConfig
from flmm_model.errors import CheckpointError
from flmm_model.recipes.train import schedule_steps, warmup_cosine

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")  # tiny random LMM

# The demo config made smaller still: a narrow U-Net, at most 16 vision tokens, small images, few samples.
TINY = [
    "model.mask_head_widths=[8,16,32,64]", "model.mask_head_size=32", "model.max_pixels=12544",
    "data.train=[{type: synthetic, length: 10, seed: 0, image_size: [64, 112]}]",
    "data.val=[{type: synthetic, split: val, length: 3, seed: 1, image_size: [64, 112]}]",
    "data.batch_size=2", "train.progress=false", "train.num_threads=2", "train.lr=1e-3",
    "train.attention_only_baseline=false", "data.num_workers=0",
]


def _records(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_writes_config_metrics_plot_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=4",
                       "train.log_every=1", "train.val_every=2", "train.save_every=2", "train.keep_last=1"])
    assert result["command"] == "train" and result["steps"] == 4 and not result["stopped_early"]
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["train"]["max_steps"] == 4 and saved_cfg["model"]["mask_head_widths"] == [8, 16, 32, 64]

    train_records = _records(out, "train")
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert {"loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice", "lr", "grad_norm",
                "images_per_s"} <= set(record)
        assert torch.isfinite(torch.tensor(record["loss"]))
    # The LR each step used (read before the scheduler moves on): 1 warm-up step of 4 (3%, at least 1), then cosine.
    expected_lrs = [1e-3 * warmup_cosine(s, warmup_steps=1, total_steps=4) for s in range(4)]
    assert expected_lrs == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3])  # cos: 1, 0.75, 0.25 (0 after the run)
    assert [r["lr"] for r in train_records] == pytest.approx(expected_lrs)
    val_records = _records(out, "val")
    assert [r["step"] for r in val_records] == [2, 4]
    assert {"synthetic_val/gIoU", "synthetic_val/cIoU"} <= set(val_records[-1])
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("model", "all-foreground", "empty"):
        assert f"synthetic_val {name}" not in result["val"]  # raw scores are returned, with baseline keys
    assert {"gIoU", "baseline_full/gIoU", "baseline_empty/gIoU"} <= set(result["val"]["synthetic_val"])
    assert result["val"]["synthetic_val"]["baseline_empty/gIoU"] == 0.0

    checkpoints = list_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_0000004"]  # keep_last=1
    model = result["model"]
    weights = load_file(str(checkpoints[0] / "model.safetensors"))
    assert set(weights) == set(model.trainable_state_dict())  # exactly the trainable tensors
    for name, value in model.trainable_state_dict().items():
        assert torch.equal(weights[name], value.cpu())
    state = load_trainer_state(checkpoints[0])
    assert state["step"] == 4 and set(state) >= {"optimizer", "scheduler", "rng", "epoch", "micro_in_epoch"}
    assert (state["world_size"], state["batch_size"], state["grad_accum"]) == (1, 2, 1)
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}

    # A fresh run never silently replaces an earlier run's checkpoints.
    with pytest.raises(FileExistsError, match="--resume"):
        run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}", "train.overwrite=false"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000004"]


def test_resume_reproduces_uninterrupted_loss_trajectory(tmp_path):
    # 10 samples / 2 per micro-batch = 5 micro-batches per epoch, 2 per step: 2 steps per epoch (one leftover
    # micro-batch dropped), so 5 steps cross two epoch boundaries and the resume point (step 3) is mid-epoch.
    common = ["--config", DEMO, *TINY, "train.max_steps=5", "train.grad_accum=2", "train.log_every=1",
              "train.val_every=0", "data.val=[]"]
    straight = tmp_path / "straight"
    run.main(["train", *common, f"train.out_dir={straight}"])

    interrupted = tmp_path / "interrupted"
    first = run.main(["train", *common, f"train.out_dir={interrupted}", "train.save_every=3",
                      "train.stop_after_steps=4"])
    assert first["stopped_early"] and first["steps"] == 4
    assert [r["step"] for r in _records(interrupted, "train")] == [1, 2, 3, 4]  # step 4 is lost with the "crash"
    with open(interrupted / "metrics.jsonl", "a") as handle:  # and the kill came while a line was being appended
        handle.write('{"kind": "train", "step": 5, "lo')
    resumed = run.main(["train", *common, f"train.out_dir={interrupted}", "train.save_every=3", "--resume"])
    assert resumed["steps"] == 5

    expected = _records(straight, "train")
    got = _records(interrupted, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice", "lr", "epoch"):
            assert have[key] == want[key], (have["step"], key, have[key], want[key])
    final_straight = load_file(str(list_checkpoints(straight / "checkpoints")[-1] / "model.safetensors"))
    final_resumed = load_file(str(list_checkpoints(interrupted / "checkpoints")[-1] / "model.safetensors"))
    for name, value in final_straight.items():
        assert torch.equal(final_resumed[name], value), name


def test_resume_refuses_another_setup_or_length_before_building_the_model(tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=4", "data.val=[]"]
    run.main(["train", *common, "train.save_every=2", "train.stop_after_steps=2"])
    checkpoint = list_checkpoints(out / "checkpoints")[-1]

    def no_model(*args, **kwargs):
        raise AssertionError("a resume that cannot continue the run must fail before the model is built")

    monkeypatch.setattr(flmm_model.recipes.train, "build_model", no_model)
    # The data position counts micro-batches per process: it means other samples under another setup.
    with pytest.raises(ValueError, match=r"data\.batch_size 2 in the checkpoint, 1 now"):
        run.main(["train", *common, "data.batch_size=1", "--resume"])
    with pytest.raises(ValueError, match=r"train\.grad_accum 1 in the checkpoint, 2 now"):
        run.main(["train", *common, "train.grad_accum=2", "--resume"])
    # Another length: the LR schedule cannot span both (the extra steps would train at LR 0).
    with pytest.raises(ValueError, match=r"written for 4 steps, this run has 6"):
        run.main(["train", *common[:-2], "train.max_steps=6", "data.val=[]", "--resume"])
    state = load_trainer_state(checkpoint)
    state["world_size"] = 2  # as if written by a 2-process run
    torch.save(state, checkpoint / TRAINER_STATE)
    with pytest.raises(ValueError, match=r"world size 2 in the checkpoint, 1 now"):
        run.main(["train", *common, "--resume"])


def test_resume_and_predict_refuse_heads_trained_with_other_model_settings(tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=4", "data.val=[]"]
    run.main(["train", *common, "train.save_every=2", "train.stop_after_steps=2"])

    def no_model(*args, **kwargs):
        raise AssertionError("a resume that cannot continue the run must fail before the model is built")

    monkeypatch.setattr(flmm_model.recipes.train, "build_model", no_model)
    cases = {
        "model.instruction=Describe the picture.": r"model\.instruction: 'Please .*' in the checkpoint, 'Describe the "
                                                   r"picture\.' now",
        "model.system=You are terse.": r"model\.system: .* in the checkpoint, 'You are terse\.' now",
        "model.qwen=qwen2_vl_tiny": r"model\.qwen: a qwen2_5_vl model in the checkpoint, a qwen2_vl model now",
        "model.max_pixels=6272": r"model\.max_pixels: 12544 in the checkpoint, 6272 now",
    }
    for override, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            run.main(["train", *common, override, "--resume"])
    assert run.cli(["train", *common, "model.qwen=qwen2_vl_tiny", "--resume"]) == 2
    # predict takes the checkpoint's prompt and pixel budget, but the LMM is the user's: another family is refused.
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (90, 120, 30)).save(image)
    with pytest.raises(CheckpointError, match=r"trained on another LMM \(model\.qwen: a qwen2_5_vl model in the "
                                              r"checkpoint, a qwen2_vl model now\)"):
        run.main(["predict", "--config", DEMO, "--checkpoint", str(out), "--image", str(image), "--text", "a cat",
                  "--out", str(tmp_path / "pred"), "model.qwen=qwen2_vl_tiny"])


def test_validation_scores_a_png_set_with_average_recall(tmp_path, photos, capsys):
    root = tmp_path / "data"
    write_png(root, photos, split="val")
    out = tmp_path / "run"
    result = run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=1",
                       f"data.root={root}", "data.val=[{type: png, split: val}]"])
    scores = result["val"]["png_val"]
    assert {"AR_all", "AR_things", "AR_stuff", "AR_singulars", "AR_plurals", "baseline_full/AR_all",
            "baseline_empty/AR_all"} <= set(scores)
    assert "gIoU" not in scores and "cIoU" not in scores
    assert scores["baseline_empty/AR_all"] == 0.0 and scores["count_all"] > 0
    assert {"png_val/AR_all", "png_val/baseline_full/AR_things"} <= set(_records(out, "val")[-1])
    printed = capsys.readouterr().out
    assert "png_val all-foreground" in printed and "AR_all" in printed


def test_schedule_steps_by_hand():
    # 10 micro-batches per epoch, 3 per step -> 3 steps per epoch; 2 epochs = 6 steps; 3% warm-up rounds to >= 1.
    assert schedule_steps(TrainConfig(epochs=2, grad_accum=3), micro_per_epoch=10) == (6, 1)
    assert schedule_steps(TrainConfig(max_steps=200, warmup_ratio=0.05), micro_per_epoch=10) == (200, 10)
    assert schedule_steps(TrainConfig(max_steps=7, warmup_ratio=0.0), micro_per_epoch=10) == (7, 0)
    with pytest.raises(ConfigError, match=r"train\.grad_accum: 4 micro-batches per step, but an epoch has only 3"):
        schedule_steps(TrainConfig(grad_accum=4), micro_per_epoch=3)


def test_a_diverged_run_stops_at_its_first_nan_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    from flmm_model.errors import NonFiniteLossError
    from flmm_model.modeling.grounding import GroundingModel

    forward, calls = GroundingModel.forward, []

    def diverging(self, *args, **kwargs):  # the 4th step's loss is nan (one micro-batch per step)
        output = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 4:
                output = {**output, "loss": output["loss"] * float("nan")}
        return output

    monkeypatch.setattr(GroundingModel, "forward", diverging)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(nan / inf\) at step 4; .*step_0000002, is kept"):
        run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=8", "train.log_every=1",
                  "train.save_every=2", "train.keep_last=1", "data.val=[]"])
    assert [path.name for path in list_checkpoints(out / "checkpoints")] == ["step_0000002"]
    assert [record["step"] for record in _records(out, "train")] == [1, 2, 3]  # no nan logged as a result
    assert "NaN" not in (out / "metrics.jsonl").read_text()
    weights = load_file(str(out / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())


def test_a_second_run_on_a_busy_out_dir_refuses_and_a_stale_lock_is_replaced(tmp_path):
    import socket
    import subprocess
    import sys

    from flmm_model.errors import UserError

    out = tmp_path / "run"
    out.mkdir()
    common = ["train", "--config", DEMO, *TINY, f"train.out_dir={out}", "train.max_steps=1", "data.val=[]"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live run on this host holds the directory
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {sleeper.pid} on "):
            run.main(common)
        assert not (out / "checkpoints").exists() and (out / ".lock").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone: the lock is stale, the run takes it, trains, and removes it at the end.
    run.main(common)
    assert [path.name for path in list_checkpoints(out / "checkpoints")] == ["step_0000001"]
    assert not (out / ".lock").exists()


def test_train_num_threads_holds_for_the_run_only(tmp_path):
    """`run.main(["train", ..., "train.num_threads=1"])` from Python leaves torch's thread count as it found it
    (it leaked into later code before: the next tests ran on one thread)."""
    before = torch.get_num_threads()
    run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=1",
              "train.num_threads=1", "data.val=[]"])
    assert torch.get_num_threads() == before

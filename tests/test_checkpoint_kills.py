"""Checkpoints survive a kill at every rename, replace and delete of saving, re-saving, pruning and overwriting;
readers never pick an incomplete directory and survive the pruning of the one they chose; a full disk or an
unwritable output directory gives a message saying what to do."""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from flmm_model import checkpoint, errors
from flmm_model.checkpoint import (
    WEIGHTS_NAME,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    read_weights,
    resolve_checkpoint,
)
from flmm_model.errors import MissingCheckpointError, StorageError, UserError
from flmm_model.recipes.train import read_metrics
from flmm_model.run_dir import delete_checkpoints, eval_results_path, prepare_output_dir, save_checkpoint


class Killed(BaseException):
    """A SIGKILL at an exact point: nothing after it runs (not even an `except Exception` cleanup)."""


class KillAt:
    """Kill the process (raise Killed) at the n-th call of os.rename, os.replace or shutil.rmtree. A killed rmtree
    has deleted the weights file first, as a real kill in the middle of a deletion leaves a half-deleted tree."""

    def __init__(self, patch: pytest.MonkeyPatch, n: int) -> None:
        self.n, self.calls = n, 0
        real = {"rename": os.rename, "replace": os.replace, "rmtree": shutil.rmtree}

        def wrap(name):
            def operation(path, *args, **kwargs):
                self.calls += 1
                if self.calls == self.n:
                    if name == "rmtree":
                        files = sorted(Path(path).rglob("*"), key=lambda p: p.name != WEIGHTS_NAME)
                        if files and files[0].is_file():
                            files[0].unlink()
                    raise Killed(f"{name} {path}")
                return real[name](path, *args, **kwargs)
            return operation

        patch.setattr(os, "rename", wrap("rename"))
        patch.setattr(os, "replace", wrap("replace"))
        patch.setattr(shutil, "rmtree", wrap("rmtree"))


def _save(root, step, value, *, keep_last):
    return save_checkpoint(root=root, step=step, weights={"head.weight": torch.full((2, 2), float(value))},
                           model_config={}, trainer_state={"step": step}, config_yaml="train: {}\n",
                           keep_last=keep_last)


def _value(path) -> float:
    return float(read_weights(path)["head.weight"][0, 0])


def _hidden(root) -> list[str]:
    return sorted(name for name in os.listdir(root) if name.startswith("."))


# (steps already saved, the operation: (step, keep_last) to save, or "overwrite")
SCENARIOS = {
    "new step, keep_last 1 prunes the old one": ([10], (20, 1)),
    "same step again, keep_last 1 (resume of a finished run)": ([10], (10, 1)),
    "same step again, keep_last 2": ([10, 20], (20, 2)),
    "new step, keep_last 2": ([10, 20], (30, 2)),
    "train.overwrite deletes every checkpoint": ([10, 20], "overwrite"),
}


def _run(root, operation):
    if operation == "overwrite":
        delete_checkpoints(root)
    else:
        step, keep_last = operation
        _save(root, step, 100 + step, keep_last=keep_last)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_rename_or_delete_never_loses_the_newest_complete_checkpoint(tmp_path, monkeypatch,
                                                                                   scenario):
    existing, operation = SCENARIOS[scenario]
    killed_points = 0
    for n in range(1, 50):
        root = tmp_path / f"kill_{n}" / "checkpoints"
        for step in existing:
            _save(root, step, step, keep_last=len(existing))
        with monkeypatch.context() as patch:
            kill = KillAt(patch, n)
            try:
                _run(root, operation)
            except Killed:
                pass
        if kill.calls < n:  # the operation finished before the n-th call: every point has been tried
            break
        killed_points += 1

        # What a resume, eval or predict sees now: only complete checkpoints, the newest old or new one on top.
        for path in root.iterdir():
            if path.name.startswith("step_"):
                assert is_complete(path), (n, path.name, sorted(p.name for p in path.iterdir()))
        listed = list_checkpoints(root)
        if operation != "overwrite":
            step, _ = operation
            newest = listed[-1]
            assert checkpoint.step_of(newest) in (max(existing), step), (n, [p.name for p in listed])
            allowed = {100 + step} | ({step} if step in existing else set()) | {max(existing)}
            assert _value(newest) in allowed, (n, newest.name, _value(newest))
            loaded = load_checkpoint(root.parent)  # a reader given the run directory
            assert loaded.directory == newest and loaded.trainer_state is None

        # The restarted job repeats the operation: it finishes with exactly the expected state, no leftovers.
        _run(root, operation)
        names = [p.name for p in list_checkpoints(root)]
        if operation == "overwrite":
            assert names == []
        else:
            step, keep_last = operation
            expected = sorted(set(existing) | {step})[-keep_last:]
            assert names == [f"step_{s:07d}" for s in expected], (n, names)
            assert _value(root / f"step_{step:07d}") == 100 + step
        assert _hidden(root) == [], (n, _hidden(root))
    assert killed_points >= 2, scenario


def test_kill_between_the_renames_of_a_same_step_resave_then_a_failed_save_keeps_the_checkpoint(tmp_path,
                                                                                               monkeypatch):
    # The reported sequence: keep_last 1, the hidden copy was the only checkpoint, and the next save swept it away.
    root = tmp_path / "run" / "checkpoints"
    _save(root, 10, 1.0, keep_last=1)
    with monkeypatch.context() as patch:
        KillAt(patch, 4)  # calls 1-2: replaces inside the temporary dir; 3: step_N -> hidden copy; 4: tmp -> step_N
        with pytest.raises(Killed):
            _save(root, 10, 2.0, keep_last=1)
    assert not (root / "step_0000010").exists()
    (hidden,) = list_checkpoints(root)  # the hidden copy stands in for step 10
    assert checkpoint.step_of(hidden) == 10 and _value(load_checkpoint(root.parent).directory) == 1.0
    with monkeypatch.context() as patch:
        def full_disk(*args, **kwargs):
            raise Killed("killed while writing the next one")

        patch.setattr(torch, "save", full_disk)
        with pytest.raises(Killed):
            _save(root, 10, 3.0, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step_0000010"]  # renamed back, not deleted
    assert _value(root / "step_0000010") == 1.0


def test_an_incomplete_step_directory_is_never_chosen(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoints", 10, 1.0, keep_last=5)
    _save(run / "checkpoints", 20, 2.0, keep_last=5)
    for name in ("step_0000030", "step_0000040"):  # half deleted by an older version; an eval.json-only leftover
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / ("config.yaml" if name.endswith("30") else "eval.json")).write_text("{}")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000010", "step_0000020"]
    assert resolve_checkpoint(run).name == "step_0000020"
    assert load_checkpoint(run).directory.name == "step_0000020"
    delete_checkpoints(run / "checkpoints")  # train.overwrite removes the incomplete ones too
    assert os.listdir(run / "checkpoints") == []


def test_reader_picks_the_next_newest_when_training_prunes_its_choice(tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 10, 1.0, keep_last=1)
    real_read = checkpoint.read_weights
    pruned, next_step = [], [20]

    def read_while_training_saves(directory, **kwargs):
        if not pruned:  # between choosing step 10 and reading it, the trainer saves step 20 and prunes step 10
            pruned.append(directory.name)
            _save(root, next_step[0], next_step[0] / 10, keep_last=1)
        return real_read(directory, **kwargs)

    monkeypatch.setattr(checkpoint, "read_weights", read_while_training_saves)
    loaded = load_checkpoint(root.parent)
    assert pruned == ["step_0000010"] and loaded.directory.name == "step_0000020"
    assert float(loaded.weights["head.weight"][0, 0]) == 2.0
    assert not (root / "step_0000010").exists()  # never re-created

    pruned.clear()
    next_step[0] = 40
    _save(root, 30, 3.0, keep_last=1)
    with pytest.raises(MissingCheckpointError, match="step_0000030 was deleted while being read .*run directory"):
        load_checkpoint(root / "step_0000030")  # named explicitly: no other checkpoint stands in for it


def test_damaged_checkpoint_files_raise_naming_the_file(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    path = _save(root, 10, 1.0, keep_last=1)
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(errors.CheckpointError, match=r"model.safetensors: damaged or truncated"):
        load_checkpoint(tmp_path / "run")
    trainer_state = path / checkpoint.TRAINER_STATE
    trainer_state.write_bytes(trainer_state.read_bytes()[:30])
    with pytest.raises(errors.CheckpointError, match=r"trainer_state.pt: damaged or truncated"):
        checkpoint.load_trainer_state(path)
    (path / checkpoint.CONFIG_NAME).write_bytes(b"\x00\xff binary")
    with pytest.raises(errors.CheckpointError, match=r"flmm_config.json: not a model config written by flmm_model"):
        checkpoint.read_model_config(path)
    (path / checkpoint.CONFIG_NAME).unlink()
    with pytest.raises(MissingCheckpointError, match=r"flmm_config.json: missing"):
        checkpoint.read_model_config(path)


@pytest.mark.parametrize("failure", ["torch_zip_writer", "enospc"])
def test_full_disk_while_saving_says_free_disk_space_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                      failure):
    root = tmp_path / "checkpoints"
    _save(root, 10, 1.0, keep_last=1)

    def write_fails(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4728128 vs 4728020")

    monkeypatch.setattr(torch, "save", write_fails)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30,
                                                                                            2**20))
    with pytest.raises(StorageError, match=r"writing the checkpoint step_0000020 failed: no space left in .*"
                                           r"checkpoints \(1 MiB free there\); free disk space there"):
        _save(root, 20, 2.0, keep_last=1)
    assert _hidden(root) == []  # the partial write is removed, freeing what it took
    assert [p.name for p in list_checkpoints(root)] == ["step_0000010"]


def test_prepare_output_dir_creates_it_or_says_why_not(tmp_path):
    assert prepare_output_dir(tmp_path / "a" / "b", what="--out").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"--out .*file: exists and is not a directory"):
        prepare_output_dir(tmp_path / "file", what="--out")
    with pytest.raises(StorageError, match=r"train.out_dir .*file/run: cannot be created, a part of the path is a "
                                           r"file"):
        prepare_output_dir(tmp_path / "file" / "run", what="train.out_dir")
    if Path("/sys/kernel").is_dir():  # read-only even for root
        with pytest.raises(StorageError, match=r"creating --out /sys/flmm_test failed: /sys/flmm_test is not "
                                               r"writable"):
            prepare_output_dir("/sys/flmm_test", what="--out")
        with pytest.raises(StorageError, match=r"writing into --out /sys/kernel failed: .* not writable"):
            prepare_output_dir("/sys/kernel", what="--out")


def test_eval_results_go_to_the_run_directory_never_into_the_checkpoint(tmp_path):
    path = _save(tmp_path / "run" / "checkpoints", 10, 1.0, keep_last=1)
    assert eval_results_path(path, None) == tmp_path / "run" / "eval" / "step_0000010.json"
    assert eval_results_path(path, str(tmp_path / "mine")) == tmp_path / "mine" / "eval.json"
    with pytest.raises(UserError, match=r"eval.out_dir: not set, and .*model is not a checkpoint inside a run"):
        eval_results_path(tmp_path / "model", None)


def test_read_metrics_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tra')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 3 is torn"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra\n{"kind": "train", "step": 2}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not JSON .*fix or delete that line"):
        read_metrics(path)
    path.write_text('{"kind": "train", "step": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == [{"kind": "train", "step": 1}]

"""Every script in benchmarks/ runs at its smallest size (seconds, CPU), so a signature change in the package fails
here instead of on the next GPU run. The numbers are not checked (benchmarks print measured tables; timing
assertions would be noise), only that each script runs end to end and returns its table's fields."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """A benchmark script as a module, imported as its `python benchmarks/<name>.py` run sees its folder."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_has_a_smoke_test():
    covered = {"lmm_forward", "train_step", "chat", "cuda_checks", "op_count", "peak_memory", "sharded_forward",
               "video_propagation", "video_lmm_forward", "video_grounding"}
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert scripts <= covered, f"benchmarks without a smoke test: {sorted(scripts - covered)}"


@pytest.mark.parametrize("arch", ["tiny", "qwen3_5_tiny"])  # Qwen3.5: the baseline's maps are its full layers'
def test_lmm_forward_runs_every_mode_and_matches_the_baseline_maps(arch):
    result = load("lmm_forward").main(["--arch", arch, "--seq-len", "64", "--repeats", "1", "--device", "cpu"])
    assert set(result["rows"]) >= {"sdpa", "baseline"} and result["time_ratio"] > 0


@pytest.mark.parametrize("arch", ["tiny", "qwen3_vl_tiny"])  # Qwen3-VL: timestamp tokens between the frame groups
def test_video_lmm_forward_times_every_mode_on_the_baseline_maps(arch):
    result = load("video_lmm_forward").main(["--arch", arch, "--frames", "3", "--group-tokens", "16", "--repeats",
                                             "1", "--device", "cpu"])
    assert set(result["rows"]) == {"sdpa", "eager", "baseline"} and result["time_ratio"] > 0
    assert result["video_tokens"] == 2 * 16 and max(result["diffs"].values()) <= 1e-4


def test_train_step_runs_the_demo_step_with_op_counts(tmp_path):
    result = load("train_step").main(["--arch", "demo", "--device", "cpu", "--batch-size", "2", "--image-size", "112",
                                      "--repeats", "1", "--warmup", "0", "--count-ops"])
    assert isinstance(result, dict) and result


def test_train_step_runs_with_a_sam_cache(tmp_path):
    result = load("train_step").main(["--arch", "demo", "--device", "cpu", "--batch-size", "2", "--image-size", "112",
                                      "--repeats", "1", "--warmup", "0", "--sam-cache", str(tmp_path / "cache")])
    assert isinstance(result, dict) and result


def test_train_step_times_the_cached_step_next_to_the_full_step():
    result = load("train_step").main(["--arch", "demo", "--device", "cpu", "--batch-size", "2", "--image-size", "112",
                                      "--repeats", "1", "--warmup", "0", "--lmm-cache", "--sam-cache"])
    assert result["full_step_s"] > 0 and result["speedup"] == result["full_step_s"] / result["step_s"]
    assert result["regions_s"].get("text decoder + capture", 0.0) == 0.0  # the cached step never ran the LMM


def test_chat_benchmark_runs_both_ways():
    result = load("chat").main(["--arch", "tiny", "--image-size", "112", "--new-tokens", "2", "--repeats", "1",
                                "--device", "cpu"])
    assert isinstance(result, dict) and result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer of a CUDA-only script")
def test_cuda_checks_imports_and_says_it_needs_cuda(capsys):
    assert load("cuda_checks").main() == 1
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_train_smoke.sh"])
def test_gpu_scripts_parse_and_name_existing_files(script):
    text = (BENCHMARKS / script).read_text()
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / script)]).returncode == 0
    for word in text.split():
        if word.startswith("benchmarks/") and word.endswith(".py"):
            assert (BENCHMARKS.parent / word).is_file(), word
        if word.startswith("configs/") and word.endswith(".yaml"):
            assert (BENCHMARKS.parent / word).is_file(), word


def test_op_count_and_peak_memory_helpers_measure_a_block():
    op_count, peak_memory = load("op_count"), load("peak_memory")
    regions = op_count.Regions()
    with peak_memory.PeakMemory(torch.device("cpu")) as memory:
        with regions.region("matmul"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    assert memory.peak_mib > 0


def _sharded_worker(rank: int, world_size: int, port: int, out: str, script: str) -> None:
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if script == "sharded_forward":
        result = load(script).main(["--arch", "tiny", "--device", "cpu", "--repeats", "1", "--batch-size", "2",
                                    "--image-size", "112"])
    else:
        result = load(script).main(["--arch", "demo", "--device", "cpu", "--shard-lmm", "fsdp", "--repeats", "1",
                                    "--warmup", "0", "--batch-size", "2", "--image-size", "112"])
        result = dict(placement=result["placement"], samples_per_s=result["samples_per_s"])
    Path(out, f"{script}_rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("script", ["sharded_forward", "train_step"])
def test_sharded_benchmarks_run_under_two_processes(tmp_path, script):
    """`sharded_forward.py` and `train_step.py --shard-lmm fsdp` as torchrun runs them (2 CPU processes, gloo)."""
    import json

    import torch.multiprocessing as mp
    from test_ddp import _free_port

    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path), script), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"{script}_rank{rank}.json").read_text())
        if script == "sharded_forward":
            assert report["maps_diff"] <= 1e-6 and report["rows_rel_diff"] <= 1e-5
            assert report["sharded_gib"] < report["whole_gib"]
        else:
            assert "sharded over 2 processes" in report["placement"] and report["samples_per_s"] > 0


def test_video_propagation_scores_propagation_next_to_the_copy_baseline():
    result = load("video_propagation").main(["--clips", "1", "--frames", "2"])
    assert set(result["propagated"]) >= {"J", "F", "J&F"} and set(result["copied"]) >= {"J", "F", "J&F"}
    for scores in (result["propagated"], result["copied"]):
        assert 0.0 <= scores["J"] <= 100.0 and 0.0 <= scores["F"] <= 100.0 and scores["count"] > 0


def test_video_grounding_scores_every_route_next_to_the_copy_baseline(tmp_path):
    from flmm_model.config import ModelConfig
    from flmm_model.model import build_model

    checkpoint = tmp_path / "model"
    build_model(ModelConfig(sam="sam2_tiny", mask_head_widths=[8, 16, 32, 64], mask_head_size=32,
                            max_pixels=12544)).save_pretrained(str(checkpoint))
    result = load("video_grounding").main(["--checkpoint", str(checkpoint), "--clips", "1", "--frames", "3",
                                           "--size", "64", "96", "--group-tokens", "16"])
    assert set(result["scores"]) == {"propagated", "per-frame", "copied", "all-foreground"}
    for scores in result["scores"].values():
        assert 0.0 <= scores["J&F"] <= 100.0 and scores["count"] > 0
    assert set(result["seconds_per_clip"]) == {"propagated", "per-frame"}

"""Multi-process training and evaluation: 2 CPU processes (gloo) through the real CLI, and the sharded sampler."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from flmm_model.distributed import ShardedSampler, all_reduce_sum

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_random_lmm.yaml")  # tiny random LMM
TINY = [
    "model.mask_head_widths=[8,16,32,64]", "model.mask_head_size=32", "model.max_pixels=12544",
    "data.train=[{type: synthetic, length: 7, seed: 0, image_size: [64, 112]}]",
    "data.val=[]", "data.test=[{type: synthetic, split: test, length: 5, seed: 3, image_size: [64, 112]}]",
    "data.batch_size=2", "train.progress=false", "eval.progress=false", "train.num_threads=1", "train.lr=1e-3",
    "train.log_every=1", "train.attention_only_baseline=false", "data.num_workers=0",
]


def test_train_shards_are_disjoint_equal_sized_and_reshuffled_per_epoch():
    shards = [list(ShardedSampler(7, rank=r, world_size=2, seed=0)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # 7 padded to 8
    assert set(shards[0]) | set(shards[1]) == set(range(7))
    sampler = ShardedSampler(7, rank=0, world_size=2, seed=0)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]


def test_eval_shards_cover_every_sample_exactly_once():
    shards = [list(ShardedSampler(7, rank=r, world_size=3, shuffle=False, pad=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_sampler_position_skips_consumed_samples():
    sampler = ShardedSampler(10, rank=1, world_size=2, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_position(2, 3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


def test_all_reduce_sum_runs_cpu_tensors_through_the_cuda_device_under_nccl(monkeypatch):
    # NCCL reduces CUDA tensors only, and training reduces CPU tensors (the loss window, the skipped count). No GPU
    # is needed here: the process group is faked, and so is the copy to the GPU (the data stays on the CPU, tagged
    # with the device it was sent to).
    real_to = torch.Tensor.to

    def fake_to(tensor, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if not isinstance(device, (str, torch.device)):
            return real_to(tensor, *args, **kwargs)
        copy = tensor.clone()  # a copy, as a real move between devices makes
        if torch.device(device).type == "cuda":
            copy.sent_to = torch.device(device)
        elif not hasattr(tensor, "sent_to"):
            return real_to(tensor, *args, **kwargs)
        return copy

    reduced_on = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        reduced_on.append(getattr(tensor, "sent_to", tensor.device))
        tensor.mul_(2)  # a second rank holding the same values

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    window = torch.tensor([1.5, 2.0, 4.0], dtype=torch.float64)
    total = all_reduce_sum(window)
    assert reduced_on == [torch.device("cuda", 1)]  # on the current CUDA device, not the CPU
    assert total.device == torch.device("cpu") and not hasattr(total, "sent_to")  # back where it came from
    assert torch.equal(total, torch.tensor([3.0, 4.0, 8.0], dtype=torch.float64))
    assert torch.equal(window, torch.tensor([1.5, 2.0, 4.0], dtype=torch.float64))  # the input is left alone

    # gloo reduces a CPU tensor where it is.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    reduced_on.clear()
    assert torch.equal(all_reduce_sum(torch.tensor([3])), torch.tensor([6])) and reduced_on == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for an NCCL group")
def test_all_reduce_sum_of_cpu_tensors_in_a_real_nccl_group(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        window = torch.tensor([1.5, 2.0], dtype=torch.float64)
        total = all_reduce_sum(window)
        assert total.device == torch.device("cpu") and torch.equal(total, window)
        assert all_reduce_sum(torch.tensor([3])).item() == 3  # training's skipped count (int64)
        on_gpu = torch.ones(2, device="cuda")
        assert all_reduce_sum(on_gpu).device == on_gpu.device
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_group(rank: int, world_size: int, port: int) -> None:
    """torchrun's environment and a gloo group, in a spawned worker (one thread: 2 processes on 2 cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    # The group made here is reused by both commands (as torchrun's single command would create and use it).
    _join_group(rank, world_size, port)
    import run

    try:
        result = run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}/run", "train.max_steps=3",
                           "train.device=cpu"])
        weights = {k: v.contiguous() for k, v in result["model"].trainable_state_dict().items()}
        save_file(weights, f"{out}/rank{rank}.safetensors")
        scores = run.main(["eval", "--config", DEMO, *TINY, f"--checkpoint={out}/run", f"eval.out_dir={out}/eval",
                           "eval.device=cpu"])
        torch.save(scores["results"], f"{out}/eval_rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_training_keeps_ranks_identical_and_eval_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert set(rank0) == set(rank1)
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"{name} differs between ranks"

    # The heads trained (different shards per rank, gradients averaged), and rank 0 wrote the only checkpoint.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000003"
    saved = load_file(str(checkpoint / "model.safetensors"))
    for name, value in rank0.items():
        assert torch.equal(saved[name], value)

    # Sharded evaluation with reduced sums equals evaluating everything in one process.
    import run

    single = run.main(["eval", "--config", DEMO, *TINY, f"--checkpoint={checkpoint}",
                       f"eval.out_dir={tmp_path}/eval1", "eval.device=cpu"])["results"]
    for rank in range(2):
        sharded = torch.load(tmp_path / f"eval_rank{rank}.pt")
        for label, metrics in single.items():
            for key, value in metrics.items():
                assert sharded[label][key] == pytest.approx(value, abs=1e-9), (rank, label, key)


VIDEO_DEMO = str(REPO / "configs" / "demo_video.yaml")
VIDEO_TINY = ["model.mask_head_widths=[8,16,32,64]", "model.mask_head_size=32", "model.max_pixels=12544",
              "data.test=[{type: synthetic_clips, split: test, length: 3, seed: 3, num_frames: 3, max_frames: 4, "
              "group_tokens: 16, image_size: [64, 96], max_objects: 2}]", "data.batch_size=1",
              "eval.progress=false", "data.num_workers=0", "eval.device=cpu"]


def _video_eval_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _join_group(rank, world_size, port)
    import run

    try:
        scores = run.main(["eval", "--config", VIDEO_DEMO, *VIDEO_TINY, f"--checkpoint={out}/model",
                           f"eval.out_dir={out}/eval"])
        torch.save(scores["results"], f"{out}/video_rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_video_eval_matches_one_process(tmp_path):
    """J / F / J&F of clips, sharded over 2 processes (3 clips: uneven shards) and reduced: one process's scores."""
    import run
    from flmm_model.config import ModelConfig
    from flmm_model.model import build_model

    build_model(ModelConfig(sam="tiny", mask_head_widths=[8, 16, 32, 64], mask_head_size=32,
                            max_pixels=12544)).save_pretrained(str(tmp_path / "model"))
    mp.spawn(_video_eval_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = run.main(["eval", "--config", VIDEO_DEMO, *VIDEO_TINY, f"--checkpoint={tmp_path}/model",
                       f"eval.out_dir={tmp_path}/eval1"])["results"]
    assert single["synthetic_clips_test"]["count"] > 0
    for rank in range(2):
        sharded = torch.load(tmp_path / f"video_rank{rank}.pt")
        for label, metrics in single.items():
            for key, value in metrics.items():
                assert sharded[label][key] == pytest.approx(value, abs=1e-9), (rank, label, key)

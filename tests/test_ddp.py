"""Multi-process training and evaluation: 2 CPU processes (gloo) through the real CLI, and the sharded sampler."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from flmm_model.distributed import ShardedSampler

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = [
    "model.mask_head_widths=[8,16,32,64]", "model.mask_head_size=32", "model.max_pixels=12544",
    "data.train=[{type: synthetic, length: 7, seed: 0, image_size: [64, 112]}]",
    "data.val=[]", "data.test=[{type: synthetic, split: test, length: 5, seed: 3, image_size: [64, 112]}]",
    "data.batch_size=2", "train.progress=false", "eval.progress=false", "train.num_threads=1", "train.lr=1e-3",
    "train.log_every=1",
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # The group made here is reused by both commands (as torchrun's single command would create and use it).
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
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

"""`model.shard_lmm=fsdp`: the frozen LMM's blocks sharded across 2 CPU processes (gloo, FSDP2) give the unsharded
maps and hidden states for every family; training (with the LMM-output cache) and evaluation under it give the
unsharded losses and scores, with uneven shards (the replayed forwards keep the collectives paired); predict and chat
(visual chain-of-thought: two generations and two groundings) give the unsharded masks and answers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_ddp import DEMO, TINY, _free_port

SYNTHETIC_TEST = "{type: synthetic, split: test, length: 5, seed: 3, image_size: [64, 112]}"  # as TINY's
FAMILIES = ["tiny", "qwen2_vl_tiny", "qwen3_vl_tiny", "qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"]


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def _forward_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init(rank, world_size, port)
    from conftest import _photo
    from test_model import make_batch

    from flmm_model.distributed import init_distributed, local_bytes, shard_lmm
    from flmm_model.model import build_model

    try:
        info = init_distributed("cpu")
        photos = [_photo("coffee"), _photo("astronaut").crop((120, 0, 360, 512)), _photo("chelsea")]
        report = {}
        for family in FAMILIES:
            model = build_model(dict(qwen=family, sam="tiny", max_pixels=112 * 112, seed=0)).eval()
            prepared = model.prepare_batch(make_batch(model, photos, padding_side="left"))
            with torch.no_grad():
                whole = model.lmm.forward_prepared(prepared.lmm)
            before = sum(local_bytes(block) for block in model.lmm.shardable_blocks())
            shard_lmm(model.lmm, "fsdp", info)
            with torch.no_grad():
                sharded = model.lmm.forward_prepared(prepared.lmm)
            report[family] = dict(
                maps=max(float((a - b).abs().max()) for a, b in zip(whole.attention_maps, sharded.attention_maps,
                                                                     strict=True)),
                rows=float((whole.phrase_rows - sharded.phrase_rows).abs().max()),
                scale=float(whole.phrase_rows.abs().max()), sharded=model.lmm.sharded,
                bytes_ratio=sum(local_bytes(block) for block in model.lmm.shardable_blocks()) / before)
        (open(f"{out}/forward_rank{rank}.json", "w")).write(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


def test_a_sharded_lmm_gives_the_unsharded_maps_and_hidden_states_for_every_family(tmp_path):
    mp.spawn(_forward_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"forward_rank{rank}.json").read_text())
        for family in FAMILIES:
            entry = report[family]
            assert entry["sharded"], family
            assert entry["maps"] <= 1e-6, (rank, family, entry)
            assert entry["rows"] <= 1e-5 * max(entry["scale"], 1.0), (rank, family, entry)
            assert 0.45 < entry["bytes_ratio"] < 0.55, (rank, family, entry)  # the blocks' weights: half per process


def _run_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init(rank, world_size, port)
    from conftest import _photo
    from test_reason_seg import write_reason_seg

    import run

    image = f"{out}/photo_rank{rank}.png"
    _photo("astronaut").resize((112, 112)).save(image)
    root = Path(out, f"data_rank{rank}")  # the same files for each process, written apart
    write_reason_seg(root, [_photo(name).resize((96, 64)) for name in ("coffee", "astronaut", "astronaut",
                                                                      "chelsea")])
    try:
        for shard in ("none", "fsdp"):
            extra = [f"data.lmm_cache={out}/lmm"] if shard == "fsdp" else []
            run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}/{shard}", "train.max_steps=3",
                      "train.device=cpu", f"model.shard_lmm={shard}", "train.save_every=2", *extra])
            if shard == "fsdp":  # resumed under the sharded LMM from its step-2 checkpoint: step 3 again
                run.main(["train", "--config", DEMO, *TINY, f"train.out_dir={out}/fsdp_resumed", "train.max_steps=3",
                          "train.device=cpu", "model.shard_lmm=fsdp", "train.save_every=2", *extra, "--resume",
                          f"{out}/fsdp/checkpoints/step_0000002"])
            # ReasonSeg's flmm protocol too (answer, then ground): under the sharded LMM every process runs all of
            # it in lockstep and the main one scores.
            scores = run.main(["eval", "--config", DEMO, *TINY, f"--checkpoint={out}/none",
                               f"eval.out_dir={out}/eval_{shard}", "eval.device=cpu", f"model.shard_lmm={shard}",
                               f"data.root={root}", f"data.test=[{SYNTHETIC_TEST}, {{type: reason_seg, split: val}}]"])
            (open(f"{out}/eval_{shard}_rank{rank}.json", "w")).write(json.dumps(scores["results"]))
            # predict and chat: every process runs the same inputs; generation decodes the main process's tokens
            common = ["--config", DEMO, *TINY, "--checkpoint", f"{out}/none", "--image", image, "--device", "cpu",
                      f"model.shard_lmm={shard}"]
            predicted = run.main(["predict", *common, "--text", "the red circle", "--text", "the green triangles",
                                  "--out", f"{out}/predict_{shard}"])
            answered = run.main(["chat", *common, "--question", "What is the shape on the left?", "--visual-cot",
                                 "--max-new-tokens", "6", "--out", f"{out}/chat_{shard}"])
            (open(f"{out}/use_{shard}_rank{rank}.json", "w")).write(json.dumps(dict(
                areas=predicted["areas"], masks=predicted["masks"], answer=answered["answer"],
                thought=answered["thought"], box=answered["box"], chat_areas=answered["areas"])))
    finally:
        torch.distributed.destroy_process_group()


def _losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def test_training_and_eval_under_a_sharded_lmm_equal_the_unsharded_runs(tmp_path):
    # 7 training samples on 2 ranks, 2 per micro-batch: 2 micro-batches per rank and epoch, so step 3 is in the
    # second epoch, read from the LMM-output cache the first one wrote. 5 test samples: ranks hold 3 and 2 (2 and 1
    # batches), so rank 1 replays one forward for rank 0's second batch.
    mp.spawn(_run_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert len(list((tmp_path / "lmm").glob("*/*.safetensors"))) == 7
    whole, sharded = _losses(tmp_path / "none" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(whole) == len(sharded) == 3
    resumed = _losses(tmp_path / "fsdp_resumed" / "metrics.jsonl")
    assert resumed == pytest.approx(sharded[2:], rel=1e-6)  # step 3 only, with the uninterrupted run's loss
    # A sharded run's checkpoint holds the trainable weights only, as an unsharded run's: the same tensors, no LMM.
    from safetensors.torch import load_file

    newest = {run: sorted((tmp_path / run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
              for run in ("none", "fsdp")}
    whole_weights, sharded_weights = load_file(newest["none"]), load_file(newest["fsdp"])
    assert sharded_weights.keys() == whole_weights.keys() and not any("qwen" in key for key in sharded_weights)
    assert all(sharded_weights[k].shape == whole_weights[k].shape for k in whole_weights)
    # The cached step reads the outputs of another batch composition: equal to float rounding.
    assert sharded == pytest.approx(whole, rel=1e-5)
    for rank in range(2):
        expected = json.loads((tmp_path / f"eval_none_rank{rank}.json").read_text())
        found = json.loads((tmp_path / f"eval_fsdp_rank{rank}.json").read_text())
        assert set(expected) == {"synthetic_test", "reason_seg_val"} and expected["reason_seg_val"]["count"] == 3
        for label, metrics in expected.items():
            for key, value in metrics.items():
                assert found[label][key] == pytest.approx(value, abs=1e-6), (rank, label, key)
        # predict and chat give the unsharded masks and answers on every process; the main process alone writes.
        whole_use = json.loads((tmp_path / f"use_none_rank{rank}.json").read_text())
        sharded_use = json.loads((tmp_path / f"use_fsdp_rank{rank}.json").read_text())
        for key in ("areas", "answer", "thought", "box", "chat_areas"):
            assert sharded_use[key] == whole_use[key], (rank, key)
        assert (len(sharded_use["masks"]) == 2) == (rank == 0), rank
    assert sorted(p.name for p in (tmp_path / "predict_fsdp").iterdir()) == sorted(
        p.name for p in (tmp_path / "predict_none").iterdir())
    assert (tmp_path / "chat_fsdp" / "answer.json").is_file() and (tmp_path / "chat_fsdp" / "crop.png").is_file()


def _scores_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init(rank, world_size, port)
    from flmm_model.distributed import DistInfo, MainProcessScores, in_turn, lockstep_generation

    try:
        turns = Path(out, "turns.txt")

        def build() -> int:  # a process's turn starts when the one before it has finished
            seen = turns.read_text() if turns.exists() else ""
            time.sleep(0.3)
            turns.write_text(seen + str(rank))
            return len(seen)

        info = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
        order = in_turn(info, build, enabled=True)
        scores = MainProcessScores()(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 5), float(rank + 1)))
        options = lockstep_generation(dict(do_sample=True, max_new_tokens=4))
        draw = torch.rand(3).tolist()  # after the seeding: the same on every process
        (open(f"{out}/scores_rank{rank}.json", "w")).write(json.dumps(dict(
            order=order, scores=scores.tolist(), draw=draw, synced_gpus=options["synced_gpus"],
            processors=[type(p).__name__ for p in options["logits_processor"]])))
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_generation_decodes_the_main_process_tokens_and_processes_load_in_turn(tmp_path):
    """Each process's own scores differ; all of them continue with the main process's, and sampling draws alike."""
    mp.spawn(_scores_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"scores_rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["scores"] == [[1.0] * 5]  # rank 0's scores (rank 1 had 2.0)
        assert report["processors"] == ["MainProcessScores"] and report["synced_gpus"]
    assert reports[0]["draw"] == reports[1]["draw"]
    # `in_turn`: the processes built one after the other, in rank order.
    assert [report["order"] for report in reports] == [0, 1] and (tmp_path / "turns.txt").read_text() == "01"


def _cache_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init(rank, world_size, port)
    import run

    try:
        common = ["cache-lmm", "--config", DEMO, *TINY, "train.device=cpu"]
        whole = run.main([*common, f"data.lmm_cache={out}/whole", "model.shard_lmm=none"])
        first = run.main([*common, f"data.lmm_cache={out}/sharded", "model.shard_lmm=fsdp"])
        torch.distributed.barrier()
        if rank == 0:  # one entry lost: one process has one batch to compute, the other joins its forward
            victim = sorted(Path(out, "sharded").glob("*/*.safetensors"))[0]
            victim.unlink()
        torch.distributed.barrier()
        again = run.main([*common, f"data.lmm_cache={out}/sharded", "model.shard_lmm=fsdp"])
        (open(f"{out}/counts_rank{rank}.json", "w")).write(json.dumps(dict(whole=whole, first=first, again=again)))
    finally:
        torch.distributed.destroy_process_group()


def test_cache_lmm_under_a_sharded_lmm_writes_the_unsharded_entries(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_cache_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    counts = json.loads((tmp_path / "counts_rank0.json").read_text())
    assert (counts["whole"]["written"], counts["first"]["written"]) == (7, 7)  # 7 samples over shards of 4 and 3
    assert (counts["again"]["written"], counts["again"]["cached"]) == (1, 6)
    whole = {p.relative_to(tmp_path / "whole"): p for p in (tmp_path / "whole").glob("*/*.safetensors")}
    sharded = {p.relative_to(tmp_path / "sharded"): p for p in (tmp_path / "sharded").glob("*/*.safetensors")}
    assert whole.keys() == sharded.keys() and len(whole) == 7
    for name, path in whole.items():
        expected, found = load_file(path), load_file(sharded[name])
        assert expected.keys() == found.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(found[key], tensor, atol=1e-6, rtol=1e-5)


def _session_answers(session, image, out_dir: Path) -> dict:
    from flmm_model.data.clips import ClipFrames

    segmented = session.segment(image, ["the man", "the flag"])
    turn = session.chat(image, "What is in the picture?", phrases="the man\nthe flag")
    frames = np.stack([np.asarray(image), np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    clip = ClipFrames(frames=frames, times=np.array([0.0, 0.5]), source="two frames")  # the Video tab's model call
    out_dir.mkdir()
    video = session.segment_clip(clip, ["the man"], key_frame=1, frame_budget=16, out_dir=out_dir)
    return dict(areas=segmented.areas, answer=turn.answer, chat_areas=turn.grounding.areas, missing=turn.missing,
                video_areas=video.masks.sum(axis=(2, 3)).tolist())


def _demo_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init(rank, world_size, port)
    from conftest import _photo

    from flmm_model.apps.demo.lockstep import LockstepModel, call_group, follow_calls
    from flmm_model.apps.demo.session import DemoModel
    from flmm_model.distributed import init_distributed, place_model
    from flmm_model.errors import InputError
    from flmm_model.model import build_model

    try:
        info = init_distributed("cpu")
        model = build_model(dict(qwen="tiny", sam="tiny", max_pixels=112 * 112, mask_head_widths=[8, 16, 32, 64],
                                 mask_head_size=32, seed=0)).eval()
        image = _photo("astronaut").resize((96, 96))
        report = {}
        if rank == 0:  # the unsharded session first, on this process alone
            report["whole"] = _session_answers(DemoModel(model, max_new_tokens=6), image, Path(out) / "whole")
        place_model(model, model.lmm, "fsdp", info)
        group = call_group()
        if rank == 0:
            lockstep = LockstepModel(model, group=group)
            report["sharded"] = _session_answers(DemoModel(lockstep, max_new_tokens=6), image,
                                                  Path(out) / "sharded")
            with pytest.raises(InputError):  # bad input fails on every process; the follower goes on
                lockstep.segment(image, [""])
            report["after_error"] = DemoModel(lockstep, max_new_tokens=6).segment(image, ["the man"]).areas
            lockstep.stop()
        else:
            report["calls"] = follow_calls(model, group=group)
        (open(f"{out}/demo_rank{rank}.json", "w")).write(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


def test_the_web_demo_session_over_a_sharded_lmm_gives_the_unsharded_answers(tmp_path):
    mp.spawn(_demo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    main = json.loads((tmp_path / "demo_rank0.json").read_text())
    follower = json.loads((tmp_path / "demo_rank1.json").read_text())
    assert main["sharded"] == main["whole"] and main["whole"]["answer"]
    assert len(main["after_error"]) == 1
    assert main["whole"]["video_areas"] and any(area > 0 for area in main["whole"]["video_areas"][0])
    assert follower["calls"] == 5  # segment, chat, segment_clip, the failed segment, segment

"""`run.py pretrain-lmm` on a tiny config: the caption loss falls, the written directory is a transformers Qwen2.5-VL
checkpoint whose full-vocabulary loss is the trained one, F-LMM builds on it, and resume is exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

import run
from flmm_model.build import build_qwen, check_model_paths, load_image_processor, load_tokenizer, qwen_config
from flmm_model.checkpoint import list_checkpoints
from flmm_model.config import ConfigError
from flmm_model.config_loader import config_to_yaml, load_config
from flmm_model.data import Collator, SyntheticDataset, encode_grounded, expression_parts
from flmm_model.data.prompts import DEFAULT_SYSTEM
from flmm_model.data.synthetic import all_phrases, make_scene
from flmm_model.model import build_model
from flmm_model.recipes.pretrain_lmm import CaptionLM, PatchProjection, caption_targets, caption_vocabulary

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "configs" / "demo_lmm.yaml")
DEMO = str(REPO / "configs" / "demo.yaml")
INSTRUCTION = "Please give me a description of the image."
# configs/demo_lmm.yaml made smaller: 12 small scenes (3 batches of 4 per epoch), at most 16 vision tokens.
TINY = [
    "model.max_pixels=12544", "data.batch_size=4", "data.num_workers=0", "eval.batch_size=4", "train.progress=false",
    "train.num_threads=1", "train.log_every=1", "train.val_every=0", "train.save_every=0", "train.lr=5e-3",
    "train.warmup_ratio=0", "data.train=[{type: synthetic, length: 12, seed: 0, image_size: [64, 112]}]",
    "data.val=[{type: synthetic, split: val, length: 3, seed: 1, image_size: [64, 112]}]",
]


def _records(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = run.main(["pretrain-lmm", "--config", PRETRAIN, *TINY, f"train.out_dir={out}", "train.max_steps=8"])
    return dict(result, out=out)


def test_pretraining_reduces_caption_loss_and_writes_a_run_directory(pretrained):
    out = pretrained["out"]
    assert pretrained["command"] == "pretrain-lmm" and pretrained["steps"] == 8 and not pretrained["stopped_early"]
    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 8 and all(np.isfinite(losses))
    # Full-vocabulary loss: about log(151,936) = 11.9 at the start; a few steps of 4 captions take it far down.
    assert losses[0] > 10 and np.mean(losses[-2:]) < losses[0] - 3
    val = _records(out, "val")
    assert [r["step"] for r in val] == [0, 8]
    assert val[-1]["synthetic_val/caption_loss"] < val[0]["synthetic_val/caption_loss"] - 3
    assert 0 <= val[-1]["synthetic_val/pointing"] <= 100 and 0 < val[-1]["synthetic_val/baseline_chance"] < 100
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert load_config(out / "config.yaml").train.max_steps == 8
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_written_checkpoint_loads_like_a_real_qwen_and_flmm_builds_on_it(pretrained):
    qwen_dir = Path(pretrained["qwen_dir"])
    assert qwen_dir == pretrained["out"] / "qwen"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json"} <= {p.name for p in qwen_dir.iterdir()}
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]

    qwen = build_qwen(str(qwen_dir))  # the builder's checkpoint-directory path, as for a download
    preset = qwen_config("tiny")
    assert qwen.config.text_config.hidden_size == preset.text_config.hidden_size
    assert qwen.config.text_config.num_hidden_layers == preset.text_config.num_hidden_layers
    weights = load_file(str(qwen_dir / "model.safetensors"))
    state = qwen.state_dict()
    assert len(weights) == len(state)
    random_init = build_qwen("tiny").state_dict()
    changed = [name for name, value in state.items() if not torch.equal(value, random_init[name])]
    assert any("visual" in name for name in changed) and any("layers.1." in name for name in changed)
    # Output rows outside the caption vocabulary are zero: their logit is 0.
    vocab = caption_vocabulary(load_tokenizer(), instruction=INSTRUCTION, system=DEFAULT_SYSTEM)
    outside = torch.ones(qwen.lm_head.weight.shape[0], dtype=torch.bool)
    outside[vocab] = False
    assert not qwen.lm_head.weight[outside].any() and qwen.lm_head.weight[vocab].abs().sum(1).gt(0).all()
    assert load_tokenizer(str(qwen_dir))("the red circle.")["input_ids"] == load_tokenizer()("the red circle.")[
        "input_ids"]

    model_cfg = load_config(DEMO, [f"model.qwen={qwen_dir}", "model.mask_head_widths=[8,16,32,64]"]).model
    check_model_paths(model_cfg)
    model = build_model(model_cfg)
    for name, value in model.qwen.state_dict().items():
        assert torch.equal(value, state[name]), name
    scenes = SyntheticDataset(tokenizer=model.tokenizer, image_processor=model.image_processor, length=2, seed=3,
                              instruction=INSTRUCTION)
    out = model(Collator(pad_token_id=model.tokenizer.pad_token_id)([scenes[0], scenes[1]]))
    assert torch.isfinite(out["loss"])


def _reference_loss(reference: Qwen2_5_VLForConditionalGeneration, items: list[dict], tokenizer) -> torch.Tensor:
    """Mean caption NLL of `items` by transformers' own forward (all 151,936 logits) on processor-expanded ids."""
    image_pad = reference.config.image_token_id
    nll_sum, count = 0.0, 0
    for item in items:
        ids = item["input_ids"].tolist()
        num_tokens = int(item["image_grid_thw"].prod()) // 4
        at = ids.index(image_pad)
        expanded = torch.tensor([ids[:at] + [image_pad] * num_tokens + ids[at + 1:]])  # (1, L'), as the processor
        answer_start = len(ids) - ids[::-1].index(tokenizer.convert_tokens_to_ids("<|im_start|>")) + 2
        answer_start += num_tokens - 1
        answer_end = expanded.shape[1] - 1  # the closing <|im_end|> (the final "\n" is not learned)
        logits = reference(input_ids=expanded, pixel_values=item["pixel_values"],
                           image_grid_thw=item["image_grid_thw"],
                           mm_token_type_ids=(expanded == image_pad).long()).logits[0]  # (L', V)
        targets = expanded[0, answer_start:answer_end]
        assert tokenizer.decode(targets[-1:]) == "<|im_end|>"
        nll_sum = nll_sum + F.cross_entropy(logits[answer_start - 1:answer_end - 1].float(), targets, reduction="sum")
        count += targets.numel()
    return nll_sum / count


def _caption_items(tokenizer, *, seed: int) -> list[dict]:
    scenes = SyntheticDataset(tokenizer=tokenizer, image_processor=load_image_processor(max_pixels=12544), length=3,
                              seed=seed, instruction=INSTRUCTION)
    return [scenes[i] for i in range(3)]


def _caption_lm(qwen_dir: str, tokenizer) -> CaptionLM:
    return CaptionLM(qwen=build_qwen(qwen_dir),
                     vocab_ids=caption_vocabulary(tokenizer, instruction=INSTRUCTION, system=DEFAULT_SYSTEM),
                     tokenizer=tokenizer, image_processor=None)


def test_caption_loss_is_the_full_vocabulary_cross_entropy_of_the_written_model(pretrained):
    """The trained loss equals transformers' own forward of the saved model (all 151,936 logits)."""
    qwen_dir = str(pretrained["qwen_dir"])
    tokenizer = load_tokenizer()
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="eager").eval()
    caption_lm = _caption_lm(qwen_dir, tokenizer).eval()
    items = _caption_items(tokenizer, seed=4)
    with torch.no_grad():
        loss = caption_lm(Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")(items))["loss"]
        expected = _reference_loss(reference, items, tokenizer)
    assert float(loss) == pytest.approx(float(expected), abs=1e-4)


def test_caption_loss_gradients_equal_transformers_own(pretrained):
    """CaptionLM's faster vision path (one packed attention call per block, the patch embedding as a matmul) and
    its trained-rows loss give the vision tower and the decoder the gradients of transformers' stock forward."""
    qwen_dir = str(pretrained["qwen_dir"])
    tokenizer = load_tokenizer()
    caption_lm = _caption_lm(qwen_dir, tokenizer)
    assert isinstance(caption_lm.qwen.model.visual.patch_embed.proj, PatchProjection)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="sdpa")
    assert isinstance(reference.model.visual.patch_embed.proj, torch.nn.Conv3d)
    items = _caption_items(tokenizer, seed=5)
    caption_lm(Collator(pad_token_id=tokenizer.pad_token_id)(items))["loss"].backward()
    _reference_loss(reference, items, tokenizer).backward()
    ours = dict(caption_lm.qwen.named_parameters())
    names = [name for name, param in reference.named_parameters()
             if "embed_tokens" not in name and "lm_head" not in name]  # trained as rows in CaptionLM
    assert "model.visual.patch_embed.proj.weight" in names and any("visual.blocks.0.attn" in n for n in names)
    for name in names:
        expected = dict(reference.named_parameters())[name].grad
        assert expected is not None and expected.abs().sum() > 0, name
        torch.testing.assert_close(ours[name].grad, expected, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("bias", [False, True])  # Qwen2-VL / Qwen2.5-VL; Qwen3-VL
def test_patch_projection_is_the_conv3d_it_replaces(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=bias)
    patches = torch.randn(37, 3, 2, 14, 14)
    projection = PatchProjection(conv)
    assert projection.weight is conv.weight and list(projection.state_dict()) == list(conv.state_dict())
    out = projection(patches)
    expected = conv(patches)
    assert out.shape == expected.shape == (37, 16, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad_out,) = torch.autograd.grad(out.square().sum(), conv.weight)
    (grad_ref,) = torch.autograd.grad(expected.square().sum(), conv.weight)
    torch.testing.assert_close(grad_out, grad_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="kernel == stride"):
        PatchProjection(torch.nn.Conv3d(3, 16, kernel_size=3))


class Killed(BaseException):
    """A SIGKILL at an exact point: nothing after it runs (not even an `except Exception` cleanup)."""


def _count_steps(monkeypatch: pytest.MonkeyPatch, *, forbid: bool = False) -> list[int]:
    """Count the optimizer steps of the runs that follow (the loop clips the gradients once per step); with
    `forbid`, any step fails the test."""
    steps: list[int] = []
    clip = torch.nn.utils.clip_grad_norm_

    def counting(*args, **kwargs):
        if forbid:
            raise AssertionError("trained again: the run should have resumed after its last step")
        steps.append(1)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    return steps


def test_resume_reproduces_uninterrupted_pretraining(tmp_path, monkeypatch, capsys):
    # 12 scenes / 4 per step = 3 steps per epoch: 5 steps cross an epoch boundary; the resume point (2) is before it.
    common = ["--config", PRETRAIN, *TINY, "train.max_steps=5", "data.val=[]"]
    straight = tmp_path / "straight"
    run.main(["pretrain-lmm", *common, f"train.out_dir={straight}"])
    interrupted = tmp_path / "interrupted"
    first = run.main(["pretrain-lmm", *common, f"train.out_dir={interrupted}", "train.save_every=2",
                      "train.stop_after_steps=3"])
    assert first["stopped_early"] and first["qwen_dir"] is None and not (interrupted / "qwen").exists()
    assert [p.name for p in list_checkpoints(interrupted / "checkpoints")] == ["step_0000002"]
    capsys.readouterr()
    steps = _count_steps(monkeypatch)
    resumed = run.main(["pretrain-lmm", *common, f"train.out_dir={interrupted}", "train.save_every=2", "--resume"])
    assert resumed["steps"] == 5
    # It resumed: from the step-2 checkpoint, training steps 3 to 5 only (a fresh start would take 5 steps).
    assert f"resumed from {interrupted / 'checkpoints' / 'step_0000002'} at step 2 (epoch 0, micro-batch 2)" in (
        capsys.readouterr().out)
    assert len(steps) == 3
    expected, got = _records(straight, "train"), _records(interrupted, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]  # step 3 of the first run dropped, trained again
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert have[key] == want[key], (have["step"], key)
    final_straight = load_file(str(straight / "qwen" / "model.safetensors"))
    final_resumed = load_file(str(interrupted / "qwen" / "model.safetensors"))
    for name, value in final_straight.items():
        assert torch.equal(final_resumed[name], value), name
    # train.keep_last (1 in configs/demo_lmm.yaml): the resumed run saved steps 4 and 5 and kept the newest only.
    assert [p.name for p in list_checkpoints(interrupted / "checkpoints")] == ["step_0000005"]
    assert [p.name for p in list_checkpoints(straight / "checkpoints")] == ["step_0000005"]
    # A fresh run never silently replaces an earlier one.
    with pytest.raises(FileExistsError, match="--resume"):
        run.main(["pretrain-lmm", *common, f"train.out_dir={interrupted}", "train.overwrite=false"])


def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "run"
    run.main(["pretrain-lmm", "--config", PRETRAIN, *TINY, "train.max_steps=4", "data.val=[]", "train.save_every=1",
              "train.keep_last=2", f"train.out_dir={out}"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000003", "step_0000004"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]


def test_a_second_pretraining_on_a_busy_out_dir_refuses_before_touching_it(tmp_path):
    import socket
    import subprocess
    import sys

    from flmm_model.errors import UserError

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file")
    common = ["pretrain-lmm", "--config", PRETRAIN, *TINY, "train.max_steps=1", "data.val=[]", "train.overwrite=true",
              f"train.out_dir={out}"]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live run on this host holds the directory: even overwrite=true must not clear it
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(UserError, match=rf"is in use by another run \(pid {sleeper.pid} on "):
            run.main(common)
        assert sorted(p.name for p in out.iterdir()) == [".lock", "keep.txt"]
    finally:
        sleeper.kill()
        sleeper.wait()
    run.main(common)  # the holder is gone: its lock is stale, this run takes it and removes it at the end
    assert (out / "qwen" / "config.json").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("kill", ["writing the LMM", "renaming it into place", "replacing an earlier export"])
def test_a_kill_while_publishing_the_lmm_resumes_without_retraining(tmp_path, monkeypatch, capsys, kill):
    out = tmp_path / "run"
    common = ["pretrain-lmm", "--config", PRETRAIN, *TINY, "train.max_steps=3", "data.val=[]", f"train.out_dir={out}"]
    if kill == "replacing an earlier export":  # a finished run, resumed again: it exports once more
        run.main(common)
        common = [*common, "--resume"]
    save_pretrained, rename = CaptionLM.save_pretrained, os.rename

    def killed_while_writing(self, directory):
        save_pretrained(self, directory)
        if Path(directory).name.startswith(".tmp-qwen-"):
            (Path(directory) / "model.safetensors").unlink()  # half written
            raise Killed(f"writing {directory}")

    def killed_while_renaming(source, target):
        if Path(source).name.startswith(".tmp-qwen-"):
            raise Killed(f"renaming {source}")
        rename(source, target)

    with monkeypatch.context() as patch:
        if kill == "writing the LMM":
            patch.setattr(CaptionLM, "save_pretrained", killed_while_writing)
        else:
            patch.setattr(os, "rename", killed_while_renaming)
        with pytest.raises(Killed):
            run.main(common)
    assert not (out / "qwen").exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000003"]
    capsys.readouterr()

    _count_steps(monkeypatch, forbid=True)
    resumed = run.main(common if common[-1] == "--resume" else [*common, "--resume"])
    assert resumed["steps"] == 3 and not resumed["stopped_early"]
    assert "at step 3 (epoch 1, micro-batch 0)" in capsys.readouterr().out
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    exported = load_file(str(out / "qwen" / "model.safetensors"))
    saved = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in (out / "qwen").iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed export's leftovers swept


def test_train_pretrains_a_missing_lmm_first_and_reports_the_attention_only_ablation(tmp_path, capsys):
    pretrain_yaml = tmp_path / "pretrain.yaml"
    pretrain_cfg = load_config(PRETRAIN, [*TINY, f"train.out_dir={tmp_path / 'lmm'}", "train.max_steps=2"])
    pretrain_yaml.write_text(config_to_yaml(pretrain_cfg))
    heads = ["--config", DEMO, f"model.qwen_pretrain={pretrain_yaml}", "model.mask_head_widths=[8,16,32,64]",
             "model.mask_head_size=32", "model.max_pixels=12544", "data.batch_size=2", "train.max_steps=2",
             "train.progress=false", "train.num_threads=1", "train.val_every=0", "train.save_every=0",
             "data.train=[{type: synthetic, length: 4, seed: 0, image_size: [64, 112]}]",
             "data.val=[{type: synthetic, split: val, length: 2, seed: 1, image_size: [64, 112]}]"]
    with pytest.raises(ConfigError, match=r"model\.qwen: expected a preset .* writes .*lmm/qwen, not this path"):
        run.main(["train", *heads, f"model.qwen={tmp_path / 'elsewhere'}", f"train.out_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "lmm").exists()

    result = run.main(["train", *heads, f"model.qwen={tmp_path / 'lmm' / 'qwen'}", f"train.out_dir={tmp_path / 'run'}"])
    assert (tmp_path / "lmm" / "qwen" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "attention_only" / "checkpoints").is_dir()
    ablation = load_file(str(sorted((tmp_path / "run" / "attention_only" / "checkpoints").iterdir())[-1]
                             / "model.safetensors"))
    assert ablation and all(name.startswith("mask_head.") for name in ablation)
    assert {"pointing", "pointing_chance", "count"} <= set(result["pointing"]["synthetic_val"])
    printed = capsys.readouterr().out
    for row in ("synthetic_val model", "synthetic_val attention-only heads", "synthetic_val all-foreground",
                "synthetic_val empty", "synthetic_val LMM attention pointing", "synthetic_val pointing chance"):
        assert row in printed
    # The LMM exists now: a second run goes straight to the heads.
    again = run.main(["train", *heads, f"model.qwen={tmp_path / 'lmm' / 'qwen'}", f"train.out_dir={tmp_path / 'run'}",
                      "train.attention_only_baseline=false"])
    assert again["steps"] == 2 and "pretraining it" not in capsys.readouterr().out


def test_caption_targets_mark_the_answer_and_its_end_of_turn(tokenizer):
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, _ = encode_grounded(tokenizer, expression_parts(["the red circle", "the two blue squares"]),
                             instruction=INSTRUCTION)
    padded = torch.cat([torch.full((3,), tokenizer.pad_token_id), ids])[None]  # left padding
    mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones_like(ids)])[None]
    targets = caption_targets(padded, mask, header_ids=header, end_id=end_id)
    learned = padded[targets == 0]
    assert tokenizer.decode(learned) == "the red circle. the two blue squares.<|im_end|>"
    with pytest.raises(ValueError, match="sample 0: no assistant turn"):
        caption_targets(padded[:, :10], mask[:, :10], header_ids=header, end_id=end_id)


def test_caption_vocabulary_covers_every_scene_the_generator_draws(tokenizer, image_processor):
    phrases = set(all_phrases())
    for index in range(200):
        assert set(make_scene(np.random.default_rng([21, index])).phrases) <= phrases
    vocab = set(caption_vocabulary(tokenizer, instruction=INSTRUCTION, system=DEFAULT_SYSTEM))
    scenes = SyntheticDataset(tokenizer=tokenizer, image_processor=image_processor, length=40, seed=22,
                              instruction=INSTRUCTION)
    for index in range(len(scenes)):
        assert set(scenes[index]["input_ids"].tolist()) <= vocab
    assert len(vocab) < 60

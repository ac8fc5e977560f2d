"""Training, evaluation and prediction run end to end on every backbone family's tiny preset (the Qwen2.5-VL `tiny`
preset is what the other tests use)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from flmm_model.model import FrozenQwenSAM

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")
SMALL = [
    "model.mask_head_widths=[8,16,32,64]", "model.mask_head_size=32", "model.max_pixels=12544",
    "data.train=[{type: synthetic, length: 4, seed: 0, image_size: [64, 112]}]",
    "data.val=[{type: synthetic, split: val, length: 2, seed: 1, image_size: [64, 112]}]",
    "data.test=[{type: synthetic, split: test, length: 2, seed: 2, image_size: [64, 112]}]",
    "data.batch_size=2", "train.progress=false", "train.num_threads=2", "eval.progress=false",
]


@pytest.mark.parametrize("preset, patch_values, system", [
    ("qwen2_vl_tiny", 3 * 2 * 14 * 14, "You are a helpful assistant."),
    ("qwen3_vl_tiny", 3 * 2 * 16 * 16, None),
    ("qwen3_vl_moe_tiny", 3 * 2 * 16 * 16, None),
    ("qwen3_5_tiny", 3 * 2 * 16 * 16, None),
    ("qwen3_5_moe_tiny", 3 * 2 * 16 * 16, None),
])
def test_train_eval_predict_run_on_each_family(tmp_path, photos, preset, patch_values, system):
    out = tmp_path / "run"
    result = run.main(["train", "--config", DEMO, *SMALL, f"model.qwen={preset}", f"train.out_dir={out}",
                       "train.max_steps=2", "train.log_every=1"])
    assert result["steps"] == 2 and np.isfinite(result["last_loss"])
    model = result["model"]
    assert model.qwen.config.model_type == preset.removesuffix("_tiny")
    assert model.system == system  # the family's chat-template default
    assert model.image_processor.patch_size * model.image_processor.temporal_patch_size * 3 \
        * model.image_processor.patch_size == patch_values

    evaluated = run.main(["eval", "--config", DEMO, *SMALL, f"model.qwen={preset}", "--checkpoint", str(out),
                          "eval.batch_size=1"])
    scores = evaluated["results"]["synthetic_test"]
    assert scores["count"] >= 2 and 0.0 <= scores["gIoU"] <= 100.0
    assert json.loads(Path(evaluated["eval_json"]).read_text())["results"]["synthetic_test"]["count"] \
        == scores["count"]

    image_path = tmp_path / "photo.png"
    photos[3].save(image_path)
    predicted = run.main(["predict", "--config", DEMO, f"model.qwen={preset}", "--checkpoint", str(out),
                          "--image", str(image_path), "--text", "the cat", "--out", str(tmp_path / "pred"),
                          "--device", "cpu"])
    reloaded = FrozenQwenSAM.from_pretrained(str(out), device="cpu").eval()
    assert reloaded.qwen.config.model_type == model.qwen.config.model_type
    expected = reloaded.segment(photos[3], ["the cat"])[0]
    with Image.open(predicted["masks"][0]) as mask_png:
        assert torch.equal(torch.from_numpy(np.asarray(mask_png) > 0), expected)


@pytest.mark.parametrize("preset", ["qwen3_vl_moe_tiny", "qwen3_5_tiny", "qwen3_5_moe_tiny"])
def test_web_demo_session_segments_and_chats_with_the_newer_families(tmp_path, photos, preset):
    """The web demo's model session (what its /segment and /chat endpoints call) gives the model's own masks and
    answers with each newer family (the server itself is tested on the default family in test_demo.py)."""
    from flmm_model.apps.demo.session import DemoModel
    from flmm_model.model import build_model

    model = build_model(dict(qwen=preset, sam="tiny", mask_head_widths=[8, 16, 32, 64], mask_head_size=32,
                             max_pixels=12544)).eval()
    model.save_pretrained(str(tmp_path / "ckpt"))
    reloaded = FrozenQwenSAM.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert reloaded.qwen.config.model_type == preset.removesuffix("_tiny")
    session = DemoModel(reloaded)
    image = photos[3].convert("RGB")
    segmented = session.segment(image, ["the cat", "the grass"])
    expected = model.segment(session.model_image(image), ["the cat", "the grass"]).numpy()
    assert np.array_equal(segmented.masks, expected) and segmented.masks.shape[0] == 2
    words = model.chat(session.model_image(image), "What is in the image?", max_new_tokens=6).answer.split()
    turn = session.chat(image, "What is in the image?", phrases=words[0] if words else "the cat")
    reference = model.chat(session.model_image(image), "What is in the image?", max_new_tokens=session.max_new_tokens,
                           ground=[words[0]] if words else None)
    assert turn.answer == reference.answer

"""ReasonSeg: LISA's files (json + jpg, labelme polygons) read into items, its metric with ignored pixels, and
`run.py eval` with a `reason_seg` test entry under both protocols, against scoring done here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from flmm_model.build import prompt_settings
from flmm_model.config import ConfigError, ModelConfig
from flmm_model.data import DataError, ReasonSegDataset
from flmm_model.data.reason_seg import flmm_question
from flmm_model.metrics import ReasonSegMetric
from flmm_model.model import build_model

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")
SMALL_MODEL = dict(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def write_reason_seg(root: Path, photos, split: str = "val") -> Path:
    """Three samples in LISA's layout: a phrase query, a sentence query, and one whose ignore region sits inside the
    target; polygons with float coordinates (truncated to int32 as LISA's np.array(..., np.int32))."""
    folder = root / "reason_seg" / "ReasonSeg" / split
    folder.mkdir(parents=True)
    samples = {
        "coffee_cup": dict(text=["the drink someone would sip in the morning"], is_sentence=False,
                           shapes=[dict(label="target", points=rectangle(10.7, 20.2, 50.9, 60.5),
                                        shape_type="polygon"),
                                   dict(label="flag", points=rectangle(0, 0, 100, 100), shape_type="polygon")]),
        "astronaut": dict(text=["Which part of the picture shows what protects the person's head in space?"],
                          is_sentence=True,
                          shapes=[dict(label="ignore", points=rectangle(0, 0, 100, 80), shape_type="polygon"),
                                  dict(label="target", points=rectangle(30, 30, 60, 50), shape_type="polygon")]),
        "cat": dict(text=["the animal that purrs", "another query"], is_sentence=False,
                    shapes=[dict(label="target", points=rectangle(5, 5, 40, 30), shape_type="polygon"),
                            dict(label="ignore", points=rectangle(10, 10, 20, 20), shape_type="polygon")]),
    }
    for (name, annotation), photo in zip(samples.items(), [photos[0], photos[2], photos[3]], strict=True):
        photo.save(folder / f"{name}.jpg", quality=95)
        (folder / f"{name}.json").write_text(json.dumps(annotation))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("data")
    write_reason_seg(root, photos)
    return root


@pytest.fixture(scope="module")
def prompt():
    return prompt_settings(ModelConfig(**SMALL_MODEL))


def dataset(root, prompt, **kwargs):
    return ReasonSegDataset(root, "val", tokenizer=prompt.tokenizer, image_processor=prompt.image_processor,
                            instruction=prompt.instruction, system=prompt.system, **kwargs)


def test_items_carry_lisa_masks_ignore_masks_and_the_flmm_question(data_root, prompt, photos):
    items = {item["meta"]["image_id"]: item for item in dataset(data_root, prompt)}
    assert sorted(items) == ["astronaut", "cat", "coffee_cup"]

    cup = items["coffee_cup"]
    height, width = photos[0].height, photos[0].width
    expected = np.zeros((height, width), dtype=bool)
    expected[20:61, 10:51] = True  # outline included: rows 20..60, columns 10..50 (int32 truncation of the floats)
    assert cup["gt_masks"].shape == (1, height, width) and np.array_equal(cup["gt_masks"][0].numpy(), expected)
    assert not cup["meta"]["ignore_mask"].any()  # the "flag" shape is skipped
    assert cup["phrases"] == ["the drink someone would sip in the morning"]
    assert cup["meta"]["generate"] == dict(
        question="What is the drink someone would sip in the morning in this image? Briefly answer the question in "
                 "a single sentence.", answer_prefix="It is", max_new_tokens=16)
    with Image.open(data_root / "reason_seg" / "ReasonSeg" / "val" / "coffee_cup.jpg") as stored:
        pixels = np.array(stored.convert("RGB"))  # (H, W, 3), the jpg as stored
    assert torch.equal(cup["image"], torch.from_numpy(pixels).permute(2, 0, 1))

    # The larger "ignore" rectangle is drawn first, the smaller target over it: the target keeps its pixels.
    astronaut = items["astronaut"]
    target = np.zeros((512, 512), dtype=bool)
    target[30:51, 30:61] = True
    ignore = np.zeros((512, 512), dtype=bool)
    ignore[0:81, 0:101] = True
    assert np.array_equal(astronaut["gt_masks"][0].numpy(), target)
    assert np.array_equal(astronaut["meta"]["ignore_mask"].numpy(), ignore & ~target)
    assert astronaut["meta"]["generate"]["question"] == (
        "Which part of the picture shows what protects the person's head in space?Briefly answer the question in a "
        "single sentence.")  # a sentence query gets the suffix directly, as F-LMM appends it

    # The smaller ignore rectangle is drawn after the larger target: its pixels leave the target.
    cat = items["cat"]
    assert cat["meta"]["query"] == "the animal that purrs"  # the first query, as LISA's evaluation
    inner = np.zeros((300, 451), dtype=bool)
    inner[10:21, 10:21] = True
    outer = np.zeros((300, 451), dtype=bool)
    outer[5:31, 5:41] = True
    assert np.array_equal(cat["gt_masks"][0].numpy(), outer & ~inner)
    assert np.array_equal(cat["meta"]["ignore_mask"].numpy(), inner)


def test_direct_protocol_items_request_no_generation(data_root, prompt):
    assert all("generate" not in item["meta"] for item in dataset(data_root, prompt, protocol="direct"))
    assert flmm_question("a cup", False) == "What is a cup in this image? Briefly answer the question in a single " \
                                            "sentence."


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda folder: (folder / "cat.json").write_text("{not json"), r"cat\.json"),
    (lambda folder: (folder / "cat.json").write_text(json.dumps(dict(
        text=["x"], is_sentence=False, shapes=[dict(label="ignore", points=rectangle(1, 1, 5, 5))]))),
     r"cat\.json: no target polygon"),
    (lambda folder: (folder / "cat.jpg").unlink(), r"cat\.json: missing image file .*cat\.jpg"),
    (lambda folder: (folder / "cat.json").write_text(json.dumps(dict(
        text=["x"], is_sentence=False, shapes=[dict(label="target", points=[[1, "a"]])]))), r"cat\.json"),
])
def test_bad_files_raise_or_are_skipped(tmp_path, photos, prompt, break_it, message):
    folder = write_reason_seg(tmp_path, photos)
    break_it(folder)
    with pytest.raises(DataError, match=message):
        [item for item in dataset(tmp_path, prompt)]
    skipping = dataset(tmp_path, prompt, on_error="skip")
    kept = [item for item in (skipping[i] for i in range(len(skipping))) if item is not None]
    assert len(kept) == 2 and skipping.skips.count == 1 and "cat" in skipping.skips.report()


def test_missing_split_folder_names_the_layout(tmp_path, prompt):
    with pytest.raises(DataError, match=r"missing ReasonSeg folder .*reason_seg/ReasonSeg/val.*LISA's layout"):
        dataset(tmp_path, prompt)


def test_reason_seg_metric_leaves_ignored_pixels_out():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2] = True  # 8 target pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, 1:3] = True  # 8 predicted pixels, 4 of them on the target
    ignore = torch.zeros(4, 4, dtype=torch.bool)
    ignore[2] = True  # the 4 predicted pixels off the target are ignored
    metric = ReasonSegMetric()
    metric.update(pred, gt, {"ignore_mask": ignore})  # IoU 4 / 8
    metric.update(torch.zeros_like(pred), torch.zeros_like(gt), {"ignore_mask": ignore})  # both empty: IoU 1
    metric.update(gt.clone(), gt, {})  # IoU 1, 8 / 8
    result = metric.compute()
    assert result["count"] == 3
    assert result["gIoU"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert result["cIoU"] == pytest.approx(100 * (4 + 0 + 8) / (8 + 0 + 8))


def test_eval_reason_seg_follows_flmm_by_default_and_direct_as_a_baseline(tmp_path, data_root, prompt):
    checkpoint = tmp_path / "ckpt"
    model = build_model(ModelConfig(**SMALL_MODEL)).eval()
    model.save_pretrained(str(checkpoint))
    tests = "data.test=[{type: reason_seg, split: val}, {type: reason_seg, split: val, protocol: direct}]"
    result = run.main(["eval", "--config", DEMO, "--checkpoint", str(checkpoint), f"data.root={data_root}", tests,
                       f"eval.out_dir={tmp_path / 'eval'}", "eval.progress=false", "eval.batch_size=2"])
    results = result["results"]
    assert set(results) == {"reason_seg_val", "reason_seg_val_direct"}

    # By hand: F-LMM's protocol through chat (answer with the "It is" prefix, ground what was generated), the
    # direct protocol through segment(query); both scored with ignored pixels left out.
    by_protocol = {"flmm": ReasonSegMetric(), "direct": ReasonSegMetric()}
    for item in dataset(data_root, prompt):
        picture = Image.fromarray(item["image"].permute(1, 2, 0).numpy())
        answer = model.chat(picture, item["meta"]["generate"]["question"], answer_prefix="It is",
                            max_new_tokens=16).answer
        generated = answer[len("It is"):].strip()
        start = answer.index(generated, len("It is"))
        chat_masks = model.chat(picture, item["meta"]["generate"]["question"], answer_prefix="It is",
                                max_new_tokens=16, ground=[(start, start + len(generated))]).masks
        by_protocol["flmm"].update(chat_masks, item["gt_masks"], item["meta"])
        by_protocol["direct"].update(model.segment(picture, [item["meta"]["query"]]), item["gt_masks"], item["meta"])
    for label, protocol in (("reason_seg_val", "flmm"), ("reason_seg_val_direct", "direct")):
        expected = by_protocol[protocol].compute()
        assert results[label]["count"] == 3
        assert results[label]["gIoU"] == pytest.approx(expected["gIoU"], abs=1e-9)
        assert results[label]["cIoU"] == pytest.approx(expected["cIoU"], abs=1e-9)
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["protocols"] == {"reason_seg_val": "flmm", "reason_seg_val_direct": "direct"}


def test_protocol_checked_per_dataset_type(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"data\.test\.0\.protocol: "
                       r"reason_seg takes one of \['flmm', 'direct'\], found 'per_sentence'"):
        run.main(["eval", "--config", DEMO, "--checkpoint", str(tmp_path), f"data.root={data_root}",
                  "data.test=[{type: reason_seg, split: val, protocol: per_sentence}]"])
    with pytest.raises(ConfigError, match=r"data\.test\.0\.protocol: refcoco takes one of \['flmm', 'per_sentence'\]"):
        run.main(["eval", "--config", DEMO, "--checkpoint", str(tmp_path), f"data.root={data_root}",
                  "data.test=[{type: refcoco, split: val, protocol: direct}]"])


def test_reason_seg_eval_config_scores_both_protocols():
    from flmm_model.config_loader import load_config

    cfg = load_config(Path(DEMO).parent / "qwen2_5_vl_3b_sam_l_reason_seg.yaml")
    assert [(ds.type, ds.split, ds.protocol) for ds in cfg.data.test] == [("reason_seg", "val", "flmm"),
                                                                        ("reason_seg", "val", "direct")]

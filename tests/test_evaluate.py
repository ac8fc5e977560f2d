"""`run.py eval` on RefCOCO (both protocols) and PNG files written in their real formats, against direct scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_files import write_png, write_refer

import run
from flmm_model.build import prompt_settings
from flmm_model.config import ModelConfig
from flmm_model.config_loader import load_config
from flmm_model.data import RefCocoDataset, load_rgb
from flmm_model.data.registry import EpochSubset, build_dataset
from flmm_model.errors import UserError
from flmm_model.metrics import ReferSegMetric
from flmm_model.model import FrozenQwenSAM, build_model
from flmm_model.run_dir import save_checkpoint

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo_random_lmm.yaml")  # tiny random LMM
SMALL_MODEL = dict(mask_head_widths=[8, 16, 32, 64], mask_head_size=32, max_pixels=12544)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A freshly initialised model saved as a checkpoint (eval does not care whether it was trained)."""
    directory = tmp_path_factory.mktemp("ckpt")
    model = build_model(ModelConfig(**SMALL_MODEL))
    model.save_pretrained(str(directory))
    return directory, model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("data")
    write_refer(root, photos)
    write_png(root, photos, split="val")
    return root


def test_eval_scores_refcoco_protocols_and_png_and_writes_eval_json(checkpoint, data_root, tmp_path, capsys):
    directory, model = checkpoint
    tests = ("data.test=[{type: refcoco, split: val}, {type: refcoco, split: val, protocol: per_sentence}, "
             "{type: png, split: val}]")
    result = run.main(["eval", "--config", DEMO, "--checkpoint", str(directory), f"data.root={data_root}", tests,
                       f"eval.out_dir={tmp_path}", "eval.progress=false",
                       "eval.batch_size=1"])  # pixel budget: the checkpoint's; one image per batch, as segment()
    results = result["results"]
    assert set(results) == {"refcoco_val", "refcoco_val_per_sentence", "png_val"}
    assert results["refcoco_val"]["count"] == 3  # first sentence of each of the 3 val refs
    assert results["refcoco_val_per_sentence"]["count"] == 6  # every sentence
    assert set(results["png_val"]) >= {"AR_all", "AR_things", "AR_stuff", "AR_singulars", "AR_plurals"}
    for metrics in results.values():
        for name, value in metrics.items():
            if not name.startswith("count"):
                assert 0.0 <= value <= 100.0 or value != value, (name, value)  # NaN for an empty group

    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["results"] == json.loads(json.dumps(results))
    assert written["protocols"] == {"refcoco_val": "flmm", "refcoco_val_per_sentence": "per_sentence",
                                    "png_val": "flmm"}
    printed = capsys.readouterr().out
    assert "refcoco_val_per_sentence" in printed and "AR_all" in printed

    # The same numbers as segmenting each val image with all its refs' first sentences through segment().
    metric = ReferSegMetric()
    refs = {2: ["the astronaut"], 3: ["the cat", "the cat's right side"]}
    dataset = RefCocoDataset(str(data_root), "refcoco", "val", tokenizer=model.tokenizer,
                             image_processor=model.image_processor, train=False)
    for index in range(len(dataset)):
        item = dataset[index]
        image = load_rgb(str(data_root / "train2014" / item["meta"]["file_name"]),
                         expected_hw=tuple(item["gt_masks"].shape[1:]), sample="test")
        assert item["phrases"] == refs[item["meta"]["image_id"]]
        metric.update(model.segment(image, item["phrases"]), item["gt_masks"])
    direct = metric.compute()
    assert results["refcoco_val"]["cIoU"] == pytest.approx(direct["cIoU"], abs=1e-9)
    assert results["refcoco_val"]["gIoU"] == pytest.approx(direct["gIoU"], abs=1e-9)


def test_eval_without_checkpoint_or_data_fails_with_the_key():
    with pytest.raises(ValueError, match=r"eval\.checkpoint"):
        run.main(["eval", "--config", DEMO, "eval.checkpoint=null"])
    with pytest.raises(ValueError, match=r"data\.test"):
        run.main(["eval", "--config", DEMO, "--checkpoint", "/tmp", "data.test=[]"])


def test_eval_missing_data_files_fail_before_weights_load(checkpoint, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load when the data is missing")

    monkeypatch.setattr(FrozenQwenSAM, "from_pretrained", no_weights)
    with pytest.raises(Exception, match="refs"):
        run.main(["eval", "--config", DEMO, "--checkpoint", str(checkpoint[0]), f"data.root={tmp_path}",
                  "data.test=[{type: refcoco, split: val}]", f"eval.out_dir={tmp_path / 'eval'}"])
    # A model directory outside a run has no run directory to take the results: said before anything loads.
    with pytest.raises(UserError, match=r"eval.out_dir: not set, and .* is not a checkpoint inside a run"):
        run.main(["eval", "--config", DEMO, "--checkpoint", str(checkpoint[0]), f"data.root={tmp_path}",
                  "data.test=[{type: refcoco, split: val}]"])


def test_eval_of_a_run_writes_results_into_the_run_directory_not_the_checkpoint(checkpoint, data_root, tmp_path):
    _, model = checkpoint
    run_dir = tmp_path / "run"
    saved = save_checkpoint(root=run_dir / "checkpoints", step=7, weights=model.trainable_state_dict(),
                            model_config=model.build_config, trainer_state={"step": 7}, config_yaml="{}\n",
                            keep_last=1)
    before = sorted(p.name for p in saved.iterdir())
    result = run.main(["eval", "--config", DEMO, "--checkpoint", str(run_dir), f"data.root={data_root}",
                       "data.test=[{type: refcoco, split: val, max_samples: 1}]", "eval.progress=false"])
    assert result["eval_json"] == str(run_dir / "eval" / "step_0000007.json")
    assert json.loads((run_dir / "eval" / "step_0000007.json").read_text())["checkpoint"] == str(saved)
    assert sorted(p.name for p in saved.iterdir()) == before  # nothing written into the checkpoint


def test_eval_reports_samples_skipped_as_bad_data(checkpoint, photos, tmp_path, capsys):
    root = tmp_path / "data"
    write_refer(root, photos)
    (root / "train2014" / "COCO_train2014_000000000002.jpg").unlink()  # val image 2 (one ref) is missing
    result = run.main(["eval", "--config", DEMO, "--checkpoint", str(checkpoint[0]), f"data.root={root}",
                       "data.test=[{type: refcoco, split: val}]", "data.on_error=skip", "eval.batch_size=1",
                       f"eval.out_dir={tmp_path / 'eval'}", "eval.progress=false"])
    scores = result["results"]["refcoco_val"]
    assert scores["count_skipped"] == 1 and scores["count"] == 2  # image 3's two refs were scored
    printed = capsys.readouterr().out
    assert "samples skipped as bad data (data.on_error=skip" in printed and "refcoco_val 1" in printed
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["results"]["refcoco_val"]["count_skipped"] == 1


def test_synthetic_splits_without_a_seed_hold_different_samples(tokenizer, image_processor):
    entries = ("data.test=[{type: synthetic, split: train, length: 3}, {type: synthetic, split: val, length: 3}, "
               "{type: synthetic, split: val, length: 3, seed: 0}]")
    cfg = load_config(DEMO, [entries])
    prompt = prompt_settings(cfg.model)
    train, val, seeded = [build_dataset(ds, data_root="", prompt=prompt, train=False, on_error="raise")
                          for ds in cfg.data.test]
    assert train.seed != val.seed and seeded.seed == 0  # an explicit seed keeps its meaning
    for index in range(3):  # the old behaviour: the val split was the first samples of the train split
        assert train.scene(index).image.tobytes() != val.scene(index).image.tobytes()


def test_max_samples_keeps_the_epoch_draw_of_a_training_set(data_root, tokenizer, image_processor):
    cfg = load_config(DEMO, [f"data.root={data_root}",
                             "data.train=[{type: refcoco, split: val, max_samples: 1, sentence_draw: per_epoch}]"])
    subset = build_dataset(cfg.data.train[0], data_root=cfg.data.root, prompt=prompt_settings(cfg.model), train=True,
                           on_error="raise")
    full = RefCocoDataset(str(data_root), "refcoco", "val", tokenizer=tokenizer, image_processor=image_processor,
                          train=True, seed=subset.dataset.seed, sentence_draw="per_epoch")
    assert isinstance(subset, EpochSubset) and len(subset) == 1 < len(full)
    draws = []
    for epoch in range(8):  # sample 0: image 2, one ref with two sentences, one drawn per epoch
        subset.set_epoch(epoch)
        full.set_epoch(epoch)
        assert subset[0]["phrases"] == full[0]["phrases"], epoch
        draws.append(tuple(subset[0]["phrases"]))
    assert len(set(draws)) == 2

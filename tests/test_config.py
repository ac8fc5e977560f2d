"""The config schema: every YAML in configs/ loads; typos, wrong types and bad choices fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from flmm_model.build import check_model_paths
from flmm_model.config import ConfigError, DatasetConfig, ExperimentConfig
from flmm_model.config_loader import config_to_yaml, describe_schema, load_config, parse_override_value
from flmm_model.data.registry import dataset_seed

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_dir_has_demo_and_recipes():
    names = {path.name for path in CONFIGS}
    assert {"demo.yaml", "demo_lmm.yaml", "demo_random_lmm.yaml", "qwen2_5_vl_3b_sam_l_refcoco_png.yaml",
            "qwen2_5_vl_7b_sam_l_refcoco_png.yaml", "qwen2_5_vl_3b_sam_l_eval.yaml", "qwen2_5_vl_7b_sam_l_eval.yaml",
            "qwen3_vl_4b_sam_l_refcoco_png.yaml", "qwen3_vl_8b_sam_l_refcoco_png.yaml", "qwen3_vl_4b_sam_l_eval.yaml",
            "qwen3_vl_8b_sam_l_eval.yaml"} <= names
    for recipe in ("qwen3_5_9b", "qwen3_5_27b", "qwen3_5_35b_a3b", "qwen3_vl_30b_a3b"):  # the newer families
        assert {f"{recipe}_sam_l_refcoco_png.yaml", f"{recipe}_sam_l_eval.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_in_repo_loads_against_schema(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    round_trip = tmp_path / "resolved.yaml"  # what a run directory holds loads back to the same config
    round_trip.write_text(config_to_yaml(cfg))
    assert load_config(round_trip) == cfg


def test_recipe_configs_follow_flmm_recipe():
    for size in ("3b", "7b"):
        cfg = load_config(Path(CONFIGS[0].parent) / f"qwen2_5_vl_{size}_sam_l_refcoco_png.yaml")
        assert [ds.type for ds in cfg.data.train] == ["refcoco", "refcoco+", "refcocog", "png"]
        assert cfg.data.train[2].split_by == "umd"
        assert cfg.train.epochs == 8 and cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.01
        assert cfg.train.betas == [0.9, 0.999] and cfg.train.warmup_ratio == 0.03 and cfg.train.grad_clip == 1.0
        assert cfg.data.batch_size * cfg.train.grad_accum == 8  # global batch 8 on one GPU
        assert cfg.model.dtype == "bfloat16" and cfg.model.max_pixels == 672 * 672


def test_newer_family_recipes_are_the_same_recipe():
    reference = load_config(Path(CONFIGS[0].parent) / "qwen3_vl_8b_sam_l_refcoco_png.yaml")
    for recipe in ("qwen3_5_9b", "qwen3_5_27b", "qwen3_5_35b_a3b", "qwen3_vl_30b_a3b"):
        cfg = load_config(Path(CONFIGS[0].parent) / f"{recipe}_sam_l_refcoco_png.yaml")
        assert cfg.data.train == reference.data.train and cfg.train.epochs == 8 and cfg.train.lr == 1e-4
        assert cfg.data.batch_size * cfg.train.grad_accum == 8 and cfg.model.dtype == "bfloat16"
        assert cfg.model.tokenizer is None  # the bundled tokenizer of the checkpoint's family
        evaluation = load_config(Path(CONFIGS[0].parent) / f"{recipe}_sam_l_eval.yaml")
        assert evaluation.eval.checkpoint == cfg.train.out_dir


def test_sharded_recipes_are_the_same_recipe_on_the_gpus_they_name():
    """Qwen2.5-VL-72B and Qwen3-VL-32B: F-LMM's recipe with the LMM sharded; the global batch of 8 comes from the
    process count of the file's own torchrun line x data.batch_size x train.grad_accum."""
    reference = load_config(Path(CONFIGS[0].parent) / "qwen2_5_vl_7b_sam_l_refcoco_png.yaml")
    for recipe in ("qwen2_5_vl_72b", "qwen3_vl_32b"):
        path = Path(CONFIGS[0].parent) / f"{recipe}_sam_l_refcoco_png.yaml"
        cfg = load_config(path)
        assert cfg.model.shard_lmm == "fsdp" and cfg.model.dtype == "bfloat16"
        assert cfg.data.train == reference.data.train and cfg.train.epochs == 8 and cfg.train.lr == 1e-4
        assert cfg.train.warmup_ratio == 0.03 and cfg.train.grad_clip == 1.0 and not cfg.train.compile
        torchrun = next(line for line in path.read_text().splitlines() if line.startswith("#   torchrun"))
        processes = int(torchrun.split("--nproc_per_node")[1].split()[0])
        assert processes * cfg.data.batch_size * cfg.train.grad_accum == 8, torchrun
        evaluation = load_config(Path(CONFIGS[0].parent) / f"{recipe}_sam_l_eval.yaml")
        assert evaluation.eval.checkpoint == cfg.train.out_dir and evaluation.model.shard_lmm == "fsdp"
        assert evaluation.model.max_pixels == cfg.model.max_pixels


def test_demo_configs_use_tiny_presets_and_synthetic_data():
    random_lmm = load_config(Path(CONFIGS[0].parent) / "demo_random_lmm.yaml")
    assert (random_lmm.model.qwen, random_lmm.model.sam, random_lmm.model.tokenizer) == ("tiny", "tiny", None)
    check_model_paths(random_lmm.model)
    # The demo freezes the tiny preset after caption pretraining (configs/demo_lmm.yaml writes its model.qwen).
    demo, pretrain = (load_config(Path(CONFIGS[0].parent) / name) for name in ("demo.yaml", "demo_lmm.yaml"))
    assert (demo.model.sam, demo.model.tokenizer, pretrain.model.qwen) == ("tiny", None, "tiny")
    assert demo.model.qwen == f"{pretrain.train.out_dir}/qwen" and demo.model.qwen_pretrain == "configs/demo_lmm.yaml"
    for cfg in (demo, random_lmm, pretrain):
        assert {ds.type for ds in cfg.data.train + cfg.data.val + cfg.data.test} == {"synthetic"}
    # Same prompt and pixel budget for pretraining and grounding; the LMM never sees the demo's images.
    assert demo.model.instruction == random_lmm.model.instruction == pretrain.model.instruction
    assert (demo.model.min_pixels, demo.model.max_pixels) == (pretrain.model.min_pixels, pretrain.model.max_pixels)
    demo_seeds = {ds.seed for ds in demo.data.train + demo.data.val + demo.data.test}
    assert not demo_seeds & {ds.seed for ds in pretrain.data.train + pretrain.data.val}


def test_unknown_key_in_yaml_names_key_and_suggests(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(path)
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown key; did you mean 'max_steps'"):
        load_config(path)


def test_unknown_key_inside_dataset_list_names_index():
    with pytest.raises(ConfigError, match=r"data\.train\.0\.lenght: unknown key; did you mean 'length'"):
        load_config(None, ["data.train=[{type: synthetic, lenght: 3}]"])


def test_override_typo_suggests_closest_key():
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean 'model'"):
        load_config(None, ["modle.qwen=tiny"])
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key; did you mean 'lr'"):
        load_config(None, ["train.lrr=1e-3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", r"train\.lr: expected float, found str 'fast'"),
        ("data.batch_size=2.5", r"data\.batch_size: expected int, found float 2\.5"),
        ("data.batch_size=true", r"data\.batch_size: expected int, found bool True"),
        ("train.betas=0.9", r"train\.betas: expected list of float, found float 0\.9"),
        ("model.mask_head_widths=[64,x]", r"model\.mask_head_widths\.1: expected int, found str 'x'"),
        ("train.progress=3", r"train\.progress: expected bool, found int 3"),
    ],
)
def test_wrong_type_names_key_expected_and_found(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_value_outside_choices_lists_them():
    with pytest.raises(ConfigError, match=r"model\.dtype: expected one of \['float32', 'bfloat16', 'float16'\], "
                                          r"found 'fp16'"):
        load_config(None, ["model.dtype=fp16"])
    with pytest.raises(ConfigError, match=r"data\.train\.0\.type: expected one of"):
        load_config(None, ["data.train=[{type: coco}]"])


def test_missing_required_key_and_data_root():
    with pytest.raises(ConfigError, match=r"data\.train\.0\.type: required key missing"):
        load_config(None, ["data.train=[{split: train}]"])
    with pytest.raises(ConfigError, match=r"data\.train\.0\.root: refcoco needs a data root"):
        load_config(None, ["data.train=[{type: refcoco}]"])


def test_overrides_set_scalars_lists_and_list_items(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  root: /data\n  train:\n    - {type: refcoco}\n    - {type: png}\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.train.1.split=val", "model.mask_head_widths=[8, 16, 32, 64]",
                             "train.max_steps=null", "model.instruction=Where is it?"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.train[1].split == "val" and cfg.data.train[0].split == "train"
    assert cfg.model.mask_head_widths == [8, 16, 32, 64]
    assert cfg.train.max_steps is None and cfg.model.instruction == "Where is it?"
    with pytest.raises(ConfigError, match=r"data\.train has 2 items, no item 5"):
        load_config(path, ["data.train.5.split=val"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(path, ["train.lr"])


def test_override_values_use_yaml_syntax():
    assert parse_override_value("1e-4") == pytest.approx(1e-4)
    assert parse_override_value("3") == 3 and parse_override_value("true") is True
    assert parse_override_value("null") is None and parse_override_value("[1, 2]") == [1, 2]
    assert parse_override_value("/a/b") == "/a/b"


def test_range_checks():
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio"):
        load_config(None, ["train.warmup_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"model\.min_pixels"):
        load_config(None, ["model.min_pixels=999999999"])
    with pytest.raises(ConfigError, match=r"data\.train\.0\.length: a synthetic dataset needs length >= 1"):
        load_config(None, ["data.train=[{type: synthetic}]"])


def test_placeholder_model_paths_fail_before_weights_load():
    cfg = load_config(Path(CONFIGS[0].parent) / "qwen2_5_vl_3b_sam_l_refcoco_png.yaml")
    with pytest.raises(ConfigError, match=r"model\.qwen: expected a preset .* or an existing directory"):
        check_model_paths(cfg.model)


def test_schema_description_lists_every_section():
    text = "\n".join(describe_schema())
    for key in ("model.qwen", "data.train", "train.lr", "train.resume", "eval.checkpoint", "data.train.N.type"):
        assert key in text


def test_dataset_seed_derives_from_the_split_when_unset_and_keeps_an_explicit_seed():
    def seed(**kwargs):
        return dataset_seed(DatasetConfig(type="synthetic", length=4, **kwargs))

    assert len({seed(split="train"), seed(split="val"), seed(split="test")}) == 3
    # A stable hash, the same in every process and run (Python's hash() of a str is salted per process).
    assert seed(split="val") == 1143720464
    assert seed(split="val", seed=0) == 0 and seed(split="val", seed=7) == 7  # an explicit seed means itself
    demo = load_config(Path(CONFIGS[0].parent) / "demo.yaml")
    assert [dataset_seed(ds) for ds in demo.data.train + demo.data.val + demo.data.test] == [0, 1, 2]
    assert load_config(None, ["data.train=[{type: synthetic, length: 3}]"]).data.train[0].seed is None


def test_a_directory_that_is_no_qwen_vl_checkpoint_fails_with_the_reason(tmp_path):
    cfg = load_config(None, [f"model.qwen={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.qwen: .* is not a transformers checkpoint directory"):
        check_model_paths(cfg.model)  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"not a transformers checkpoint directory"):
        check_model_paths(cfg.model)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match=r"holds a 'llama' checkpoint; expected a Qwen-VL one"):
        check_model_paths(cfg.model)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    check_model_paths(cfg.model)


def test_a_sharded_lmm_refuses_what_it_cannot_run(tmp_path):
    demo = Path(CONFIGS[0].parent) / "demo.yaml"
    assert load_config(demo, ["model.shard_lmm=fsdp"]).model.shard_lmm == "fsdp"
    with pytest.raises(ConfigError, match=r"model\.shard_lmm: .*expected one of"):
        load_config(demo, ["model.shard_lmm=tp"])
    with pytest.raises(ConfigError, match=r"train\.compile: compiling a sharded LMM"):
        load_config(demo, ["model.shard_lmm=fsdp", "train.compile=true"])
    # ReasonSeg's flmm protocol runs sharded (every process the whole set in lockstep: tests/test_shard_lmm.py).
    reason_seg = "data.test=[{type: reason_seg, split: val, protocol: flmm, root: /data/reason_seg}]"
    assert load_config(demo, ["model.shard_lmm=fsdp", reason_seg]).data.test[0].protocol == "flmm"

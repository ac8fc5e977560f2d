"""LMM-output cache (`data.lmm_cache`, `run.py cache-lmm`): cached epochs run the heads alone with the uncached run's
losses bit for bit, resume mid cached epoch exactly, another setup is refused naming the fields, torn or damaged
entries are recomputed, data that changes per epoch is refused, and the disk is checked before the first write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_model import MODEL_CFG, make_batch
from test_train import DEMO, TINY

import flmm_model.modeling.lmm as lmm_module
import run
from flmm_model.config import ConfigError
from flmm_model.data.lmm_cache import LMMCacheError, check_cacheable, lmm_fingerprint, sample_digests
from flmm_model.data.registry import NamedDataset
from flmm_model.device import to_device
from flmm_model.errors import StorageError
from flmm_model.model import build_model

# Images of mixed sizes and 1-4 objects each: samples differ in grids, phrase tokens and object counts. Batch size 1
# (two micro-batches a step): an LMM run's rounding depends a little on a batch's padding, so only one sample per
# batch makes the uncached run's epochs compute every sample exactly as the first epoch did.
MIXED = "data.train=[{type: synthetic, length: 10, seed: 0, image_size: [48, 160], max_objects: 4}]"
COMMON = ["--config", DEMO, *TINY, MIXED, "data.val=[]", "train.epochs=3", "train.max_steps=null", "train.log_every=1",
          "data.batch_size=1", "train.grad_accum=2"]
LOSSES = ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice")


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture
def lmm_calls(monkeypatch):
    """Counts the frozen LMM's forwards."""
    calls = []
    forward = lmm_module.FrozenQwenLMM.forward_prepared

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(lmm_module.FrozenQwenLMM, "forward_prepared", counting)
    return calls


@pytest.fixture(scope="module")
def uncached(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("uncached")
    run.main(["train", *COMMON, f"train.out_dir={out}"])
    return records(out)


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for have, expected in zip(got, want, strict=True):
        for key in LOSSES:
            assert have[key] == expected[key], (have["step"], key, have[key], expected[key])


def test_cached_epochs_run_the_heads_alone_with_the_same_losses(uncached, tmp_path, lmm_calls):
    caches = [f"data.lmm_cache={tmp_path / 'lmm'}", f"data.sam_cache={tmp_path / 'sam'}"]
    result = run.main(["train", *COMMON, *caches, f"train.out_dir={tmp_path / 'run'}"])
    assert result["steps"] == 15  # 3 epochs of 5 steps
    assert len(lmm_calls) == 10  # the first epoch's 10 micro-batches; epochs 2 and 3 never run the LMM
    assert len(list((tmp_path / "lmm").glob("*/*.safetensors"))) == 10
    assert_same_losses(records(tmp_path / "run"), uncached)


def test_resume_inside_a_cached_epoch_continues_exactly(uncached, tmp_path, lmm_calls):
    out, caches = tmp_path / "run", [f"data.lmm_cache={tmp_path / 'lmm'}", f"data.sam_cache={tmp_path / 'sam'}"]
    first = run.main(["train", *COMMON, *caches, f"train.out_dir={out}", "train.save_every=7",
                      "train.stop_after_steps=8"])
    assert first["stopped_early"]
    calls_before = len(lmm_calls)
    resumed = run.main(["train", *COMMON, *caches, f"train.out_dir={out}", "train.save_every=7", "--resume"])
    assert resumed["steps"] == 15 and len(lmm_calls) == calls_before  # step 8 on, all from the cache
    assert_same_losses(records(out), uncached)


def test_cache_lmm_command_then_training_reads_it(tmp_path, lmm_calls):
    cache = tmp_path / "lmm"
    common = ["--config", DEMO, *TINY, "data.val=[]", f"data.lmm_cache={cache}"]
    first = run.main(["cache-lmm", *common])
    assert first["written"] == 10 and first["cached"] == 0  # TINY's 10 synthetic training samples
    again = run.main(["cache-lmm", *common])
    assert again["written"] == 0 and again["cached"] == 10
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["key"]["family"] == "qwen2_5_vl" and manifest["key"]["precision"] == "fp32"
    assert manifest["key"]["sentence_draws"] == ["synthetic/train: once seed 0"]

    lmm_calls.clear()
    steps = ["train.max_steps=3", "train.log_every=1"]
    cached = run.main(["train", *common, *steps, f"train.out_dir={tmp_path / 'a'}"])
    assert not lmm_calls  # every sample came from the command's entries
    plain = run.main(["train", "--config", DEMO, *TINY, "data.val=[]", *steps, f"train.out_dir={tmp_path / 'b'}"])
    # The command's batches hold other samples than training's: equal up to the LMM's padding-dependent rounding.
    assert cached["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-5)
    with pytest.raises(LMMCacheError, match=r"another LMM setup \(lmm: "):
        run.main(["train", *common, *steps, "model.seed=3", f"train.out_dir={tmp_path / 'c'}"])


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG).train()


def test_another_setup_is_refused_naming_the_fields(model, tmp_path):
    directory = str(tmp_path / "cache")
    draws = ["refcoco/train: once seed 0"]
    model.open_lmm_cache(directory, precision="fp32", sentence_draws=draws)
    model.open_lmm_cache(directory, precision="fp32", sentence_draws=draws)  # the same setup reopens it
    with pytest.raises(LMMCacheError, match=r"precision: 'fp32' in the cache, 'bf16' now"):
        model.open_lmm_cache(directory, precision="bf16", sentence_draws=draws)
    with pytest.raises(LMMCacheError, match=r"sentence_draws: \['refcoco/train: once seed 0'\] in the cache, "
                                            r"\['refcoco/train: once seed 1'\] now"):
        model.open_lmm_cache(directory, precision="fp32", sentence_draws=["refcoco/train: once seed 1"])
    with pytest.raises(LMMCacheError, match=r"lmm: '[0-9a-f]{64}' in the cache, '[0-9a-f]{64}' now"):
        build_model({**MODEL_CFG, "seed": 1}).open_lmm_cache(directory, precision="fp32", sentence_draws=draws)
    with pytest.raises(LMMCacheError, match=r"instruction: .* in the cache, 'Find: ' now"):
        build_model({**MODEL_CFG, "instruction": "Find: "}).open_lmm_cache(directory, precision="fp32",
                                                                          sentence_draws=draws)
    with pytest.raises(LMMCacheError, match=r"max_pixels: 50176 in the cache, 12544 now"):
        build_model({**MODEL_CFG, "max_pixels": 112 * 112}).open_lmm_cache(directory, precision="fp32",
                                                                          sentence_draws=draws)
    with pytest.raises(LMMCacheError, match=r"attn_capture: 'sdpa' in the cache, 'eager' now"):
        build_model({**MODEL_CFG, "attn_capture": "eager"}).open_lmm_cache(directory, precision="fp32",
                                                                          sentence_draws=draws)
    (tmp_path / "cache" / "cache.json").write_text("{not json")
    with pytest.raises(LMMCacheError, match="is not the manifest of an LMM-output cache"):
        model.open_lmm_cache(directory, precision="fp32", sentence_draws=draws)


def step(model, photos, cache):
    """A cached batch of three photos (2, 1 and 3 objects) through the forward, writing the misses as training does."""
    batch = make_batch(model, photos, padding_side="right")
    prepared = to_device(model.batch_preparer(lmm_cache=cache)(batch), model.device)
    output = model(prepared)
    for name, maps, rows in output.get("lmm_new_entries", []):
        cache.write(name, maps, rows)
    return batch, prepared, output


def test_torn_damaged_or_missing_entries_are_recomputed_not_used(model, photos, tmp_path, lmm_calls):
    cache = model.open_lmm_cache(str(tmp_path / "cache"), precision="fp32", sentence_draws=[])
    batch, cold, expected = step(model, photos, cache)
    assert [b for b, _, _ in cold.lmm_missing] == [0, 1, 2] and len(lmm_calls) == 1
    _, warm, cached = step(model, photos, cache)
    assert warm.lmm_cached is not None and len(lmm_calls) == 1 and "lmm_new_entries" not in cached
    for key in LOSSES:
        assert torch.equal(cached[key], expected[key]), key
    for have, (_, want, _) in zip(warm.lmm_cached.attention_maps, expected["lmm_new_entries"], strict=True):
        assert torch.equal(have, want.cpu())

    names = sample_digests(batch, images_per_sample=[1, 1, 1])
    torn, damaged = cache.path(names[0]), cache.path(names[1])
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a write cut short
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the hidden states
    damaged.write_bytes(bytes(data))
    _, again, recomputed = step(model, photos, cache)
    assert again.lmm_cached is None and [b for b, _, _ in again.lmm_missing] == [0, 1] and len(lmm_calls) == 2
    for key in LOSSES:
        assert torch.equal(recomputed[key], expected[key]), key  # the whole batch ran the LMM, as uncached
    _, healed, _ = step(model, photos, cache)
    assert healed.lmm_cached is not None and len(lmm_calls) == 2  # rewritten whole
    assert not list(Path(cache.directory).rglob("*.tmp"))  # atomic writes leave no temporary file


def test_an_entry_of_another_sample_shape_is_a_miss(model, photos, tmp_path):
    cache = model.open_lmm_cache(str(tmp_path / "cache"), precision="fp32", sentence_draws=[])
    batch, _, output = step(model, photos, cache)
    name = sample_digests(batch, images_per_sample=[1, 1, 1])[0]
    _, written_maps, written_rows = output["lmm_new_entries"][0]
    maps, rows = cache.read(name, num_objects=2, grid_hw=tuple(written_maps.shape[-2:]),
                            num_tokens=written_rows.shape[1])
    assert maps.shape[0] == 2
    assert cache.read(name, num_objects=3, grid_hw=tuple(maps.shape[-2:]), num_tokens=rows.shape[1]) is None
    assert cache.read(name, num_objects=2, grid_hw=tuple(maps.shape[-2:]), num_tokens=rows.shape[1] + 1) is None


def test_data_drawn_anew_every_epoch_is_refused(tmp_path):
    per_epoch = ["data.train=[{type: refcoco, split: train, sentence_draw: per_epoch}]",
                 f"data.lmm_cache={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"data\.train\.0\.sentence_draw: per_epoch .* data\.lmm_cache"):
        run.main(["train", "--config", DEMO, *TINY, "data.val=[]", *per_epoch, f"train.out_dir={tmp_path / 'r'}"])

    class Redrawn(torch.utils.data.Dataset):
        changes_per_epoch = True

    class Wrapper(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

    plain = torch.utils.data.TensorDataset(torch.zeros(1))
    check_cacheable([NamedDataset(label="plain", dataset=plain, metric=object)])
    with pytest.raises(LMMCacheError, match=r"training dataset redrawn draws its sentences anew every epoch"):
        check_cacheable([NamedDataset(label="redrawn", dataset=Wrapper(Redrawn()), metric=object)])


def test_refcoco_training_with_per_epoch_draws_changes_per_epoch(tmp_path, photos, tokenizer, image_processor):
    from dataset_files import write_refer

    from flmm_model.data.refcoco import RefCocoDataset

    write_refer(tmp_path, photos)

    def dataset(**kwargs):
        return RefCocoDataset(str(tmp_path), "refcoco", "train", tokenizer=tokenizer, image_processor=image_processor,
                              train=True, **kwargs)

    assert dataset(sentence_draw="per_epoch").changes_per_epoch
    assert not dataset(sentence_draw="once").changes_per_epoch


def test_a_full_disk_is_refused_before_the_first_entry(tmp_path, monkeypatch):
    class Usage:
        free = 1000  # bytes: far less than 10 entries

    monkeypatch.setattr("flmm_model.data.lmm_cache.shutil.disk_usage", lambda path: Usage())
    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"data\.lmm_cache: 10 entries of about .* MiB each need about .* GiB "
                                           r"in .*cache, which has 0\.00 GiB free"):
        run.main(["cache-lmm", "--config", DEMO, *TINY, "data.val=[]", f"data.lmm_cache={cache}"])
    assert not list(cache.glob("*/*.safetensors"))


def test_fingerprint_reads_the_first_and_last_values_of_a_large_weight():
    """A tensor beyond 2**24 values (a real embedding: 151936 x 2048 = 311 M): the sampled positions stay inside it
    (a float32 linspace rounds past its end) and include its last value; an edit there changes the fingerprint."""
    module = torch.nn.Module()
    module.register_buffer("weight", torch.zeros(2**25 + 3, dtype=torch.uint8))
    before = lmm_fingerprint(module)
    module.weight[-1] = 1
    after_last = lmm_fingerprint(module)
    module.weight[-1], module.weight[0] = 0, 1
    assert len({before, after_last, lmm_fingerprint(module)}) == 3

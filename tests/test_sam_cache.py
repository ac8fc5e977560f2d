"""SAM image-embedding cache (`data.sam_cache`): same losses as without it, the encoder skipped on hits, refused for
another SAM setup, torn or damaged entries recomputed, atomic writes, and `run.py cache-sam` + `run.py train`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from test_model import MODEL_CFG, PHRASES
from test_train import DEMO, TINY

import run
from flmm_model.data import collate, image_tensor, qwen_image_inputs
from flmm_model.data.prompts import encode_grounded, expression_parts
from flmm_model.data.sam_cache import SamCacheError, SamEmbeddingCache, image_digest
from flmm_model.device import to_device
from flmm_model.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(MODEL_CFG).train()


def make_items(model, photos) -> list[dict]:
    items = []
    for image, phrases in zip(photos[:3], PHRASES, strict=True):
        input_ids, mask_ids = encode_grounded(model.tokenizer, expression_parts(phrases))
        pixel_values, grid = qwen_image_inputs(image, model.image_processor)
        gt = torch.zeros(len(phrases), image.height, image.width, dtype=torch.bool)
        gt[:, : image.height // 2, : image.width // 3] = True
        items.append(dict(input_ids=input_ids, mask_ids=mask_ids, pixel_values=pixel_values, image_grid_thw=grid,
                          image=image_tensor(image), gt_masks=gt, phrases=phrases, meta={}))
    return items


def cached_batch(model, items, cache):
    return collate(items, pad_token_id=model.tokenizer.pad_token_id,
                   prepare=model.batch_preparer(sam_cache=cache))


def write_back(cache, prepared, output) -> None:
    """What the training loop does with the embeddings of the images the cache missed."""
    for name, embedding in zip(prepared.sam_missing_names, output["sam_new_embeddings"].cpu(), strict=True):
        cache.write(name, embedding)


def test_cached_step_equals_uncached_and_skips_the_encoder(model, photos, tmp_path):
    items = make_items(model, photos)
    expected = model(collate(items, pad_token_id=model.tokenizer.pad_token_id))
    cache = model.open_sam_cache(str(tmp_path / "cache"), precision="fp32")
    spec = pickle.loads(pickle.dumps(model.batch_preparer(sam_cache=cache)))  # DataLoader workers get a copy
    assert spec.sam_cache.key == cache.key
    calls = []
    hook = model.sam_refiner.sam.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        cold = to_device(model.prepare_batch(cached_batch(model, items, cache)), model.device)
        assert cold.sam_missing.tolist() == [0, 1, 2]
        output = model(cold)
        assert len(calls) == 1 and output["sam_new_embeddings"].shape == (3, *model.sam_refiner.embedding_shape)
        write_back(cache, cold, output)
        warm = to_device(model.prepare_batch(cached_batch(model, items, cache)), model.device)
        assert warm.sam_missing.numel() == 0
        cached = model(warm)
        assert len(calls) == 1  # all three embeddings came from the cache: no encoder call
        assert "sam_new_embeddings" not in cached
    finally:
        hook.remove()
    for key in ("loss", "loss_mask_bce", "loss_mask_dice", "loss_sam_bce", "loss_sam_dice"):
        assert torch.equal(cached[key], expected[key]) and torch.equal(output[key], expected[key]), key


def test_a_cache_of_another_sam_setup_is_refused(model, tmp_path):
    directory = str(tmp_path / "cache")
    model.open_sam_cache(directory, precision="fp32")
    model.open_sam_cache(directory, precision="fp32")  # the same setup reopens it
    with pytest.raises(SamCacheError, match=r"precision: 'fp32' in the cache, 'bf16' now"):
        model.open_sam_cache(directory, precision="bf16")
    other_weights = build_model({**MODEL_CFG, "seed": 1})
    with pytest.raises(SamCacheError, match=r"another SAM setup \(encoder: "):
        other_weights.open_sam_cache(directory, precision="fp32")
    other_budget = build_model({**MODEL_CFG, "max_pixels": 112 * 112})
    with pytest.raises(SamCacheError, match=r"max_pixels: 50176 in the cache, 12544 now"):
        other_budget.open_sam_cache(directory, precision="fp32")
    other_input = build_model({**MODEL_CFG, "sam": "sam_vit_l_narrow"})
    with pytest.raises(SamCacheError, match=r"image_size: 256 in the cache, 512 now"):
        other_input.open_sam_cache(directory, precision="fp32")


def test_torn_damaged_or_missing_entries_are_recomputed_not_used(model, photos, tmp_path):
    cache = model.open_sam_cache(str(tmp_path / "cache"), precision="fp32")
    items = make_items(model, photos)
    cold = to_device(model.prepare_batch(cached_batch(model, items, cache)), model.device)
    write_back(cache, cold, model(cold))
    names = [image_digest(item["image"]) for item in items]
    torn, damaged = cache.path(names[0]), cache.path(names[1])
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a write cut short
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the embedding values
    damaged.write_bytes(bytes(data))
    assert cache.read(names[0]) is None and cache.read(names[1]) is None and cache.read(names[2]) is not None
    cache.path(names[2]).unlink()
    assert cache.read(names[2]) is None

    batch = cached_batch(model, items, cache)
    assert batch["prepared"].sam_missing.tolist() == [0, 1, 2]  # every one recomputed in the step
    assert batch["prepared"].sam_embeddings.abs().sum() == 0  # nothing of the damaged entries is used
    prepared = to_device(model.prepare_batch(batch), model.device)
    write_back(cache, prepared, model(prepared))
    assert all(cache.read(name) is not None for name in names)  # rewritten whole
    assert not list(Path(cache.directory).rglob("*.tmp"))  # atomic writes leave no temporary file


def test_a_failed_write_keeps_the_old_entry(model, tmp_path, monkeypatch):
    cache = model.open_sam_cache(str(tmp_path / "cache"), precision="fp32")
    old = torch.randn(model.sam_refiner.embedding_shape)
    cache.write("ab" + "0" * 62, old)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flmm_model.data.tensor_store.save_file", full_disk)
    with pytest.raises(OSError, match="writing a SAM embedding"):
        cache.write("ab" + "0" * 62, torch.zeros_like(old))
    assert torch.equal(cache.read("ab" + "0" * 62), old)
    assert not list(Path(cache.directory).rglob("*.tmp"))


def test_cache_sam_command_then_training_reads_it(tmp_path):
    cache = tmp_path / "cache"
    common = ["--config", DEMO, *TINY, "data.val=[]", f"data.sam_cache={cache}", "train.progress=false"]
    first = run.main(["cache-sam", *common])
    assert first["written"] == 10 and first["cached"] == 0  # TINY's 10 synthetic training images
    again = run.main(["cache-sam", *common])
    assert again["written"] == 0 and again["cached"] == 10
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["key"]["image_size"] == 256 and manifest["key"]["precision"] == "fp32"

    steps = ["train.max_steps=2", "train.log_every=1"]
    with_cache = run.main(["train", *common, *steps, f"train.out_dir={tmp_path / 'a'}"])
    without = run.main(["train", "--config", DEMO, *TINY, "data.val=[]", *steps, f"train.out_dir={tmp_path / 'b'}"])
    assert with_cache["last_loss"] == without["last_loss"]
    with pytest.raises(SamCacheError, match="another SAM setup"):
        run.main(["train", *common, *steps, "model.seed=3", f"train.out_dir={tmp_path / 'c'}"])
    assert isinstance(SamEmbeddingCache, type)

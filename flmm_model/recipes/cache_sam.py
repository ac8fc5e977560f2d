"""`cache_sam(cfg)` (`run.py cache-sam`): fill `data.sam_cache` with the SAM image embeddings of every training image,
so training never runs SAM's image encoder (see `flmm_model.data.sam_cache`).

Only SAM is built (not Qwen). The key is the one training computes (`data.sam_cache.sam_cache_key` from the same
`model.sam` checkpoint or seeded preset, `model.dtype`, `train.precision` on `train.device`, the pixel budget), so a
training run with the same config reads every entry; entries already present and whole are kept. Under torchrun
each process encodes its shard.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from flmm_model.build import build_sam, cast_sam_encoder, check_model_paths, prompt_settings
from flmm_model.config import ConfigError, ExperimentConfig
from flmm_model.data.sam_cache import SamEmbeddingCache, sam_cache_key
from flmm_model.distributed import autocast_context, check_device, init_distributed, precision_of, shutdown_distributed
from flmm_model.modeling.batch import SamInputPreparer
from flmm_model.modeling.sam2_refiner import refiner_for
from flmm_model.recipes.caching import report, shard_loader, training_datasets


@torch.no_grad()
def cache_sam(cfg: ExperimentConfig) -> dict[str, Any]:
    """Encode and store every `data.train` image the cache lacks; returns the directory and the counts.

    Raises:
        ConfigError: no `data.sam_cache` set. SamCacheError: the directory belongs to another SAM setup.
    """
    if not cfg.data.sam_cache:
        raise ConfigError("data.sam_cache: set the cache directory (data.sam_cache=/path/to/cache)")
    check_model_paths(cfg.model)
    check_device(cfg.train.device, key="train.device")
    info = init_distributed(cfg.train.device)
    try:
        prompt = prompt_settings(cfg.model)
        dataset = torch.utils.data.ConcatDataset([entry.dataset for entry in training_datasets(cfg, prompt)])
        sam = build_sam(cfg.model.sam, dtype=torch.float32, seed=cfg.model.seed)  # as `build_model` builds it
        cast_sam_encoder(sam, getattr(torch, cfg.model.dtype))
        refiner = refiner_for(sam).to(info.device).eval()
        autocast = autocast_context(info.device, cfg.train.precision)
        key = sam_cache_key(encoder=refiner.frozen_encoder, image_size=refiner.image_size,
                            dtype=refiner.encoder_dtype, precision=precision_of(autocast),
                            min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
        cache = SamEmbeddingCache(cfg.data.sam_cache, key=key, embedding_shape=refiner.embedding_shape)
        sam_inputs = SamInputPreparer(image_size=refiner.image_size, sam_cache=cache,
                                      stretch=refiner.stretch)  # run in the workers
        loader = shard_loader(cfg, info, dataset, prompt=prompt, prepare=sam_inputs)
        counts = torch.zeros(2, dtype=torch.long)  # written, already cached
        for batch in tqdm(loader, desc="cache-sam", disable=not (info.is_main and cfg.train.progress)):
            if not batch["images"]:
                continue
            inputs = batch["prepared"]  # modeling.batch.SamInputs: the images the cache misses
            missing = inputs.encoded
            counts[1] += len(batch["images"]) - len(missing)
            if not missing:
                continue
            with autocast:
                pixels = refiner.normalize(inputs.pixels.to(info.device), inputs.resized.to(info.device))
                embeddings = refiner.encode_images(pixels).cpu()
            for b, embedding in zip(missing, embeddings, strict=True):
                cache.write(inputs.names[b], embedding)
            counts[0] += len(missing)
        return report(info, counts, option="data.sam_cache", directory=cfg.data.sam_cache, noun="embeddings")
    finally:
        shutdown_distributed(info)

"""What every command that uses a trained model shares: checkpoint -> model, and the one mask writer.

`predict`, `chat`, the web demo and `eval` all go through `open_checkpoint` (cheap: the checkpoint's config and
trainable weights read into memory, the prompt settings it implies, no frozen weights), run their own cheap checks
with `OpenedCheckpoint.prompt` (its tokenizer, instruction, system prompt and length limit; e.g.
`data.prompts.reject_control_tokens` on user text), and only then call `OpenedCheckpoint.build(device)`, which
loads the frozen parts (or `build_on(info, shard_lmm=...)` under torchrun: on the process's device, the frozen
LMM sharded when `model.shard_lmm=fsdp`). The user's config decides where the frozen parts come from (`model.qwen`,
`model.sam`, `model.tokenizer`) and the longest text (`model.max_length`); everything the heads were trained with
(family, pixel budget, instruction, system prompt, capture) comes from the checkpoint.

Masks are written as `mask_{k:02d}_{slug}.png` (0 / 255) by `write_masks`, each under a temporary name and renamed
into place, so a full disk or a kill leaves no half-written PNG under a final name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flmm_model.build import PromptSettings, check_model_paths, prompt_settings
from flmm_model.checkpoint import LoadedCheckpoint, load_checkpoint, settings_differ
from flmm_model.config import ModelConfig
from flmm_model.distributed import DistInfo, frozen_mesh, in_turn, place_model
from flmm_model.errors import CheckpointError, storage_error
from flmm_model.model import FrozenQwenSAM


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint read into memory with the settings it implies, before any frozen weights load.

    Attributes:
        loaded: the checkpoint's config fields and trainable weights.
        config: the model config to build: the checkpoint's, with the user's frozen-part paths and length limit.
        prompt: the tokenizer, image processor, instruction, system prompt and `max_length` of `config`.
    """

    loaded: LoadedCheckpoint
    config: ModelConfig
    prompt: PromptSettings

    @property
    def directory(self) -> Path:
        """The checkpoint directory that was read (a run directory resolves to its newest checkpoint)."""
        return self.loaded.directory

    def build(self, device: str | torch.device = "cpu") -> FrozenQwenSAM:
        """The model in eval mode on `device`: frozen parts loaded, trainable weights loaded strictly."""
        cfg = self.config
        return FrozenQwenSAM.from_pretrained(self.loaded, qwen_path=cfg.qwen, sam_path=cfg.sam,
                                             tokenizer_path=cfg.tokenizer, max_length=cfg.max_length,
                                             device=str(device)).eval()

    def build_on(self, info: DistInfo, *, shard_lmm: str = "none") -> tuple[FrozenQwenSAM, str]:
        """`build` on this process's device, the frozen LMM then sharded across the processes as `shard_lmm` (the
        user's `model.shard_lmm`: how to run the LMM is the command's choice, not the checkpoint's) says.

        Returns:
            (model, the line stating the LMM's memory per process).
        """
        mesh = frozen_mesh(shard_lmm, info)  # every process together, before they take turns

        def build_and_place() -> tuple[FrozenQwenSAM, str]:
            model = self.build("cpu")  # sharding moves each LMM block to the device as it shards it
            return model, place_model(model, model.lmm, shard_lmm, info, mesh=mesh)

        # A sharded LMM: one process at a time holds the whole checkpoint in host memory.
        return in_turn(info, build_and_place, enabled=mesh is not None)


def open_checkpoint(checkpoint: str | Path, model_cfg: ModelConfig) -> OpenedCheckpoint:
    """Read `checkpoint` (a checkpoint dir, or a run dir: its newest complete checkpoint) for inference.

    Args:
        checkpoint: what to load.
        model_cfg: the user's model settings; only `qwen`, `sam`, `tokenizer` and `max_length` are used.

    Raises:
        MissingFileError / ConfigError: a frozen-part path that does not exist or is not a checkpoint.
        MissingCheckpointError / CheckpointError: nothing to load, a damaged checkpoint, or a `model.qwen` of another
            family than the one the heads were trained on.
    """
    check_model_paths(model_cfg)
    loaded = load_checkpoint(checkpoint)  # config + trainable weights, in memory
    differ = settings_differ(loaded.model_config(), model_cfg, keys=())  # the rest is the checkpoint's anyway
    if differ:
        raise CheckpointError(f"{loaded.directory}: its heads were trained on another LMM ({'; '.join(differ)}); "
                              f"their masks would be wrong. Point model.qwen at a model of the checkpoint's family")
    config = loaded.model_config(qwen=model_cfg.qwen, sam=model_cfg.sam, tokenizer=model_cfg.tokenizer,
                                 max_length=model_cfg.max_length)
    return OpenedCheckpoint(loaded=loaded, config=config, prompt=prompt_settings(config))


def slugify(text: str, *, max_len: int = 40) -> str:
    """A file-name-safe version of a phrase: lower case, words joined by '_'."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len] or "phrase"


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG at `path` through a temporary name in the same folder, then rename it into place.

    Raises:
        StorageError: the file cannot be written (a full disk, no permission), naming the path.
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise storage_error(error, path=path, doing=f"writing {path.name}") from error
    return path


def write_masks(out_dir: str | Path, masks: np.ndarray, phrases: Sequence[str]) -> list[str]:
    """`mask_{k:02d}_{slug}.png` (0 / 255, the masks' size) per phrase in `out_dir`; their paths, in phrase order.

    Args:
        out_dir: an existing, writable directory.
        masks: (K, H, W) bool.
        phrases: K phrases (the file names' slugs).
    """
    if len(masks) != len(phrases):
        raise ValueError(f"write_masks: {len(masks)} masks for {len(phrases)} phrases")
    paths = []
    for k, (mask, phrase) in enumerate(zip(masks, phrases, strict=True)):
        path = Path(out_dir) / f"mask_{k:02d}_{slugify(phrase)}.png"
        paths.append(str(save_image(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255), path)))
    return paths

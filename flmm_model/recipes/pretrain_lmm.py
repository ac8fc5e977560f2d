"""`pretrain_lmm(cfg)`: teach the tiny Qwen2.5-VL preset to describe the synthetic scenes, for the CPU demo to freeze.

Why: F-LMM's claim is that a pretrained multimodal model's word-to-image attention grounds words. A randomly
initialised LMM has no such attention, so the CPU demo needs a small LMM that has learned to talk about its images.
This recipe teaches one: next-token prediction of a scene's phrases joined F-LMM's way ("the red circle. the two
green triangles.") in the assistant turn, after the image and the instruction, in Qwen2.5-VL's chat format with the
default system prompt. The phrases come in a random order, so naming a shape's colour and kind needs a look at it.

What trains: the vision tower and merger, every text decoder layer and the final norm, and of the input embedding
and the output head only the rows of the tokens the prompts and captions use (`caption_vocabulary`: 43 of
151,936). The output rows of every other token are set to zero, so their logit is 0 and the full-vocabulary
next-token loss of the written model is computed exactly from the trained rows:
log Z = logaddexp(logsumexp(trained logits), log(V - n)). That avoids a (tokens x 151,936) logit matrix and an AdamW
update of 19 M embedding values per step, and the written model gives the same probabilities to `generate`.

Run directory (train.out_dir): config.yaml, metrics.jsonl (caption loss per log step; validation caption loss and the
pointing accuracy of the attention), metrics.png, checkpoints/step_N/ (a complete transformers checkpoint plus
trainer_state.pt, for --resume; the data order depends only on (seed, epoch), so a resumed run repeats the losses of
an uninterrupted one) and, once the run is complete, `qwen/`: a normal transformers checkpoint directory
(config.json, model.safetensors, generation_config.json, tokenizer files, preprocessor_config.json) that
`build_qwen(path)` / `model.qwen: <dir>` load exactly like a downloaded Qwen2.5-VL. Every directory is written under a
temporary name and renamed into place, so an interrupted run never leaves a half-written one.

One process (CPU or one GPU); the config is an `ExperimentConfig` whose `model` section names the starting point
(`qwen`: a preset or a checkpoint directory), the tokenizer, the pixel budget and the prompt, `data` the synthetic
scenes, and `train` the loop (mask-head settings are not used).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from flmm_model.backbones import adapter_for
from flmm_model.backbones.vision_attention import use_packed_vision_attention
from flmm_model.build import QWEN_ARCHS, build_qwen, check_model_paths, prompt_settings
from flmm_model.checkpoint import load_trainer_state, resolve_checkpoint
from flmm_model.config import ConfigError, ExperimentConfig, ModelConfig
from flmm_model.config_loader import load_config
from flmm_model.data.loader import make_loader
from flmm_model.data.prompts import chat_prefix
from flmm_model.data.registry import NamedDataset, build_datasets
from flmm_model.data.synthetic import all_phrases
from flmm_model.distributed import DistInfo, ShardedSampler, autocast_context, resolve_device
from flmm_model.modeling.lmm import FrozenQwenLMM
from flmm_model.modeling.lmm_inputs import prepare_lmm_inputs
from flmm_model.recipes.loop import (
    LoopParts,
    Position,
    WarmupCosine,
    append_metrics,
    check_resume_setup,
    plot_metrics,
    read_metrics,
    restore_trainer_state,
    resume_source,
    run_loop,
    schedule_steps,
    seed_everything,
    start_run_files,
    val_loader,
)
from flmm_model.recipes.pointing import score_pointing
from flmm_model.recipes.scoring import print_table
from flmm_model.run_dir import acquire_run_lock, prepare_output_dir, release_run_lock

EXPORT_DIR = "qwen"  # the finished LMM inside train.out_dir
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"


def export_dir(cfg: ExperimentConfig) -> Path:
    """Where `pretrain_lmm(cfg)` writes the finished transformers checkpoint: `<train.out_dir>/qwen`."""
    return Path(cfg.train.out_dir) / EXPORT_DIR


def caption_vocabulary(tokenizer: PreTrainedTokenizerBase, *, instruction: str, system: str) -> list[int]:
    """Sorted token ids of the chat prompt and of every answer the synthetic scenes can give.

    Every phrase is tokenized in both places it can stand (first in the answer, and after ". "), with the closing
    `<|im_end|>`, so the ids are exactly those of the training sequences (the Qwen pre-tokenizer splits at word
    boundaries, so a phrase's tokens do not depend on its neighbours beyond that).
    """
    texts = [chat_prefix(instruction=instruction, system=system)]
    texts += [f"{ASSISTANT_HEADER}{phrase}. {phrase}.{END_OF_TURN}\n" for phrase in all_phrases()]
    ids = set()
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def caption_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, header_ids: list[int],
                    end_id: int) -> torch.Tensor:
    """(B, L) long: 0 on the tokens the model learns to predict (the assistant's answer and its closing
    `<|im_end|>`), -1 elsewhere.

    The answer starts after the last `<|im_start|>assistant\\n` of a sample and ends with the next `<|im_end|>`.

    Raises:
        ValueError: a sample without an assistant turn, or whose answer is empty or not closed (named by index).
    """
    targets = torch.full_like(input_ids, -1)
    header = torch.tensor(header_ids)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][attention_mask[b].bool()].cpu()
        offset = int(attention_mask[b].bool().nonzero()[0]) if ids.numel() else 0  # left padding
        starts = [i for i in range(len(ids) - len(header) + 1) if torch.equal(ids[i:i + len(header)], header)]
        if not starts:
            raise ValueError(f"sample {b}: no assistant turn ({ASSISTANT_HEADER!r}) to learn a caption from")
        begin = starts[-1] + len(header)
        ends = (ids[begin:] == end_id).nonzero()
        if len(ends) == 0 or int(ends[0]) == 0:
            raise ValueError(f"sample {b}: the assistant's answer is empty or has no closing {END_OF_TURN}")
        targets[b, offset + begin:offset + begin + int(ends[0]) + 1] = 0
    return targets


class PatchProjection(nn.Module):
    """The vision tower's patch embedding, a Conv3d whose kernel is its stride and spans its whole input (one patch
    per row), computed as the matmul it is, on the conv's own weight and bias Parameters.

    Why: on the CPU, oneDNN's Conv3d weight gradient took a quarter of a pretraining step (15 of 60 ms); the matmul
    takes about 1 ms. The state dict keeps the conv's keys and shapes, so the written checkpoint is unchanged.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding != (0, 0, 0) or conv.groups != 1:
            raise ValueError(f"PatchProjection: expected a Conv3d with kernel == stride, no padding and one group, "
                             f"found kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}")
        self.kernel_size = tuple(conv.kernel_size)
        self.weight = conv.weight  # (D, C, T, P, P)
        self.bias = conv.bias  # (D,) or None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[2:]) != self.kernel_size:
            raise ValueError(f"PatchProjection: expected patches (N, C, *{self.kernel_size}), found "
                             f"{tuple(patches.shape)}")
        out = F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)  # (N, D)
        return out[:, :, None, None, None]  # (N, D, 1, 1, 1), as the conv returns it


class CaptionLM(nn.Module):
    """Qwen2.5-VL learning to caption, with only the `vocab_ids` rows of its embedding and output head trainable.

    Everything else of the model trains. The output rows of tokens outside `vocab_ids` are zeroed at construction
    (logit 0), which makes the full-vocabulary loss exact from the trained rows (see the module docstring).

    Args:
        qwen: Qwen2.5-VL with untied input / output embeddings, float32.
        vocab_ids: token ids whose embedding and output rows train; every caption target must be one of them.
        tokenizer: saved with the model and used to name tokens in errors.
        image_processor: saved with the model (preprocessor_config.json).
    """

    def __init__(self, *, qwen: Qwen2_5_VLForConditionalGeneration, vocab_ids: list[int],
                 tokenizer: PreTrainedTokenizerBase, image_processor: Any) -> None:
        super().__init__()
        if qwen.config.tie_word_embeddings:
            raise ValueError("CaptionLM: the model ties its input and output embeddings; caption pretraining trains "
                             "their rows separately and needs an untied model (the `tiny` preset is untied)")
        self.qwen = qwen
        self.adapter = adapter_for(qwen)
        # The vision tower: one attention call per block (`vision_attention.py`), the patch embedding as a matmul.
        use_packed_vision_attention(qwen)
        patch_embed = qwen.model.visual.patch_embed
        patch_embed.proj = PatchProjection(patch_embed.proj)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.header_ids = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

        embed, head = self._full_embedding(), qwen.lm_head.weight
        self.vocab_size = head.shape[0]
        ids = torch.tensor(sorted(set(vocab_ids)), dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"CaptionLM: vocab_ids must be non-empty ids in [0, {self.vocab_size}), found "
                             f"{ids.tolist()[:8]}")
        qwen.requires_grad_(True)
        embed.requires_grad_(False)
        head.requires_grad_(False)
        row_of = torch.full((self.vocab_size,), -1, dtype=torch.long)  # token id -> trained row, -1 if frozen
        row_of[ids] = torch.arange(ids.numel())
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.register_buffer("row_of", row_of, persistent=False)
        with torch.no_grad():
            self.embed_rows = nn.Parameter(embed[ids].clone())  # (n, D)
            self.head_rows = nn.Parameter(head[ids].clone())  # (n, D)
            head.zero_()  # other tokens' logits are exactly 0; `sync_full_weights` writes the trained rows back
        self.sync_full_weights()

    def _full_embedding(self) -> nn.Parameter:
        return self.qwen.model.language_model.embed_tokens.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained rows, then the model's own trainable parameters, in a fixed order (the optimizer's)."""
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def sync_full_weights(self) -> Qwen2_5_VLForConditionalGeneration:
        """Write the trained rows into the model's full embedding and output head; returns the model."""
        self._full_embedding()[self.vocab_ids] = self.embed_rows
        self.qwen.lm_head.weight[self.vocab_ids] = self.head_rows
        return self.qwen

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Caption loss of a collated batch (compact ids, see `flmm_model.data.loader`).

        Returns:
            dict with `loss` (mean negative log-likelihood per target token, nats, over the full vocabulary),
            `nll_sum` (its sum, detached) and `num_tokens` (target tokens, long).
        """
        device = self.embed_rows.device
        targets = caption_targets(batch["input_ids"], batch["attention_mask"], header_ids=self.header_ids,
                                  end_id=self.end_id)
        # Validated, expanded and positioned on the host by the frozen LMM's own path; `targets` rides along as the
        # per-token index the expansion carries (0 = target, -1 = not), one "phrase" per sample.
        prepared = prepare_lmm_inputs(self.qwen, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                      batch["image_grid_thw"], mask_ids=targets).to(device)
        input_ids, targets = prepared.input_ids, prepared.mask_ids  # (B, L') each

        rows = self.row_of[input_ids]  # (B, L'), trained row of each token or -1
        inputs_embeds = torch.where((rows >= 0)[..., None], self.embed_rows[rows.clamp(min=0)],
                                    F.embedding(input_ids, self._full_embedding()))  # (B, L', D)
        image_features = self.adapter.encode_images(self.qwen, prepared.pixel_values, prepared.image_grid_thw,
                                                    prepared.vision_inputs).image_embeds  # (sum N, D)
        inputs_embeds = inputs_embeds.flatten(0, 1).index_copy(0, prepared.image_positions,
                                                               image_features.to(inputs_embeds.dtype))
        hidden = self.qwen.model.language_model(
            inputs_embeds=inputs_embeds.view(*input_ids.shape, -1), attention_mask=prepared.attention_mask,
            position_ids=prepared.position_ids, use_cache=False).last_hidden_state  # (B, L', D)

        predict = targets[:, 1:] == 0  # (B, L'-1): position t predicts token t + 1
        next_ids = input_ids[:, 1:][predict]  # (T,)
        next_rows = self.row_of[next_ids]  # (T,)
        if bool((next_rows < 0).any()):
            unknown = sorted(set(next_ids[next_rows < 0].tolist()))
            raise ValueError(f"caption tokens {unknown[:8]} ({[self.tokenizer.decode([i]) for i in unknown[:8]]}) "
                             f"are not in the trained vocabulary; captions must come from the synthetic scenes")
        logits = hidden[:, :-1][predict].float() @ self.head_rows.float().T  # (T, n)
        log_z = torch.logaddexp(torch.logsumexp(logits, dim=-1),
                                torch.tensor(math.log(self.vocab_size - self.vocab_ids.numel()), device=device))
        nll = log_z - logits.gather(1, next_rows[:, None])[:, 0]  # (T,)
        return {"loss": nll.mean(), "nll_sum": nll.detach().sum(), "num_tokens": torch.tensor(nll.numel())}

    def save_pretrained(self, directory: str | Path) -> None:
        """A complete transformers checkpoint: the model (rows written back), tokenizer and image processor."""
        qwen = self.sync_full_weights()
        qwen.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def _check_pretrain_config(cfg: ExperimentConfig) -> None:
    """Raise ConfigError (naming the key) for settings caption pretraining cannot honour."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training dataset configured")
    for section in ("train", "val"):
        for index, ds in enumerate(getattr(cfg.data, section)):
            if ds.type != "synthetic":
                raise ConfigError(f"data.{section}.{index}.type: caption pretraining learns the synthetic scenes' "
                                 f"phrases only, expected synthetic, found {ds.type!r}")
    if cfg.model.dtype != "float32":
        raise ConfigError(f"model.dtype: caption pretraining trains in float32 weights (use train.precision=bf16 "
                         f"for autocast on a GPU), found {cfg.model.dtype!r}")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError("pretrain-lmm runs in one process; start it without torchrun (for a config whose "
                         "model.qwen_pretrain must run first: `python run.py pretrain-lmm --config <that config>`)")


@torch.no_grad()
def _validate(caption_lm: CaptionLM, val_sets: list[NamedDataset], *, cfg: ExperimentConfig, info: DistInfo,
              autocast: Any) -> dict[str, dict[str, float]]:
    """Per validation set: caption loss of the model, and the pointing accuracy of its attention (frozen copy)."""
    caption_lm.eval()
    frozen = FrozenQwenLMM(qwen=copy.deepcopy(caption_lm.sync_full_weights()))  # capture attention on a copy
    scores = {}
    for entry in val_sets:
        loader = val_loader(entry, cfg=cfg, info=info, pad_token_id=caption_lm.tokenizer.pad_token_id)
        nll_sum = num_tokens = 0.0
        for batch in loader:
            with autocast:
                out = caption_lm(batch)
            nll_sum += float(out["nll_sum"])
            num_tokens += int(out["num_tokens"])
        scores[entry.label] = {"caption_loss": nll_sum / max(num_tokens, 1), **score_pointing(frozen, loader)}
    caption_lm.train()
    return scores


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final`. An older `final` is first renamed aside and deleted after, so
    `final` is never a half-written directory (a crash in between leaves the old one as `.old-*`)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _export(caption_lm: CaptionLM, qwen_dir: Path) -> None:
    """Write the finished LMM to `qwen_dir` under a temporary name and publish it, then sweep what an interrupted
    export left (a killed run's `.tmp-qwen-<pid>` or `.old-qwen-<pid>`; the run's checkpoint had all it needed)."""
    tmp = qwen_dir.with_name(f".tmp-{qwen_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    caption_lm.save_pretrained(tmp)
    _publish(tmp, qwen_dir)
    for prefix in (f".tmp-{qwen_dir.name}-", f".old-{qwen_dir.name}-"):
        for leftover in qwen_dir.parent.glob(f"{prefix}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def pretrain_lmm(cfg: ExperimentConfig) -> dict[str, Any]:
    """Caption-pretrain the LMM as `cfg` says and write `<train.out_dir>/qwen` (see the module docstring).

    Returns:
        dict with `out_dir`, `qwen_dir` (the finished checkpoint, None if stopped early), `steps`, `stopped_early`,
        `last_loss` (caption loss of the last log window) and `val` (label -> caption_loss, pointing,
        pointing_chance, count; of the start and of the end).
    """
    _check_pretrain_config(cfg)
    check_model_paths(cfg.model)
    out_dir = prepare_output_dir(cfg.train.out_dir, what="train.out_dir")
    lock = acquire_run_lock(out_dir)  # a second run on this directory refuses to start
    threads = torch.get_num_threads()  # `train.num_threads` holds for this run only
    try:
        return _pretrain(cfg, out_dir=out_dir)
    finally:
        release_run_lock(lock)
        torch.set_num_threads(threads)


def _pretrain(cfg: ExperimentConfig, *, out_dir: Path) -> dict[str, Any]:
    """`pretrain_lmm`'s body, run while this process holds the lock of `out_dir`."""
    tc = cfg.train
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(tc.device))  # one process
    device = info.device
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    metrics_path = out_dir / "metrics.jsonl"

    # ---- Data first (bad settings fail before any weights load).
    prompt = prompt_settings(cfg.model)
    tokenizer, image_processor = prompt.tokenizer, prompt.image_processor
    data_options = dict(data_root=cfg.data.root, prompt=prompt, on_error=cfg.data.on_error)
    train_set = torch.utils.data.ConcatDataset(
        [entry.dataset for entry in build_datasets(cfg.data.train, train=True, **data_options)])
    val_sets = build_datasets(cfg.data.val, train=False, **data_options)
    sampler = ShardedSampler(len(train_set), shuffle=True, seed=tc.seed, pad=True)
    loader = make_loader(train_set, sampler=sampler, batch_size=cfg.data.batch_size,
                         num_workers=cfg.data.num_workers, pad_token_id=tokenizer.pad_token_id,
                         padding_side=cfg.data.padding_side)
    micro_per_epoch = math.ceil(len(train_set) / cfg.data.batch_size)
    total_steps, warmup_steps = schedule_steps(tc, micro_per_epoch=micro_per_epoch)

    # ---- Resume from a checkpoint, or start afresh (refusing to delete an earlier run's checkpoints or LMM unless
    # asked: an LMM of the earlier run must not pass for this one's).
    source = resume_source(tc, info=info, earlier_outputs=[export_dir(cfg)], what="an earlier pretraining run")
    resume_from = resolve_checkpoint(source) if source is not None else None
    state = None
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        check_resume_setup(state, checkpoint=resume_from, world_size=1, batch_size=cfg.data.batch_size,
                           grad_accum=tc.grad_accum, total_steps=total_steps)

    # ---- Model (the checkpoint's weights when resuming), optimizer over the trainable parameters, schedule.
    qwen = build_qwen(str(resume_from) if resume_from else cfg.model.qwen, seed=cfg.model.seed)
    vocab = caption_vocabulary(tokenizer, instruction=prompt.instruction, system=prompt.system)
    caption_lm = CaptionLM(qwen=qwen, vocab_ids=vocab, tokenizer=tokenizer, image_processor=image_processor).to(device)
    params = caption_lm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps))
    autocast = autocast_context(device, tc.precision)
    start = Position()
    if state is not None:
        start = restore_trainer_state(state, optimizer=optimizer, scheduler=scheduler, rank=0)
        print(f"resumed from {resume_from} at step {start.step} (epoch {start.epoch}, micro-batch "
              f"{start.micro_in_epoch})")
    out_dir.mkdir(parents=True, exist_ok=True)
    start_run_files(out_dir, cfg=cfg, resumed_step=start.step if state is not None else None)
    trainable = sum(p.numel() for p in params)
    print(f"caption pretraining of {cfg.model.qwen}: {trainable:,} trainable parameters ({len(vocab)} vocabulary "
          f"rows of {caption_lm.vocab_size:,}); {len(train_set)} scenes, {cfg.data.batch_size} x {tc.grad_accum} per "
          f"step, {total_steps} steps, warm-up {warmup_steps}")
    caption_lm.train()

    def micro_step(batch: dict[str, Any], last_micro: bool) -> torch.Tensor:
        with autocast:
            out = caption_lm(batch)
        (out["loss"] / tc.grad_accum).backward()
        # (2,): the NLL sum and the target tokens it is over; the window's mean is the caption loss per token.
        return torch.stack([out["nll_sum"].double(), out["num_tokens"].to(device=device, dtype=torch.float64)])

    def run_validation(step: int, final: bool) -> dict[str, dict[str, float]]:
        scores = _validate(caption_lm, val_sets, cfg=cfg, info=info, autocast=autocast)
        record: dict[str, Any] = {"kind": "val", "step": step}
        for label, metrics in scores.items():
            record.update({f"{label}/caption_loss": metrics["caption_loss"], f"{label}/pointing": metrics["pointing"],
                           f"{label}/baseline_chance": metrics["pointing_chance"]})
        append_metrics(metrics_path, record)
        if step > 0:  # a plot needs training losses
            plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
        return scores

    start_scores = run_validation(0, False) if val_sets and start.step == 0 else {}
    parts = LoopParts(micro_step=micro_step, loss_keys=("loss",), validate=run_validation if val_sets else None,
                      model_files=lambda: {"write_model": caption_lm.save_pretrained})
    result = run_loop(parts, cfg=cfg, info=info, loader=loader, sampler=sampler, datasets=train_set.datasets,
                      micro_per_epoch=micro_per_epoch, total_steps=total_steps, optimizer=optimizer,
                      scheduler=scheduler, params=params, start=start, desc="pretrain-lmm")
    step, scores = result.step, result.scores

    qwen_dir = None
    if not result.stopped_early:
        plot_metrics(read_metrics(metrics_path), out_dir / "metrics.png")
        qwen_dir = export_dir(cfg)
        _export(caption_lm, qwen_dir)
        columns = ("caption_loss", "pointing", "pointing_chance")
        rows = {}
        for label, metrics in scores.items():
            if label in start_scores:  # absent after a resume
                rows[f"{label} step 0"] = {k: start_scores[label][k] for k in columns}
            rows[f"{label} step {step}"] = {k: metrics[k] for k in columns}
        if rows:
            print_table(rows, title="caption pretraining: validation caption loss (nats per token) and pointing "
                                    "accuracy of the layer- and head-averaged attention vs chance (%)")
        print(f"run directory: {out_dir} (metrics.jsonl, metrics.png, config.yaml); LMM: {qwen_dir} "
              f"(model.qwen={qwen_dir})")
    return {"out_dir": str(out_dir), "qwen_dir": str(qwen_dir) if qwen_dir else None, "steps": step,
            "stopped_early": result.stopped_early, "last_loss": result.last_loss,
            "val": {"start": start_scores, "end": scores}}


def ensure_pretrained_lmm(model_cfg: ModelConfig) -> dict[str, Any] | None:
    """Run the pretraining `model_cfg.qwen_pretrain` names when `model_cfg.qwen` does not exist yet.

    The pretraining resumes its own newest checkpoint if an earlier attempt was interrupted. Returns its summary,
    or None when there was nothing to do.

    Raises:
        ConfigError: `model_cfg.qwen` is missing and the pretraining does not write it (before anything runs).
    """
    if not model_cfg.qwen_pretrain or model_cfg.qwen in QWEN_ARCHS or Path(model_cfg.qwen).is_dir():
        return None
    pretrain_cfg = load_config(model_cfg.qwen_pretrain, ["train.resume=latest"])
    target = export_dir(pretrain_cfg)
    if target.resolve() != Path(model_cfg.qwen).resolve():
        raise ConfigError(f"model.qwen: expected a preset or an existing directory, found {model_cfg.qwen!r}; "
                          f"model.qwen_pretrain ({model_cfg.qwen_pretrain}) writes {target}, not this path")
    print(f"model.qwen {model_cfg.qwen} does not exist yet: pretraining it with {model_cfg.qwen_pretrain} first")
    return pretrain_lmm(pretrain_cfg)

"""Devices and torchrun: device names, bf16 autocast, the process group from the environment, DDP over the trainable
parameters only, sharded samplers.

Design: the whole FrozenQwenSAM is wrapped in DistributedDataParallel, with every frozen parameter and buffer
(the Qwen model, the SAM image encoder, anything else with `requires_grad=False`) registered as ignored. DDP then
neither broadcasts those tensors at construction (gigabytes for a 7B model; every rank builds them from the same
checkpoint anyway) nor syncs them during the forward, and it all-reduces gradients of the trainable heads only.
Wrapping the whole model keeps one forward call (`model(batch)`) for both single-process and DDP runs. Buffers are
ignored too: they are constants built identically on every rank, so DDP never broadcasts them.

With `model.shard_lmm=fsdp` the frozen LMM's vision blocks and decoder layers are sharded first (`shard_frozen`,
PyTorch FSDP2 `fully_shard`): each process holds 1/world of their weights and every forward all-gathers one block at a
time. Every process must then run the LMM the same number of times (the collectives pair up in order); the callers
keep that (`any_rank`, `recipes.scoring.score_dataset`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from flmm_model.errors import InputError

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process runs: rank among `world_size` processes, local rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(name: str, *, key: str = "device") -> None:
    """Raise InputError naming `key` unless `name` is auto, cpu, cuda or cuda:N and this machine has it.

    Checked before any weights load: on a CPU-only torch, `cuda` would otherwise fail deep inside `.to()`.
    """
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise InputError(f"{key}: expected auto | cpu | cuda | cuda:N, found {name!r}")
    if not name.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        reason = ("this torch is built without CUDA" if torch.version.cuda is None else
                  "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise InputError(f"{key}: {name} requested, but {reason}; use cpu (or auto, which picks a GPU when there "
                         f"is one)")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise InputError(f"{key}: {name} requested, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:<local_rank> when CUDA is available, else cpu; `cuda` -> cuda:<local_rank>; cpu / cuda:N as
    given. InputError for a name `check_device` refuses."""
    check_device(name)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast on CUDA for precision `auto` or `bf16`; bf16 on CPU only when asked; otherwise fp32.

    The returned context manager is reusable (enter it around every forward)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def precision_of(autocast: Any) -> str:
    """"bf16" when `autocast` (from `autocast_context`) is a bf16 autocast, else "fp32"."""
    return "bf16" if isinstance(autocast, torch.autocast) else "fp32"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a plain `python run.py` is a world of one and creates no group.

    Backend: nccl on CUDA, gloo on CPU. Calling it when a group already exists reuses that group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank=local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=resolved if resolved.type == "cuda" else None)
        owns_group = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, owns_group=owns_group)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it (a group made by the caller stays)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device(values: torch.Tensor) -> torch.device:
    """The device `values` must be on for a collective of the default process group.

    NCCL reduces CUDA tensors only ("No backend type associated with device type cpu"), so a tensor elsewhere goes
    to the current CUDA device (the one `init_distributed` selected); gloo takes a tensor where it is.
    """
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return values.device


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes; a copy in a world of one. Works for any backend: the reduction runs on
    `collective_device(values)` (a CUDA copy of a CPU tensor under NCCL). Returns a new tensor on the input's
    device; every process must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return values.clone()
    reduced = values.to(collective_device(values), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is True on any process (every process must call it); `flag` itself in a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int64))[0] > 0)


def all_reduce_max(value: int) -> int:
    """The largest `value` over all processes (every process must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    values = torch.tensor([value], dtype=torch.int64)
    values = values.to(collective_device(values))
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return int(values[0])


def lockstep_batches(loader: Any, *, sharded: bool) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, scored) for every batch of `loader` (scored=True); with a sharded LMM (`sharded`), then as many
    replays of this process's last batch with images (scored=False: run the LMM on it, drop the result) as make
    every process run the LMM the same number of times: shards differ by a sample, and a batch whose samples were
    all skipped as bad data runs nothing, but the sharded forwards' collectives must pair up.

    Raises:
        RuntimeError: a sharded run where this process has no batch with images at all (nothing to replay).
    """
    planned = all_reduce_max(len(loader)) if sharded else 0
    runs, last = 0, None
    for batch in loader:
        if len(batch["images"]):
            runs, last = runs + 1, batch
        yield batch, True
    if runs >= planned:
        return
    if last is None:
        raise RuntimeError(f"model.shard_lmm=fsdp: process {dist.get_rank()} has no sample with an image in its "
                           f"shard, so it cannot take part in the other processes' {planned} sharded forwards; use "
                           f"fewer processes or more samples")
    for _ in range(planned - runs):
        yield last, False


def frozen_mesh(mode: str, info: DistInfo) -> Any:
    """The 1-D device mesh over all processes that `model.shard_lmm` (`mode`) = "fsdp" shards the LMM on, or None
    (not sharding, or a world of one). Every process must call it (building a mesh may create process groups)."""
    if mode != "fsdp" or not info.distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def shard_frozen(modules: list[nn.Module], info: DistInfo, *, mesh: Any = None) -> bool:
    """Shard each of `modules` (frozen blocks, no gradient) across all processes with FSDP2 `fully_shard` on `mesh`
    (default: `frozen_mesh`); returns whether it sharded (False in a world of one: nothing to shard across). Each
    module's weights are all-gathered for its forward and freed after it (`reshard_after_forward`). No collective
    runs here when `mesh` is given, so processes may shard one at a time (`in_turn`)."""
    if not info.distributed:
        return False
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else frozen_mesh("fsdp", info)
    for module in modules:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return True


def shard_lmm(lmm: nn.Module, mode: str, info: DistInfo, *, mesh: Any = None) -> str:
    """Apply `model.shard_lmm` (`mode`) to a `FrozenQwenLMM` on its device: "fsdp" shards its
    `shardable_blocks()` across the processes (on `mesh`, see `shard_frozen`) and sets `lmm.sharded`. Returns the
    line to print: the LMM's memory per process."""
    if mode == "fsdp":
        lmm.sharded = shard_frozen(lmm.shardable_blocks(), info, mesh=mesh)
    gib = local_bytes(lmm) / 2**30
    how = (f"sharded over {info.world_size} processes (model.shard_lmm=fsdp)" if lmm.sharded
           else "whole in every process" + (" (model.shard_lmm=fsdp: one process, nothing to shard across)"
                                            if mode == "fsdp" else ""))
    return f"frozen LMM: {gib:.2f} GiB of weights per process, {how}"


def in_turn(info: DistInfo, build: Callable[[], T], *, enabled: bool) -> T:
    """`build()` on one process at a time, in rank order, the others waiting at a barrier (with `enabled` under
    torchrun; else simply `build()`). For a sharded LMM: each process reads the whole checkpoint into host memory
    before sharding sends its blocks to the device, so taking turns keeps the node's peak at about one checkpoint
    instead of one per process (8 x 147 GB for the 72B). `build` must run no collective (see `frozen_mesh`)."""
    if not (enabled and info.distributed):
        return build()
    result = None
    for turn in range(info.world_size):
        if turn == info.rank:
            result = build()
        dist.barrier()
    return result


class MainProcessScores:
    """A `generate` logits processor for a sharded LMM: every process takes the main process's next-token scores, so
    all decode the same tokens, stop at the same step and run the same number of forwards (each forward's
    all-gathers stay paired across the processes). Added last, after the sampling warpers."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.contiguous()
        dist.broadcast(scores, src=0)
        return scores


def lockstep_generation(options: dict[str, Any]) -> dict[str, Any]:
    """`generate` options for a sharded LMM under a process group, every process given the same prompt:
    `MainProcessScores` appended to the logits processors, with `do_sample` every process's RNG seeded alike (from
    the main process) so the sampled tokens agree too, and transformers' `synced_gpus` (a process that is done keeps
    running forwards until all are), a guard should the processes ever disagree on where to stop."""
    from transformers import LogitsProcessorList

    options = dict(options, synced_gpus=True)
    options["logits_processor"] = LogitsProcessorList([*(options.get("logits_processor") or []),
                                                       MainProcessScores()])
    if options.get("do_sample"):
        seed = [int(torch.randint(0, 2**62, ()))]
        dist.broadcast_object_list(seed, src=0)
        torch.manual_seed(seed[0])
    return options


def place_model(model: nn.Module, lmm: nn.Module, mode: str, info: DistInfo, *, mesh: Any = None) -> str:
    """Put `model` (on the CPU) on this process's device, its frozen LMM `lmm` sharded as `model.shard_lmm` (`mode`)
    says; returns `shard_lmm`'s memory line.

    The blocks are sharded while still on the CPU: `fully_shard` moves each block to the device as it shards it, so
    no device ever holds the whole LMM (a 72B would not fit on one GPU); everything else (embeddings, LM head, SAM,
    the heads) then moves whole, the sharded parameters untouched. `mesh`: see `shard_frozen`.
    """
    line = shard_lmm(lmm, mode, info, mesh=mesh)
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and not isinstance(param, DTensor) and param.device != info.device:
                    param.data = param.data.to(info.device)  # the same Parameter: optimizers built later see it
            for name, buffer in module._buffers.items():
                if buffer is not None and not isinstance(buffer, DTensor) and buffer.device != info.device:
                    module._buffers[name] = buffer.to(info.device)
    return line


def local_bytes(module: nn.Module) -> int:
    """The bytes of `module`'s parameters and buffers this process holds (its shards of sharded ones)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this process's shard
        total += local.numel() * local.element_size()
    return total


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_ddp(model: nn.Module, info: DistInfo, *, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel over the trainable parameters only (see the module docstring); the model itself when
    not distributed. Frozen parameters and all buffers are ignored.
    """
    if not info.distributed:
        return model
    # Every rank builds the frozen parts and all buffers identically (same checkpoint or same seed), so neither
    # needs the construction-time broadcast nor any sync; only trainable parameters take part in DDP.
    ignored = [name for name, param in model.named_parameters() if not param.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]
    # DDP's documented (underscore-prefixed) hook for exactly this; it reads the list in its constructor.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ShardedSampler(Sampler[int]):
    """Indices of this process's shard, reshuffled per epoch, resumable in the middle of an epoch.

    Training (`pad=True`): the epoch's permutation (seeded by `seed + epoch`, identical on every rank) is padded by
    repeating its head so every rank gets the same count; rank r takes positions r, r + world, ... Evaluation
    (`pad=False`, `shuffle=False`): the same striding without padding, so each sample is scored exactly once.
    `set_position(epoch, start)` skips the first `start` indices of this rank's shard (the samples a resumed run has
    already consumed); call `set_epoch(epoch)` (start 0) at every following epoch.
    """

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True) -> None:
        if length < 1:
            raise ValueError(f"ShardedSampler: the dataset is empty (length {length})")
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def shard_size(self) -> int:
        if self.pad:
            return math.ceil(self.length / self.world_size)
        return len(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return self.shard_size() - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.pad:
            total = self.shard_size() * self.world_size
            order = (order * math.ceil(total / self.length))[:total]
        shard = order[self.rank :: self.world_size]
        return iter(shard[self.start :])

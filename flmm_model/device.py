"""Moving nested batch structures (dicts, lists, tuples, dataclasses of tensors) between host and device.

A training step builds its inputs on the host (`FrozenQwenSAM.prepare_batch`), then moves them in one go: from
pinned memory with `non_blocking=True` the copies run asynchronously and the host never waits for the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def map_tensors(value: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """`value` with `fn` applied to every tensor inside it (dicts, lists, tuples and dataclass instances are rebuilt;
    anything else is kept as is)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return type(value)((key, map_tensors(item, fn)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    return value


def move_to(value: T, device: torch.device | str, *, non_blocking: bool = False) -> T:
    """Every tensor inside `value` moved to `device` (no copy for tensors already there)."""
    return map_tensors(value, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def pin_memory(value: T) -> T:
    """Every CPU tensor inside `value` in page-locked memory (a CUDA-capable build is needed; a no-op without one)."""
    if not torch.cuda.is_available():
        return value
    return map_tensors(value, lambda tensor: tensor.pin_memory() if tensor.device.type == "cpu" else tensor)


def to_device(value: T, device: torch.device | str) -> T:
    """Host structure -> `device` without the host waiting: on CUDA pinned first, then copied asynchronously."""
    device = torch.device(device)
    return move_to(pin_memory(value) if device.type == "cuda" else value, device, non_blocking=True)

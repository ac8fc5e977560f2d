"""Kernel-launching ops and host syncs of a block of code, per named region: the launch-bound costs of a GPU step,
counted on the CPU (where nothing runs asynchronously, so they cannot be seen as time).

Regions: `Regions.region(name)` (a context manager, usable from module hooks) opens a named region; regions nest,
and every op and every sync counts for the innermost open one.

Kernel-launching ops (`count_kernel_ops`): the lowest computing aten ops of the `torch.profiler` tree, forward and
backward; ops that only make views, allocate or read metadata (`NO_KERNEL`) do not count. One such op is one kernel
on a GPU in the common case (a cuBLAS or cuDNN call may launch a few); the count is for comparing code, not a launch
trace.

Host syncs (`SyncCounter`): a `TorchFunctionMode` that emulates the host / device split of a GPU run. Every tensor
is a device tensor except the ones marked as host tensors: the CPU batch handed to the step (`mark_host`), tensors
made by factories without a device (`torch.arange(n)`, `torch.tensor(data)`), and results of ops on host tensors
only. It counts, per region:
- reads of a device tensor's values into Python: `.item()`, `.tolist()`, `bool()` / `int()` / `float()` / `__index__`,
  `.cpu()`, `.numpy()`;
- ops whose output shape depends on device values: `nonzero`, `masked_select`, `unique`, boolean-mask indexing,
  one-argument `where`, `repeat_interleave` with tensor repeats and no `output_size`;
- host-to-device copies the host waits for: `.to(device)` of a host tensor without `non_blocking=True` (with it,
  the copy is asynchronous from the pinned memory the loaders use on CUDA), `torch.tensor(data, device=...)` and
  `new_tensor`, and a host tensor (more than one value) used as an operand of a device op.
A tensor made with `device="cpu"` spelled out (as optimizers make their step counts) is a host tensor.
Values read from host tensors (the compact CPU batch, the index lists built from it) are free: they never wait.
Code in a `host_regions` region is host code: all it makes are host tensors, except what it moves with `.to(device)`.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REGION_PREFIX = "region::"

# Leaf aten ops that launch no kernel: views, metadata, allocation without initialisation, host reads.
NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "as_strided", "as_strided_", "transpose", "transpose_", "t", "t_", "permute", "expand",
    "expand_as", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "slice", "select", "narrow", "split",
    "split_with_sizes", "unbind", "chunk", "detach", "detach_", "alias", "lift_fresh", "empty", "empty_strided",
    "empty_like", "resize_", "_reshape_alias", "reshape", "flatten", "unflatten", "view_as", "contiguous", "to",
    "type_as", "result_type", "is_nonzero", "_local_scalar_dense", "item", "set_", "requires_grad_", "retain_grad",
    "size", "stride", "numel", "dim", "is_same_size", "_has_compatible_shallow_copy_type", "broadcast_tensors",
    "movedim", "swapaxes", "diagonal", "conj", "resolve_conj", "resolve_neg", "_neg_view", "_conj", "real",
    "view_as_real", "view_as_complex", "meshgrid", "sym_size", "sym_stride", "sym_numel", "is_pinned",
    "record_stream",
))


class Regions:
    """A stack of named regions; each is also a `record_function` range, so profiler events can be attributed.

    With `timed=True` it also measures each region's own time (its time minus that of the regions inside it): on the
    CPU with `perf_counter`, on CUDA with events recorded on the stream (no sync inside the step; `times()` waits for
    them at the end).
    """

    def __init__(self, *, timed: bool = False, device: torch.device | None = None) -> None:
        self.stack: list[str] = []
        self.timed = timed
        self.cuda = device is not None and device.type == "cuda"
        self._ranges: list[Any] = []  # the open record_function ranges, innermost last
        self._open: list[tuple[str, Any, list[Any]]] = []  # (name, start mark, inner (start, end) marks)
        self._closed: list[tuple[str, Any, Any, list[Any]]] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "outside"

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def enter(self, name: str) -> None:
        self.stack.append(name)
        self._ranges.append(torch.profiler.record_function(REGION_PREFIX + name))
        self._ranges[-1].__enter__()
        if self.timed:
            self._open.append((name, self._mark(), []))

    def exit(self, name: str) -> None:
        if not self.stack or self.stack[-1] != name:
            raise RuntimeError(f"region {name!r} closed out of order (open: {self.stack})")
        self.stack.pop()
        self._ranges.pop().__exit__(None, None, None)
        if self.timed:
            _, start, inner = self._open.pop()
            end = self._mark()
            self._closed.append((name, start, end, inner))
            if self._open:
                self._open[-1][2].append((start, end))

    def times(self) -> Counter:
        """Seconds per region (own time, inner regions excluded), summed over every time it was open."""
        if self.cuda:
            torch.cuda.synchronize()

        def seconds(start: Any, end: Any) -> float:
            return start.elapsed_time(end) / 1e3 if self.cuda else end - start

        totals: Counter = Counter()
        for name, start, end, inner in self._closed:
            totals[name] += seconds(start, end) - sum(seconds(a, b) for a, b in inner)
        return totals

    def hook(self, module: torch.nn.Module, name: str) -> list[Any]:
        """Make `module`'s forward a region; returns the hook handles (call `.remove()` on each)."""
        pre = module.register_forward_pre_hook(lambda *_: self.enter(name))
        post = module.register_forward_hook(lambda *_: self.exit(name))
        return [pre, post]


def count_kernel_ops(profile: torch.profiler.profile) -> Counter:
    """Kernel-launching ops per innermost region (see the module docstring).

    An aten op counts as one kernel when no op below it counts (ops that only allocate or make views, `NO_KERNEL`,
    never count); so `scaled_dot_product_attention` counts once, through its one computing child, and `linear`
    once, through `addmm`. A `_foreach_*` / `_fused_*` op counts once, as on CUDA (a multi-tensor kernel), though on
    the CPU it runs one op per tensor below it.
    """
    counts: Counter = Counter()

    def visit(event: Any, region: str) -> int:
        if event.name.startswith(REGION_PREFIX):
            region = event.name[len(REGION_PREFIX):]
        if event.name.startswith(("aten::_foreach_", "aten::_fused_")):
            counts[region] += 1
            return 1
        below = sum(visit(child, region) for child in event.cpu_children)
        if below == 0 and event.name.startswith("aten::") and event.name not in NO_KERNEL:
            counts[region] += 1
            return 1
        return below

    for event in profile.events():
        if event.cpu_parent is None:
            visit(event, "outside")
    return counts


_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "__format__"}
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique", "_unique2"}
_FACTORIES = {"arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "linspace", "eye", "from_numpy",
              "range", "logspace", "empty_strided"}
_COPYING_FACTORIES = {"tensor", "as_tensor", "new_tensor"}


class _TensorSet:
    """Tensors by identity (a WeakSet would compare tensors with `==`, elementwise)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._refs[key] = weakref.ref(tensor, lambda _ref, key=key: self._refs.pop(key, None))

    def discard(self, tensor: torch.Tensor) -> None:
        self._refs.pop(id(tensor), None)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


class SyncCounter(TorchFunctionMode):
    """Counts host syncs per region (see the module docstring). Use inside `with SyncCounter(regions) as sync:`."""

    def __init__(self, regions: Regions, *, host_regions: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.regions = regions
        self.host_regions = host_regions  # regions of host code: every tensor made there is a host tensor
        self.host = _TensorSet()
        self.counts: Counter = Counter()
        self.kinds: dict[str, Counter] = defaultdict(Counter)

    def mark_host(self, tree: Any) -> None:
        """Mark every tensor in a nested structure (a CPU batch) as a host tensor."""
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                self.host.add(leaf)

    def _is_host(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value in self.host

    def _count(self, kind: str) -> None:
        self.counts[self.regions.current] += 1
        self.kinds[self.regions.current][kind] += 1

    def _classify(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Count the sync `name(*args, **kwargs)` makes, if any; return whether its result stays on the host."""
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        host_operands = [t for t in tensors if self._is_host(t)]
        device_operands = [t for t in tensors if not self._is_host(t)]
        if name in _READS:
            if tensors and not self._is_host(tensors[0]):
                self._count(f"read:{name}")
            return True
        if kwargs.get("device") == "cpu":  # written out as the host (an optimizer's step count): stays there
            return True
        if name in _COPYING_FACTORIES:
            target = kwargs.get("device")
            if name == "new_tensor" and target is None and not self._is_host(args[0]):
                target = "the device of self"
            if target is None:
                return True
            self._count(f"h2d:{name}")
            return False
        if name in ("to", "cuda", "copy_"):
            source = args[1] if name == "copy_" else args[0]
            non_blocking = kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
            if name == "copy_":
                moves = not self._is_host(args[0])
            else:
                moves = name == "cuda" or "device" in kwargs or any(
                    isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])
            if self._is_host(source) and moves:
                if not non_blocking:
                    self._count(f"h2d:{name}")
                self.host.discard(source)  # on the CPU `.to(device)` returns the tensor itself: now a device copy
            return self._is_host(source) and not moves
        if not tensors:
            return name in _FACTORIES and kwargs.get("device") is None
        if not device_operands:
            return True  # host work on host tensors: never waits
        if name in _DATA_DEPENDENT or (name == "where" and len(args) + len(kwargs) == 1):
            self._count(f"shape:{name}")
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
            if isinstance(repeats, torch.Tensor) and not self._is_host(repeats):
                self._count("shape:repeat_interleave")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            index = args[1]
            leaves = tree_flatten(index)[0]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in leaves if not self._is_host(i)):
                self._count("shape:bool_index")
            elif isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index)):
                self._count("h2d:list_index")
        if any(t.numel() > 1 for t in host_operands):
            self._count(f"h2d:host_operand_of_{name}")
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.regions.current in self.host_regions:
            moves = name == "to" and ("device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]))
            if moves:
                self.host.discard(args[0])
            out = func(*args, **kwargs)
            if not moves:
                for leaf in tree_flatten(out)[0]:
                    if isinstance(leaf, torch.Tensor):
                        self.host.add(leaf)
            return out
        on_host = self._classify(name, args, kwargs)
        out = func(*args, **kwargs)
        if on_host:
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    self.host.add(leaf)
        return out

"""Peak memory of a block of code, shared by the benchmark scripts.

On CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`, reset at entry). On CPU: the process RSS
sampled by a background thread (a coarser measure: allocations shorter than the interval can be missed).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch


class PeakMemory:
    """`with PeakMemory(device) as memory: ...`, then `memory.peak_mib` (absolute peak inside the block) and
    `memory.rise_mib` (that peak minus the level at entry: what the block itself added), both in MiB."""

    def __init__(self, device: torch.device, *, interval_s: float = 0.001) -> None:
        self.device = device
        self.interval_s = interval_s
        self.start_mib = self.peak_mib = 0.0

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            start = self.highest = self._rss_bytes()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        self.start_mib = start / 2**20
        return self

    def _sample(self) -> None:
        while self.running:
            self.highest = max(self.highest, self._rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            peak = max(self.highest, self._rss_bytes())
        self.peak_mib = peak / 2**20

    @property
    def rise_mib(self) -> float:
        return self.peak_mib - self.start_mib

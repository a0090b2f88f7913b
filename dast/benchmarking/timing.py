"""Wall-clock timing with device synchronisation, and memory figures."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Per-iteration wall times in milliseconds."""

    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self) -> dict[str, Any]:
        return {
            "ms_median": round(self.median, 3),
            "ms_min": round(min(self.times_ms), 3),
            "ms_max": round(max(self.times_ms), 3),
            "iters": len(self.times_ms),
        }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[int], Any], *, iters: int, warmup: int, device: torch.device) -> Timing:
    """Call ``fn(i)`` ``warmup`` times, then time ``iters`` calls, synchronising around each."""
    if iters < 1:
        raise ValueError("iters must be >= 1")
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times = []
    for i in range(warmup, warmup + iters):
        t0 = time.perf_counter()
        fn(i)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return Timing(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in GiB on CUDA; ``None`` elsewhere."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return None


def rss_gib() -> float | None:
    """Current resident set size of this process in GiB (Linux), else ``None``."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**30, 3)
    except (OSError, ValueError, IndexError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"

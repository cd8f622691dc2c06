"""Clocks and memory meters shared by the benchmarks: wall and process CPU time, peak RSS since a reset, CUDA peaks.

Why CPU time: on a shared machine a niced benchmark may get a tenth of a core, so its wall time measures the other
tenants. With one torch thread, the process's CPU seconds are the work the run itself needed; reports give both.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Elapsed:
    """Seconds of one measured span: on the wall clock, and of CPU used by this process (all its threads)."""

    wall: float
    cpu: float


class Stopwatch:
    """Measures a span on both clocks; on CUDA it waits for the queued work before reading either."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> tuple[float, float]:
        self._sync()
        return time.perf_counter(), time.process_time()

    def stop(self, started: tuple[float, float]) -> Elapsed:
        self._sync()
        return Elapsed(time.perf_counter() - started[0], time.process_time() - started[1])


def rss_bytes() -> int:
    """Resident set size now (0 where /proc is not there)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); False where that is unsupported,
    in which case `peak_rss_bytes` is the peak since the process started."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss` (or since start)."""
    peak = _status_kib("VmHWM") * 1024
    return peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakMemory:
    """Peak memory over a span: host RSS (above what was resident at the start, and in all) and, on CUDA, the
    allocator's peak above its level at the start."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rss_before = 0
        self.cuda_before = 0

    def __enter__(self) -> PeakMemory:
        reset_peak_rss()
        self.rss_before = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_peak = peak_rss_bytes()
        self.cuda_peak = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def result(self) -> dict[str, int]:
        out = {"rss_peak": self.rss_peak, "rss_added": max(0, self.rss_peak - self.rss_before)}
        if self.device.type == "cuda":
            out |= {"cuda_peak": self.cuda_peak, "cuda_added": max(0, self.cuda_peak - self.cuda_before)}
        return out


def mib(value: float) -> float:
    return value / 2**20

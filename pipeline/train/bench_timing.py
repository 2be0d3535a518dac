"""Timing and memory primitives of `ganpipe bench train` (`pipeline.train.bench`), shared by the reference steps of
`--compare` (`pipeline.train.bench_compare`): the names of a step's parts, a window of timed steps with marks around
its parts (`PartTimer`, which synchronizes CUDA at every mark), what one side's window measured (`SideRun`), and
the peak memory of a window (CUDA allocator peak; on CPU the process's peak resident set).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Part names besides the phases'.
SYNC, EMA, DATA, LOGGING, CALLBACKS, BODY = "sync", "ema", "data", "logging", "callbacks", "training_step"


# ----------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class SideRun:
    """One side's timed steps in one repeat."""

    side: str  # "engine", "bare", "eager" (train.compile) or "reference"
    first_step: int  # step index of the first timed step
    steps: int
    seconds: float  # wall time of the steps
    parts: dict[str, float]  # seconds per part, summed over the steps
    runs: dict[str, int]  # how often each part ran
    peak_bytes: int
    base_bytes: int  # memory in use when the steps began (same measure as the peak)

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps


class PartTimer:
    """Seconds spent in named parts while a window of steps is open; outside one, marks cost nothing. On CUDA every
    mark synchronizes the device, so a part's time is its own work, not whatever was queued before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.open = False
        self._started: dict[str, float] = {}
        self._seconds: defaultdict[str, float] = defaultdict(float)
        self._runs: Counter[str] = Counter()
        self._t0 = 0.0
        self._memory: tuple[str, int] = ("", 0)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def begin(self, name: str) -> None:
        if self.open:
            self._started[name] = self.now()

    def end(self, name: str) -> None:
        t0 = self._started.pop(name, None)
        if t0 is not None:
            self._seconds[name] += self.now() - t0
            self._runs[name] += 1

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def start_window(self) -> None:
        self._started.clear()
        self._seconds.clear()
        self._runs.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._memory = memory_start(self.device)
        self.open = True
        self._t0 = time.perf_counter()

    def stop_window(self, side: str, first_step: int, steps: int) -> SideRun:
        seconds = self.now() - self._t0
        self.open = False
        self._started.clear()
        kind, base = self._memory
        peak = memory_peak(kind, self.device)
        return SideRun(side, first_step, steps, seconds, dict(self._seconds), dict(self._runs), peak, base)


# Peak memory ----------------------------------------------------------------------------------------------------


def _proc_status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_vmhwm() -> bool:
    """Linux: reset the process's peak resident set (VmHWM) to its current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_start(device: torch.device) -> tuple[str, int]:
    """(how the peak is measured, memory in use now), with the peak reset where that is possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda", torch.cuda.memory_allocated(device)
    if _reset_vmhwm():
        return "vmhwm", _proc_status_bytes("VmRSS") or 0
    return "maxrss", _ru_maxrss_bytes()


def memory_peak(kind: str, device: torch.device) -> int:
    if kind == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if kind == "vmhwm":
        return _proc_status_bytes("VmHWM") or 0
    return _ru_maxrss_bytes()


MEMORY_LABELS = {
    "cuda": "peak memory, GiB (torch.cuda.max_memory_allocated; growth during the steps)",
    "vmhwm": "peak RSS, GiB (VmHWM, reset per side; growth during the steps)",
    "maxrss": "peak RSS, GiB (ru_maxrss, process lifetime; growth during the steps)",
}


def process_started_at() -> float | None:
    """This process's start as time.time(), from /proc (Linux), or None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


__all__ = [
    "BODY",
    "CALLBACKS",
    "DATA",
    "EMA",
    "LOGGING",
    "MEMORY_LABELS",
    "SYNC",
    "PartTimer",
    "SideRun",
    "memory_peak",
    "memory_start",
    "process_started_at",
]

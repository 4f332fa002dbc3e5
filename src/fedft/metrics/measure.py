"""Measure a piece of work: wall time, peak resident memory of the process, CUDA peak.

Peak RSS comes from the kernel's high-water mark (VmHWM), reset before the work through
/proc/self/clear_refs, so each client step gets its own peak rather than the process's lifetime
maximum. Where that reset is not allowed, a sampling thread watches RSS instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measured:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0
    flops: int = 0  # counted only when asked (0 otherwise)


def _read_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._done = threading.Event()  # not `_stop`: that is Thread's own method

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


@contextmanager
def measure(device: torch.device | None = None, count_flops: bool = False) -> Iterator[Measured]:
    result = Measured()
    counter = FlopCounterMode(display=False) if count_flops else None
    use_cuda = device is not None and device.type == "cuda"
    if use_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = None
    if not (_reset_hwm() and _read_hwm() is not None):
        sampler = _Sampler()
        sampler.start()
    start = time.perf_counter()
    try:
        with counter if counter is not None else nullcontext():
            yield result
    finally:
        if counter is not None:
            result.flops = int(counter.get_total_flops())
        if use_cuda:
            torch.cuda.synchronize(device)
            result.peak_cuda_bytes = int(torch.cuda.max_memory_allocated(device))
        result.seconds = time.perf_counter() - start
        result.peak_rss_bytes = sampler.stop() if sampler else int(_read_hwm() or 0)

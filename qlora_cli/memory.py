"""How much memory this process holds, one way for every command: CUDA's allocator on a GPU, /proc on the CPU.

On the CPU the resident set also counts the file pages of a memory-mapped checkpoint: page cache the
kernel may drop at any time, which a GPU allocator never sees. `held_peak` therefore samples anonymous
memory (RssAnon), what the process itself allocated; `current` and `peak` are the plain resident set.
"""

from __future__ import annotations

import re
import resource
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

_STATUS = Path("/proc/self/status")


@dataclass
class HeldPeak:
    """The peak so far of a `held_peak` block, readable while it runs."""

    kind: str
    start: int
    read: Callable[[], int]
    sampled: int = 0

    @property
    def peak(self) -> int:
        return max(self.sampled, self.read())


@dataclass
class AllocatedPeak:
    """The most torch's allocator held during an `allocated_peak` block, above what it held when it began."""

    kind: str
    peak: int = 0


class MemoryMeter:
    def __init__(self, device: str | None = None) -> None:
        self.cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        self.device = device if self.cuda and device and ":" in device else None

    @property
    def kind(self) -> str:
        """What `peak` measures, recorded beside every figure."""
        return "cuda_max_allocated" if self.cuda else "process_peak_rss"

    def current(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return _status("VmRSS") or _psutil_rss()

    def peak(self) -> int:
        """Since the process started or the last `reset_peak`; never below `current` (the kernel's can lag)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        recorded = _status("VmHWM") or (usage if sys.platform == "darwin" else usage * 1024)
        return max(recorded, self.current())

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
        except OSError:
            pass

    @contextmanager
    def held_peak(self, interval_s: float = 0.005) -> Iterator[HeldPeak]:
        """The most the block held: CUDA's peak allocation, or anonymous memory sampled every `interval_s`."""
        if self.cuda:
            self.reset_peak()
            yield HeldPeak("cuda_max_allocated", self.current(), self.peak)
            return
        anonymous = _status("RssAnon") is not None
        now = (lambda: _status("RssAnon") or 0) if anonymous else self.current
        held = HeldPeak("peak_anonymous_rss" if anonymous else "peak_rss", now(), now)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval_s):
                held.sampled = max(held.sampled, now())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield held
        finally:
            done.set()
            sampler.join()
            held.sampled = held.peak

    @contextmanager
    def allocated_peak(self) -> Iterator[AllocatedPeak]:
        """What a GPU's max_memory_allocated tells, on the CPU too, which keeps no allocator statistics: there the
        running sum of torch.profiler's memory events (every allocation and free, in time order). The profiler
        slows the block down: for benchmarks and tests, not training runs."""
        if self.cuda:
            self.reset_peak()
            start, held = self.current(), AllocatedPeak("cuda_max_allocated")
            yield held
            held.peak = self.peak() - start
            return
        from torch.profiler import ProfilerActivity, profile

        held = AllocatedPeak("cpu_profiler_allocated")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield held
        total = 0
        memory = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        for event in sorted(memory, key=lambda e: e.start_ns()):
            total += event.nbytes()
            held.peak = max(held.peak, total)


def _status(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _psutil_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)

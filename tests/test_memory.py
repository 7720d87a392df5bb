"""The one memory meter: what training logs, merge reports and the benchmarks print."""

from __future__ import annotations

import mmap
import sys
import time

import pytest

from qlora_cli.memory import MemoryMeter


def test_peak_is_never_below_current_and_names_its_kind():
    meter = MemoryMeter("cpu")
    assert meter.kind == "process_peak_rss"
    assert 0 < meter.current() <= meter.peak()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous memory is read from /proc")
def test_held_peak_sees_memory_freed_before_the_block_ends():
    meter = MemoryMeter("cpu")
    with meter.held_peak(interval_s=0.001) as held:
        # 64 MiB of fresh anonymous pages, touched: a tensor's could come from heap the process already holds
        # (it failed so under pytest-xdist, after other tests)
        block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        # held until a sample has seen it: allocating, touching and freeing it can all fit between two samples
        deadline = time.monotonic() + 10
        while held.sampled - held.start < 60 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.001)
        block.close()
    assert held.kind == "peak_anonymous_rss"
    assert held.peak - held.start >= 60 * 2**20  # freed before the block ended, still its peak

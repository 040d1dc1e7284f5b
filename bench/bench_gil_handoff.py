"""How long a thread that keeps blocking takes to get the interpreter lock back while
another thread runs Python: the reason `sentinel-kernels serve` sets a short thread switch
interval (``--switch-interval-ms``, :data:`sentinel_kernels.app.cli.SERVE_SWITCH_INTERVAL_MS`).

The serving engine's thread waits for the GPU at every step (``torch.cuda.Event.synchronize``
releases the lock), then needs the lock again for its bookkeeping; meanwhile the event loop's
thread parses requests and writes SSE chunks. A thread that wants the lock back waits until
the holder blocks or the switch interval (5 ms by default) expires.

Each entry times ``ITERATIONS`` iterations of "block 1 ms without the lock
(``time.sleep``), then a little Python" on the calling thread while a second thread runs a
pure-Python loop, at one switch interval; the result is the mean time per iteration
(``extra_info["ms_per_iteration"]``; the ideal is ~1 ms). The ``0.5 ms`` entry records
``speedup`` = the 5 ms entry's time / its own. A mechanism benchmark: it names no server
throughput (that is measured on the GPU by ``scripts/serve_compare.sh``).

Run: ``pytest bench/bench_gil_handoff.py --benchmark-json OUT.json``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

ITERATIONS = 100
BLOCK_S = 0.001
INTERVALS_MS = (5.0, 0.5)
_means: dict[float, float] = {}


def _engine_like_loop() -> None:
    for _ in range(ITERATIONS):
        time.sleep(BLOCK_S)  # waiting for the device: the lock is released
        sum(range(200))  # the step's bookkeeping: needs the lock


@pytest.fixture
def busy_thread() -> Iterator[None]:
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x += 1

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    time.sleep(0.02)
    try:
        yield
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("interval_ms", INTERVALS_MS, ids=[f"{i}ms" for i in INTERVALS_MS])
def test_gil_handoff(benchmark: Any, busy_thread: None, interval_ms: float) -> None:
    """One entry per switch interval: group ``gil_handoff``."""
    benchmark.group = "gil_handoff: 1 ms blocks while another thread runs Python"
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_ms / 1000.0)
    try:
        benchmark.pedantic(_engine_like_loop, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        sys.setswitchinterval(before)
    mean = benchmark.stats.stats.mean
    _means[interval_ms] = mean
    info: dict[str, Any] = {
        "switch_interval_ms": interval_ms,
        "iterations": ITERATIONS,
        "block_ms": BLOCK_S * 1e3,
        "ms_per_iteration": 1e3 * mean / ITERATIONS,
    }
    if interval_ms != INTERVALS_MS[0] and INTERVALS_MS[0] in _means:
        info["speedup"] = _means[INTERVALS_MS[0]] / mean
    benchmark.extra_info.update(info)

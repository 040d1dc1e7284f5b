"""What one full pass of CPython's cyclic collector costs a serving process, before and
after :func:`sentinel_kernels.serve.heap.freeze_heap` (the reason every serving process
freezes its start-up heap once its engine is ready).

The process holds what a server holds: torch, transformers and the package imported, a
tiny random Llama patched at level 1 and a running :class:`~sentinel_kernels.serve.Engine`
(the GPU server adds Triton's compiled kernels and a larger model, so more objects). Each
entry times ``gc.collect()`` (a full, oldest-generation pass: what ordinary serving
allocations trigger now and then, stopping the thread that triggered it, the engine loop
or an event loop). ``extra_info``: ``tracked`` (objects the pass walks) and, on the
``frozen`` entry, ``speedup`` = the ``as built`` entry's time / its own.

Run: ``pytest bench/bench_gc_freeze.py --benchmark-json OUT.json``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine
from sentinel_kernels.serve.heap import freeze_heap

_times: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    model, tok = sk.models.load_model("tiny:llama")
    sk.patch_model(model, level=1)
    with Engine(model, tok, max_slots=4, max_seq_len=256) as eng:
        yield eng
    gc.unfreeze()  # the objects go back to the collector after the module


@pytest.mark.parametrize("heap", ["as built", "frozen"])
def test_full_collection(benchmark: Any, engine: Engine, heap: str) -> None:
    if heap == "frozen":
        freeze_heap()
    tracked = sum(len(gc.get_objects(g)) for g in range(3))
    benchmark.pedantic(gc.collect, rounds=7, iterations=1, warmup_rounds=1)
    ms = benchmark.stats.stats.median * 1e3
    _times[heap] = ms
    benchmark.extra_info.update(heap=heap, tracked=tracked, full_pass_ms=ms)
    if heap == "frozen" and "as built" in _times:
        benchmark.extra_info["speedup"] = _times["as built"] / ms

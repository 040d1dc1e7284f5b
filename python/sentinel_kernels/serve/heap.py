"""Keep the garbage collector off a server's start-up heap.

A serving process keeps what it built at start-up to the end: torch, transformers, Triton's
compiled kernels and autotune state, the model's modules and the engine. CPython's cyclic
collector nevertheless walks all of it on every full (oldest-generation) collection, and
those come from the allocations of ordinary serving; each is a stop-the-world pause of the
thread that triggered it, the engine loop or an HTTP worker's event loop, and every stream
waits with it. On the 2-core CPU box one full pass over the ~385k objects of a process with
the package imported, a tiny model and an engine took 88 ms, and ~1 us after
:func:`freeze_heap` (``bench/bench_gc_freeze.py``).
"""

from __future__ import annotations

import gc
import logging

__all__ = ["freeze_heap"]

log = logging.getLogger("sentinel_kernels.serve")


def freeze_heap() -> int:
    """Collect once, then move every object alive now into the collector's permanent
    generation (``gc.freeze``), so later full collections traverse only what was made
    since. Reference counting still frees frozen objects; only cyclic garbage among them
    is never reclaimed, so call it in a process that keeps its start-up objects to the end
    (``sentinel-kernels serve`` does, after its engine is warm), not in a library
    caller's process. Idempotent in effect: a second call also freezes what was made
    since the first.

    Returns:
        The number of objects now in the permanent generation (``gc.get_freeze_count``).

    The idea is Instagram's ``gc.freeze`` before forking workers; vLLM freezes its engine
    and API-server processes' heaps after start-up the same way.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up heap frozen: %d objects left out of later collections", frozen)
    return frozen

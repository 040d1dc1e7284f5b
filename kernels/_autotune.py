"""``triton.autotune`` with its timings kept on disk: the one place the kernel modules make
their autotuners.

Each new autotune key (a shape bucket, a fusion variant) costs a benchmark of every
candidate config the first time a process meets it; an engine or server start-up meets
dozens (each decode batch bucket and packed prefill width of every linear and attention
variant; how much of the warm-up that is has not been measured). Since Triton 3.4,
``cache_results=True`` stores each key's timings in Triton's cache directory
(``TRITON_CACHE_DIR``, by default ``~/.triton/cache``), keyed by the Triton version, the
GPU target, the kernel's source, the key and the candidate configs, so a later process on
the same machine reads the choice instead of benchmarking again (Triton PR #6261). The
target is the architecture (an H100 and an H200 are both ``cuda:90``), so a cache
directory shared by two GPU models serves the choices of whichever tuned first.
Autotuning itself is unchanged: the same candidates, the same pick on a miss.
``SENTINEL_AUTOTUNE_CACHE=0`` turns the disk cache off; a Triton without the option tunes
in memory as before; the interpreter never caches (Triton's own rule).

On a miss each candidate is timed by Triton's ``do_bench``, by default 25 ms of warm-up
and 100 ms of timed runs (each run after an L2 flush): ~125 ms per candidate and key,
whatever the kernel's own length, so a key with 12 candidates costs 1.5 s, and a server
start-up meets each linear shape at every decode bucket and prefill width. Our kernels
mostly take microseconds (a prefill GEMM up to about a millisecond), so 5 ms of warm-up
and 20 ms of runs still give the median of ~20 runs for the longest and thousands for
the shortest (``SENTINEL_AUTOTUNE_BENCH_MS``, read when an autotuner is made); a
start-up spends a fifth of the benchmarking time.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import triton
import triton.testing

from sentinel_kernels import settings


@functools.cache
def _autotune_params() -> frozenset[str]:
    try:
        return frozenset(inspect.signature(triton.autotune).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return frozenset()


def _supports_cache_results() -> bool:
    return "cache_results" in _autotune_params()


def _supports_do_bench() -> bool:
    return "do_bench" in _autotune_params()


def cache_kwargs() -> dict[str, Any]:
    """The extra ``triton.autotune`` arguments: ``{"cache_results": True}`` when this
    Triton supports it and ``SENTINEL_AUTOTUNE_CACHE`` is not ``0``, else nothing."""
    if settings.autotune_cache() and _supports_cache_results():
        return {"cache_results": True}
    return {}


#: Candidates timed by :func:`bench_fn`'s ``do_bench`` in this process (see
#: :func:`candidates_timed`).
_timed = 0


def candidates_timed() -> int:
    """How many autotune candidates this process has timed so far through the
    autotuners made by :func:`autotune` (each ``do_bench`` call: one candidate of one key).
    A benchmark reads it before and after its timed region: a difference means the
    region paid for autotuning (a key first seen there), not only for its own work."""
    return _timed


def bench_fn() -> Any:
    """The ``do_bench`` the autotuners time candidates with: Triton's
    ``triton.testing.do_bench`` with the warm-up and timed lengths of
    ``SENTINEL_AUTOTUNE_BENCH_MS`` (read now); each call counts in
    :func:`candidates_timed`."""
    warmup, rep = settings.autotune_bench_ms()

    def do_bench(fn: Any, quantiles: Any = None) -> Any:
        global _timed
        _timed += 1
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)

    return do_bench


def autotune(configs: list[Any], key: list[str], **kwargs: Any) -> Any:
    """``triton.autotune(configs, key, **kwargs)`` plus :func:`cache_kwargs` and, unless
    given, ``do_bench=`` :func:`bench_fn` (both read when the autotuner is made: at import
    for the module-level ones)."""
    if _supports_do_bench():
        kwargs.setdefault("do_bench", bench_fn())
    return triton.autotune(configs, key=key, **kwargs, **cache_kwargs())

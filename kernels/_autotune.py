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
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import triton

from sentinel_kernels import settings


@functools.cache
def _supports_cache_results() -> bool:
    try:
        return "cache_results" in inspect.signature(triton.autotune).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False


def cache_kwargs() -> dict[str, Any]:
    """The extra ``triton.autotune`` arguments: ``{"cache_results": True}`` when this
    Triton supports it and ``SENTINEL_AUTOTUNE_CACHE`` is not ``0``, else nothing."""
    if settings.autotune_cache() and _supports_cache_results():
        return {"cache_results": True}
    return {}


def autotune(configs: list[Any], key: list[str], **kwargs: Any) -> Any:
    """``triton.autotune(configs, key, **kwargs)`` plus :func:`cache_kwargs` (read when the
    autotuner is made: at import for the module-level ones)."""
    return triton.autotune(configs, key=key, **kwargs, **cache_kwargs())

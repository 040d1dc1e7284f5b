"""Serving: the continuous-batching :class:`Engine` (this package) and, above it, the
OpenAI-compatible server.

``from sentinel_kernels.serve import Engine, SamplingParams``:

* :mod:`.engine`: :class:`Engine`, the scheduler thread (admission, chunked prefill, one
  decode step for all running requests);
* :mod:`.runner`: the model side (one slotted cache, prefill into a slot, the bucketed
  CUDA-graph decode step, per-row sampling);
* :mod:`.request`: :class:`RequestStream` (iterate, cancel, wait), :class:`Completion`,
  :class:`Timings` and the engine's errors;
* :mod:`.params`: :class:`SamplingParams`; :mod:`.detok`: incremental detokenization and
  stop strings.
"""

from __future__ import annotations

from .engine import Engine
from .params import SamplingParams
from .request import (
    Completion,
    EngineError,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
    Timings,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "EngineShutdownError",
    "QueueFullError",
    "RequestFailedError",
    "RequestStream",
    "SamplingParams",
    "Timings",
]

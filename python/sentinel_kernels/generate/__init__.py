"""Fast decoding: ``sk.generate`` (preallocated cache, CUDA-graph decode step, on-device
sampling). See :mod:`sentinel_kernels.generate.fast`.

The module is callable, so ``sk.generate(model, ids, ...)`` works whether ``sk.generate``
resolves to this module or to the function.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .fast import MAX_SESSIONS, STOP_CHECK_EVERY, clear_sessions, generate
from .sampling import filter_logits, sample_next

__all__ = [
    "MAX_SESSIONS",
    "STOP_CHECK_EVERY",
    "clear_sessions",
    "filter_logits",
    "generate",
    "sample_next",
]


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`generate`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

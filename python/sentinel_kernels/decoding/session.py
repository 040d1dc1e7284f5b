"""Decode sessions: what repeated :func:`sentinel_kernels.generate` calls on one model reuse.

A session is whatever a decode loop builds once and replays (a preallocated cache, static
input buffers, captured CUDA graphs): :mod:`.fast` and :mod:`.speculative` each define
theirs and keep it here, per model, under a key they choose. The key always includes the
model's :func:`fingerprint`, so a session is never replayed against other weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..patching.apply import patch_report

__all__ = ["MAX_SESSIONS", "SESSIONS_ATTR", "clear_sessions", "fingerprint", "get_session"]

#: Decode sessions (cache + captured graphs) kept per model, least recently used dropped
#: (each holds its cache and graph memory; ``clear_sessions(model)`` frees them).
MAX_SESSIONS = 8
#: Attribute of the model that holds its sessions (an ``OrderedDict``, oldest first).
SESSIONS_ATTR = "_sentinel_generate_sessions"

_lock = threading.Lock()
S = TypeVar("S")


def fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What a captured graph depends on: every parameter/buffer address, the attention
    implementation and the patch (a new :class:`~sentinel_kernels.PatchReport` per
    ``patch_model`` call, kept alive by the session so its id is not reused)."""
    ptrs = tuple(t.data_ptr() for t in model.parameters())
    ptrs += tuple(t.data_ptr() for t in model.buffers())
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (impl, id(patch_report(model)), ptrs)


def _sessions(model: nn.Module) -> OrderedDict[Any, Any]:
    store = getattr(model, SESSIONS_ATTR, None)
    if store is None:
        store = OrderedDict()
        # not a registered attribute of the module: keep it out of state_dict / modules
        object.__setattr__(model, SESSIONS_ATTR, store)
    return store


def get_session(model: nn.Module, key: tuple[Any, ...], build: Callable[[], S]) -> S:
    """The session of ``model`` under ``key``, built with ``build()`` when there is none
    (then the least recently used beyond :data:`MAX_SESSIONS` are dropped)."""
    with _lock:
        store = _sessions(model)
        sess = store.get(key)
        if sess is not None:
            store.move_to_end(key)
            return sess
    sess = build()
    with _lock:
        store[key] = sess
        while len(store) > MAX_SESSIONS:
            store.popitem(last=False)
    return sess


def clear_sessions(model: nn.Module) -> None:
    """Drop ``model``'s cached decode sessions (their caches and CUDA graphs)."""
    with _lock:
        if hasattr(model, SESSIONS_ATTR):
            getattr(model, SESSIONS_ATTR).clear()

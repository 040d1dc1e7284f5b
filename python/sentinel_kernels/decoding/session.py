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
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..patching.apply import patch_report

__all__ = [
    "MAX_SESSIONS",
    "SESSIONS_ATTR",
    "DecodeRequest",
    "capture_stream",
    "clear_sessions",
    "fingerprint",
    "get_session",
]

#: Decode sessions (cache + captured graphs) kept per model, least recently used dropped
#: (each holds its cache and graph memory; ``clear_sessions(model)`` frees them).
MAX_SESSIONS = 8
#: Attribute of the model that holds its sessions (an ``OrderedDict``, oldest first).
SESSIONS_ATTR = "_sentinel_generate_sessions"

_lock = threading.Lock()
S = TypeVar("S")
_capture_local = threading.local()


def capture_stream(device: torch.device | None = None) -> Any:
    """The side stream on which this thread captures the library's CUDA graphs on
    ``device`` (the current CUDA device if None), created on first use and reused by every
    capture (``sk.generate``'s steps, chunks and prefills, speculative decoding, the
    serving engine), as ``torch.cuda.graph`` does with its own default capture stream; one
    per thread, so that two threads' captures never share a stream. A fresh
    ``torch.cuda.Stream()`` per capture walks through PyTorch's pool of 32 streams, so an
    engine's ~50 captures would put work on all of them; one stream keeps the number of
    streams the process has used small. (An H100 probe found later graph replays ~14%
    slower once an engine had been built, ``scripts/generate_drift_probe.py``; whether
    the streams were the cause is not measured yet: its ``streams`` variant asks.)"""
    index = (
        device.index
        if device is not None and device.index is not None
        else torch.cuda.current_device()
    )
    streams: dict[int, Any] | None = getattr(_capture_local, "streams", None)
    if streams is None:
        streams = _capture_local.streams = {}
    stream = streams.get(index)
    if stream is None:
        stream = streams[index] = torch.cuda.Stream(device=index)
    return stream


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


@dataclass(frozen=True)
class DecodeRequest:
    """One ``sk.generate`` call as its decode loops (:func:`.fast.run`,
    :func:`.speculative.speculative_generate`) take it, after :mod:`.api` has checked it.

    Attributes:
        model: the causal LM, running the sentinel attention.
        ids: int64 ``[B, S]``, left-padded or unpadded (right padding already rolled).
        mask: ``[B, S]`` 0/1 or None (no padding).
        max_new: new tokens per row at most.
        sampling: the sampling rule, the keyword arguments of
            :func:`.sampling.sample_next` (``do_sample``, ``temperature``, ``top_k``,
            ``top_p``, ``generator``), which the drafters take too.
        eos: int64 ``[E]`` end-of-sequence ids on the device, or None (never stop early).
        pad_id: filler after a row's EOS.
        streamer: a transformers streamer (``put``/``end``) or None.
        spec: the KV cache format (a :func:`sentinel_kernels.kv_cache` spec).
        padded: whether ``mask`` has zeros; None: computed when asked (one host sync).
        shown_prompt: what the streamer gets as the prompt (default ``ids``).
    """

    model: nn.Module
    ids: torch.Tensor
    mask: torch.Tensor | None
    max_new: int
    sampling: dict[str, Any]
    eos: torch.Tensor | None
    pad_id: int
    streamer: Any
    spec: str
    padded: bool | None = None
    shown_prompt: torch.Tensor | None = None

    def is_padded(self) -> bool:
        """Whether ``mask`` has zeros (padded batches need the key mask)."""
        if self.padded is not None:
            return self.padded
        # One host sync per call, before any decoding.
        return self.mask is not None and not bool((self.mask != 0).all())

    def positions(self, device: torch.device) -> torch.Tensor:
        """int64 ``[B, S]`` prompt positions, transformers' rule: ``cumsum(mask) - 1``,
        0 on pads; ``0 .. S - 1`` without a mask."""
        if self.mask is None:
            batch, prompt = self.ids.shape
            return torch.arange(prompt, device=device)[None].expand(batch, -1)
        return (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)

    def stream_prompt(self) -> None:
        """Give the streamer (if any) the prompt (a host copy)."""
        if self.streamer is not None:
            prompt = self.ids if self.shown_prompt is None else self.shown_prompt
            self.streamer.put(prompt.cpu())

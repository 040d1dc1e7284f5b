"""The server's result cache: an LRU of final completions of deterministic requests.

A request is deterministic when it is greedy (temperature 0) or carries a seed (the
engine's samples then depend only on the seed, not on the batch). Its key is everything
that changes the output with the defaults made explicit: model name, patch level, KV cache
format, the prompt's token ids and every sampling field (:class:`~.params.SamplingParams`
after validation). Hits and misses are counted (``/metrics``); ``size=0`` turns it off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from .params import SamplingParams
from .request import Completion

__all__ = ["ResultCache", "cache_key"]


def cache_key(
    model: str, level: int, setting: str, prompt_ids: Sequence[int], params: SamplingParams
) -> Hashable:
    """The result-cache key of a request (every output-changing field, explicit; ``setting``:
    the engine's cache format and kNN-LM, ``Engine.output_setting``)."""
    return (
        model,
        level,
        setting,
        tuple(prompt_ids),
        params.max_tokens,
        params.temperature,
        params.top_p,
        params.top_k,
        params.seed,
        tuple(params.stop),
        tuple(params.stop_token_ids),
        params.ignore_eos,
        params.logprobs,
    )


class ResultCache:
    """Thread-safe LRU of :class:`~.request.Completion` by :func:`cache_key`."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"result cache size must be an int >= 0, got {size!r}")
        self.size = size
        self._items: OrderedDict[Hashable, Completion] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """Whether it holds anything at all (``size > 0``)."""
        return self.size > 0

    def get(self, key: Hashable) -> Completion | None:
        """The cached completion (most recently used now), or None (a miss)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return hit

    def put(self, key: Hashable, value: Completion) -> None:
        """Store ``value``; the least recently used entry goes beyond ``size``."""
        if not self.enabled:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

"""An LRU cache of k-NN results keyed on the exact query.

The search is deterministic, so a query seen before (bit for bit) has the same neighbours:
re-scoring a text, a prompt shared by several requests, or several sampled continuations
of one prompt (their first steps see identical hidden states) skip the search. The key is
``(k, dtype, the query row's bytes)``: reading the bytes is a host copy of the query, so
the cache serves the host-side API (:meth:`Datastore.search
<sentinel_kernels.knn.datastore.Datastore.search>`, CPU decoding and evaluation), never a
CUDA-graph decode step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import torch

__all__ = ["CacheInfo", "KnnCache"]


class CacheInfo(NamedTuple):
    """Counters of a :class:`KnnCache` (``functools.lru_cache`` style)."""

    hits: int
    misses: int
    size: int
    maxsize: int


class KnnCache:
    """LRU map ``(k, query bytes) -> (distances [k], indices [k])``; thread-safe.

    Args:
        maxsize: entries kept (least recently used dropped first); 0 disables the cache
            (every lookup is a miss and nothing is stored).

    Raises:
        ValueError: ``maxsize < 0``.
    """

    def __init__(self, maxsize: int = 4096) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"cache size must be an int >= 0; got {maxsize!r}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[int, str, bytes], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    @staticmethod
    def keys_of(queries: torch.Tensor, k: int) -> list[tuple[int, str, bytes]]:
        """The cache keys of the rows of ``queries`` ``[B, D]`` (one host copy)."""
        host = queries.detach().contiguous().cpu()
        dtype = str(host.dtype)
        raw = host.view(torch.uint8).numpy() if host.dtype != torch.bfloat16 else None
        if raw is None:  # numpy has no bfloat16: view the bits as int16
            raw = host.view(torch.int16).numpy().view("uint8")
        return [(k, dtype, raw[i].tobytes()) for i in range(host.shape[0])]

    def get(self, key: tuple[int, str, bytes]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored result of ``key`` (counted as a hit) or None (a miss)."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return hit

    def put(self, key: tuple[int, str, bytes], value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Store ``value`` under ``key`` (dropping the least recently used beyond
        ``maxsize``)."""
        if self.maxsize == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def info(self) -> CacheInfo:
        """``CacheInfo(hits, misses, size, maxsize)``."""
        with self._lock:
            return CacheInfo(self.hits, self.misses, len(self._data), self.maxsize)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self.hits = 0
            self.misses = 0

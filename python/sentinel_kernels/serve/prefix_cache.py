"""The engine's prefix cache: prompts that start like an earlier prompt reuse its KV.

A new request whose prompt begins with a prefix computed before (a shared system prompt,
the history of a chat) copies that prefix's keys and values from a *prefix row* of the
engine's cache instead of recomputing them, and prefills only the rest. Prefixes are kept
at a granularity of ``block`` tokens: a prompt of ``n`` tokens is stored as its first
``block * floor(n / block)`` tokens, and a lookup finds the longest stored block-aligned
prefix of the new prompt that leaves at least one token to prefill (the last token's
logits are needed). Rows are evicted least recently used first.

The index is a chain of hashes, one per block boundary (``h_k = hash((h_{k-1}, block_k))``),
so a lookup costs one hash per block; a hit is confirmed against the stored tokens before
it is used, so a hash collision can never hand out another prompt's KV. The idea is vLLM's
automatic prefix caching and SGLang's RadixAttention, reduced to whole rows (one stored
prefix per row) because the engine's cache is slotted, not paged.

This class is bookkeeping only (host lists and dicts); the engine's model runner copies
the KV (:meth:`~.runner.ModelRunner.load_prefix`, :meth:`~.runner.ModelRunner.store_prefix`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["PrefixCache"]


class PrefixCache:
    """LRU over stored prompt prefixes, one per row of ``rows``.

    Args:
        rows: the cache rows that hold prefixes (each up to ``max_tokens`` positions).
        block: the granularity in tokens (>= 1).
        max_tokens: the longest prefix a row can hold.

    Raises:
        ValueError: no rows, ``block < 1`` or ``max_tokens < block``.
    """

    def __init__(self, rows: Sequence[int], block: int, max_tokens: int) -> None:
        if not rows:
            raise ValueError("PrefixCache needs at least one row")
        if block < 1 or max_tokens < block:
            raise ValueError(f"PrefixCache: block {block} must be in [1, max_tokens={max_tokens}]")
        self.block = block
        self.max_tokens = max_tokens
        self._free = list(rows)
        self._lru: OrderedDict[int, list[int]] = OrderedDict()  # row -> its tokens
        self._hashes: dict[int, list[int]] = {}  # row -> the chain hashes it indexes
        self._index: dict[int, int] = {}  # chain hash -> row
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0
        self.evictions = 0

    def _chain(self, tokens: Sequence[int], blocks: int) -> list[int]:
        out, h, b = [], 0, self.block
        for i in range(blocks):
            h = hash((h, tuple(tokens[i * b : (i + 1) * b])))
            out.append(h)
        return out

    def lookup(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """The row and length ``n`` (a multiple of ``block``, ``n < len(tokens)``) of the
        longest stored prefix of ``tokens``, or None; counts a hit or a miss."""
        blocks = min(len(tokens) - 1, self.max_tokens) // self.block
        for k, h in reversed(list(enumerate(self._chain(tokens, blocks), start=1))):
            row = self._index.get(h)
            n = k * self.block
            if row is not None and self._lru[row][:n] == list(tokens[:n]):
                self._lru.move_to_end(row)
                self.hits += 1
                self.hit_tokens += n
                return row, n
        self.misses += 1
        return None

    def insert(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """Make room for the block-aligned prefix of ``tokens``: the row to copy its first
        ``n`` positions into, and ``n``; None when it is too short or already stored (then
        its row just becomes the most recently used)."""
        n = min(len(tokens), self.max_tokens) // self.block * self.block
        if n == 0:
            return None
        chain = self._chain(tokens, n // self.block)
        row = self._index.get(chain[-1])
        if row is not None and self._lru[row][:n] == list(tokens[:n]):
            self._lru.move_to_end(row)
            return None
        if self._free:
            row = self._free.pop()
        else:
            row, _ = self._lru.popitem(last=False)
            self.evictions += 1
            for h in self._hashes.pop(row):
                if self._index.get(h) == row:
                    del self._index[h]
        self._lru[row] = list(tokens[:n])
        self._hashes[row] = chain
        for h in chain:
            self._index[h] = row
        return row, n

    def stats(self) -> dict[str, int]:
        """``hits``, ``misses``, ``hit_tokens`` (prompt tokens not recomputed), ``stored``
        (prefixes held), ``stored_tokens``, ``evictions``, ``capacity`` (rows)."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_tokens": self.hit_tokens,
            "stored": len(self._lru),
            "stored_tokens": sum(len(t) for t in self._lru.values()),
            "evictions": self.evictions,
            "capacity": len(self._lru) + len(self._free),
        }

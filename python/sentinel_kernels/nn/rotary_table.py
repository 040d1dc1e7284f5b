"""Rotary cos/sin by table lookup: one gather a forward instead of transformers' ~9 kernels.

A transformers rotary embedding module (``LlamaRotaryEmbedding`` and its copies) computes,
in every forward (every decode step), for each position ``p`` and channel ``i``::

    freq = float(p) * inv_freq[i % (D / 2)]                              (fp32)
    cos[p, i] = round_dtype(cos(freq) * attention_scaling)
    sin[p, i] = round_dtype(sin(freq) * attention_scaling)

as 8 to 10 small kernels (position cast, product or K = 1 matmul, concatenation, cos, sin,
two scalings, two casts): at batch 1 on an H200 about 2 us each, a few percent of a small
model's whole decode step. Each output element depends on its own position only, so a table
of ``[n, 2, D]`` built once by calling the module's own forward on positions ``0 .. n-1``
holds the same bits, and a forward becomes one gather (``F.embedding``) from it; ``cos`` and
``sin`` are views of the gathered ``[B, T, 2D]`` rows.

:class:`RotaryTable` wraps such a module (the ``fused_layers`` option installs it). It reads
the table only inside :func:`rotary_table_scope` ``(n)``, where the caller guarantees every
position is below ``n`` (``sk.generate``: its cache capacity; the serving engine: its
``max_seq_len``). Everywhere else the wrapped module's own forward runs: a position past the
table would read out of bounds on the device, and checking the positions would cost a host
sync per step. Only static rotary embeddings are wrapped (``rope_type`` not dynamic or
longrope, whose frequencies change with the sequence length); 2-D ``position_ids`` only.

Tables are built outside CUDA graph capture (a capture that meets no table runs the module's
own forward) and are never freed while the wrapper lives: a captured graph keeps reading the
table it recorded, so a larger table is added beside it, its length rounded up to a power of
two (at most ``log2`` tables per device and dtype).

The idea is the ``cos_sin_cache`` of vLLM's and FlashInfer's rotary kernels.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RotaryTable", "rotary_table_factory", "rotary_table_scope", "table_limit"]

#: Shortest table built (positions); longer ones round up to a power of two.
MIN_TABLE = 4096

_local = threading.local()


def table_limit() -> int:
    """The position bound of the innermost :func:`rotary_table_scope` on this thread (0:
    none, the wrapped modules run their own forward)."""
    return getattr(_local, "limit", 0)


@contextlib.contextmanager
def rotary_table_scope(max_positions: int) -> Iterator[None]:
    """Within the block, on this thread, :class:`RotaryTable` modules answer from their
    tables for forwards whose positions are all below ``max_positions`` (the caller's
    promise: ``sk.generate`` passes its cache capacity, the engine its ``max_seq_len``).

    Raises:
        ValueError: ``max_positions`` is not an int >= 1.
    """
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ValueError(
            f"rotary_table_scope: max_positions must be an int >= 1, got {max_positions!r}"
        )
    previous = table_limit()
    _local.limit = max_positions
    try:
        yield
    finally:
        _local.limit = previous


class RotaryTable(nn.Module):
    """A static rotary embedding module answering from a cos/sin table (see the module
    docstring). ``forward(x, position_ids) -> (cos, sin)``, each ``[B, T, D]`` of
    ``x.dtype``, bit for bit the wrapped module's result."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        # (device, dtype) -> [n, 2D] tables, longest last; earlier ones stay alive for the
        # CUDA graphs that recorded them.
        self._tables: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        limit = table_limit()
        if (
            limit == 0
            or position_ids.dim() != 2
            or position_ids.dtype not in (torch.int32, torch.int64)
        ):
            return self.inner(x, position_ids)
        table = self._table(x, limit)
        if table is None:
            return self.inner(x, position_ids)
        if position_ids.device != table.device:
            position_ids = position_ids.to(table.device)
        rows = F.embedding(position_ids, table)
        d = table.shape[1] // 2
        return rows[..., :d], rows[..., d:]

    def _table(self, x: torch.Tensor, limit: int) -> torch.Tensor | None:
        key = (x.device, x.dtype)
        tables = self._tables.get(key)
        if tables and tables[-1].shape[0] >= limit:
            return tables[-1]
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None  # its memory would belong to the graph's pool
        n = max(MIN_TABLE, 1 << (limit - 1).bit_length())
        with torch.inference_mode(False), torch.no_grad():
            # n rows of one position each: a decode step's shape. transformers' matmul
            # form (5.1x) then multiplies each frequency by its position in a batched
            # [D/2, 1] x [1, 1] product as in decoding, not in one [D/2, 1] x [1, n]
            # GEMM that cuBLAS may run in TF32 when a user allows it.
            pos = torch.arange(n, device=x.device)[:, None]
            probe = torch.empty(0, device=x.device, dtype=x.dtype)
            cos, sin = self.inner(probe, pos)
            table = torch.cat((cos[:, 0], sin[:, 0]), dim=-1).contiguous()
        self._tables.setdefault(key, []).append(table)
        return table

    def extra_repr(self) -> str:
        sizes = {
            f"{d}/{str(t).removeprefix('torch.')}": v[-1].shape[0]
            for (d, t), v in self._tables.items()
        }
        return f"tables={sizes}" if sizes else "no table yet"


_DYNAMIC = ("dynamic", "longrope")


def rotary_table_factory(module: nn.Module) -> nn.Module | None:
    """A :class:`RotaryTable` around ``module`` when it is a static transformers rotary
    embedding (class name ending in ``RotaryEmbedding``, an ``inv_freq`` buffer, a string
    ``rope_type`` that is not dynamic or longrope, ``forward(x, position_ids)``), else
    ``None`` (the module stays as it is)."""
    if not type(module).__name__.endswith("RotaryEmbedding") or isinstance(module, RotaryTable):
        return None
    if not isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        return None
    rope_type = getattr(module, "rope_type", None)
    if not isinstance(rope_type, str) or any(t in rope_type for t in _DYNAMIC):
        return None
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    if params != ["x", "position_ids"]:
        return None
    return RotaryTable(module)

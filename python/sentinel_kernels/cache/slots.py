"""Rows of one preallocated cache used as independent slots (continuous batching).

A continuous-batching engine (:mod:`sentinel_kernels.serve`) keeps one
:class:`~.cache.SentinelKVCache` of ``max_slots`` rows and gives each request a row. Two
things make that work without copying or reallocating anything:

* :func:`row_view`: a :class:`~.cache.SentinelKVCache` over rows ``[start, stop)`` of
  another one, whose storage tensors are views (slices along the batch dimension of
  contiguous tensors, so still contiguous): a prefill of one request runs the model at
  batch 1 over its row, and a decode step over the first ``n`` rows runs at batch ``n``,
  both writing into the shared storage. Every format (dense, INT8, INT4/KIVI, low rank)
  works the same, since a row is a row whatever its codes are.
* :func:`stack_lengths`: every layer's per-row length counter (``cache_lens``, int32
  ``[B]``) becomes a row of one ``[num_layers, B]`` tensor, so that setting or clearing a
  slot's length in all layers is one tensor operation (no per-layer loop on the host).

Each view has its own host-side counters (``seq_length``: tokens written, what the
attention uses to tell a prefill from a decode step); the engine sets them with
:func:`set_host_length` before each forward, as the rows of one view may be at different
positions (the device lengths are the truth; the host count only has to be 0 for a
prefill into an empty row and > 0 otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from .cache import SentinelKVCache
from .contract import SlotMaskMemo
from .layer import SentinelKVLayer

__all__ = [
    "copy_rows",
    "copy_span",
    "gather_row",
    "move_rows",
    "row_view",
    "set_host_length",
    "stack_lengths",
]

#: The per-row tensors of a :class:`SentinelKVLayer` (batch is their first dimension).
_ROW_TENSORS = ("k_store", "v_store", "k_scale", "v_scale", "k_recent", "v_recent", "cache_lens")


def stack_lengths(cache: SentinelKVCache) -> torch.Tensor:
    """Put every layer's ``cache_lens`` into one int32 ``[num_layers, B]`` tensor.

    Returns the table; layer ``i`` then reads and advances row ``i`` of it (a view), so
    ``table[:, b] = n`` sets slot ``b``'s length in every layer at once. Call it before
    making :func:`row_view` views (they slice the layers' current tensors).
    """
    layers: list[SentinelKVLayer] = list(cache._layers)
    table = torch.stack([layer.cache_lens for layer in layers]).contiguous()
    for i, layer in enumerate(layers):
        layer.cache_lens = table[i]
        layer.compressed = layer._compressed()
    return table


def row_view(cache: SentinelKVCache, start: int, stop: int) -> SentinelKVCache:
    """A cache over rows ``[start, stop)`` of ``cache`` that shares its storage.

    Writes through the view land in ``cache``'s tensors; the view's host counters start
    at 0. A slot key mask set on ``cache`` (:meth:`~.cache.SentinelKVCache.set_static_key_mask`)
    is shared too: the view reads rows ``[start, stop)`` of it.

    Raises:
        ValueError: the row range is empty or outside ``[0, cache.batch_size]``.
    """
    batch = cache.batch_size
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= batch):
        raise ValueError(f"row_view: rows [{start}, {stop}) of a {batch}-row cache")
    memo: SlotMaskMemo = {}
    views: list[SentinelKVLayer] = []
    for layer in cache._layers:
        view = copy.copy(layer)
        for name in _ROW_TENSORS:
            t = getattr(layer, name)
            if t is not None:
                setattr(view, name, t[start:stop])
        view.batch_size = stop - start
        view.seq_length = 0
        if layer.static_key_mask is not None:
            view.static_key_mask = layer.static_key_mask[start:stop]
        view.last_read = None
        view.segment_starts = None
        view.destinations = None
        view.key_mask_memo = memo
        view.compressed = view._compressed()
        views.append(view)
    return SentinelKVCache(views, cache.spec)


def set_host_length(cache: SentinelKVCache, n: int) -> None:
    """Set every layer's host count of written tokens to ``n`` and forget the last read
    (the device lengths are not touched). ``0`` makes the next chunk a prefill that
    attends over its own keys; ``> 0`` makes it read the stored past."""
    cache._last_read = None
    for layer in cache._layers:
        layer.seq_length = n
        layer.last_read = None


def _first_positions(cache: SentinelKVCache, n: int) -> Iterator[torch.Tensor]:
    """Every storage tensor of every layer, cut to what a row's first ``n`` positions
    occupy (all rows): slots ``[0, n)`` of the codes and per-token scales, key blocks
    ``[0, ceil(n / T))`` of KIVI key scales, and the whole full-precision ring."""
    for layer in cache._layers:
        blocks = -(-n // layer.key_block) if layer.key_block else n
        for name, upto in (
            ("k_store", n),
            ("v_store", n),
            ("k_scale", blocks),
            ("v_scale", n),
            ("k_recent", None),
            ("v_recent", None),
        ):
            t = getattr(layer, name)
            if t is not None:
                yield t if upto is None else t[:, :, :upto]


def _device_rows(rows: list[int], device: torch.device) -> torch.Tensor:
    """``rows`` as an int64 tensor on ``device``, copied without a host sync: from pinned
    memory, as a non-blocking copy (a plain ``torch.tensor(..., device=cuda)`` waits for
    the stream, which stalls a serving loop that keeps the GPU a step ahead)."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_rows(cache: SentinelKVCache, src: int, dst: list[int] | torch.Tensor, n: int) -> None:
    """Copy the first ``n`` positions of rows ``src, src + 1, ...`` to rows ``dst`` (every
    layer, every storage tensor; device lengths and masks are the caller's).

    What a row's first ``n`` positions occupy: slots ``[0, n)`` of the codes and per-token
    scales, key blocks ``[0, ceil(n / T))`` of KIVI key scales, and the whole
    full-precision ring (it holds the last positions). Rows must not overlap.

    ``dst`` is a list of row numbers, or an int64 tensor of them on the cache's device
    (CUDA-graph capturable: no host read; its values are the caller's to check, and
    repeated destinations get one of the rows written to them).

    Raises:
        ValueError: rows out of range, overlapping, or ``n`` beyond the capacity.
    """
    batch = cache.batch_size
    first = cache._layers[0]
    if isinstance(dst, torch.Tensor):
        k = dst.shape[0]
        if dst.dim() != 1 or dst.dtype != torch.int64 or not 0 <= src <= src + k <= batch:
            raise ValueError(
                f"copy_rows: dst must be a 1-D int64 tensor of at most {batch - src} rows, got "
                f"{dst.dtype} {tuple(dst.shape)}"
            )
    else:
        k = len(dst)
        if not (0 <= src and src + k <= batch and all(0 <= d < batch for d in dst)):
            raise ValueError(
                f"copy_rows: rows {src}..{src + k - 1} -> {dst} of a {batch}-row cache"
            )
        if set(dst) & set(range(src, src + k)) or len(set(dst)) != k:
            raise ValueError("copy_rows: source and destination rows overlap or repeat")
    if not 0 <= n <= first.capacity:
        raise ValueError(f"copy_rows: {n} positions, capacity {first.capacity}")
    idx = dst if isinstance(dst, torch.Tensor) else _device_rows(dst, first.cache_lens.device)
    for dst_view in _first_positions(cache, n):
        rows = dst_view[src : src + k]
        if dst_view.is_contiguous():
            # torch refuses a source that is a slice of the contiguous destination,
            # though the rows written and read differ: copy it out first.
            rows = rows.clone()
        dst_view.index_copy_(0, idx, rows)


def move_rows(cache: SentinelKVCache, src: list[int], dst: list[int], n: int) -> None:
    """Copy the first ``n`` positions of each row ``src[i]`` to row ``dst[i]`` (every layer,
    every storage tensor, as :func:`copy_rows` counts them; device lengths and masks are
    the caller's). Unlike :func:`copy_rows` the source rows need not be consecutive: this
    is how an engine moves running requests to lower free slots so that its decode steps
    use a smaller batch bucket. Two kernels per storage tensor (``index_select`` copies
    the sources out, then ``index_copy_``), whatever the number of rows.

    Raises:
        ValueError: rows out of range, ``src`` and ``dst`` of different lengths, a row in
            both, a row repeated, or ``n`` beyond the capacity.
    """
    batch = cache.batch_size
    first = cache._layers[0]
    if len(src) != len(dst) or not all(0 <= r < batch for r in (*src, *dst)):
        raise ValueError(f"move_rows: rows {src} -> {dst} of a {batch}-row cache")
    if set(src) & set(dst) or len(set(src)) != len(src) or len(set(dst)) != len(dst):
        raise ValueError(f"move_rows: rows {src} -> {dst} overlap or repeat")
    if not 0 <= n <= first.capacity:
        raise ValueError(f"move_rows: {n} positions, capacity {first.capacity}")
    if not src:
        return
    device = first.cache_lens.device
    src_idx, dst_idx = _device_rows(src, device), _device_rows(dst, device)
    for view in _first_positions(cache, n):
        view.index_copy_(0, dst_idx, view.index_select(0, src_idx))


def gather_row(cache: SentinelKVCache, src: torch.Tensor, dst: int, n: int) -> None:
    """Copy the first ``n`` positions of row ``src[0]`` to row ``dst`` (every layer, every
    storage tensor, as :func:`copy_rows` counts them; device lengths and masks are the
    caller's): the reverse of :func:`copy_rows` with the source row on the device.

    ``src`` is an int64 ``[1]`` tensor on the cache's device (CUDA-graph capturable: no
    host read; its value is the caller's to check). ``src[0] == dst`` leaves the row as
    it is.

    Raises:
        ValueError: ``dst`` out of range, ``src`` not an int64 ``[1]`` tensor, or ``n``
            beyond the capacity.
    """
    batch = cache.batch_size
    first = cache._layers[0]
    if not 0 <= dst < batch:
        raise ValueError(f"gather_row: row {dst} of a {batch}-row cache")
    if src.shape != (1,) or src.dtype != torch.int64:
        raise ValueError(
            f"gather_row: src must be an int64 tensor of shape (1,), got {src.dtype} "
            f"{tuple(src.shape)}"
        )
    if not 0 <= n <= first.capacity:
        raise ValueError(f"gather_row: {n} positions, capacity {first.capacity}")
    for view in _first_positions(cache, n):
        # index_select copies the source row out first, so src == dst is harmless
        view[dst : dst + 1].copy_(view.index_select(0, src))


def _position_stores(cache: SentinelKVCache, op: str) -> list[torch.Tensor]:
    """Every layer's codes and per-token scales ``[B, H, L, ...]``, for the formats that
    store each position alone (dense, INT8, INT4 without a ring): what moves with a
    position. Raises ValueError naming ``op`` for KIVI key blocks, a ring or latents."""
    out = []
    for layer in cache._layers:
        if layer.key_block or layer.k_recent is not None or layer.latent is not None:
            raise ValueError(f"{op}: only for formats that store each position alone")
        for name in ("k_store", "v_store", "k_scale", "v_scale"):
            t = getattr(layer, name)
            if t is not None:
                out.append(t)
    return out


def copy_span(cache: SentinelKVCache, src: int, start: int, dst: int, n: int) -> None:
    """Copy positions ``[start, start + n)`` of row ``src`` to positions ``[0, n)`` of row
    ``dst`` (every layer; device lengths and masks are the caller's). For the formats that
    store each position on its own (dense, INT8 with per-token scales): KIVI's key blocks
    and full-precision ring, and low-rank latents, do not move with a position.

    Raises:
        ValueError: rows or positions out of range, the same row, or a format with key
            blocks or a ring.
    """
    batch = cache.batch_size
    first = cache._layers[0]
    if not (0 <= src < batch and 0 <= dst < batch and src != dst):
        raise ValueError(f"copy_span: rows {src} -> {dst} of a {batch}-row cache")
    if not (0 <= start and 0 <= n and start + n <= first.capacity):
        raise ValueError(f"copy_span: positions [{start}, {start + n}), capacity {first.capacity}")
    for t in _position_stores(cache, "copy_span"):
        t[dst, :, :n].copy_(t[src, :, start : start + n])

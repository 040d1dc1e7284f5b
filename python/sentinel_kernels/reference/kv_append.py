"""Reference KV append: write new keys / values into a preallocated cache in place.

The storage formats, slots, rings and KIVI key blocks are those of
:mod:`sentinel_kernels.reference.kv_formats`; every backend of ``sentinel::kv_append``,
``sentinel::kv_append_key_blocks`` and ``sentinel::rope_kv_append`` writes the same codes
and scales bit for bit.
"""

from __future__ import annotations

import torch

from .fused import rotary_embedding
from .kv_formats import quantize_key_block, quantize_kv

__all__ = ["kv_append", "kv_append_key_blocks", "rope_kv_append"]


def kv_append_key_blocks(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    ring: torch.Tensor,
    start: torch.Tensor,
    block: int,
) -> None:
    """Append keys ``x [B, H, S, D]`` to a KIVI key cache (:mod:`.kv_formats`) in place.

    For each row ``b``, every block completed by positions ``start[b] .. start[b] + S - 1``
    is quantized per channel (its earlier positions read from ``ring``, slot ``j % W``)
    into ``codes [B, H, L, ceil(D/2)]`` and ``scales [B, H, L / T, D, 2]`` (blocks past
    ``L`` are skipped); then the new keys are written to ``ring [B, H, W, D]`` (only the
    last ``W`` when ``S > W``). The blocks are quantized before the ring is written: a
    long chunk would otherwise overwrite the ring slots of its first block's older keys.
    """
    b, h, s, d = x.shape
    cap = codes.shape[2]
    w = ring.shape[2]
    xr = x.to(ring.dtype)
    for bi in range(b):
        st = int(start[bi])
        end = st + s
        for blk in range(st // block, end // block):
            lo = blk * block
            if lo + block > cap:
                break
            rows = []
            for j in range(lo, lo + block):
                rows.append(ring[bi, :, j % w] if j < st else xr[bi, :, j - st])
            c, sc = quantize_key_block(torch.stack(rows, dim=1))
            codes[bi, :, lo : lo + block] = c
            scales[bi, :, blk] = sc
        for j in range(max(st, end - w), end):
            ring[bi, :, j % w] = xr[bi, :, j - st]


def kv_append(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str = "dense",
    scales: torch.Tensor | None = None,
    wrap: bool = False,
    rows: torch.Tensor | None = None,
) -> None:
    """Write ``x [B, H, S, D]`` into ``cache`` (and ``scales``) in place.

    Token ``i`` of row ``b`` goes to position ``start[b] + i``: slot ``start[b] + i`` (must
    be ``< L``; slots past the end are not written) or, with ``wrap``, slot
    ``(start[b] + i) % L``. When ``S > L`` with ``wrap`` only the last ``L`` tokens land.
    The slot is in cache row ``b``, or with ``rows`` (int ``[B]``) in cache row
    ``rows[b]`` of the ``Bc = cache.shape[0]`` rows (a ``rows[b]`` outside ``[0, Bc)``
    is not written). Batch rows run in order, so where two write one (row, slot) the
    later one stays.
    """
    b, h, s, d = x.shape
    cap = cache.shape[2]
    n_rows = cache.shape[0]
    if kv_format == "dense":
        codes, sc = x.to(cache.dtype), None
    else:
        if scales is None:
            raise ValueError(f"a {kv_format} cache needs its scales")
        n = scales.shape[-1] if kv_format == "int8" else scales.shape[-2]
        codes, sc = quantize_kv(x, kv_format, n)
    for bi in range(b):
        ri = bi
        if rows is not None:
            ri = int(rows[bi])
            if not 0 <= ri < n_rows:
                continue
        st = int(start[bi])
        for i in range(s):
            pos = st + i
            if wrap:
                if s - i > cap:  # overwritten later in this same append
                    continue
                slot = pos % cap
            elif pos >= cap:
                continue
            else:
                slot = pos
            cache[ri, :, slot] = codes[bi, :, i]
            if sc is not None and scales is not None:
                scales[ri, :, slot] = sc[bi, :, i]


def rope_kv_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    kv_format: str = "dense",
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    wrap: bool = False,
) -> torch.Tensor:
    """Rotate q and k, append the rotated keys and ``v``, advance ``lens``; return q rotated.

    The composition the fused ``sentinel::rope_kv_append`` reproduces bit for bit::

        q_out, k_rot = rotary_embedding(q, k, cos, sin)     # x cos + rotate_half(x) sin
        kv_append(k_rot, k_cache, lens, kv_format, k_scales, wrap)
        kv_append(v, v_cache, lens, kv_format, v_scales, wrap)
        lens += S

    Args: q ``[B, Hq, S, D]``, k and v ``[B, Hkv, S, D]``, cos/sin as
    :func:`~.fused.rotary_embedding` takes them, the caches, scales, ``kv_format`` and
    ``wrap`` as :func:`kv_append` (``lens`` is its ``start``, ``[B]`` int, advanced in
    place). Returns ``q_out``, contiguous ``[B, Hq, S, D]`` of q's dtype.
    """
    q_out, k_rot = rotary_embedding(q, k, cos, sin)
    kv_append(k_rot, k_cache, lens, kv_format, k_scales, wrap)
    kv_append(v, v_cache, lens, kv_format, v_scales, wrap)
    lens += q.shape[2]
    return q_out

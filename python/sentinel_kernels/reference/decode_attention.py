"""Reference decode attention over a KV cache of any format (the one decode oracle).

The rule every backend of ``sentinel::decode_attention`` follows. ``Sq`` new queries per
row (their keys already appended) attend to the positions ``j < len_b = cache_lens[b]``
of a cache in one of the formats of :mod:`sentinel_kernels.reference.kv_formats`
(dense, int8 / int4 with group scales, KIVI keys with ``key_block``; optionally a
wrapping ring and a full-precision recent ring)::

    k_j, v_j   the vector position j reads: from the recent ring when it holds j
               (j >= len_b - W, or j >= floor(len_b / T) * T for KIVI), else the
               dequantized store at slot j (slot j % L when wrapping; a wrapping cache
               can read only j >= len_b - L)
    p_t = len_b - Sq + t                              (position of query t)
    out[b, h, t] = :func:`sentinel_kernels.reference.attention.attention` of query t
                   over the readable k_j, v_j, causal (j <= p_t), with the key padding
                   mask attn_mask [B, L] indexed by slot and the sliding window

A plain dense cache (no rings, no wrap) is exactly the prefill rule with ``cache_lens``.
Sums and the softmax run in fp32 (fp64 for fp64 q); the output is rounded once to q's dtype.
"""

from __future__ import annotations

import math

import torch

from .attention import attention
from .kv_append import rope_kv_append
from .kv_formats import dequantize_key_block, dequantize_kv

__all__ = ["decode_attention"]


def _logical_vectors(
    store: torch.Tensor,
    scales: torch.Tensor | None,
    recent: torch.Tensor | None,
    kv_format: str,
    d: int,
    lens: list[int],
    wrap: bool,
    npos: int,
    key_block: int = 0,
    per_channel: bool = False,
) -> torch.Tensor:
    """fp32 ``[B, H, npos, D]``: the vector each position reads (0 where unreadable).

    ``key_block > 0`` (a KIVI cache): the ring holds positions ``>= floor(len / T) * T``
    (keys and values alike); ``per_channel``: ``store``/``scales`` are KIVI keys
    (per-channel scales per block of ``T`` slots), else per-token as usual.
    """
    b, h, cap = store.shape[0], store.shape[1], store.shape[2]
    if kv_format == "dense":
        full = store.float()
    elif scales is None:
        raise ValueError(f"a {kv_format} cache needs its scales")
    elif per_channel:
        nb = cap // key_block
        blocks = store.view(b, h, nb, key_block, store.shape[3])
        full = dequantize_key_block(blocks, scales, d).reshape(b, h, cap, d)
    else:
        full = dequantize_kv(store, scales, kv_format, d)
    out = torch.zeros(b, h, npos, d, dtype=torch.float32, device=store.device)
    w = recent.shape[2] if recent is not None else 0
    for bi in range(b):
        ring_from = (lens[bi] // key_block) * key_block if key_block else lens[bi] - w
        for j in range(min(lens[bi], npos)):
            if recent is not None and w and j >= ring_from:
                out[bi, :, j] = recent[bi, :, j % w].float()
            elif wrap:
                if j >= lens[bi] - cap:
                    out[bi, :, j] = full[bi, :, j % cap]
            elif j < cap:
                out[bi, :, j] = full[bi, :, j]
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    kv_format: str = "dense",
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_recent: torch.Tensor | None = None,
    v_recent: torch.Tensor | None = None,
    wrap: bool = False,
    key_block: int = 0,
) -> torch.Tensor:
    """Decode attention over a (compressed, possibly wrapping) cache: the module's rule.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k_cache, v_cache: ``[B, Hkv, L, D]`` in q's dtype (``"dense"``), int8 codes
            ``[B, Hkv, L, D]`` (``"int8"``) or packed uint8 ``[B, Hkv, L, ceil(D/2)]``
            (``"int4"``).
        cache_lens: ``[B]`` positions written so far per row (may exceed ``L`` with
            ``wrap``).
        head_mask: ``[Hq]`` or ``[B, Hq]``, zero = pruned head (output 0).
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        attn_mask: key padding mask ``[B, L]`` by slot, nonzero = attend.
        scale: softmax scale, default ``1/sqrt(D)``. window: sliding window, 0 = none.
        k_scale, v_scale: the group scales of the format (:mod:`.kv_formats`); with
            ``key_block = T > 0`` (KIVI, int4 only) ``k_scale`` is ``[B, Hkv, L / T, D, 2]``
            and positions ``>= floor(len / T) * T`` come from the rings.
        k_recent, v_recent: full-precision rings ``[B, Hkv, W, D]`` or ``None``.
        wrap: ring cache, position ``j`` in slot ``j % L``.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype (fp32 math, fp64 for fp64 q).

    Raises:
        ValueError: ``key_block`` without int4, the rings, or with ``wrap``.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if kv_format == "dense" and k_recent is None and not wrap and not key_block:
        return attention(
            q,
            k_cache,
            v_cache,
            causal=True,
            head_mask=head_mask,
            attn_mask=attn_mask,
            scale=scale,
            window=window,
            cache_lens=cache_lens,
        )
    b = q.shape[0]
    cap = k_cache.shape[2]
    lens = [int(x) for x in cache_lens.tolist()]
    npos = max(max(lens, default=0), 1)
    if key_block and (kv_format != "int4" or wrap or k_recent is None or v_recent is None):
        raise ValueError(
            "decode_attention: key_block (KIVI keys) needs kv_format 'int4', rings "
            "k_recent/v_recent and no wrap"
        )
    kf = _logical_vectors(
        k_cache,
        k_scale,
        k_recent,
        kv_format,
        d,
        lens,
        wrap,
        npos,
        key_block,
        per_channel=key_block > 0,
    )
    vf = _logical_vectors(v_cache, v_scale, v_recent, kv_format, d, lens, wrap, npos, key_block)
    # Readable positions: j < len (by cache_lens), not overwritten (wrap), and the slot's
    # padding-mask bit.
    keep = torch.ones(b, npos, dtype=torch.bool, device=q.device)
    j = torch.arange(npos, device=q.device)
    for bi in range(b):
        if wrap:
            keep[bi] &= j >= lens[bi] - cap
        else:
            keep[bi] &= j < cap
        if attn_mask is not None:
            slot = (j % cap) if wrap else j.clamp(max=cap - 1)
            keep[bi] &= attn_mask[bi].to(q.device)[slot] != 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = attention(
        q.to(acc),
        kf.to(acc),
        vf.to(acc),
        causal=True,
        head_mask=head_mask,
        attn_mask=keep,
        scale=scale,
        window=window,
        cache_lens=cache_lens,
    )
    return out.to(q.dtype)


def rope_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
    *,
    kv_format: str = "dense",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step's rotary embedding, append and attention over a per-token cache::

        q_rot = rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, cache_lens,
                               kv_format, k_scale, v_scale)
        return decode_attention(q_rot, k_cache, v_cache, cache_lens, head_mask, kv_format,
                                attn_mask, scale, window, k_scale=k_scale, v_scale=v_scale)

    (``cache_lens`` holds the lengths before the step and is advanced by ``Sq``; the
    caches and scales are written in place.)
    """
    q_rot = rope_kv_append(
        q, k, v, cos, sin, k_cache, v_cache, cache_lens, kv_format, k_scale, v_scale
    )
    return decode_attention(
        q_rot,
        k_cache,
        v_cache,
        cache_lens,
        head_mask,
        kv_format,
        attn_mask,
        scale,
        window,
        k_scale=k_scale,
        v_scale=v_scale,
    )

"""``sentinel::attention`` (prefill) and ``sentinel::decode_attention`` (flash-decoding).

Scaled dot-product attention with pruned-head masking::

    out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys visible to query i (bottom-right causal, key padding, sliding window: the
exact rule is in :mod:`sentinel_kernels.reference.attention`), with ``out[b, h] = 0`` for a
pruned head. The kernels follow FlashAttention-2 (Dao, 2023): tiles of queries stream over
tiles of keys with an online softmax, so the ``[Sq, Sk]`` score matrix never exists; decode
follows flash-decoding (Dao et al., 2023): the cache is split across programs and the
partial softmaxes are merged.

Pruned heads cost nothing: the op builds, on the device, a list of the active
``(batch, head)`` pairs first (a stable argsort of the mask, no host sync), and the GPU
programs launched for inactive pairs only store zeros. Changing a mask needs no
recompilation and no synchronisation.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference.attention import attention as reference_attention
from ..reference.kv_cache import decode_attention_kv, kv_code_width, kv_groups
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, dtype_name

__all__ = [
    "attention",
    "decode_attention",
    "KV_FORMATS",
    "MAX_HEAD_DIM",
    "MAX_DECODE_QUERIES",
    "MAX_CACHE_QUERIES",
]

MAX_HEAD_DIM = 256
#: Query tokens per row below which the HF integration routes a chunk over a dense cache
#: to :func:`decode_attention` (a decode step, or a speculative draft of k + 1 tokens).
MAX_DECODE_QUERIES = 16
#: Query tokens per row :func:`decode_attention` takes at most (chunks that read a
#: compressed cache, e.g. chunked perplexity, go up to this).
MAX_CACHE_QUERIES = 64
KV_FORMATS = ("dense", "int8", "int4")
_MASK_DTYPES = (
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
)


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, op, FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D [batch, heads, seq, head_dim], got shape "
                f"{tuple(t.shape)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"{op}: q, k and v must have one dtype, got {dtype_name(q.dtype)}, "
            f"{dtype_name(k.dtype)}, {dtype_name(v.dtype)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{op}: q has batch {b} but k/v have batch {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"{op}: q has head_dim {d} but k/v have head_dim {k.shape[3]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA)"
        )


def _check_head_mask(op: str, head_mask: torch.Tensor | None, b: int, hq: int) -> None:
    if head_mask is None:
        return
    check_tensor(head_mask, "head_mask", op, _MASK_DTYPES)
    if tuple(head_mask.shape) not in ((hq,), (b, hq)):
        raise ValueError(
            f"{op}: head_mask shape {tuple(head_mask.shape)} must be [heads] = ({hq},) or "
            f"[batch, heads] = ({b}, {hq})"
        )


def _check_attn_mask(op: str, attn_mask: torch.Tensor | None, b: int, sk: int) -> None:
    if attn_mask is None:
        return
    check_tensor(attn_mask, "attn_mask", op, _MASK_DTYPES)
    if tuple(attn_mask.shape) != (b, sk):
        raise ValueError(
            f"{op}: attn_mask shape {tuple(attn_mask.shape)} must be a key padding mask "
            f"[batch, key_len] = ({b}, {sk}) (nonzero = attend); 4-D additive masks are not "
            "taken"
        )


def _check_cache_lens(op: str, cache_lens: torch.Tensor | None, b: int) -> None:
    if cache_lens is None:
        return
    check_tensor(cache_lens, "cache_lens", op, (torch.int32, torch.int64))
    if tuple(cache_lens.shape) != (b,):
        raise ValueError(f"{op}: cache_lens shape {tuple(cache_lens.shape)} must be [{b}]")


def _check_scalars(op: str, scale: float | None, window: int) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{op}: window must be an int >= 0 (0 = no window), got {window!r}")


def _check_all(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    cache_lens: torch.Tensor | None,
    scale: float | None,
    window: int,
) -> None:
    _check_qkv(op, q, k, v)
    b, hq = q.shape[:2]
    _check_head_mask(op, head_mask, b, hq)
    _check_attn_mask(op, attn_mask, b, k.shape[2])
    _check_cache_lens(op, cache_lens, b)
    _check_scalars(op, scale, window)
    extra = {
        name: t
        for name, t in (
            ("head_mask", head_mask),
            ("attn_mask", attn_mask),
            ("cache_lens", cache_lens),
        )
        if t is not None
    }
    check_same_device(op, q=q, k=k, v=v, **extra)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # Kernels read head_dim as a contiguous run; other strides are passed through.
    if t.stride(-1) != 1 or any(s < 0 for s in t.stride()):
        return t.contiguous()
    return t


def _strides(t: torch.Tensor) -> list[int]:
    # A size-1 dim may carry any stride (even 0 from expand); the kernels never step it.
    return [s if n > 1 else 0 for s, n in zip(t.stride(), t.shape, strict=True)]


def _head_tables(
    head_mask: torch.Tensor | None, b: int, hq: int, backend: str, want_order: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(head_active int8 [B*Hq], head_order int32 [B*Hq] or None)``, active pairs first."""
    if head_mask is None:
        return None, None
    if backend == "triton":
        from ..kernels import attention as ka

        if b * hq <= ka.MAX_HEAD_TABLE:
            return ka.head_tables(head_mask, b, hq, want_order)
    active = (head_mask != 0).expand(b, hq).reshape(-1)
    if not want_order:
        return active.to(torch.int8).contiguous(), None
    # Stable sort of the inactive flag: active pairs first, each group in index order.
    order = torch.argsort((~active).to(torch.int8), stable=True).to(torch.int32)
    return active.to(torch.int8).contiguous(), order


def _run(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    cache_lens: torch.Tensor | None,
    scale: float | None,
    window: int,
    decode: bool,
    num_splits: int | None = None,
) -> torch.Tensor:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale_f = 1.0 / math.sqrt(d) if scale is None else float(scale)
    backend = _backend.resolve(q.device)
    if backend == "reference" or q.numel() == 0:
        return reference_attention(
            q,
            k,
            v,
            causal=causal,
            head_mask=head_mask,
            attn_mask=attn_mask,
            scale=scale_f,
            window=window,
            cache_lens=cache_lens,
        )
    out = _backend.empty_output((b, hq, sq, d), q.dtype, q.device)
    if sk == 0:
        return out.zero_()
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    key_mask = (attn_mask != 0).to(torch.int8).contiguous() if attn_mask is not None else None
    lens = cache_lens.to(torch.int32).contiguous() if cache_lens is not None else None
    if backend == "triton" and decode:
        from ..kernels import decode_attention as kda

        # The decode kernel reads the caller's mask in place (no table launch: every
        # microsecond counts at decode); bool is read through a uint8 view.
        hm, hm_stride = None, None
        if head_mask is not None:
            hm = head_mask.view(torch.uint8) if head_mask.dtype == torch.bool else head_mask
            hm_stride = hm.stride(0) if hm.dim() == 2 else 0
        kda.decode_attention_fwd(
            q,
            k,
            v,
            out,
            lens,
            scale=scale_f,
            window=window,
            key_mask=key_mask,
            head_active=hm,
            num_splits=num_splits,
            head_batch_stride=hm_stride,
        )
        return out
    # Only the prefill grid walks (batch, head) slots in order; C++ needs flags only.
    head_active, head_order = _head_tables(
        head_mask, b, hq, backend, want_order=backend == "triton"
    )
    if backend == "triton":
        from ..kernels import attention as ka

        ka.attention_fwd(
            q,
            k,
            v,
            out,
            causal=causal,
            scale=scale_f,
            window=window,
            key_mask=key_mask,
            cache_lens=lens,
            head_active=head_active,
            head_order=head_order,
        )
        return out
    _backend.native_module().attention_fwd(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        dtype_name(q.dtype),
        b,
        hq,
        hkv,
        sq,
        sk,
        d,
        _strides(q),
        _strides(k),
        _strides(v),
        _strides(out),
        bool(causal),
        scale_f,
        int(window),
        key_mask.data_ptr() if key_mask is not None else 0,
        lens.data_ptr() if lens is not None else 0,
        head_active.data_ptr() if head_active is not None else 0,
        _backend.native_threads(),
    )
    return out


@torch.library.custom_op("sentinel::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    window: int,
    cache_lens: torch.Tensor | None,
) -> torch.Tensor:
    _check_all("attention", q, k, v, head_mask, attn_mask, cache_lens, scale, window)
    return _run(
        "attention",
        q,
        k,
        v,
        causal=causal,
        head_mask=head_mask,
        attn_mask=attn_mask,
        cache_lens=cache_lens,
        scale=scale,
        window=window,
        decode=False,
    )


@_attention_op.register_fake
def _(q, k, v, causal, head_mask, attn_mask, scale, window, cache_lens):
    _check_all("attention", q, k, v, head_mask, attn_mask, cache_lens, scale, window)
    return q.new_empty(q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    head_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
    cache_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash attention with pruned-head masking (prefill).

    ``out = softmax(scale * q k^T + mask) v`` per (batch, head), computed tile by tile
    with an online softmax (FlashAttention-2); the visibility rule is in
    :mod:`sentinel_kernels.reference.attention`.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0`` (GQA/MQA), one
            dtype among float16/bfloat16/float32, ``D <= 256``. Any strides.
        causal: causal mask aligned bottom-right (query i sits at ``L_b - Sq + i``).
        head_mask: ``[Hq]`` or ``[B, Hq]``, bool or 0/1; a zero entry is a pruned head:
            its output is exactly 0 and its programs do no work.
        attn_mask: key padding mask ``[B, Sk]`` (an HF 2-D ``attention_mask``), nonzero =
            attend; left padding works. A query that sees no key gets 0.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: sliding window (Mistral): query at p sees keys ``p - window < j <= p``.
        cache_lens: ``[B]`` int, valid keys per row (``<= Sk``); default ``Sk``.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype (fp32 accumulation, one rounding).
    """
    return _attention_op(q, k, v, bool(causal), head_mask, attn_mask, scale, window, cache_lens)


# --------------------------------------------------------------------------------------
# Decode attention over a (possibly compressed) KV cache
# --------------------------------------------------------------------------------------

_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


def _check_decode(
    q,
    k_cache,
    v_cache,
    cache_lens,
    head_mask,
    kv_format,
    attn_mask,
    scale,
    window,
    num_splits,
    k_scale,
    v_scale,
    k_recent,
    v_recent,
    wrap,
    key_block=0,
) -> None:
    op = "decode_attention"
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 0:
        raise ValueError(f"{op}: key_block must be an int >= 0, got {key_block!r}")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"{op}: kv_format {kv_format!r} is not one of {KV_FORMATS}")
    if cache_lens is None:
        raise ValueError(f"{op}: cache_lens is required ([batch] valid tokens per row)")
    if kv_format == "dense":
        _check_all(op, q, k_cache, v_cache, head_mask, attn_mask, cache_lens, scale, window)
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"{op}: k_scale/v_scale are only for int8/int4 caches")
    else:
        _check_compressed(op, q, k_cache, v_cache, kv_format, k_scale, v_scale, key_block)
        b, hq = q.shape[:2]
        _check_head_mask(op, head_mask, b, hq)
        _check_attn_mask(op, attn_mask, b, k_cache.shape[2])
        _check_cache_lens(op, cache_lens, b)
        _check_scalars(op, scale, window)
    _check_recent(op, q, k_cache, k_recent, v_recent)
    if not isinstance(wrap, bool):
        raise ValueError(f"{op}: wrap must be a bool, got {wrap!r}")
    if key_block:
        if kv_format != "int4" or wrap or k_recent is None:
            raise ValueError(
                f"{op}: key_block={key_block} (KIVI per-channel keys) needs kv_format 'int4', "
                f"the rings k_recent/v_recent and wrap=False; got kv_format={kv_format!r}, "
                f"rings={'yes' if k_recent is not None else 'no'}, wrap={wrap}"
            )
        if k_recent.shape[2] < key_block or k_recent.shape[2] % key_block:
            raise ValueError(
                f"{op}: the rings must hold a multiple of key_block={key_block} "
                f"slots (>= 1 block), got W={k_recent.shape[2]}"
            )
    if not 1 <= q.shape[2] <= MAX_CACHE_QUERIES:
        raise ValueError(
            f"{op}: takes 1 to {MAX_CACHE_QUERIES} query tokens per row, got {q.shape[2]}; "
            "use sk.ops.attention(..., cache_lens=...) for longer chunks over a dense cache"
        )
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ValueError(f"{op}: num_splits must be a positive int or None, got {num_splits!r}")
    extra = {
        name: t
        for name, t in (
            ("head_mask", head_mask),
            ("attn_mask", attn_mask),
            ("cache_lens", cache_lens),
            ("k_scale", k_scale),
            ("v_scale", v_scale),
            ("k_recent", k_recent),
            ("v_recent", v_recent),
        )
        if t is not None
    }
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, **extra)


def _check_compressed(op, q, k_cache, v_cache, kv_format, k_scale, v_scale, key_block=0) -> None:
    check_tensor(q, "q", op, FLOAT_DTYPES)
    if q.dim() != 4:
        raise ValueError(
            f"{op}: q must be 4-D [batch, heads, seq, head_dim], got shape {tuple(q.shape)}"
        )
    b, hq, _, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    code_dtype = _CODE_DTYPES[kv_format]
    width = kv_code_width(d, kv_format)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, op, (code_dtype,))
        if t.dim() != 4 or t.shape[0] != b or t.shape[3] != width:
            raise ValueError(
                f"{op}: {name} for kv_format {kv_format!r} must be [batch={b}, kv_heads, L, "
                f"{width}] (head_dim {d}), got {tuple(t.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{op}: k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs "
            f"{tuple(v_cache.shape)}"
        )
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA)"
        )
    tail = 1 if kv_format == "int8" else 2
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            raise ValueError(f"{op}: kv_format {kv_format!r} needs {name}")
        check_tensor(t, name, op, (torch.float16,))
        if name == "k_scale" and key_block:
            # KIVI keys: (s, m) per channel per block of key_block slots.
            if length % key_block:
                raise ValueError(
                    f"{op}: with key_block={key_block} the cache length L must "
                    f"be a multiple of it, got L={length}"
                )
            want5 = (b, hkv, length // key_block, d, 2)
            if tuple(t.shape) != want5:
                raise ValueError(
                    f"{op}: k_scale for key_block={key_block} must be [B, Hkv, "
                    f"L / key_block, D, 2] = {want5}, got {tuple(t.shape)}"
                )
            continue
        want = "[B, Hkv, L, G]" if tail == 1 else "[B, Hkv, L, G, 2]"
        if (
            t.dim() != 3 + tail
            or tuple(t.shape[:3]) != (b, hkv, length)
            or (tail == 2 and t.shape[4] != 2)
        ):
            raise ValueError(
                f"{op}: {name} must be {want} = ({b}, {hkv}, {length}, ...), got {tuple(t.shape)}"
            )
        kv_groups(d, t.shape[3])  # raises on a group count that does not cut head_dim
    if k_scale.shape != v_scale.shape and not key_block:
        raise ValueError(
            f"{op}: k_scale and v_scale shapes differ: {tuple(k_scale.shape)} vs "
            f"{tuple(v_scale.shape)}"
        )


def _check_recent(op, q, k_cache, k_recent, v_recent) -> None:
    if (k_recent is None) != (v_recent is None):
        raise ValueError(f"{op}: give both k_recent and v_recent, or neither")
    if k_recent is None:
        return
    b, _, _, d = q.shape
    hkv = k_cache.shape[1]
    for name, t in (("k_recent", k_recent), ("v_recent", v_recent)):
        check_tensor(t, name, op, (q.dtype,))
        if t.dim() != 4 or tuple(t.shape[:2]) != (b, hkv) or t.shape[3] != d or t.shape[2] < 1:
            raise ValueError(
                f"{op}: {name} must be [B, Hkv, W, D] = ({b}, {hkv}, W >= 1, {d}), "
                f"got {tuple(t.shape)}"
            )
    if k_recent.shape != v_recent.shape:
        raise ValueError(f"{op}: k_recent and v_recent shapes differ")


def _unit_tail(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    # Codes / scales are read with the last `dims` dims as one contiguous run.
    if t is None:
        return None
    inner = t.shape[-dims:]
    expect, ok = 1, True
    for size, stride in zip(reversed(inner), reversed(t.stride()[-dims:]), strict=True):
        if size > 1 and stride != expect:
            ok = False
        expect *= size
    return t if ok and all(s >= 0 for s in t.stride()) else t.contiguous()


def _native_strides3(t: torch.Tensor | None) -> list[int]:
    return _strides(t)[:3] if t is not None else [0, 0, 0]


def _run_decode(
    q,
    k_cache,
    v_cache,
    cache_lens,
    head_mask,
    kv_format,
    attn_mask,
    scale,
    window,
    num_splits,
    k_scale,
    v_scale,
    k_recent,
    v_recent,
    wrap,
    key_block=0,
):
    b, hq, sq, d = q.shape
    plain = kv_format == "dense" and k_recent is None and not wrap
    if plain:
        return _run(
            "decode_attention",
            q,
            k_cache,
            v_cache,
            causal=True,
            head_mask=head_mask,
            attn_mask=attn_mask,
            cache_lens=cache_lens,
            scale=scale,
            window=window,
            decode=True,
            num_splits=num_splits,
        )
    scale_f = 1.0 / math.sqrt(d) if scale is None else float(scale)
    backend = _backend.resolve(q.device)
    if backend == "reference" or q.numel() == 0 or k_cache.shape[2] == 0:
        if k_cache.shape[2] == 0 and k_recent is None:
            return _backend.empty_output(q.shape, q.dtype, q.device).zero_()
        return decode_attention_kv(
            q,
            k_cache,
            v_cache,
            cache_lens,
            head_mask=head_mask,
            kv_format=kv_format,
            attn_mask=attn_mask,
            scale=scale_f,
            window=window,
            k_scale=k_scale,
            v_scale=v_scale,
            k_recent=k_recent,
            v_recent=v_recent,
            wrap=wrap,
            key_block=key_block,
        )
    out = _backend.empty_output((b, hq, sq, d), q.dtype, q.device)
    q = _unit_last(q)
    k_cache, v_cache = _unit_last(k_cache), _unit_last(v_cache)
    tail = 2 if kv_format == "int4" else 1
    k_scale, v_scale = _unit_tail(k_scale, tail), _unit_tail(v_scale, tail)
    k_recent = _unit_last(k_recent) if k_recent is not None else None
    v_recent = _unit_last(v_recent) if v_recent is not None else None
    key_mask = (attn_mask != 0).to(torch.int8).contiguous() if attn_mask is not None else None
    lens = cache_lens.to(torch.int32).contiguous()
    if backend == "triton":
        from ..kernels import decode_attention as kda

        if key_block and (key_block & (key_block - 1) or not 16 <= key_block <= 256):
            # A tile is one key block, and tl.dot needs >= 16 keys.
            raise ValueError(
                f"decode_attention: the Triton kernel takes key_block a power of "
                f"two in [16, 256], got {key_block}"
            )
        hm, hm_stride = None, None
        if head_mask is not None:
            hm = head_mask.view(torch.uint8) if head_mask.dtype == torch.bool else head_mask
            hm_stride = hm.stride(0) if hm.dim() == 2 else 0
        kda.decode_attention_fwd(
            q,
            k_cache,
            v_cache,
            out,
            lens,
            scale=scale_f,
            window=window,
            key_mask=key_mask,
            head_active=hm,
            num_splits=num_splits,
            head_batch_stride=hm_stride,
            kv_format=kv_format,
            k_scale=k_scale,
            v_scale=v_scale,
            k_recent=k_recent,
            v_recent=v_recent,
            wrap=wrap,
            key_block=key_block,
        )
        return out
    head_active, _ = _head_tables(head_mask, b, hq, backend, want_order=False)
    # Value groups (KIVI keys have per-channel scales; the values' groups are the count).
    n_groups = v_scale.shape[3] if v_scale is not None else 1
    w = k_recent.shape[2] if k_recent is not None else 0
    _backend.native_module().decode_attention_kv(
        q.data_ptr(),
        out.data_ptr(),
        dtype_name(q.dtype),
        kv_format,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_scale.data_ptr() if k_scale is not None else 0,
        v_scale.data_ptr() if v_scale is not None else 0,
        k_recent.data_ptr() if k_recent is not None else 0,
        v_recent.data_ptr() if v_recent is not None else 0,
        b,
        hq,
        k_cache.shape[1],
        sq,
        d,
        k_cache.shape[2],
        w,
        n_groups,
        _strides(q),
        _strides(out),
        _native_strides3(k_cache),
        _native_strides3(v_cache),
        _native_strides3(k_scale),
        _native_strides3(v_scale),
        _native_strides3(k_recent),
        _native_strides3(v_recent),
        scale_f,
        int(window),
        key_mask.data_ptr() if key_mask is not None else 0,
        lens.data_ptr(),
        head_active.data_ptr() if head_active is not None else 0,
        bool(wrap),
        int(key_block),
        _backend.native_threads(),
    )
    return out


@torch.library.custom_op("sentinel::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None,
    kv_format: str,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    window: int,
    num_splits: int | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    k_recent: torch.Tensor | None,
    v_recent: torch.Tensor | None,
    wrap: bool,
    key_block: int = 0,
) -> torch.Tensor:
    args = (
        q,
        k_cache,
        v_cache,
        cache_lens,
        head_mask,
        kv_format,
        attn_mask,
        scale,
        window,
        num_splits,
        k_scale,
        v_scale,
        k_recent,
        v_recent,
        wrap,
        key_block,
    )
    _check_decode(*args)
    return _run_decode(*args)


@_decode_attention_op.register_fake
def _(
    q,
    k_cache,
    v_cache,
    cache_lens,
    head_mask,
    kv_format,
    attn_mask,
    scale,
    window,
    num_splits,
    k_scale,
    v_scale,
    k_recent,
    v_recent,
    wrap,
    key_block=0,
):
    _check_decode(
        q,
        k_cache,
        v_cache,
        cache_lens,
        head_mask,
        kv_format,
        attn_mask,
        scale,
        window,
        num_splits,
        k_scale,
        v_scale,
        k_recent,
        v_recent,
        wrap,
        key_block,
    )
    return q.new_empty(q.shape)


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
    num_splits: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_recent: torch.Tensor | None = None,
    v_recent: torch.Tensor | None = None,
    wrap: bool = False,
    key_block: int = 0,
) -> torch.Tensor:
    """Decode attention over a KV cache (flash-decoding, split-KV with a merge pass).

    ``Sq`` new query tokens per row (1 to 64; their keys already appended) attend to the
    first ``cache_lens[b]`` positions of row b, causally: query t sits at position
    ``cache_lens[b] - Sq + t``. Each program reads one KV head's chunk once for all the
    query heads of its group (GQA). Compressed caches (KIVI-style int8 / int4 with group
    scales) are dequantized in registers, never copied to full precision; the formats and
    the exact rule are in :mod:`sentinel_kernels.reference.kv_cache`.

    Args:
        q: ``[B, Hq, Sq, D]``, fp16/bf16/fp32.
        k_cache, v_cache: ``[B, Hkv, L, D]`` in q's dtype (``"dense"``), int8 codes
            ``[B, Hkv, L, D]`` (``"int8"``) or packed uint8 ``[B, Hkv, L, ceil(D/2)]``
            (``"int4"``). Slots past ``cache_lens`` are never read.
        cache_lens: ``[B]`` int32/int64 on q's device (not synced to the host): positions
            written per row (may exceed ``L`` with ``wrap``).
        head_mask: as in :func:`attention`. A KV group whose query heads are all pruned
            reads nothing; inside a partly pruned group only the outputs are zero.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        attn_mask: key padding mask ``[B, L]`` by slot (left padding), nonzero = attend.
        scale, window: as in :func:`attention`.
        num_splits: force the number of KV splits (default: from shapes and the SM count).
        k_scale, v_scale: float16 ``[B, Hkv, L, G]`` (int8) or ``[B, Hkv, L, G, 2]``
            (int4: scale and minimum) group scales.
        k_recent, v_recent: optional full-precision ring ``[B, Hkv, W, D]`` (q's dtype)
            holding the last ``W`` positions in slot ``j % W``; those positions are read
            from it instead of the compressed store.
        wrap: the cache is a ring: position ``j`` lives in slot ``j % L`` and only the
            last ``L`` positions are readable (sliding-window layers).
        key_block: ``T > 0`` for KIVI keys (int4 only; Liu et al. 2024): ``k_scale`` is
            ``[B, Hkv, L / T, D, 2]``, a (scale, minimum) pair per channel per block of
            ``T`` slots; the rings (``W`` a multiple of ``T``) hold the positions ``>=
            floor(len / T) * T``, whose block is not quantized yet. Values stay per token
            (``v_scale [B, Hkv, L, G, 2]``). Written by :func:`kv_append_key_blocks`.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype.
    """
    return _decode_attention_op(
        q,
        k_cache,
        v_cache,
        cache_lens,
        head_mask,
        kv_format,
        attn_mask,
        scale,
        window,
        num_splits,
        k_scale,
        v_scale,
        k_recent,
        v_recent,
        bool(wrap),
        int(key_block),
    )

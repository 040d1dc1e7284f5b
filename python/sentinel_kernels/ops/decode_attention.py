"""``sentinel::decode_attention``: flash-decoding over a KV cache of any format.

A few new query tokens per row (a decode step, a speculative draft, a chunk of up to
``MAX_CACHE_QUERIES``) attend to the cached positions of their row, causally. The cache is
dense, or compressed (int8 / int4 with group scales, KIVI per-channel int4 keys), possibly
a ring (``wrap``) and with a full-precision ring of recent positions; the formats are
:mod:`sentinel_kernels.reference.kv_formats`, the rule
:mod:`sentinel_kernels.reference.decode_attention`. The kernels follow flash-decoding
(Dao et al., 2023): the cache is split across programs and the partial softmaxes merged;
compressed tiles are dequantized in registers, never in memory.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch

from .. import _backend
from ..reference.decode_attention import decode_attention as reference_decode_attention
from ..reference.decode_attention import (
    rope_decode_attention as reference_rope_decode_attention,
)
from ..reference.kv_formats import KV_FORMATS, kv_code_width, kv_groups
from ._checks import (
    check_gqa,
    check_head_dim,
    check_head_vectors,
    check_int,
    check_masks,
    check_qkv,
    check_same_device,
    check_tensor,
    data_ptr,
    dtype_name,
    kernel_strides,
    unit_last,
    unit_tail,
)
from ._dispatch import call_op
from .attention import head_tables, key_mask_int8, run_attention
from .kv_append import check_rope_kv_append, rope_kv_append

__all__ = [
    "decode_attention",
    "decode_split_scope",
    "rope_decode_attention",
    "MAX_DECODE_QUERIES",
    "MAX_CACHE_QUERIES",
]

#: Query tokens per row below which the HF integration routes a chunk over a dense cache
#: to :func:`decode_attention` (a decode step, or a speculative draft of k + 1 tokens).
MAX_DECODE_QUERIES = 16
#: Query tokens per row :func:`decode_attention` takes at most (chunks that read a
#: compressed cache, e.g. chunked perplexity, go up to this).
MAX_CACHE_QUERIES = 64

_OP = "decode_attention"
_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


_LAYOUT = ("kv_format", "k_scale", "v_scale", "k_recent", "v_recent", "wrap", "key_block")


class _Call(NamedTuple):
    """The arguments of one ``sentinel::decode_attention`` call, in the op's order."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_lens: torch.Tensor
    head_mask: torch.Tensor | None
    kv_format: str
    attn_mask: torch.Tensor | None
    scale: float | None
    window: int
    num_splits: int | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    k_recent: torch.Tensor | None
    v_recent: torch.Tensor | None
    wrap: bool
    key_block: int = 0

    def cache_layout(self) -> dict:
        """The keywords that describe the cache's format, as the kernels and the
        reference take them."""
        return {name: getattr(self, name) for name in _LAYOUT}


def _check_decode(c: _Call) -> None:
    op, q, k_cache, fmt, key_block = _OP, c.q, c.k_cache, c.kv_format, c.key_block
    check_int(key_block, "key_block", op, 0)
    if fmt not in KV_FORMATS:
        raise ValueError(f"{op}: kv_format {fmt!r} is not one of {KV_FORMATS}")
    if c.cache_lens is None:
        raise ValueError(f"{op}: cache_lens is required ([batch] valid tokens per row)")
    if fmt == "dense":
        check_qkv(op, q, k_cache, c.v_cache)
        if c.k_scale is not None or c.v_scale is not None:
            raise ValueError(f"{op}: k_scale/v_scale are only for int8/int4 caches")
    else:
        _check_compressed(op, q, k_cache, c.v_cache, fmt, c.k_scale, c.v_scale, key_block)
    masks = (c.head_mask, c.attn_mask, c.cache_lens, c.scale, c.window)
    check_masks(op, q.shape[0], q.shape[1], k_cache.shape[2], *masks)
    _check_recent(op, q, k_cache, c.k_recent, c.v_recent)
    if not isinstance(c.wrap, bool):
        raise ValueError(f"{op}: wrap must be a bool, got {c.wrap!r}")
    if key_block:
        if fmt != "int4" or c.wrap or c.k_recent is None:
            raise ValueError(
                f"{op}: key_block={key_block} (KIVI per-channel keys) needs kv_format 'int4', "
                f"the rings k_recent/v_recent and wrap=False; got kv_format={fmt!r}, "
                f"rings={'yes' if c.k_recent is not None else 'no'}, wrap={c.wrap}"
            )
        if c.k_recent.shape[2] < key_block or c.k_recent.shape[2] % key_block:
            raise ValueError(
                f"{op}: the rings must hold a multiple of key_block={key_block} "
                f"slots (>= 1 block), got W={c.k_recent.shape[2]}"
            )
    if not 1 <= q.shape[2] <= MAX_CACHE_QUERIES:
        raise ValueError(
            f"{op}: takes 1 to {MAX_CACHE_QUERIES} query tokens per row, got {q.shape[2]}; "
            "use sk.ops.attention(..., cache_lens=...) for longer chunks over a dense cache"
        )
    splits = c.num_splits
    if splits is not None and (
        isinstance(splits, bool) or not isinstance(splits, int) or splits < 1
    ):
        raise ValueError(f"{op}: num_splits must be a positive int or None, got {splits!r}")
    tensors = {n: t for n, t in c._asdict().items() if isinstance(t, torch.Tensor)}
    check_same_device(op, **tensors)


def _check_compressed(op, q, k_cache, v_cache, kv_format, k_scale, v_scale, key_block=0) -> None:
    check_head_vectors(q, "q", op)
    b, hq, _, d = q.shape
    check_head_dim(op, d)
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
    check_gqa(op, hq, hkv)
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


def _head_flags(head_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int | None]:
    # The Triton kernel reads the caller's head mask in place (no table launch: every
    # microsecond counts at decode); bool is read through a uint8 view.
    if head_mask is None:
        return None, None
    hm = head_mask.view(torch.uint8) if head_mask.dtype == torch.bool else head_mask
    return hm, hm.stride(0) if hm.dim() == 2 else 0


def _run_decode(c: _Call) -> torch.Tensor:
    q, k_cache, v_cache, cache_lens, head_mask = c[:5]
    backend = _backend.resolve(q.device)
    if c.kv_format == "dense" and c.k_recent is None and not c.wrap and backend != "triton":
        # A plain dense cache is the prefill rule with cache_lens, which the C++ and
        # reference attention take as they are. Their [B, Sq, Hq, D] memory is made the
        # contiguous [B, Hq, Sq, D] this op returns (no copy at Sq = 1).
        masks = dict(head_mask=head_mask, attn_mask=c.attn_mask, cache_lens=cache_lens)
        return run_attention(
            q, k_cache, v_cache, causal=True, scale=c.scale, window=c.window, **masks
        ).contiguous()
    b, hq, sq, d = q.shape
    scale = 1.0 / math.sqrt(d) if c.scale is None else float(c.scale)
    layout = c.cache_layout()
    if backend == "reference" or q.numel() == 0 or k_cache.shape[2] == 0:
        if k_cache.shape[2] == 0 and c.k_recent is None:
            return _backend.empty_output(q.shape, q.dtype, q.device).zero_()
        return reference_decode_attention(
            *c[:5], attn_mask=c.attn_mask, scale=scale, window=c.window, **layout
        )
    out = _backend.empty_output((b, hq, sq, d), q.dtype, q.device)
    q, k_cache, v_cache = unit_last(q), unit_last(k_cache), unit_last(v_cache)
    # The kernels read codes, rings and the last dims of scales as contiguous runs.
    tail = 2 if c.kv_format == "int4" else 1
    for name in ("k_scale", "v_scale"):
        layout[name] = unit_tail(layout[name], tail)
    for name in ("k_recent", "v_recent"):
        layout[name] = unit_last(layout[name]) if layout[name] is not None else None
    key_mask = key_mask_int8(c.attn_mask)
    lens = cache_lens.to(torch.int32).contiguous()
    if backend == "triton":
        from ..kernels import decode_attention as kda

        kb = c.key_block
        if kb and (kb & (kb - 1) or not 16 <= kb <= 256):
            # A tile is one key block, and tl.dot needs >= 16 keys.
            raise ValueError(
                f"decode_attention: the Triton kernel takes key_block a power of "
                f"two in [16, 256], got {kb}"
            )
        hm, hm_stride = _head_flags(head_mask)
        kda.decode_attention_fwd(
            q,
            k_cache,
            v_cache,
            out,
            lens,
            scale=scale,
            window=c.window,
            key_mask=key_mask,
            head_active=hm,
            num_splits=c.num_splits,
            head_batch_stride=hm_stride,
            **layout,
        )
        return out
    head_active, _ = head_tables(head_mask, b, hq, backend, want_order=False)
    stores = (
        k_cache,
        v_cache,
        *(layout[n] for n in ("k_scale", "v_scale", "k_recent", "v_recent")),
    )
    k_recent, v_scale = layout["k_recent"], layout["v_scale"]
    _backend.native_module().decode_attention_kv(
        q.data_ptr(),
        out.data_ptr(),
        dtype_name(q.dtype),
        c.kv_format,
        *(data_ptr(t) for t in stores),
        b,
        hq,
        k_cache.shape[1],
        sq,
        d,
        k_cache.shape[2],
        k_recent.shape[2] if k_recent is not None else 0,
        # Value groups (KIVI keys have per-channel scales; the values' groups are the count).
        v_scale.shape[3] if v_scale is not None else 1,
        kernel_strides(q),
        kernel_strides(out),
        *(kernel_strides(t, 3) for t in stores),
        scale,
        int(c.window),
        data_ptr(key_mask),
        lens.data_ptr(),
        data_ptr(head_active),
        bool(c.wrap),
        int(c.key_block),
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
    c = _Call(
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
    _check_decode(c)
    return _run_decode(c)


@_decode_attention_op.register_fake
def _(*args):
    _check_decode(_Call(*args))
    return args[0].new_empty(args[0].shape)


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
    the exact rule are in :mod:`sentinel_kernels.reference.kv_formats` and
    :mod:`sentinel_kernels.reference.decode_attention`.

    Args:
        q: ``[B, Hq, Sq, D]``, fp16/bf16/fp32.
        k_cache, v_cache: ``[B, Hkv, L, D]`` in q's dtype (``"dense"``), int8 codes
            ``[B, Hkv, L, D]`` (``"int8"``) or packed uint8 ``[B, Hkv, L, ceil(D/2)]``
            (``"int4"``). Slots past ``cache_lens`` are never read.
        cache_lens: ``[B]`` int32/int64 on q's device (not synced to the host): positions
            written per row (may exceed ``L`` with ``wrap``).
        head_mask: as in :func:`sentinel_kernels.ops.attention`. A KV group whose query
            heads are all pruned reads nothing; inside a partly pruned group only the
            outputs are zero.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        attn_mask: key padding mask ``[B, L]`` by slot (left padding), nonzero = attend.
        scale, window: as in :func:`sentinel_kernels.ops.attention`.
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
            (``v_scale [B, Hkv, L, G, 2]``). Written by
            :func:`sentinel_kernels.ops.kv_append_key_blocks`.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype.
    """
    return call_op(
        _decode_attention_op,
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


def decode_split_scope(max_keys: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, :func:`decode_attention` calls on this thread that leave
    ``num_splits`` unset plan their KV split count for rows of at most ``max_keys`` keys
    (``None``: the cache's capacity ``L``, the default). Results never change: every
    split count covers each row's whole key range, cut on the device from the row's
    length. Only the work split does: a cache far longer than its rows otherwise gets a
    split-and-merge pass (an extra kernel per layer) where one split would do. CUDA
    graphs captured inside the block keep the plan; the serving engine captures its
    decode steps once for short rows this way and picks that graph when every row is
    short. The split heuristic is ``kernels.decode_attention.choose_num_splits``
    (FlashAttention-2's flash-decoding wave balance). A no-op on the C++ path, which
    does not split.

    Raises:
        ValueError: ``max_keys`` is neither None nor an int >= 1.
    """
    if max_keys is not None:
        check_int(max_keys, "max_keys", "decode_split_scope", 1)
    if not _backend.triton_available():
        return contextlib.nullcontext()
    from ..kernels import decode_attention as kda

    return kda.split_plan_scope(max_keys)


# --------------------------------------------------------------------------------------
# A decode step's rotary embedding, K/V append and attention in one launch
# --------------------------------------------------------------------------------------

_ROPE_OP = "rope_decode_attention"


def _check_rope_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    window: int,
    kv_format: str,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    check_rope_kv_append(
        q, k, v, cos, sin, k_cache, v_cache, cache_lens, kv_format, k_scale, v_scale, False,
        op=_ROPE_OP,
    )  # fmt: skip
    c = _Call(
        q, k_cache, v_cache, cache_lens, head_mask, kv_format, attn_mask, scale, window, None,
        k_scale, v_scale, None, None, False,
    )  # fmt: skip
    try:
        _check_decode(c)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix(f"{_OP}: ")
        raise type(e)(f"{_ROPE_OP}: {msg}") from None


@torch.library.custom_op(
    "sentinel::rope_decode_attention",
    mutates_args=("k_cache", "v_cache", "cache_lens", "k_scale", "v_scale"),
)
def _rope_decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    window: int,
    kv_format: str,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    args = (q, k, v, cos, sin, k_cache, v_cache, cache_lens)
    masks = (head_mask, attn_mask, scale, window)
    _check_rope_decode(*args, *masks, kv_format, k_scale, v_scale)
    backend = _backend.resolve(q.device)
    if backend == "reference":
        return reference_rope_decode_attention(
            *args, *masks, kv_format=kv_format, k_scale=k_scale, v_scale=v_scale
        )
    if backend == "triton" and q.numel() and k_cache.shape[2]:
        from ..kernels import decode_attention as kda

        groups = k_scale.shape[3] if k_scale is not None else 1
        hkv = k_cache.shape[1]
        if kda.rope_fold_fits(q, hkv, cache_lens, kv_format, groups, False, False, 0):
            out = _backend.empty_output(q.shape, q.dtype, q.device)
            cos3, sin3 = (cos.unsqueeze(0), sin.unsqueeze(0)) if cos.dim() == 2 else (cos, sin)
            hm, hm_stride = _head_flags(head_mask)
            kda.decode_attention_fwd(
                unit_last(q),
                k_cache,
                v_cache,
                out,
                cache_lens,
                scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                window=window,
                key_mask=key_mask_int8(attn_mask),
                head_active=hm,
                head_batch_stride=hm_stride,
                kv_format=kv_format,
                k_scale=k_scale,
                v_scale=v_scale,
                rope=(unit_last(k), unit_last(v), cos3, sin3),
            )
            return out
    # The C++ backend, and layouts the fused kernel does not take: the two ops.
    q_rot = rope_kv_append(*args, kv_format, k_scale, v_scale)
    return decode_attention(
        q_rot, k_cache, v_cache, cache_lens, head_mask, kv_format, attn_mask, scale, window,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


@_rope_decode_attention_op.register_fake
def _(q: torch.Tensor, *rest: Any) -> torch.Tensor:
    _check_rope_decode(q, *rest)
    return q.new_empty(q.shape)


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
    """A decode step's rotary embedding, K/V append and attention over a per-token cache:
    one kernel launch on a GPU where :func:`rope_kv_append` and :func:`decode_attention`
    take two.

    The composition::

        q_rot = rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, cache_lens,
                               kv_format, k_scale, v_scale)
        return decode_attention(q_rot, k_cache, v_cache, cache_lens, head_mask, kv_format,
                                attn_mask, scale, window, k_scale=k_scale, v_scale=v_scale)

    i.e. ``softmax_j(scale * rot(q)_t . k_j) v_j`` over the visible positions ``j <=
    cache_lens[b] + t`` (the step's own keys, rotated and stored, included), with
    ``rot(x) = x cos + rotate_half(x) sin`` (RoFormer, Su et al. 2021). The caches get the
    step's rotated keys and values at slots ``cache_lens[b] + i`` (cast, or quantized by
    :func:`kv_append`'s rule) and ``cache_lens[b]`` is advanced by ``Sq``.

    On CUDA (Triton), for a dense or int8 cache whose query tile the decode kernel holds
    in registers and where one program covers a KV group's query rows (``Hq / Hkv * Sq
    <= 128`` for ``D <= 128``), the flash-decoding split kernel does it all: each program
    rotates its query rows; the program whose key range holds a new position rotates
    that key and stores it and the value (kv_append's tile, the same codes and scales)
    and reads them back in its own loop; the last program of a row to finish reading
    ``cache_lens`` advances it (an arrival counter). The caches match the two ops' bit
    for bit; the output matches up to the attention's rounding (this launch is compiled
    without FMA contraction, as the append is, and always takes the default launch
    config: it is never autotuned, since a tuning run would append again). Other
    backends and layouts (int4, several int8 scale groups with D a power of two, more
    query rows) run the two ops. vLLM and FlashInfer fuse the rotary embedding with the
    cache write; this goes one step further and folds both into the attention that
    reads the cache next.

    Args:
        q: ``[B, Hq, Sq, D]``, ``Sq <= 64``; k, v: ``[B, Hkv, Sq, D]``; any strides;
            float32/float16/bfloat16 (q and k of one dtype); ``D`` even.
        cos, sin: ``[B, Sq, D]``, ``[1, Sq, D]`` or ``[Sq, D]``, of q's dtype.
        k_cache, v_cache: ``[B, Hkv, L, D]`` (dense in q's dtype, int8 codes) or uint8
            ``[B, Hkv, L, ceil(D/2)]`` (int4), unit last stride; written in place.
        cache_lens: ``[B]`` int32/int64 on q's device: positions before the step;
            advanced by ``Sq`` in place (the fused kernel needs int32, contiguous).
        head_mask, attn_mask, scale, window: as :func:`decode_attention`.
        kv_format, k_scale, v_scale: as :func:`rope_kv_append` (per-token groups; no
            rings, wrap or KIVI key blocks).

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype.

    Raises:
        TypeError / ValueError: the checks of :func:`rope_kv_append` and
            :func:`decode_attention`, under this op's name.
    """
    return call_op(
        _rope_decode_attention_op,
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        cache_lens,
        head_mask,
        attn_mask,
        scale,
        int(window),
        kv_format,
        k_scale,
        v_scale,
    )

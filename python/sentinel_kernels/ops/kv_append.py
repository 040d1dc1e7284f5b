"""``sentinel::kv_append``: quantize-on-append into a preallocated (compressed) KV cache.

New keys or values ``x [B, H, S, D]`` are written at positions ``start[b] + i`` of each
row, in one fused pass that computes the group scales and codes and stores them::

    int8:  s = f16(absmax / 127),         code = rint(x / s)            in [-127, 127]
    int4:  s = f16((max - min) / 15),     code = rint((x - f16(min)) / s) in [0, 15]

per group of ``ceil(D / G)`` channels of each head vector (KIVI, Liu et al. 2024, and
per-token group quantization as in FlexGen / Atom). The exact rule, the packed int4
layout and the ring (``wrap``) semantics are in :mod:`sentinel_kernels.reference.kv_formats`;
every backend writes the same codes and scales bit for bit. ``start`` (and the optional
destination ``rows``) live on the device, so an append inside a CUDA graph needs no host
sync.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _backend
from ..reference.kv_append import kv_append as reference_kv_append
from ..reference.kv_append import kv_append_key_blocks as reference_kv_append_key_blocks
from ..reference.kv_append import rope_kv_append as reference_rope_kv_append
from ..reference.kv_formats import KV_FORMATS, kv_code_width, kv_groups
from ._checks import (
    FLOAT_DTYPES,
    check_head_vectors,
    check_int,
    check_same_device,
    check_same_device_optional,
    check_tensor,
    check_writable_tail,
    data_ptr,
    dtype_name,
    kernel_strides,
)
from ._dispatch import call_op, try_fused_launch
from .fused import _ROPE as ROPE_OP
from .fused import _check_rope as check_rope
from .fused import rotary_embedding

__all__ = ["ROPE_KV_APPEND_MAX_FUSED", "kv_append", "kv_append_key_blocks", "rope_kv_append"]

_OP = "kv_append"


def _check_x(op: str, x: torch.Tensor, name: str = "x") -> None:
    check_head_vectors(x, name, op)
    if x.shape[3] < 1:
        raise ValueError(f"{op}: head_dim must be >= 1, got shape {tuple(x.shape)}")


def _check_start(op: str, start: torch.Tensor, b: int, name: str = "start") -> None:
    check_tensor(start, name, op, (torch.int32, torch.int64))
    if tuple(start.shape) != (b,):
        raise ValueError(f"{op}: {name} must be [batch] = ({b},), got {tuple(start.shape)}")


def _check_cache_append(
    op: str,
    names: tuple[str, str, str, str],
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str,
    scales: torch.Tensor | None,
    wrap: bool,
    rows: torch.Tensor | None = None,
) -> None:
    # kv_append's checks; `names` are the (x, cache, start, scales) arguments of `op`.
    # With destination `rows` the cache may have any number of rows (>= 1).
    x_name, c_name, st_name, s_name = names
    _check_x(op, x, x_name)
    b, h, _, d = x.shape
    if rows is not None:
        _check_start(op, rows, b, "rows")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"{op}: kv_format {kv_format!r} is not one of {KV_FORMATS}")
    want_dtype = {"int8": (torch.int8,), "int4": (torch.uint8,), "dense": FLOAT_DTYPES}
    check_tensor(cache, c_name, op, want_dtype[kv_format])
    width = kv_code_width(d, kv_format)
    if rows is None:
        lead, lead_ok = f"batch={b}", cache.dim() == 4 and tuple(cache.shape[:2]) == (b, h)
    else:
        lead, lead_ok = "rows", cache.dim() == 4 and cache.shape[1] == h
    if not lead_ok or cache.shape[3] != width:
        raise ValueError(
            f"{op}: {c_name} for kv_format {kv_format!r} must be [{lead}, heads={h}, L, "
            f"{width}] (head_dim {d}), got {tuple(cache.shape)}"
        )
    if rows is not None and cache.shape[0] < 1:
        raise ValueError(f"{op}: {c_name} has no rows")
    if cache.shape[2] < 1:
        raise ValueError(f"{op}: {c_name} has no slots (L = 0)")
    tail = 2 if kv_format == "int4" else 1
    if kv_format == "dense":
        if scales is not None:
            raise ValueError(f"{op}: a dense cache takes no {s_name}")
    else:
        if scales is None:
            raise ValueError(f"{op}: kv_format {kv_format!r} needs {s_name}")
        check_tensor(scales, s_name, op, (torch.float16,))
        ok = scales.dim() == 3 + tail and tuple(scales.shape[:3]) == tuple(cache.shape[:3])
        if ok and tail == 2:
            ok = scales.shape[4] == 2
        if not ok:
            want = "[B, H, L, G]" if tail == 1 else "[B, H, L, G, 2]"
            raise ValueError(
                f"{op}: {s_name} must be {want} matching {c_name} "
                f"{tuple(cache.shape[:3])}, got {tuple(scales.shape)}"
            )
        try:
            kv_groups(d, scales.shape[3])
        except ValueError as e:
            raise ValueError(f"{op}: {s_name}: {e}") from None
    _check_start(op, start, b, st_name)
    if not isinstance(wrap, bool):
        raise ValueError(f"{op}: wrap must be a bool, got {wrap!r}")
    check_same_device_optional(
        op, **{x_name: x, c_name: cache, st_name: start, s_name: scales, "rows": rows}
    )
    check_writable_tail(op, c_name, cache, 1)
    if scales is not None:
        check_writable_tail(op, s_name, scales, tail)


def _check_append(x, cache, start, kv_format, scales, wrap, rows=None) -> None:
    _check_cache_append(
        _OP, ("x", "cache", "start", "scales"), x, cache, start, kv_format, scales, wrap, rows
    )


def _kernel_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    # The kernels take int32 rows. An int64 row is clamped to [-1, n_rows] first (on the
    # device, no sync): a row outside the cache must stay outside, not wrap into it.
    if rows.dtype == torch.int64:
        rows = rows.clamp(-1, n_rows)
    return rows.to(torch.int32).contiguous()


def _prepare(x: torch.Tensor, start: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    # What both appends do before writing: the backend (``"none"`` for an empty ``x``:
    # nothing to write), ``x`` with a unit last stride and ``start`` as contiguous int32.
    if x.numel() == 0:
        return "none", x, start
    backend = _backend.resolve(x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return backend, x, start.to(torch.int32).contiguous()


@torch.library.custom_op("sentinel::kv_append", mutates_args=("cache", "scales"))
def _kv_append_op(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str,
    scales: torch.Tensor | None,
    wrap: bool,
    rows: torch.Tensor | None = None,
) -> None:
    _check_append(x, cache, start, kv_format, scales, wrap, rows)
    backend, x, st = _prepare(x, start)
    if rows is not None and backend != "none":
        rows = _kernel_rows(rows, cache.shape[0])
    if backend == "triton":
        from ..kernels import kv_append as kkv

        kkv.kv_append_fwd(x, cache, st, kv_format=kv_format, scales=scales, wrap=wrap, rows=rows)
    elif backend == "native":
        if kv_format == "dense" and x.dtype != cache.dtype:
            x = x.to(cache.dtype)
        b, h, s, d = x.shape
        n_groups = scales.shape[3] if scales is not None else 1
        _backend.native_module().kv_append(
            x.data_ptr(),
            dtype_name(x.dtype),
            cache.data_ptr(),
            data_ptr(scales),
            kv_format,
            b,
            h,
            s,
            d,
            cache.shape[2],
            n_groups,
            kernel_strides(x),
            kernel_strides(cache, 3),
            kernel_strides(scales, 3),
            st.data_ptr(),
            wrap,
            _backend.native_threads(),
            rows_ptr=data_ptr(rows),
            Bc=cache.shape[0],
        )
    elif backend == "reference":
        reference_kv_append(x, cache, st, kv_format, scales, wrap, rows)


# The fake only validates: the op mutates its inputs and returns nothing.
_kv_append_op.register_fake(_check_append)


def kv_append(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str = "dense",
    scales: torch.Tensor | None = None,
    wrap: bool = False,
    rows: torch.Tensor | None = None,
) -> None:
    """Write ``x`` into a preallocated KV cache at per-row positions, quantizing on the way.

    Token ``i`` of batch row ``b`` goes to position ``start[b] + i`` of cache row ``r``:
    ``b``, or ``rows[b]`` when ``rows`` is given::

        cache[r, :, slot] (and scales[r, :, slot]) = quantize(x[b, :, i])
        slot = start[b] + i                 (not written when >= L)
        slot = (start[b] + i) % L           (wrap: a ring; when S > L only the last L land)

    Without ``wrap``, slots ``>= L`` are not written: the caller (the
    :func:`sentinel_kernels.kv_cache` object) raises before using a cache past its
    capacity, since checking ``start`` here would need a device-to-host sync. Likewise a
    ``rows[b]`` outside ``[0, Bc)`` is not written (skipped, not reported: the rows live
    on the device). Where two batch rows write one (row, slot), the reference and the
    C++ backend keep the later batch row's values; on Triton (the GPU) which one lands is
    unspecified, and a quantized slot's codes and scales may even come from different
    writers: give each (row, slot) one writer.

    ``rows`` is what a packed prefill needs: several prompts laid one after another in
    one row give K/V ``x [1, H, S, D]``; ``x.permute(2, 1, 0, 3)`` (``[S, H, 1, D]``, a
    strided view, no copy) holds one token per batch row, and with ``rows`` = each
    token's destination cache row and ``start`` = each token's position in its prompt,
    one append stores every token straight into its request's row (no staging row and
    scatter copy).

    Args:
        x: ``[B, H, S, D]`` float32/float16/bfloat16 keys or values, any strides.
        cache: ``[Bc, H, L, D]`` (``"dense"``, any float dtype), int8 ``[Bc, H, L, D]``
            (``"int8"``) or uint8 ``[Bc, H, L, ceil(D/2)]`` (``"int4"``, two codes a
            byte), written in place; unit stride in the last dim. ``Bc = B`` without
            ``rows``, any ``Bc >= 1`` with them.
        start: ``[B]`` int32/int64 on x's device, the first position of each row.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        scales: float16 ``[Bc, H, L, G]`` (int8) or ``[Bc, H, L, G, 2]`` (int4: scale and
            minimum), ``G`` groups of ``ceil(D / G)`` channels; written in place.
        wrap: ring-buffer slots (sliding-window caches).
        rows: ``None`` (batch row ``b`` into cache row ``b``) or ``[B]`` int32/int64 on
            x's device: each batch row's cache (and scales) row.
    Raises:
        TypeError: a non-tensor argument or a wrong dtype (``start`` and ``rows`` must be
            int32/int64).
        ValueError: inconsistent shapes (``start`` / ``rows`` not ``[B]``, the cache's
            heads or width not matching ``x``, its rows not ``B`` without ``rows``),
            formats, scales or devices, or a cache or scales without unit trailing
            strides.
    """
    call_op(_kv_append_op, x, cache, start, kv_format, scales, bool(wrap), rows)


# --------------------------------------------------------------------------------------
# KIVI keys: per-channel int4 over blocks of tokens
# --------------------------------------------------------------------------------------

_KB_OP = "kv_append_key_blocks"


def _check_key_blocks(x, codes, scales, ring, start, block) -> None:
    op = _KB_OP
    _check_x(op, x)
    b, h, _, d = x.shape
    check_int(block, "block", op, 1)
    check_tensor(codes, "codes", op, (torch.uint8,))
    width = kv_code_width(d, "int4")
    if codes.dim() != 4 or tuple(codes.shape[:2]) != (b, h) or codes.shape[3] != width:
        raise ValueError(
            f"{op}: codes must be uint8 [batch={b}, heads={h}, L, {width}] "
            f"(head_dim {d}), got {tuple(codes.shape)}"
        )
    length = codes.shape[2]
    if length < block or length % block:
        raise ValueError(
            f"{op}: the cache length L={length} must be a positive multiple of block={block}"
        )
    check_tensor(scales, "scales", op, (torch.float16,))
    want = (b, h, length // block, d, 2)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"{op}: scales must be float16 [B, H, L / block, D, 2] = {want}, got "
            f"{tuple(scales.shape)}"
        )
    check_tensor(ring, "ring", op, FLOAT_DTYPES)
    if ring.dim() != 4 or tuple(ring.shape[:2]) != (b, h) or ring.shape[3] != d:
        raise ValueError(
            f"{op}: ring must be [batch={b}, heads={h}, W, {d}], got {tuple(ring.shape)}"
        )
    if ring.shape[2] < block or ring.shape[2] % block:
        raise ValueError(
            f"{op}: the ring must hold a positive multiple of block={block} "
            f"slots, got W={ring.shape[2]}"
        )
    _check_start(op, start, b)
    check_same_device_optional(op, x=x, codes=codes, scales=scales, ring=ring, start=start)
    for name, t, tail in (("codes", codes, 1), ("scales", scales, 2), ("ring", ring, 1)):
        check_writable_tail(op, name, t, tail)


@torch.library.custom_op("sentinel::kv_append_key_blocks", mutates_args=("codes", "scales", "ring"))
def _kv_append_key_blocks_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    ring: torch.Tensor,
    start: torch.Tensor,
    block: int,
) -> None:
    _check_key_blocks(x, codes, scales, ring, start, block)
    backend, x, st = _prepare(x, start)
    if backend == "triton":
        from ..kernels import kv_append as kkv

        kkv.kv_append_key_blocks_fwd(x, codes, scales, ring, st, block)
    elif backend == "native":
        b, h, s, d = x.shape
        _backend.native_module().kv_append_key_blocks(
            x.data_ptr(),
            dtype_name(x.dtype),
            codes.data_ptr(),
            scales.data_ptr(),
            ring.data_ptr(),
            dtype_name(ring.dtype),
            b,
            h,
            s,
            d,
            codes.shape[2],
            ring.shape[2],
            block,
            kernel_strides(x),
            kernel_strides(codes, 3),
            kernel_strides(scales, 3),
            kernel_strides(ring, 3),
            st.data_ptr(),
            _backend.native_threads(),
        )
    elif backend == "reference":
        reference_kv_append_key_blocks(x, codes, scales, ring, st, block)


_kv_append_key_blocks_op.register_fake(_check_key_blocks)


def kv_append_key_blocks(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    ring: torch.Tensor,
    start: torch.Tensor,
    block: int,
) -> None:
    """Append keys to a KIVI cache: per-channel int4 over blocks of ``block`` tokens.

    Keys of positions ``start[b] .. start[b] + S - 1`` are appended. Every block of
    ``T = block`` positions that this append completes is quantized per channel: for
    channel ``c`` of block ``i``, ``s = f16((max - min) / 15)``, ``m = f16(min)`` over
    the block's ``T`` keys, ``code = rint((x - m) / s)`` in ``[0, 15]`` (the int4 rule of
    :mod:`sentinel_kernels.reference.kv_formats`, taken along tokens instead of channels:
    KIVI, Liu et al. 2024, since key outliers sit in fixed channels). The block's earlier
    keys come from ``ring``. Then every new key is written to ``ring`` (slot ``j % W``):
    the readers take the positions of the incomplete last block from it. Blocks past
    ``L`` are skipped; the :func:`sentinel_kernels.kv_cache` object checks capacity.

    Args:
        x: ``[B, H, S, D]`` keys, float32/float16/bfloat16, any strides; rounded to the
            ring's dtype first (a block quantizes the same numbers whether its keys came
            from the ring or from ``x``).
        codes: uint8 ``[B, H, L, ceil(D/2)]`` (two codes a byte, the int4 layout), ``L`` a
            multiple of ``block``; written in place.
        scales: float16 ``[B, H, L / block, D, 2]``, ``(s, m)`` per channel per block.
        ring: ``[B, H, W, D]`` full-precision ring, ``W`` a multiple of ``block``.
        start: ``[B]`` int32/int64 on x's device, the first new position of each row.
        block: ``T``, tokens per quantization block.
    """
    call_op(_kv_append_key_blocks_op, x, codes, scales, ring, start, int(block))


# --------------------------------------------------------------------------------------
# Rotary embedding of q and k + append of the rotated K and of V + lens += S
# --------------------------------------------------------------------------------------

_RKA = "rope_kv_append"
#: Longest chunk the fused kernel takes (one program per batch row loops over the row's
#: heads and tokens: meant for decode steps); longer chunks run the composition.
ROPE_KV_APPEND_MAX_FUSED = 16


def check_rope_kv_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    kv_format: str,
    k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None,
    wrap: bool,
    op: str = _RKA,
) -> None:
    """The argument checks of :func:`rope_kv_append` (errors name ``op``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_head_vectors(t, name, op)
    if v.shape != k.shape:
        raise ValueError(f"{op}: v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    try:
        check_rope(q, k, cos, sin)
    except (TypeError, ValueError) as e:
        # The rotary op's own checks, reported under this op's name.
        msg = str(e).removeprefix(f"{ROPE_OP}: ")
        raise type(e)(f"{op}: {msg}") from None
    _check_cache_append(
        op, ("k", "k_cache", "lens", "k_scales"), k, k_cache, lens, kv_format, k_scales, wrap
    )
    _check_cache_append(
        op, ("v", "v_cache", "lens", "v_scales"), v, v_cache, lens, kv_format, v_scales, wrap
    )
    check_same_device(op, q=q, k=k, v=v, lens=lens)


@torch.library.custom_op(
    "sentinel::rope_kv_append", mutates_args=("k_cache", "v_cache", "lens", "k_scales", "v_scales")
)
def _rope_kv_append_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    kv_format: str,
    k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None,
    wrap: bool,
) -> torch.Tensor:
    check_rope_kv_append(
        q, k, v, cos, sin, k_cache, v_cache, lens, kv_format, k_scales, v_scales, wrap
    )
    backend = _backend.resolve(q.device)
    seq = q.shape[2]
    if backend == "reference":
        return reference_rope_kv_append(
            q, k, v, cos, sin, k_cache, v_cache, lens, kv_format, k_scales, v_scales, wrap
        )
    if backend == "triton" and 0 < seq <= ROPE_KV_APPEND_MAX_FUSED:
        from ..kernels import kv_append as kkv

        q_out = _backend.empty_output(q.shape, q.dtype, q.device)
        cos3, sin3 = (cos.unsqueeze(0), sin.unsqueeze(0)) if cos.dim() == 2 else (cos, sin)
        # The append tiles read channels at unit stride (the usual [B, S, H, D] views).
        k_unit = k if k.stride(-1) == 1 else k.contiguous()
        v_unit = v if v.stride(-1) == 1 else v.contiguous()
        if try_fused_launch(
            "rope_kv_append",
            lambda: kkv.rope_kv_append_fwd(
                q,
                k_unit,
                v_unit,
                cos3,
                sin3,
                q_out,
                k_cache,
                v_cache,
                lens,
                kv_format=kv_format,
                k_scales=k_scales,
                v_scales=v_scales,
                wrap=wrap,
            ),
        ):
            return q_out
    # Longer chunks (Triton), the C++ backend and a fused kernel that could not run: the
    # three ops, then the length update.
    q_out, k_rot = rotary_embedding(q, k, cos, sin)
    kv_append(k_rot, k_cache, lens, kv_format, k_scales, wrap)
    kv_append(v, v_cache, lens, kv_format, v_scales, wrap)
    lens.add_(seq)
    return q_out


@_rope_kv_append_op.register_fake
def _(q: torch.Tensor, *rest: Any) -> torch.Tensor:
    check_rope_kv_append(q, *rest)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


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
    """Rotary embedding of q and k, append of the rotated keys and the values to a KV
    cache, and ``lens += S``: one kernel launch on a GPU for decode-sized chunks.

    Exactly (bit for bit, in every dtype and format) the composition::

        q_out, k_rot = rotary_embedding(q, k, cos, sin)
        kv_append(k_rot, k_cache, lens, kv_format, k_scales, wrap)
        kv_append(v, v_cache, lens, kv_format, v_scales, wrap)
        lens += S
        return q_out

    i.e. ``x * cos + rotate_half(x) * sin`` (:func:`~sentinel_kernels.ops.rotary_embedding`,
    RoFormer, Su et al. 2021, rounded as transformers rounds it) for ``x`` in ``(q, k)``,
    then token ``i`` of row ``b`` quantized into slot ``lens[b] + i`` (or ``(lens[b] + i)
    % L`` with ``wrap``) of each cache by :func:`kv_append`'s rule. A decode step spends
    four launches on this otherwise (rotary, two appends, the length add); fusing the
    rotary embedding and the cache write into one pass is what vLLM's
    ``rotary_embedding`` + ``reshape_and_cache`` kernels and FlashInfer's
    ``apply_rope_with_cos_sin_cache`` + ``append_paged_kv_cache`` do in two.

    On CUDA (Triton) chunks of up to :data:`ROPE_KV_APPEND_MAX_FUSED` tokens take one
    launch of one program per batch row, which reads ``lens[b]`` once and stores
    ``lens[b] + S`` last (no host sync: CUDA-graph capturable); longer chunks, the C++
    (CPU) backend and the reference run the composition of the existing ops (no separate
    C++ kernel), so CPU results are those of the three ops.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, S, D]``; any strides (typically
            ``proj(x).view(B, S, H, D).transpose(1, 2)``); q and k float32/float16/bfloat16
            of one dtype, v any of them; ``D`` even.
        cos, sin: ``[B, S, D]``, ``[1, S, D]`` or ``[S, D]``, of q's dtype.
        k_cache, v_cache: ``[B, Hkv, L, D]`` (``"dense"``, any float dtype), int8 ``[B,
            Hkv, L, D]`` (``"int8"``) or uint8 ``[B, Hkv, L, ceil(D/2)]`` (``"int4"``), unit
            last stride; written in place (each may have its own ``L``).
        lens: ``[B]`` int32/int64 on q's device: each row's first new position; advanced
            by ``S`` in place.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"`` (per-token groups; KIVI key
            blocks are :func:`kv_append_key_blocks`).
        k_scales, v_scales: float16 ``[B, Hkv, L, G]`` (int8) or ``[B, Hkv, L, G, 2]``
            (int4); ``None`` for dense; written in place.
        wrap: ring-buffer slots (sliding-window caches).
    Returns:
        ``q_out``: the rotated queries, a new contiguous ``[B, Hq, S, D]`` of q's dtype.
    Raises:
        TypeError: a non-tensor argument or a wrong dtype.
        ValueError: inconsistent shapes, formats, scales or devices (the checks of
            :func:`~sentinel_kernels.ops.rotary_embedding` and :func:`kv_append`).
    """
    return call_op(
        _rope_kv_append_op,
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        lens,
        kv_format,
        k_scales,
        v_scales,
        bool(wrap),
    )

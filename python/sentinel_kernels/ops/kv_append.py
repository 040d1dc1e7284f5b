"""``sentinel::kv_append``: quantize-on-append into a preallocated (compressed) KV cache.

New keys or values ``x [B, H, S, D]`` are written at positions ``start[b] + i`` of each
row, in one fused pass that computes the group scales and codes and stores them::

    int8:  s = f16(absmax / 127),         code = rint(x / s)            in [-127, 127]
    int4:  s = f16((max - min) / 15),     code = rint((x - f16(min)) / s) in [0, 15]

per group of ``ceil(D / G)`` channels of each head vector (KIVI, Liu et al. 2024, and
per-token group quantization as in FlexGen / Atom). The exact rule, the packed int4
layout and the ring (``wrap``) semantics are in :mod:`sentinel_kernels.reference.kv_formats`;
every backend writes the same codes and scales bit for bit. ``start`` lives on the
device, so an append inside a CUDA graph needs no host sync.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference.kv_append import kv_append as reference_kv_append
from ..reference.kv_append import kv_append_key_blocks as reference_kv_append_key_blocks
from ..reference.kv_formats import KV_FORMATS, kv_code_width, kv_groups
from ._checks import (
    FLOAT_DTYPES,
    check_head_vectors,
    check_int,
    check_same_device_optional,
    check_tensor,
    check_writable_tail,
    data_ptr,
    dtype_name,
    kernel_strides,
)
from ._dispatch import call_op

__all__ = ["kv_append", "kv_append_key_blocks"]

_OP = "kv_append"


def _check_x(op: str, x: torch.Tensor) -> None:
    check_head_vectors(x, "x", op)
    if x.shape[3] < 1:
        raise ValueError(f"{op}: head_dim must be >= 1, got shape {tuple(x.shape)}")


def _check_start(op: str, start: torch.Tensor, b: int) -> None:
    check_tensor(start, "start", op, (torch.int32, torch.int64))
    if tuple(start.shape) != (b,):
        raise ValueError(f"{op}: start must be [batch] = ({b},), got {tuple(start.shape)}")


def _check_append(x, cache, start, kv_format, scales, wrap) -> None:
    _check_x(_OP, x)
    b, h, _, d = x.shape
    if kv_format not in KV_FORMATS:
        raise ValueError(f"{_OP}: kv_format {kv_format!r} is not one of {KV_FORMATS}")
    want_dtype = {"int8": (torch.int8,), "int4": (torch.uint8,), "dense": FLOAT_DTYPES}
    check_tensor(cache, "cache", _OP, want_dtype[kv_format])
    width = kv_code_width(d, kv_format)
    if cache.dim() != 4 or tuple(cache.shape[:2]) != (b, h) or cache.shape[3] != width:
        raise ValueError(
            f"{_OP}: cache for kv_format {kv_format!r} must be [batch={b}, heads={h}, L, "
            f"{width}] (head_dim {d}), got {tuple(cache.shape)}"
        )
    if cache.shape[2] < 1:
        raise ValueError(f"{_OP}: cache has no slots (L = 0)")
    tail = 2 if kv_format == "int4" else 1
    if kv_format == "dense":
        if scales is not None:
            raise ValueError(f"{_OP}: a dense cache takes no scales")
    else:
        if scales is None:
            raise ValueError(f"{_OP}: kv_format {kv_format!r} needs scales")
        check_tensor(scales, "scales", _OP, (torch.float16,))
        ok = scales.dim() == 3 + tail and tuple(scales.shape[:3]) == tuple(cache.shape[:3])
        if ok and tail == 2:
            ok = scales.shape[4] == 2
        if not ok:
            want = "[B, H, L, G]" if tail == 1 else "[B, H, L, G, 2]"
            raise ValueError(
                f"{_OP}: scales must be {want} matching cache "
                f"{tuple(cache.shape[:3])}, got {tuple(scales.shape)}"
            )
        kv_groups(d, scales.shape[3])
    _check_start(_OP, start, b)
    if not isinstance(wrap, bool):
        raise ValueError(f"{_OP}: wrap must be a bool, got {wrap!r}")
    check_same_device_optional(_OP, x=x, cache=cache, start=start, scales=scales)
    check_writable_tail(_OP, "cache", cache, 1)
    if scales is not None:
        check_writable_tail(_OP, "scales", scales, tail)


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
) -> None:
    _check_append(x, cache, start, kv_format, scales, wrap)
    backend, x, st = _prepare(x, start)
    if backend == "triton":
        from ..kernels import kv_append as kkv

        kkv.kv_append_fwd(x, cache, st, kv_format=kv_format, scales=scales, wrap=wrap)
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
        )
    elif backend == "reference":
        reference_kv_append(x, cache, st, kv_format, scales, wrap)


# The fake only validates: the op mutates its inputs and returns nothing.
_kv_append_op.register_fake(_check_append)


def kv_append(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str = "dense",
    scales: torch.Tensor | None = None,
    wrap: bool = False,
) -> None:
    """Write ``x`` into a preallocated KV cache at per-row positions, quantizing on the way.

    Token ``i`` of row ``b`` goes to position ``start[b] + i``: slot ``start[b] + i``, or
    ``(start[b] + i) % L`` with ``wrap`` (a ring; when ``S > L`` only the last ``L``
    tokens land). Without ``wrap``, slots ``>= L`` are not written: the caller (the
    :func:`sentinel_kernels.kv_cache` object) raises before using a cache past its
    capacity, since checking ``start`` here would need a device-to-host sync.

    Args:
        x: ``[B, H, S, D]`` float32/float16/bfloat16 keys or values, any strides.
        cache: ``[B, H, L, D]`` (``"dense"``, any float dtype), int8 ``[B, H, L, D]``
            (``"int8"``) or uint8 ``[B, H, L, ceil(D/2)]`` (``"int4"``, two codes a byte),
            written in place; unit stride in the last dim.
        start: ``[B]`` int32/int64 on x's device, the first position of each row.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        scales: float16 ``[B, H, L, G]`` (int8) or ``[B, H, L, G, 2]`` (int4: scale and
            minimum), ``G`` groups of ``ceil(D / G)`` channels; written in place.
        wrap: ring-buffer slots (sliding-window caches).
    """
    call_op(_kv_append_op, x, cache, start, kv_format, scales, bool(wrap))


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

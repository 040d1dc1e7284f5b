"""Input validation and layout helpers shared by the ops: one place, clear messages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Largest head dim the attention kernels take.
MAX_HEAD_DIM = 256
MASK_DTYPES = (
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    x: object,
    name: str,
    op: str,
    dtypes: Iterable[torch.dtype] | None = None,
    min_dim: int = 0,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``op`` and ``name`` unless ``x`` fits."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            raise TypeError(
                f"{op}: {name} has dtype {str(x.dtype).replace('torch.', '')}; "
                f"supported: {_dtype_names(dtypes)}"
            )
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """Raise ``ValueError`` unless all ``tensors`` are on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")
    return first


def normalize_dim(dim: int, ndim: int, op: str) -> int:
    """Map a possibly negative ``dim`` into ``[0, ndim)`` or raise ``IndexError``."""
    if not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} out of range for a tensor with {ndim} dimension(s)")
    return dim % ndim


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D ``[rows, cols]`` view of ``x`` over its last dim, copying only when necessary.

    Leading dimensions are flattened without a copy when their strides allow it (any
    column stride is kept: the kernels take it); otherwise, or when a stride is 0 (an
    expanded tensor), the data is made contiguous first.
    """
    cols = x.shape[-1]
    try:
        x2 = x.view(-1, cols)
    except RuntimeError:
        x2 = x.reshape(-1, cols).contiguous()
    if x2.numel() > 0 and (x2.stride(0) <= 0 or x2.stride(1) <= 0):
        x2 = x2.contiguous()
    return x2


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the names the C++ layer takes)."""
    return str(dtype).replace("torch.", "")


def check_int(value: object, name: str, op: str, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")


def check_head_vectors(x: object, name: str, op: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """``x`` must be a 4-D ``[batch, heads, seq, head_dim]`` tensor of ``dtypes``."""
    check_tensor(x, name, op, dtypes)
    t = cast(torch.Tensor, x)  # check_tensor raised unless it is one
    if t.dim() != 4:
        raise ValueError(
            f"{op}: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
        )
    return t


def check_gqa(op: str, hq: int, hkv: int) -> None:
    """Query heads must be a multiple of the key/value heads (GQA / MQA)."""
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA)"
        )


def check_head_dim(op: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q ``[B, Hq, Sq, D]`` and k, v ``[B, Hkv, Sk, D]`` of one float dtype, GQA heads."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_head_vectors(t, name, op)
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
    check_head_dim(op, d)
    check_gqa(op, hq, k.shape[1])


def check_masks(
    op: str,
    b: int,
    hq: int,
    sk: int,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    cache_lens: torch.Tensor | None,
    scale: float | None,
    window: int,
) -> None:
    """The attention options: head mask ``[Hq]`` / ``[B, Hq]``, key padding mask
    ``[B, Sk]``, ``cache_lens [B]`` int, a finite scale and a window ``>= 0``."""
    if head_mask is not None:
        check_tensor(head_mask, "head_mask", op, MASK_DTYPES)
        if tuple(head_mask.shape) not in ((hq,), (b, hq)):
            raise ValueError(
                f"{op}: head_mask shape {tuple(head_mask.shape)} must be [heads] = ({hq},) or "
                f"[batch, heads] = ({b}, {hq})"
            )
    if attn_mask is not None:
        check_tensor(attn_mask, "attn_mask", op, MASK_DTYPES)
        if tuple(attn_mask.shape) != (b, sk):
            raise ValueError(
                f"{op}: attn_mask shape {tuple(attn_mask.shape)} must be a key padding mask "
                f"[batch, key_len] = ({b}, {sk}) (nonzero = attend); 4-D additive masks are "
                "not taken"
            )
    if cache_lens is not None:
        check_tensor(cache_lens, "cache_lens", op, (torch.int32, torch.int64))
        if tuple(cache_lens.shape) != (b,):
            raise ValueError(f"{op}: cache_lens shape {tuple(cache_lens.shape)} must be [{b}]")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{op}: window must be an int >= 0 (0 = no window), got {window!r}")


def check_same_device_optional(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """:func:`check_same_device` over the tensors that are not ``None``."""
    return check_same_device(op, **{n: t for n, t in tensors.items() if t is not None})


# --------------------------------------------------------------------------- layouts


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride in its last dim and no negative stride (copied only if not)."""
    if t.stride(-1) != 1 or any(s < 0 for s in t.stride()):
        return t.contiguous()
    return t


def tail_contiguous(t: torch.Tensor, dims: int) -> bool:
    """Whether the last ``dims`` dims of ``t`` form one contiguous run (size-1 dims free)."""
    expect = 1
    for size, stride in zip(reversed(t.shape[-dims:]), reversed(t.stride()[-dims:]), strict=True):
        if size > 1 and stride != expect:
            return False
        expect *= size
    return True


def unit_tail(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    """``t`` with its last ``dims`` dims one contiguous run (copied only if not)."""
    if t is None:
        return None
    return t if tail_contiguous(t, dims) and all(s >= 0 for s in t.stride()) else t.contiguous()


def check_writable_tail(op: str, name: str, t: torch.Tensor, dims: int) -> None:
    """An output written in place needs its last ``dims`` dims contiguous: a copy would be
    silently lost."""
    if not tail_contiguous(t, dims) or any(s < 0 for s in t.stride()):
        raise ValueError(
            f"{op}: {name} must have unit stride over its last {dims} dim(s) (it is "
            f"written in place), got strides {t.stride()}"
        )


def kernel_strides(t: torch.Tensor | None, dims: int | None = None) -> list[int]:
    """Strides as the C++ kernels take them: a size-1 dim may carry any stride (even 0 from
    ``expand``), and the kernels never step it, so it is passed as 0. ``dims``: only the
    first ``dims`` (``[0] * dims`` for ``None``)."""
    if t is None:
        return [0] * (dims or 0)
    out = [s if n > 1 else 0 for s, n in zip(t.stride(), t.shape, strict=True)]
    return out[:dims] if dims is not None else out


def native_rows(x2: torch.Tensor) -> tuple:
    """``(pointer, dtype name, rows, cols, row stride, column stride)`` of a 2-D row view:
    how the C++ row kernels (quantize, RMSNorm) take their input."""
    rows, cols = x2.shape
    return x2.data_ptr(), dtype_name(x2.dtype), rows, cols, x2.stride(0), x2.stride(1)


def data_ptr(t: torch.Tensor | None) -> int:
    """``t.data_ptr()``, 0 for ``None`` (the C++ kernels' "absent")."""
    return t.data_ptr() if t is not None else 0

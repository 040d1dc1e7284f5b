"""``sentinel::quantize_int8`` and ``sentinel::dequantize_int8``: symmetric absmax INT8.

Quantization along one dimension (per token for activations, per output channel for
weights), as in LLM.int8() (Dettmers et al., 2022) and SmoothQuant (Xiao et al., 2023)::

    scale = max|x| / 127          (fp32; one value per slice along ``dim``)
    q     = clamp(rint(x * (127 / max|x|)), -127, 127)      rint: round half to even

Conventions, identical on every backend (Triton, C++, reference agree bit for bit):

* an all-zero slice gets ``scale = 0`` and ``q = 0`` (dequantizes to exact zeros);
* ``-128`` is never produced, so the int8 range is symmetric;
* the dequantization error is at most ``scale / 2`` per element;
* NaN/Inf inputs are not checked (that would need a device sync): a slice containing
  them gets an undefined ``q`` and a non-finite ``scale``.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import quantize as ref
from ._checks import (
    FLOAT_DTYPES,
    as_rows,
    check_same_device,
    check_tensor,
    dtype_name,
    native_rows,
    normalize_dim,
)
from ._dispatch import call_op

_OP = "quantize_int8"
_DEQ = "dequantize_int8"


def _check_quantize(x: torch.Tensor) -> None:
    check_tensor(x, "x", _OP, FLOAT_DTYPES, min_dim=1)
    if x.shape[-1] == 0:
        raise ValueError(
            f"{_OP}: cannot quantize along an empty dimension (shape {tuple(x.shape)})"
        )


@torch.library.custom_op("sentinel::quantize_int8", mutates_args=())
def _quantize_int8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize(x)
    backend = _backend.resolve(x.device)
    if backend == "reference":
        # the fake declares contiguous outputs; the reference keeps the input's strides
        q, scale = ref.quantize_int8(x)
        return q.contiguous(), scale.contiguous()
    x2 = x if x.dim() == 2 and x.stride(0) > 0 and x.stride(1) > 0 else as_rows(x)
    rows, cols = x2.shape
    # Outputs are allocated in their final shape and written through flat indexing: every
    # host-side torch call costs microseconds, which is the whole budget of a small op.
    q = _backend.empty_output(x.shape, torch.int8, x.device)
    scale = _backend.empty_output(x.shape[:-1], torch.float32, x.device)
    if rows > 0:
        if backend == "triton":
            from ..kernels import quantize as kq

            kq.quantize_rows(x2, q, scale)
        else:
            _backend.native_module().quantize_int8(
                *native_rows(x2),
                q.data_ptr(),
                cols,
                scale.data_ptr(),
                _backend.native_threads(),
            )
    return q, scale


@_quantize_int8_op.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize(x)
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device),
    )


def _check_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
    check_tensor(q, "q", _DEQ, (torch.int8,), min_dim=1)
    check_tensor(scale, "scale", _DEQ, (torch.float32,))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_DEQ}: output dtype {dtype} not supported; use float32/float16/bfloat16")
    if tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(
            f"{_DEQ}: scale shape {tuple(scale.shape)} must be q's shape without the quantized "
            f"dim, {tuple(q.shape[:-1])}"
        )
    check_same_device(_DEQ, q=q, scale=scale)


@torch.library.custom_op("sentinel::dequantize_int8", mutates_args=())
def _dequantize_int8_op(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize(q, scale, dtype)
    backend = _backend.resolve(q.device)
    if backend == "reference" or q.numel() == 0:
        return ref.dequantize_int8(q, scale, dtype).contiguous()
    q2 = q if q.dim() == 2 and q.stride(0) > 0 and q.stride(1) > 0 else as_rows(q)
    rows, cols = q2.shape
    s = scale if scale.is_contiguous() else scale.contiguous()
    out = _backend.empty_output(q.shape, dtype, q.device)
    if backend == "triton":
        from ..kernels import quantize as kq

        kq.dequantize_rows(q2, s, out)
    else:
        _backend.native_module().dequantize_int8(
            q2.data_ptr(),
            rows,
            cols,
            q2.stride(0),
            q2.stride(1),
            s.data_ptr(),
            1,
            out.data_ptr(),
            dtype_name(dtype),
            cols,
            _backend.native_threads(),
        )
    return out


@_dequantize_int8_op.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize(q, scale, dtype)
    return torch.empty(q.shape, dtype=dtype, device=q.device)


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT8 quantization of ``x`` along ``dim``.

    ``scale = max|x| / 127`` per slice along ``dim`` and
    ``q = clamp(rint(x * 127 / max|x|), -127, 127)`` (round half to even); an all-zero
    slice gets ``scale = 0``, ``q = 0``. ``q * scale`` is within ``scale / 2`` of ``x``.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (any strides), on CPU or CUDA.
        dim: the dimension reduced by the absmax (``-1``: per row / per token).
    Returns:
        ``(q, scale)``: ``q`` int8 with ``x``'s shape; ``scale`` float32 with ``x``'s shape
        minus ``dim``. For ``dim`` other than the last, ``q`` is a permuted view.
    Raises:
        TypeError: unsupported dtype. ValueError: 0-d input or an empty ``dim``.
    """
    check_tensor(x, "x", _OP, FLOAT_DTYPES, min_dim=1)
    d = normalize_dim(dim, x.dim(), _OP)
    xm = x if d == x.dim() - 1 else x.movedim(d, -1)
    q, scale = call_op(_quantize_int8_op, xm)
    return (q if d == x.dim() - 1 else q.movedim(-1, d)), scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dim: int = -1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``q * scale`` broadcast along ``dim``, as ``dtype``.

    Computed in fp32 and rounded once (to nearest even) to ``dtype``.

    Args:
        q: int8 tensor; scale: float32 with ``q``'s shape minus ``dim``;
        dim: the quantized dimension; dtype: float32/float16/bfloat16.
    """
    check_tensor(q, "q", _DEQ, (torch.int8,), min_dim=1)
    d = normalize_dim(dim, q.dim(), _DEQ)
    qm = q if d == q.dim() - 1 else q.movedim(d, -1)
    out = call_op(_dequantize_int8_op, qm, scale, dtype)
    return out if d == q.dim() - 1 else out.movedim(-1, d)

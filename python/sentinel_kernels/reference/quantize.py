"""Reference symmetric absmax INT8 quantization along the last dimension."""

from __future__ import annotations

import torch

QMAX = 127


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` row-wise along its last dimension.

    ``absmax = max |x|`` over the last dim (in fp32), ``scale = absmax / 127``,
    ``q = clamp(round_half_even(x * (127 / absmax)), -127, 127)``; an all-zero row gets
    ``scale = 0`` and ``q = 0``. Each step is one correctly rounded fp32 operation, which
    is what the Triton and C++ kernels compute too, so all three agree bit for bit.

    Args:
        x: ``[..., cols]`` float32/float16/bfloat16.
    Returns:
        ``(q, scale)``: ``q`` int8 of ``x.shape``, ``scale`` float32 of ``x.shape[:-1]``.
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    # Tensor-by-tensor division: PyTorch computes `scalar / tensor` (and on CUDA
    # `tensor / scalar`) through a reciprocal, which is not correctly rounded.
    qmax = torch.full_like(absmax, QMAX)
    scale = absmax / qmax
    nonzero = absmax > 0
    inv = torch.where(nonzero, qmax / torch.where(nonzero, absmax, qmax), 0.0)
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` along the last dimension, computed in fp32 and rounded to ``dtype``.

    Args:
        q: ``[..., cols]`` int8.
        scale: ``q.shape[:-1]`` float32.
        dtype: output dtype (float32/float16/bfloat16).
    """
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)

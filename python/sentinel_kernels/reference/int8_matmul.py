"""Reference INT8 linear layers: W8A16 (weight-only) and W8A8 (SmoothQuant), in fp32."""

from __future__ import annotations

import torch

from .fused import rms_norm, silu_mul
from .quantize import quantize_int8


def dequantize_weight(
    w_int8: torch.Tensor, w_scale: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """fp32 weights ``w_int8 * scale``.

    Args:
        w_int8: ``[N, K]`` int8.
        w_scale: float32 ``[N]`` (per output channel) or ``[N, ceil(K / group_size)]``
            (one scale per run of ``group_size`` input channels; the last group may be
            partial).
        group_size: ``None`` for per-channel scales.
    Returns:
        ``[N, K]`` float32.
    """
    w = w_int8.float()
    if group_size is None:
        return w * w_scale.float().unsqueeze(-1)
    k = w.shape[-1]
    per_column = w_scale.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return w * per_column


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """W8A16 linear: ``y = x @ (w_int8 * scale)^T + bias``, computed in fp32.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32.
        w_int8, w_scale, group_size: see :func:`dequantize_weight`.
        bias: ``[N]`` or ``None``.
    Returns:
        ``[..., N]`` in ``x.dtype`` (fp32 result rounded once).
    """
    y = x.float() @ dequantize_weight(w_int8, w_scale, group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 quantization of ``x / smooth`` (SmoothQuant's activation side).

    ``xs = float32(x) / smooth`` (one correctly rounded fp32 division), then
    :func:`~sentinel_kernels.reference.quantize.quantize_int8` on ``xs`` along the last
    dimension. Returns ``(q [..., K] int8, scale [...] float32)``.
    """
    xs = x.float()
    if smooth is not None:
        xs = xs / smooth.float()
    return quantize_int8(xs)


def int8_linear_a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear (SmoothQuant): int8 activations times int8 weights, in fp32.

    ``q, a_scale = quantize_activations(x, smooth)``;
    ``y = (q * a_scale) @ (w_int8 * w_scale)^T + bias``. The weights were multiplied by
    ``smooth`` per input channel before they were quantized, so ``y ~= x @ W^T``.

    Args:
        x: ``[..., K]`` float16/bfloat16/float32.
        w_int8: ``[N, K]`` int8; w_scale: float32 ``[N]``.
        smooth: float32 ``[K]`` or ``None``; bias: ``[N]`` or ``None``.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    q, a_scale = quantize_activations(x, smooth)
    xq = q.float() * a_scale.unsqueeze(-1)
    y = xq @ dequantize_weight(w_int8, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear_fused(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_input: bool = False,
) -> torch.Tensor:
    """A W8A16 linear with what a decoder layer does around it, as the eager layer does it::

        a = silu_mul(x[..., :K], x[..., K:]) if silu_input else x
        a = rms_norm(a, norm_weight, eps) if norm_weight is not None else a
        y = int8_linear(a, w_int8, w_scale, bias, group_size)
        y = residual + y if residual is not None else y

    Each step rounds to ``x.dtype`` as the separate ops do (``rms_norm``'s normalised row,
    ``silu_mul``'s silu and product, the linear's output before the residual add).

    Args:
        x: ``[..., K]`` float16/bfloat16/float32 (``[..., 2K]``, ``[gate | up]``, with
            ``silu_input``).
        w_int8, w_scale, group_size, bias: see :func:`int8_linear`.
        norm_weight: ``[K]`` of ``x.dtype`` or ``None``; eps: the RMSNorm epsilon.
        residual: ``[..., N]`` of ``x.dtype`` or ``None``.
        silu_input: whether ``x`` holds the gate and up halves of a SwiGLU.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = w_int8.shape[-1]
    a = silu_mul(x[..., :k], x[..., k:]) if silu_input else x
    if norm_weight is not None:
        a = rms_norm(a, norm_weight, eps)
    y = int8_linear(a, w_int8, w_scale, bias, group_size)
    return residual + y if residual is not None else y

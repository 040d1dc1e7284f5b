"""Reference RMSNorm, rotary embedding and SiLU-gated product: transformers' eager formulas.

Each function is the exact PyTorch code of the Hugging Face Llama family (``LlamaRMSNorm``,
``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``, ``act_fn(gate) * up`` of ``LlamaMLP``),
so the fused ops can be checked against the very roundings a patched model used to see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``.

    ``LlamaRMSNorm.forward`` (also Mistral, Qwen2, Qwen3): the normalised row is computed in
    fp32, rounded to ``x.dtype``, then multiplied by ``weight`` under torch type promotion,
    so the result dtype is ``torch.promote_types(weight.dtype, x.dtype)``.

    Args:
        x: ``[..., N]`` float32/float16/bfloat16. weight: ``[N]``. eps: added to the mean.
    """
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``: the residual add of a decoder layer
    followed by the next norm (vLLM's ``fused_add_rms_norm``, out of place here).

    The sum is rounded to ``x.dtype`` before it is normalised, as in the eager model.
    """
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * cos + rotate_half(x) * sin`` for ``x`` in ``(q, k)``, cos/sin broadcast over heads.

    ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` of transformers (RoFormer's
    rotary position embedding, Su et al., 2021, in the half-split convention): each product
    and the sum are rounded to the input dtype, as torch does for 16-bit tensors.

    Args:
        q: ``[B, Hq, S, D]``; k: ``[B, Hkv, S, D]``; cos, sin: ``[B or 1, S, D]`` or ``[S, D]``.
    Returns:
        ``(q_out, k_out)``, contiguous ``[B, H, S, D]`` (the layout of the fused op).
    """
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q_out = (q * c) + (_rotate_half(q) * s)
    k_out = (k * c) + (_rotate_half(k) * s)
    return q_out.contiguous(), k_out.contiguous()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the SwiGLU of ``LlamaMLP``; Shazeer, 2020).

    torch computes ``silu`` in fp32 as ``g / (1 + exp(-g))`` and rounds it to the dtype,
    then rounds the product.
    """
    return F.silu(gate) * up

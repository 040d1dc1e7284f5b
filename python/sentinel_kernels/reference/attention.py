"""Reference attention with head masks, padding and sliding windows.

The semantics every backend of ``sentinel::attention`` follows, and the rule
:mod:`sentinel_kernels.reference.decode_attention` applies to the readable positions of a
cache (written here once, in plain PyTorch, as the oracle)::

    q [B, Hq, Sq, D]    k, v [B, Hkv, Sk, D]    Hq = G * Hkv (GQA: query head h reads
                                                  KV head h // G)
    L_b   = cache_lens[b] if given, else Sk      (keys j >= L_b do not exist)
    p_i   = L_b - Sq + i                          (position of query i: the queries are the
                                                  last Sq tokens, "bottom-right" causal)
    key j visible to query i  <=>  j < L_b
                                   and key_mask[b, j]          (if a key mask is given)
                                   and (not causal or j <= p_i)
                                   and (window == 0 or p_i - j < window)
                                   and (seg_start is None or j >= seg_start[b, i])
    out[b, h, i] = sum_j softmax_j(scale * q_i . k_j over visible j) v_j
    out[b, h, i] = 0   when no key is visible to query i (a fully padded row)
    out[b, h, :] = 0   when head_mask[b, h] (or head_mask[h]) is 0 (a pruned head)

``scale`` defaults to ``1 / sqrt(D)``. Sums and the softmax run in fp32 (fp64 when the
inputs are fp64), and the output is rounded once to the input dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "visibility_mask"]


def visibility_mask(
    batch: int,
    sq: int,
    sk: int,
    *,
    causal: bool,
    cache_lens: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    window: int = 0,
    seg_start: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``[B, Sq, Sk]``: which keys each query sees (the rule in the module docstring)."""
    j = torch.arange(sk, device=device)
    if cache_lens is None:
        lens = torch.full((batch,), sk, device=device, dtype=torch.long)
    else:
        lens = cache_lens.to(device=device, dtype=torch.long)
    pos = lens[:, None] - sq + torch.arange(sq, device=device)[None, :]  # [B, Sq]
    vis = j[None, None, :] < lens[:, None, None]
    if key_mask is not None:
        vis = vis & (key_mask.to(device) != 0)[:, None, :]
    if causal:
        vis = vis & (j[None, None, :] <= pos[:, :, None])
    if window:
        vis = vis & (pos[:, :, None] - j[None, None, :] < window)
    if seg_start is not None:
        seg = seg_start.to(device=device, dtype=torch.long)
        vis = vis & (j[None, None, :] >= seg[:, :, None])
    return vis


def _head_keep(head_mask: torch.Tensor | None, batch: int, heads: int, device) -> torch.Tensor:
    if head_mask is None:
        return torch.ones(batch, heads, dtype=torch.bool, device=device)
    keep = head_mask.to(device) != 0
    if keep.dim() == 1:
        keep = keep[None, :].expand(batch, heads)
    return keep


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
    seg_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked multi-head attention; see the module docstring for the exact rule.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``.
        causal: bottom-right aligned causal mask (query i at position ``L_b - Sq + i``).
        head_mask: ``[Hq]`` or ``[B, Hq]``; zero entries are pruned heads (output 0).
        attn_mask: key padding mask ``[B, Sk]``, nonzero = keep (an HF ``attention_mask``).
        scale: softmax scale, default ``1/sqrt(D)``.
        window: sliding window (0 = none): query at p sees keys ``p - window < j <= p``.
        cache_lens: ``[B]`` valid key counts (decode); default ``Sk`` for every row.
        seg_start: ``[B, Sq]`` int, a per-query lower bound on the keys (packed
            prompts): query i sees key j only if ``j >= seg_start[b, i]``.
    Returns:
        ``[B, Hq, Sq, D]`` in ``q.dtype``.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sk == 0 or sq == 0:  # no keys: every row sees nothing and is zero
        return q.new_zeros(q.shape)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    vis = visibility_mask(
        b,
        sq,
        sk,
        causal=causal,
        cache_lens=cache_lens,
        key_mask=attn_mask,
        window=window,
        seg_start=seg_start,
        device=q.device,
    )[:, None]
    scores = scores.masked_fill(~vis, float("-inf"))
    # Keys no query sees may hold anything (unwritten cache slots): 0 * NaN would leak.
    vf = vf.masked_fill(~vis.any(dim=2)[:, :, :, None], 0.0)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)  # exp(-inf) = 0 for hidden keys
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    keep = _head_keep(head_mask, b, hq, q.device)
    out = out * keep[:, :, None, None].to(acc)
    return out.to(q.dtype)

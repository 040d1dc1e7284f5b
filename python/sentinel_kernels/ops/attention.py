"""``sentinel::attention``: prefill attention with pruned-head masking.

Scaled dot-product attention::

    out[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

over the keys visible to query i (bottom-right causal, key padding, sliding window: the
exact rule is in :mod:`sentinel_kernels.reference.attention`), with ``out[b, h] = 0`` for a
pruned head. The kernels follow FlashAttention-2 (Dao, 2023): tiles of queries stream over
tiles of keys with an online softmax, so the ``[Sq, Sk]`` score matrix never exists.
Decode over a cache is :mod:`sentinel_kernels.ops.decode_attention`.

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
from ._checks import (
    check_masks,
    check_qkv,
    check_same_device_optional,
    check_tensor,
    data_ptr,
    dtype_name,
    kernel_strides,
    unit_last,
)
from ._dispatch import call_op

__all__ = ["attention"]


def check_attention(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    cache_lens: torch.Tensor | None,
    scale: float | None,
    window: int,
    seg_start: torch.Tensor | None = None,
) -> None:
    """Validate the arguments of an attention over full-precision ``q``, ``k``, ``v``."""
    check_qkv(op, q, k, v)
    b, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    check_masks(op, b, hq, k.shape[2], head_mask, attn_mask, cache_lens, scale, window)
    if seg_start is not None:
        check_tensor(seg_start, "seg_start", op, (torch.int32, torch.int64))
        if tuple(seg_start.shape) != (b, sq):
            raise ValueError(
                f"{op}: seg_start shape {tuple(seg_start.shape)} must be [batch, query_len] "
                f"= ({b}, {sq}) (the first key each query may see)"
            )
    check_same_device_optional(
        op,
        q=q,
        k=k,
        v=v,
        head_mask=head_mask,
        attn_mask=attn_mask,
        cache_lens=cache_lens,
        seg_start=seg_start,
    )


def head_tables(
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


def key_mask_int8(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels' key mask: int8 ``[B, Sk]`` contiguous, nonzero = attend.

    A mask that is already that (a cache's slot key mask, read by every layer of every
    decode step) is passed as it is: converting it cost two kernels per layer (an
    elementwise compare and a copy, ~3 us per layer on an H100)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.int8 and attn_mask.is_contiguous():
        return attn_mask
    return (attn_mask != 0).to(torch.int8).contiguous()


def run_attention(
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
    seg_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention on the selected backend, inputs already validated."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale_f = 1.0 / math.sqrt(d) if scale is None else float(scale)
    backend = _backend.resolve(q.device)
    # [B, Sq, Hq, D] memory seen as [B, Hq, Sq, D]: the kernels write through strides, and
    # the caller's out.transpose(1, 2) (transformers' layout) is contiguous without a copy.
    out = _backend.empty_output((b, sq, hq, d), q.dtype, q.device).transpose(1, 2)
    if backend == "reference" or q.numel() == 0:
        ref = reference_attention(
            q,
            k,
            v,
            causal=causal,
            head_mask=head_mask,
            attn_mask=attn_mask,
            scale=scale_f,
            window=window,
            cache_lens=cache_lens,
            seg_start=seg_start,
        )
        return out.copy_(ref)
    if sk == 0:
        return out.zero_()
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    key_mask = key_mask_int8(attn_mask)
    lens = cache_lens.to(torch.int32).contiguous() if cache_lens is not None else None
    # Only the Triton grid walks (batch, head) slots in order; C++ needs flags only.
    head_active, head_order = head_tables(head_mask, b, hq, backend, want_order=backend == "triton")
    seg = seg_start.to(torch.int32).contiguous() if seg_start is not None else None
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
            seg_start=seg,
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
        kernel_strides(q),
        kernel_strides(k),
        kernel_strides(v),
        kernel_strides(out),
        bool(causal),
        scale_f,
        int(window),
        data_ptr(key_mask),
        data_ptr(lens),
        data_ptr(head_active),
        _backend.native_threads(),
        data_ptr(seg),
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
    seg_start: torch.Tensor | None = None,
) -> torch.Tensor:
    check_attention(
        "attention", q, k, v, head_mask, attn_mask, cache_lens, scale, window, seg_start
    )
    # The op's own result is the contiguous [B, Sq, Hq, D] memory (torch.compile holds a
    # custom op's output to contiguous strides); attention() hands out the transposed view.
    return run_attention(
        q,
        k,
        v,
        causal=causal,
        head_mask=head_mask,
        attn_mask=attn_mask,
        cache_lens=cache_lens,
        scale=scale,
        window=window,
        seg_start=seg_start,
    ).transpose(1, 2)


@_attention_op.register_fake
def _(q, k, v, causal, head_mask, attn_mask, scale, window, cache_lens, seg_start=None):
    check_attention(
        "attention", q, k, v, head_mask, attn_mask, cache_lens, scale, window, seg_start
    )
    b, hq, sq, d = q.shape
    return q.new_empty(b, sq, hq, d)


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
        seg_start: ``[B, Sq]`` int32/int64, a per-query lower bound on the keys, in key
            coordinates: query i of row b sees key j only if also ``j >= seg_start[b, i]``.
            It packs several prompts into one row (each token's entry is the key index
            where its prompt starts), the packed / variable-length sequences of
            FlashAttention-2's varlen API, here as a per-query lower bound; key blocks
            before every query of a tile's bound are skipped (Triton and C++). Any strides.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype (fp32 accumulation, one rounding), a view of a
        contiguous ``[B, Sq, Hq, D]`` tensor (FlashAttention's layout): ``out.transpose(1,
        2)``, the layout transformers' attention functions return, needs no copy.
    """
    return call_op(
        _attention_op,
        q,
        k,
        v,
        bool(causal),
        head_mask,
        attn_mask,
        scale,
        window,
        cache_lens,
        seg_start,
    ).transpose(1, 2)

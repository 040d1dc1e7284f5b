"""The sentinel attention function for Hugging Face transformers (``attention="sentinel"``).

transformers >= 4.48 routes every attention layer of the "functional" models (Llama,
Mistral, Qwen2/3, GPT-2 ... in 5.x) through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and, from 4.53, builds the layer's mask through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the
same name. :func:`register` adds ``"sentinel"`` to both interfaces:

* the **mask function** (:func:`sentinel_attention_mask`) does what the flash-attention one
  does: instead of a 4-D ``[B, 1, Sq, Sk]`` float mask it hands the layers the 2-D key
  padding mask ``[B, L]`` (bool, ``L <= Sk`` valid keys, the first ``L`` of the layer's K/V)
  or ``None`` when nothing is masked. Causality and the sliding window are not in it: the
  kernels apply them from ``is_causal`` and ``sliding_window``, bottom-right aligned, which
  is what the mask describes when the queries are the last tokens of the ``L`` keys.
  Masks that are more than padding + causal (+ window) — packed sequences, chunked or
  block-wise overlays, user ``or``/``and`` mask functions, bidirectional masks — are built
  as the 4-D boolean SDPA mask instead, and the attention function computes those with a
  plain fp32 path (correct, not fast; warned once);
* the **attention function** (:func:`sentinel_attention_forward`) sends prefill to
  ``sk.ops.attention`` and short query chunks over a cache (decode, speculative
  verification: ``Sq <= 16 < Sk``) to ``sk.ops.decode_attention``, with the per-layer
  head mask of the module (``module.sentinel_head_mask``, bool ``[Hq]`` or ``[B, Hq]``, set
  by head pruning): a pruned head's output is exactly zero and costs nothing;
* a layer of a compressed KV cache (:func:`sentinel_kernels.cache.kv_cache`) is read in
  place: the cache's ``update`` returns only the new chunk, its keys carrying a
  :class:`~sentinel_kernels.cache.contract.CacheRead` (:func:`attach_cache_read`; the
  contract is documented in :mod:`sentinel_kernels.cache.contract`), and the attention
  function runs ``sk.ops.decode_attention`` over the codes (:func:`attend_compressed`).

The ``attention`` option of :func:`sentinel_kernels.patch_model` runs
:func:`use_sentinel_attention` (declared in :mod:`sentinel_kernels.patching.options`): it
switches the model to ``"sentinel"`` with ``model.set_attn_implementation`` and
``unpatch_model`` switches it back. Importing this module does not import transformers
(that happens on the first :func:`register`).

Version notes: the ``AttentionInterface`` appeared in transformers 4.48 and the
``AttentionMaskInterface`` in 4.53. Between them the layers receive the model's 4-D float
mask, which the attention function computes on the fallback path (correct, no speed-up).
Before 4.48 the option raises.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..hf_compat import import_from_transformers
from ..ops.attention import attention as _attention
from ..ops.decode_attention import MAX_CACHE_QUERIES, MAX_DECODE_QUERIES, rope_decode_attention
from ..ops.decode_attention import decode_attention as _decode_attention
from ..ops.kv_append import rope_kv_append
from ..reference.kv_formats import dequantize_kv

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..cache.contract import CacheRead, CompressedKV, LatentBases, SlotMaskMemo
    from ..patching.context import PatchContext

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CACHE_READ_ATTR",
    "HEAD_MASK_ATTR",
    "MAX_CACHE_QUERIES",
    "attach_cache_read",
    "attend_compressed",
    "past_by_device_lengths",
    "register",
    "sentinel_attention_forward",
    "sentinel_attention_mask",
    "supports_sentinel_attention",
]

#: The name registered with ``AttentionInterface`` / ``AttentionMaskInterface``.
ATTN_IMPLEMENTATION = "sentinel"
#: Attribute (a buffer) of an attention module holding its head mask, bool ``[Hq]`` or
#: ``[B, Hq]``; a False/0 entry is a pruned head.
HEAD_MASK_ATTR = "sentinel_head_mask"
#: Attribute of the key tensor a compressed cache's ``update`` returns holding its
#: :class:`~sentinel_kernels.cache.contract.CacheRead` (:func:`attach_cache_read`).
CACHE_READ_ATTR = "sentinel_cache_read"

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "sinks")


# --------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------


def sentinel_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one transformers layer on the sentinel kernels.

    Computes ``softmax(scaling * q k^T) v`` over the visible keys (bottom-right causal when
    the module is causal, key padding from ``attention_mask``, ``sliding_window``; the rule
    is in :mod:`sentinel_kernels.reference.attention`), with GQA (query head h reads KV head
    ``h // (Hq // Hkv)``) and the module's head mask (``module.sentinel_head_mask``).

    Routing: ``Sq <= 16`` queries over a longer cache (``Sk > Sq``, causal) go to
    :func:`sentinel_kernels.ops.decode_attention` (flash-decoding) with ``cache_lens`` built
    on the device (no host sync); everything else to :func:`sentinel_kernels.ops.attention`.
    A 4-D mask (not built by :func:`sentinel_attention_mask`: a custom mask, or one of the
    masks that function leaves dense) is computed by a plain fp32 path, warned once.
    When ``key`` carries a :class:`~sentinel_kernels.cache.contract.CacheRead` (it came from
    a compressed :func:`sentinel_kernels.cache.kv_cache`'s ``update``) for this module's
    ``layer_idx``, ``key``/``value`` are only the new chunk and the past is read from the
    compressed storage (:func:`_compressed_attention`).

    Args:
        module: the attention module (reads ``is_causal`` (default True) and
            ``sentinel_head_mask``).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (not repeated for GQA);
            any strides, float32/float16/bfloat16.
        attention_mask: ``None``, a key padding mask ``[B, L]`` (nonzero = attend,
            ``L <= Sk``: only the first ``L`` keys exist, as with a static cache; a longer
            mask keeps its last ``Sk`` columns) or a 4-D mask (bool or additive float,
            broadcastable to ``[B, Hq, Sq, Sk]``).
        scaling: softmax scale (default ``1/sqrt(D)``).
        dropout: must be 0 (inference kernels).
        sliding_window: window size (Mistral, Qwen2 sliding layers); ``None``/0 = none.
        **kwargs: ``is_causal`` overrides ``module.is_causal``; other transformers kwargs
            are ignored, except softcap / attention sinks / position bias, which raise.

    Returns:
        ``(out, None)``: ``out`` is ``[B, Sq, Hq, D]`` contiguous in the query's dtype (the
        layout transformers' attention functions return), no attention weights.
    """
    if dropout:
        raise ValueError(
            f"sentinel attention is inference-only: got attention dropout {dropout} (the model "
            "is in training mode with dropout > 0); call model.eval() or use another "
            "attn_implementation for training"
        )
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"sentinel attention does not support {name!r} (used by "
                f"{type(module).__name__}); use attn_implementation='eager' for this model"
            )
    is_causal = kwargs.get("is_causal")
    module_causal = bool(getattr(module, "is_causal", True))
    if is_causal is None or (
        # transformers 4.5x GPT-2 passes is_causal=False whenever it has a mask (for SDPA,
        # whose masks carry causality); a 2-D mask comes from sentinel_attention_mask,
        # which only builds padding masks for causal layers.
        module_causal
        and not is_causal
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 2
    ):
        is_causal = module_causal
    is_causal = bool(is_causal)
    head_mask = getattr(module, HEAD_MASK_ATTR, None)

    read = _claim_cache_read(module, key)
    if read is not None:
        out = _compressed_attention(
            read,
            query,
            key,
            value,
            attention_mask,
            scaling,
            sliding_window,
            is_causal,
            head_mask,
        )
        return out.transpose(1, 2).contiguous(), None

    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
    ):
        out = _dense_fallback(
            module, query, key, value, attention_mask, scaling, is_causal, head_mask
        )
        return out.transpose(1, 2).contiguous(), None

    b, _, sq, _ = query.shape
    sk = key.shape[2]
    if attention_mask is not None:
        length = attention_mask.shape[-1]
        if length > sk:
            attention_mask = attention_mask[:, -sk:]
        elif length < sk:
            # A static cache: K/V are the preallocated buffers, the mask covers the tokens
            # written so far (the flash-attention convention). Views, no copy.
            key, value, sk = key[:, :, :length], value[:, :, :length], length
        if attention_mask.shape[0] != b:
            attention_mask = attention_mask.expand(b, -1)
    window = int(sliding_window) if sliding_window else 0

    if is_causal and sq <= MAX_DECODE_QUERIES and sk > sq:
        # A python int fill: no device-to-host traffic, and capturable in a CUDA graph.
        cache_lens = torch.full((b,), sk, dtype=torch.int32, device=query.device)
        out = _decode_attention(
            query,
            key,
            value,
            cache_lens,
            head_mask=head_mask,
            attn_mask=attention_mask,
            scale=scaling,
            window=window,
        )
    else:
        out = _attention(
            query,
            key,
            value,
            causal=is_causal,
            head_mask=head_mask,
            attn_mask=attention_mask,
            scale=scaling,
            window=window,
        )
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------
# Reading a compressed KV cache
# --------------------------------------------------------------------------------------


def attach_cache_read(key: torch.Tensor, read: CacheRead) -> torch.Tensor:
    """``key`` as a new view (same storage, no copy) carrying ``read`` in
    :data:`CACHE_READ_ATTR`: what a compressed cache's ``update`` returns as the keys, so
    that the attention call that receives them finds the cache's storage
    (:mod:`sentinel_kernels.cache.contract`). A fresh view each time: a read never sticks
    to a tensor the caller keeps."""
    view = key.view(key.shape)
    setattr(view, CACHE_READ_ATTR, read)
    return view


def _claim_cache_read(module: nn.Module, key: torch.Tensor) -> CacheRead | None:
    """The :class:`~sentinel_kernels.cache.contract.CacheRead` ``key`` carries, claimed
    for this call; ``None`` (attend to ``key``/``value`` as given) when it carries none,
    when it belongs to another layer than ``module.layer_idx``, or when an earlier call
    claimed it already."""
    read: CacheRead | None = getattr(key, CACHE_READ_ATTR, None)
    if read is None or read.layer_idx != getattr(module, "layer_idx", None):
        return None
    return read if read.claim() else None


def _padding_mask_2d(
    attention_mask: torch.Tensor | None, b: int, total: int
) -> torch.Tensor | None:
    """The HF key padding mask over positions ``[0, total)`` as bool ``[B, total]``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise NotImplementedError(
            "a compressed KV cache (sk.kv_cache) is read with the standard causal / "
            "sliding-window masks only (a 2-D key padding mask or none); got "
            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}"
            " (a custom or 4-D mask, or transformers < 4.53)"
        )
    if attention_mask.shape[-1] < total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the compressed "
            f"cache holds {total}; pass the 2-D mask of the whole sequence so far"
        )
    mask = attention_mask[:, -total:]
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.shape[0] != b:
        mask = mask.expand(b, -1)
    return mask


def _slot_key_mask(
    mask: torch.Tensor | None,
    length: int,
    capacity: int,
    wrap: bool,
    memo: SlotMaskMemo,
    source: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """int8 ``[B, L]`` key mask *by slot* for a cache of ``L = capacity`` slots holding
    positions ``[0, length)``.

    ``mask`` is bool ``[B, >= length]`` by position. Without wrap position ``j`` is slot
    ``j``; with wrap the last ``L`` positions sit in slots ``j % L``, i.e. the mask's last
    ``L`` columns rolled by ``length % L``. Built once per (``source``, length) and kept in
    ``memo``, ``source`` being the mask object transformers handed the layers (default
    ``mask``): every layer of a cache sees the same one in a forward, so one build serves
    them all.
    """
    if mask is None:
        return None
    source = mask if source is None else source
    entry = memo.get(id(source))
    if entry is None or entry[0]() is not source:
        # Keep the memo tiny: dead masks are dropped whenever a new one arrives.
        for k in [k for k, v in memo.items() if v[0]() is None]:
            del memo[k]
        entry = (weakref.ref(source), {})
        memo[id(source)] = entry
    got = entry[1].get((length, capacity, wrap))
    if got is not None:
        return got
    n = min(length, capacity)
    cols = mask[:, length - n : length].to(torch.int8)
    if wrap and length > capacity:
        km = torch.roll(cols, shifts=length % capacity, dims=1).contiguous()
    else:
        km = torch.zeros(mask.shape[0], capacity, dtype=torch.int8, device=mask.device)
        km[:, :n] = cols
    entry[1][(length, capacity, wrap)] = km
    return km


def _rows_with_keys(
    mask: torch.Tensor | None, total: int, sq: int, window: int, capacity: int, wrap: bool
) -> torch.Tensor | None:
    """bool ``[B, 1, Sq, 1]``: which queries see at least one key (None: all do).

    Query ``t`` sits at ``p = total - Sq + t`` and sees the unmasked positions in
    ``[lo, p]``, ``lo`` from the window and, for a ring of ``capacity`` slots (``wrap``),
    the oldest readable position when its piece of ``MAX_CACHE_QUERIES`` queries ran.
    Counted with a prefix sum on the device.
    """
    if mask is None:
        return None  # every query sees itself
    dev = mask.device
    csum = torch.nn.functional.pad(mask[:, :total].to(torch.int32).cumsum(-1), (1, 0))
    t = torch.arange(sq, device=dev)
    p = t + (total - sq)
    lo = torch.zeros_like(p)
    if window:
        lo = torch.clamp(p + 1 - window, min=0)
    if wrap:
        piece_end = torch.clamp((t // MAX_CACHE_QUERIES + 1) * MAX_CACHE_QUERIES, max=sq)
        lo = torch.maximum(lo, (total - sq) + piece_end - capacity)
        lo = lo.clamp(min=0)
    b = mask.shape[0]
    seen = csum.gather(1, (p + 1).expand(b, -1)) - csum.gather(1, lo.expand(b, -1))
    return (seen > 0)[:, None, :, None]


def _project_query(latent: LatentBases, query: torch.Tensor) -> torch.Tensor:
    """``q P_k[:, :r]`` per KV head (the group's query heads share it): ``[B, Hq, Sq, r]``
    in q's dtype; products in fp32."""
    b, hq, sq, d = query.shape
    proj = latent.k_proj  # [Hkv, D, r] fp32
    hkv, r = proj.shape[0], proj.shape[2]
    q = query.float().reshape(b, hkv, (hq // hkv) * sq, d)
    return torch.matmul(q, proj[None]).reshape(b, hq, sq, r).to(query.dtype)


def _expand_output(
    latent: LatentBases,
    o_lat: torch.Tensor,
    has_key: torch.Tensor | None,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``o_lat P_v[:, :r]^T + mu_v`` per KV head, with ``mu_v`` left out of rows that see
    no key and of pruned heads (so those stay exactly 0, like the dense kernels)."""
    b, hq, sq, r = o_lat.shape
    proj, mean = latent.v_proj, latent.v_mean  # [Hkv, D, r], [Hkv, D]
    hkv, d = proj.shape[0], proj.shape[1]
    grp = hq // hkv
    o = o_lat.float().reshape(b, hkv, grp * sq, r)
    out = torch.matmul(o, proj.transpose(1, 2)[None]).reshape(b, hq, sq, d)
    mu = mean.repeat_interleave(grp, dim=0)[None, :, None, :]  # [1, Hq, 1, D]
    keep: torch.Tensor | None = has_key.float() if has_key is not None else None
    if head_mask is not None:
        active = (head_mask != 0).to(torch.float32).expand(b, hq)[:, :, None, None]
        keep = active if keep is None else keep * active
    out = out + (mu if keep is None else mu * keep)
    return out.to(o_lat.dtype)


def _decode_over(
    kv: CompressedKV,
    q: torch.Tensor,
    key_mask: torch.Tensor | None,
    head_mask: torch.Tensor | None,
    scale: float | None,
    window: int,
) -> torch.Tensor:
    """One :func:`sentinel_kernels.ops.decode_attention` of ``q`` (latent queries for a
    low-rank layer) over ``kv``: the one place that maps the contract's fields to the op."""
    return _decode_attention(
        q,
        kv.k_codes,
        kv.v_codes,
        kv.lengths,
        head_mask=head_mask,
        kv_format=kv.format,
        attn_mask=key_mask,
        scale=scale,
        window=window,
        k_scale=kv.k_scales,
        v_scale=kv.v_scales,
        k_recent=kv.k_ring,
        v_recent=kv.v_ring,
        wrap=kv.wrap,
        key_block=kv.key_block,
    )


def attend_compressed(
    kv: CompressedKV,
    query: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Causal attention of ``query`` over the positions stored in ``kv``.

    Row ``b``'s ``Sq`` queries are its last ``Sq`` positions: query ``t`` sits at
    ``kv.lengths[b] - Sq + t`` and sees the stored positions up to its own (and, with a
    ``window``, only the last ``window``), so rows may be at different lengths (no host
    sync: the lengths stay on the device). GQA, the head mask and the scale as in
    :func:`sentinel_kernels.ops.decode_attention`; a low-rank layer is read through its
    latents (``q P_k``, then ``o P_v^T + mu_v``).

    Args:
        kv: the layer's storage (:class:`~sentinel_kernels.cache.contract.CompressedKV`),
            with the queries' keys/values already appended.
        query: ``[B, Hq, Sq, D]``, ``Sq <= MAX_CACHE_QUERIES``.
        key_mask: int8/bool ``[B, L]`` by slot (nonzero = attend), or ``None``.
        head_mask: bool ``[Hq]`` or ``[B, Hq]``; pruned heads give 0.
        scale: softmax scale (default ``1/sqrt(D)``).
        window: sliding window (0: none).

    Returns:
        ``[B, Hq, Sq, D]`` in the query's dtype.
    """
    latent = kv.latent
    q = _project_query(latent, query) if latent is not None else query
    out = _decode_over(kv, q, key_mask, head_mask, scale, window)
    if latent is not None:
        out = _expand_output(latent, out, None, head_mask)
    return out


def _compressed_attention(
    read: CacheRead,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    sliding_window: int | None,
    is_causal: bool,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of a chunk over a compressed cache layer: ``[B, Hq, Sq, D]``.

    * The cache was empty before this chunk (a prefill): ``sk.ops.attention`` over the
      chunk's own full-precision keys/values (already appended by ``update``), each query
      kept inside its prompt when the rows hold packed prompts (``read.segment_starts``).
    * A long chunk over a stored past (:func:`_long_chunk_over_past`: more queries than a
      decode kernel takes, per-token storage without a ring, wrap or latents): one
      ``sk.ops.attention`` over the past as stored (dense) or dequantized, followed by the
      chunk's own full-precision keys/values, bottom-right causal.
    * Otherwise the queries read the cache through ``sk.ops.decode_attention`` in pieces of
      at most ``MAX_CACHE_QUERIES`` (64): piece ``[a, e)`` (appended first when the chunk
      was deferred) reads ``kv.lengths`` = positions written so far (advanced on the device
      by each append), with the slot-indexed key mask built from the HF 2-D mask.
    * Low-rank layers read latents: ``q_lat = q P_k`` (head dim ``r``, scale unchanged:
      ``q . mu_k`` is the same for every key of a query, so softmax drops it), then
      ``out = o_lat P_v^T + mu_v``.
    """
    if not is_causal:
        raise NotImplementedError("a compressed KV cache serves causal attention only")
    kv = read.kv
    b, _, sq, _ = query.shape
    total = read.seq_length
    past = total - sq
    mask = _padding_mask_2d(attention_mask, b, total)
    window = int(sliding_window) if sliding_window else 0
    rope = read.rope
    if rope is not None and (
        past == 0
        or read.segment_starts is not None
        or kv.latent is not None
        or sq > MAX_DECODE_QUERIES
        or _long_chunk_fits(kv, sq)
    ):
        # Not the one-piece decode route below: rotate and store the chunk now.
        query = rope_kv_append(
            query, key, value, *rope, kv.k_codes, kv.v_codes, kv.lengths, kv.format,
            kv.k_scales, kv.v_scales, kv.wrap,
        )  # fmt: skip
        rope = None
    if past == 0:
        return _attention(
            query,
            key,
            value,
            causal=True,
            head_mask=head_mask,
            attn_mask=mask,
            scale=scaling,
            window=window,
            seg_start=read.segment_starts,
        )
    if read.segment_starts is not None:
        raise ValueError(
            "packed prompts (SentinelKVCache.set_segment_starts) prefill empty rows only; "
            f"this chunk follows {past} stored positions"
        )
    static_mask = read.slot_mask if mask is None else None
    if _long_chunk_fits(kv, sq):
        return _long_chunk_over_past(
            read, query, key, value, mask, static_mask, scaling, window, head_mask
        )
    latent = kv.latent
    q_in = _project_query(latent, query) if latent is not None else query
    outs = []
    for a in range(0, sq, MAX_CACHE_QUERIES):
        e = min(sq, a + MAX_CACHE_QUERIES)
        if read.deferred:
            read.append(key[:, :, a:e], value[:, :, a:e])
        key_mask: torch.Tensor | None
        if static_mask is not None:
            key_mask = static_mask  # by slot already, filled in place (CUDA-graph safe)
        else:
            key_mask = _slot_key_mask(
                mask, past + e, kv.capacity, kv.wrap, read.mask_memo, attention_mask
            )
        if rope is not None:
            # This step's rotation, append and attention in one launch (CacheRead.rope).
            outs.append(
                rope_decode_attention(
                    query,
                    key,
                    value,
                    *rope,
                    kv.k_codes,
                    kv.v_codes,
                    kv.lengths,
                    head_mask,
                    key_mask,
                    scaling,
                    window,
                    kv_format=kv.format,
                    k_scale=kv.k_scales,
                    v_scale=kv.v_scales,
                )  # fmt: skip
            )
            continue
        outs.append(_decode_over(kv, q_in[:, :, a:e], key_mask, head_mask, scaling, window))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if latent is not None:
        has_key = _rows_with_keys(mask, total, sq, window, kv.capacity, kv.wrap)
        out = _expand_output(latent, out, has_key, head_mask)
    return out


#: Devices where a dense cache's long chunks take :func:`_long_chunk_over_past`. Not the
#: CPU: there the C++ decode attention in pieces of 64 measured ~6% faster than one
#: attention over the past (``bench/bench_prefill.py -k cpu``, 1024 tokens as 4 x 256,
#: level 1), while int8 gained ~10% from reading its past once.
DENSE_LONG_CHUNK_DEVICES = frozenset({"cuda"})


_route = threading.local()


@contextlib.contextmanager
def past_by_device_lengths() -> Iterator[None]:
    """Inside (this thread): a chunk over a stored past reads that past through the decode
    attention in pieces of ``MAX_CACHE_QUERIES``, whose keys are counted by the cache's
    device lengths, never through :func:`_long_chunk_over_past`, whose shapes come from
    the host count of written tokens. What a CUDA graph captured once and replayed over
    other past lengths needs (the engine's chunk graphs,
    :class:`sentinel_kernels.serve.runner.ModelRunner`). The values are those of the
    decode-pieces route: the same attention up to the two kernels' rounding, and for an
    int8/int4 cache with the chunk's own keys read back quantized."""
    before = getattr(_route, "device_lengths", False)
    _route.device_lengths = True
    try:
        yield
    finally:
        _route.device_lengths = before


def _long_chunk_fits(kv: CompressedKV, sq: int) -> bool:
    """Whether a chunk of ``sq`` queries over a non-empty past of ``kv`` takes
    :func:`_long_chunk_over_past`: slot ``j`` holds position ``j`` (no wrap), per-token
    storage (no KIVI key blocks, no low-rank latents) and no full-precision ring (whose
    contents would differ from what the decode path reads); ``sq`` above what the decode
    kernel takes in one launch (dense, on :data:`DENSE_LONG_CHUNK_DEVICES`:
    ``MAX_DECODE_QUERIES``; int8/int4, whose past is dequantized once here:
    ``MAX_CACHE_QUERIES``, where the decode path starts to read the whole past once per
    piece); never inside :func:`past_by_device_lengths`."""
    if kv.wrap or kv.key_block or kv.latent is not None or kv.ring:
        return False
    if getattr(_route, "device_lengths", False):
        return False
    if kv.format == "dense":
        # reads the chunk back from the slots (rotated there by update_rotary's append)
        return sq > MAX_DECODE_QUERIES and kv.k_codes.device.type in DENSE_LONG_CHUNK_DEVICES
    # int8/int4 take the chunk's keys from the forward's tensor, which update_rotary hands
    # out unrotated for chunks of at most MAX_CACHE_QUERIES: this route starts above that
    return sq > MAX_CACHE_QUERIES


def _long_chunk_over_past(
    read: CacheRead,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    static_mask: torch.Tensor | None,
    scaling: float | None,
    window: int,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """A chunk of ``Sq`` queries (positions ``past .. past + Sq - 1`` of every row) over the
    stored past: ``softmax(scale q K^T) V`` with ``K = [past keys; the chunk's keys]``
    (``[B, Hkv, past + Sq, D]``), bottom-right causal, as one ``sk.ops.attention`` (the
    prefill kernel) instead of ``ceil(Sq / 64)`` decode-attention launches that each read
    the whole past.

    The past is read as stored: a view of the dense slots, or int8/int4 codes dequantized
    (:func:`sentinel_kernels.reference.kv_formats.dequantize_kv`, the storage's own rule)
    once for all queries. The chunk's own keys/values are the full-precision ones of this
    forward, as in a prefill over an empty cache (the decode path reads them back
    quantized; a quantized cache's outputs differ by that rounding). The chunk is still
    stored (appended in pieces of ``MAX_CACHE_QUERIES`` when it was deferred). Key padding:
    the HF mask over ``[0, past + Sq)``, or the cache's slot mask (slot = position here).
    """
    kv = read.kv
    sq = query.shape[2]
    total = read.seq_length
    past = total - sq
    if read.deferred:
        for a in range(0, sq, MAX_CACHE_QUERIES):
            e = min(sq, a + MAX_CACHE_QUERIES)
            read.append(key[:, :, a:e], value[:, :, a:e])
    if kv.format == "dense":
        # the chunk is stored by now, exactly as given: the slots are the whole sequence
        keys, values = kv.k_codes[:, :, :total], kv.v_codes[:, :, :total]
    else:
        assert kv.k_scales is not None and kv.v_scales is not None
        d = kv.head_dim
        k_past = dequantize_kv(kv.k_codes[:, :, :past], kv.k_scales[:, :, :past], kv.format, d)
        v_past = dequantize_kv(kv.v_codes[:, :, :past], kv.v_scales[:, :, :past], kv.format, d)
        keys = torch.cat([k_past.to(key.dtype), key], dim=2)
        values = torch.cat([v_past.to(value.dtype), value], dim=2)
    key_mask = mask
    if key_mask is None and static_mask is not None:
        key_mask = static_mask[:, :total]
    return _attention(
        query,
        keys,
        values,
        causal=True,
        head_mask=head_mask,
        attn_mask=key_mask,
        scale=scaling,
        window=window,
    )


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _dense_fallback(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
    is_causal: bool,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention under a 4-D mask, in fp32 PyTorch: ``[B, Hq, Sq, D]``.

    The mask is the whole visibility rule (as for SDPA/eager with a mask, no causal flag
    on top): bool (True = attend) or additive float. Rows that see no key get 0, pruned
    heads get 0, like the kernels.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(
            f"sentinel attention takes a 2-D key padding mask or a 4-D mask, got "
            f"{type(mask).__name__} {getattr(mask, 'shape', '')}"
        )
    _warn_once(
        "dense",
        "sentinel attention got a 4-D attention mask (a custom mask, or one that is more "
        "than padding + causal + sliding window); computing it with the plain PyTorch "
        "fallback, which is correct but not accelerated",
    )
    b, hq, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    mask = mask[..., -sk:] if mask.shape[-1] > sk else mask
    if mask.shape[-1] < sk:
        key, value, sk = key[:, :, : mask.shape[-1]], value[:, :, : mask.shape[-1]], mask.shape[-1]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    group = hq // hkv
    q = query.to(acc)
    k = key.to(acc).repeat_interleave(group, dim=1)
    v = value.to(acc).repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(acc)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(denom > 0, denom, torch.ones_like(denom))
    if head_mask is not None:
        keep = (head_mask.to(out.device) != 0).expand(b, hq)
        out = out * keep[:, :, None, None].to(acc)
    return out.to(query.dtype)


# --------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------


def sentinel_attention_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask transformers hands the layers when ``attn_implementation="sentinel"``.

    Registered with ``AttentionMaskInterface``; called once per forward (per mask type)
    with the arguments of transformers' mask builders (``sdpa_mask``, ``flash_attention_mask``).

    Returns:
        * for a causal or sliding-window-causal ``mask_function`` (the standard masks):
          ``None`` when no key is masked, else the key padding mask ``[B, L]`` (bool): the
          last ``kv_length`` columns of ``attention_mask``, ``L <= kv_length`` (shorter for a
          static cache: the first ``L`` K/V slots are the written ones). Without an
          ``attention_mask`` and with a partly filled static cache of known length, an
          all-True mask of that length. In prefill (``q_length > 16``) a mask with no zero
          becomes ``None`` (one host sync per forward, as transformers' SDPA mask does;
          not while a CUDA graph is captured); in decode it is returned as is, so decoding
          never syncs;
        * otherwise (packed sequences, chunked/block overlays, ``or``/``and`` mask functions,
          bidirectional masks, a static cache whose length is a device tensor and no
          ``attention_mask``): the 4-D boolean SDPA mask ``[B, 1, Sq, Sk]`` (never skipped),
          which :func:`sentinel_attention_forward` computes on its fallback path.

    transformers 4.53-4.55 pass ``cache_position`` (the query positions) instead of
    ``q_length``/``q_offset``; its length is the query length, and without an
    ``attention_mask`` its last entry is read once (a host sync per forward, on those
    versions only) to tell a full cache from a partly filled static one.
    """
    if q_length is None or kv_length is None:
        if cache_position is None or kv_length is None:
            raise TypeError(
                "sentinel_attention_mask needs q_length and kv_length (or "
                "cache_position and kv_length)"
            )
        q_length = int(cache_position.shape[0])
        kwargs["cache_position"] = cache_position
        if q_length == kv_length:
            q_offset = 0  # nothing cached before these queries
        elif attention_mask is None and not _is_tracing(cache_position):
            q_offset = int(cache_position[-1]) + 1 - q_length
        else:
            q_offset = cache_position[0]
    kind = _mask_kind(mask_function, kwargs)
    tensor_offsets = isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor)
    if kind is None or (attention_mask is None and tensor_offsets):
        return _dense_mask(
            batch_size,
            q_length,
            kv_length,
            q_offset,
            kv_offset,
            mask_function,
            attention_mask,
            kwargs,
        )
    if attention_mask is None:
        valid = int(q_offset) + q_length - int(kv_offset)
        if valid >= kv_length:
            return None
        device = kwargs.get("device", "cpu")
        return torch.ones(batch_size, max(valid, 0), dtype=torch.bool, device=device)
    mask = attention_mask[:, -kv_length:]
    if mask.dtype != torch.bool:
        mask = mask != 0
    if (
        q_length > MAX_DECODE_QUERIES
        and mask.shape[-1] == kv_length
        and not _is_tracing(mask)
        and not _capturing(mask)
        and bool(mask.all())
    ):
        return None
    return mask


# transformers is imported inside the functions that need it (they only run once it is
# loaded): importing this module must not import it (see the module docstring).


def _capturing(t: torch.Tensor) -> bool:
    # Inside a CUDA-graph capture the mask is kept: reading it would sync the host.
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _is_tracing(t: torch.Tensor) -> bool:
    from transformers.utils.import_utils import is_tracing

    return bool(is_tracing(t))


def _mask_kind(mask_function: Callable[..., Any] | None, kwargs: dict[str, Any]) -> str | None:
    """``"causal"``, ``"sliding"`` (causal with ``config.sliding_window``) or ``None``
    (anything else: the caller builds the dense mask)."""
    if kwargs.get("use_vmap"):
        return None  # transformers sets it exactly when user or/and mask functions are mixed in
    from transformers import masking_utils

    if mask_function is None or mask_function is masking_utils.causal_mask_function:
        return "causal"
    window = getattr(kwargs.get("config"), "sliding_window", None)
    if (
        isinstance(window, int)
        and window > 0
        and not _captures_tensor(mask_function)
        and _is_sliding_causal(mask_function, window)
    ):
        return "sliding"
    return None


def _captures_tensor(obj: object, depth: int = 0) -> bool:
    """Whether a mask function depends on data (a tensor in its closure: padding, packed
    sequence ids, chunk offsets ...). Unknown callables count as data-dependent."""
    if isinstance(obj, torch.Tensor) or depth > 8:
        return True
    if isinstance(obj, (int, float, bool, str, type(None))):
        return False
    if isinstance(obj, (tuple, list)):
        return any(_captures_tensor(x, depth + 1) for x in obj)
    if isinstance(obj, functools.partial):
        return _captures_tensor((obj.func, *obj.args, *obj.keywords.values()), depth + 1)
    if inspect.isfunction(obj):
        cells = obj.__closure__ or ()
        values = []
        for cell in cells:
            try:
                values.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
        return _captures_tensor((*values, *(obj.__defaults__ or ())), depth + 1)
    return True


def _is_sliding_causal(mask_function: Callable[..., Any], window: int) -> bool:
    """Evaluate an index-based mask function on probe points around the diagonal and the
    window edge and compare with ``q - window < kv <= q``."""
    qs = sorted({0, 1, 2, window - 1, window, window + 1, 2 * window + 3} - {-1})
    ks = sorted(
        {
            x
            for q in qs
            for x in (0, 1, q - window - 1, q - window, q - window + 1, q - 1, q, q + 1, q + 2)
            if x >= 0
        }
    )
    q_idx = torch.tensor(qs)[None, None, :, None]
    kv_idx = torch.tensor(ks)[None, None, None, :]
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    expected = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    try:
        got = torch.as_tensor(mask_function(zero, zero, q_idx, kv_idx))
        return bool(torch.equal(got.to(torch.bool).expand_as(expected), expected))
    except Exception:  # not index-based: treat as custom
        return False


def _dense_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor,
    kv_offset: int,
    mask_function: Callable[..., Any] | None,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    from transformers import masking_utils

    mapping = masking_utils.AttentionMaskInterface._global_mapping
    sdpa_mask = cast("Callable[..., torch.Tensor | None]", mapping["sdpa"])
    args: dict[str, Any] = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function or masking_utils.causal_mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=bool(kwargs.get("use_vmap", False)),
        device=kwargs.get("device", "cpu"),
    )
    params = inspect.signature(sdpa_mask).parameters
    if "cache_position" in params:  # transformers 4.53-4.55
        position = kwargs.get("cache_position")
        if position is None:
            position = torch.arange(q_length, device=args["device"]) + q_offset
        args["cache_position"] = position
        args.pop("q_length")
        args.pop("q_offset")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        args = {k: v for k, v in args.items() if k in params}
    mask = sdpa_mask(**args)
    if mask is None:  # cannot happen with both skips off; stay correct if it ever does
        raise RuntimeError("transformers' sdpa_mask returned None with mask skipping disabled")
    return mask


# --------------------------------------------------------------------------------------
# Registration with transformers and with patch_model
# --------------------------------------------------------------------------------------

_register_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register ``"sentinel"`` with transformers' ``AttentionInterface`` (and, from 4.53,
    ``AttentionMaskInterface``). Idempotent and thread-safe; imports transformers.

    After it, ``from_pretrained(..., attn_implementation="sentinel")`` and
    ``model.set_attn_implementation("sentinel")`` work.

    Raises:
        RuntimeError: ``AttentionInterface`` cannot be imported; the message gives the
            real cause (transformers too old, or the import itself failing, e.g. a
            package that shadows one transformers imports).
    """
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        AttentionInterface = import_from_transformers("AttentionInterface", "4.48")
        AttentionInterface.register(ATTN_IMPLEMENTATION, sentinel_attention_forward)
        AttentionMaskInterface = import_from_transformers(
            "AttentionMaskInterface", "4.53", "transformers.masking_utils"
        )
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sentinel_attention_mask)
        _registered = True


def _attention_classes(model: nn.Module) -> list[type[nn.Module]]:
    """Classes of the model's attention layers (name contains "Attention"), in model order."""
    seen: dict[type[nn.Module], None] = {}
    for m in model.modules():
        if "Attention" in type(m).__name__:
            seen.setdefault(type(m), None)
    return list(seen)


def _uses_interface(cls: type[nn.Module]) -> bool | None:
    """Whether ``cls.forward`` dispatches through ``ALL_ATTENTION_FUNCTIONS`` (None: the
    source cannot be read)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return None
    return "ALL_ATTENTION_FUNCTIONS" in source or "AttentionInterface" in source


#: Config fields naming attention features the sentinel attention does not implement, with
#: the value that turns each on (``None``: any value but None): a model that uses one
#: would fail on its first forward or, worse, give wrong outputs, so it is refused up
#: front (patch_model, sk.kv_cache).
UNSUPPORTED_ATTENTION_CONFIG: dict[str, tuple[str, object]] = {
    "attn_logit_softcapping": ("attention logit soft-capping", None),
    # Falcon (alibi=True), like BLOOM and MPT, adds its ALiBi position bias to the attention
    # mask it builds; the sentinel attention builds its own mask and has no bias input.
    "alibi": ("an ALiBi position bias added through the attention mask", True),
    "position_embedding_type": ("an ALiBi position bias added through the attention mask", "alibi"),
}


def _text_config(model: nn.Module) -> PretrainedConfig | None:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        return getter(decoder=True)
    return config


def supports_sentinel_attention(model: nn.Module) -> tuple[bool, str]:
    """Whether the sentinel attention can serve ``model``, and why not when it cannot.

    It can when every attention layer dispatches through transformers'
    ``AttentionInterface`` (so that ``"sentinel"`` reaches it) and the config asks for no
    attention feature the sentinel function lacks (:data:`UNSUPPORTED_ATTENTION_CONFIG`:
    logit soft-capping, an ALiBi bias carried by the mask).

    Returns:
        ``(ok, reason)``; ``reason`` is ``""`` when ``ok``.
    """
    arch = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return False, f"{arch} is not a transformers model (no config._attn_implementation)"
    classes = _attention_classes(model)
    if not classes:
        return False, f"{arch} has no attention module (no submodule class named *Attention*)"
    bad = [c.__name__ for c in classes if _uses_interface(c) is False]
    if bad:
        return False, (
            f"{arch}: attention module(s) {', '.join(bad)} do not dispatch through "
            "transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS), so an "
            "attn_implementation cannot reach them"
        )
    text = _text_config(model)
    for attr, (what, on) in UNSUPPORTED_ATTENTION_CONFIG.items():
        value = getattr(text, attr, None)
        if (value is not None) if on is None else (value == on):
            model_type = getattr(config, "model_type", None)
            return False, (
                f"{arch} ({model_type}) uses {what} (config.{attr}={value!r}), which the "
                "sentinel attention does not implement"
            )
    return True, ""


def _current_implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _set_implementation(model: nn.Module, impl: str | None) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if impl is not None and callable(setter):
        setter(impl)
    else:
        model.config._attn_implementation = impl  # type: ignore[union-attr]
    now = _current_implementation(model)
    if now != impl:
        raise RuntimeError(
            f"could not set attn_implementation={impl!r} on {type(model).__name__} "
            f"(it is {now!r}); the model does not support switching its attention"
        )


def use_sentinel_attention(model: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """patch_model transform of ``attention="sentinel"``: switch the model's
    ``attn_implementation`` to ``"sentinel"``; the undo switches it back."""
    ok, reason = supports_sentinel_attention(model)
    if not ok:
        raise NotImplementedError(f"attention='sentinel' is not supported for {reason}")
    register()
    previous = _current_implementation(model)
    _set_implementation(model, ATTN_IMPLEMENTATION)

    def undo() -> None:
        _set_implementation(model, previous)

    return undo


# `model.set_attn_implementation("sentinel")` must work as soon as sentinel_kernels is
# imported next to transformers. Importing transformers here would slow `import
# sentinel_kernels` for users of the ops alone, so register now only when transformers is
# already loaded; otherwise the model loaders and patch_model register it, or call
# `sentinel_kernels.nn.attention.register()`.
if "transformers" in sys.modules:
    register()

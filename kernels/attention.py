"""Prefill flash attention (Triton) with pruned-head masking.

For each (batch row b, query head h) pair that is active::

    L     = cache_lens[b] (or Sk)             p_i = L - Sq + i   (bottom-right causal)
    vis   = j < L  and key_mask[b, j]  and (not causal or j <= p_i)
            and (window == 0 or p_i - j < window)
            and (seg_start is None or j >= seg_start[b, i])
    out[b, h, i] = sum_j softmax_j(scale * q_i . k_j | vis) v_j     (0 when no key is visible)

with key/value head ``h // (Hq // Hkv)`` (GQA); an inactive pair writes exact zeros. The
rule is the one of ``sentinel_kernels.reference.attention``.

Algorithm: FlashAttention-2 forward (Dao, 2023), in the form of Triton's fused-attention
tutorial. One program owns ``BLOCK_M`` query rows of one (b, h) pair and streams the
pair's keys/values in ``BLOCK_N`` blocks, keeping the online-softmax state (row max ``m``,
row sum ``l``, fp32 accumulator) in registers. Scores are kept in the log2 domain (the
softmax scale times log2(e) is folded into one multiply-add, then ``exp2``); ``p`` is
rounded to the value dtype before the ``p @ V`` tensor-core dot, as in FA2; the output is
divided by ``l`` once and rounded once to ``out.dtype``.

The key range of a query block is split into three loops (the causal trick of FA2 and
the tutorial, generalised to windows and ragged lengths): key blocks that no row of the
block can see (above the diagonal, before the window or before every row's segment
start, beyond ``L``) are never visited; blocks that every row sees in full run without
any mask; only the blocks that straddle the window edge or the segment starts (first
loop) or the diagonal / ``L`` (last loop) build a mask. A key padding mask, whose pattern
is data, is applied in every block (one int8 vector load and a select per block).

Pruned heads: the grid is 1-D over ``slot * num_query_blocks + query_block``. Slot ``s``
works on pair ``head_order[s]``; the op layer puts the active pairs first, and CUDA hands
out blocks in increasing linear index, so all active work is dispatched before the
inactive programs, which only store a zero tile. Within a slot, causal runs the longest
query blocks (the last rows) first so the short ones fill the tail.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from sentinel_kernels import settings
from sentinel_kernels.kernels._autotune import autotune
from sentinel_kernels.kernels._tiles import strides3

_INTERPRET = settings.triton_interpret()
_LOG2E = 1.0 / math.log(2.0)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _attn_range(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    km_base,
    start,
    end,
    pos,
    seg,
    L,
    window,
    qk_scale,
    stride_ks,
    stride_vs,
    offs_n,
    offs_d,
    EDGE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # Key blocks [start, end) (multiples of BLOCK_N from a multiple of BLOCK_N). With
    # EDGE the blocks may be partly invisible (diagonal, window edge, segment start,
    # j >= L); without it every key is visible to every row and in bounds, so the loop
    # has no masks at all (apart from the key padding mask, and a head-dim mask when D is
    # not a power of two).
    k_ptrs = k_base + (start + offs_n)[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    v_ptrs = v_base + (start + offs_n)[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
    d_ok = offs_d < HEAD_DIM
    for n in range(start, end, BLOCK_N):
        cols = n + offs_n
        if EDGE:
            # Keys j >= L may be stale cache slots (anything, NaN included): never load them.
            n_ok = cols < L
            if EVEN_D:
                k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=IN_PREC)
        if EDGE or HAS_KEY_MASK:
            if EDGE:
                vis = cols[None, :] < L
                if CAUSAL:
                    vis = vis & (cols[None, :] <= pos[:, None])
                if HAS_WINDOW:
                    vis = vis & (pos[:, None] - cols[None, :] < window)
                if HAS_SEG:
                    vis = vis & (cols[None, :] >= seg[:, None])
                if HAS_KEY_MASK:
                    km = tl.load(km_base + cols, mask=n_ok, other=0)
                    vis = vis & (km != 0)[None, :]
            else:
                km = tl.load(km_base + cols)
                vis = (km != 0)[None, :]
            s = tl.where(vis, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead
            # keeps exp2 away from (-inf) - (-inf) = NaN (its p, l and acc stay 0).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            # qk_scale > 0 (the host folds a negative scale into q's sign), so the max of
            # the raw scores gives the max of the scaled ones; the subtract fuses into FMAs.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EDGE:
            if EVEN_D:
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            if EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=IN_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Sq", "Sk", "window", "SQ_BUCKET", "SK_BUCKET"])
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    km_ptr,
    lens_ptr,
    active_ptr,
    order_ptr,
    seg_ptr,
    Sq,
    Sk,
    Hq,
    GROUP,
    window,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_kmb,
    stride_segb,
    SQ_BUCKET,
    SK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_LENS: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    HAS_SEG: tl.constexpr,
    NEG_SCALE: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # SQ_BUCKET / SK_BUCKET are autotuning keys only.
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    slot = pid // num_m
    mb = pid % num_m
    if CAUSAL:
        mb = num_m - 1 - mb  # the last query rows see the most keys: start them first
    if HAS_ORDER:
        pair = tl.load(order_ptr + slot)
    else:
        pair = slot
    b = pair // Hq
    h = pair % Hq
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    o_ptrs = (
        out_ptr
        + b64 * stride_ob
        + h64 * stride_oh
        + offs_m[:, None].to(tl.int64) * stride_os
        + offs_d[None, :]
    )
    o_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    if HAS_ACTIVE:
        if tl.load(active_ptr + pair) == 0:
            tl.store(
                o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=o_mask
            )
            return

    if HAS_LENS:
        L = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), Sk)
    else:
        L = Sk
    off = L - Sq  # query row i sits at position off + i
    pos = off + offs_m

    q_ptrs = (
        q_ptr
        + b64 * stride_qb
        + h64 * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qs
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=o_mask, other=0.0)
    if NEG_SCALE:
        q = -q  # exact; keeps qk_scale > 0 (see the unmasked loop)

    kvh64 = (h // GROUP).to(tl.int64)
    k_base = k_ptr + b64 * stride_kb + kvh64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh64 * stride_vh
    km_base = km_ptr + b64 * stride_kmb

    # Key ranges. Rows [m_lo, m_hi) of this block that exist sit at positions
    # [off + m_lo, off + m_hi - 1]. All bounds are clamped to >= 0 before any division.
    m_lo = mb * BLOCK_M
    m_hi = tl.minimum(m_lo + BLOCK_M, Sq)
    key_end = L  # keys >= key_end are invisible to every row
    full_end = L  # keys < full_end are visible to every row (up to the window)
    if CAUSAL:
        key_end = tl.minimum(key_end, off + m_hi)
        full_end = tl.minimum(full_end, off + m_lo + 1)
    key_end = tl.maximum(key_end, 0)
    full_end = tl.maximum(full_end, 0)
    key_start = 0  # keys < key_start are invisible to every row
    full_start = 0  # keys >= full_start are inside every row's window
    if HAS_WINDOW:
        key_start = tl.maximum(off + m_lo - window + 1, 0)
        full_start = tl.maximum(off + m_hi - window, 0)
    if HAS_SEG:
        # Packed prompts: row i sees keys j >= seg[i] only. Keys before every existing
        # row's segment are skipped (what makes packing cheap); keys from the last row's
        # segment start on pass the bound for every row. Clamped to Sk (no overflow).
        seg = tl.load(seg_ptr + b64 * stride_segb + offs_m, mask=row_ok, other=0)
        seg_lo = tl.min(tl.where(row_ok, seg, 2147483647), 0)
        seg_hi = tl.max(tl.where(row_ok, seg, 0), 0)
        key_start = tl.maximum(tl.minimum(seg_lo, Sk), key_start)
        full_start = tl.maximum(tl.minimum(seg_hi, Sk), full_start)
    else:
        seg = pos  # unused
    lo = (key_start // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.cdiv(key_end, BLOCK_N) * BLOCK_N, lo)
    mid_lo = tl.minimum(tl.maximum(tl.cdiv(full_start, BLOCK_N) * BLOCK_N, lo), hi)
    mid_hi = tl.minimum(tl.maximum((full_end // BLOCK_N) * BLOCK_N, mid_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_WINDOW or HAS_SEG:
        acc, l_i, m_i = _attn_range(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            km_base,
            lo,
            mid_lo,
            pos,
            seg,
            L,
            window,
            qk_scale,
            stride_ks,
            stride_vs,
            offs_n,
            offs_d,
            True,
            CAUSAL,
            HAS_WINDOW,
            HAS_KEY_MASK,
            HAS_SEG,
            HEAD_DIM,
            EVEN_D,
            BLOCK_N,
            IN_PREC,
        )
    acc, l_i, m_i = _attn_range(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        km_base,
        mid_lo,
        mid_hi,
        pos,
        seg,
        L,
        window,
        qk_scale,
        stride_ks,
        stride_vs,
        offs_n,
        offs_d,
        False,
        CAUSAL,
        HAS_WINDOW,
        HAS_KEY_MASK,
        HAS_SEG,
        HEAD_DIM,
        EVEN_D,
        BLOCK_N,
        IN_PREC,
    )
    acc, l_i, m_i = _attn_range(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        km_base,
        mid_hi,
        hi,
        pos,
        seg,
        L,
        window,
        qk_scale,
        stride_ks,
        stride_vs,
        offs_n,
        offs_d,
        True,
        CAUSAL,
        HAS_WINDOW,
        HAS_KEY_MASK,
        HAS_SEG,
        HEAD_DIM,
        EVEN_D,
        BLOCK_N,
        IN_PREC,
    )

    # Rows with no visible key have l == 0 and acc == 0: write 0, not 0/0.
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(o_ptrs, (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)


# ------------------------------------------------------------------- configs, autotune


def _cfg(num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Hopper/Ampere starting points (the tutorial's search space, trimmed): 128-row query
# tiles with 8 warps are the usual winners for D = 64..128 at long sequence lengths,
# 64-row tiles for short queries and D = 256.
_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128),
    _cfg(8, 2, BLOCK_M=128, BLOCK_N=128),
    _cfg(4, 3, BLOCK_M=128, BLOCK_N=64),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=32),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=32),
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=128),
]

if _INTERPRET:
    # One small config: the interpreter runs every program in Python.
    _CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16)]
elif not settings.autotune():
    # Correctness runs on the GPU see many shapes: two configs, both tile heights.
    _CONFIGS = [_CONFIGS[0], _CONFIGS[5]]


@functools.cache
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _smem_bytes(bm: int, bn: int, bd: int, stages: int, elt: int) -> int:
    # Shared memory of the compiled kernel on sm_90 (Triton 3.x, checked against the
    # compiler's count): num_stages buffers of the K and V tiles plus the Q tile (wgmma
    # reads Q from shared memory). sm_80 uses less. Used to shrink configs that cannot
    # fit (D = 256, fp32) rather than leave the autotuner with nothing that compiles.
    return (stages * 2 * bn * bd + bm * bd) * elt


def _fit(cfg: triton.Config, bd: int, elt: int, limit: int) -> triton.Config:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    stages, warps = cfg.num_stages, cfg.num_warps
    while _smem_bytes(bm, bn, bd, stages, elt) > limit:
        if stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        elif bm > 16:
            bm //= 2
        else:
            break
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    bd, sq_bucket = args["BLOCK_D"], args["SQ_BUCKET"]
    q = args["q_ptr"]
    elt = q.element_size()
    limit = _smem_limit(q.device.index or 0) if q.device.type == "cuda" else 1 << 30
    kept, seen = [], set()
    for c in configs:
        if sq_bucket <= 64 and c.kwargs["BLOCK_M"] > 64:
            continue  # short queries: a 128-row tile would be mostly padding
        if bd >= 256 and c.kwargs["BLOCK_M"] > 64 and c.num_warps < 8:
            continue  # a 128 x 256 fp32 accumulator needs 8 warps' registers
        f = _fit(c, bd, elt, limit)
        sig = (f.kwargs["BLOCK_M"], f.kwargs["BLOCK_N"], f.num_warps, f.num_stages)
        if sig not in seen:
            seen.add(sig)
            kept.append(f)
    return kept or [_fit(configs[-1], bd, elt, limit)]


_attn_tuned = autotune(
    _CONFIGS,
    key=["HEAD_DIM", "CAUSAL", "SQ_BUCKET", "SK_BUCKET"],  # + every tensor's dtype (Triton)
    prune_configs_by={"early_config_prune": _prune},
)(_attn_fwd_kernel)


def _bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 16), 16384)


# --------------------------------------------------------------------------- launcher


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    window: int,
    key_mask: torch.Tensor | None,
    cache_lens: torch.Tensor | None,
    head_active: torch.Tensor | None,
    head_order: torch.Tensor | None,
    seg_start: torch.Tensor | None = None,
    config: dict | None = None,
) -> None:
    """Flash-attention forward into ``out`` (the module docstring gives the rule).

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``,
            ``1 <= D <= 256``; float32/float16/bfloat16, all one dtype; every tensor has
            unit stride in its last dimension (other strides arbitrary).
        out: ``[B, Hq, Sq, D]`` in q's dtype, unit last stride; every element is written.
        causal: bottom-right causal (query i at position ``L_b - Sq + i``).
        scale: softmax scale (any sign); window: sliding window, 0 = none.
        key_mask: ``None`` or int8 ``[B, Sk]`` with unit last stride, nonzero = key kept.
        cache_lens: ``None`` or int32 ``[B]``, valid key count ``L_b`` per row (values
            outside ``[0, Sk]`` are clamped on the device).
        head_active: ``None`` or int8 ``[B * Hq]``, 0 = pruned (b, h) pair (writes zeros).
        head_order: ``None`` or int32 ``[B * Hq]``, a permutation listing the active pairs
            first (slot s of the grid works on pair ``head_order[s]``).
        seg_start: ``None`` or int32 ``[B, Sq]`` with unit last stride, a per-query lower
            bound on the visible keys (packed prompts: query i sees keys
            ``j >= seg_start[b, i]``); key blocks before every row's bound are skipped.
        config: force ``{"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]}`` instead of
            the autotuner (tests, tuning experiments).

    No host synchronisation and no reads of device values on the host: CUDA-graph
    capturable once the autotuner has chosen a config for the shape (call it once before
    capture). Checks live in the op layer.
    """
    batch, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if out.numel() == 0:
        return
    block_d = max(16, triton.next_power_of_2(d))
    n_slots = batch * hq
    dummy = q  # any valid pointer for the absent optional tensors (never dereferenced)
    args = (
        q,
        k,
        v,
        out,
        key_mask if key_mask is not None else dummy,
        cache_lens if cache_lens is not None else dummy,
        head_active if head_active is not None else dummy,
        head_order if head_order is not None else dummy,
        seg_start if seg_start is not None else dummy,
        sq,
        sk,
        hq,
        hq // hkv,
        int(window),
        abs(float(scale)) * _LOG2E,
        *strides3(q, k, v, out),
        key_mask.stride(0) if key_mask is not None else 0,
        seg_start.stride(0) if seg_start is not None else 0,
        _bucket(sq),
        _bucket(sk),
    )
    meta = dict(
        # The unmasked loop's scale-and-subtract is meant to be one FMA per score (Triton
        # 3.9 warns that its fusion default flips to off in 3.10).
        enable_fp_fusion=True,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        EVEN_D=d == block_d,
        CAUSAL=bool(causal),
        HAS_WINDOW=int(window) > 0,
        HAS_KEY_MASK=key_mask is not None,
        HAS_LENS=cache_lens is not None,
        HAS_ACTIVE=head_active is not None,
        HAS_ORDER=head_order is not None,
        HAS_SEG=seg_start is not None,
        NEG_SCALE=float(scale) < 0.0,
        IN_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )

    def grid(meta_):
        return (triton.cdiv(sq, meta_["BLOCK_M"]) * n_slots,)

    if config is not None:
        kw = dict(config)
        kw.setdefault("num_warps", 1 if _INTERPRET else 4)
        kw.setdefault("num_stages", 1 if _INTERPRET else 3)
        launch = functools.partial(_attn_fwd_kernel[grid], *args, **meta, **kw)
    else:
        launch = functools.partial(_attn_tuned[grid], *args, **meta)
    if q.is_cuda:
        with torch.cuda.device(q.device):
            launch()
    else:
        launch()


# ------------------------------------------------------------------------- head tables


@triton.jit
def _head_tables_kernel(
    mask_ptr,
    stride_b,
    active_ptr,
    order_ptr,
    H,
    N,
    WANT_ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: expand the [H] or [B, H] mask to B*H flags and, for the prefill grid,
    # list the active (b, h) pairs first (stable: prefix sums give each pair its slot).
    i = tl.arange(0, BLOCK)
    ok = i < N
    m = tl.load(mask_ptr + (i // H) * stride_b + i % H, mask=ok, other=0)
    act = ((m != 0) & ok).to(tl.int32)
    tl.store(active_ptr + i, act.to(tl.int8), mask=ok)
    if WANT_ORDER:
        n_active = tl.sum(act, axis=0)
        slot_active = tl.cumsum(act, axis=0) - 1
        slot_idle = n_active + tl.cumsum((1 - act) * ok.to(tl.int32), axis=0) - 1
        tl.store(order_ptr + tl.where(act != 0, slot_active, slot_idle), i, mask=ok)


#: Largest batch * heads the one-program table kernel takes.
MAX_HEAD_TABLE = 1 << 16


def head_tables(
    head_mask: torch.Tensor, batch: int, heads: int, want_order: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(active int8 [B*H], order int32 [B*H] or None)`` from a ``[H]``/``[B, H]`` mask.

    ``order`` lists the active pairs first, each part in index order. One kernel launch
    (the argsort it replaces costs several), no host sync; ``B*H <= MAX_HEAD_TABLE``.
    """
    n = batch * heads
    mask = head_mask.view(torch.uint8) if head_mask.dtype == torch.bool else head_mask
    stride_b = mask.stride(0) if mask.dim() == 2 else 0
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
        stride_b = mask.stride(0) if mask.dim() == 2 else 0
    active = torch.empty(n, dtype=torch.int8, device=mask.device)
    order = torch.empty(n, dtype=torch.int32, device=mask.device) if want_order else None
    block = triton.next_power_of_2(max(n, 16))
    _head_tables_kernel[(1,)](
        mask,
        stride_b,
        active,
        order if order is not None else active,
        heads,
        n,
        WANT_ORDER=want_order,
        BLOCK=block,
        num_warps=4 if block <= 4096 else 16,
    )
    return active, order

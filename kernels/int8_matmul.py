"""INT8 matmul kernels (Triton): W8A16 weight-only and W8A8 SmoothQuant linear layers.

W8A16 (``w8a16``), weights int8 with fp32 scales, activations fp16/bf16/fp32::

    y[m, n] = sum_k x[m, k] * (w[n, k] * s[n, k // group])  + bias[n]
            = s[n] * sum_k x[m, k] * w[n, k]                 + bias[n]     (per channel)

The weights stay int8 in HBM and are dequantized in registers (LLM.int8(), Dettmers et
al., 2022, keeps the int8 weights resident the same way). Products and sums are fp32 and
the output is rounded once to the activation dtype. Two paths:

* decode (``M <= DECODE_MAX_M``): memory bound, so the design goal is to stream the int8
  weights once at full bandwidth. ``M == 1`` is a GEMV on the CUDA cores (``[BLOCK_N,
  BLOCK_K]`` weight tiles times the broadcast activation row, fp32 FMAs, one cross-thread
  reduction at the end, the next tile's loads issued before the current tile is used);
  ``2 <= M <= 16`` pads M to 16 and uses ``tl.dot`` with the weights as the left operand
  ("swap AB": N fills the MMA's M dimension, and on Hopper wgmma reads the converted
  weights from registers instead of a shared-memory round trip). Both split K over a
  second grid axis when ``N / BLOCK_N`` alone cannot fill the GPU, writing fp32 partials
  that a second, tiny kernel sums in a fixed order (atomic-free, deterministic), as in
  the split-K GEMV/GEMM designs of the Triton matmul tutorial and CUTLASS.
* fused decode (``w8a16_fused``, ``M == 1``): the same GEMV with the prologue and epilogue
  of ``ops.int8_linear_fused`` (SiLU-mul of ``[gate | up]`` and/or RMSNorm of the input row,
  residual add of the output), each rounded where the separate ops round, as constexpr
  flags of the decode kernel: with all of them off it compiles to the plain GEMV's code.
  RMSNorm's statistic needs the whole row while a split-K program reads a K slice, so each
  program first sums the squares of the whole row (a few KB from L2), then scales each
  activation tile as it streams the weights.
* prefill (larger M): a tensor-core GEMM (``tl.dot``) with L2-friendly grouped program
  order (Triton matmul tutorial), software pipelined (``num_stages``). The int8 weight
  tile is converted to the activation dtype in registers (exact: ``|w| <= 127`` fits
  fp16 and bf16); per-channel scales are applied once in the epilogue, group-wise scales
  per K tile inside the loop (``BLOCK_K`` divides the group size) or, for group sizes
  with no power-of-two divisor >= 16, per element before the dot (the dequantized weight
  is then rounded to the activation dtype: one extra rounding, on that rare path only).
  Up to ``SPLIT_GEMM_MAX_M`` rows the autotuner may also pick narrow split-K tiles
  (serial split-K as in the decode path) for projections whose tiles alone leave most
  SMs idle. From ``DEQUANT_GEMM_MIN_M`` rows on, a GPU dequantizes and calls cuBLAS.

W8A8 (``w8a8``), SmoothQuant (Xiao et al., 2023): a pre-pass quantizes each activation
row of ``x / smooth`` to int8 with its own fp32 scale (exactly the rounding rule of
``kernels.quantize``), then an int8 x int8 -> int32 tensor-core GEMM applies
``acc * a_scale[m] * w_scale[n] + bias[n]`` in its epilogue (for small M with split-K:
int32 partials, so the sum stays exact).

Launch configurations: ``@triton.autotune`` over small config sets (at most 17 per kernel)
keyed on the M bucket, N, K and the group size. Under ``TRITON_INTERPRET=1`` each set is
one fixed, small config (no benchmarking on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sentinel_kernels import settings

from ._autotune import autotune
from ._pdl import pdl_meta, pdl_release, pdl_wait
from ._tiles import tile_2d
from .quantize import quantize_rows_smoothed

# Rows up to this count take the decode path (weights streamed once, split-K GEMV/MMA).
DECODE_MAX_M = 16
# From this many rows on (fp16/bf16 on a GPU), prefill dequantizes the weights into a
# bounded workspace and runs cuBLAS: the dequantization pass (3 bytes per weight) is then
# small against the GEMM, and cuBLAS's Hopper GEMM beats our Triton one (H200, M = 4096,
# 4096x4096: Triton 0.78x of bf16 F.linear; see docs/MEASUREMENTS.md). 512, not 1024: the
# engine's 512-token prefill chunks at level 2 took 28.2 / 29.7 ms at 512 against 43.0 /
# 33.5 ms at 1024 (H100, 1B / SmolLM2 shapes, same call; the projections alone are equal
# at M = 512, the fused SiLU-prologue and norm-prologue GEMMs are what the model loses).
DEQUANT_GEMM_MIN_M = 512
# Workspace of the dequantize-then-GEMM path: the weights are processed in row chunks of
# at most this many bytes of fp16/bf16, so a 128256x4096 LM head needs 128 MiB, not 1 GiB.
DEQUANT_WORKSPACE_BYTES = 128 * 2**20

_INTERPRET = settings.triton_interpret()
# The interpreter has no libdevice: the fused SiLU prologue evaluates exp in fp64 there.
_EXP_F64 = tl.constexpr(_INTERPRET)


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _int8_to(w, DTYPE: tl.constexpr, FAST: tl.constexpr):
    # int8 -> DTYPE, exact. Fast path: 2**23 + 128 + w has w in its low mantissa bits,
    # so an integer add builds it and one float subtract recovers w (fp16: 1024 + 128).
    if FAST:
        if DTYPE == tl.float16:
            h = (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True)
            out = (h - 1152.0).to(tl.float16)
        else:
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            out = f.to(DTYPE)
    else:
        out = w.to(DTYPE)
    return out


@triton.jit
def _grouped_pids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Programs that run together share weight columns and activation rows in L2:
    # walk GROUP_M row blocks down before moving to the next column block.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _w8a16_mma_step(
    acc,
    x,
    w,
    s_ptr,
    offs_sn,
    stride_sn,
    k0,
    K,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    IN_PREC: tl.constexpr,
    FAST: tl.constexpr,
):
    # One K tile of the tensor-core paths: acc [BM, BN] (or [BN, BM] with SWAP_AB) +=
    # x [BM, BK] @ dequant(w [BN, BK])^T.
    act: tl.constexpr = x.dtype
    if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
        wd = _int8_to(w, act, FAST)
        if SWAP_AB:
            part = tl.dot(wd, tl.trans(x), input_precision=IN_PREC)
        else:
            part = tl.dot(x, tl.trans(wd), input_precision=IN_PREC)
        if GROUP_SIZE == 0:
            acc += part
        else:
            # The whole tile lies in one group: scale the tile's partial sums.
            s = tl.load(s_ptr + offs_sn * stride_sn + k0 // GROUP_SIZE)
            if SWAP_AB:
                acc += part * s[:, None]
            else:
                acc += part * s[None, :]
    else:
        # Group boundaries inside the tile: dequantize per element (fp32) before the dot.
        kk = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(
            s_ptr + offs_sn[:, None] * stride_sn + (kk // GROUP_SIZE)[None, :],
            mask=(kk < K)[None, :],
            other=0.0,
        )
        wd = (_int8_to(w, tl.float32, FAST) * s).to(act)
        if SWAP_AB:
            acc = tl.dot(wd, tl.trans(x), acc, input_precision=IN_PREC)
        else:
            acc = tl.dot(x, tl.trans(wd), acc, input_precision=IN_PREC)
    return acc


@triton.jit
def _w8a16_store(
    acc,
    s_ptr,
    b_ptr,
    out_ptr,
    offs_m,
    offs_n,
    offs_sn,
    M,
    N,
    stride_om,
    res_ptr,
    stride_rm,
    stride_rn,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    # Epilogue: per-channel scale, bias, one rounding to the output dtype; with RESIDUAL
    # then out = round(round(y) + residual[m, n]), the eager `residual + y`.
    if SWAP_AB:  # acc is [BN, BM]
        if PER_CHANNEL:
            acc = acc * tl.load(s_ptr + offs_sn)[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_sn).to(tl.float32)[:, None]
        rows = offs_m[None, :].to(tl.int64)
        cols = offs_n[:, None]
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    else:
        if PER_CHANNEL:
            acc = acc * tl.load(s_ptr + offs_sn)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_sn).to(tl.float32)[None, :]
        rows = offs_m[:, None].to(tl.int64)
        cols = offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        res = tl.load(res_ptr + rows * stride_rm + cols * stride_rn, mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_om + cols, y, mask=mask)


# ------------------------------------------------------------------------ W8A16 decode


@triton.jit
def _silu_mul_tile(g, u):
    # reference.silu_mul's roundings: silu(g) = g / (1 + exp(-g)) in fp32 (IEEE division;
    # libdevice expf, as torch's CUDA silu) rounded to the dtype, then the product rounded.
    dtype: tl.constexpr = g.dtype
    gf = g.to(tl.float32)
    if _EXP_F64:
        e = tl.exp(-gf.to(tl.float64)).to(tl.float32)
    else:
        e = libdevice.exp(-gf)
    silu = tl.math.div_rn(gf, 1.0 + e).to(dtype)
    return (silu.to(tl.float32) * u.to(tl.float32)).to(dtype)


@triton.jit
def _rms_inv(x_ptr, K, eps, SILU_IN: tl.constexpr, BLOCK_K: tl.constexpr):
    """``1 / sqrt(sum(a^2) / K + eps)`` (fp32; sqrt and divisions correctly rounded, as
    ``kernels.fused``'s RMSNorm) over the whole activation row ``a`` (``silu_mul`` of its
    two halves with ``SILU_IN``): a split-K program reads only its slice in the main loop,
    but the statistic needs the row; it is a few KB, read again from L2 by each program."""
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        ok = kk < K
        a = tl.load(x_ptr + kk, mask=ok, other=0.0, eviction_policy="evict_last")
        if SILU_IN:
            u = tl.load(x_ptr + K + kk, mask=ok, other=0.0, eviction_policy="evict_last")
            a = _silu_mul_tile(a, u)
        af = a.to(tl.float32)
        acc += af * af
    # K * 1.0, not K.to(): an int argument equal to 1 arrives as a constexpr.
    mean = tl.math.div_rn(tl.sum(acc, axis=0), K * 1.0)
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))


@triton.jit
def _gemv_epilogue(
    y,
    s_ptr,
    b_ptr,
    res_ptr,
    out_ptr,
    offs_n,
    offs_sn,
    n_ok,
    stride_rn,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    # Per-channel scale, bias, one rounding to the output dtype; with RESIDUAL then
    # out = round(round(y) + residual), the eager `residual + y` of the unfused layer.
    if PER_CHANNEL:
        y = y * tl.load(s_ptr + offs_sn)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_sn).to(tl.float32)
    if RESIDUAL:
        res = tl.load(res_ptr + offs_sn * stride_rn)
        out = y.to(out_ptr.dtype.element_ty)
        out = (out.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_n, out, mask=n_ok)
    else:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _arrive_last(cnt_ptr, SPLIT_K: tl.constexpr):
    """Count this program in at ``cnt_ptr``; true for the last of ``SPLIT_K`` to arrive.

    The barrier makes every thread's partial-sum stores precede the release of the
    atomic, whose acquire side lets the last program read them (through L2: ``.cg``).
    """
    tl.debug_barrier()
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == SPLIT_K - 1


@triton.jit
def _w8a16_decode_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    nw_ptr,
    res_ptr,
    stride_rm,
    stride_rn,
    eps,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IN_PREC: tl.constexpr,
    FAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    NORM: tl.constexpr,
    SILU_IN: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_N), SPLIT_K). Program (n, s) computes rows 0..M-1 of output
    # columns n*BLOCK_N.. over the s-th K slice; with SPLIT_K > 1 it stores an fp32
    # partial to part_ptr [SPLIT_K, M, N], and the last of the SPLIT_K programs of a
    # column block to finish (an atomic counter per block, cnt_ptr) sums the partials in
    # a fixed order and writes the output: a serial split-K reduction as in CUTLASS's
    # "serial" split-K, which spares the second kernel launch of a separate reduction.
    #
    # The fused layer of int8_linear_fused (all three off: the plain GEMV or MMA, the same
    # code; nw_ptr, res_ptr, its strides and eps are then unused):
    #   SILU_IN   x is [gate | up], 2K wide; the activation is silu_mul(gate, up).
    #   NORM      (M == 1 only: the statistic needs the whole row) the activation a
    #             becomes round(nw * round(a * r)), r = _rms_inv(row).
    #   RESIDUAL  out = round(round(y) + residual[m * stride_rm + n * stride_rn]).
    tl.static_assert(BLOCK_M == 1 or not NORM)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_sn = offs_n % N  # in-bounds rows for the loads (the stores are masked)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_ptrs = w_ptr + offs_sn[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    PER_CHANNEL: tl.constexpr = GROUP_SIZE == 0
    TILE_IN_GROUP: tl.constexpr = GROUP_SIZE != 0 and GROUP_SIZE % BLOCK_K == 0
    GROUPS_IN_TILE: tl.constexpr = (
        GROUP_SIZE != 0 and not TILE_IN_GROUP and BLOCK_K % GROUP_SIZE == 0
    )

    if BLOCK_M == 1:
        # GEMV on CUDA cores: keep a [BLOCK_N, BLOCK_K] fp32 accumulator (pure FMAs in
        # the loop, vector loads of K-contiguous weights) and reduce across K once.
        if GROUPS_IN_TILE:
            acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP_SIZE], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # Register double buffering: the loads of tile i+1 are issued before tile i is
        # used, so each warp keeps two tiles of weights in flight (Triton's pipeliner
        # only stages loads that feed tl.dot).
        # Whole-tile predicates are splats (k + zeros < k_hi), which keep the loads
        # vectorized (uniform along K) and which the interpreter also accepts.
        zeros_k = tl.zeros([BLOCK_K], dtype=tl.int32)
        zeros_nk = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        x_ptrs = x_ptr + k_lo + offs_k
        # The first weight tile is loaded before the PDL wait: weights are constant, so
        # they may stream in while the kernel that writes x is still finishing.
        if EVEN_K:
            w = tl.load(w_ptrs, mask=zeros_nk + k_lo < k_hi, other=0, eviction_policy="evict_first")
        else:
            k_ok = offs_k < k_hi - k_lo
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0, eviction_policy="evict_first")
        pdl_wait(PDL)
        if NORM:
            r_inv = _rms_inv(x_ptr, K, eps, SILU_IN, BLOCK_K)
            nw_ptrs = nw_ptr + k_lo + offs_k
        if EVEN_K:
            xv = tl.load(
                x_ptrs, mask=zeros_k + k_lo < k_hi, other=0.0, eviction_policy="evict_last"
            )
        else:
            xv = tl.load(x_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
        # The prologue's other operands (up half, norm weight) are prefetched with x.
        if SILU_IN or NORM:
            if EVEN_K:
                p_ok = zeros_k + k_lo < k_hi
            else:
                p_ok = offs_k < k_hi - k_lo
        if SILU_IN:
            uv = tl.load(x_ptrs + K, mask=p_ok, other=0.0, eviction_policy="evict_last")
        if NORM:
            nv = tl.load(nw_ptrs, mask=p_ok, other=0.0, eviction_policy="evict_last")
        for k0 in range(k_lo, k_hi, BLOCK_K):
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            if EVEN_K:
                xn = tl.load(
                    x_ptrs,
                    mask=zeros_k + (k0 + BLOCK_K) < k_hi,
                    other=0.0,
                    eviction_policy="evict_last",
                )
                wn = tl.load(
                    w_ptrs,
                    mask=zeros_nk + (k0 + BLOCK_K) < k_hi,
                    other=0,
                    eviction_policy="evict_first",
                )
            else:
                k_ok = offs_k < k_hi - k0 - BLOCK_K
                xn = tl.load(x_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
                wn = tl.load(w_ptrs, mask=k_ok[None, :], other=0, eviction_policy="evict_first")
            if SILU_IN or NORM:
                if EVEN_K:
                    p_ok = zeros_k + (k0 + BLOCK_K) < k_hi
                else:
                    p_ok = offs_k < k_hi - k0 - BLOCK_K
            if SILU_IN:
                un = tl.load(x_ptrs + K, mask=p_ok, other=0.0, eviction_policy="evict_last")
                av = _silu_mul_tile(xv, uv)
                uv = un
            else:
                av = xv
            if NORM:
                nw_ptrs += BLOCK_K
                nn = tl.load(nw_ptrs, mask=p_ok, other=0.0, eviction_policy="evict_last")
                # rms_norm's roundings: round(a * r) to the dtype, times the weight, rounded.
                h = (av.to(tl.float32) * r_inv).to(xv.dtype)
                av = (h.to(tl.float32) * nv.to(tl.float32)).to(xv.dtype)
                nv = nn
            prod = _int8_to(w, tl.float32, FAST) * av.to(tl.float32)[None, :]
            if PER_CHANNEL:
                acc += prod
            elif TILE_IN_GROUP:
                acc += prod * tl.load(s_ptr + offs_sn * stride_sn + k0 // GROUP_SIZE)[:, None]
            elif GROUPS_IN_TILE:
                n_groups: tl.constexpr = BLOCK_K // GROUP_SIZE
                g = k0 // GROUP_SIZE + tl.arange(0, n_groups)
                s = tl.load(
                    s_ptr + offs_sn[:, None] * stride_sn + g[None, :],
                    mask=(g < tl.cdiv(K, GROUP_SIZE))[None, :],
                    other=0.0,
                )
                acc += tl.sum(tl.reshape(prod, (BLOCK_N, n_groups, GROUP_SIZE)), axis=2) * s
            else:
                kk = k0 + offs_k
                s = tl.load(
                    s_ptr + offs_sn[:, None] * stride_sn + (kk // GROUP_SIZE)[None, :],
                    mask=(kk < K)[None, :],
                    other=0.0,
                )
                acc += prod * s
            xv = xn
            w = wn
        pdl_release(PDL)
        y = tl.sum(acc, axis=1)
        n_ok = offs_n < N
        if SPLIT_K == 1:
            _gemv_epilogue(
                y,
                s_ptr,
                b_ptr,
                res_ptr,
                out_ptr,
                offs_n,
                offs_sn,
                n_ok,
                stride_rn,
                PER_CHANNEL,
                HAS_BIAS,
                RESIDUAL,
            )
        else:
            tl.store(part_ptr + pid_k * N + offs_n, y, mask=n_ok)
            if _arrive_last(cnt_ptr + pid_n, SPLIT_K):
                y = tl.zeros([BLOCK_N], dtype=tl.float32)
                for s_ in tl.static_range(SPLIT_K):
                    y += tl.load(
                        part_ptr + s_ * N + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg"
                    )
                _gemv_epilogue(
                    y,
                    s_ptr,
                    b_ptr,
                    res_ptr,
                    out_ptr,
                    offs_n,
                    offs_sn,
                    n_ok,
                    stride_rn,
                    PER_CHANNEL,
                    HAS_BIAS,
                    RESIDUAL,
                )
                tl.store(cnt_ptr + pid_n, 0)  # re-arm for the next launch (graph replays)
    else:
        # 2 <= M <= 16: tensor cores with the weights as the left operand (N fills the
        # MMA's M dimension; the padded activation rows only cost idle MMA lanes).
        offs_m = tl.arange(0, BLOCK_M)
        x_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        pdl_wait(PDL)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                xv = tl.load(x_ptrs, eviction_policy="evict_last")
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                if SILU_IN:
                    xv = _silu_mul_tile(xv, tl.load(x_ptrs + K, eviction_policy="evict_last"))
            else:
                k_ok = (offs_k < K - k0)[None, :]
                xv = tl.load(x_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
                w = tl.load(w_ptrs, mask=k_ok, other=0, eviction_policy="evict_first")
                if SILU_IN:
                    uv = tl.load(x_ptrs + K, mask=k_ok, other=0.0, eviction_policy="evict_last")
                    xv = _silu_mul_tile(xv, uv)
            acc = _w8a16_mma_step(
                acc,
                xv,
                w,
                s_ptr,
                offs_sn,
                stride_sn,
                k0,
                K,
                GROUP_SIZE,
                BLOCK_K,
                True,
                IN_PREC,
                FAST,
            )
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        pdl_release(PDL)
        if SPLIT_K == 1:
            _w8a16_store(
                acc,
                s_ptr,
                b_ptr,
                out_ptr,
                offs_m,
                offs_n,
                offs_sn,
                M,
                N,
                stride_om,
                res_ptr,
                stride_rm,
                stride_rn,
                PER_CHANNEL,
                HAS_BIAS,
                True,
                RESIDUAL,
            )
        else:
            ok = (offs_m[None, :] < M) & (offs_n[:, None] < N)
            ptrs = part_ptr + offs_m[None, :] * N + offs_n[:, None]
            tl.store(ptrs + pid_k * M * N, acc, mask=ok)
            if _arrive_last(cnt_ptr + pid_n, SPLIT_K):
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                for s_ in tl.static_range(SPLIT_K):
                    acc += tl.load(ptrs + s_ * M * N, mask=ok, other=0.0, cache_modifier=".cg")
                _w8a16_store(
                    acc,
                    s_ptr,
                    b_ptr,
                    out_ptr,
                    offs_m,
                    offs_n,
                    offs_sn,
                    M,
                    N,
                    stride_om,
                    res_ptr,
                    stride_rm,
                    stride_rn,
                    PER_CHANNEL,
                    HAS_BIAS,
                    True,
                    RESIDUAL,
                )
                tl.store(cnt_ptr + pid_n, 0)


# ----------------------------------------------------------------------- W8A16 prefill


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    M_BUCKET,
    res_ptr,
    stride_rm,
    stride_rn,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IN_PREC: tl.constexpr,
    FAST: tl.constexpr,
    SILU_IN: tl.constexpr,
    RESIDUAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # M_BUCKET is only an autotuning key (next power of two of M). Grid (tiles, SPLIT_K).
    # With SPLIT_K > 1 (a few dozen to a few hundred rows: batched decode, speculative
    # verification, short chunks, where the M x N tiles alone leave most SMs idle; a
    # SmolLM2 projection at M = 64 is 9 tiles of 64 x 64 on 132 SMs) program (t, s) sums
    # the s-th K slice of tile t into an fp32 partial [SPLIT_K, M, N], and the last of
    # the tile's programs to arrive adds the partials in slice order and writes the
    # output: the decode kernel's serial split-K, so the result does not depend on
    # arrival order. SILU_IN and RESIDUAL: the decode kernel's prologue and epilogue
    # (x is [gate | up], 2K wide; out = round(round(y) + residual)).
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    # Wrapped row indices keep every load in bounds without an M/N mask (stores are
    # masked), so only a ragged K tail needs masking.
    offs_sn = offs_n % N
    x_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_sn[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pdl_wait(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            if SILU_IN:
                xv = _silu_mul_tile(xv, tl.load(x_ptrs + K))
        else:
            k_ok = (offs_k < K - k0)[None, :]
            xv = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok, other=0)
            if SILU_IN:
                xv = _silu_mul_tile(xv, tl.load(x_ptrs + K, mask=k_ok, other=0.0))
        acc = _w8a16_mma_step(
            acc,
            xv,
            w,
            s_ptr,
            offs_sn,
            stride_sn,
            k0,
            K,
            GROUP_SIZE,
            BLOCK_K,
            SWAP_AB,
            IN_PREC,
            FAST,
        )
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pdl_release(PDL)
    if SPLIT_K > 1:
        if SWAP_AB:
            ok = (offs_m[None, :] < M) & (offs_n[:, None] < N)
            ptrs = part_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        else:
            ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        slice_elems = (pid_k.to(tl.int64) * 0 + M) * N  # int64 even where M is specialized
        tl.store(ptrs + pid_k * slice_elems, acc, mask=ok)
        tile = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        if _arrive_last(cnt_ptr + tile, SPLIT_K):
            if SWAP_AB:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s_ in tl.static_range(SPLIT_K):
                acc += tl.load(ptrs + s_ * slice_elems, mask=ok, other=0.0, cache_modifier=".cg")
            _w8a16_store(
                acc,
                s_ptr,
                b_ptr,
                out_ptr,
                offs_m,
                offs_n,
                offs_sn,
                M,
                N,
                stride_om,
                res_ptr,
                stride_rm,
                stride_rn,
                GROUP_SIZE == 0,
                HAS_BIAS,
                SWAP_AB,
                RESIDUAL,
            )
            tl.store(cnt_ptr + tile, 0)  # re-arm for the next launch (graph replays)
    else:
        _w8a16_store(
            acc,
            s_ptr,
            b_ptr,
            out_ptr,
            offs_m,
            offs_n,
            offs_sn,
            M,
            N,
            stride_om,
            res_ptr,
            stride_rm,
            stride_rn,
            GROUP_SIZE == 0,
            HAS_BIAS,
            SWAP_AB,
            RESIDUAL,
        )


# ------------------------------------------------------------------------------- W8A8


@triton.jit
def _w8a8_gemm_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    out_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # int8 x int8 -> int32 on tensor cores (exact for K < 2**31 / 127**2 = 133k), then
    # y = (acc * a_scale[m]) * w_scale[n] + bias[n] in fp32, rounded once. Grid
    # (tiles, SPLIT_K): with SPLIT_K > 1 (small M, where the tiles alone cannot fill the
    # GPU) each program stores an int32 partial and the reduce kernel adds them, still
    # exactly.
    pid_m, pid_n = _grouped_pids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_am = offs_m % M
    offs_sn = offs_n % N
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = xq_ptr + offs_am[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_sn[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (offs_k < K - k0)[None, :]
            a = tl.load(x_ptrs, mask=k_ok, other=0)
            b = tl.load(w_ptrs, mask=k_ok, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        y = acc.to(tl.float32) * tl.load(xs_ptr + offs_am)[:, None]
        y = y * tl.load(ws_ptr + offs_sn)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_sn).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ptrs = part_ptr + (tl.program_id(1) * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _w8a8_splitk_reduce_kernel(
    part_ptr,
    xs_ptr,
    ws_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    m = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=n_ok, other=0)
    y = acc.to(tl.float32) * tl.load(xs_ptr + m)
    y = y * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + m.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok
    )


# ------------------------------------------------------------------- configs, autotune


def _cfg(num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# M == 1 GEMV: 4-16 KiB int8 weight tiles per iteration, 4 warps. The first five won a
# sweep of 72 configs on an H200 (bench/results/*int8_gemv_sweep.json, CUDA-graph replays) for the
# INT8 issue's shapes; split-K lost there everywhere (N >= 4096 already gives >= 256
# programs) and stays for narrow layers, whose N alone cannot fill the GPU.
_GEMV_CONFIGS = [
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=512, SPLIT_K=1),
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1),
    _cfg(8, 1, BLOCK_N=16, BLOCK_K=512, SPLIT_K=1),
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=2),
    _cfg(4, 1, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    _cfg(4, 1, BLOCK_N=8, BLOCK_K=512, SPLIT_K=4),
    _cfg(4, 1, BLOCK_N=16, BLOCK_K=256, SPLIT_K=8),
    # Winners of the H200 sweep (bench/results/*int8_gemv_sweep.json) for the tall shapes:
    # 128256x4096 (1.75x bf16) and 14336x4096 (SPLIT_K=2, 1.57x).
    _cfg(4, 1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1),
    _cfg(4, 1, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2),
]
_TALL_GEMV_TILE = (32, 128)
_TALL_GEMV_MIN_N = 8192
# 2 <= M <= 16, swap-AB MMA.
_DECODE_MMA_CONFIGS = [
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4),
    _cfg(4, 3, BLOCK_N=64, BLOCK_K=256, SPLIT_K=1),
    _cfg(4, 3, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
    _cfg(4, 3, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    _cfg(4, 4, BLOCK_N=32, BLOCK_K=256, SPLIT_K=8),
]
# Prefill GEMM (bf16/fp16 tensor cores). SWAP_AB puts the converted weights in the MMA's
# left operand, which Hopper's wgmma can read from registers.
_PREFILL_CONFIGS = [
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=False, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, SWAP_AB=False, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP_AB=False, SPLIT_K=1),
    # 17..256 rows (issue 19 item 2: batched decode at level 2 lost to bf16 cuBLAS). The
    # projections there are small (a SmolLM2 one is 0.3-1.8 MB of int8) and each launch is
    # latency-bound: what wins is many small programs, each streaming a [32-64, 128] weight
    # tile per step, and split-K where N alone gives few programs. These five won a forced
    # sweep of 82 configs on an H100 at 32-128 rows (scripts/int8_batched_sweep.py,
    # bench/results/2026-12-07_nvidia-h100_int8_batched_sweep_*.json): 0.74-0.96x of
    # cuBLAS bf16 on the SmolLM2 projections, where the autotuner's pick from the four
    # earlier ones (below) ran at 0.22-0.70x. The prune keeps the split-K
    # ones only where the tiles alone cannot fill the GPU and below SPLIT_GEMM_MAX_M rows,
    # so prefill's candidates are the eight above plus the small unsplit tiles.
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=4),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=4),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=1),
    # The earlier split-K candidates, kept beside them: the sweep covered SmolLM2's
    # projections and the 1B gate/up only, and without these the 1B shape's level-2
    # batch-64/128 decode fell from 0.71/0.67x to 0.54/0.52x of level 1 (H100, session 29).
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=4),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=2),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, SWAP_AB=True, SPLIT_K=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=2),
]
# Split-K GEMM configs only up to this many rows (the M bucket): above it the tiles fill
# the GPU and the partials' round trip through L2 would be pure cost.
SPLIT_GEMM_MAX_M = 256
# int8 tensor cores: K tiles of 128 bytes. The BLOCK_M <= 32 ones serve decode (M <= 16
# pads to one row block; split-K gives N = 4096 enough programs).
_W8A8_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, SPLIT_K=1),
    _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, SPLIT_K=4),
]

if _INTERPRET:
    # One small config each: the interpreter runs every program in Python, and there is
    # nothing to benchmark on a CPU. SPLIT_K=2 keeps the split-K reduction under test.
    _GEMV_CONFIGS = [_cfg(1, 1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2)]
    _DECODE_MMA_CONFIGS = [_cfg(1, 1, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2)]
    _PREFILL_CONFIGS = [
        _cfg(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SWAP_AB=True, SPLIT_K=1)
    ]
    _W8A8_CONFIGS = [_cfg(1, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SPLIT_K=1)]
elif not settings.autotune():
    # Tests on the GPU see hundreds of distinct shapes: autotuning each over 8 configs
    # takes minutes. Keep two configs per kernel, a split-K one where the set has it, so
    # both code paths still run compiled.
    def _two(configs: list[triton.Config]) -> list[triton.Config]:
        split = [c for c in configs if c.kwargs.get("SPLIT_K", 1) > 1]
        return [configs[0]] + split[:1]

    _GEMV_CONFIGS = _two(_GEMV_CONFIGS)
    _DECODE_MMA_CONFIGS = _two(_DECODE_MMA_CONFIGS)
    _PREFILL_CONFIGS = _two(_PREFILL_CONFIGS)
    _W8A8_CONFIGS = _two(_W8A8_CONFIGS)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 8
    return _sm_count(t.device.index if t.device.index is not None else 0)


def _align_block_k(block_k: int, group_size: int, minimum: int = 16) -> int:
    """A ``BLOCK_K`` that divides ``group_size`` (one scale per tile), when one >= 16 exists."""
    if group_size == 0 or group_size % block_k == 0:
        return block_k
    pow2 = group_size & -group_size  # largest power of two dividing group_size
    return min(block_k, pow2) if pow2 >= minimum else block_k


def _with(cfg: triton.Config, **updates: int) -> triton.Config:
    return triton.Config(
        {**cfg.kwargs, **updates}, num_warps=cfg.num_warps, num_stages=cfg.num_stages
    )


def _dedupe(configs: list[triton.Config]) -> list[triton.Config]:
    seen, out = set(), []
    for c in configs:
        sig = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(c)
    return out


def _prune_decode(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    n, k, gs = args["N"], args["K"], args["GROUP_SIZE"]
    mma = args["BLOCK_M"] > 1
    sms = _num_sms(args["x_ptr"])
    kept = []
    for c in configs:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if mma:
            bk = _align_block_k(bk, gs)
        if split > 1 and (triton.cdiv(n, bn) >= 2 * sms or triton.cdiv(k, split) < 2 * bk):
            continue  # enough programs already, or slices too thin to be worth a reduction
        if not mma and (bn, bk) == _TALL_GEMV_TILE and n < _TALL_GEMV_MIN_N:
            # The tall-shape sweep winners: at N = 4096 the autotuner sometimes picked
            # them on a noisy measurement and the graph-replayed GEMV lost 30% (H200).
            continue
        kept.append(_with(c, BLOCK_K=bk))
    return _dedupe(kept) or [configs[0]]


@functools.cache
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _prefill_smem(c: triton.Config, act_bytes: int, silu: bool) -> int:
    """Shared memory a prefill config's pipeline holds: ``num_stages`` copies of an
    activation tile (two with the SiLU-mul prologue: gate and up) and an int8 weight tile.
    For the float32 SiLU-mul 128x128x64 4-stage config this gives 295 KB where Triton 3.6
    reported 262-287 KB on the H200 (an upper bound there, so a kept config fits)."""
    bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return c.num_stages * (bm * bk * act_bytes * (2 if silu else 1) + bn * bk)


def _fit_smem(kept: list[triton.Config], configs: list[triton.Config], args: dict) -> list:
    """``kept`` without the configs whose pipeline does not fit the device's shared memory
    (float32 activations double the tiles: a config tuned for bf16 can need more than an
    H200 has); when none is left, the config of ``configs`` that needs the least."""
    x = args["x_ptr"]
    if _INTERPRET or x.device.type != "cuda":
        return kept or [configs[0]]
    limit = _smem_limit(x.device.index if x.device.index is not None else 0)
    act, silu = x.element_size(), bool(args.get("SILU_IN", False))
    fits = [c for c in kept if _prefill_smem(c, act, silu) <= limit]
    return fits or [min(configs, key=lambda c: _prefill_smem(c, act, silu))]


def _prune_prefill(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m_bucket, n, k, gs = args["M_BUCKET"], args["N"], args["K"], args["GROUP_SIZE"]
    sms = _num_sms(args["x_ptr"])
    kept = []
    for c in configs:
        bm, bn, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("SPLIT_K", 1)
        # Small M: tiles no taller than the problem; large M: no thin tiles.
        if (m_bucket <= 64 and bm > 64) or (m_bucket >= 512 and bm < 64):
            continue
        bk = _align_block_k(c.kwargs["BLOCK_K"], gs)
        if split > 1:
            # One whole K tile per slice is enough here (the H100 sweep's winners for
            # K = 576 at 32-64 rows split it in four slices of 144).
            tiles = triton.cdiv(m_bucket, bm) * triton.cdiv(n, bn)
            if m_bucket > SPLIT_GEMM_MAX_M or tiles >= 2 * sms or triton.cdiv(k, split) < bk:
                continue
        kept.append(_with(c, BLOCK_K=bk))
    return _fit_smem(_dedupe(kept), configs, args)


def _prune_w8a8(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    # M_BUCKET, not M: the result must be the same for every M the autotuner's key maps
    # here (the launcher sizes the split-K buffer from it).
    m_bucket, n, k = args["M_BUCKET"], args["N"], args["K"]
    sms = _num_sms(args["xq_ptr"])
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        split = c.kwargs["SPLIT_K"]
        if (m_bucket <= 16 and bm > 32) or (m_bucket <= 64 and bm > 64):
            continue
        if m_bucket >= 512 and bm < 64:
            continue
        tiles = triton.cdiv(m_bucket, bm) * triton.cdiv(n, bn)
        if split > 1 and (tiles >= 2 * sms or triton.cdiv(k, split) < 2 * bk):
            continue
        kept.append(c)
    return kept or [configs[0]]


_max_split_cache: dict[tuple, tuple[triton.Config, ...]] = {}


def _split_candidates(tuned, named: dict, kwargs: dict, key: tuple) -> tuple[triton.Config, ...]:
    """The configs with ``SPLIT_K > 1`` the autotuner may pick for this key.

    They size the split-K partials and counters. The prune functions read only what the
    autotuner's key holds (M_BUCKET, not M), so this matches the candidates the
    autotuner benchmarks. Memoized: the prune is Python work that must not run on every
    decode step.
    """
    key = (id(tuned), *key)
    found = _max_split_cache.get(key)
    if found is None:
        # The autotuner skips pruning when it has a single config; mirror that.
        configs = tuned.configs
        if len(configs) > 1:
            configs = tuned.early_config_prune(configs, named, **kwargs)
        found = tuple(c for c in configs if c.kwargs.get("SPLIT_K", 1) > 1)
        _max_split_cache[key] = found
    return found


def _max_split(tuned, named: dict, kwargs: dict, key: tuple) -> int:
    """The largest SPLIT_K the autotuner may pick for this key (sizes the partials buffer)."""
    return max(
        (c.kwargs["SPLIT_K"] for c in _split_candidates(tuned, named, kwargs, key)), default=1
    )


_even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
# The fusion flags are in the key: a fused variant tunes (and caches) its own config.
_DECODE_KEY = ["N", "K", "GROUP_SIZE", "NORM", "SILU_IN", "RESIDUAL"]
_GEMM_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE", "SILU_IN", "RESIDUAL"]

_decode_jit = _even_k(_w8a16_decode_kernel)
_gemv_tuned = autotune(
    _GEMV_CONFIGS, key=_DECODE_KEY, prune_configs_by={"early_config_prune": _prune_decode}
)(_decode_jit)
_decode_mma_tuned = autotune(
    _DECODE_MMA_CONFIGS, key=_DECODE_KEY, prune_configs_by={"early_config_prune": _prune_decode}
)(_decode_jit)
_gemm_jit = _even_k(_w8a16_gemm_kernel)
_gemm_tuned = autotune(
    _PREFILL_CONFIGS, key=_GEMM_KEY, prune_configs_by={"early_config_prune": _prune_prefill}
)(_gemm_jit)
_w8a8_jit = _even_k(_w8a8_gemm_kernel)
_w8a8_tuned = autotune(
    _W8A8_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_w8a8}
)(_w8a8_jit)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 8192)


def _config_kwargs(config: dict) -> dict:
    # A forced config (tests, tuning experiments): meta-parameters plus launch options.
    kw = dict(config)
    kw.setdefault("num_warps", 4)
    kw.setdefault("num_stages", 1 if _INTERPRET else 3)
    return kw


# --------------------------------------------------------------------------- launchers


def w8a16(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    group_size: int = 0,
    config: dict | None = None,
    *,
    dequant_gemm: bool = True,
    workspace_bytes: int = DEQUANT_WORKSPACE_BYTES,
    fast_convert: bool = True,
) -> None:
    """``out = x @ (w * scale)^T + bias`` for 2-D ``x [M, K]``, ``w [N, K]`` int8.

    ``scale`` is fp32 ``[N]`` (``group_size == 0``) or ``[N, cdiv(K, group_size)]``;
    ``bias`` is ``[N]`` (activation dtype or fp32) or ``None``; ``out`` is ``[M, N]`` in
    the activation dtype. ``x``, ``w``, ``out`` and ``scale`` need unit column stride.
    ``M <= DECODE_MAX_M`` takes the decode path, larger M the prefill GEMM. ``config``
    forces a launch configuration (``BLOCK_N``/``BLOCK_K``/``SPLIT_K`` for decode,
    ``BLOCK_M``/``BLOCK_N``/``BLOCK_K``/``GROUP_M``/``SWAP_AB`` for prefill, optional
    ``num_warps``/``num_stages``) instead of the autotuner. Checks live in the op layer.

    Launch choices (the defaults are the fast ones; the others are for benchmarks and
    tests): ``dequant_gemm=False`` keeps large-M fp16/bf16 GPU prefill on the fused Triton
    GEMM instead of dequantize-then-cuBLAS; ``workspace_bytes`` bounds the dequantized
    weight chunk of that path; ``fast_convert=False`` converts int8 weights with I2F
    instructions instead of the integer-add "magic number" trick (FasterTransformer's
    int8 -> fp16 dequantizer; I2F runs at 16/clk/SM on sm_90, below what an H200 needs to
    convert int8 weights at HBM speed). Exact either way.
    """
    if x.shape[0] <= DECODE_MAX_M:
        _w8a16_decode(x, w, scale, bias, out, group_size, config, fast_convert)
    elif config is None and dequant_gemm and _dequant_gemm_applies(x):
        _w8a16_dequant_gemm(x, w, scale, bias, out, group_size, workspace_bytes)
    else:
        _w8a16_prefill(x, w, scale, bias, out, group_size, config, fast_convert)


def w8a16_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    group_size: int = 0,
    config: dict | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_input: bool = False,
    fast_convert: bool = True,
) -> None:
    """W8A16 linear with a fused prologue and epilogue, in one launch::

        a = silu_mul(x[:, :K], x[:, K:]) if silu_input else x
        a = rms_norm(a, norm_weight, eps) if norm_weight is not None else a   (M == 1)
        y = a @ (w * scale)^T + bias                    (fp32 sums, rounded to x.dtype)
        out = residual + y if residual is not None else y

    with the roundings of that composition of ``reference`` functions (each torch op on a
    16-bit tensor computes in fp32 and rounds to the dtype; see the decode kernel). One
    row runs the split-K GEMV of :func:`w8a16`: every program first reads the whole row
    for the RMS statistic (``NORM``), then transforms each activation tile as it uses it.
    Several rows run the decode MMA (up to ``DECODE_MAX_M``) or the Triton GEMM (never
    the dequantize-then-cuBLAS path, whose GEMM has no prologue), with the SiLU-mul
    applied to each activation tile as it is loaded and the residual added in the
    epilogue; a tile holds a K slice of its rows, so the RMSNorm prologue is one row only.

    ``x`` is ``[M, K]`` (``[M, 2K]`` with ``silu_input``, ``[gate | up]``) with unit
    column stride; ``w``, ``scale``, ``bias``, ``group_size``, ``config``, ``fast_convert``
    as in :func:`w8a16` (``config`` of the path the row count takes); ``norm_weight``
    contiguous ``[K]`` of ``x.dtype`` (``M == 1`` only); ``residual`` ``[M, N]`` (or ``[N]``
    for one row) of ``x.dtype``, any strides; ``out`` ``[M, N]`` of ``x.dtype`` (not
    aliasing ``residual``). Checks live in the op layer.
    Raises:
        ValueError: ``norm_weight`` with more than one row.
    """
    m = x.shape[0]
    if norm_weight is not None and m != 1:
        raise ValueError(f"w8a16_fused: the RMSNorm prologue takes one row, got {m} rows")
    fused = _Fused(norm_weight, float(eps), residual, bool(silu_input))
    if m <= DECODE_MAX_M:
        _w8a16_decode(x, w, scale, bias, out, group_size, config, fast_convert, fused)
    else:
        _w8a16_prefill(x, w, scale, bias, out, group_size, config, fast_convert, fused)


def fused_rows_supported(x: torch.Tensor) -> bool:
    """Whether :func:`w8a16_fused` runs ``x``'s rows as one launch: one row, or several
    below the dequantize-then-cuBLAS path's ``DEQUANT_GEMM_MIN_M`` (on CUDA fp16/bf16)."""
    return x.shape[0] == 1 or not _dequant_gemm_applies(x)


def _dequant_gemm_applies(x: torch.Tensor) -> bool:
    return (
        not _INTERPRET
        and x.device.type == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.shape[0] >= DEQUANT_GEMM_MIN_M
    )


@triton.jit
def _dequant_weight_kernel(
    w_ptr,
    s_ptr,
    o_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # o[n, k] = w[n, k] * s[n, k // GROUP_SIZE] (per channel when GROUP_SIZE == 0), rounded
    # once to o's dtype: one streaming pass, 16-byte int8 loads.
    offs_n, offs_k, _, mask = tile_2d(N, K, BLOCK_N, BLOCK_K)
    n_ok = offs_n < N
    w = tl.load(
        w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0
    )
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    else:
        s = tl.load(
            s_ptr + offs_n[:, None] * stride_sn + (offs_k // GROUP_SIZE)[None, :],
            mask=mask,
            other=0.0,
        )
    o = w.to(tl.float32) * s
    tl.store(
        o_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :],
        o.to(o_ptr.dtype.element_ty),
        mask=mask,
    )


def _w8a16_dequant_gemm(x, w, scale, bias, out, group_size, workspace_bytes) -> None:
    """Large-M W8A16: dequantize row chunks of ``w`` into a bounded workspace, then cuBLAS.

    The practice of AWQ / vLLM for large batches: once the GEMM has thousands of rows, a
    one-pass dequantization (read int8, write fp16/bf16) costs a few percent of the GEMM,
    and the vendor GEMM is faster than a fused mixed-type one. Differs from the fused path
    by one rounding of each dequantized weight to the activation dtype (relative 2^-9 for
    bf16, inside the op's tolerance).
    """
    m, k = x.shape
    n = w.shape[0]
    rows = max(64, min(n, workspace_bytes // (2 * max(k, 1))) // 64 * 64)
    rows = min(rows, n)
    work = torch.empty((rows, k), dtype=x.dtype, device=x.device)
    stride_sn = scale.stride(0) if scale.dim() == 2 else 1
    b = bias.to(x.dtype) if bias is not None else None
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        wd = work[: n1 - n0]
        block_n, block_k = 32, 256
        grid = (triton.cdiv(n1 - n0, block_n), triton.cdiv(k, block_k))
        _dequant_weight_kernel[grid](
            w[n0:n1],
            scale[n0:n1],
            wd,
            n1 - n0,
            k,
            w.stride(0),
            stride_sn,
            wd.stride(0),
            GROUP_SIZE=int(group_size),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
        dst = out if (n0 == 0 and n1 == n) else out[:, n0:n1]
        if b is not None:
            torch.addmm(b[n0:n1], x, wd.t(), out=dst)
        else:
            torch.mm(x, wd.t(), out=dst)


def _common_args(x, w, scale, bias, out, group_size, fast_convert):
    m = x.shape[0]
    n, k = w.shape  # x is [M, 2K] with a fused SiLU prologue
    stride_sn = scale.stride(0) if scale.dim() == 2 else 1
    b = bias if bias is not None else scale  # any valid pointer; HAS_BIAS=False skips it
    positional = (x, w, scale, b, out)
    sizes = (m, n, k, x.stride(0), w.stride(0), stride_sn, out.stride(0))
    meta = dict(
        GROUP_SIZE=int(group_size),
        HAS_BIAS=bias is not None,
        IN_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        FAST=fast_convert,
    )
    return positional, sizes, meta


class _Fused(NamedTuple):
    """The prologue/epilogue of a fused launch (see :func:`w8a16_fused`)."""

    norm_weight: torch.Tensor | None
    eps: float
    residual: torch.Tensor | None
    silu_input: bool


def _fused_args(scale: torch.Tensor, fused: _Fused | None) -> tuple[tuple, dict]:
    """The decode kernel's ``(nw_ptr, res_ptr, stride_rm, stride_rn, eps)`` and its fusion
    flags (a 1-D residual is one row)."""
    if fused is None:
        # Unused pointers (any valid one) and scalars: the flags compile the code away.
        flags = dict(NORM=False, SILU_IN=False, RESIDUAL=False)
        return (scale, scale, 0, 0, 0.0), flags
    nw, res = fused.norm_weight, fused.residual
    args = (
        nw if nw is not None else scale,
        res if res is not None else scale,
        res.stride(0) if res is not None and res.dim() == 2 else 0,
        res.stride(-1) if res is not None else 0,
        float(fused.eps),
    )
    flags = dict(NORM=nw is not None, SILU_IN=bool(fused.silu_input), RESIDUAL=res is not None)
    return args, flags


def _w8a16_decode(
    x, w, scale, bias, out, group_size, config, fast_convert, fused: _Fused | None = None
) -> None:
    m = x.shape[0]
    n, k = w.shape
    positional, sizes, meta = _common_args(x, w, scale, bias, out, group_size, fast_convert)
    fused_args, flags = _fused_args(scale, fused)
    sizes = sizes + fused_args
    meta.update(flags)
    meta.update(pdl_meta(x))
    meta["BLOCK_M"] = 1 if m == 1 else 16
    tuned = _gemv_tuned if m == 1 else _decode_mma_tuned
    if config is not None:
        max_split = int(config.get("SPLIT_K", 1))
    else:
        named = dict(zip(tuned.arg_names, positional[:5] + (None, None) + sizes, strict=False))
        key = (n, k, int(group_size), x.device.index)
        max_split = _max_split(tuned, named, meta, key)
    if max_split > 1:
        # fp32 partials [SPLIT_K, M, N]; NaN-filled under the interpreter so that a
        # program that forgets its slice fails the tests.
        part = torch.empty((max_split, m, n), dtype=torch.float32, device=x.device)
        if _INTERPRET:
            part.fill_(float("nan"))
    else:
        part = scale  # never written with SPLIT_K == 1; any fp32 pointer will do
    cnt = _split_counters(x.device, triton.cdiv(n, _MIN_DECODE_BLOCK_N))

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), meta_["SPLIT_K"])

    if config is not None:
        if int(config.get("BLOCK_N", _MIN_DECODE_BLOCK_N)) < _MIN_DECODE_BLOCK_N:
            raise ValueError(f"decode BLOCK_N must be >= {_MIN_DECODE_BLOCK_N}")
        _decode_jit[grid](*positional, part, cnt, *sizes, **meta, **_config_kwargs(config))
    else:
        tuned[grid](*positional, part, cnt, *sizes, **meta)


# Split-K arrival counters, one int32 per column block, zero between launches (the last
# program of each block re-arms its counter). Cached per device so that a decode step
# captured in a CUDA graph reuses one buffer; it only grows outside graph capture.
_MIN_DECODE_BLOCK_N = 8
_counters: dict[tuple[str, int | None], torch.Tensor] = {}


def _split_counters(device: torch.device, blocks: int) -> torch.Tensor:
    key = (device.type, device.index)
    buf = _counters.get(key)
    if buf is None or buf.numel() < blocks:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        buf = torch.zeros(max(blocks, 4096), dtype=torch.int32, device=device)
        if capturing:
            # Zeroed by a memset captured in the graph; not cached, since its memory
            # belongs to the graph's pool and is only initialised when that graph runs.
            return buf
        _counters[key] = buf
    return buf


def _w8a16_prefill(
    x, w, scale, bias, out, group_size, config, fast_convert, fused: _Fused | None = None
) -> None:
    n, k = w.shape
    m = x.shape[0]
    m_bucket = _m_bucket(m)
    positional, sizes, meta = _common_args(x, w, scale, bias, out, group_size, fast_convert)
    (_, res, stride_rm, stride_rn, _), flags = _fused_args(scale, fused)
    if flags.pop("NORM"):
        raise ValueError("the RMSNorm prologue needs one row per launch (M == 1)")
    meta.update(flags)
    meta.update(pdl_meta(x))
    sizes = sizes + (m_bucket, res, stride_rm, stride_rn)

    def tiles(bm: int, bn: int) -> int:
        return triton.cdiv(m_bucket, bm) * triton.cdiv(n, bn)

    if config is not None:
        max_split = int(config.get("SPLIT_K", 1))
        max_tiles = tiles(int(config["BLOCK_M"]), int(config["BLOCK_N"]))
    else:
        named = dict(zip(_gemm_tuned.arg_names, positional + (None, None) + sizes, strict=False))
        # the prune reads the activation dtype and the SiLU flag (shared memory)
        key = (m_bucket, n, k, int(group_size), x.device.index, x.dtype, meta.get("SILU_IN"))
        split_cfgs = _split_candidates(_gemm_tuned, named, meta, key)
        max_split = max((c.kwargs["SPLIT_K"] for c in split_cfgs), default=1)
        max_tiles = max(
            (tiles(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in split_cfgs), default=1
        )
    if max_split > 1:
        # fp32 partials [SPLIT_K, M, N] (NaN under the interpreter, as in the decode path)
        # and one arrival counter per output tile.
        part = torch.empty((max_split, m, n), dtype=torch.float32, device=x.device)
        if _INTERPRET:
            part.fill_(float("nan"))
        cnt = _split_counters(x.device, max_tiles)
    else:
        part = cnt = scale  # never touched with SPLIT_K == 1

    def grid(meta_):
        return (
            triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),
            meta_["SPLIT_K"],
        )

    if config is not None:
        kw = _config_kwargs(config)
        kw.setdefault("SPLIT_K", 1)
        _gemm_jit[grid](*positional, part, cnt, *sizes, **meta, **kw)
    else:
        _gemm_tuned[grid](*positional, part, cnt, *sizes, **meta)


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor
) -> None:
    """Per-row int8 quantization of ``x / smooth`` into ``q`` [M, K] and ``scale`` [M].

    ``xs = x / smooth`` (fp32, IEEE division), ``scale = max|xs| / 127``,
    ``q = clamp(rint(xs * (127 / max|xs|)), -127, 127)``: the rule of
    ``kernels.quantize.quantize_rows``, bit for bit (its kernel runs both, with and without
    ``smooth``). ``x`` needs unit column stride; ``smooth`` is contiguous fp32 ``[K]``.
    """
    quantize_rows_smoothed(x, smooth, q, scale)


def w8a8(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
) -> None:
    """``out = (q_x @ w^T) * a_scale[:, None] * w_scale[None, :] + bias`` (SmoothQuant W8A8).

    ``q_x, a_scale`` come from :func:`quantize_activations` on ``x / smooth``. ``x`` is
    ``[M, K]`` fp16/bf16/fp32 with unit column stride, ``w`` ``[N, K]`` int8 (unit column
    stride), ``w_scale`` fp32 ``[N]``, ``smooth`` fp32 ``[K]`` or ``None``, ``bias`` ``[N]``
    or ``None``, ``out`` ``[M, N]`` in ``x``'s dtype. ``config`` forces a launch config
    (``BLOCK_M``/``BLOCK_N``/``BLOCK_K``/``GROUP_M``, optional ``SPLIT_K``) instead of
    the autotuner.
    """
    m, k = x.shape
    n = w.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    quantize_activations(x, smooth, xq, xs)
    b = bias if bias is not None else w_scale
    sizes = (m, n, k, xq.stride(0), w.stride(0), out.stride(0), _m_bucket(m))
    meta = dict(HAS_BIAS=bias is not None)
    if config is not None:
        max_split = int(config.get("SPLIT_K", 1))
    else:
        named = dict(
            zip(_w8a8_tuned.arg_names, (xq, xs, w, w_scale, b, out, None) + sizes, strict=False)
        )
        key = (_m_bucket(m), n, k, x.device.index)
        max_split = _max_split(_w8a8_tuned, named, meta, key)
    if max_split > 1:
        # int32 partials [SPLIT_K, M, N] (-2**31-filled under the interpreter as poison).
        part = torch.empty((max_split, m, n), dtype=torch.int32, device=x.device)
        if _INTERPRET:
            part.fill_(torch.iinfo(torch.int32).min)
    else:
        part = torch.empty((1,), dtype=torch.int32, device=x.device)

    def grid(meta_):
        tiles = triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"])
        return (tiles, meta_["SPLIT_K"])

    args = (xq, xs, w, w_scale, b, out, part) + sizes
    if config is not None:
        kw = _config_kwargs(config)
        kw.setdefault("SPLIT_K", 1)
        _w8a8_jit[grid](*args, **meta, **kw)
        split = max_split
    else:
        _w8a8_tuned[grid](*args, **meta)
        split = _w8a8_tuned.best_config.kwargs["SPLIT_K"]
    if split > 1:
        block = min(1024, triton.next_power_of_2(n))
        _w8a8_splitk_reduce_kernel[(triton.cdiv(n, block), m)](
            part,
            xs,
            w_scale,
            b,
            out,
            m,
            n,
            out.stride(0),
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            BLOCK_N=block,
            num_warps=4,
        )

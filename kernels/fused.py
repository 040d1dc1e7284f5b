"""Fused RMSNorm (optionally after a residual add), rotary embedding and SiLU * up (Triton).

At batch 1 a CUDA-graph decode step costs about 2 us per kernel, whatever its size:
transformers' eager RMSNorm is ~7 kernels, ``apply_rotary_pos_emb`` ~10 and
``silu(gate) * up`` 2. Each of these kernels does the whole formula in one launch, with the
same roundings as the eager code (every torch op on a 16-bit tensor computes in fp32 and
rounds its result to the dtype; these kernels round at the same points):

* RMSNorm (``LlamaRMSNorm``)::

      r = 1 / sqrt(sum_j(x_j^2) / N + eps)            fp32; sqrt and / correctly rounded
      y = round_out(w * round_x(x * r))                out = promote_types(w, x)

  The sum of squares is an fp32 tree reduction, in a different order than torch's, so the
  mean may differ from torch's in its last bits; everything after it is rounded as torch
  does (torch on CPU computes ``rsqrt`` as ``1 / sqrt``; on CUDA it uses the approximate
  ``rsqrtf``). With a residual, ``x`` is first ``round_x(x + residual)``, which is also
  written out (vLLM's ``fused_add_rms_norm``).
* rotary embedding (``apply_rotary_pos_emb``, half-split ``rotate_half``)::

      out[j]     = round(round(x[j] * cos[j])       + round(-x[j+D/2] * sin[j]))
      out[j+D/2] = round(round(x[j+D/2] * cos[j+D/2]) + round(x[j] * sin[j+D/2]))

  bit-exact with torch on every device (FMA contraction is off).
* SiLU * up: ``round(round(g / (1 + exp(-g))) * up)``. On the GPU ``exp`` is libdevice's
  ``expf``, the function torch's CUDA silu calls, and the division is IEEE (``div_rn``), so
  the result is bit-exact with torch on CUDA. The interpreter has no libdevice; there the
  exponential is evaluated in fp64 and rounded (torch's CPU ``exp`` is within 1 ulp).

Launches are cheap and CUDA-graph capturable: fixed configurations chosen from the shapes
(no autotuning, no host synchronisation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sentinel_kernels import settings
from sentinel_kernels.kernels._pdl import pdl_meta, pdl_release, pdl_wait
from sentinel_kernels.kernels._tiles import load_row_block, tile_2d

# Rows up to this many columns are normalised from registers (one read of x).
_MAX_SINGLE_PASS_COLS = 16384
# Column tile of the looping RMSNorm for longer rows.
_LOOP_BLOCK_C = 4096


# The interpreter has no libdevice; it must be switched on before triton is imported, so
# reading it once here is enough.
_INTERPRETING = settings.triton_interpret()


def _num_warps(elements: int) -> int:
    # About 32 elements per thread: wide loads, no spills; 1 warp for a decode-sized row.
    return int(min(8, max(1, triton.next_power_of_2(max(1, elements // 1024)))))


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_single_pass(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    rows,
    cols,
    cols_f,
    eps,
    stride_xr,
    stride_xc,
    stride_rr,
    stride_rc,
    stride_w,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    # BLOCK_R whole rows per program, held in registers (BLOCK_C >= cols).
    pdl_wait(PDL)
    pdl_release(PDL)
    x, r, c, r64, cmask, mask = load_row_block(
        x_ptr, rows, cols, stride_xr, stride_xc, BLOCK_R, BLOCK_C
    )
    if HAS_RESIDUAL:
        res = tl.load(
            res_ptr + r64[:, None] * stride_rr + c[None, :] * stride_rc, mask=mask, other=0.0
        )
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + r64[:, None] * cols + c[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(xf * xf, axis=1), cols_f)
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))
    h = (xf * inv[:, None]).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + c * stride_w, mask=cmask, other=0.0)
    y = w.to(tl.float32)[None, :] * h.to(tl.float32)
    tl.store(y_ptr + r64[:, None] * cols + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row_tile(
    x_row, res_row, cc, m, stride_xc, stride_rc, dtype: tl.constexpr, HAS_RESIDUAL: tl.constexpr
):
    x = tl.load(x_row + cc * stride_xc, mask=m, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_row + cc * stride_rc, mask=m, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _rms_norm_looped(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    rows,
    cols,
    cols_f,
    eps,
    stride_xr,
    stride_xc,
    stride_rr,
    stride_rc,
    stride_w,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    # Rows too long for registers: one pass for the sum of squares, one to scale. The second
    # pass reloads (and re-adds) the inputs rather than reading res_out back, so no pass
    # depends on the other's stores; the reloads mostly hit L2.
    pdl_wait(PDL)
    pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    x_row = x_ptr + row * stride_xr
    res_row = res_ptr + row * stride_rr
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        cc = start + c
        m = cc < cols
        xf = _load_row_tile(x_row, res_row, cc, m, stride_xc, stride_rc, dtype, HAS_RESIDUAL).to(
            tl.float32
        )
        acc += xf * xf
    mean = tl.math.div_rn(tl.sum(acc, axis=0), cols_f)
    inv = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))
    for start in range(0, cols, BLOCK_C):
        cc = start + c
        m = cc < cols
        x = _load_row_tile(x_row, res_row, cc, m, stride_xc, stride_rc, dtype, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(res_out_ptr + row * cols + cc, x, mask=m)
        h = (x.to(tl.float32) * inv).to(dtype)
        w = tl.load(w_ptr + cc * stride_w, mask=m, other=0.0)
        y = w.to(tl.float32) * h.to(tl.float32)
        tl.store(y_ptr + row * cols + cc, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> None:
    """RMSNorm of the rows of 2-D ``x`` into ``y`` (contiguous, ``rows * cols`` elements).

    With ``residual`` (2-D, ``x``'s shape and dtype, any strides), the rows normalised are
    ``round(x + residual)``, also written to ``residual_out`` (contiguous). ``x`` may have
    any strides; ``weight`` is 1-D of ``cols`` elements. Checked by the op layer.
    """
    rows, cols = x.shape
    if rows == 0:
        return
    has_res = residual is not None
    res = residual if has_res else x
    res_out = residual_out if has_res else y
    args = (
        x,
        res,
        weight,
        y,
        res_out,
        rows,
        cols,
        float(cols),
        float(eps),
        x.stride(0),
        x.stride(1),
        res.stride(0),
        res.stride(1),
        weight.stride(0),
    )
    block_c = triton.next_power_of_2(cols)
    if block_c <= _MAX_SINGLE_PASS_COLS:
        block_r = max(1, min(16, 2048 // block_c))
        block_r = min(block_r, triton.next_power_of_2(rows))
        _rms_norm_single_pass[(triton.cdiv(rows, block_r),)](
            *args,
            HAS_RESIDUAL=has_res,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            **pdl_meta(x),
            num_warps=_num_warps(block_r * block_c),
            enable_fp_fusion=False,
        )
    else:
        _rms_norm_looped[(rows,)](
            *args,
            HAS_RESIDUAL=has_res,
            BLOCK_C=_LOOP_BLOCK_C,
            **pdl_meta(x),
            num_warps=_num_warps(_LOOP_BLOCK_C),
            enable_fp_fusion=False,
        )


# --------------------------------------------------------------------------- rotary


@triton.jit
def _rope_tile(
    src,
    dst,
    cos_row,
    sin_row,
    s,
    smask,
    d,
    dmask,
    stride_s,
    stride_d,
    stride_cs,
    stride_cd,
    stride_ss,
    stride_sd,
    S,
    HALF: tl.constexpr,
):
    # One [BLOCK_S, HALF] tile of each half of the rows of one head.
    mask = smask[:, None] & dmask[None, :]
    s64 = s.to(tl.int64)
    lo = src + s64[:, None] * stride_s + d[None, :] * stride_d
    x1 = tl.load(lo, mask=mask, other=0.0)
    x2 = tl.load(lo + HALF * stride_d, mask=mask, other=0.0)
    dtype = x1.dtype
    c_lo = cos_row + s64[:, None] * stride_cs + d[None, :] * stride_cd
    s_lo = sin_row + s64[:, None] * stride_ss + d[None, :] * stride_sd
    c1 = tl.load(c_lo, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_lo + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_lo, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_lo + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    # torch: (x * cos) + (cat(-x2, x1) * sin), each op rounded to the dtype.
    a1 = (x1 * c1).to(dtype).to(tl.float32)
    b1 = (-x2 * s1).to(dtype).to(tl.float32)
    a2 = (x2 * c2).to(dtype).to(tl.float32)
    b2 = (x1 * s2).to(dtype).to(tl.float32)
    out = dst + s64[:, None] * (2 * HALF) + d[None, :]
    tl.store(out, (a1 + b1).to(dtype), mask=mask)
    tl.store(out + HALF, (a2 + b2).to(dtype), mask=mask)


@triton.jit
def _rotary_embedding(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    S,
    Hq,
    Hkv,
    sq_b,
    sq_h,
    sq_s,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sc_b,
    sc_s,
    sc_d,
    ss_b,
    ss_s,
    ss_d,
    HALF: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid: (S tiles, Hq + Hkv heads, B). Heads [0, Hq) are q's, [Hq, Hq + Hkv) k's: one
    # launch rotates both.
    pdl_wait(PDL)
    pdl_release(PDL)
    pid_s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cos_row = cos_ptr + b * sc_b
    sin_row = sin_ptr + b * ss_b
    if h < Hq:
        h64 = h.to(tl.int64)
        src = q_ptr + b * sq_b + h64 * sq_h
        dst = qo_ptr + ((b * Hq + h64) * S) * (2 * HALF)
        _rope_tile(
            src,
            dst,
            cos_row,
            sin_row,
            s,
            smask,
            d,
            dmask,
            sq_s,
            sq_d,
            sc_s,
            sc_d,
            ss_s,
            ss_d,
            S,
            HALF,
        )
    else:
        h64 = (h - Hq).to(tl.int64)
        src = k_ptr + b * sk_b + h64 * sk_h
        dst = ko_ptr + ((b * Hkv + h64) * S) * (2 * HALF)
        _rope_tile(
            src,
            dst,
            cos_row,
            sin_row,
            s,
            smask,
            d,
            dmask,
            sk_s,
            sk_d,
            sc_s,
            sc_d,
            ss_s,
            ss_d,
            S,
            HALF,
        )


def rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
) -> None:
    """Rotate ``q`` ``[B, Hq, S, D]`` and ``k`` ``[B, Hkv, S, D]`` (any strides) into the
    contiguous ``q_out`` / ``k_out``, in one launch.

    ``cos`` / ``sin`` are 3-D ``[B', S, D]`` with ``B' in (1, B)``; a batch of one is
    broadcast (stride 0). Checked by the op layer.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    if B == 0 or S == 0 or Hq + Hkv == 0:
        return
    half = D // 2
    block_d = triton.next_power_of_2(half)
    block_s = max(1, min(triton.next_power_of_2(S), 1024 // block_d, 32))
    c_b = cos.stride(0) if cos.shape[0] > 1 else 0
    s_b = sin.stride(0) if sin.shape[0] > 1 else 0
    grid = (triton.cdiv(S, block_s), Hq + Hkv, B)
    _rotary_embedding[grid](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        S,
        Hq,
        Hkv,
        *q.stride(),
        *k.stride(),
        c_b,
        cos.stride(1),
        cos.stride(2),
        s_b,
        sin.stride(1),
        sin.stride(2),
        HALF=half,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        **pdl_meta(q),
        num_warps=_num_warps(2 * block_s * block_d),
        enable_fp_fusion=False,
    )


# --------------------------------------------------------------------------- SiLU * up


@triton.jit
def _silu_mul(
    g_ptr,
    u_ptr,
    y_ptr,
    rows,
    cols,
    stride_gr,
    stride_gc,
    stride_ur,
    stride_uc,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EXP_F64: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_release(PDL)
    r, c, r64, mask = tile_2d(rows, cols, BLOCK_R, BLOCK_C)
    g = tl.load(g_ptr + r64[:, None] * stride_gr + c[None, :] * stride_gc, mask=mask, other=0.0)
    u = tl.load(u_ptr + r64[:, None] * stride_ur + c[None, :] * stride_uc, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    if EXP_F64:
        e = tl.exp(-gf.to(tl.float64)).to(tl.float32)
    else:
        e = libdevice.exp(-gf)
    silu = tl.math.div_rn(gf, 1.0 + e).to(dtype)
    y = silu.to(tl.float32) * u.to(tl.float32)
    tl.store(y_ptr + r64[:, None] * cols + c[None, :], y.to(dtype), mask=mask)


def silu_mul_rows(gate: torch.Tensor, up: torch.Tensor, y: torch.Tensor) -> None:
    """``y = silu(gate) * up`` for 2-D ``gate`` / ``up`` (any strides); ``y`` contiguous."""
    rows, cols = gate.shape
    if rows == 0 or cols == 0:
        return
    if rows * cols <= 65536:
        # Decode sizes: latency-bound (an exp and an IEEE division per element), so spread
        # the row over many small programs rather than loop in one (H200, SmolLM2's 1536
        # columns: one 2-warp program took ~3 us).
        block_c = min(256, triton.next_power_of_2(cols))
        block_r = 1
        warps = 2
    else:
        block_c = min(2048, triton.next_power_of_2(cols))
        block_r = max(1, min(16, 2048 // block_c))
        block_r = min(block_r, triton.next_power_of_2(rows))
        warps = _num_warps(block_r * block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _silu_mul[grid](
        gate,
        up,
        y,
        rows,
        cols,
        *gate.stride(),
        *up.stride(),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        EXP_F64=_INTERPRETING,
        **pdl_meta(gate),
        num_warps=warps,
    )

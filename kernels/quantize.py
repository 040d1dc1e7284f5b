"""Row-wise symmetric INT8 quantization and dequantization (Triton).

Quantization, per row ``r`` of a 2-D view ``x[rows, cols]``::

    absmax[r] = max_j |x[r, j]|                      (in fp32)
    scale[r]  = absmax[r] / 127
    q[r, j]   = clamp(rint(x[r, j] * (127 / absmax[r])), -127, 127)   (half to even)

with ``scale = 0`` and ``q = 0`` for an all-zero row. Every step is one correctly rounded
fp32 operation (IEEE division, one multiply, no FMA contraction), so this kernel, the C++
kernel and the PyTorch reference agree bit for bit. Round-half-to-even uses the classic
``(y + 1.5 * 2**23) - 1.5 * 2**23`` trick, exact for ``|y| < 2**22``; it needs FMA
contraction off (``enable_fp_fusion=False``), which is free for a memory-bound kernel.

The technique is the per-token / per-channel absmax quantizer of LLM.int8()
(Dettmers et al., 2022) and SmoothQuant (Xiao et al., 2023).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sentinel_kernels.kernels._tiles import load_row_block, tile_2d

_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding it rounds an fp32 |y| < 2**22 to an integer

# Rows up to this many columns are held in registers and read from memory once.
_MAX_SINGLE_PASS_COLS = 16384


@triton.jit
def _quantize_tile(x, inv):
    y = x * inv
    y = (y + 12582912.0) - 12582912.0
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8)


@triton.jit
def _scale_and_inverse(absmax):
    # The row's scale absmax / 127 and the factor 127 / absmax (0 for an all-zero row).
    scale = tl.math.div_rn(absmax, 127.0)
    safe = tl.where(absmax > 0.0, absmax, 1.0)
    inv = tl.where(absmax > 0.0, tl.math.div_rn(127.0, safe), 0.0)
    return scale, inv


@triton.jit
def _load_chunk(x_row, sm_ptr, cc, cols, stride_xc, SMOOTH: tl.constexpr):
    """Columns ``cc`` of one row as fp32 (0 past ``cols``), divided by the smoothing
    factors at ``sm_ptr`` when ``SMOOTH``."""
    x = tl.load(x_row + cc * stride_xc, mask=cc < cols, other=0.0).to(tl.float32)
    if SMOOTH:
        sm = tl.load(sm_ptr + cc, mask=cc < cols, other=1.0)
        x = tl.math.div_rn(x, sm)
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    sm_ptr,
    q_ptr,
    s_ptr,
    rows,
    cols,
    stride_xr,
    stride_xc,
    stride_qr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TWO_PASS: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    # With SMOOTH the rows are first divided by the column factors at sm_ptr (IEEE
    # division, so every backend gets the same bits); otherwise sm_ptr is never read.
    if TWO_PASS:
        # Grid (rows,), BLOCK_R unused. Rows too long for registers: one pass for
        # absmax, one to quantize (the second read mostly hits L2, since a program
        # walks one row).
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        x_row = x_ptr + row * stride_xr
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, cols, BLOCK_C):
            cc = start + c
            x = _load_chunk(x_row, sm_ptr, cc, cols, stride_xc, SMOOTH)
            acc = tl.maximum(acc, tl.abs(x))
        absmax = tl.max(acc, axis=0)
        scale, inv = _scale_and_inverse(absmax)
        for start in range(0, cols, BLOCK_C):
            cc = start + c
            x = _load_chunk(x_row, sm_ptr, cc, cols, stride_xc, SMOOTH)
            tl.store(q_ptr + row * stride_qr + cc, _quantize_tile(x, inv), mask=cc < cols)
        tl.store(s_ptr + row, scale)
    else:
        # Grid (cdiv(rows, BLOCK_R),). A whole row (BLOCK_C >= cols) lives in
        # registers: one read of x, one write of q.
        x, r, c, r64, cmask, mask = load_row_block(
            x_ptr, rows, cols, stride_xr, stride_xc, BLOCK_R, BLOCK_C
        )
        if SMOOTH:
            sm = tl.load(sm_ptr + c, mask=cmask, other=1.0)
            x = tl.math.div_rn(x.to(tl.float32), sm[None, :])
        else:
            x = x.to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        scale, inv = _scale_and_inverse(absmax)
        q = _quantize_tile(x, inv[:, None])
        tl.store(q_ptr + r64[:, None] * stride_qr + c[None, :], q, mask=mask)
        tl.store(s_ptr + r64, scale, mask=r < rows)


@triton.jit
def _dequantize_rows(
    q_ptr,
    s_ptr,
    out_ptr,
    rows,
    cols,
    stride_qr,
    stride_qc,
    stride_or,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r, c, r64, mask = tile_2d(rows, cols, BLOCK_R, BLOCK_C)
    q = tl.load(q_ptr + r64[:, None] * stride_qr + c[None, :] * stride_qc, mask=mask, other=0)
    s = tl.load(s_ptr + r64, mask=r < rows, other=0.0)
    out = q.to(tl.float32) * s[:, None]
    tl.store(
        out_ptr + r64[:, None] * stride_or + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )


def _num_warps(elements: int) -> int:
    # About 32 elements per thread keeps loads wide without spilling registers.
    return int(min(16, max(1, triton.next_power_of_2(max(1, elements // 1024)))))


def quantize_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize the rows of 2-D ``x`` into ``q`` (int8) and ``scale`` (fp32).

    ``x`` may have any strides. ``q`` and ``scale`` are contiguous tensors of any shape
    holding ``rows * cols`` and ``rows`` elements (the op allocates them in their final
    shape, which saves view calls on the host). Checked by the op layer.
    """
    quantize_rows_smoothed(x, None, q, scale)


def quantize_rows_smoothed(
    x: torch.Tensor, smooth: torch.Tensor | None, q: torch.Tensor, scale: torch.Tensor
) -> None:
    """``quantize_rows`` of ``x / smooth`` (fp32, IEEE division), or of ``x`` when
    ``smooth`` is ``None``; ``smooth`` is contiguous fp32 ``[cols]`` (SmoothQuant's
    per-channel factors, Xiao et al. 2023). Rows up to ``_MAX_SINGLE_PASS_COLS`` columns
    are held in registers; longer rows take two passes. Checked by the op layer."""
    rows, cols = x.shape
    if rows == 0:
        return
    has_smooth = smooth is not None
    sm = smooth if smooth is not None else x  # never read without SMOOTH
    block_c = triton.next_power_of_2(cols)
    if block_c <= _MAX_SINGLE_PASS_COLS:
        block_r = max(1, min(64, 4096 // block_c))
        block_r = min(block_r, triton.next_power_of_2(rows))
        grid = (triton.cdiv(rows, block_r),)
        two_pass = False
        num_warps = _num_warps(block_r * block_c)
    else:
        block_r, block_c = 1, 4096
        grid = (rows,)
        two_pass = True
        num_warps = 8
    _quantize_rows_kernel[grid](
        x,
        sm,
        q,
        scale,
        rows,
        cols,
        *x.stride(),
        cols,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        TWO_PASS=two_pass,
        SMOOTH=has_smooth,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out[r, c] = q[r, c] * scale[r]`` for 2-D ``q``; ``out`` is contiguous, any shape."""
    rows, cols = q.shape
    if rows == 0:
        return
    block_c = min(1024, triton.next_power_of_2(cols))
    block_r = max(1, min(64, 4096 // block_c))
    block_r = min(block_r, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _dequantize_rows[grid](
        q,
        scale,
        out,
        rows,
        cols,
        *q.stride(),
        cols,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_num_warps(block_r * block_c),
    )

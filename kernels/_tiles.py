"""Index helpers shared by the row-wise Triton kernels (``@triton.jit``: inlined at compile
time, so a kernel that calls one compiles as if the lines stood in it), and host-side
launch helpers shared by the kernel modules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tile_2d(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``[BLOCK_R, BLOCK_C]`` tile of program ``(program_id(0), program_id(1))``:
    its row indices ``r`` (and ``r64``, as int64), column indices ``c`` and in-bounds mask."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r64 = r.to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    return r, c, r64, mask


@triton.jit
def load_row_block(
    x_ptr, rows, cols, stride_xr, stride_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Program ``program_id(0)``'s ``BLOCK_R`` whole rows of ``x`` (``BLOCK_C >= cols``),
    loaded with 0 for padding: ``(x, r, c, r64, cmask, mask)``, where ``cmask`` is the
    column mask and ``mask`` the tile's in-bounds mask."""
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r64 = r.to(tl.int64)
    cmask = c < cols
    mask = (r[:, None] < rows) & cmask[None, :]
    x = tl.load(x_ptr + r64[:, None] * stride_xr + c[None, :] * stride_xc, mask=mask, other=0.0)
    return x, r, c, r64, cmask, mask


def strides3(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The strides of dims 0, 1 and 2 of each tensor, in order, flattened: the stride
    arguments of a ``[B, H, S, ...]`` kernel launch (``stride(i)`` accepts any rank >= 3)."""
    return tuple(t.stride(i) for t in tensors for i in range(3))

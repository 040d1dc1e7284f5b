"""Do the INT8 linear and k-NN kernels compile for the H200 (sm_90)? Checked without a GPU.

Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``) down to a cubin with the
``ptxas`` its wheel ships, so a kernel variant that a GPU session would first meet at run
time (a new constexpr branch: split-K, the SiLU-mul prologue, the residual epilogue) can be
compiled here. It says nothing about speed or results (the interpreter tests check the
results); the GPU's Triton may be older than this machine's.

    python scripts/compile_sm90.py      # prints the variants compiled and their shared memory
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sentinel_kernels.kernels import int8_matmul as kim
from sentinel_kernels.kernels import knn

TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn: Any, pointers: dict[str, str], consts: dict[str, Any], **options: int) -> Any:
    # Every non-constexpr argument not named in `pointers` is a 32-bit int (sizes, strides).
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET, options=options)


def gemm(
    dtype: str, swap: bool, split: int, silu: bool, residual: bool, group: int, pdl: bool = False
) -> Any:
    ptrs = {n: f"*{dtype}" for n in ("x_ptr", "b_ptr", "out_ptr", "res_ptr")}
    ptrs.update(w_ptr="*i8", s_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32")
    consts = dict(
        GROUP_SIZE=group, HAS_BIAS=True, IN_PREC="tf32", FAST=True, SILU_IN=silu,
        RESIDUAL=residual, EVEN_K=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8,
        SWAP_AB=swap, SPLIT_K=split, PDL=pdl,
    )  # fmt: skip
    return _compile(kim._w8a16_gemm_kernel, ptrs, consts, num_warps=4, num_stages=4, launch_pdl=pdl)


def decode(
    dtype: str, block_m: int, split: int, silu: bool, residual: bool, norm: bool, pdl: bool
) -> Any:
    ptrs = {n: f"*{dtype}" for n in ("x_ptr", "b_ptr", "out_ptr", "res_ptr", "nw_ptr")}
    ptrs.update(w_ptr="*i8", s_ptr="*fp32", part_ptr="*fp32", cnt_ptr="*i32", eps="fp32")
    consts = dict(
        GROUP_SIZE=0, HAS_BIAS=False, IN_PREC="tf32", FAST=True, EVEN_K=True, NORM=norm,
        SILU_IN=silu, RESIDUAL=residual, BLOCK_M=block_m, BLOCK_N=64 if block_m > 1 else 16,
        BLOCK_K=128 if block_m > 1 else 512, SPLIT_K=split, PDL=pdl,
    )  # fmt: skip
    return _compile(
        kim._w8a16_decode_kernel, ptrs, consts, num_warps=4, num_stages=3, launch_pdl=pdl
    )


def knn_topk(k: int, pdl: bool) -> Any:
    ptrs = dict(q_ptr="*fp32", k_ptr="*fp16", kn_ptr="*fp32", cd_ptr="*fp32", ci_ptr="*i64")
    consts = dict(
        K=k, IN_PREC="tf32", BLOCK_B=knn.BLOCK_B, BLOCK_N=knn.BLOCK_N, BLOCK_D=knn.BLOCK_D,
        PDL=pdl,
    )  # fmt: skip
    return _compile(knn._knn_chunk_topk_kernel, ptrs, consts, num_warps=8, launch_pdl=pdl)


def main() -> None:
    t0 = time.perf_counter()
    done = []
    flags = [False, True]
    for dtype, swap, split, silu, res in itertools.product(
        ["bf16", "fp16"], flags, [1, 4], flags, flags
    ):
        k = gemm(dtype, swap, split, silu, res, 0, pdl=silu)
        done.append((f"gemm {dtype} swap={swap} split={split} silu={silu} res={res}", k))
    done.append(("gemm bf16 group=128 split=2 silu res", gemm("bf16", True, 2, True, True, 128)))
    for block_m, split, silu, res, pdl in itertools.product([1, 16], [1, 4], flags, flags, flags):
        norm = block_m == 1 and not silu
        k = decode("bf16", block_m, split, silu, res, norm, pdl)
        name = f"decode M={block_m} split={split} silu={silu} res={res} norm={norm} pdl={pdl}"
        done.append((name, k))
    for kk, pdl in ((1, False), (32, False), (knn.MAX_K, True)):
        done.append((f"knn_topk K={kk} pdl={pdl}", knn_topk(kk, pdl)))
    for name, k in done:
        assert "cubin" in k.asm, name
        print(f"{name:60s} shared {k.metadata.shared:6d} B")
    print(f"{len(done)} variants compiled for sm_90 in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

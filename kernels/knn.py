"""Exact k-NN ranking on the GPU (Triton): distances and a first top-k in one pass.

For one query row ``q`` (rounded to the keys' dtype) and keys ``k_i`` (``[N, D]``, the
datastore's float16 keys) the ranking score is ``s_i = |k_i|^2 - 2 q.k_i`` (the squared L2
distance without ``|q|^2``, which is the same for the whole row). The search streams the
keys once; what ``torch.mm`` + ``torch.topk`` add on top of that stream is writing the
``[B, N]`` scores and a radix select over a million floats, which on an H200 took longer
than the matmul itself at 128-dimensional keys (0.114 vs 0.066 ms,
``docs/MEASUREMENTS.md``). Here each program scores a chunk of ``BLOCK_N`` keys against
up to ``BLOCK_B`` queries in registers (a tensor-core dot: exact products of the rounded
query and the keys, fp32 sums; IEEE fp32 for float32 keys) and keeps each query's ``K``
smallest by ``K`` rounds of argmin (ties to the lower index), writing ``K`` candidates
per chunk; the final ``k`` come from one ``topk`` over the ``cdiv(N, BLOCK_N) * K``
candidates of each query (31k at a million keys and ``K = 32``). More than ``BLOCK_B``
queries read the keys once per block of queries: a long batch of queries (perplexity
windows) is better served by one matmul over all of them.
This is the two-stage selection of FAISS's GPU ``k``-selection (Johnson, Douze, Jégou,
2017: per-block selection, then a merge), with a simple per-chunk select because ``K``
is small. Nothing is read back to the host: the search can live in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._pdl import pdl_meta, pdl_release, pdl_wait

#: Largest k the chunk select takes (its cost grows with k; larger k use matmul + topk).
MAX_K = 64
#: Keys per program (the candidates are cdiv(N, BLOCK_N) * K per query).
BLOCK_N = 1024
BLOCK_D = 64
#: (BLOCK_N, BLOCK_D, num_stages) tried in order: the compiler decides the shared
#: memory a config needs (float32 keys, small K and odd shapes needed over the H200's
#: 227 KiB at the first), so a launch it refuses is retried with the next tiles, and the
#: one that fits is remembered per (dtypes, k, D, device).
TILES = ((BLOCK_N, BLOCK_D, 3), (BLOCK_N, 32, 2), (512, 32, 1), (256, 16, 1))
_tile_memo: dict[tuple, int] = {}
#: Queries per program: each key tile is read once for this many queries (tensor-core
#: dot, padded to 16 rows); more queries take more programs, each reading the keys again.
BLOCK_B = 16


@triton.jit
def _knn_chunk_topk_kernel(
    q_ptr,
    k_ptr,
    kn_ptr,
    cd_ptr,
    ci_ptr,
    B,
    N,
    D,
    stride_qb,
    stride_kn,
    n_chunks,
    K: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (chunks, cdiv(B, BLOCK_B)). Program (c, qb): keys c*BLOCK_N.. against queries
    # qb*BLOCK_B..; writes each query's K smallest scores and their key indices to the
    # candidates [B, chunks, K].
    c = tl.program_id(0)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * stride_kn
    q_rows = q_ptr + offs_b.to(tl.int64)[:, None] * stride_qb
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kt = tl.load(
            k_rows + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        # the query rounded to the keys' dtype: exact products, float32 sums
        q = tl.load(q_rows + offs_d[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(q.to(kt.dtype), tl.trans(kt), acc, input_precision=IN_PREC)
    pdl_release(PDL)
    norms = tl.load(kn_ptr + offs_n, mask=n_ok, other=0.0)
    s = tl.where(n_ok[None, :], norms[None, :] - 2.0 * acc, float("inf"))
    lanes = tl.arange(0, BLOCK_N)[None, :]
    out = (offs_b.to(tl.int64) * n_chunks + c) * K
    for j in tl.static_range(K):
        best = tl.min(s, axis=1)
        # the lowest lane holding each row's minimum (deterministic among ties)
        lane = tl.min(tl.where(s == best[:, None], lanes, BLOCK_N), axis=1)
        tl.store(cd_ptr + out + j, best, mask=b_ok)
        # clamped: a NaN score (NaN query) matches no lane; the index must still be a key
        idx = tl.minimum(c.to(tl.int64) * BLOCK_N + lane, N - 1)
        tl.store(ci_ptr + out + j, idx, mask=b_ok)
        s = tl.where(lanes == lane[:, None], float("inf"), s)


def knn_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    k: int,
    scores: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    """``(scores, indices)`` of the ``k`` smallest ``|k_i|^2 - 2 q.k_i`` per query row.

    ``queries`` ``[B, D]`` and ``keys`` ``[N, D]`` with unit column stride, ``key_sqnorms``
    contiguous float32 ``[N]``, ``1 <= k <= min(N, MAX_K)``; ``scores`` float32 and
    ``indices`` int64, both contiguous ``[B, k]``. Checks live in the op layer.
    """
    b, d = queries.shape
    n = keys.shape[0]
    memo = (keys.dtype, queries.dtype, k, d, keys.device.index)
    start = _tile_memo.get(memo, 0)
    for i in range(start, len(TILES)):
        block_n, block_d, stages = TILES[i]
        n_chunks = triton.cdiv(n, block_n)
        cand_d = torch.empty((b, n_chunks * k), dtype=torch.float32, device=keys.device)
        cand_i = torch.empty((b, n_chunks * k), dtype=torch.int64, device=keys.device)
        try:
            _knn_chunk_topk_kernel[(n_chunks, triton.cdiv(b, BLOCK_B))](
                queries,
                keys,
                key_sqnorms,
                cand_d,
                cand_i,
                b,
                n,
                d,
                queries.stride(0),
                keys.stride(0),
                n_chunks,
                K=k,
                IN_PREC="ieee" if keys.dtype == torch.float32 else "tf32",
                BLOCK_B=BLOCK_B,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                **pdl_meta(keys),
                num_warps=8,
                num_stages=stages,
            )
        except OutOfResources:
            # refused before anything was launched: the next, smaller tiles
            if i == len(TILES) - 1:
                raise
            continue
        _tile_memo[memo] = i
        break
    # A chunk with fewer than k keys pads its list with +inf scores; N >= k finite
    # candidates exist, so the merge never picks a pad.
    best, pick = torch.topk(cand_d, k, dim=-1, largest=False)
    scores.copy_(best)
    torch.gather(cand_i, 1, pick, out=indices)


#: Keys per program of the IVF list scan, and the D tile.
IVF_BLOCK_N = 128
IVF_BLOCK_D = 64


@triton.jit
def _ivf_scores_kernel(
    q_ptr,
    k_ptr,
    kn_ptr,
    st_ptr,
    ln_ptr,
    pr_ptr,
    out_ptr,
    N,
    D,
    P,
    NPROBE,
    CAP,
    stride_qb,
    stride_kn,
    stride_pb,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (B * NPROBE, cdiv(CAP, BLOCK_N)). Program (b * NPROBE + j, c): rows c*BLOCK_N..
    # of query b's j-th probed list; scores to out[b, j * CAP + ...], +inf past the list.
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // NPROBE
    j = row % NPROBE
    # clamped so that bad list tables (the op cannot read them without a host sync) can
    # give wrong scores but never an out-of-bounds access
    lst = tl.minimum(tl.maximum(tl.load(pr_ptr + b.to(tl.int64) * stride_pb + j), 0), P - 1)
    start = tl.load(st_ptr + lst)
    length = tl.minimum(tl.load(ln_ptr + lst), CAP)
    offs = c * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs < length) & (start + offs < N) & (start + offs >= 0)
    k_rows = k_ptr + (start + offs).to(tl.int64)[:, None] * stride_kn
    q_row = q_ptr + b.to(tl.int64) * stride_qb
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kt = tl.load(k_rows + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        # the query rounded to the keys' dtype (as the exact search does), fp32 products
        q = tl.load(q_row + offs_d, mask=d_ok, other=0.0).to(kt.dtype).to(tl.float32)
        acc += tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
    norms = tl.load(kn_ptr + start + offs, mask=ok, other=0.0)
    s = tl.where(ok, norms - 2.0 * acc, float("inf"))
    tl.store(out_ptr + row.to(tl.int64) * CAP + offs, s, mask=offs < CAP)


def ivf_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    probes: torch.Tensor,
    cap: int,
    out: torch.Tensor,
) -> None:
    """``out[b, j * cap + r] = |k_i|^2 - 2 q_b.k_i`` for ``i = starts[p] + r``, ``p =
    probes[b, j]``, ``r < lengths[p]`` (``+inf`` for ``lengths[p] <= r < cap``).

    ``queries`` ``[B, D]`` and ``keys`` ``[N, D]`` with unit column stride; ``key_sqnorms``
    contiguous float32 ``[N]``; ``starts``/``lengths`` contiguous int64 ``[P]`` with
    ``lengths <= cap``; ``probes`` int64 ``[B, nprobe]`` (unit column stride) of list
    numbers in ``[0, P)``; ``out`` contiguous float32 ``[B, nprobe * cap]``. Checks live
    in the op layer. One GEMV-shaped pass over the probed lists' key bytes (a single
    query per program: no tensor-core tile to fill).
    """
    b, d = queries.shape
    nprobe = probes.shape[1]
    if b == 0 or nprobe == 0:
        return
    grid = (b * nprobe, triton.cdiv(cap, IVF_BLOCK_N))
    _ivf_scores_kernel[grid](
        queries,
        keys,
        key_sqnorms,
        starts,
        lengths,
        probes,
        out,
        keys.shape[0],
        d,
        starts.shape[0],
        nprobe,
        cap,
        queries.stride(0),
        keys.stride(0),
        probes.stride(0),
        BLOCK_N=IVF_BLOCK_N,
        BLOCK_D=IVF_BLOCK_D,
        num_warps=4,
    )

"""Exact k-nearest-neighbour search in PyTorch, on whatever device the keys live.

This is the search a GPU run uses when the installed FAISS has no GPU support: the keys
stay on the device in float16, and a decode step never round-trips through the host.
For each chunk of ``chunk`` keys it computes squared L2 distances with one matmul
(``|q|^2 - 2 q.k + |k|^2``, with a float32 result: hidden states have norms in the
hundreds, so a float16 result would overflow or lose the small differences that rank
neighbours), keeps the chunk's ``k`` best with ``topk`` and merges them into the running
best.

On CUDA with float16/bfloat16 keys the matmul reads the keys as they are stored and
accumulates and writes float32 (``torch.mm(..., out_dtype=torch.float32)``, the query
rounded to the keys' dtype, which is no coarser than the keys themselves); the search is
then one pass over the key bytes and the whole datastore is one chunk. Elsewhere (CPU, or
a torch without that overload) each chunk is converted to float32 first, which reads and
writes the keys three more times: fine on a CPU, a 5x slowdown of a bandwidth-bound search
on a GPU. Every
shape is fixed by ``(B, N, k, chunk)`` and nothing reads a value back to the host, so the
whole search can be captured in a CUDA graph (the decode step of ``sk.generate``).
"""

from __future__ import annotations

import functools

import torch
from torch.profiler import record_function

from .. import ops

__all__ = [
    "DEFAULT_CHUNK",
    "KNN_SEARCH_RANGE",
    "exact_search",
    "mixed_matmul_supported",
    "squared_norms",
]

#: Keys per matmul on the float32 path: 65536 x 576 float32 is 150 MB of temporaries.
DEFAULT_CHUNK = 65536
#: Distances per chunk on the mixed-precision path (``B * chunk`` float32: 256 MB).
MIXED_CHUNK_ELEMENTS = 1 << 26
#: Profiler range around every k-NN search (its own category in ``sentinel-kernels profile``).
KNN_SEARCH_RANGE = "sentinel::knn_search"


@functools.lru_cache(maxsize=8)
def _mixed_matmul_on(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(1, 8, device=device, dtype=dtype)
        out = torch.mm(a, a.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return out.dtype == torch.float32


def mixed_matmul_supported(keys: torch.Tensor) -> bool:
    """Whether :func:`exact_search` takes the mixed-precision path for ``keys``: CUDA,
    float16/bfloat16, and a torch whose ``mm`` has the ``out_dtype`` overload (probed once
    per device and dtype; call it outside CUDA-graph capture, e.g. when a datastore is
    placed, so that the probe is not captured)."""
    if keys.device.type != "cuda" or keys.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _mixed_matmul_on(keys.device, keys.dtype)


def squared_norms(keys: torch.Tensor) -> torch.Tensor:
    """``|k_i|^2`` of each key row, float32 ``[N]`` (computed once per datastore)."""
    return keys.float().pow(2).sum(-1)


#: Groups of :func:`_grouped_topk`: on an H200, one query over 1e6 keys, k = 32, a
#: top-k within 64 groups and then over their 64 * k survivors took 0.17 ms where one
#: ``topk`` over all took 0.20 (D = 128; 0.38 vs 0.40 at D = 576); 256 and 1024 groups,
#: and any grouping at 8 queries, were slower (scripts/knn_search_probe.py).
TOPK_GROUPS = 64


def _grouped_topk(
    d: torch.Tensor, k: int, groups: int = TOPK_GROUPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(d, k, largest=False)`` of a ``[B, N]`` float tensor in two stages:
    the ``k`` smallest within each of ``groups`` equal groups, then the ``k`` smallest of
    those (one plain ``topk`` when a group would hold fewer than ``k``). Same values;
    among equal values the indices may differ."""
    b, n = d.shape
    per = n // max(1, groups)
    if groups <= 1 or per < k:
        return torch.topk(d, k, dim=-1, largest=False)
    cut = per * groups
    v, i = torch.topk(d[:, :cut].view(b, groups, per), k, dim=-1, largest=False)
    i = i + torch.arange(0, cut, per, device=d.device)[None, :, None]
    v, i = v.reshape(b, -1), i.reshape(b, -1)
    if cut < n:
        v2, i2 = torch.topk(d[:, cut:], min(k, n - cut), dim=-1, largest=False)
        v, i = torch.cat([v, v2], -1), torch.cat([i, i2 + cut], -1)
    v, pick = torch.topk(v, k, dim=-1, largest=False)
    return v, i.gather(-1, pick)


def exact_search(
    keys: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    key_sqnorms: torch.Tensor | None = None,
    chunk: int | None = None,
    mixed: bool | None = None,
    one_pass: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys nearest to each query in squared L2 distance (FAISS's
    ``IndexFlatL2`` convention), ascending.

    ``d(q, k_i) = |q|^2 - 2 q.k_i + |k_i|^2``, with a float32 result chunk by chunk; the
    chunk's ``topk`` (smallest) is merged with the running best (``cat`` + ``topk``);
    ``|q|^2`` is added to the winners only. A single query on the mixed-precision path
    takes the two-stage top-k of :func:`_grouped_topk`. With ``one_pass=True`` the whole
    search is :func:`sentinel_kernels.ops.knn_topk` instead (scores and a per-chunk top-k
    in one pass over the keys, then a merge); it is not the default because it measured
    slower than matmul + top-k (H100, one query over 1e6 keys: 0.80 ms against 0.22 ms at
    128 dimensions, 1.41 against 0.53 at 576; ``bench/bench_knn.py``).
    Distances are clamped at 0 (the expanded form can go slightly negative by rounding).

    Args:
        keys: ``[N, D]`` (float16 in a datastore; any float dtype) on the search device.
        queries: ``[B, D]`` float on the same device.
        k: neighbours per query, ``1 <= k <= N``.
        key_sqnorms: float32 ``[N]`` from :func:`squared_norms` (computed here if None).
        chunk: keys per matmul; default: all keys (up to ``B * chunk`` = 2^26 float32
            distances) on the mixed-precision path, :data:`DEFAULT_CHUNK` otherwise
            (``chunk * D`` float32 key temporaries).
        mixed: take the mixed-precision path (``None``: when
            :func:`mixed_matmul_supported`; ``False`` forces the float32 path, e.g. as a
            benchmark baseline).
        one_pass: use :func:`~sentinel_kernels.ops.knn_topk` (``k <= 64``; on any device,
            where it runs its reference off CUDA); ``None`` or ``False``: matmul + ``topk``.

    Returns:
        ``(distances, indices)``: float32 ``[B, k]`` and int64 ``[B, k]`` (rows of
        ``keys``), nearest first.

    Raises:
        ValueError: shapes or ``k`` out of range, keys and queries on different devices.
        TypeError: non-float queries or keys.
    """
    if keys.dim() != 2 or queries.dim() != 2:
        raise ValueError(
            f"keys must be [N, D] and queries [B, D]; got {tuple(keys.shape)}, "
            f"{tuple(queries.shape)}"
        )
    if not keys.is_floating_point() or not queries.is_floating_point():
        raise TypeError(f"keys and queries must be float; got {keys.dtype}, {queries.dtype}")
    n, dim = keys.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the keys {dim}")
    if keys.device != queries.device:
        raise ValueError(f"keys are on {keys.device}, the queries on {queries.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of keys); got {k!r}")
    if mixed is None:
        mixed = mixed_matmul_supported(keys)
    elif mixed and not mixed_matmul_supported(keys):
        raise ValueError(
            "mixed=True needs float16/bfloat16 keys on CUDA and torch.mm(out_dtype=...); "
            f"got {keys.dtype} keys on {keys.device}"
        )
    if one_pass is None:
        one_pass = False
    elif one_pass and k > ops.knn.MAX_K:
        raise ValueError(f"one_pass=True takes k <= {ops.knn.MAX_K}; got k={k}")
    if chunk is None:
        chunk = max(1, MIXED_CHUNK_ELEMENTS // max(1, queries.shape[0])) if mixed else DEFAULT_CHUNK
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    if key_sqnorms is None:
        key_sqnorms = squared_norms(keys)
    with record_function(KNN_SEARCH_RANGE):
        q = queries.float()
        if one_pass:
            scores, idx = ops.knn_topk(q, keys, key_sqnorms, k)
            return (scores + q.pow(2).sum(-1, keepdim=True)).clamp_min(0.0), idx
        q_mixed = q.to(keys.dtype) if mixed else q
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for start in range(0, n, chunk):
            norms = key_sqnorms[start : start + chunk][None]
            # ranked by |k|^2 - 2 q.k: |q|^2 is the same for a whole row, added to the k
            # winners only (one pass over the [B, chunk] distances fewer)
            if mixed:
                dot = torch.mm(q_mixed, keys[start : start + chunk].t(), out_dtype=torch.float32)
                d = torch.add(norms, dot, alpha=-2.0)
            else:
                block = keys[start : start + chunk].float()
                d = torch.addmm(norms, q, block.t(), alpha=-2.0)
            kk = min(k, d.shape[-1])
            if mixed and d.shape[0] == 1:
                dist, idx = _grouped_topk(d, kk)
            else:
                dist, idx = torch.topk(d, kk, dim=-1, largest=False)
            if start:
                idx = idx + start
            if best_d is None or best_i is None:
                best_d, best_i = dist, idx
            else:
                both = torch.cat([best_d, dist], dim=-1)
                dist, pick = torch.topk(both, min(k, both.shape[-1]), dim=-1, largest=False)
                best_i = torch.cat([best_i, idx], dim=-1).gather(-1, pick)
                best_d = dist
        assert best_d is not None and best_i is not None
        best_d = best_d + q.pow(2).sum(-1, keepdim=True)
        return best_d.clamp_min(0.0), best_i

"""Exact k-nearest-neighbour search in PyTorch, on whatever device the keys live.

This is the search a GPU run uses when the installed FAISS has no GPU support: the keys
stay on the device in float16, and a decode step never round-trips through the host.
For each chunk of ``chunk`` keys it computes squared L2 distances with one matmul
(``|q|^2 - 2 q.k + |k|^2``, in float32: hidden states have norms in the hundreds, so a
float16 dot product would overflow or lose the small differences that rank neighbours),
keeps the chunk's ``k`` best with ``topk`` and merges them into the running best. Every
shape is fixed by ``(B, N, k, chunk)`` and nothing reads a value back to the host, so the
whole search can be captured in a CUDA graph (the decode step of ``sk.generate``).
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

__all__ = ["DEFAULT_CHUNK", "KNN_SEARCH_RANGE", "exact_search", "squared_norms"]

#: Keys per matmul: 65536 x 576 float32 is 150 MB of temporaries on the device.
DEFAULT_CHUNK = 65536
#: Profiler range around every k-NN search (its own category in ``sentinel-kernels profile``).
KNN_SEARCH_RANGE = "sentinel::knn_search"


def squared_norms(keys: torch.Tensor) -> torch.Tensor:
    """``|k_i|^2`` of each key row, float32 ``[N]`` (computed once per datastore)."""
    return keys.float().pow(2).sum(-1)


def exact_search(
    keys: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    key_sqnorms: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys nearest to each query in squared L2 distance (FAISS's
    ``IndexFlatL2`` convention), ascending.

    ``d(q, k_i) = |q|^2 - 2 q.k_i + |k_i|^2``, computed in float32 chunk by chunk; the
    chunk's ``topk`` of ``-d`` is merged with the running best (``cat`` + ``topk``).
    Distances are clamped at 0 (the expanded form can go slightly negative by rounding).

    Args:
        keys: ``[N, D]`` (float16 in a datastore; any float dtype) on the search device.
        queries: ``[B, D]`` float on the same device.
        k: neighbours per query, ``1 <= k <= N``.
        key_sqnorms: float32 ``[N]`` from :func:`squared_norms` (computed here if None).
        chunk: keys per matmul (memory bound ``B * chunk`` float32 plus ``chunk * D``).

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
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    if key_sqnorms is None:
        key_sqnorms = squared_norms(keys)
    with record_function(KNN_SEARCH_RANGE):
        q = queries.float()
        q_sq = q.pow(2).sum(-1, keepdim=True)
        best_d: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for start in range(0, n, chunk):
            block = keys[start : start + chunk].float()
            d = torch.addmm(key_sqnorms[start : start + chunk][None], q, block.t(), alpha=-2.0)
            d = d + q_sq
            kk = min(k, block.shape[0])
            neg, idx = torch.topk(-d, kk, dim=-1)
            idx = idx + start
            if best_d is None or best_i is None:
                best_d, best_i = neg, idx
            else:
                both = torch.cat([best_d, neg], dim=-1)
                neg, pick = torch.topk(both, min(k, both.shape[-1]), dim=-1)
                best_i = torch.cat([best_i, idx], dim=-1).gather(-1, pick)
                best_d = neg
        assert best_d is not None and best_i is not None
        return (-best_d).clamp_min(0.0), best_i

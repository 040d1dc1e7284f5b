"""``sentinel::knn_topk``: exact k-NN ranking of a datastore's keys, one pass on the GPU.

``s(q, i) = |k_i|^2 - 2 q.k_i`` (the squared L2 distance without ``|q|^2``), the ``k``
smallest per query, ascending; the query rounded to the keys' dtype, fp32 products and
sums. On CUDA (Triton) the scores and a per-chunk top-k are one kernel
(``kernels/knn.py``), so neither the ``[B, N]`` scores nor a radix select over them go
through memory; elsewhere the reference (``torch`` matmul + ``topk``). There is no C++
kernel: a CPU datastore is searched by FAISS or by that reference
(:func:`sentinel_kernels.knn.search.exact_search`), which MKL already runs at the
bandwidth.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import knn as ref
from ._checks import check_same_device, check_tensor, dtype_name
from ._dispatch import call_op

_OP = "knn_topk"
#: The largest k of the one-pass kernel (``kernels.knn.MAX_K``; kept here so that the
#: check needs no triton import).
MAX_K = 64
_KEY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(queries: torch.Tensor, keys: torch.Tensor, key_sqnorms: torch.Tensor, k: int) -> None:
    check_tensor(queries, "queries", _OP, _KEY_DTYPES)
    check_tensor(keys, "keys", _OP, _KEY_DTYPES)
    check_tensor(key_sqnorms, "key_sqnorms", _OP, (torch.float32,))
    if queries.dim() != 2 or keys.dim() != 2 or key_sqnorms.dim() != 1:
        raise ValueError(
            f"{_OP}: queries must be [B, D], keys [N, D] and key_sqnorms [N]; got "
            f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(key_sqnorms.shape)}"
        )
    n, d = keys.shape
    if queries.shape[1] != d or key_sqnorms.shape[0] != n:
        raise ValueError(
            f"{_OP}: queries {tuple(queries.shape)} and key_sqnorms "
            f"{tuple(key_sqnorms.shape)} do not fit keys {tuple(keys.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(n, MAX_K):
        raise ValueError(
            f"{_OP}: k must be an int in [1, min(N, {MAX_K})] = [1, {min(n, MAX_K)}]; got {k!r}"
        )
    if queries.dtype != keys.dtype and queries.dtype != torch.float32:
        raise TypeError(
            f"{_OP}: queries must be float32 or the keys' dtype {dtype_name(keys.dtype)}, "
            f"got {dtype_name(queries.dtype)}"
        )
    check_same_device(_OP, queries=queries, keys=keys, key_sqnorms=key_sqnorms)


@torch.library.custom_op("sentinel::knn_topk", mutates_args=())
def _knn_topk_op(
    queries: torch.Tensor, keys: torch.Tensor, key_sqnorms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(queries, keys, key_sqnorms, k)
    backend = _backend.resolve(keys.device)
    if backend != "triton" or queries.shape[0] == 0:
        return ref.knn_topk(queries, keys, key_sqnorms, k)
    from ..kernels import knn as kk

    b = queries.shape[0]
    scores = _backend.empty_output((b, k), torch.float32, keys.device)
    indices = torch.empty((b, k), dtype=torch.int64, device=keys.device)
    q = queries if queries.stride(1) == 1 else queries.contiguous()
    kk.knn_topk(
        q,
        keys if keys.stride(1) == 1 else keys.contiguous(),
        key_sqnorms.contiguous(),
        k,
        scores,
        indices,
    )
    return scores, indices


@_knn_topk_op.register_fake
def _(queries, keys, key_sqnorms, k):
    _check(queries, keys, key_sqnorms, k)
    b = queries.shape[0]
    return (
        queries.new_empty((b, k), dtype=torch.float32),
        queries.new_empty((b, k), dtype=torch.int64),
    )


def knn_topk(
    queries: torch.Tensor, keys: torch.Tensor, key_sqnorms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys of smallest ``|k_i|^2 - 2 q.k_i`` for each query, ascending.

    Squared L2 ranking without ``|q|^2`` (add it to the scores for distances), as in
    kNN-LM's exact search (Khandelwal et al. 2020) over a datastore's keys; the query is
    rounded to the keys' dtype, products and sums are float32. On CUDA one Triton pass
    over the keys scores them against up to 16 queries (``kernels.knn.BLOCK_B``; more
    queries take one pass per 16, where one matmul reads the keys once for all) and
    keeps each chunk's ``k`` best, then one ``topk`` merges the chunks' candidates
    (FAISS's two-stage GPU k-selection, Johnson et al. 2017); no host synchronisation
    (CUDA-graph capturable). Equal scores may come out in another
    order than ``torch.topk``'s. It measured slower than ``torch.mm`` + ``topk`` (H100, one
    query, 1e6 keys: 0.80 ms against 0.22 ms at 128 dimensions), so
    :func:`~sentinel_kernels.knn.search.exact_search` takes it only when asked
    (``one_pass=True``).

    Args:
        queries: ``[B, D]`` float32 or the keys' dtype, any strides.
        keys: ``[N, D]`` float16/bfloat16/float32 (a datastore's keys), any row stride.
        key_sqnorms: float32 ``[N]``, ``|k_i|^2`` (``knn.search.squared_norms``).
        k: ``1 <= k <= min(N, 64)``.
    Returns:
        ``(scores, indices)``: float32 and int64 ``[B, k]``, smallest score first.
    Raises:
        TypeError: a non-tensor or a dtype outside the above.
        ValueError: shapes that do not fit, ``k`` out of range, tensors on different devices.
    """
    for name, t in (("queries", queries), ("keys", keys), ("key_sqnorms", key_sqnorms)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return call_op(_knn_topk_op, queries, keys, key_sqnorms, k)

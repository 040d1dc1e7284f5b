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


_IVF_OP = "ivf_scores"


def _check_ivf(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    probes: torch.Tensor,
    cap: int,
) -> None:
    check_tensor(queries, "queries", _IVF_OP, _KEY_DTYPES)
    check_tensor(keys, "keys", _IVF_OP, _KEY_DTYPES)
    check_tensor(key_sqnorms, "key_sqnorms", _IVF_OP, (torch.float32,))
    for name, t in (("starts", starts), ("lengths", lengths), ("probes", probes)):
        check_tensor(t, name, _IVF_OP, (torch.int64,))
    if (
        queries.dim() != 2
        or keys.dim() != 2
        or key_sqnorms.dim() != 1
        or starts.dim() != 1
        or probes.dim() != 2
    ):
        raise ValueError(
            f"{_IVF_OP}: queries must be [B, D], keys [N, D], key_sqnorms [N], starts and "
            f"lengths [P], probes [B, nprobe]; got {tuple(queries.shape)}, "
            f"{tuple(keys.shape)}, {tuple(key_sqnorms.shape)}, {tuple(starts.shape)}, "
            f"{tuple(probes.shape)}"
        )
    n, d = keys.shape
    if queries.shape[1] != d or key_sqnorms.shape[0] != n or n == 0:
        raise ValueError(
            f"{_IVF_OP}: queries {tuple(queries.shape)} and key_sqnorms "
            f"{tuple(key_sqnorms.shape)} do not fit keys {tuple(keys.shape)} (N >= 1)"
        )
    if lengths.shape != starts.shape or starts.shape[0] == 0:
        raise ValueError(
            f"{_IVF_OP}: starts and lengths must both be [P] with P >= 1; got "
            f"{tuple(starts.shape)}, {tuple(lengths.shape)}"
        )
    if probes.shape[0] != queries.shape[0]:
        raise ValueError(
            f"{_IVF_OP}: probes has {probes.shape[0]} rows, queries {queries.shape[0]}"
        )
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"{_IVF_OP}: cap must be an int >= 1; got {cap!r}")
    if queries.dtype != keys.dtype and queries.dtype != torch.float32:
        raise TypeError(
            f"{_IVF_OP}: queries must be float32 or the keys' dtype {dtype_name(keys.dtype)}, "
            f"got {dtype_name(queries.dtype)}"
        )
    check_same_device(
        _IVF_OP,
        queries=queries,
        keys=keys,
        key_sqnorms=key_sqnorms,
        starts=starts,
        lengths=lengths,
        probes=probes,
    )


@torch.library.custom_op("sentinel::ivf_scores", mutates_args=())
def _ivf_scores_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    probes: torch.Tensor,
    cap: int,
) -> torch.Tensor:
    _check_ivf(queries, keys, key_sqnorms, starts, lengths, probes, cap)
    backend = _backend.resolve(keys.device)
    if backend != "triton" or queries.shape[0] == 0 or probes.shape[1] == 0:
        return ref.ivf_scores(queries, keys, key_sqnorms, starts, lengths, probes, cap)
    from ..kernels import knn as kk

    b, nprobe = probes.shape
    out = _backend.empty_output((b, nprobe * cap), torch.float32, keys.device)
    kk.ivf_scores(
        queries if queries.stride(1) == 1 else queries.contiguous(),
        keys if keys.stride(1) == 1 else keys.contiguous(),
        key_sqnorms.contiguous(),
        starts.contiguous(),
        lengths.contiguous(),
        probes if probes.stride(1) == 1 else probes.contiguous(),
        cap,
        out,
    )
    return out


@_ivf_scores_op.register_fake
def _(queries, keys, key_sqnorms, starts, lengths, probes, cap):
    _check_ivf(queries, keys, key_sqnorms, starts, lengths, probes, cap)
    return queries.new_empty((probes.shape[0], probes.shape[1] * cap), dtype=torch.float32)


def ivf_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    probes: torch.Tensor,
    cap: int,
) -> torch.Tensor:
    """Scores ``|k_i|^2 - 2 q.k_i`` of the keys in each query's probed inverted lists.

    The scan of an IVF-Flat search (Jégou, Douze, Schmid 2011; FAISS's ``IndexIVFFlat``):
    the keys are stored sorted by list, list ``p`` holding rows ``starts[p] ..
    starts[p] + lengths[p] - 1``. ``out[b, j * cap + r]`` scores row ``starts[p] + r`` of
    list ``p = probes[b, j]`` against query ``b`` for ``r < lengths[p]`` and is ``+inf``
    for ``lengths[p] <= r < cap``, so every shape is fixed by ``(B, nprobe, cap)`` and a
    CUDA graph can hold the search. The query is rounded to the keys' dtype, products and
    sums are float32 (as in :func:`knn_topk`). On CUDA one Triton pass reads only the
    probed lists' keys; elsewhere the PyTorch reference (a gather). The list tables are
    not read back to check them (that would be a host sync): the caller guarantees
    ``0 <= probes < P``, ``lengths <= cap`` and ``starts + lengths <= N`` (the Triton
    kernel clamps them, so bad tables give wrong scores, never a bad memory access).

    Args:
        queries: ``[B, D]`` float32 or the keys' dtype, any strides.
        keys: ``[N, D]`` float16/bfloat16/float32, any row stride.
        key_sqnorms: float32 ``[N]``.
        starts, lengths: int64 ``[P]``: each list's first row and row count.
        probes: int64 ``[B, nprobe]``: the lists searched for each query.
        cap: the score slots per probed list (``>= lengths.max()``).
    Returns:
        float32 ``[B, nprobe * cap]``.
    Raises:
        TypeError: a non-tensor or a dtype outside the above.
        ValueError: shapes that do not fit, ``cap < 1``, tensors on different devices.
    """
    named = (
        ("queries", queries),
        ("keys", keys),
        ("key_sqnorms", key_sqnorms),
        ("starts", starts),
        ("lengths", lengths),
        ("probes", probes),
    )
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_IVF_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return call_op(_ivf_scores_op, queries, keys, key_sqnorms, starts, lengths, probes, cap)

"""Reference exact k-nearest-neighbour ranking (the oracle of ``ops.knn_topk``)."""

from __future__ import annotations

import torch


def knn_topk(
    queries: torch.Tensor, keys: torch.Tensor, key_sqnorms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys of smallest ``s(q, i) = |k_i|^2 - 2 q.k_i`` per query, ascending.

    ``s`` is the squared L2 distance without ``|q|^2`` (the same for a whole query row, so
    it does not change the ranking). The query is rounded to the keys' dtype first, as the
    mixed-precision search does; products and sums in float32.

    Args:
        queries: ``[B, D]`` float. keys: ``[N, D]`` float. key_sqnorms: float32 ``[N]``.
        k: ``1 <= k <= N``.
    Returns:
        ``(scores, indices)``: float32 ``[B, k]`` and int64 ``[B, k]``, smallest first.
    """
    q = queries.to(keys.dtype).float()
    s = key_sqnorms.float()[None, :] - 2.0 * (q @ keys.float().t())
    scores, idx = torch.topk(s, k, dim=-1, largest=False)
    return scores.contiguous(), idx.contiguous()

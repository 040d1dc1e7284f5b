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


def ivf_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_sqnorms: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    probes: torch.Tensor,
    cap: int,
) -> torch.Tensor:
    """Scores of the probed inverted lists of an IVF index (the oracle of
    ``ops.ivf_scores``).

    ``out[b, j * cap + r] = |k_i|^2 - 2 q_b.k_i`` with ``i = starts[p] + r`` and ``p =
    probes[b, j]`` for ``r < lengths[p]``, ``+inf`` for ``lengths[p] <= r < cap``; the
    query rounded to the keys' dtype, products and sums in float32.

    Args:
        queries: ``[B, D]`` float. keys: ``[N, D]`` float (sorted by list).
        key_sqnorms: float32 ``[N]``. starts, lengths: int64 ``[P]``.
        probes: int64 ``[B, nprobe]``. cap: ``>= max(lengths)``.
    Returns:
        float32 ``[B, nprobe * cap]``.
    """
    b, nprobe = probes.shape
    r = torch.arange(cap, device=keys.device)
    rows = starts[probes][:, :, None] + r  # [B, nprobe, cap]
    ok = r < lengths[probes][:, :, None]
    rows = torch.where(ok, rows, 0).reshape(b, -1)
    q = queries.to(keys.dtype).float()
    vec = keys[rows].float()  # [B, nprobe * cap, D]
    s = key_sqnorms.float()[rows] - 2.0 * torch.einsum("bcd,bd->bc", vec, q)
    return torch.where(ok.reshape(b, -1), s, torch.inf).contiguous()

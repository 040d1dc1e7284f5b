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
    d = keys.shape[1]
    r = torch.arange(cap, device=keys.device)
    q = queries.to(keys.dtype).float()
    out = torch.empty((b, nprobe * cap), dtype=torch.float32, device=keys.device)
    # query blocks of bounded gather size (~2^24 float32 key elements)
    step = max(1, (1 << 24) // max(1, nprobe * cap * d))
    for s in range(0, b, step):
        pr = probes[s : s + step]
        rows = starts[pr][:, :, None] + r  # [b', nprobe, cap]
        ok = r < lengths[pr][:, :, None]
        rows = torch.where(ok, rows, 0).reshape(pr.shape[0], -1)
        vec = keys[rows].float()  # [b', nprobe * cap, D]
        sc = key_sqnorms.float()[rows] - 2.0 * torch.einsum("bcd,bd->bc", vec, q[s : s + step])
        out[s : s + step] = torch.where(ok.reshape(pr.shape[0], -1), sc, torch.inf)
    return out

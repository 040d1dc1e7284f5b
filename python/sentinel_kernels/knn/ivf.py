"""An IVF-Flat index that searches on the keys' device (``Datastore.to(..., backend="ivf")``).

The exact device search reads every key for every query: 1.15 GB per token at a million
576-dimensional float16 keys, a floor of ~0.3 ms on an H100/H200 before any top-k, about
half of a SmolLM2 decode step. An inverted-file index (Jégou, Douze, Schmid 2011; FAISS's
``IndexIVFFlat``) reads only the keys of the ``nprobe`` lists whose centroids are nearest
to the query, with exact float16 distances inside them (so its recall is that of the
coarse quantizer alone, not reduced further by product quantization).

A CUDA graph needs fixed shapes: every list is cut into pieces of at most ``cap`` keys,
each piece a list of its own with its cluster's centroid, so the scan always covers
``nprobe * cap`` score slots (``ops.ivf_scores``, ``+inf`` past a piece's end) and a large
cluster takes several of the ``nprobe`` probes (its pieces are equally near). The search
is then: centroid scores (one small matmul), ``topk`` of ``nprobe`` pieces, the list scan,
``topk`` of ``k`` among ``nprobe * cap`` scores, and the map back to entry numbers; no host
synchronisation.

The centroids come from k-means (Lloyd's iterations, on the keys' device) over a sample of
the keys. The index holds the keys again, sorted by list (the datastore's own keys stay
as they are, for ``"torch"`` and ``"faiss"`` searches): twice the key memory while it is
in use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from .. import ops
from .search import KNN_SEARCH_RANGE, squared_norms

__all__ = ["IVF_DEFAULTS", "DeviceIVF", "ivf_options", "kmeans"]

#: Options of the device IVF (``None``: chosen from the number of keys, see
#: :func:`ivf_options`).
IVF_DEFAULTS: dict[str, Any] = {
    "nlist": None,
    "nprobe": 32,
    "cap_factor": 2.0,
    "train_size": 131072,
    "iters": 12,
    "seed": 0,
}
#: float32 distances per assignment chunk of k-means (keeps its temporaries ~256 MB).
_ASSIGN_ELEMENTS = 1 << 26


def _int_option(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"ivf option {name} must be an int >= {low}; got {value!r}")
    return value


def ivf_options(n: int, options: dict[str, Any]) -> dict[str, Any]:
    """The full option set of a device IVF over ``n`` keys.

    ``nlist`` (clusters; default ``4 sqrt(n)``, at most ``n``), ``nprobe`` (pieces searched
    per query, default 32), ``cap_factor`` (a piece holds at most ``ceil(cap_factor * n /
    nlist)`` keys, default 2), ``train_size`` (k-means sample), ``iters`` (Lloyd
    iterations), ``seed``.

    Raises:
        ValueError: an unknown option or a value out of range.
    """
    unknown = sorted(set(options) - set(IVF_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ivf option(s) {unknown}; it takes: {', '.join(IVF_DEFAULTS)}")
    opts = {**IVF_DEFAULTS, **options}
    if n < 1:
        raise ValueError("an IVF index needs at least one key")
    if opts["nlist"] is None:
        opts["nlist"] = max(1, min(n, int(4 * math.sqrt(n))))
    _int_option("nlist", opts["nlist"], 1)
    if opts["nlist"] > n:
        raise ValueError(f"nlist={opts['nlist']} exceeds the number of keys ({n})")
    _int_option("nprobe", opts["nprobe"], 1)
    _int_option("train_size", opts["train_size"], 1)
    _int_option("iters", opts["iters"], 0)
    _int_option("seed", opts["seed"], 0)
    cf = opts["cap_factor"]
    if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf >= 1.0:
        raise ValueError(f"ivf option cap_factor must be a number >= 1; got {cf!r}")
    return opts


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared L2) of each row of ``x``, int64 ``[N]`` (chunked)."""
    c = centroids.float()
    c_sq = c.pow(2).sum(-1)
    rows = max(1, _ASSIGN_ELEMENTS // max(1, c.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for s in range(0, x.shape[0], rows):
        block = x[s : s + rows].float()
        out[s : s + rows] = torch.addmm(c_sq[None], block, c.t(), alpha=-2.0).argmin(-1)
    return out


def kmeans(
    x: torch.Tensor, nlist: int, iters: int = 12, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """``nlist`` centroids of the rows of ``x`` ``[M, D]`` by Lloyd's algorithm (squared
    L2), float32 ``[nlist, D]`` on ``x``'s device.

    Starts from ``nlist`` distinct rows drawn with ``seed``; a cluster left empty by an
    iteration is restarted at a random row (as FAISS's k-means splits, more simply).
    Deterministic for a given input, device and seed. ``progress``: a bar over the
    iterations.

    Raises:
        ValueError: ``nlist`` not in ``[1, M]``.
    """
    m = x.shape[0]
    if not 1 <= nlist <= m:
        raise ValueError(f"k-means needs 1 <= nlist <= {m} (the sample size); got {nlist}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(m, generator=g)[:nlist].to(x.device)
    cent = x[pick].float().clone()
    xf = x.float()
    for _ in tqdm(range(iters), desc="ivf k-means", unit="iter", disable=not progress):
        a = _assign(xf, cent)
        sums = torch.zeros_like(cent).index_add_(0, a, xf)
        counts = torch.bincount(a, minlength=nlist).to(cent.dtype)
        empty = counts == 0
        cent = torch.where(empty[:, None], cent, sums / counts.clamp_min(1)[:, None])
        # one host read per iteration, at build time only
        n_empty = int(empty.sum())
        if n_empty:
            fresh = torch.randint(0, m, (n_empty,), generator=g).to(x.device)
            cent[empty] = xf[fresh]
    return cent


class DeviceIVF:
    """An IVF-Flat index over float keys on one device; build it with :meth:`build`.

    Attributes:
        centroids: float32 ``[P, D]``, one row per piece (pieces of one cluster repeat
            its centroid). keys: the keys sorted by piece, ``[N, D]`` (the input dtype).
        key_sqnorms: float32 ``[N]``. order: int64 ``[N]``, the input row of each sorted key.
        starts, lengths: int64 ``[P]``, each piece's rows in :attr:`keys`.
        cap: the most keys a piece holds. nprobe: pieces searched per query.
        options: the resolved :func:`ivf_options`.
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        keys: torch.Tensor,
        order: torch.Tensor,
        starts: torch.Tensor,
        lengths: torch.Tensor,
        cap: int,
        options: dict[str, Any],
    ) -> None:
        self.centroids = centroids.float().contiguous()
        self.centroid_sqnorms = self.centroids.pow(2).sum(-1)
        self.keys = keys.contiguous()
        self.key_sqnorms = squared_norms(self.keys)
        self.order = order
        self.starts = starts
        self.lengths = lengths
        self.cap = int(cap)
        self.options = dict(options)
        self.nprobe = int(options["nprobe"])

    @classmethod
    def build(cls, keys: torch.Tensor, progress: bool = False, **options: Any) -> DeviceIVF:
        """Cluster ``keys`` ``[N, D]`` (float, on the device that will search) and sort
        them into pieces of at most ``cap = ceil(cap_factor * N / nlist)`` keys
        (``progress``: a bar over the k-means iterations).

        Raises:
            ValueError: bad options (:func:`ivf_options`), keys not ``[N, D]`` float.
        """
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or not keys.is_floating_point():
            raise ValueError("keys must be a float tensor [N, D]")
        n = keys.shape[0]
        opts = ivf_options(n, options)
        g = torch.Generator().manual_seed(opts["seed"])
        take = min(n, max(opts["train_size"], opts["nlist"]))
        sample = keys[torch.randperm(n, generator=g)[:take].sort().values.to(keys.device)]
        cent = kmeans(sample, opts["nlist"], opts["iters"], opts["seed"], progress)
        assign = _assign(keys, cent)
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=opts["nlist"]).cpu()
        cap = max(1, math.ceil(opts["cap_factor"] * n / opts["nlist"]))
        starts, lengths, owner = [], [], []
        first = 0
        for c, cnt in enumerate(counts.tolist()):
            for s in range(0, cnt, cap):
                starts.append(first + s)
                lengths.append(min(cap, cnt - s))
                owner.append(c)
            first += cnt
        dev = keys.device
        return cls(
            centroids=cent[torch.tensor(owner, device=dev)],
            keys=keys[order],
            order=order,
            starts=torch.tensor(starts, dtype=torch.int64, device=dev),
            lengths=torch.tensor(lengths, dtype=torch.int64, device=dev),
            cap=cap,
            options=opts,
        )

    @property
    def pieces(self) -> int:
        """The number of lists after cutting (``P``)."""
        return int(self.starts.shape[0])

    def set_nprobe(self, nprobe: int) -> None:
        """Change the pieces searched per query.

        Raises:
            ValueError: not an int >= 1.
        """
        self.nprobe = _int_option("nprobe", nprobe, 1)
        self.options["nprobe"] = self.nprobe

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest keys among the ``nprobe`` pieces nearest to each query.

        ``d = |q~|^2 - 2 q~.k + |k|^2`` (squared L2 in float32 from ``q~``, the query
        rounded to the keys' dtype, as the exact GPU search rounds it for its dot
        products); fixed shapes, no host sync.

        Args:
            queries: float ``[B, D]`` on the index's device.
            k: ``>= 1``; more than the probed pieces hold gives ``inf`` / ``-1`` tails.
        Returns:
            ``(distances, indices)``: float32 ``[B, k]`` ascending (``inf`` where fewer
            than ``k`` keys were probed) and int64 ``[B, k]`` input rows (``-1`` there).
        Raises:
            ValueError: wrong shapes or device, ``k < 1``.
        """
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"queries must be [B, {self.keys.shape[1]}]; got {tuple(queries.shape)}"
            )
        if queries.device != self.keys.device:
            raise ValueError(f"queries are on {queries.device}, the index on {self.keys.device}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1; got {k!r}")
        with record_function(KNN_SEARCH_RANGE):
            q = queries.float()
            b = q.shape[0]
            nprobe = min(self.nprobe, self.pieces)
            cs = torch.addmm(self.centroid_sqnorms[None], q, self.centroids.t(), alpha=-2.0)
            probes = torch.topk(cs, nprobe, dim=-1, largest=False).indices
            scores = ops.ivf_scores(
                q, self.keys, self.key_sqnorms, self.starts, self.lengths, probes, self.cap
            )
            kk = min(k, scores.shape[1])
            best, pos = torch.topk(scores, kk, dim=-1, largest=False)
            slot = pos // self.cap
            row = self.starts[probes.gather(-1, slot)] + pos % self.cap
            found = torch.isfinite(best)
            idx = torch.where(found, self.order[row.clamp(0, self.keys.shape[0] - 1)], -1)
            # |q~|^2 of the rounded query q~ the scores used: the distance of q~ to the key
            q_sq = q.to(self.keys.dtype).float().pow(2).sum(-1, keepdim=True)
            dist = torch.where(found, (best + q_sq).clamp_min(0.0), best)
            if kk < k:
                dist = torch.cat([dist, dist.new_full((b, k - kk), math.inf)], -1)
                idx = torch.cat([idx, idx.new_full((b, k - kk), -1)], -1)
            return dist, idx

    def memory_bytes(self) -> int:
        """Bytes held by the index (its sorted keys, norms, order, centroids, tables)."""
        ts = (
            self.keys,
            self.key_sqnorms,
            self.order,
            self.centroids,
            self.centroid_sqnorms,
            self.starts,
            self.lengths,
        )
        return sum(t.numel() * t.element_size() for t in ts)

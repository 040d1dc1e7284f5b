"""FAISS indexes of a datastore: exact, IVF-PQ and HNSW, with their options checked.

* ``"flat"``: ``IndexFlatL2``, exact squared-L2 search (brute force, BLAS).
* ``"ivfpq"``: ``IndexIVFPQ`` (Jegou et al. 2011): a coarse k-means quantizer of
  ``nlist`` cells and product-quantized residuals (``m`` sub-vectors of ``nbits`` bits);
  a search visits the ``nprobe`` nearest cells. Trained on a random sample of
  ``train_size`` keys (the kNN-LM paper's setting, smaller). With ``rerank = r > 1`` the
  index returns ``r * k`` candidates whose exact distances to the stored float16 keys pick
  the ``k`` (the datastore keeps those keys anyway, so re-ranking costs no memory; it
  lifts the recall that product quantization caps).
* ``"hnsw"``: ``IndexHNSWFlat`` (Malkov & Yashunin 2018), a navigable small-world graph of
  ``M`` links per node built with ``ef_construction``; a search keeps ``ef_search``
  candidates. No training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _faiss() -> Any:
    """The ``faiss`` module, imported when an index is first built or loaded: the device
    search (``backend="torch"``) runs without it (a GPU machine may lack the wheel).

    Raises:
        ImportError: faiss is not installed (``pip install faiss-cpu``).
    """
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "the FAISS indexes need the faiss package (a dependency of sentinel-kernels: "
            "pip install faiss-cpu)"
        ) from exc
    return faiss


__all__ = [
    "INDEX_KINDS",
    "SEARCH_PARAMS",
    "build_index",
    "deserialize",
    "index_options",
    "serialize",
    "set_search_params",
]

INDEX_KINDS = ("flat", "ivfpq", "hnsw")
#: Options of each kind (``None``: chosen from the data, see :func:`index_options`).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivfpq": {
        "nlist": None,
        "m": None,
        "nbits": 8,
        "nprobe": 8,
        "train_size": 65536,
        "rerank": 1,
    },
    "hnsw": {"M": 32, "ef_construction": 64, "ef_search": 64},
}
#: Options that only change the search (settable after the build).
SEARCH_PARAMS = {"ivfpq": ("nprobe", "rerank"), "hnsw": ("ef_search",), "flat": ()}


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"index option {name} must be an int >= 1; got {value!r}")
    return value


def index_options(kind: str, n: int, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """The full option set of an index of ``kind`` over ``n`` keys of dimension ``dim``.

    Defaults: IVF-PQ ``nlist = min(4 sqrt(n), n / 39)`` (FAISS wants >= 39 training
    points per centroid), ``m`` the largest divisor of ``dim`` that is ``<= min(64,
    dim / 4)``, 8 bits, ``nprobe = 8``, ``rerank = 1`` (none); HNSW ``M = 32``,
    ``ef_construction = ef_search = 64``.

    Raises:
        ValueError: unknown kind or option, a value out of range (``nlist > n``, ``m``
            not dividing ``dim``, ``nbits`` outside 1..16...).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    allowed = _DEFAULTS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise ValueError(f"unknown option(s) {unknown} for index {kind!r}; it takes: {names}")
    opts = {**allowed, **options}
    if kind == "ivfpq":
        if opts["nlist"] is None:
            opts["nlist"] = max(1, min(int(4 * math.sqrt(n)), n // 39))
        if opts["m"] is None:
            opts["m"] = max(d for d in range(1, min(64, max(1, dim // 4)) + 1) if dim % d == 0)
        for name in ("nlist", "m", "nbits", "nprobe", "train_size", "rerank"):
            _positive_int(name, opts[name])
        if opts["nlist"] > n:
            raise ValueError(f"nlist={opts['nlist']} exceeds the number of keys ({n})")
        if dim % opts["m"]:
            raise ValueError(f"m={opts['m']} must divide the key dimension {dim}")
        if opts["nbits"] > 16:
            raise ValueError(f"nbits must be in 1..16; got {opts['nbits']}")
        if min(n, opts["train_size"]) < max(opts["nlist"], 2 ** opts["nbits"]):
            raise ValueError(
                f"IVF-PQ needs at least max(nlist, 2**nbits) = "
                f"{max(opts['nlist'], 2 ** opts['nbits'])} training keys; it has "
                f"{min(n, opts['train_size'])} (lower nlist/nbits or add text)"
            )
    elif kind == "hnsw":
        for name in ("M", "ef_construction", "ef_search"):
            _positive_int(name, opts[name])
    return opts


def build_index(kind: str, keys: np.ndarray, opts: dict[str, Any], seed: int = 0) -> Any:
    """A FAISS index of ``kind`` holding ``keys`` (float32 ``[N, D]``, C-contiguous),
    with ``opts`` from :func:`index_options`; IVF-PQ is trained first on a random sample
    (``seed``)."""
    n, dim = keys.shape
    index: Any
    if kind == "flat":
        index = _faiss().IndexFlatL2(dim)
    elif kind == "ivfpq":
        quantizer = _faiss().IndexFlatL2(dim)
        index = _faiss().IndexIVFPQ(quantizer, dim, opts["nlist"], opts["m"], opts["nbits"])
        rng = np.random.default_rng(seed)
        take = min(n, opts["train_size"])
        sample = keys[np.sort(rng.choice(n, size=take, replace=False))]
        # (faiss's Python wrapper keeps `quantizer` referenced by the index)
        index.train(np.ascontiguousarray(sample))
    else:
        index = _faiss().IndexHNSWFlat(dim, opts["M"])
        index.hnsw.efConstruction = opts["ef_construction"]
    index.add(keys)
    set_search_params(index, kind, opts)
    return index


def set_search_params(index: Any, kind: str, opts: dict[str, Any]) -> None:
    """Apply the search-time options (``nprobe``, ``ef_search``) of ``opts`` to ``index``."""
    if kind == "ivfpq":
        index.nprobe = _positive_int("nprobe", opts["nprobe"])
        _positive_int("rerank", opts.get("rerank", 1))
    elif kind == "hnsw":
        index.hnsw.efSearch = _positive_int("ef_search", opts["ef_search"])


def serialize(index: Any) -> np.ndarray:
    """The index as a uint8 array (``faiss.serialize_index``)."""
    return np.asarray(_faiss().serialize_index(index))


def deserialize(data: np.ndarray, kind: str, opts: dict[str, Any]) -> Any:
    """The inverse of :func:`serialize`, with the search options applied."""
    index = _faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
    set_search_params(index, kind, opts)
    return index

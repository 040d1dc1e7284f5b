"""k-NN retrieval for causal LMs: kNN-LM (Khandelwal et al. 2020) with FAISS indexes.

* :class:`Datastore` (:mod:`.datastore`): ``(LM-head input -> next token)`` pairs of a
  text collection, built with :meth:`Datastore.build`, saved and loaded, searched with
  :meth:`Datastore.search` (exact, IVF-PQ or HNSW through FAISS on the CPU; an exact
  search of our own on a GPU) behind an LRU result cache (:mod:`.cache`);
* :mod:`.lm`: the kNN-LM interpolation ``lambda * p_kNN + (1 - lambda) * p_LM``, used by
  ``sk.eval.perplexity(..., knn=store)`` and ``sk.generate(..., knn=store)``;
* :mod:`.search`: the exact device search (matmul + top-k, chunked, graph-capturable).

Imported lazily: ``import sentinel_kernels.knn`` loads FAISS only when a datastore is
built or loaded.
"""

from __future__ import annotations

from typing import Any

from .._lazy import lazy_attribute, lazy_dir

_LAZY = {"cache", "datastore", "index", "lm", "search"}
_LAZY_ATTRS = {
    "BACKENDS": "datastore",
    "Datastore": "datastore",
    "DatastoreMismatchError": "datastore",
    "model_identity": "datastore",
    "CacheInfo": "cache",
    "KnnCache": "cache",
    "KnnScorer": "lm",
    "interpolate": "lm",
    "knn_log_probs": "lm",
    "mix_log_probs": "lm",
    "exact_search": "search",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, globals(), _LAZY, _LAZY_ATTRS, name)


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY, _LAZY_ATTRS)


__all__ = sorted(_LAZY_ATTRS)

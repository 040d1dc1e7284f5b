"""Benchmarks of the k-NN search of ``sentinel_kernels.knn``: FAISS indexes vs our exact
device search.

One pytest-benchmark group per (device, datastore size), e.g. ``knn_search [1e6x576]
cpu``, timing one search of a single query (a decode step at batch 1) for ``k = 32``:

* ``faiss-flat``: ``IndexFlatL2`` (exact, BLAS) over float32 keys;
* ``faiss-ivfpq``: ``IndexIVFPQ`` (``nlist = 4 sqrt(N)``, ``m = 64``, 8 bits, ``nprobe = 8``),
  trained on 65536 keys;
* ``faiss-hnsw``: ``IndexHNSWFlat`` (``M = 32``, ``ef_construction = 64``,
  ``ef_search = 64``);
* ``torch-exact``: :func:`sentinel_kernels.knn.search.exact_search` over float16 keys (on
  the CPU, and on CUDA where it is what a decode step runs);
* ``torch-exact-graph`` (CUDA): the same replayed from a CUDA graph (the decode loop's
  case: no launch overhead): ``torch.mm`` to float32 scores, then a two-stage ``topk``;
* ``torch-exact-onepass-graph`` (CUDA): ``one_pass=True``, the one-pass ``ops.knn_topk``
  (scores and a per-chunk top-k in one Triton kernel, then a merge), replayed from a CUDA
  graph; ``torch-exact-graph`` is its baseline (the one-pass kernel is not the default:
  it measured slower);
* ``torch-exact-fp32-graph`` (CUDA): the float32 path (``mixed=False``: each 65536-key
  chunk converted to float32 before its matmul), the baseline of the mixed-precision path
  (float16 keys read once, float32 results), replayed from a CUDA graph;
* ``device-ivf16-graph`` / ``device-ivf32-graph`` (CUDA): the device IVF-Flat index
  (``Datastore.to(backend="ivf")``'s :class:`~sentinel_kernels.knn.ivf.DeviceIVF`, default
  ``nlist = 4 sqrt(N)`` and pieces of at most ``2 N / nlist`` keys) probing 16 / 32 pieces,
  replayed from a CUDA graph; ``torch-exact-graph`` is its baseline. Its time depends on
  the sizes only; its recall on these random keys is far below that on real hidden
  states (``scripts/knn_eval.py``, ``scripts/knn_pca_ppl.py --ivf-nprobe``).

Keys are random normal float16 vectors of dimension 576 (SmolLM2's hidden size; on CUDA
also 128, the PCA-reduced keys of issue 18's decode-share target); queries
are keys plus noise. ``extra_info`` holds the recall@32 of the entry against the exact
search on 64 queries (random data is the hard case for IVF-PQ and HNSW) and the index's
build time. Index builds at 1e6 keys take minutes on 2 CPU cores (HNSW the longest): those
entries are marked ``slow``.

Run: ``pytest bench/bench_knn.py --benchmark-only`` (add ``-m "not slow"`` on a small CPU
machine; the CUDA entries are skipped without a GPU).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import pytest
import torch
from benchlib import HAS_CUDA

from sentinel_kernels.knn import index as faiss_index
from sentinel_kernels.knn.search import exact_search, squared_norms

DIM = 576
K = 32
SIZES = (100_000, 1_000_000)
CPU_IMPLS = ("faiss-flat", "faiss-ivfpq", "faiss-hnsw", "torch-exact")
GPU_IMPLS = (
    "torch-exact",
    "torch-exact-graph",
    "torch-exact-onepass-graph",
    "torch-exact-fp32-graph",
    "device-ivf16-graph",
    "device-ivf32-graph",
)
#: Key dimensions of the CUDA groups (the CPU groups use DIM only).
GPU_DIMS = (DIM, 128)
RECALL_QUERIES = 64


def _params() -> list[Any]:
    out = []
    for n in SIZES:
        for impl in CPU_IMPLS:
            marks = [pytest.mark.slow] if n >= 1_000_000 and impl != "torch-exact" else []
            out.append(pytest.param("cpu", n, DIM, impl, marks=marks, id=f"cpu-{n:.0e}-{impl}"))
        for dim in GPU_DIMS:
            for impl in GPU_IMPLS:
                marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
                name = f"cuda-{n:.0e}-{impl}" + ("" if dim == DIM else f"-d{dim}")
                out.append(pytest.param("cuda", n, dim, impl, marks=marks, id=name))
    return out


@functools.lru_cache(maxsize=1)
def _data(n: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random float16 keys and ``RECALL_QUERIES`` queries near some of them (CPU)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, dim, generator=g).half()
    pick = torch.randint(0, n, (RECALL_QUERIES,), generator=g)
    queries = keys[pick].float() + 0.5 * torch.randn(RECALL_QUERIES, dim, generator=g)
    return keys, queries


@functools.lru_cache(maxsize=2)
def _faiss(n: int, kind: str) -> tuple[Any, float]:
    keys, _ = _data(n)
    opts = {
        "flat": {},
        "ivfpq": {"nlist": int(4 * math.sqrt(n)), "m": 64, "nbits": 8, "nprobe": 8},
        "hnsw": {"M": 32, "ef_construction": 64, "ef_search": 64},
    }[kind]
    full = faiss_index.index_options(kind, n, DIM, opts)
    t0 = time.perf_counter()
    built = faiss_index.build_index(kind, np.ascontiguousarray(keys.float().numpy()), full)
    return built, time.perf_counter() - t0


def _recall(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got[:, :, None] == exact[:, None, :]).any(-1).float().mean())


@pytest.mark.parametrize(("device", "n", "dim", "impl"), _params())
def test_knn_search(benchmark: Any, device: str, n: int, dim: int, impl: str) -> None:
    """One entry of the group ``knn_search [n x dim] device``."""
    benchmark.group = f"knn_search [{n:.0e}x{dim}] k={K} {device}"
    keys_cpu, queries_cpu = _data(n, dim)
    dev = torch.device(device)
    keys = keys_cpu.to(dev)
    norms = squared_norms(keys)
    queries = queries_cpu.to(dev)
    # recall reference: the float32 path (on the CPU it is the only path)
    _, exact = exact_search(keys, queries, K, key_sqnorms=norms, mixed=False)
    exact = exact.cpu()
    info: dict[str, Any] = {"n": n, "dim": dim, "k": K, "device": device, "impl": impl}

    if impl.startswith("faiss-"):
        index, build_s = _faiss(n, impl.removeprefix("faiss-"))
        info["build_s"] = build_s
        host = np.ascontiguousarray(queries_cpu.numpy())
        _, got = index.search(host, K)
        info["recall_at_k"] = _recall(torch.from_numpy(got), exact)
        one = host[:1]

        def run() -> Any:
            return index.search(one, K)

    else:
        if impl.startswith("device-ivf"):
            from sentinel_kernels.knn.ivf import DeviceIVF

            t0 = time.perf_counter()
            ivf = DeviceIVF.build(keys, nprobe=int(impl.split("-")[1].removeprefix("ivf")))
            torch.cuda.synchronize()
            info.update(build_s=time.perf_counter() - t0, pieces=ivf.pieces, cap=ivf.cap)

            def search(keys: torch.Tensor, q: torch.Tensor, k: int) -> Any:
                return ivf.search(q, k)

        else:
            mixed = False if impl == "torch-exact-fp32-graph" else None
            one_pass = impl == "torch-exact-onepass-graph"
            search = functools.partial(
                exact_search, key_sqnorms=norms, mixed=mixed, one_pass=one_pass
            )
        _, got_t = search(keys, queries, K)
        info["recall_at_k"] = _recall(got_t.cpu(), exact)
        q = queries[:1].clone()
        if impl.endswith("-graph"):
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                search(keys, q, K)  # warm-up
                with torch.cuda.graph(graph, stream=side):
                    search(keys, q, K)
            torch.cuda.current_stream().wait_stream(side)

            def run() -> Any:
                graph.replay()
                torch.cuda.synchronize()

        else:

            def run() -> Any:
                out = exact_search(keys, q, K, key_sqnorms=norms)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                return out

    benchmark.extra_info.update(info)
    benchmark(run)


#: The kNN-LM mixing groups: rows (batch 1 and an engine's 64) over SmolLM2's vocabulary.
MIX_ROWS = (1, 64)
MIX_VOCAB = 49152
MIX_IMPLS = ("two-step", "sparse")


def _mix_params() -> list[Any]:
    out = []
    for device in ("cpu", "cuda"):
        marks = (
            [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
            if device == "cuda"
            else []
        )
        for rows in MIX_ROWS:
            for impl in MIX_IMPLS:
                out.append(
                    pytest.param(device, rows, impl, marks=marks, id=f"mix-{device}-b{rows}-{impl}")
                )
    return out


@pytest.mark.parametrize(("device", "rows", "impl"), _mix_params())
def test_knn_mix(benchmark: Any, device: str, rows: int, impl: str) -> None:
    """One entry of the group ``knn_mix [rows x V] k=32 device``: the kNN-LM mixture of a
    step's logits with its neighbours, ``two-step`` (``knn_log_probs`` then
    ``interpolate``, the baseline) against ``sparse`` (``mix_log_probs``, what
    ``KnnScorer`` runs); bf16 logits, lambda 0.25, T 1; on CUDA replayed from a CUDA graph
    (the decode step's case), timed with a device sync."""
    from sentinel_kernels.knn import lm

    benchmark.group = f"knn_mix [{rows}x{MIX_VOCAB}] k={K} {device}"
    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(rows, MIX_VOCAB, generator=g) * 3).bfloat16().to(dev)
    dist = (torch.rand(rows, K, generator=g) * 50).sort(-1).values.to(dev)
    tokens = torch.randint(0, 2000, (rows, K), generator=g).to(dev)  # repeats aggregate

    def step() -> torch.Tensor:
        if impl == "sparse":
            return lm.mix_log_probs(logits, dist, tokens, 0.25, 1.0)
        return lm.interpolate(logits, lm.knn_log_probs(dist, tokens, MIX_VOCAB, 1.0), 0.25)

    ref = lm.interpolate(logits, lm.knn_log_probs(dist, tokens, MIX_VOCAB, 1.0), 0.25)
    torch.testing.assert_close(step(), ref, rtol=1e-5, atol=1e-5)
    if dev.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
            with torch.cuda.graph(graph, stream=side):
                step()
        torch.cuda.current_stream().wait_stream(side)

        def run() -> Any:
            graph.replay()
            torch.cuda.synchronize()

    else:
        run = step  # type: ignore[assignment]

    benchmark.extra_info.update({"rows": rows, "vocab": MIX_VOCAB, "k": K, "impl": impl})
    benchmark(run)

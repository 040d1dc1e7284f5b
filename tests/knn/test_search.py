"""Exact search (torch and FAISS) against a float64 brute-force oracle; the result cache."""

from __future__ import annotations

import pytest
import torch

from sentinel_kernels.knn import search


def _oracle(keys, queries, k):
    """float64 squared L2 distances of every pair, then the k smallest per query."""
    d = torch.cdist(queries.double(), keys.double()).pow(2)
    dist, idx = torch.topk(d, k, dim=-1, largest=False)
    return dist, idx


def _data(n, dim, b, seed):
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(n, dim, generator=g) * 3).half()
    queries = torch.randn(b, dim, generator=g) * 3
    return keys, queries


@pytest.mark.parametrize("chunk", [97, 512, 65536])
@pytest.mark.parametrize("k", [1, 10, 64])
def test_exact_search_equals_fp64_oracle(chunk, k):
    keys, queries = _data(1000, 24, 9, seed=chunk + k)
    dist, idx = search.exact_search(keys, queries, k, chunk=chunk)
    ref_d, ref_i = _oracle(keys, queries, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-3)


def test_exact_search_k_equals_n_with_small_chunks():
    keys, queries = _data(50, 8, 3, seed=5)
    dist, idx = search.exact_search(keys, queries, 50, chunk=7)
    ref_d, ref_i = _oracle(keys, queries, 50)
    assert torch.equal(idx, ref_i)
    assert torch.equal(idx.sort(-1).values, torch.arange(50).expand(3, 50))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k must be"),
        ({"k": 101}, ValueError, "k must be"),
        ({"queries": torch.randn(3, 7)}, ValueError, "dimension"),
        ({"queries": torch.randint(0, 5, (3, 8))}, TypeError, "float"),
        ({"queries": torch.randn(8)}, ValueError, r"\[B, D\]"),
        ({"chunk": 0}, ValueError, "chunk"),
    ],
)
def test_exact_search_rejects_bad_arguments(kwargs, error, match):
    keys, queries = _data(100, 8, 3, seed=1)
    args = {"keys": keys, "queries": queries, "k": 5, **kwargs}
    with pytest.raises(error, match=match):
        search.exact_search(**args)


def test_store_search_flat_and_torch_backend_equal_oracle(flat_store):
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(6, flat_store.query_dim, generator=g)
    dist, tokens = flat_store.search(queries, 12, use_cache=False)
    ref_d, ref_i = _oracle(flat_store.keys, queries, 12)
    assert torch.equal(tokens, flat_store.values[ref_i])
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-4, atol=1e-3)
    flat_store.to("cpu", backend="torch")
    try:
        d2, t2 = flat_store.search(queries, 12, use_cache=False)
    finally:
        flat_store.to("cpu")
    assert torch.equal(t2, tokens)
    torch.testing.assert_close(d2, dist, rtol=1e-4, atol=1e-3)


def test_cache_returns_the_fresh_result_and_counts(flat_store):
    flat_store.clear_cache()
    g = torch.Generator().manual_seed(4)
    queries = torch.randn(5, flat_store.query_dim, generator=g)
    fresh = flat_store.search(queries, 7, use_cache=False)
    assert flat_store.cache_info().hits == 0 and flat_store.cache_info().misses == 0
    first = flat_store.search(queries, 7)
    info = flat_store.cache_info()
    assert (info.hits, info.misses, info.size) == (0, 5, 5)
    # two cached rows and one new one, in one batch
    mixed_q = torch.cat([queries[3:], torch.randn(1, flat_store.query_dim, generator=g)])
    mixed = flat_store.search(mixed_q, 7)
    info = flat_store.cache_info()
    assert (info.hits, info.misses, info.size) == (2, 6, 6)
    again = flat_store.search(queries, 7)
    assert flat_store.cache_info().hits == 7
    for a, b in ((fresh, first), (fresh, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(mixed[1][:2], fresh[1][3:])
    # another k is another entry
    flat_store.search(queries[:1], 3)
    assert flat_store.cache_info().misses == 7
    flat_store.clear_cache()
    assert flat_store.cache_info() == (0, 0, 0, flat_store.cache.maxsize)


def test_cache_is_lru_bounded():
    from sentinel_kernels.knn.cache import KnnCache

    cache = KnnCache(2)
    rows = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    keys = KnnCache.keys_of(rows, 5)
    value = (torch.zeros(5), torch.zeros(5, dtype=torch.long))
    for key in keys:
        assert cache.get(key) is None
        cache.put(key, value)
    assert cache.info().size == 2
    assert cache.get(keys[0]) is None  # evicted first
    assert cache.get(keys[2]) is not None
    with pytest.raises(ValueError, match="cache size"):
        KnnCache(-1)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "b"), [(1, 1), (7, 3), (127, 1), (1000, 7), (100_003, 2)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "matmul-topk"])
def test_cuda_mixed_precision_search_matches_the_fp64_oracle(dtype, n, b, strided, one_pass):
    """The GPU path (keys read in their own dtype, float32 results) against float64: the
    true distances of what it returns equal the oracle's k smallest (swaps only between
    near-ties, which rounding the query to the keys' dtype may cause)."""
    g = torch.Generator().manual_seed(n + b)
    wide = (torch.randn(n, 2 * 576 if strided else 576, generator=g) * 3).to(dtype)
    keys_cpu = wide[:, ::2] if strided else wide
    queries_cpu = keys_cpu[torch.randint(0, n, (b,), generator=g)].float()
    queries_cpu = queries_cpu + torch.randn(b, 576, generator=g)
    keys, queries = keys_cpu.cuda(), queries_cpu.cuda()
    assert search.mixed_matmul_supported(keys), "torch.mm(out_dtype=float32) missing on CUDA"
    k = min(n, 32)
    dist, idx = search.exact_search(keys, queries, k, one_pass=one_pass)
    ref_d, _ = _oracle(keys_cpu, queries_cpu, k)
    idx, dist = idx.cpu(), dist.double().cpu()
    q64, k64 = queries_cpu.double(), keys_cpu.double()[idx]
    true_d = (q64[:, None, :] - k64).pow(2).sum(-1)
    # Rounding the query to the keys' dtype (half an ulp: 2^-11 float16, 2^-8 bfloat16)
    # moves q.k by at most u |q| |k|, so d by 2 u |q| |k|; float32 accumulation of the
    # expanded form adds ~1e-6 (|q|^2 + |k|^2) (bounded here by 1e-5).
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    qn, kn = q64.norm(dim=-1, keepdim=True), k64.norm(dim=-1)
    bound = 2 * u * qn * kn + 1e-5 * (qn**2 + kn**2)
    assert ((dist - true_d).abs() <= bound).all()
    # what it returns are the k nearest up to swaps between near-ties (within 2 bounds)
    slack = 2 * bound.max(dim=-1, keepdim=True).values
    assert ((true_d.sort(-1).values - ref_d).abs() <= slack).all()
    assert (dist[:, 1:] >= dist[:, :-1]).all()


@pytest.mark.parametrize("n", [1, 7, 127, 1000, 2048 + 37])
@pytest.mark.parametrize("rows", [1, 3])
def test_grouped_topk_equals_one_topk(n: int, rows: int) -> None:
    from sentinel_kernels.knn.search import _grouped_topk

    gen = torch.Generator().manual_seed(n * 10 + rows)
    d = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    k = min(32, n)
    v, i = _grouped_topk(d, k)
    v0, i0 = torch.topk(d, k, dim=-1, largest=False)
    assert torch.equal(v, v0)  # random float64: no ties, so the indices match too
    assert torch.equal(i, i0)

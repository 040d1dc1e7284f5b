"""The device IVF-Flat index (``Datastore.to(..., backend="ivf")``): exact when every
list is probed, its recall on clustered data above a floor, fixed shapes and no host
sync (a CUDA graph holds it), and the datastore / kNN-LM paths that use it."""

from __future__ import annotations

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.knn.ivf import DeviceIVF, ivf_options, kmeans

#: recall@10 floor on the clustered data below at the default nprobe (measured 0.99+ on
#: these seeds; the test prints it).
IVF_RECALL_FLOOR = 0.9


def _clustered(n: int, d: int, clusters: int, seed: int, b: int = 40):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 4
    keys = centres[torch.randint(0, clusters, (n,), generator=g)]
    keys = keys + torch.randn(n, d, generator=g)
    queries = centres[torch.randint(0, clusters, (b,), generator=g)]
    queries = queries + torch.randn(b, d, generator=g)
    return keys.half(), queries


def _oracle(keys, queries, k):
    """float64 distances from the query rounded to the keys' dtype (as the index rounds
    it for its dot products), the k smallest per query."""
    d = torch.cdist(queries.to(keys.dtype).double(), keys.double()).pow(2)
    return torch.topk(d, k, dim=-1, largest=False)


def test_layout_is_a_partition_into_capped_pieces():
    keys, _ = _clustered(3000, 16, 30, seed=1)
    ivf = DeviceIVF.build(keys, nlist=20, cap_factor=1.5)
    assert ivf.cap == -(-int(1.5 * 3000) // 20)
    assert int(ivf.lengths.max()) <= ivf.cap and int(ivf.lengths.min()) >= 1
    assert int(ivf.lengths.sum()) == 3000
    assert torch.equal(ivf.starts[1:], (ivf.starts + ivf.lengths)[:-1])
    assert torch.equal(ivf.order.sort().values, torch.arange(3000))
    assert torch.equal(ivf.keys, keys[ivf.order])
    assert ivf.pieces >= 20 - 1  # a cluster may end empty and is dropped


@pytest.mark.parametrize("k", [1, 10, 64])
def test_probing_every_piece_is_the_exact_search(k):
    keys, queries = _clustered(2000, 24, 12, seed=k)
    ivf = DeviceIVF.build(keys, nlist=16)
    ivf.set_nprobe(ivf.pieces)
    dist, idx = ivf.search(queries, k)
    ref_d, ref_i = _oracle(keys, queries, k)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-3)
    # near-ties may swap; the true distance of each returned row equals the returned one
    true = torch.cdist(queries.half().double(), keys.double()).pow(2).gather(1, idx)
    torch.testing.assert_close(true, dist.double(), rtol=1e-5, atol=1e-3)
    assert (idx == ref_i).float().mean() > 0.95


def test_recall_on_clustered_data():
    keys, queries = _clustered(20000, 64, 200, seed=3)
    ivf = DeviceIVF.build(keys)  # defaults: nlist = 4 sqrt(N) = 565, nprobe 32
    _, idx = ivf.search(queries, 10)
    _, ref = _oracle(keys, queries, 10)
    recall = float((idx[:, :, None] == ref[:, None, :]).any(-1).float().mean())
    print(f"device IVF recall@10 {recall:.3f} ({ivf.pieces} pieces, cap {ivf.cap})")
    assert recall >= IVF_RECALL_FLOOR


def test_fewer_probed_keys_than_k_pads_with_inf():
    keys, queries = _clustered(400, 8, 4, seed=4, b=3)
    ivf = DeviceIVF.build(keys, nlist=40, nprobe=1)
    dist, idx = ivf.search(queries, 200)
    assert dist.shape == idx.shape == (3, 200)
    found = torch.isfinite(dist)
    assert (found.sum(-1) <= ivf.cap).all() and (~found).any()
    assert torch.equal(idx < 0, ~found)
    assert (dist[found] >= 0).all()


def test_kmeans_reaches_a_lloyd_fixed_point():
    """After enough iterations every centroid is the mean of the points nearest to it,
    and the inertia is below that of the starting rows."""
    from sentinel_kernels.knn.ivf import _assign

    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [60.0, 60.0]])
    g = torch.Generator().manual_seed(0)
    x = centres.repeat_interleave(50, 0) + torch.randn(200, 2, generator=g)
    got = kmeans(x, 4, iters=30, seed=2)
    a = _assign(x, got)
    for c in range(4):
        torch.testing.assert_close(got[c], x[a == c].mean(0))
    start = kmeans(x, 4, iters=0, seed=2)
    inertia = (x - got[a]).pow(2).sum()
    assert inertia < (x - start[_assign(x, start)]).pow(2).sum()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"nlist": 0}, "nlist"),
        ({"nlist": 101}, "exceeds"),
        ({"nprobe": 0}, "nprobe"),
        ({"cap_factor": 0.5}, "cap_factor"),
        ({"iters": -1}, "iters"),
        ({"bogus": 1}, "unknown ivf option"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ivf_options(100, options)


def test_bad_search_arguments():
    keys, queries = _clustered(300, 8, 3, seed=5)
    ivf = DeviceIVF.build(keys, nlist=10)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        ivf.search(queries[:, :4], 3)
    with pytest.raises(ValueError, match="k must be"):
        ivf.search(queries, 0)
    with pytest.raises(ValueError, match="nprobe"):
        ivf.set_nprobe(0)


def _copy(store):
    """A new datastore over copies of ``store``'s entries (no index built yet)."""
    return sk.knn.Datastore(
        store.keys.clone(),
        store.values.clone(),
        store.successor.clone(),
        "flat",
        {},
        store.identity,
        {},
    )


@pytest.fixture
def float_keys_store(request):
    pytest.importorskip("faiss")  # the datastore fixture builds a FAISS index
    return request.getfixturevalue("flat_store")


def test_datastore_ivf_backend(float_keys_store):
    flat_store = float_keys_store
    store = _copy(flat_store)
    q = store.keys[:5].float() + 0.01
    exact_d, exact_t = store.search(q, 8, use_cache=False)
    store.to("cpu", backend="ivf", nlist=8)
    assert store.backend == "ivf" and store.memory_bytes()["device_ivf"] > 0
    fresh = _copy(flat_store).to("cpu", backend="ivf", nlist=8)
    fresh.search(q, 8, use_cache=False)
    assert fresh.memory_bytes()["index"] == 0  # no exact FAISS index built for it
    store.set_search_params(nprobe=10**6)  # every piece
    d, t = store.search(q, 8, use_cache=False)
    torch.testing.assert_close(d, exact_d, rtol=1e-3, atol=1e-2)
    assert (t == exact_t).float().mean() > 0.9
    with pytest.raises(ValueError, match="device IVF"):
        store.set_search_params(ef_search=3)
    with pytest.raises(ValueError, match="for backend='ivf'"):
        store.to("cpu", backend="torch", nprobe=4)
    store.to("cpu")
    assert store.backend == "faiss" and "device_ivf" not in store.memory_bytes()


def test_knn_lm_perplexity_with_every_piece_probed_equals_exact(model, tok, float_keys_store):
    """kNN-LM perplexity over the IVF backend probing everything equals the exact torch
    backend's (the query rounded to float16 for the dot products: relative 1e-4)."""
    flat_store = float_keys_store
    text = "the quick brown fox jumps over the lazy dog " * 8
    store = _copy(flat_store)
    store.to("cpu", backend="torch")
    exact = sk.eval.perplexity(model, tok, text, knn=store, knn_k=16, knn_lambda=0.5)
    store.to("cpu", backend="ivf", nlist=8, nprobe=10**6)
    approx = sk.eval.perplexity(model, tok, text, knn=store, knn_k=16, knn_lambda=0.5)
    assert abs(approx / exact - 1) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "d"), [(1000, 64), (200_003, 576)])
def test_cuda_ivf_search_in_a_graph(n, d):
    """Built on the GPU, searched in a CUDA graph with no host sync; the replay equals
    the eager search and probing every piece equals the fp64 oracle."""
    keys, queries = _clustered(n, d, 100, seed=n, b=3)
    keys, queries = keys.cuda(), queries.cuda()
    ivf = DeviceIVF.build(keys)
    q = queries.clone()
    eager = ivf.search(q, 32)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            dist, idx = ivf.search(q, 32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.testing.assert_close(dist, eager[0])
    assert torch.equal(idx, eager[1])
    ivf.set_nprobe(ivf.pieces)
    dist, idx = ivf.search(q, 32)
    ref_d, _ = _oracle(keys.cpu(), queries.cpu(), 32)
    torch.testing.assert_close(dist.double().cpu(), ref_d, rtol=1e-4, atol=1e-2)


def test_build_shows_progress_when_asked(capsys):
    keys, _ = _clustered(500, 8, 5, seed=6)
    DeviceIVF.build(keys, nlist=10, iters=3)
    assert "ivf k-means" not in capsys.readouterr().err
    DeviceIVF.build(keys, nlist=10, iters=3, progress=True)
    assert "ivf k-means" in capsys.readouterr().err

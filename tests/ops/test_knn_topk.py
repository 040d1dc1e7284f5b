"""``sentinel::knn_topk``: the k smallest ``|k_i|^2 - 2 q.k_i`` per query.

Oracle: the scores in float64 from the same rounded query (``q`` rounded to the keys'
dtype) and the same ``|k_i|^2``. The op sums D float32 products in its own order, so a
score may differ from the fp64 one by about ``D * 2**-24 * sum_d |q_d k_d|`` (plus the
rounding of the norm term); the check allows 8x that. Near-ties can then swap neighbours,
so the test checks values, not positions: every returned index's fp64 score equals the
returned score, and the returned scores equal the fp64 k smallest, both within that
tolerance, ascending, with distinct indices. Outputs are NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels.knn.search import squared_norms


def _data(n: int, d: int, b: int, dtype: torch.dtype, device: str, seed: int):
    # drawn on the device: a million-key store made on the host and copied over costs
    # seconds of host time per test (and the GPU run shares its host between 14 workers)
    g = torch.Generator(device=device).manual_seed(seed)
    # strided keys (a column slice of a wider store) and queries (every other row)
    keys = (torch.randn(n, d + 5, generator=g, device=device) * 3).to(dtype)[:, 2 : 2 + d]
    queries = (torch.randn(2 * b, d, generator=g, device=device) * 3)[::2]
    return keys, queries


def _check(scores, idx, queries, keys, norms, k):
    # the float64 oracle on the keys' device (a GPU's float64 GEMM, not the host's)
    q = queries.to(keys.dtype).double()
    kd = keys.double()
    n64 = norms.double()[None, :]
    s64 = n64 - 2.0 * q @ kd.t()
    scale = n64 + 2.0 * (q.abs() @ kd.abs_().t())
    del kd
    tol = 8 * keys.shape[1] * 2.0**-24 * scale.max().item() + 1e-6
    s64 = s64.cpu()
    scores, idx = scores.double().cpu(), idx.cpu()
    assert scores.shape == idx.shape == (queries.shape[0], k)
    assert torch.isfinite(scores).all()
    assert (idx >= 0).all() and (idx < keys.shape[0]).all()
    assert all(len(set(r.tolist())) == k for r in idx), "an index returned twice"
    assert (scores[:, 1:] >= scores[:, :-1]).all(), "not ascending"
    assert (s64.gather(1, idx) - scores).abs().max().item() <= tol
    best = torch.topk(s64, k, dim=-1, largest=False).values
    assert (best - scores).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("n", "d", "b", "k"),
    [
        (1, 5, 1, 1),
        (7, 64, 3, 7),
        (127, 130, 2, 32),
        (1000, 64, 1, 64),
        (2500, 24, 3, 33),
        (300, 16, 20, 5),  # two blocks of queries
    ],
)
def test_knn_topk_matches_fp64(ref_triton_backend: Backend, dtype, n, d, b, k):
    skip_interpreted_bf16(ref_triton_backend, dtype)
    keys, queries = _data(n, d, b, dtype, ref_triton_backend.device, seed=n + d)
    norms = squared_norms(keys)
    for q in (queries, queries.to(dtype)):
        scores, idx = sk.ops.knn_topk(q, keys, norms, k)
        assert scores.dtype == torch.float32 and idx.dtype == torch.int64
        _check(scores, idx, q, keys, norms, k)


def test_knn_topk_ties(ref_triton_backend: Backend):
    # 40 identical keys and one nearer: the nearest first, then 4 of the copies (which
    # ones among equal scores is not specified, as with torch.topk)
    dev = ref_triton_backend.device
    keys = torch.full((41, 16), 2.0, dtype=torch.float16, device=dev)
    keys[17] = 1
    q = torch.ones(1, 16, device=dev)
    scores, idx = sk.ops.knn_topk(q, keys, squared_norms(keys), 5)
    idx = idx.cpu().tolist()[0]
    assert idx[0] == 17 and len(set(idx)) == 5 and 17 not in idx[1:]
    assert scores.cpu().tolist()[0] == [16.0 - 32.0] + [64.0 - 64.0] * 4


def test_exact_search_one_pass_equals_the_matmul_path():
    # exact_search(one_pass=True) runs the op (the query rounded to the keys' float16,
    # as on the GPU's mixed path): neighbours and distances of the float32 path up to
    # that rounding (relative 2**-11 of the query)
    from sentinel_kernels.knn import search

    keys, queries = _data(900, 32, 4, torch.float16, "cpu", seed=3)
    d1, i1 = search.exact_search(keys, queries, 16, one_pass=True)
    d0, i0 = search.exact_search(keys, queries, 16, one_pass=False)
    torch.testing.assert_close(d1, d0, rtol=2e-3, atol=1e-2)
    assert (i1 == i0).float().mean() > 0.9
    with pytest.raises(ValueError, match="k <= 64"):
        search.exact_search(keys, queries, 65, one_pass=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "k must be"),
        ({"k": 65}, ValueError, "k must be"),
        ({"k": 10}, ValueError, "k must be"),  # more than N = 9 keys
        ({"k": True}, ValueError, "k must be"),
        ({"queries": torch.randn(3, 7)}, ValueError, "do not fit"),
        ({"queries": torch.randn(8)}, ValueError, r"\[B, D\]"),
        ({"queries": torch.randn(3, 8).double()}, TypeError, "dtype"),
        ({"queries": torch.randn(3, 8).bfloat16()}, TypeError, "keys' dtype"),
        ({"keys": torch.randint(0, 3, (9, 8))}, TypeError, "dtype"),
        ({"key_sqnorms": torch.ones(9).half()}, TypeError, "dtype"),
        ({"key_sqnorms": torch.ones(8)}, ValueError, "do not fit"),
        ({"keys": [[1.0]]}, TypeError, "torch.Tensor"),
    ],
)
def test_knn_topk_bad_inputs(kwargs, error, match):
    keys = torch.randn(9, 8).half()
    args = {"queries": torch.randn(3, 8), "keys": keys, "key_sqnorms": squared_norms(keys), "k": 4}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sk.ops.knn_topk(**args)


def test_knn_topk_opcheck():
    keys = torch.randn(20, 8).half()
    torch.library.opcheck(
        torch.ops.sentinel.knn_topk.default, (torch.randn(2, 8), keys, squared_norms(keys), 3)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("n", [100_000, 1_000_003])
@pytest.mark.parametrize("d", [128, 576])
def test_cuda_knn_topk_in_a_graph_matches_fp64(n, d):
    """Datastore sizes on the GPU, captured once and replayed on new queries."""
    keys, queries = _data(n, d, 1, torch.float16, "cuda", seed=7)
    norms = squared_norms(keys)
    q = queries.clone()
    sk.ops.knn_topk(q, keys, norms, 32)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scores, idx = sk.ops.knn_topk(q, keys, norms, 32)
    for seed in range(3):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).cuda() * 3)
        graph.replay()
        _check(scores, idx, q, keys, norms, 32)


def test_knn_topk_retries_smaller_tiles_when_refused(ref_triton_backend: Backend, monkeypatch):
    """A launch the compiler refuses for shared memory (float32 keys on the H200 at the
    first tiles) is retried with the next tiles, which then serve that shape's later
    calls; the result is still the exact one."""
    if ref_triton_backend.name != "triton":
        pytest.skip("the Triton kernel's launch")
    from triton.runtime.errors import OutOfResources

    from sentinel_kernels.kernels import knn as kk

    real = kk._knn_chunk_topk_kernel
    tried: list[int] = []

    class Refusing:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                tried.append(kwargs["BLOCK_N"])
                if kwargs["BLOCK_N"] == kk.TILES[0][0]:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(kk, "_knn_chunk_topk_kernel", Refusing())
    monkeypatch.setattr(kk, "_tile_memo", {})
    keys, queries = _data(1300, 40, 2, torch.float32, ref_triton_backend.device, seed=5)
    norms = squared_norms(keys)
    for _ in range(2):
        scores, idx = sk.ops.knn_topk(queries, keys, norms, 9)
        _check(scores, idx, queries, keys, norms, 9)
    first_fit = next(i for i, t in enumerate(kk.TILES) if t[0] != kk.TILES[0][0])
    assert tried == [kk.TILES[0][0]] * first_fit + [kk.TILES[first_fit][0]] * 2

"""``sentinel::ivf_scores``: scores of the keys in each query's probed inverted lists.

Oracle: float64 scores ``|k_i|^2 - 2 q.k_i`` of the same rounded query (``q`` rounded to
the keys' dtype) over the rows each probed list holds, ``+inf`` in the slots past a
list's end. The op sums ``D`` float32 products in its own order: a score may differ from
the fp64 one by about ``D * 2**-24 * sum_d |q_d k_d|`` plus the norm term's rounding; the
check allows 8x that. Outputs are NaN-poisoned by the backend fixture.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels.knn.search import squared_norms


def _lists(n: int, pieces: int, cap: int, seed: int):
    """Random list tables over ``n`` rows: ``pieces`` consecutive lists of 0..cap rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cap + 1, (pieces,), generator=g)
    lengths[0] = min(cap, n)  # at least one non-empty list
    while int(lengths.sum()) > n:
        lengths = lengths // 2
    starts = torch.cumsum(lengths, 0) - lengths
    return starts, lengths


def _oracle(queries, keys, norms, starts, lengths, probes, cap):
    q = queries.to(keys.dtype).double().cpu()
    kd = keys.double().cpu()
    b, nprobe = probes.shape
    out = torch.full((b, nprobe * cap), torch.inf, dtype=torch.float64)
    scale = torch.zeros(b, nprobe * cap, dtype=torch.float64)
    for i in range(b):
        for j in range(nprobe):
            p = int(probes[i, j])
            s, ln = int(starts[p]), int(lengths[p])
            rows = kd[s : s + ln]
            out[i, j * cap : j * cap + ln] = norms.double().cpu()[s : s + ln] - 2 * rows @ q[i]
            scale[i, j * cap : j * cap + ln] = norms.double().cpu()[s : s + ln] + 2 * (
                rows.abs() @ q[i].abs()
            )
    return out, scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("n", "d", "b", "pieces", "nprobe", "cap"),
    [
        (1, 5, 1, 1, 1, 1),
        (7, 64, 3, 3, 2, 7),
        (127, 130, 2, 9, 4, 31),
        (1000, 64, 1, 40, 7, 127),
        (2500, 24, 5, 100, 12, 300),  # cap > the kernel's block: several programs per list
    ],
)
def test_ivf_scores_matches_fp64(ref_triton_backend: Backend, dtype, n, d, b, pieces, nprobe, cap):
    skip_interpreted_bf16(ref_triton_backend, dtype)
    dev = ref_triton_backend.device
    g = torch.Generator().manual_seed(n + d)
    # strided keys (a column slice of a wider store) and queries (every other row)
    keys = (torch.randn(n, d + 3, generator=g) * 3).to(dtype)[:, 1 : 1 + d].to(dev)
    queries = (torch.randn(2 * b, d, generator=g) * 3)[::2].to(dev)
    norms = squared_norms(keys)
    starts, lengths = _lists(n, pieces, cap, seed=n)
    probes = torch.randint(0, pieces, (b, nprobe), generator=g)
    want, scale = _oracle(queries, keys, norms, starts, lengths, probes, cap)
    for q in (queries, queries.to(dtype)):
        got = sk.ops.ivf_scores(
            q, keys, norms, starts.to(dev), lengths.to(dev), probes.to(dev), cap
        )
        assert got.dtype == torch.float32 and got.shape == (b, nprobe * cap)
        got = got.double().cpu()
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf), "+inf exactly in the slots past a list"
        assert (got[inf] > 0).all()
        tol = 8 * d * 2.0**-24 * scale + 1e-6
        assert ((got - want).abs()[~inf] <= tol[~inf]).all()


def test_ivf_scores_bad_tables_stay_in_bounds(ref_triton_backend: Backend):
    """Out-of-range probes and lengths are the caller's error (the op cannot read the
    tables without a host sync); the Triton kernel clamps them: finite or inf scores,
    no fault. (The reference indexes with them and raises instead.)"""
    if ref_triton_backend.name != "triton":
        pytest.skip("the Triton kernel's clamping")
    dev = ref_triton_backend.device
    keys = torch.randn(20, 16).half().to(dev)
    norms = squared_norms(keys)
    starts = torch.tensor([0, 10], device=dev)
    lengths = torch.tensor([10, 50], device=dev)  # the second list runs past N
    probes = torch.tensor([[1, 7, -3]], device=dev)
    q = torch.randn(1, 16, device=dev)
    out = sk.ops.ivf_scores(q, keys, norms, starts, lengths, probes, 16)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cap": 0}, ValueError, "cap must be"),
        ({"cap": True}, ValueError, "cap must be"),
        ({"queries": torch.randn(2, 7)}, ValueError, "do not fit"),
        ({"queries": torch.randn(8)}, ValueError, r"\[B, D\]"),
        ({"queries": torch.randn(3, 8)}, ValueError, "probes has 2 rows"),
        ({"queries": torch.randn(2, 8).double()}, TypeError, "dtype"),
        ({"queries": torch.randn(2, 8).bfloat16()}, TypeError, "keys' dtype"),
        ({"starts": torch.tensor([0, 4], dtype=torch.int32)}, TypeError, "dtype"),
        ({"lengths": torch.tensor([4])}, ValueError, "starts and lengths"),
        ({"probes": torch.tensor([0, 1])}, ValueError, r"\[B, nprobe\]"),
        ({"key_sqnorms": torch.ones(8)}, ValueError, "do not fit"),
        ({"keys": [[1.0]]}, TypeError, "torch.Tensor"),
    ],
)
def test_ivf_scores_bad_inputs(kwargs, error, match):
    keys = torch.randn(9, 8).half()
    args = {
        "queries": torch.randn(2, 8),
        "keys": keys,
        "key_sqnorms": squared_norms(keys),
        "starts": torch.tensor([0, 4]),
        "lengths": torch.tensor([4, 5]),
        "probes": torch.tensor([[0, 1], [1, 1]]),
        "cap": 5,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sk.ops.ivf_scores(**args)


def test_ivf_scores_opcheck():
    keys = torch.randn(20, 8).half()
    torch.library.opcheck(
        torch.ops.sentinel.ivf_scores.default,
        (
            torch.randn(2, 8),
            keys,
            squared_norms(keys),
            torch.tensor([0, 12]),
            torch.tensor([12, 8]),
            torch.tensor([[1], [0]]),
            12,
        ),
    )

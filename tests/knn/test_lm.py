"""kNN-LM arithmetic (sentinel_kernels.knn.lm) against plain PyTorch/Python references."""

from __future__ import annotations

import math

import pytest
import torch

from sentinel_kernels.knn import lm


def _reference_knn_probs(dist, tokens, vocab, temperature):
    """p_kNN as the paper writes it: softmax(-d / T) over valid neighbours, summed per
    token, in float64 with a Python loop."""
    out = torch.zeros(dist.shape[0], vocab, dtype=torch.float64)
    for r in range(dist.shape[0]):
        ok = [j for j in range(dist.shape[1]) if tokens[r, j] >= 0 and math.isfinite(dist[r, j])]
        if not ok:
            continue
        w = torch.softmax(torch.tensor([-float(dist[r, j]) / temperature for j in ok]), 0)
        for wj, j in zip(w.tolist(), ok, strict=True):
            out[r, int(tokens[r, j])] += wj
    return out


def _random_neighbours(b, k, vocab, seed, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    dist = (torch.rand(b, k, generator=g) * scale).sort(-1).values
    tokens = torch.randint(0, vocab, (b, k), generator=g)  # repeats: aggregation matters
    return dist, tokens


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_knn_log_probs_sum_to_one_and_match_reference(temperature):
    dist, tokens = _random_neighbours(5, 16, 11, seed=1)
    logp = lm.knn_log_probs(dist, tokens, 11, temperature)
    assert logp.dtype == torch.float32 and logp.shape == (5, 11)
    torch.testing.assert_close(logp.exp().sum(-1).double(), torch.ones(5, dtype=torch.float64))
    ref = _reference_knn_probs(dist, tokens, 11, temperature)
    torch.testing.assert_close(logp.exp().double(), ref, atol=1e-6, rtol=1e-5)


def test_knn_log_probs_skip_missing_neighbours():
    dist, tokens = _random_neighbours(3, 6, 9, seed=2)
    tokens[0, 3:] = -1
    dist[0, 3:] = math.inf
    tokens[1, 0] = -1  # a missing one first; token 0 must get no weight from it
    logp = lm.knn_log_probs(dist, tokens, 9, 1.0)
    ref = _reference_knn_probs(dist, tokens, 9, 1.0)
    torch.testing.assert_close(logp.exp().double(), ref, atol=1e-6, rtol=1e-5)
    assert not torch.isnan(logp).any()


def test_row_without_neighbours_falls_back_to_the_lm():
    dist = torch.full((2, 4), math.inf)
    tokens = torch.full((2, 4), -1)
    dist[1], tokens[1] = torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.tensor([1, 2, 1, 0])
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    knn_logp = lm.knn_log_probs(dist, tokens, 5, 1.0)
    assert torch.isneginf(knn_logp[0]).all()
    mixed = lm.interpolate(logits, knn_logp, 0.5)
    torch.testing.assert_close(mixed[0], torch.log_softmax(logits[0], -1))
    assert not torch.isnan(mixed).any()


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.7, 1.0])
def test_interpolate_matches_reference_and_normalises(lam):
    vocab = 13
    dist, tokens = _random_neighbours(4, 8, vocab, seed=4)
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5)) * 3
    mixed = lm.interpolate(logits, lm.knn_log_probs(dist, tokens, vocab, 2.0), lam)
    ref = lam * _reference_knn_probs(dist, tokens, vocab, 2.0) + (1 - lam) * torch.softmax(
        logits.double(), -1
    )
    torch.testing.assert_close(mixed.exp().double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed.exp().sum(-1).double(), torch.ones(4, dtype=torch.float64))


def test_lambda_zero_is_the_lm_bit_for_bit():
    dist, tokens = _random_neighbours(3, 8, 17, seed=6)
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(7))
    mixed = lm.interpolate(logits, lm.knn_log_probs(dist, tokens, 17, 1.0), 0.0)
    assert torch.equal(mixed, torch.log_softmax(logits, -1))


def _neighbours_with_gaps(b, k, vocab, seed):
    dist, tokens = _random_neighbours(b, k, vocab, seed)
    g = torch.Generator().manual_seed(seed + 100)
    gone = torch.rand(b, k, generator=g) < 0.2
    tokens[gone] = -1  # FAISS found fewer
    dist[torch.rand(b, k, generator=g) < 0.1] = math.inf
    tokens[0], dist[0] = -1, math.inf  # a row without any neighbour
    return dist, tokens


@pytest.mark.parametrize("pairwise", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
@pytest.mark.parametrize(("b", "k", "vocab"), [(1, 1, 7), (4, 7, 13), (3, 32, 5), (2, 127, 1000)])
def test_mix_log_probs_equals_the_two_step_form(monkeypatch, pairwise, lam, b, k, vocab):
    dist, tokens = _neighbours_with_gaps(b, k, vocab, seed=b * k)
    if b > 1:
        tokens[1, 0] = 0  # a valid token 0 next to invalid (clamped to 0) neighbours
        dist[1, 0] = 0.1
    logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(k)) * 4
    monkeypatch.setattr(lm, "PAIRWISE_LIMIT", 1 << 30 if pairwise else 0)
    out = lm.mix_log_probs(logits, dist, tokens, lam, 1.5)
    want = lm.interpolate(logits, lm.knn_log_probs(dist, tokens, vocab, 1.5), lam)
    assert out.dtype == torch.float32 and out.shape == (b, vocab)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # against the float64 definition, and each row sums to 1
    ref = lam * _reference_knn_probs(dist, tokens, vocab, 1.5) + (1 - lam) * torch.softmax(
        logits.double(), -1
    )
    empty = (tokens < 0) | torch.isinf(dist)
    for r in range(b):
        if empty[r].all():
            ref[r] = torch.softmax(logits[r].double(), -1)
    torch.testing.assert_close(out.exp().double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(-1).double(), torch.ones(b, dtype=torch.float64))
    if lam == 0.0:
        assert torch.equal(out, torch.log_softmax(logits, -1))
    # the row without neighbours is the LM's distribution, whatever lambda
    torch.testing.assert_close(out[0], torch.log_softmax(logits[0], -1))


def test_mix_log_probs_bf16_logits_and_strided_inputs():
    dist, tokens = _neighbours_with_gaps(6, 9, 50, seed=3)
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(4)).bfloat16().t()
    assert not logits.is_contiguous()
    out = lm.mix_log_probs(logits, dist.t().contiguous().t(), tokens, 0.4, 0.8)
    want = lm.interpolate(logits, lm.knn_log_probs(dist, tokens, 50, 0.8), 0.4)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


class _FakeStore:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def neighbours(self, *a, **kw):
        raise AssertionError("not called")

    def check_model(self, model):
        pass


@pytest.mark.parametrize(
    ("k", "lam", "temperature", "match"),
    [
        (0, 0.25, 1.0, "knn_k"),
        (11, 0.25, 1.0, "knn_k"),
        (2.0, 0.25, 1.0, "knn_k"),
        (True, 0.25, 1.0, "knn_k"),
        (4, -0.1, 1.0, "knn_lambda"),
        (4, 1.5, 1.0, "knn_lambda"),
        (4, "0.5", 1.0, "knn_lambda"),
        (4, 0.25, 0.0, "knn_temperature"),
        (4, 0.25, -1.0, "knn_temperature"),
        (4, 0.25, math.inf, "knn_temperature"),
    ],
)
def test_bad_knn_arguments(k, lam, temperature, match):
    with pytest.raises(ValueError, match=match):
        lm.check_knn_args(_FakeStore(10), k, lam, temperature)


def test_not_a_datastore():
    with pytest.raises(TypeError, match="Datastore"):
        lm.check_knn_args(object(), 4, 0.25, 1.0)


def test_faiss_loads_only_with_a_faiss_index():
    from helpers import run_python

    code = (
        "import sys, numpy as np, sentinel_kernels as sk\n"
        "sk.generate, sk.eval.perplexity, sk.knn.KnnScorer, sk.knn.Datastore\n"
        "assert 'faiss' not in sys.modules, 'faiss imported early'\n"
        "assert 'knn' in dir(sk) and 'Datastore' in dir(sk.knn)\n"
        "from sentinel_kernels.knn import index\n"
        "index.build_index('flat', np.random.rand(64, 8).astype('float32'), {})\n"
        "assert 'faiss' in sys.modules\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr

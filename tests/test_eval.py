"""sentinel_kernels.eval.perplexity, checked against independent computations."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ByteTokenizer, needs_smollm2
from helpers import random_text as _text
from torch import nn

from sentinel_kernels import eval as sk_eval
from sentinel_kernels import models

WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"
EXCERPT = Path(sk_eval.__file__).resolve().parent / "data" / "excerpt.txt"


class BigramLM(nn.Module):
    """A model whose prediction at a position depends only on the token there, so a token's
    NLL does not depend on how much context its window gives it."""

    def __init__(self, vocab: int = 256) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.table.weight.copy_(
                torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
            )

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table(input_ids))


def _bigram_nll(model: BigramLM, ids: list[int]) -> torch.Tensor:
    """NLL of token t given token t-1, for t = 1 .. n-1 (index t-1 of the result)."""
    logp = torch.log_softmax(model.table.weight.double(), dim=-1)
    prev, nxt = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    return -logp[prev, nxt]


# --------------------------------------------------------------------------------------
# against HF's own loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_single_window_equals_exp_hf_loss(arch):
    model = models.tiny(arch)
    text = _text(50)
    ppl = sk_eval.perplexity(model, ByteTokenizer(), text, window=64, progress=False)
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss  # HF shifts labels itself
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert 100 < ppl < 1000  # a random vocab-256 model is close to uniform (PPL ~ 256)


def test_windows_combine_as_token_weighted_mean_of_hf_losses():
    model = models.tiny("llama")
    text = _text(100, seed=1)
    ids = list(text.encode())
    # Windows [0,32) [32,64) [64,96) [96,100): 31 + 31 + 31 + 3 predicted tokens.
    total, count = 0.0, 0
    for begin in range(0, 100, 32):
        x = torch.tensor([ids[begin : begin + 32]])
        with torch.no_grad():
            loss = model(x, labels=x).loss.item()
        total += loss * (x.shape[1] - 1)
        count += x.shape[1] - 1
    ppl = sk_eval.perplexity(model, ByteTokenizer(), text, window=32, progress=False)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


# --------------------------------------------------------------------------------------
# which tokens are scored (context-free model)
# --------------------------------------------------------------------------------------


def test_non_overlapping_windows_skip_each_window_start():
    model = BigramLM()
    text = _text(100, seed=2)
    nll = _bigram_nll(model, list(text.encode()))  # nll[t-1] is token t's NLL
    scored = [t for t in range(1, 100) if t % 16 != 0]
    expected = math.exp(nll[[t - 1 for t in scored]].mean().item())
    got = sk_eval.perplexity(model, ByteTokenizer(), text, window=16, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    # max_windows=3 scores only tokens 1..47 (minus 16 and 32).
    first3 = [t for t in scored if t < 48]
    expected3 = math.exp(nll[[t - 1 for t in first3]].mean().item())
    got3 = sk_eval.perplexity(
        model, ByteTokenizer(), text, window=16, max_windows=3, progress=False
    )
    assert got3 == pytest.approx(expected3, rel=1e-6)
    assert got3 != pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("stride", [1, 5, 8, 15])
def test_overlapping_windows_score_every_token_once(stride):
    model = BigramLM()
    text = _text(77, seed=3)
    nll = _bigram_nll(model, list(text.encode()))
    expected = math.exp(nll.mean().item())  # all tokens 1..76, once each
    got = sk_eval.perplexity(model, ByteTokenizer(), text, window=16, stride=stride, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)


def test_runs_on_the_given_device_and_restores_training_mode():
    model = models.tiny("gpt2")
    text = _text(40)
    ref = sk_eval.perplexity(model, ByteTokenizer(), text, window=16, progress=False)
    model.train()
    got = sk_eval.perplexity(model, ByteTokenizer(), text, window=16, device="cpu", progress=False)
    assert model.training  # restored
    assert got == ref  # and dropout was off during the evaluation


def test_progress_bar(capsys):
    model = BigramLM()
    sk_eval.perplexity(model, ByteTokenizer(), _text(40), window=16, progress=False)
    assert "perplexity" not in capsys.readouterr().err
    sk_eval.perplexity(model, ByteTokenizer(), _text(40), window=16, progress=True)
    assert "perplexity" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(text=""), "empty"),
        (dict(text=" \n\t"), "empty"),
        (dict(text="x"), "at least 2"),
        (dict(window=1), "window must be >= 2"),
        (dict(stride=0), "stride"),
        (dict(window=8, stride=9), "stride"),
        (dict(max_windows=0), "max_windows"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(text=_text(20), window=8, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        sk_eval.perplexity(BigramLM(), ByteTokenizer(), **args)


@pytest.mark.parametrize("kwargs", [dict(chunk=32), dict(cache="int8")])
def test_chunked_cache_evaluation_needs_sentinel_attention(kwargs):
    # A model whose attention does not go through transformers' interface cannot read a
    # compressed cache: a clear error, not a silent dense evaluation. (Chunked evaluation
    # of real models is tested in tests/cache/test_kv_cache.py.)
    with pytest.raises(NotImplementedError, match="needs the sentinel attention"):
        sk_eval.perplexity(BigramLM(), ByteTokenizer(), _text(20), window=8, **kwargs)


# --------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------


@pytest.mark.model
@needs_smollm2
def test_smollm2_tokenisation_adds_no_special_tokens():
    _, tok = models.load_smollm2()
    ids = sk_eval.token_ids(tok, "Hello world")
    assert ids.dtype == torch.long
    assert set(ids.tolist()).isdisjoint(tok.all_special_ids)
    assert tok.decode(ids) == "Hello world"


@pytest.mark.model
@needs_smollm2
def test_smollm2_excerpt_window_equals_exp_hf_loss():
    model, tok = models.load_smollm2()
    text = EXCERPT.read_text(encoding="utf-8")
    n_tokens = len(sk_eval.token_ids(tok, text))
    assert 2000 <= n_tokens <= 4000
    ppl = sk_eval.perplexity(model, tok, text, window=256, max_windows=1, progress=False)
    x = sk_eval.token_ids(tok, text)[:256].unsqueeze(0)
    with torch.no_grad():
        loss = model(x, labels=x).loss
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert 3 < ppl < 60  # a trained 135M model on Wikipedia text


@pytest.mark.model
@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not (WIKITEXT2 / "test.txt").exists(), reason="wikitext-2 test split absent")
def test_smollm2_reference_perplexity():
    """The design's reference number: fp32, first 40 windows of 1024 tokens -> 21.38."""
    model, tok = models.load_smollm2(dtype=torch.float32)
    text = (WIKITEXT2 / "test.txt").read_text(encoding="utf-8")
    start = time.perf_counter()
    ppl = sk_eval.perplexity(model, tok, text, window=1024, max_windows=40, progress=False)
    print(f"SmolLM2 fp32 wikitext-2 PPL {ppl:.4f} in {time.perf_counter() - start:.0f} s")
    assert ppl == pytest.approx(21.38, abs=0.01)


# --------------------------------------------------------------------------------------
# kNN-LM (knn=...)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def knn_setup():
    from helpers import tiny_model

    import sentinel_kernels as sk

    model = tiny_model()
    tok = ByteTokenizer()
    store_text = _text(1500, 31)
    store = sk.knn.Datastore.build(model, tok, store_text, index="flat", progress=False, window=96)
    return model, tok, store, store_text


def _knn_reference_ppl(model, tok, store, text, window, k, lam, temperature):
    """Non-overlapping windows; per position the LM head's input, a float64 brute-force
    search and the mixture lam * p_kNN + (1 - lam) * p_LM, all in float64."""
    ids = torch.tensor(tok(text)["input_ids"])
    head = model.get_output_embeddings()
    nll, count = 0.0, 0
    for begin in range(0, len(ids), window):
        x = ids[begin : begin + window][None]
        if x.shape[1] < 2:
            break
        caught: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda m, a, out=caught: out.append(a[0]))
        try:
            with torch.inference_mode():
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].double()
        finally:
            handle.remove()
        q = caught[0][0, :-1].double()
        dist, idx = torch.cdist(q, store.keys.double()).pow(2).topk(k, largest=False)
        w = torch.softmax(-dist / temperature, -1)
        p_knn = torch.zeros_like(logits).scatter_add(-1, store.values[idx], w)
        p = lam * p_knn + (1 - lam) * torch.softmax(logits, -1)
        nll -= float(p.gather(-1, x[0, 1:, None]).log().sum())
        count += x.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("stride", [None, 40])
def test_knn_lambda_zero_is_the_plain_perplexity(knn_setup, stride):
    model, tok, store, _ = knn_setup
    text = _text(500, 32)
    kw = {"window": 64, "stride": stride, "progress": False}
    plain = sk_eval.perplexity(model, tok, text, **kw)
    assert sk_eval.perplexity(model, tok, text, knn=store, knn_lambda=0.0, **kw) == plain


@pytest.mark.parametrize(("k", "lam", "temperature"), [(8, 0.5, 2.0), (64, 0.25, 10.0)])
def test_knn_perplexity_equals_reference(knn_setup, k, lam, temperature):
    model, tok, store, _ = knn_setup
    text = _text(400, 33)
    got = sk_eval.perplexity(
        model,
        tok,
        text,
        window=64,
        progress=False,
        knn=store,
        knn_k=k,
        knn_lambda=lam,
        knn_temperature=temperature,
    )
    ref = _knn_reference_ppl(model, tok, store, text, 64, k, lam, temperature)
    assert got == pytest.approx(ref, rel=1e-5)


def test_knn_with_chunked_cache_equals_one_pass(knn_setup):
    model, tok, store, _ = knn_setup
    text = _text(300, 34)
    kw = {"window": 64, "progress": False, "knn": store, "knn_k": 16, "knn_lambda": 0.5}
    one = sk_eval.perplexity(model, tok, text, **kw)
    chunked = sk_eval.perplexity(model, tok, text, chunk=16, cache="dense", **kw)
    assert chunked == pytest.approx(one, rel=1e-4)


def test_knn_lowers_perplexity_of_the_datastore_text(knn_setup):
    model, tok, store, store_text = knn_setup
    text = store_text[:400]
    plain = sk_eval.perplexity(model, tok, text, window=96, progress=False)
    knn = sk_eval.perplexity(
        model, tok, text, window=96, progress=False, knn=store, knn_k=4, knn_lambda=0.5
    )
    assert knn < plain / 1.5  # every true next token is a neighbour at distance ~0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"knn_k": 0}, ValueError, "knn_k"),
        ({"knn_k": 10**7}, ValueError, "knn_k"),
        ({"knn_lambda": -0.5}, ValueError, "knn_lambda"),
        ({"knn_temperature": -1.0}, ValueError, "knn_temperature"),
        ({"knn": object()}, TypeError, "Datastore"),
    ],
)
def test_knn_bad_arguments(knn_setup, kwargs, error, match):
    model, tok, store, _ = knn_setup
    args = {"knn": store, **kwargs}
    with pytest.raises(error, match=match):
        sk_eval.perplexity(model, tok, _text(100, 35), window=32, progress=False, **args)

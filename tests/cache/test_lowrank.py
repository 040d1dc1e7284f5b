"""Low-rank KV bases (``sk.quant.calibrate_lowrank``) and the ``"lowrank:r"`` cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ByteTokenizer, feed_in_pieces, random_ids, rel_error
from helpers import random_text as _text

from sentinel_kernels import cache as kvc
from sentinel_kernels import models
from sentinel_kernels.hf_compat import cache_kwargs
from sentinel_kernels.prune.masks import set_head_mask
from sentinel_kernels.quant.lowrank import (
    LOWRANK_ATTR,
    LowRankBases,
    calibrate_lowrank,
    get_lowrank_bases,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def calibrated():
    """A tiny llama (sentinel attention) with bases from 6 x 128 tokens of text."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = models.tiny("llama", attn_implementation="sentinel")
        bases = calibrate_lowrank(
            model, ByteTokenizer(), _text(2000), n_samples=6, max_length=128, progress=False
        )
    return model, bases


def test_bases_are_the_pca_of_the_cached_keys(calibrated):
    model, bases = calibrated
    assert get_lowrank_bases(model) is bases
    assert bases.num_layers == 2 and bases.n_tokens == 6 * 128
    # Independent statistics of the same keys/values.
    text = _text(2000).encode()
    ids = [list(text[i : i + 128]) for i in range(0, 6 * 128, 128)]
    ks: list[list[torch.Tensor]] = [[], []]
    vs: list[list[torch.Tensor]] = [[], []]
    with torch.inference_mode():
        for seq in ids:
            cache = transformers.DynamicCache()
            model(input_ids=torch.tensor([seq]), **cache_kwargs(model, cache), use_cache=True)
            for i in range(2):
                ks[i].append(cache.layers[i].keys[0].double())
                vs[i].append(cache.layers[i].values[0].double())
    for i in range(2):
        for xs, basis, mean, eig in (
            (ks[i], bases.k_basis[i], bases.k_mean[i], bases.k_eigenvalues[i]),
            (vs[i], bases.v_basis[i], bases.v_mean[i], bases.v_eigenvalues[i]),
        ):
            x = torch.cat(xs, dim=1)  # [Hkv, N, D]
            mu = x.mean(1)
            cov = torch.einsum("hnd,hne->hde", x - mu[:, None], x - mu[:, None]) / x.shape[1]
            assert rel_error(mean, mu) < 1e-5
            assert torch.all(eig[:, :-1] >= eig[:, 1:])  # descending
            b64 = basis.double()
            eye = torch.eye(basis.shape[-1], dtype=torch.float64).expand_as(b64)
            assert rel_error(b64.transpose(1, 2) @ b64, eye) < 1e-5  # orthonormal
            # P^T C P is diagonal with the eigenvalues.
            rot = b64.transpose(1, 2) @ cov @ b64
            assert rel_error(rot, torch.diag_embed(eig.double())) < 1e-4
    k_frac, v_frac = bases.explained_variance(8)
    assert k_frac.shape == (2, 2) and torch.all((k_frac > 0.5) & (k_frac <= 1.0))
    assert torch.allclose(bases.explained_variance(16)[0], torch.ones(2, 2))


def test_full_rank_equals_dense(cpu_backend, calibrated):
    model, _ = calibrated
    ids = random_ids(1, 110, seed=1)
    cuts = [20, 21, 28, 110]  # prefill, a step, 7, 82 (> 64: pieces)
    dense = feed_in_pieces(model, ids, kvc.kv_cache(model, "dense", max_cache_len=110), cuts)
    full = feed_in_pieces(model, ids, kvc.kv_cache(model, "lowrank:16", max_cache_len=110), cuts)
    assert rel_error(full, dense) < 1e-5


def test_lower_rank_degrades_gracefully(cpu_backend, calibrated):
    model, _ = calibrated
    ids = random_ids(1, 60, seed=2)
    cuts = [20, 21, 22, 40, 60]
    dense = feed_in_pieces(model, ids, kvc.kv_cache(model, "dense", max_cache_len=60), cuts)
    errs = []
    for r in (14, 8, 2):
        got = feed_in_pieces(
            model, ids, kvc.kv_cache(model, f"lowrank:{r}", max_cache_len=60), cuts
        )
        assert torch.isfinite(got).all()
        assert rel_error(got[:, :20], dense[:, :20]) < 1e-5  # the prefill is full precision
        errs.append(rel_error(got[:, 20:], dense[:, 20:]))
    assert 0 < errs[0] < errs[1] < errs[2] < 1.0, errs


def test_exact_when_the_keys_and_values_span_r_dimensions(cpu_backend):
    """Keys and values confined to 8 of 16 dims (whole rotary pairs, so RoPE keeps them
    there): the calibrated rank-8 cache is exact, up to rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = models.tiny("llama", attn_implementation="sentinel", seed=5)
    d, hkv = 16, 2
    dead = [h * d + j for h in range(hkv) for j in (4, 5, 6, 7, 12, 13, 14, 15)]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[dead] = 0
            layer.self_attn.v_proj.weight[dead] = 0
    bases = calibrate_lowrank(
        model, ByteTokenizer(), _text(1000, seed=1), n_samples=4, max_length=128, progress=False
    )
    for eig in bases.k_eigenvalues + bases.v_eigenvalues:
        assert torch.all(eig[:, 8:] <= 1e-6 * eig[:, :1])
    ids = random_ids(1, 90, seed=6)
    cuts = [20, 21, 30, 90]
    dense = feed_in_pieces(model, ids, kvc.kv_cache(model, "dense", max_cache_len=90), cuts)
    low = feed_in_pieces(model, ids, kvc.kv_cache(model, "lowrank:8", max_cache_len=90), cuts)
    assert rel_error(low, dense) < 1e-5
    lower = feed_in_pieces(model, ids, kvc.kv_cache(model, "lowrank:6", max_cache_len=90), cuts)
    assert rel_error(lower[:, 20:], dense[:, 20:]) > 1e-3


def test_padding_rows_and_pruned_heads_stay_zero(any_backend, calibrated):
    """Queries that see no key (left padding longer than the prefill) and pruned heads give
    exactly 0 in a low-rank layer too (no stray ``mu_v``): full rank matches dense."""
    model, _ = calibrated
    ids = random_ids(2, 20, seed=3)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :10] = 0
    cuts = [6, 12, 13, 20]
    set_head_mask(model, {0: torch.tensor([True, False, True, True])})
    try:
        dense = feed_in_pieces(
            model, ids, kvc.kv_cache(model, "dense", max_cache_len=20, batch_size=2), cuts, mask
        )
        full = feed_in_pieces(
            model,
            ids,
            kvc.kv_cache(model, "lowrank:16", max_cache_len=20, batch_size=2),
            cuts,
            mask,
        )
    finally:
        set_head_mask(model, None)
    assert rel_error(full, dense) < 1e-5


def test_generate_and_wrap(calibrated):
    model, _ = calibrated
    ids = random_ids(1, 7, seed=4)
    want = model.generate(
        ids,
        max_new_tokens=8,
        do_sample=False,
        **cache_kwargs(model, kvc.kv_cache(model, "dense", max_cache_len=15)),
    )
    got = model.generate(
        ids,
        max_new_tokens=8,
        do_sample=False,
        **cache_kwargs(model, kvc.kv_cache(model, "lowrank:16", max_cache_len=15)),
    )
    assert torch.equal(got, want)


def test_save_load_roundtrip(tmp_path, calibrated):
    model, bases = calibrated
    path = tmp_path / "bases.pt"
    bases.save(path)
    loaded = LowRankBases.load(path)
    for name in ("k_basis", "v_basis", "k_mean", "v_mean", "k_eigenvalues", "v_eigenvalues"):
        for a, b in zip(getattr(loaded, name), getattr(bases, name), strict=True):
            assert torch.equal(a, b)
    assert loaded.n_tokens == bases.n_tokens and loaded.meta == bases.meta
    other = models.tiny("llama", attn_implementation="sentinel")
    loaded.attach(other)
    assert getattr(other, LOWRANK_ATTR) is loaded
    cache = kvc.kv_cache(other, "lowrank:4", max_cache_len=8)
    assert cache.nbytes == kvc.kv_cache_bytes(other, "lowrank:4", 8)


def test_lowrank_errors(calibrated):
    model, bases = calibrated
    with pytest.raises(ValueError, match="exceeds head_dim"):
        kvc.kv_cache(model, "lowrank:17", max_cache_len=8)
    wrong = models.tiny("llama", attn_implementation="sentinel", num_hidden_layers=3)
    bases.attach(wrong)
    with pytest.raises(ValueError, match="layers"):
        kvc.kv_cache(wrong, "lowrank:4", max_cache_len=8)
    with pytest.raises(ValueError, match="no tokens"):
        calibrate_lowrank(model, ByteTokenizer(), ["", "  "], progress=False, attach=False)
    with pytest.raises(ValueError, match="format"):
        LowRankBases.from_dict({"k_basis": []})

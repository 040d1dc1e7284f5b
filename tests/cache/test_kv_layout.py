"""The layout ``sk.kv_cache`` picks by length, so that a compressed cache built with the
defaults is never larger than a dense one.

SmolLM2-135M's KV geometry (30 layers, 9 query / 3 KV heads, hidden 576, head_dim 64) on a
model built on the meta device (no weights, caches allocated on ``meta``: their ``nbytes``
is exact without taking memory). The int4 rule: KIVI keys (64-token blocks, a 128-slot
full-precision ring) from :func:`kv_cache_switch_len` on, per-token keys with the largest
ring of at most 32 slots that stays within the dense bytes below; explicit ``key_block`` /
``recent`` are used as given.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ByteTokenizer
from helpers import random_text as _text

from sentinel_kernels import cache as kvc
from sentinel_kernels import eval as sk_eval
from sentinel_kernels import models
from sentinel_kernels.patching.report import PatchReport, fill_kv
from sentinel_kernels.quant.lowrank import LowRankBases

transformers = pytest.importorskip("transformers")

SMOL = dict(
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=64,
    vocab_size=256,
    max_position_embeddings=8192,
)
LENGTHS = (1, 7, 20, 52, 63, 64, 65, 127, 128, 200, 1000, 4096)
SPECS = ("int8", "int4", "lowrank:8", "lowrank:32", "lowrank:64")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Where KIVI keys start for this geometry (any batch: every byte is per row). Worked out:
# per head and row, KIVI allocates 76 bytes a slot (32 + 32 packed codes, 8 for two value
# (s, m) pairs, 4 for the keys' per-channel pairs over 64 slots) in whole 64-slot blocks,
# plus a K and a V ring of 128 x 64 model-dtype values; dense 2 x 64 x elem a slot.
SWITCH = {"fp32": 157, "bf16": 204}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _random_bases(layers: int, heads: int, d: int, seed: int = 0) -> LowRankBases:
    g = torch.Generator().manual_seed(seed)

    def basis() -> torch.Tensor:  # any matrix will do for sizes and sharing
        return torch.randn(heads, d, d, generator=g) / d**0.5

    def vec() -> torch.Tensor:
        return torch.randn(heads, d, generator=g)

    eig = torch.linspace(1.0, 0.01, d).expand(heads, d).contiguous()
    return LowRankBases(
        k_basis=[basis() for _ in range(layers)],
        v_basis=[basis() for _ in range(layers)],
        k_mean=[vec() for _ in range(layers)],
        v_mean=[vec() for _ in range(layers)],
        k_eigenvalues=[eig.clone() for _ in range(layers)],
        v_eigenvalues=[eig.clone() for _ in range(layers)],
        n_tokens=1,
    )


def _smol(dtype: torch.dtype):
    config = transformers.LlamaConfig(**SMOL)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = "sentinel"
    _random_bases(30, 3, 64).attach(model)
    return model


@pytest.fixture(scope="module", params=list(DTYPES))
def smol(request):
    return request.param, _smol(DTYPES[request.param])


def _layer_layouts(cache) -> set[tuple[int, int]]:
    return {(layer.key_block, layer.recent) for layer in cache.layers}


# --------------------------------------------------------------------------------------
# Never larger than dense; nbytes == kv_cache_bytes; the layout is the one described
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("spec", SPECS)
def test_default_cache_never_larger_than_dense(smol, spec, batch):
    name, model = smol
    for length in LENGTHS:
        dense = kvc.kv_cache_bytes(model, "dense", length, batch)
        want = kvc.kv_cache_bytes(model, spec, length, batch)
        assert want <= dense, f"{spec} {name} b{batch} L={length}: {want} > dense {dense}"
        cache = kvc.kv_cache(model, spec, max_cache_len=length, batch_size=batch, device="meta")
        assert cache.nbytes == want, f"{spec} {name} b{batch} L={length}"
        assert cache.nbytes == sum(
            t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors()
        )
        assert cache.layout == kvc.kv_cache_layout(model, spec, length, batch)
        if spec == "int4":
            kivi = length >= SWITCH[name]
            assert _layer_layouts(cache) == ({(64, 128)} if kivi else {(0, cache.layers[0].recent)})
            assert ("KIVI" in cache.layout) == kivi, cache.layout
            assert cache.max_cache_len == (-(-length // 64) * 64 if kivi else length)
    # Every length up to 1100 (the switch and the block edges after it included).
    for length in range(1, 1100):
        assert kvc.kv_cache_bytes(model, spec, length, batch) <= kvc.kv_cache_bytes(
            model, "dense", length, batch
        ), f"{spec} L={length}"


@pytest.mark.parametrize("batch", [1, 16])
def test_int4_switch_is_where_kivi_stops_exceeding_dense(smol, batch):
    """The switch is the smallest L0 such that an explicit KIVI cache (key_block=64, its
    128-slot ring) of every L >= L0 is within the dense bytes; below it the default cache
    has per-token keys and the largest ring <= 32 that fits."""
    name, model = smol
    start = kvc.kv_cache_switch_len(model, "int4", batch)
    assert start == SWITCH[name]

    def kivi(n: int) -> int:
        return kvc.kv_cache_bytes(model, "int4", n, batch, key_block=64)

    def dense(n: int) -> int:
        return kvc.kv_cache_bytes(model, "dense", n, batch)

    assert kivi(start - 1) > dense(start - 1)
    assert all(kivi(n) <= dense(n) for n in range(start, 2000))
    for length in range(1, start + 70):
        layer = kvc.kv_cache(
            model, "int4", max_cache_len=length, batch_size=batch, device="meta"
        ).layers[0]
        if length >= start:
            assert (layer.key_block, layer.recent) == (64, 128)
            continue
        assert layer.key_block == 0
        ring = layer.recent

        def per_token(r: int, n: int = length) -> int:
            return kvc.kv_cache_bytes(model, "int4", n, batch, key_block=0, recent=r)

        assert per_token(ring) <= dense(length)
        assert ring == 32 or per_token(ring + 1) > dense(length), f"L={length} ring {ring}"
    # fp32: the per-token cache keeps the full 32-slot ring from 38 tokens on (80 bytes a
    # slot and head against 512 dense, 512 a ring slot: 32 * 512 <= 432 L); bf16 from 47.
    full_ring = {"fp32": 38, "bf16": 47}[name]
    assert kvc.kv_cache_switch_len(model, "int4", batch, key_block=0) == full_ring
    assert (
        kvc.kv_cache(model, "int4", full_ring - 1, batch, device="meta", key_block=0)
        .layers[0]
        .recent
        < 32
    )
    assert kvc.kv_cache(model, "int4", 1, batch, device="meta").layers[0].recent == 0


def test_layout_in_words(smol):
    name, model = smol
    dt = {"fp32": "float32", "bf16": "bfloat16"}[name]
    long = kvc.kv_cache(model, "int4", max_cache_len=1024, device="meta")
    assert long.layout == (
        f"int4 KIVI keys per channel over 64-token blocks, values per token "
        f"(an fp16 (scale, min) per 32 channels) + 128-slot {dt} ring"
    )
    short = kvc.kv_cache(model, "int4", max_cache_len=52, device="meta")
    assert short.layout == (
        f"int4 per-token keys and values (an fp16 (scale, min) per 32 channels) + 32-slot {dt} ring"
    )
    assert short.layers[0].layout == short.layout
    assert "no full-precision ring" in kvc.kv_cache(model, "int4", 1, device="meta").layout
    assert kvc.kv_cache_layout(model, "int4", 1024, brief=True) == (
        f"KIVI keys over 64-token blocks + 128-slot {dt} ring"
    )
    assert kvc.kv_cache_layout(model, "int4", 52, brief=True) == (
        f"per-token int4 keys + 32-slot {dt} ring"
    )
    assert kvc.kv_cache(model, "int8", 52, device="meta").layout == (
        "int8 per-token keys and values (one fp16 scale per head vector), no full-precision ring"
    )
    assert short.describe().startswith("int4, 52 slots x 1 rows, 30 layers: int4 per-token")
    assert f"layout={short.layout!r}" in repr(short)


# --------------------------------------------------------------------------------------
# Explicit arguments are used as given
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,layout",
    [
        ({"key_block": 64}, (64, 128)),
        ({"key_block": 64, "recent": 64}, (64, 64)),
        ({"recent": 128}, (64, 128)),
        ({"recent": 32}, (0, 32)),
        ({"recent": 0}, (0, 0)),
        ({"key_block": 0, "recent": 32}, (0, 32)),
    ],
)
def test_explicit_arguments_are_used_as_given(smol, kw, layout):
    _, model = smol
    for length in (1, 20, 52, 1000):
        cache = kvc.kv_cache(
            model, "int4", max_cache_len=length, batch_size=16, device="meta", **kw
        )
        assert _layer_layouts(cache) == {layout}
        assert cache.nbytes == kvc.kv_cache_bytes(model, "int4", length, 16, **kw)
    # Even where that is larger than dense: KIVI over 20 tokens.
    assert kvc.kv_cache_bytes(model, "int4", 20, key_block=64) > kvc.kv_cache_bytes(
        model, "dense", 20
    )


def test_wrap_sizes_its_ring_like_a_per_token_cache(smol):
    _, model = smol
    for length in (7, 52, 300):
        cache = kvc.kv_cache(model, "int4", max_cache_len=length, device="meta", wrap=True)
        assert cache.layers[0].key_block == 0 and cache.layers[0].wrap
        assert cache.nbytes == kvc.kv_cache_bytes(model, "int4", length, wrap=True)
        assert cache.nbytes <= kvc.kv_cache_bytes(model, "dense", length)
        assert cache.layout.endswith(", wrapping")


# --------------------------------------------------------------------------------------
# Budgets: the longest length that fits, across the switch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,kw",
    [
        ("int4", {}),
        ("int4", {"key_block": 0}),
        ("int4", {"recent": 0}),
        ("int4", {"key_block": 64}),
        ("int8", {}),
        ("lowrank:32", {}),
    ],
)
def test_budget_is_the_longest_length_that_fits(smol, spec, kw):
    _, model = smol
    top = 800
    sizes = [0] + [kvc.kv_cache_bytes(model, spec, n, 2, **kw) for n in range(1, top + 1)]
    budgets = {
        sizes[n] + d
        for n in (
            1,
            2,
            7,
            37,
            38,
            46,
            47,
            63,
            64,
            65,
            128,
            155,
            156,
            157,
            158,
            192,
            203,
            204,
            205,
            256,
            700,
        )
        for d in (-1, 0, 1)
    }
    budgets |= {kvc.kv_cache_bytes(model, "dense", n, 2) for n in (20, 52, 100)}
    for budget in sorted(budgets):
        fits = [n for n in range(1, top + 1) if sizes[n] <= budget]
        if not fits:
            with pytest.raises(ValueError, match="at least"):
                kvc.kv_cache_len_for_budget(model, spec, budget, 2, **kw)
            continue
        assert max(fits) < top - 64  # the brute force covers every longer length
        got = kvc.kv_cache_len_for_budget(model, spec, budget, 2, **kw)
        assert got == max(fits), f"{spec} {kw} budget {budget}: {got} != {max(fits)}"
        cache = kvc.kv_cache(model, spec, max_cache_len=got, batch_size=2, device="meta", **kw)
        assert cache.nbytes <= budget


# --------------------------------------------------------------------------------------
# The demo's sizes, chunked perplexity, the patch report
# --------------------------------------------------------------------------------------


def test_demo_sizes_int4_not_larger_than_dense():
    """The demo's batch run: 16 rows, ~52 slots (prompts of 16-20 tokens + 32 new ones),
    fp32. It used to be 96.7 MiB of int4 (KIVI's 128-slot fp32 ring) against 36.6 dense."""
    model = _smol(torch.float32)
    for length in range(40, 70):
        int4 = kvc.kv_cache_bytes(model, "int4", length, 16)
        dense = kvc.kv_cache_bytes(model, "dense", length, 16)
        assert int4 <= dense, f"L={length}"
    int4 = kvc.kv_cache_bytes(model, "int4", 52, 16)
    dense = kvc.kv_cache_bytes(model, "dense", 52, 16)
    assert dense == 30 * (2 * 16 * 3 * 52 * 64 * 4 + 16 * 4)  # 36.6 MiB
    # per-token codes and scales (80 B a slot, head, row) + a 32-slot fp32 ring
    assert int4 == 30 * (16 * 3 * (52 * 80 + 2 * 32 * 64 * 4) + 16 * 4)  # 28.2 MiB
    assert round(int4 / 2**20, 1) == 28.2 and round(dense / 2**20, 1) == 36.6
    cache = kvc.kv_cache(model, "int4", max_cache_len=52, batch_size=16, device="meta")
    assert cache.nbytes == int4 and "32-slot float32 ring" in cache.layout


@pytest.mark.parametrize("window", [512, 1024])
def test_chunked_perplexity_windows_use_kivi(smol, window):
    """``sk.eval.perplexity(..., cache="int4")`` allocates one cache of ``window`` slots:
    KIVI there, and well under the dense bytes (at 512 / 1024 slots: 2.5x / 3.7x smaller
    in fp32, 1.8x / 2.4x in bf16)."""
    name, model = smol
    layout = kvc.kv_cache_layout(model, "int4", window)
    assert layout.startswith("int4 KIVI keys per channel over 64-token blocks")
    ratio = kvc.kv_cache_bytes(model, "dense", window) / kvc.kv_cache_bytes(model, "int4", window)
    assert (
        ratio
        > {("fp32", 512): 2.4, ("fp32", 1024): 3.6, ("bf16", 512): 1.8, ("bf16", 1024): 2.3}[
            name, window
        ]
    ), ratio


def test_eval_perplexity_builds_the_kivi_layout(monkeypatch):
    """The cache the chunked evaluation really builds (tiny model, head_dim 16: KIVI from
    160 slots on) is KIVI for a 256-token window and per-token for a 64-token one."""
    model = models.tiny("llama")
    built = []
    real = kvc.SentinelKVCache.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(kvc.SentinelKVCache, "__init__", spy)
    assert kvc.kv_cache_switch_len(model, "int4") == 160
    for window, kivi in ((256, True), (64, False)):
        ppl = sk_eval.perplexity(
            model, ByteTokenizer(), _text(400), window=window, max_windows=1, chunk=32, cache="int4"
        )
        assert ppl > 1
        assert ("KIVI" in built[-1].layout) == kivi, built[-1].layout
        assert built[-1].layers[0].key_block == (64 if kivi else 0)


def test_patch_report_states_the_rule(smol):
    name, model = smol
    dt = {"fp32": "float32", "bf16": "bfloat16"}[name]
    report = PatchReport(level=0, options={"kv_cache": "int4"})
    fill_kv(report, model)
    assert report.kv_long_from == SWITCH[name]
    assert report.kv_layout == f"KIVI keys over 64-token blocks + 128-slot {dt} ring"
    assert report.kv_short_layout == f"per-token int4 keys + 32-slot {dt} ring"
    # The per-token and fixed bytes are KIVI's, exact from the switch on.
    for blocks in (4, 5, 16, 64):
        n = 64 * blocks
        assert n >= report.kv_long_from
        assert report.kv_fixed_bytes + n * report.kv_bytes_per_token == kvc.kv_cache_bytes(
            model, "int4", n
        )
    line = report._kv_line()
    assert line.startswith(f"int4, {report.kv_bytes_per_token / 1024:.2f} KiB/token (dense {dt}")
    assert (
        f"; from {SWITCH[name]} tokens (any batch): KIVI keys over 64-token blocks + "
        f"128-slot {dt} ring; shorter: per-token int4 keys + 32-slot {dt} ring at most "
        "(never above dense)"
    ) in line
    for spec in ("int8", "dense", "lowrank:32"):
        other = PatchReport(level=0, options={"kv_cache": spec})
        fill_kv(other, model)
        assert other.kv_long_from == 1 and other.kv_short_layout is None
        assert "tokens (any batch)" not in other._kv_line()
    assert other.kv_shared_bytes == 30 * 2 * (3 * 64 * 32 + 3 * 64) * 4
    assert "bases shared by the model's caches" in other._kv_line()


# --------------------------------------------------------------------------------------
# Low-rank bases: shared by the model's caches, not in nbytes
# --------------------------------------------------------------------------------------


def test_lowrank_bases_are_shared_not_counted():
    model = models.tiny("llama", attn_implementation="sentinel")
    bases = _random_bases(2, 2, 16, seed=1)
    bases.attach(model)
    a = kvc.kv_cache(model, "lowrank:8", max_cache_len=5)
    b = kvc.kv_cache(model, "lowrank:8", max_cache_len=50, batch_size=3)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.latent.k_proj is lb.latent.k_proj and la.latent.v_mean is lb.latent.v_mean
        assert (
            tuple(la.latent.k_proj.shape) == (2, 16, 8) and la.latent.k_proj.dtype == torch.float32
        )
    assert torch.equal(a.layers[1].latent.k_proj, bases.k_basis[1][:, :, :8])
    assert a.nbytes == 2 * (2 * 1 * 2 * 5 * 8 * 4 + 4)  # latents + lengths only
    assert a.nbytes == kvc.kv_cache_bytes(model, "lowrank:8", 5)
    assert a.shared_nbytes == b.shared_nbytes == 2 * 2 * (2 * 16 * 8 + 2 * 16) * 4
    other = kvc.kv_cache(model, "lowrank:4", max_cache_len=5)  # another rank: own copies
    assert other.layers[0].latent.k_proj is not a.layers[0].latent.k_proj
    # Bases edited in place (or replaced) get fresh copies; old caches keep theirs.
    with torch.no_grad():
        bases.k_basis[0].mul_(-1)
    c = kvc.kv_cache(model, "lowrank:8", max_cache_len=5)
    assert c.layers[0].latent.k_proj is not a.layers[0].latent.k_proj
    assert torch.equal(c.layers[0].latent.k_proj, bases.k_basis[0][:, :, :8])
    assert c.layers[1].latent.k_proj is a.layers[1].latent.k_proj  # layer 1 untouched: still shared
    assert a.layers[0].latent.k_proj is not bases.k_basis[0] and not torch.equal(
        a.layers[0].latent.k_proj, c.layers[0].latent.k_proj
    )  # the old cache kept its own copy

"""``sk.kv_cache``: the compressed transformers cache, its read path through the sentinel
attention, chunked perplexity through it and the ``kv_cache`` patch option.

The oracle is the same tiny model without any cache argument (transformers' own cache and
attention); the compressed formats are held to relative-error bounds on the logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ByteTokenizer, feed_in_pieces, random_ids, rel_error
from helpers import random_text as _text

from sentinel_kernels import cache as kvc
from sentinel_kernels import eval as sk_eval
from sentinel_kernels import models
from sentinel_kernels.cache import cache as cache_impl
from sentinel_kernels.hf_compat import cache_kwargs, output_cache
from sentinel_kernels.nn import attention as sk_attn
from sentinel_kernels.patching import patch_model, unpatch_model

pytest.importorskip("transformers")

# Relative error of the logits of the tokens read through the cache, against no cache
# (tiny llama, head_dim 16; measured ~1.4e-3 for int8, ~1.5e-2 for int4 without a ring).
INT8_BOUND = 5e-3
INT4_BOUND = 4e-2


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _model(arch: str = "llama", **overrides):
    return models.tiny(arch, attn_implementation="sentinel", **overrides)


def _plain_logits(model, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


CUTS = [20, 21, 22, 29, 100, 129]  # prefill, two decode steps, 7, 71 (> 64: pieces), 29


# --------------------------------------------------------------------------------------
# Generation and logits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_cache_generate_equals_plain(cpu_backend, arch):
    if arch not in models.tiny_archs():
        pytest.skip(f"{arch} needs a newer transformers")
    model = _model(arch)
    plain = models.tiny(arch, attn_implementation="eager")
    ids = random_ids(1, 11)
    want = plain.generate(ids, max_new_tokens=12, do_sample=False)
    cache = kvc.kv_cache(model, "dense", max_cache_len=23)
    got = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_kwargs(model, cache))
    assert torch.equal(got, want)
    assert cache.get_seq_length() == 22  # the last token is never fed back


@pytest.mark.parametrize(
    "spec,kw,bound",
    [
        ("dense", {}, 1e-5),
        ("int8", {}, INT8_BOUND),
        ("int8", {"recent": 8}, INT8_BOUND),
        ("int4", {"recent": 0}, INT4_BOUND),
        ("int4", {}, INT4_BOUND),
    ],
)
def test_cache_logits_close_to_no_cache(cpu_backend, spec, kw, bound):
    model = _model()
    ids = random_ids(1, CUTS[-1], seed=1)
    want = _plain_logits(model, ids)
    cache = kvc.kv_cache(model, spec, max_cache_len=CUTS[-1] + 3, **kw)
    got = feed_in_pieces(model, ids, cache, CUTS)
    # The prefill chunk attends in full precision: it matches closely in every format.
    assert rel_error(got[:, :20], want[:, :20]) < 1e-5
    err = rel_error(got[:, 20:], want[:, 20:])
    assert err < bound, f"{spec} {kw}: relative error {err:.2e} > {bound:.0e}"
    if spec != "dense":
        assert err > 1e-7  # the compressed store was really read


@pytest.mark.parametrize(
    "length,cuts,ring",
    [
        (9, [3, 4, 5, 9], 7),
        (20, [8, 9, 12, 20], 16),
        (52, [20, 21, 22, 36, 52], 32),
        (159, [20, 21, 22, 90, 159], 32),
    ],
)
def test_short_default_int4_logits_close_to_dense(cpu_backend, length, cuts, ring):
    """Below the switch to KIVI (160 slots for this geometry) a default int4 cache stores
    keys per token, with the largest ring <= 32 that keeps it within the dense bytes
    (floor(104 L / 128) here: 24 bytes a slot and head against 128 dense, 128 a ring
    slot); its logits stay within the int4 bound of the dense cache's."""
    model = _model()
    ids = random_ids(1, length, seed=4)
    cache = kvc.kv_cache(model, "int4", max_cache_len=length)
    assert {(la.key_block, la.recent) for la in cache.layers} == {(0, ring)}
    assert cache.nbytes <= kvc.kv_cache_bytes(model, "dense", length)
    want = feed_in_pieces(model, ids, kvc.kv_cache(model, "dense", max_cache_len=length), cuts)
    assert rel_error(want, _plain_logits(model, ids)) < 1e-5
    got = feed_in_pieces(model, ids, cache, cuts)
    assert rel_error(got[:, : cuts[0]], want[:, : cuts[0]]) < 1e-5  # full-precision prefill
    err = rel_error(got[:, cuts[0] :], want[:, cuts[0] :])
    assert 1e-7 < err < INT4_BOUND, f"L={length}: relative error {err:.2e}"


def test_long_chunk_equals_pieces_of_64(any_backend):
    """A 100-token chunk over a non-empty int4 cache with a recent ring is appended and read
    64 queries at a time: the same as feeding 64 then 36."""
    model = _model()
    ids = random_ids(1, 130, seed=2)
    a = feed_in_pieces(
        model, ids, kvc.kv_cache(model, "int4", max_cache_len=130, recent=16), [30, 130]
    )
    b = feed_in_pieces(
        model, ids, kvc.kv_cache(model, "int4", max_cache_len=130, recent=16), [30, 94, 130]
    )
    assert rel_error(a, b) < 1e-5


def _count_routes(monkeypatch) -> dict[str, int]:
    """Counts of the cache reader's two routes for chunks over a stored past (the dense
    route allowed on the CPU too, so that these tests cover it)."""
    monkeypatch.setattr(sk_attn, "DENSE_LONG_CHUNK_DEVICES", frozenset({"cpu", "cuda"}))
    calls = {"long": 0, "decode": 0}
    long_chunk, decode_over = sk_attn._long_chunk_over_past, sk_attn._decode_over

    def counted_long(*a, **k):
        calls["long"] += 1
        return long_chunk(*a, **k)

    def counted_decode(*a, **k):
        calls["decode"] += 1
        return decode_over(*a, **k)

    monkeypatch.setattr(sk_attn, "_long_chunk_over_past", counted_long)
    monkeypatch.setattr(sk_attn, "_decode_over", counted_decode)
    return calls


@pytest.mark.parametrize(
    ("spec", "bound", "chunk"),
    [("dense", 1e-5, 100), ("dense", 1e-5, 40), ("int8", INT8_BOUND, 100)],
)
def test_long_chunk_over_past_is_one_attention(any_backend, monkeypatch, spec, bound, chunk):
    """A chunk of 100 (dense also 40) queries over 30 stored positions is one prefill
    attention over the past and the chunk (not decode-attention pieces), with the plain
    model's logits (dense: to rounding; int8: its past is read back quantized)."""
    model = _model()
    ids = random_ids(1, 30 + chunk, seed=7)
    calls = _count_routes(monkeypatch)
    cache = kvc.kv_cache(model, spec, max_cache_len=30 + chunk)
    got = feed_in_pieces(model, ids, cache, [30, 30 + chunk])
    layers = model.config.num_hidden_layers
    assert calls == {"long": layers, "decode": 0}
    want = _plain_logits(model, ids)
    assert rel_error(got[:, :30], want[:, :30]) < 1e-5
    err = rel_error(got[:, 30:], want[:, 30:])
    assert err < bound, f"{spec}: relative error {err:.2e}"
    if spec == "int8":
        assert err > 1e-7  # the past really was read from the int8 codes


@pytest.mark.parametrize(("spec", "chunk"), [("dense", 40), ("int8", 100), ("int8", 40)])
def test_long_chunk_after_the_fused_rope_append(cpu_backend, monkeypatch, spec, chunk):
    """At level 1 and 2 a chunk of at most 64 over a non-empty cache is rotated and
    appended by ``update_rotary``, which hands the attention the chunk's keys *before*
    RoPE: the long-chunk route must read them from the slots (dense) or not run (int8
    below 65 queries); the logits stay the uncached forward's."""
    from helpers import tiny_model

    monkeypatch.setattr(sk_attn, "DENSE_LONG_CHUNK_DEVICES", frozenset({"cpu", "cuda"}))
    model = tiny_model("llama", level=1)
    rotary = {"calls": 0}
    update_rotary = kvc.SentinelKVCache.update_rotary

    def counted(self, *a, **k):
        out = update_rotary(self, *a, **k)
        rotary["calls"] += out is not None
        return out

    monkeypatch.setattr(kvc.SentinelKVCache, "update_rotary", counted)
    calls = _count_routes(monkeypatch)
    ids = random_ids(1, 30 + chunk, seed=12)
    cache = kvc.kv_cache(model, spec, max_cache_len=30 + chunk)
    got = feed_in_pieces(model, ids, cache, [30, 30 + chunk])
    layers = model.config.num_hidden_layers
    assert rotary["calls"] == (layers if chunk <= 64 else 0)
    assert calls["long"] == (0 if spec == "int8" and chunk <= 64 else layers)
    want = _plain_logits(model, ids)
    bound = 1e-5 if spec == "dense" else INT8_BOUND
    assert rel_error(got, want) < bound


@pytest.mark.parametrize("spec", ["dense", "int8"])
def test_long_chunk_matches_the_decode_pieces(cpu_backend, monkeypatch, spec):
    """The one-attention route and the decode pieces it replaced agree on a padded batch
    (dense: to rounding; int8: the pieces read the chunk's own keys quantized, the
    attention reads them as computed, so within the int8 bound)."""
    monkeypatch.setattr(sk_attn, "DENSE_LONG_CHUNK_DEVICES", frozenset({"cpu", "cuda"}))
    model = _model()
    ids = random_ids(2, 120, seed=8)
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[0, :5] = 0
    cuts = [20, 120]
    new = feed_in_pieces(
        model, ids, kvc.kv_cache(model, spec, max_cache_len=120, batch_size=2), cuts, mask=mask
    )
    monkeypatch.setattr(sk_attn, "_long_chunk_fits", lambda kv, sq: False)
    old = feed_in_pieces(
        model, ids, kvc.kv_cache(model, spec, max_cache_len=120, batch_size=2), cuts, mask=mask
    )
    bound = 1e-5 if spec == "dense" else INT8_BOUND
    # row 0's padded positions attend to nothing real: compare its real tokens only
    assert rel_error(new[0, 5:], old[0, 5:]) < bound
    assert rel_error(new[1], old[1]) < bound


@pytest.mark.parametrize("spec", ["dense", "int8"])
def test_long_chunk_reads_the_static_key_mask(cpu_backend, monkeypatch, spec):
    """A long chunk with no attention mask over a cache whose padding is a static slot mask
    (what sk.generate and the engine set after a padded prefill) masks the same keys as the
    decode pieces do."""
    monkeypatch.setattr(sk_attn, "DENSE_LONG_CHUNK_DEVICES", frozenset({"cpu", "cuda"}))
    model = _model()
    ids = random_ids(2, 120, seed=11)
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[0, :5] = 0

    def run() -> torch.Tensor:
        cache = kvc.kv_cache(model, spec, max_cache_len=120, batch_size=2)
        first = feed_in_pieces(model, ids[:, :20], cache, [20], mask=mask[:, :20])
        cache.set_static_key_mask(mask[:, :20])
        return torch.cat([first, feed_in_pieces(model, ids[:, 20:], cache, [100])], dim=1)

    new = run()
    monkeypatch.setattr(sk_attn, "_long_chunk_fits", lambda kv, sq: False)
    old = run()
    bound = 1e-5 if spec == "dense" else INT8_BOUND
    assert rel_error(new[0, 5:], old[0, 5:]) < bound
    assert rel_error(new[1], old[1]) < bound


def test_long_chunk_keeps_the_decode_pieces_where_it_does_not_fit(monkeypatch):
    """A ring (int4 with a recent window) keeps the decode pieces, and so does a chunk the
    decode kernel takes in one launch (16 queries, dense)."""
    model = _model()
    ids = random_ids(1, 130, seed=9)
    calls = _count_routes(monkeypatch)
    feed_in_pieces(model, ids, kvc.kv_cache(model, "int4", max_cache_len=130, recent=16), [30, 130])
    assert calls["long"] == 0 and calls["decode"] > 0
    calls.update(long=0, decode=0)
    feed_in_pieces(model, ids[:, :46], kvc.kv_cache(model, "dense", max_cache_len=46), [30, 46])
    assert calls["long"] == 0 and calls["decode"] == model.config.num_hidden_layers


def test_dense_long_chunks_keep_the_decode_pieces_on_the_cpu(monkeypatch):
    """By default a dense cache on the CPU reads long chunks in decode pieces (measured
    faster there); int8 takes the one-attention route on every device."""
    model = _model()
    ids = random_ids(1, 130, seed=10)
    calls = {"long": 0}
    long_chunk = sk_attn._long_chunk_over_past

    def counted(*a, **k):
        calls["long"] += 1
        return long_chunk(*a, **k)

    monkeypatch.setattr(sk_attn, "_long_chunk_over_past", counted)
    feed_in_pieces(model, ids, kvc.kv_cache(model, "dense", max_cache_len=130), [30, 130])
    assert calls["long"] == 0
    feed_in_pieces(model, ids, kvc.kv_cache(model, "int8", max_cache_len=130), [30, 130])
    assert calls["long"] == model.config.num_hidden_layers


@pytest.mark.parametrize("spec", ["dense", "int8"])
def test_batch_left_padding_equals_rows(cpu_backend, spec):
    model = _model()
    ids = random_ids(2, 9, seed=3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    ids[0, :4] = 0
    got = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        **cache_kwargs(model, kvc.kv_cache(model, spec, max_cache_len=17, batch_size=2)),
    )
    for row, pad in ((0, 4), (1, 0)):
        one = ids[row : row + 1, pad:]
        cache = kvc.kv_cache(model, spec, max_cache_len=17)
        alone = model.generate(one, max_new_tokens=8, do_sample=False, **cache_kwargs(model, cache))
        assert torch.equal(got[row, -8:], alone[0, -8:]), f"row {row}"


@pytest.mark.parametrize("spec,bound", [("dense", 1e-5), ("int8", 2e-3)])
def test_batch_left_padding_logits(any_backend, spec, bound):
    """Chunks (decode steps and a chunk of 6) over a padded batch: the padded row's real
    tokens match the unpadded row's logits (int8: a key that differs by an ulp between the
    two runs may round to another code, hence the looser bound)."""
    model = _model()
    ids = random_ids(2, 30, seed=4)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, :5] = 0
    cache = kvc.kv_cache(model, spec, max_cache_len=30, batch_size=2)
    got = feed_in_pieces(model, ids, cache, [12, 13, 14, 20, 30], mask=mask)
    alone = feed_in_pieces(
        model, ids[:1, 5:], kvc.kv_cache(model, spec, max_cache_len=25), [7, 8, 9, 15, 25]
    )
    assert rel_error(got[0, 12:], alone[0, 7:]) < bound


def test_capacity_is_checked():
    model = _model()
    cache = kvc.kv_cache(model, "int8", max_cache_len=8)
    ids = random_ids(1, 9)
    feed_in_pieces(model, ids, cache, [6])
    with pytest.raises(ValueError, match="exceed max_cache_len=8"):
        feed_in_pieces(model, ids[:, 6:], cache, [3])
    with pytest.raises(ValueError, match="max_cache_len"):
        model.generate(
            random_ids(1, 5),
            max_new_tokens=10,
            do_sample=False,
            **cache_kwargs(model, kvc.kv_cache(model, "int8", max_cache_len=8)),
        )


def test_wrap_sliding_window_equals_dense_sliding(cpu_backend):
    model = _model("mistral", sliding_window=6)
    plain = models.tiny("mistral", attn_implementation="eager", sliding_window=6)
    ids = random_ids(1, 5, seed=5)
    want = plain.generate(ids, max_new_tokens=30, do_sample=False)
    for spec in ("dense", "int8"):
        cache = kvc.kv_cache(model, spec, max_cache_len=12, wrap=True)
        got = model.generate(ids, max_new_tokens=30, do_sample=False, **cache_kwargs(model, cache))
        if spec == "dense":
            assert torch.equal(got, want)
        assert cache.get_seq_length() == 34 > cache.max_cache_len
    # Logits through the ring: prefill longer than the ring, then steps and a chunk of 7
    # (7 + 6 - 1 <= 12 slots: exact).
    ids = random_ids(1, 40, seed=6)
    ring = kvc.kv_cache(model, "dense", max_cache_len=12, wrap=True)
    got = feed_in_pieces(model, ids, ring, [15, 16, 17, 24, 31, 32, 40 - 1])
    assert rel_error(got, _plain_logits(plain, ids[:, :39])) < 1e-5
    # A chunk that would overwrite keys its own queries still see is refused.
    with pytest.raises(ValueError, match="wrapping cache"):
        feed_in_pieces(model, ids[:, 39:], ring, [1])  # fine
        feed_in_pieces(model, random_ids(1, 8), ring, [8])


def test_wrap_needs_the_window():
    with pytest.raises(ValueError, match="sliding_window"):
        kvc.kv_cache(_model("mistral", sliding_window=6), "int8", max_cache_len=4, wrap=True)


def test_stale_records_never_misfire():
    """A forward without the cache after one with it runs plain attention; a model switched
    away from the sentinel attention is caught instead of silently ignoring the past."""
    model = _model()
    ids = random_ids(1, 12)
    cache = kvc.kv_cache(model, "int8", max_cache_len=16)
    feed_in_pieces(model, ids, cache, [8, 9])
    want = _plain_logits(model, ids)
    assert rel_error(_plain_logits(model, ids), want) == 0
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="sentinel"):
        feed_in_pieces(model, ids[:, 9:], cache, [1])


def test_reset_and_reuse():
    model = _model()
    ids = random_ids(1, 20, seed=7)
    cache = kvc.kv_cache(model, "int8", max_cache_len=20)
    first = feed_in_pieces(model, ids, cache, [10, 11, 20])
    cache.reset()
    assert cache.get_seq_length() == 0
    assert rel_error(feed_in_pieces(model, ids, cache, [10, 11, 20]), first) == 0


def test_switches_the_attention_with_a_warning(monkeypatch):
    model = models.tiny("llama", attn_implementation="eager")
    monkeypatch.setattr(cache_impl, "_warned_switch", False)
    with pytest.warns(RuntimeWarning, match="switched"):
        kvc.kv_cache(model, "int8", max_cache_len=4)
    assert model.config._attn_implementation == "sentinel"


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="unknown KV cache spec"):
        kvc.kv_cache(model, "int3", max_cache_len=4)
    with pytest.raises(ValueError, match="max_cache_len"):
        kvc.kv_cache(model, "int8", max_cache_len=0)
    with pytest.raises(ValueError, match="recent"):
        kvc.kv_cache(model, "dense", max_cache_len=4, recent=4)
    with pytest.raises(ValueError, match="groups"):
        kvc.kv_cache(model, "int8", max_cache_len=4, groups=5)  # 16 channels in 5 groups
    with pytest.raises(ValueError, match="low-rank KV bases"):
        kvc.kv_cache(model, "lowrank:4", max_cache_len=4)
    cache = kvc.kv_cache(model, "int8", max_cache_len=8, batch_size=2)
    with pytest.raises(ValueError, match="batch"):
        feed_in_pieces(model, random_ids(1, 4), cache, [4])


def test_transformers_cache_interface():
    from transformers.cache_utils import Cache, CacheLayerMixin

    model = _model()
    cache = kvc.kv_cache(model, "int4", max_cache_len=64, batch_size=1)
    assert isinstance(cache, Cache)
    assert all(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
    assert len(cache) == model.config.num_hidden_layers
    assert cache.is_compileable is False
    assert cache.get_max_length() == 64
    feed_in_pieces(model, random_ids(1, 10), cache, [10])
    assert cache.get_seq_length() == 10
    assert cache.get_mask_sizes(3, 0) == (13, 0)
    assert cache.layers[0].cache_lens.tolist() == [10]


# --------------------------------------------------------------------------------------
# Sizes and budgets
# --------------------------------------------------------------------------------------


def test_nbytes_counts_every_tensor():
    model = _model()
    layers, h, d = 2, 2, 16
    cache = kvc.kv_cache(model, "dense", max_cache_len=50, batch_size=3)
    assert cache.nbytes == layers * (2 * 3 * h * 50 * d * 4 + 3 * 4)
    cache = kvc.kv_cache(model, "int8", max_cache_len=50, batch_size=3, groups=2)
    assert cache.nbytes == layers * (2 * 3 * h * 50 * (d + 2 * 2) + 3 * 4)
    cache = kvc.kv_cache(model, "int4", max_cache_len=50, batch_size=3, groups=1, recent=5)
    assert cache.nbytes == layers * (2 * 3 * h * (50 * (d // 2 + 4) + 5 * d * 4) + 3 * 4)
    for spec in ("dense", "int8", "int4"):
        c = kvc.kv_cache(model, spec, max_cache_len=37, batch_size=2)
        assert c.nbytes == kvc.kv_cache_bytes(model, spec, 37, 2)
        assert c.nbytes == sum(
            t.numel() * t.element_size() for layer in c.layers for t in layer.tensors()
        )


def test_budget_int8_holds_1_9x_the_bf16_tokens():
    model = models.tiny("llama", attn_implementation="sentinel", head_dim=64, dtype=torch.bfloat16)
    budget = 4 << 20
    dense_len = kvc.kv_cache_len_for_budget(model, "dense", budget)
    int8_len = kvc.kv_cache_len_for_budget(model, "int8", budget)
    assert int8_len >= 1.9 * dense_len
    for spec, length in (("dense", dense_len), ("int8", int8_len)):
        cache = kvc.kv_cache(model, spec, max_cache_len=length)  # allocated for real
        assert cache.nbytes <= budget
        assert kvc.kv_cache_bytes(model, spec, length + 1) > budget
    with pytest.raises(ValueError, match="at least"):
        kvc.kv_cache_len_for_budget(model, "int8", 100)


# --------------------------------------------------------------------------------------
# Chunked perplexity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [32, 80])
def test_chunked_perplexity_dense_equals_windows(cpu_backend, chunk):
    model = models.tiny("llama", attn_implementation="eager")
    text, tok = _text(500), ByteTokenizer()
    want = sk_eval.perplexity(model, tok, text, window=160, progress=False)
    got = sk_eval.perplexity(
        model, tok, text, window=160, chunk=chunk, cache="dense", progress=False
    )
    assert abs(got - want) / want < 1e-4
    assert model.config._attn_implementation == "eager"  # restored
    int8 = sk_eval.perplexity(
        model, tok, text, window=160, chunk=chunk, cache="int8", progress=False
    )
    assert abs(int8 - want) / want < 0.01
    assert int8 != got


def test_chunked_perplexity_arguments():
    model = models.tiny("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="chunk"):
        sk_eval.perplexity(model, ByteTokenizer(), _text(50), window=16, chunk=0, progress=False)


# --------------------------------------------------------------------------------------
# The kv_cache patch option
# --------------------------------------------------------------------------------------


def test_patch_option_makes_generate_use_the_cache():
    model = models.tiny("llama", attn_implementation="eager")
    ids = random_ids(2, 7, seed=8)
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    patch_model(model, level=0, kv_cache="int8")
    assert model.config._attn_implementation == "sentinel"
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    assert isinstance(cache, kvc.SentinelKVCache)
    assert cache.spec.kind == "int8" and cache.batch_size == 2 and cache.max_cache_len == 13
    assert out.sequences.shape == want.shape
    # A caller's own cache is left alone.
    mine = kvc.kv_cache(model, "dense", max_cache_len=13, batch_size=2)
    out = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        **cache_kwargs(model, mine),
        return_dict_in_generate=True,
    )
    assert output_cache(out) is mine
    assert torch.equal(out.sequences, want)
    unpatch_model(model)
    assert "generate" not in vars(model)
    assert model.config._attn_implementation == "eager"


def test_patch_option_lowrank_needs_bases():
    model = models.tiny("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="low-rank KV bases"):
        patch_model(model, level=0, kv_cache="lowrank:8")
    assert model.config._attn_implementation == "eager"  # rolled back
    patch_model(
        model, level=0, kv_cache="lowrank:8", calibration_text=_text(600), tokenizer=ByteTokenizer()
    )
    out = model.generate(
        random_ids(1, 6), max_new_tokens=4, do_sample=False, return_dict_in_generate=True
    )
    assert output_cache(out).spec.rank == 8
    unpatch_model(model)
    assert not hasattr(model, "sentinel_lowrank_bases")


@pytest.mark.parametrize(
    "wrap,length",
    [(False, 1), (False, 7), (False, 12), (True, 1), (True, 7), (True, 12), (True, 13), (True, 30)],
)
def test_slot_key_mask_and_rows_with_keys(wrap, length):
    """The slot-indexed key mask and the no-visible-key rows, against plain loops."""
    cap, b = 12, 3
    g = torch.Generator().manual_seed(length)
    mask = torch.rand(b, length + 2, generator=g) < 0.6  # 2 extra columns: sliced off
    mask = mask[:, :length]
    memo = {}
    km = sk_attn._slot_key_mask(mask, length, cap, wrap, memo)
    want = torch.zeros(b, cap, dtype=torch.int8)
    for j in range(max(0, length - cap), length):
        want[:, j % cap if wrap else j] = mask[:, j].to(torch.int8)
    assert torch.equal(km, want)
    assert sk_attn._slot_key_mask(mask, length, cap, wrap, memo) is km  # memoised per mask
    for sq, window in ((1, 0), (min(length, 5), 0), (min(length, 5), 3)):
        got = sk_attn._rows_with_keys(mask, length, sq, window, cap, wrap)
        for bi in range(b):
            for t in range(sq):
                p = length - sq + t
                lo = max(0, p - window + 1) if window else 0
                if wrap:
                    lo = max(lo, length - cap)
                assert bool(got[bi, 0, t, 0]) == bool(mask[bi, lo : p + 1].any())


def test_sk_kv_cache_is_the_function():
    import sys

    import sentinel_kernels as sk

    assert sk.kv_cache is kvc.kv_cache
    assert sk.kv_cache_len_for_budget is kvc.kv_cache_len_for_budget
    cache = sk.kv_cache(_model(), "int8", max_cache_len=4)
    assert isinstance(cache, kvc.SentinelKVCache)
    assert "sentinel_kernels.kv_cache" not in sys.modules  # no module of that name

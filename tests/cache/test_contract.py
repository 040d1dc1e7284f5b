"""The cache -> attention contract (:mod:`sentinel_kernels.cache.contract`).

* :class:`CompressedKV` of every storage layout: fields, shapes and dtypes as documented,
  the very tensors the layer allocated, and its constructor's checks;
* the handoff: ``update`` returns keys carrying a :class:`CacheRead`, the attention claims
  it and reads the storage through it (and only through it), and keys without one, of
  another layer, or already claimed are attended as given;
* :func:`attend_compressed` with per-row lengths (rows at different positions).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import (
    ByteTokenizer,
    assert_rejects,
    decode_oracle,
    feed_in_pieces,
    random_ids,
    rel_error,
)
from helpers import random_text as _text

from sentinel_kernels import cache as kvc
from sentinel_kernels import models
from sentinel_kernels.cache.contract import CacheRead, CompressedKV
from sentinel_kernels.nn import attention as sk_attn
from sentinel_kernels.quant.lowrank import calibrate_lowrank

pytest.importorskip("transformers")

B, HKV, D = 2, 2, 16  # the tiny llama: 4 query heads over 2 KV heads, head_dim 16


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _model():
    return models.tiny("llama", attn_implementation="sentinel")


class _Module(torch.nn.Module):
    """What the attention function reads of an attention module."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_causal = True


# --------------------------------------------------------------------------------------
# CompressedKV: fields per layout
# --------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (spec, kv_cache kwargs, format, key_block, ring, stored channels, wrap)
    "dense": ("dense", {}, "dense", 0, 0, D, False),
    "int8": ("int8", {}, "int8", 0, 0, D, False),
    "int8-ring-wrap": ("int8", {"recent": 4, "wrap": True}, "int8", 0, 4, D, True),
    "int4-per-token": ("int4", {"key_block": 0, "recent": 8}, "int4", 0, 8, D // 2, False),
    "int4-kivi": ("int4", {"key_block": 16}, "int4", 16, 32, D // 2, False),
    "lowrank": ("lowrank:8", {}, "dense", 0, 0, 8, False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compressed_kv_fields(name):
    spec, kw, fmt, block, ring, width, wrap = LAYOUTS[name]
    model = _model()
    if spec.startswith("lowrank"):
        calibrate_lowrank(model, ByteTokenizer(), _text(600), progress=False)
    cache = kvc.kv_cache(model, spec, max_cache_len=40, batch_size=B, **kw)
    for i, layer in enumerate(cache.layers):
        kv = layer.compressed
        assert isinstance(kv, CompressedKV)
        cap = layer.capacity
        assert (kv.format, kv.key_block, kv.ring, kv.wrap) == (fmt, block, ring, wrap)
        assert (kv.batch_size, kv.capacity, kv.num_kv_heads, kv.head_dim) == (B, cap, HKV, D)
        if block:
            assert cap % block == 0
        # The storage itself, not copies.
        assert kv.k_codes is layer.k_store and kv.v_codes is layer.v_store
        assert kv.lengths is layer.cache_lens
        assert kv.lengths.dtype == torch.int32 and tuple(kv.lengths.shape) == (B,)
        assert tuple(kv.k_codes.shape) == tuple(kv.v_codes.shape) == (B, HKV, cap, width)
        want_dtype = {"int8": torch.int8, "int4": torch.uint8}.get(fmt, torch.float32)
        assert kv.k_codes.dtype == want_dtype
        g = layer.groups
        if fmt == "dense":
            assert kv.k_scales is None and kv.v_scales is None
        elif fmt == "int8":
            assert tuple(kv.k_scales.shape) == tuple(kv.v_scales.shape) == (B, HKV, cap, g)
        else:
            assert tuple(kv.v_scales.shape) == (B, HKV, cap, g, 2)
            want_k = (B, HKV, cap // block, D, 2) if block else (B, HKV, cap, g, 2)
            assert tuple(kv.k_scales.shape) == want_k
        for s in (kv.k_scales, kv.v_scales):
            assert s is None or s.dtype == torch.float16
        if ring:
            assert tuple(kv.k_ring.shape) == tuple(kv.v_ring.shape) == (B, HKV, ring, D)
            assert kv.k_ring.dtype == torch.float32
        else:
            assert kv.k_ring is None and kv.v_ring is None
        if spec.startswith("lowrank"):
            la = kv.latent
            assert la is not None and la.rank == 8
            assert tuple(la.k_proj.shape) == tuple(la.v_proj.shape) == (HKV, D, 8)
            assert tuple(la.k_mean.shape) == tuple(la.v_mean.shape) == (HKV, D)
            assert la.k_proj.dtype == torch.float32
        else:
            assert kv.latent is None
        assert layer.layer_idx == i


def test_compressed_kv_rebuilt_when_storage_is_reallocated():
    cache = kvc.kv_cache(_model(), "int8", max_cache_len=8, batch_size=2)
    layer = cache.layers[0]
    before = layer.compressed
    cache.batch_repeat_interleave(2)
    assert layer.compressed is not before and layer.compressed.batch_size == 4
    assert layer.compressed.k_codes is layer.k_store


def _kv_fields(fmt: str, k_codes, v_codes, lengths, **over) -> dict:
    """The fields of a ``CompressedKV`` over ``[B, H, L, D]`` storage with no scales, rings,
    KIVI blocks or wrap-around, ``over`` replacing some."""
    fields = dict(
        format=fmt,
        k_codes=k_codes,
        v_codes=v_codes,
        k_scales=None,
        v_scales=None,
        k_ring=None,
        v_ring=None,
        lengths=lengths,
        key_block=0,
        wrap=False,
        num_kv_heads=k_codes.shape[1],
        head_dim=D,
    )
    fields.update(over)
    return fields


def test_compressed_kv_checks_its_fields():
    b, h, cap = 1, 2, 8
    codes = torch.zeros(b, h, cap, D, dtype=torch.int8)
    scales = torch.zeros(b, h, cap, 1, dtype=torch.float16)
    lens = torch.zeros(b, dtype=torch.int32)
    good = _kv_fields("int8", codes, codes, lens, k_scales=scales, v_scales=scales)
    bad = [
        {"lengths": lens.long()},
        {"lengths": torch.zeros(3, dtype=torch.int32)},
        {"k_codes": codes.to(torch.uint8), "v_codes": codes.to(torch.uint8)},
        {"k_scales": None},
        {"format": "dense"},  # dense with scales
        {"k_ring": torch.zeros(b, h, 4, D)},  # one ring only
        {"key_block": 4},  # KIVI needs int4 and a ring
        {"num_kv_heads": 3},
    ]
    assert_rejects(CompressedKV, good, [(change, "CompressedKV") for change in bad])


# --------------------------------------------------------------------------------------
# The handoff
# --------------------------------------------------------------------------------------


def test_update_returns_keys_carrying_the_read():
    model = _model()
    cache = kvc.kv_cache(model, "int8", max_cache_len=80)
    layer = cache.layers[1]
    k = torch.randn(1, HKV, 3, D)
    v = torch.randn(1, HKV, 3, D)
    k_out, v_out = cache.update(k, v, 1)
    read = getattr(k_out, sk_attn.CACHE_READ_ATTR)
    assert isinstance(read, CacheRead) and read is layer.last_read
    assert read.kv is layer.compressed and read.layer_idx == 1
    assert (read.seq_length, read.deferred, read.claimed) == (3, False, False)
    assert torch.equal(k_out, k) and k_out.data_ptr() == k.data_ptr()  # a view, no copy
    assert v_out is v
    assert not hasattr(k, sk_attn.CACHE_READ_ATTR)  # the caller's tensor is untouched
    assert layer.cache_lens.tolist() == [3]
    # A chunk longer than MAX_CACHE_QUERIES into a non-empty cache: left to the reader.
    cache.reset()
    cache.update(k, v, 0)
    cache.layers[0].last_read.claim()
    k2, v2 = torch.randn(1, HKV, 70, D), torch.randn(1, HKV, 70, D)
    read2 = getattr(cache.update(k2, v2, 0)[0], sk_attn.CACHE_READ_ATTR)
    assert read2.deferred and read2.seq_length == 73
    assert cache.layers[0].cache_lens.tolist() == [3]  # not appended yet


def test_attention_reads_the_storage_through_the_read():
    """A hand-built dense CompressedKV holding a known past: the attention function,
    handed only the new chunk, attends over past + chunk exactly like plain attention over
    the whole K/V."""
    g = torch.Generator().manual_seed(0)
    b, hq, past, s, cap = 2, 4, 9, 2, 16
    keys = torch.randn(b, HKV, past + s, D, generator=g)
    values = torch.randn(b, HKV, past + s, D, generator=g)
    query = torch.randn(b, hq, s, D, generator=g)
    k_store = torch.zeros(b, HKV, cap, D)
    v_store = torch.zeros(b, HKV, cap, D)
    k_store[:, :, : past + s] = keys
    v_store[:, :, : past + s] = values
    lengths = torch.full((b,), past + s, dtype=torch.int32)
    kv = CompressedKV(**_kv_fields("dense", k_store, v_store, lengths))
    appended = []
    read = CacheRead(kv, 3, past + s, False, lambda k, v: appended.append(k))
    chunk_k = sk_attn.attach_cache_read(keys[:, :, past:], read)
    out, _ = sk_attn.sentinel_attention_forward(
        _Module(3), query, chunk_k, values[:, :, past:], None
    )
    # Plain causal attention of the last s positions over all past + s keys (fp64).
    rep = hq // HKV
    k64 = keys.double().repeat_interleave(rep, 1)
    v64 = values.double().repeat_interleave(rep, 1)
    scores = query.double() @ k64.transpose(-1, -2) / math.sqrt(D)
    pos = torch.arange(past + s)
    visible = pos[None, :] <= (past + torch.arange(s))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    want = (scores.softmax(-1) @ v64).transpose(1, 2)
    assert rel_error(out.double(), want) < 1e-5
    assert read.claimed and not appended
    # Poisoning the storage changes the result: the past was read from kv, not the chunk.
    k_store[:, :, 0] = 1e4
    read2 = CacheRead(kv, 3, past + s, False, lambda k, v: None)
    out2, _ = sk_attn.sentinel_attention_forward(
        _Module(3),
        query,
        sk_attn.attach_cache_read(keys[:, :, past:], read2),
        values[:, :, past:],
        None,
    )
    assert rel_error(out2.double(), want) > 1e-2


def test_keys_without_a_usable_read_are_attended_as_given():
    """No read, a read of another layer, or one claimed already: plain attention over the
    given keys/values (the compressed past is ignored), as before the contract."""
    g = torch.Generator().manual_seed(1)
    b, hq, s = 1, 4, 5
    q = torch.randn(b, hq, s, D, generator=g)
    k = torch.randn(b, HKV, s, D, generator=g)
    v = torch.randn(b, HKV, s, D, generator=g)
    plain, _ = sk_attn.sentinel_attention_forward(_Module(0), q, k, v, None)
    cache = kvc.kv_cache(_model(), "int8", max_cache_len=16)
    cache.update(torch.randn(b, HKV, 7, D), torch.randn(b, HKV, 7, D), 0)
    cache.layers[0].last_read.claim()
    other = getattr(cache.update(k, v, 0)[0], sk_attn.CACHE_READ_ATTR)
    tagged = sk_attn.attach_cache_read(k, other)
    wrong_layer, _ = sk_attn.sentinel_attention_forward(_Module(1), q, tagged, v, None)
    assert torch.equal(wrong_layer, plain) and not other.claimed
    first, _ = sk_attn.sentinel_attention_forward(_Module(0), q, tagged, v, None)
    assert other.claimed and not torch.equal(first, plain)  # read the 7 cached positions
    again, _ = sk_attn.sentinel_attention_forward(_Module(0), q, tagged, v, None)
    assert torch.equal(again, plain)


def test_unclaimed_read_raises_on_the_next_update_until_reset():
    cache = kvc.kv_cache(_model(), "int8", max_cache_len=16)
    k, v = torch.randn(1, HKV, 2, D), torch.randn(1, HKV, 2, D)
    cache.update(k, v, 0)
    with pytest.raises(RuntimeError, match="not followed by the sentinel attention"):
        cache.update(k, v, 1)
    cache.reset()
    cache.update(k, v, 0)  # reset forgot the unclaimed read
    cache.reset()
    # Another cache's pending read does not concern this one.
    other = kvc.kv_cache(_model(), "int8", max_cache_len=16)
    other.update(k, v, 0)
    cache.update(k, v, 0)


def test_forward_claims_every_layer_read():
    model = _model()
    cache = kvc.kv_cache(model, "int4", max_cache_len=40, key_block=0, recent=4)
    feed_in_pieces(model, random_ids(1, 30), cache, [10, 11, 30])
    assert all(layer.last_read.claimed for layer in cache.layers)
    assert all(not layer.last_read.deferred for layer in cache.layers)


# --------------------------------------------------------------------------------------
# attend_compressed: per-row lengths
# --------------------------------------------------------------------------------------


def _row_cat(kvs: list[CompressedKV]) -> CompressedKV:
    def cat(name):
        ts = [getattr(kv, name) for kv in kvs]
        return None if ts[0] is None else torch.cat(ts, dim=0)

    first = kvs[0]
    return CompressedKV(
        format=first.format,
        k_codes=cat("k_codes"),
        v_codes=cat("v_codes"),
        k_scales=cat("k_scales"),
        v_scales=cat("v_scales"),
        k_ring=cat("k_ring"),
        v_ring=cat("v_ring"),
        lengths=cat("lengths"),
        key_block=first.key_block,
        wrap=first.wrap,
        num_kv_heads=first.num_kv_heads,
        head_dim=first.head_dim,
        latent=first.latent,
    )


@pytest.mark.parametrize(
    "spec,kw",
    [("int8", {"recent": 4}), ("int4", {"key_block": 16}), ("int4", {"key_block": 0})],
)
def test_attend_compressed_rows_at_different_lengths(spec, kw):
    """Rows of one CompressedKV at lengths 5 and 23 (continuous batching) give what each
    row gives alone, and match the fp64 reference over the contract's fields."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in (5, 23):
        layer = kvc.kv_cache(model, spec, max_cache_len=32, **kw).layers[0]
        layer.append(torch.randn(1, HKV, n, D, generator=g), torch.randn(1, HKV, n, D, generator=g))
        rows.append(layer.compressed)
    kv = _row_cat(rows)
    assert kv.lengths.tolist() == [5, 23]
    q = torch.randn(2, 4, 1, D, generator=g)
    with torch.inference_mode():
        both = sk_attn.attend_compressed(kv, q)
        alone = torch.cat([sk_attn.attend_compressed(r, q[i : i + 1]) for i, r in enumerate(rows)])
    assert rel_error(both, alone) < 1e-6
    want = decode_oracle(
        q,
        kv.k_codes,
        kv.v_codes,
        kv.lengths,
        kv_format=kv.format,
        k_scale=kv.k_scales,
        v_scale=kv.v_scales,
        k_recent=kv.k_ring,
        v_recent=kv.v_ring,
        key_block=kv.key_block,
    )
    assert rel_error(both.double(), want) < 1e-5

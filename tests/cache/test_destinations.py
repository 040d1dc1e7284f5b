"""``SentinelKVCache.set_destinations`` / ``SentinelKVLayer.store_positions``: a prefill
of prompts packed one after another in one row stores each position straight into its
request's row, with the codes and scales an append of that prompt alone writes."""

from __future__ import annotations

import pytest
import torch

from sentinel_kernels.cache import kv_cache
from sentinel_kernels.cache.slots import row_view, set_host_length, stack_lengths
from tests.helpers import tiny_model

STORES = ("k_store", "v_store", "k_scale", "v_scale")
SPECS = [("dense", {}), ("int8", {}), ("int4", {"recent": 0, "key_block": 0})]


def _poisoned(model, spec: str, kw: dict, rows: int, length: int):
    cache = kv_cache(model, spec, max_cache_len=length, batch_size=rows, **kw)
    for layer in cache._layers:
        for name in STORES:
            t = getattr(layer, name)
            if t is not None:
                t.fill_(7 if t.dtype in (torch.int8, torch.uint8) else 3.5)
    return cache


@pytest.mark.parametrize(("spec", "kw"), SPECS, ids=[s for s, _ in SPECS])
def test_store_positions_writes_what_an_append_of_each_prompt_writes(spec, kw):
    """Random keys/values of three prompts (7, 1 and 12 positions) packed in one chunk,
    sent to rows 4, 0 and 2: each destination row's first positions hold, bit for bit,
    the codes and scales an append of that prompt alone into an empty row writes; every
    other position and row keeps its poison, and no length moves."""
    model = tiny_model("llama", level=1)
    sizes, dest = (7, 1, 12), (4, 0, 2)
    rows, length = 6, 16
    cache = _poisoned(model, spec, kw, rows, length)
    before = {
        (i, name): getattr(layer, name).clone()
        for i, layer in enumerate(cache._layers)
        for name in STORES
        if getattr(layer, name) is not None
    }
    first = cache._layers[0]
    g = torch.Generator().manual_seed(5)
    shape = (1, first.num_heads, sum(sizes), first.head_dim)
    drow = torch.tensor([d for d, n in zip(dest, sizes, strict=True) for _ in range(n)])
    dpos = torch.tensor([p for n in sizes for p in range(n)])
    chunks = []
    for layer in cache._layers:
        k, v = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
        layer.store_positions(k, v, drow, dpos.to(torch.int32))
        chunks.append((k, v))
    assert not any(layer.cache_lens.any() for layer in cache._layers)
    for i, (layer, (k, v)) in enumerate(zip(cache._layers, chunks, strict=True)):
        at = 0
        for n, d in zip(sizes, dest, strict=True):
            alone = _poisoned(model, spec, kw, 1, length)._layers[i]
            alone.append(k[:, :, at : at + n], v[:, :, at : at + n])
            at += n
            for name in STORES:
                t = getattr(layer, name)
                if t is None:
                    continue
                want = getattr(alone, name)[0, :, :n]
                assert torch.equal(t[d, :, :n], want), (spec, name, i, d)
                assert torch.equal(t[d, :, n:], before[(i, name)][d, :, n:]), (spec, name, d)
        for name in STORES:
            t = getattr(layer, name)
            if t is not None:
                for r in (1, 3, 5):
                    assert torch.equal(t[r], before[(i, name)][r]), (spec, name, r)


def test_a_packed_forward_fills_each_row_as_its_prompt_alone():
    """Three prompts packed in one forward (20 positions, more than the cache's 16) through
    a one-row view with segment starts and destinations: rows 4, 0 and 2 hold what a
    prefill of each prompt alone stores (up to float rounding: the packed row's matmuls
    and attention add in another order), the view's own row is untouched."""
    model = tiny_model("llama", level=1)
    torch.manual_seed(3)
    prompts = [torch.randint(3, 250, (n,)).tolist() for n in (7, 1, 12)]
    dest = [4, 0, 2]
    cache = _poisoned(model, "dense", {}, 6, 16)
    lengths = stack_lengths(cache)
    own = [layer.k_store[5].clone() for layer in cache._layers]
    view = row_view(cache, 5, 6)
    ids = torch.tensor([sum(prompts, [])])
    pos = torch.tensor([[p for pr in prompts for p in range(len(pr))]])
    seg = torch.tensor([[sum(map(len, prompts[:k])) for k, pr in enumerate(prompts) for _ in pr]])
    drow = torch.tensor([d for d, pr in zip(dest, prompts, strict=True) for _ in pr])
    set_host_length(view, 0)
    view.set_segment_starts(seg)
    view.set_destinations(cache, drow, pos[0])
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, past_key_values=view, use_cache=True)
    view.set_segment_starts(None)
    view.set_destinations(None)
    assert not lengths.any()  # the caller sets the lengths
    for prompt, d in zip(prompts, dest, strict=True):
        alone = _poisoned(model, "dense", {}, 1, 16)
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt]), past_key_values=alone, use_cache=True)
        n = len(prompt)
        for layer, ref in zip(cache._layers, alone._layers, strict=True):
            for name in ("k_store", "v_store"):
                got, want = getattr(layer, name)[d, :, :n], getattr(ref, name)[0, :, :n]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(
        torch.equal(layer.k_store[5], o) for layer, o in zip(cache._layers, own, strict=True)
    )


def test_destinations_are_checked():
    model = tiny_model("llama", level=1)
    cache = kv_cache(model, "dense", max_cache_len=16, batch_size=4)
    view = row_view(cache, 3, 4)
    idx = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="one-row view"):
        row_view(cache, 0, 2).set_destinations(cache, idx, idx)
    with pytest.raises(ValueError, match="1-D integer"):
        view.set_destinations(cache, idx, idx[:4])
    with pytest.raises(ValueError, match="1-D integer"):
        view.set_destinations(cache, idx.float(), idx)
    with pytest.raises(ValueError, match="1-D integer"):
        view.set_destinations(cache, None, None)
    with pytest.raises(ValueError, match="another format"):
        view.set_destinations(kv_cache(model, "int8", max_cache_len=16, batch_size=4), idx, idx)
    kivi = kv_cache(model, "int4", max_cache_len=64, batch_size=2)
    with pytest.raises(ValueError, match="each position"):
        row_view(kivi, 1, 2).set_destinations(kivi, idx, idx)
    # a forward whose length differs from the index tensors, or over a stored past
    view.set_destinations(cache, idx, idx)
    with torch.no_grad(), pytest.raises(ValueError, match="one per position"):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=view, use_cache=True)
    set_host_length(view, 2)
    with torch.no_grad(), pytest.raises(ValueError, match="empty view only"):
        model(input_ids=torch.tensor([[5] * 5]), past_key_values=view, use_cache=True)
    view.set_destinations(None)
    assert all(layer.destinations is None for layer in view._layers)

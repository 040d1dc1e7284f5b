"""``copy_rows`` and ``move_rows``: rows of a slotted cache copied to other rows, in every
cache format."""

from __future__ import annotations

import pytest
import torch

from sentinel_kernels.cache import kv_cache
from sentinel_kernels.cache.slots import copy_rows, move_rows
from tests.helpers import tiny_model

STORES = ("k_store", "v_store", "k_scale", "v_scale", "k_recent", "v_recent")


def _filled(spec: str, batch: int, length: int):
    model = tiny_model("llama", level=0)
    cache = kv_cache(model, spec, max_cache_len=length, batch_size=batch)
    g = torch.Generator().manual_seed(0)
    for layer in cache._layers:
        for name in STORES:
            t = getattr(layer, name)
            if t is not None:
                t.copy_((torch.randn(t.shape, generator=g) * 50).to(t.dtype))
    return cache


def _snapshot(cache) -> dict:
    """Every storage tensor of every layer, cloned, by (layer, name)."""
    return {
        (i, name): getattr(layer, name).clone()
        for i, layer in enumerate(cache._layers)
        for name in STORES
        if getattr(layer, name) is not None
    }


def _upto(layer, name: str, n: int, width: int) -> int:
    """How far along a store a row's first ``n`` positions reach (``width``: its size)."""
    if name == "k_scale" and layer.key_block:
        return -(-n // layer.key_block)
    return width if name.endswith("recent") else n


@pytest.mark.parametrize("spec", ["dense", "int8", "int4"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_copy_rows_copies_the_first_n_positions(spec, as_tensor):
    batch, length = 6, 64
    for n in (length, 17):  # the whole row (contiguous views) and a prefix
        cache = _filled(spec, batch, length)
        before = _snapshot(cache)
        dst = [5, 0]
        copy_rows(cache, 2, torch.tensor(dst) if as_tensor else dst, n)
        for (i, name), old in before.items():
            layer = cache._layers[i]
            new = getattr(layer, name)
            upto = _upto(layer, name, n, new.shape[2])
            assert torch.equal(new[[5, 0], :, :upto], old[2:4, :, :upto]), (spec, name, n)
            assert torch.equal(new[[5, 0], :, upto:], old[[5, 0], :, upto:]), (spec, name, n)
            assert torch.equal(new[1:5], old[1:5]), (spec, name, n)


def test_copy_rows_rejects_bad_rows():
    cache = _filled("dense", 4, 16)
    for src, dst, n in [(3, [0, 1], 4), (0, [0], 4), (0, [1, 1], 4), (0, [1], 17), (0, [9], 4)]:
        with pytest.raises(ValueError, match="copy_rows"):
            copy_rows(cache, src, dst, n)
    with pytest.raises(ValueError, match="copy_rows"):
        copy_rows(cache, 0, torch.tensor([1.0]), 4)


@pytest.mark.parametrize("spec", ["dense", "int8", "int4"])
def test_move_rows_copies_scattered_rows(spec):
    batch, length, n = 7, 64, 23
    cache = _filled(spec, batch, length)
    before = _snapshot(cache)
    src, dst = [6, 3, 5], [1, 0, 2]
    move_rows(cache, src, dst, n)
    for (i, name), old in before.items():
        layer = cache._layers[i]
        new = getattr(layer, name)
        upto = _upto(layer, name, n, new.shape[2])
        assert torch.equal(new[dst, :, :upto], old[src, :, :upto]), (spec, name)
        assert torch.equal(new[dst, :, upto:], old[dst, :, upto:]), (spec, name)
        assert torch.equal(new[[3, 4, 5, 6]], old[[3, 4, 5, 6]]), (spec, name)


def test_move_rows_rejects_bad_rows():
    cache = _filled("dense", 4, 16)
    bad = [([1], [1], 4), ([1, 2], [0], 4), ([1, 1], [0, 2], 4), ([1], [0], 17), ([4], [0], 4)]
    for src, dst, n in bad:
        with pytest.raises(ValueError, match="move_rows"):
            move_rows(cache, src, dst, n)
    move_rows(cache, [], [], 4)  # nothing to move

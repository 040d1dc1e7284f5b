"""The engine's prefix cache: a prompt that starts like an earlier one copies that
prefix's KV and prefills only the rest, with the same greedy output (dense cache)."""

from __future__ import annotations

import random

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams
from sentinel_kernels.serve.prefix_cache import PrefixCache
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _reference(model, prompt: list[int], n: int) -> list[int]:
    out = sk.generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


def test_lookup_finds_the_longest_stored_block_prefix():
    pc = PrefixCache([7, 8], block=4, max_tokens=63)
    a = list(range(10, 31))  # 21 tokens: stored as 20
    assert pc.lookup(a) is None
    assert pc.insert(a) == (8, 20)
    assert pc.insert(a) is None  # already stored
    assert pc.lookup(a) == (8, 20)
    assert pc.lookup(a[:20]) == (8, 16)  # one token must be left to prefill
    assert pc.lookup(a[:9] + [99] * 12) == (8, 8)
    assert pc.lookup([99] + a) is None
    assert pc.lookup(a[:4]) is None  # nothing left to prefill after 4
    st = pc.stats()
    assert (st["hits"], st["misses"], st["hit_tokens"], st["stored"]) == (3, 3, 44, 1)


def test_least_recently_used_prefix_is_evicted():
    pc = PrefixCache([0, 1], block=2, max_tokens=10)
    a, b, c = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]
    ra, _ = pc.insert(a)
    rb, _ = pc.insert(b)
    assert pc.lookup(a) == (ra, 4)  # a is now the most recent
    rc, _ = pc.insert(c)
    assert rc == rb and pc.stats()["evictions"] == 1
    assert pc.lookup(b) is None and pc.lookup(a) == (ra, 4) and pc.lookup(c) == (rc, 4)


def test_a_hash_collision_is_not_a_hit():
    pc = PrefixCache([0], block=2, max_tokens=10)
    pc.insert([1, 2, 3, 4, 5])
    # Point the chain hash of another prompt at the stored row: tokens differ, so no hit.
    other = [9, 9, 9, 9, 9]
    pc._index[pc._chain(other, 2)[-1]] = 0
    assert pc.lookup(other) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="row"):
        PrefixCache([], 4, 10)
    with pytest.raises(ValueError, match="block"):
        PrefixCache([1], 0, 10)
    model = tiny_model("llama", level=2)  # int8 KV cache
    with pytest.raises(ValueError, match="dense KV cache"):
        Engine(model, None, max_slots=2, max_seq_len=64, prefix_cache_tokens=128)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_hits_give_the_same_greedy_output_with_fewer_prefill_tokens(arch):
    model = tiny_model(arch, level=1)
    rng = random.Random(3)
    system = [rng.randrange(3, 256) for _ in range(37)]
    turns = [system + [rng.randrange(3, 256) for _ in range(3 + i)] for i in range(9)]
    # a chat: the next prompt extends an earlier prompt (48 tokens, stored whole)
    turns.append(turns[8] + [5, 6, 7, 8, 9] * 4)
    params = SamplingParams(max_tokens=6, **GREEDY)
    refs = [_reference(model, p, 6) for p in turns]
    stats = {}
    for tokens in (0, 512):
        with Engine(
            model, None, max_slots=4, max_seq_len=128, max_wait_ms=0, prefix_cache_tokens=tokens
        ) as engine:
            first = engine.generate(turns[:3], params)  # may be one left-padded batch
            before = engine.stats()
            rest = [engine.generate([p], params)[0] for p in turns[3:]]
            after = engine.stats()
            stats[tokens] = {
                k: after[k] - before[k] for k in ("prefix_hit_tokens", "prefill_tokens")
            }
            stats[tokens]["cache"] = after["prefix_cache"]
            assert not engine._runner.lengths[:, : engine.max_slots].any()
        assert [o.token_ids for o in first + rest] == refs
    off, on = stats[0], stats[512]
    assert off["cache"] is None and off["prefix_hit_tokens"] == 0
    # turns 3..8 (40-48 tokens) each reuse the system prompt's first 32 tokens; the chat
    # turn reuses all 48 tokens of turn 8
    assert on["prefix_hit_tokens"] == 6 * 32 + 48
    assert on["prefill_tokens"] == off["prefill_tokens"] - on["prefix_hit_tokens"]
    assert on["cache"]["hits"] >= 7


def test_a_one_row_prefix_cache_evicts_and_stays_correct():
    model = tiny_model("llama", level=1)
    rng = random.Random(4)
    a = [rng.randrange(3, 256) for _ in range(40)]
    b = [rng.randrange(3, 256) for _ in range(40)]
    prompts = [a + [1], b + [2], a + [3], a + [4], b + [5]]
    params = SamplingParams(max_tokens=5, **GREEDY)
    with Engine(
        model, None, max_slots=2, max_seq_len=64, max_wait_ms=0, prefix_cache_tokens=64
    ) as engine:
        outs = [engine.generate([p], params)[0].token_ids for p in prompts]
        st = engine.stats()["prefix_cache"]
    assert outs == [_reference(model, p, 5) for p in prompts]
    assert st["capacity"] == 1 and st["hits"] == 1 and st["evictions"] >= 2

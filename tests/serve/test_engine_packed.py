"""Packed prefill: the whole prompts of a step one after another in one row, each
prompt's queries kept inside it (``SentinelKVCache.set_segment_starts``), each position
stored straight into its slot (``SentinelKVCache.set_destinations``). Greedy outputs
equal each request alone; no pads are computed."""

from __future__ import annotations

import random

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.cache import kv_cache
from sentinel_kernels.serve import Engine, SamplingParams
from sentinel_kernels.serve.runner import ModelRunner, packed_widths
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _reference(model, prompt: list[int], n: int) -> list[int]:
    out = sk.generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


ARCH_LEVELS = [(a, lv) for a in ("llama", "qwen2", "mistral", "gpt2") for lv in (0, 1, 2)]


@pytest.mark.parametrize(
    ("arch", "level"), ARCH_LEVELS, ids=[f"{a}-L{lv}" for a, lv in ARCH_LEVELS]
)
def test_a_packed_burst_equals_each_request_alone(arch, level):
    """Twelve prompts of 1-40 tokens arriving together: packed into forwards of up to 16
    prompts and 128 tokens, prefilled without a pad, each greedy output equal to
    ``sk.generate`` of the request alone."""
    model = tiny_model(arch, level=level)
    rng = random.Random(7 + level)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    news = [rng.randint(1, 10) for _ in prompts]
    refs = [_reference(model, p, n) for p, n in zip(prompts, news, strict=True)]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in news]
    with Engine(
        model,
        None,
        max_slots=12,
        max_seq_len=96,
        max_prefill_tokens=128,
        max_wait_ms=5000.0,  # the first arrival waits for the others
        packed_prefill=True,
    ) as engine:
        streams = [engine.submit(p, q) for p, q in zip(prompts, params, strict=True)]
        outs = [s.result(timeout=120).token_ids for s in streams]
        st = engine.stats()
        assert not engine._runner.lengths.any()
    assert st["packed_width"] == 128  # max_prefill_tokens: beyond max_seq_len (96)
    assert outs == refs
    total = sum(map(len, prompts))
    assert st["prefill_tokens"] == st["prefill_computed_tokens"] == total  # no pads
    # in arrival order, as many prompts per forward as fit 128 tokens
    assert st["prefill_chunks"] < len(prompts)


@pytest.mark.parametrize("spec", ["dense", "int8"])
def test_packed_and_padded_prefill_give_the_same_tokens(spec):
    """The same workload through the packed and the left-padded prefill: equal greedy
    tokens, per-token KV formats included (each position is quantized alone, so moving it
    changes nothing), and the packed one computes fewer prompt positions."""
    model = tiny_model("llama", level=1)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(20)]
    params = SamplingParams(max_tokens=6, **GREEDY)
    outs, stats = {}, {}
    for packed in (False, True):
        with Engine(
            model,
            None,
            max_slots=8,
            max_seq_len=128,
            max_prefill_tokens=128,
            kv_cache=spec,
            packed_prefill=packed,
        ) as engine:
            outs[packed] = [o.token_ids for o in engine.generate(prompts, params)]
            stats[packed] = engine.stats()
    assert outs[True] == outs[False]
    assert stats[True]["packed_width"] == 128 and stats[False]["packed_width"] == 0
    assert stats[True]["prefill_computed_tokens"] == stats[True]["prefill_tokens"]
    assert stats[True]["prefill_computed_tokens"] <= stats[False]["prefill_computed_tokens"]


def test_packing_is_off_where_positions_cannot_move_alone():
    """INT4 keeps a full-precision ring of the last positions: its rows cannot be
    scattered position by position, so prompts are left-padded as before."""
    model = tiny_model("llama", level=1)
    with Engine(
        model, None, max_slots=4, max_seq_len=64, kv_cache="int4", packed_prefill=True
    ) as engine:
        assert engine.stats()["packed_width"] == 0
        outs = engine.generate([[5, 6, 7], [8] * 9], SamplingParams(max_tokens=3, **GREEDY))
    assert [len(o.token_ids) for o in outs] == [3, 3]


def test_packed_widths_round_up_by_little():
    assert packed_widths(1024) == (32, 64, 128, 256, 384, 512, 768, 1024)
    assert packed_widths(2048) == (32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048)
    assert packed_widths(100) == (32, 64, 100)
    assert packed_widths(300) == (32, 64, 128, 256, 300)
    assert packed_widths(600) == (32, 64, 128, 256, 384, 512, 600)
    assert len(packed_widths(8192)) == 24
    for total in range(1, 8193):
        width = min(w for w in packed_widths(8192) if w >= total)
        if total <= 128:
            assert width == 32 or width < 2 * total  # small totals: doubling widths
        elif total <= 512:
            assert width - total < 128
        elif total <= 2048:
            assert width - total < 256
        else:
            assert width - total < 512


def test_segment_starts_are_checked_and_only_prefill_empty_rows():
    model = tiny_model("llama", level=1)
    cache = kv_cache(model, "dense", max_cache_len=32, batch_size=1)
    with pytest.raises(ValueError, match="integer"):
        cache.set_segment_starts(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch=1"):
        cache.set_segment_starts(torch.zeros(2, 4, dtype=torch.int64))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.set_segment_starts(torch.zeros(1, 2, dtype=torch.int32))
        with pytest.raises(ValueError, match="empty rows only"):
            model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True)


def test_packed_prefill_with_the_prefix_cache():
    """Prompts sharing a 40-token system prompt: the first ones are packed and their
    prefixes stored, the later ones start from the stored prefix (their rest is a chunk
    over it); every output equals the request alone."""
    model = tiny_model("llama", level=1)
    rng = random.Random(3)
    system = [rng.randrange(3, 256) for _ in range(40)]
    prompts = [
        system + [rng.randrange(3, 256) for _ in range(rng.randint(1, 20))] for _ in range(10)
    ]
    refs = [_reference(model, p, 6) for p in prompts]
    params = SamplingParams(max_tokens=6, **GREEDY)
    with Engine(
        model,
        None,
        max_slots=8,
        max_seq_len=128,
        max_prefill_tokens=128,
        prefix_cache_tokens=256,
        packed_prefill=True,
    ) as engine:
        outs = engine.generate(prompts[:3], params) + engine.generate(prompts[3:], params)
        st = engine.stats()
    assert st["packed_width"] == 128 and st["prefix_hit_tokens"] > 0
    assert [o.token_ids for o in outs] == refs


def test_a_long_prompt_is_chunked_beside_packed_prompts():
    """A 150-token prompt with a 64-token budget: its first chunk is packed like a whole
    prompt, its later chunks read the stored past from its slot, while short prompts are
    packed around it; every output equals the request alone, and no pad is computed."""
    model = tiny_model("llama", level=1)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (150, 7, 30, 90)]
    refs = [_reference(model, p, 5) for p in prompts]
    with Engine(
        model, None, max_slots=4, max_seq_len=192, max_prefill_tokens=64, packed_prefill=True
    ) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=5, **GREEDY))
        st = engine.stats()
    assert [o.token_ids for o in outs] == refs
    assert st["packed_width"] == 64
    assert st["prefill_tokens"] == st["prefill_computed_tokens"] == sum(map(len, prompts))
    assert st["prefill_chunks"] >= 150 // 64 + 1


def test_pack_inputs_layout():
    """The packed prefill's host inputs, checked entry by entry against their definition
    (built with numpy over the host tensor's memory since session 21)."""
    model = tiny_model("llama", level=1)
    runner = ModelRunner(
        model,
        "dense",
        max_slots=6,
        max_seq_len=64,
        device=torch.device("cpu"),
        use_graph=False,
        packed_tokens=32,
    )
    prompts, slots, width, rows = [[11, 12, 13], [21], [31, 32]], [4, 0, 2], 8, runner.pack_rows
    host = torch.full((5 * width + 3 * rows,), -7, dtype=torch.int64)
    runner._pack_inputs(host, slots, prompts, width, rows)
    ids, pos, seg, drow, dpos = host[: 5 * width].view(5, width).tolist()
    last, slot, length = host[5 * width :].view(3, rows).tolist()
    spare = runner.spare_row
    assert ids == [11, 12, 13, 21, 31, 32, 0, 0]
    assert pos == [0, 1, 2, 0, 0, 1, 0, 0]
    assert seg == [0, 0, 0, 3, 4, 4, 6, 7]  # pads: each its own segment
    assert drow == [4, 4, 4, 0, 2, 2, spare, spare]
    assert dpos == [0, 1, 2, 0, 0, 1, 6, 7]  # pads at their place in the spare row
    assert last == [2, 3, 5] + [width - 1] * (rows - 3)
    assert slot == [4, 0, 2] + [spare] * (rows - 3)
    assert length == [3, 1, 2] + [0] * (rows - 3)


def test_decode_inputs_of_unequal_lengths_are_refused():
    model = tiny_model("llama", level=1)
    runner = ModelRunner(
        model, "dense", max_slots=4, max_seq_len=64, device=torch.device("cpu"), use_graph=False
    )
    with pytest.raises(ValueError, match="differ in length"):
        runner.decode([1, 2], [0], [1, 1])


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_more_prefill_forwards_a_step_fill_the_batch_sooner(packed):
    """``max_prefill_forwards=4``: a burst of twelve prompts is prefilled in fewer steps
    (the decode batch holds all twelve after fewer decode steps) than with one forward a
    step, and every greedy output still equals ``sk.generate`` of the request alone."""
    model = tiny_model("llama", level=1)
    rng = random.Random(23)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(20, 40))] for _ in range(12)]
    refs = [_reference(model, p, 12) for p in prompts]
    params = SamplingParams(max_tokens=12, **GREEDY)
    steps_to_full = {}
    for forwards in (1, 4):
        rows: list[int] = []
        with Engine(
            model,
            None,
            max_slots=12,
            max_seq_len=128,
            max_prefill_tokens=64,
            max_wait_ms=5000.0,  # the first arrival waits for the others
            packed_prefill=packed,
            max_prefill_forwards=forwards,
        ) as engine:
            engine.step_observer = rows.append
            streams = [engine.submit(p, params) for p in prompts]
            outs = [s.result(timeout=120).token_ids for s in streams]
            st = engine.stats()
        assert outs == refs, forwards
        assert st["max_prefill_forwards"] == forwards and st["max_prefill_tokens"] == 64
        assert st["prefill_tokens"] == sum(map(len, prompts))
        assert len(prompts) in rows, rows
        steps_to_full[forwards] = rows.index(len(prompts))
    # 64 tokens a step take 1-3 of these prompts; 256 take 6-12
    assert steps_to_full[4] < steps_to_full[1], steps_to_full
    assert steps_to_full[1] >= 4, steps_to_full


def test_max_prefill_forwards_is_checked():
    model = tiny_model("llama", level=0)
    with pytest.raises(ValueError, match="max_prefill_forwards"):
        Engine(model, None, max_slots=2, max_seq_len=64, max_prefill_forwards=0)
    with pytest.raises(TypeError, match="max_prefill_forwards"):
        Engine(model, None, max_slots=2, max_seq_len=64, max_prefill_forwards=2.5)


@pytest.mark.parametrize("packed", [False, True])
def test_decode_steps_read_the_key_mask_only_for_padded_rows(packed):
    """A decode step reads the slot key mask only when a decoding row has pads (rows of a
    left-padded prefill); packed rows have none, so their steps run without it, with the
    same tokens. Wherever a slot has no pads its mask row is all ones (what makes the
    maskless step equal)."""
    model = tiny_model("llama", level=1)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(10)]
    refs = [_reference(model, p, 5) for p in prompts]
    seen_pads = False
    with Engine(
        model,
        None,
        max_slots=8,
        max_seq_len=64,
        max_prefill_tokens=128,
        max_wait_ms=5000.0,  # the first arrival waits: one batched prefill
        packed_prefill=packed,
    ) as engine:
        runner = engine._runner
        streams = [engine.submit(p, SamplingParams(max_tokens=5, **GREEDY)) for p in prompts]
        outs = [s.result(timeout=120).token_ids for s in streams]
        st = engine.stats()
        seen_pads = st["masked_steps"] > 0
        for slot, offset in enumerate(runner.row_offset):
            if offset == 0:
                assert bool(runner.key_mask[slot].all()), slot
    assert outs == refs
    if packed:
        assert st["packed_width"] > 0 and st["masked_steps"] == 0
    else:
        assert seen_pads  # the left-padded batch's shorter rows have pads
        assert 0 < st["masked_steps"] <= st["decode_steps"]


def test_step_needs_mask_looks_at_decoding_rows_only():
    """The step reads the mask when some *decoding* row has pads; an idle row's pads
    (its output is thrown away, its append taken back) do not count."""
    model = tiny_model("llama", level=1)
    with Engine(model, None, max_slots=4, max_seq_len=32, packed_prefill=False) as engine:
        runner = engine._runner
        assert not runner.step_needs_mask(4)
        runner.row_offset[2] = 3
        try:
            assert runner.step_needs_mask(4)
            assert runner.step_needs_mask(3, [0, 0, 1])
            assert not runner.step_needs_mask(3, [1, 1, 0])
            assert not runner.step_needs_mask(2)
        finally:
            runner.row_offset[2] = 0


class _CountingGraph:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def test_maskless_graphs_are_skipped_for_steps_that_need_the_mask():
    """The GPU dispatch of a decode step, with stand-in graphs on the CPU: graphs captured
    without the key mask serve only steps whose decoding rows have no pads; a step with a
    padded decoding row runs eagerly, with the mask, and gives the masked step's logits.
    Graphs captured with the mask serve every step."""
    model = tiny_model("llama", level=1)

    def runner() -> ModelRunner:
        r = ModelRunner(
            model, "dense", max_slots=4, max_seq_len=64, device=torch.device("cpu"), use_graph=False
        )
        r.prefill([0, 1], [[5, 6, 7, 8, 9, 10], [11, 12, 13]])  # slot 1: three pads
        return r

    plain, faked = runner(), runner()
    assert faked.row_offset[:2] == [0, 3]
    fake = _CountingGraph()
    junk = torch.full((2, model.config.vocab_size), 7.0)
    faked.graphs_masked = False
    faked._graphs[(2, False)] = (fake, junk)
    args = ([20, 21], [6, 3], [1, 1])
    want = plain.decode(*args).clone()
    got = faked.decode(*args)
    assert fake.replays == 0 and faked.masked_steps == 1  # slot 1 decodes: eager, masked
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert faked.decode([22, 0], [7, 0], [1, 0]) is junk  # only slot 0 decodes: no pads
    assert fake.replays == 1 and faked.masked_steps == 1
    faked.graphs_masked = True
    assert faked.decode([23, 24], [8, 4], [1, 1]) is junk  # a masked graph serves all
    assert fake.replays == 2 and faked.masked_steps == 2

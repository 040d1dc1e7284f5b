"""The short-rows decode plan (``serve.runner.SHORT_ROW_KEYS``): with a cache longer than
that, a decode step whose rows all hold at most that many keys runs its attention planned
for short rows (on a GPU: its own CUDA graph per bucket, one KV split, no merge pass).
The plan changes the work split only: greedy outputs equal ``sk.generate`` alone."""

from __future__ import annotations

import random
import time

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams
from sentinel_kernels.serve.runner import SHORT_ROW_KEYS, ModelRunner
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _alone(model, prompt, n, device):
    out = sk.generate(
        model, torch.tensor([prompt], device=device), max_new_tokens=n, eos_token_id=[]
    )
    return out[0, len(prompt) :].tolist()


def _generate(engine: Engine, prompts, params, timeout: float) -> list:
    """``engine.generate`` with a deadline: a stuck engine fails the test, naming the
    stats it reached, instead of hanging it."""
    streams = [engine.submit(p, params) for p in prompts]
    try:
        return [s.result(timeout=timeout) for s in streams]
    except TimeoutError as exc:
        raise AssertionError(f"engine not done in {timeout} s: {engine.stats()}") from exc


def _run(device: str) -> None:
    model = tiny_model("llama", level=1).to(device)
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, 256) for _ in range(SHORT_ROW_KEYS + 9)]
    short_prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    params = SamplingParams(max_tokens=6, **GREEDY)
    t0 = time.perf_counter()
    with Engine(model, None, max_slots=4, max_seq_len=1024, max_prefill_tokens=256) as engine:
        # printed with -s or on failure: where a slow GPU run spends its time
        print(f"engine ready in {time.perf_counter() - t0:.1f} s on {device}")
        runner = engine._runner
        assert runner.short_rows
        if device == "cuda":
            assert set(runner._graphs) == {(b, s) for b in runner.buckets for s in (False, True)}
        # a row past SHORT_ROW_KEYS runs in every step: no step takes the short plan
        mixed = _generate(engine, [long_prompt, short_prompts[0]], params, 120.0)
        assert engine.stats()["short_row_steps"] == 0
        assert engine.stats()["decode_steps"] > 0
        # short rows alone: every decode step takes it
        before = engine.stats()["decode_steps"]
        short = _generate(engine, short_prompts, params, 120.0)
        st = engine.stats()
        assert st["short_row_steps"] == st["decode_steps"] - before > 0
        assert st["free_slots"] == 4
    want = [_alone(model, p, 6, device) for p in [long_prompt, short_prompts[0], *short_prompts]]
    assert [o.token_ids for o in [*mixed, *short]] == want


def test_short_row_plan_counts_and_outputs_cpu():
    _run("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_row_graphs_equal_generate_alone_gpu():
    _run("cuda")


def test_no_short_plan_for_a_short_cache():
    model = tiny_model("llama", level=1)
    with Engine(model, None, max_slots=2, max_seq_len=SHORT_ROW_KEYS, max_prefill_tokens=64) as e:
        assert not e._runner.short_rows
        e.generate([[5, 6, 7]], SamplingParams(max_tokens=3, **GREEDY))
        assert e.stats()["short_row_steps"] == 0


@pytest.mark.parametrize("max_seq_len", [64, SHORT_ROW_KEYS, 600, 1024])
@pytest.mark.parametrize("steps", [1, 8])
def test_warm_length_inside_the_plan(max_seq_len, steps):
    """The decode graphs' warm-up step (where the attention autotunes) runs at a length
    the graph serves: short-rows plan within SHORT_ROW_KEYS, the capacity plan past it
    when short rows exist, and the ``steps`` appended still inside the cache."""
    model = tiny_model("llama", level=1)
    with torch.inference_mode():
        runner = ModelRunner(model, "dense", 2, max_seq_len, torch.device("cpu"), use_graph=False)
        plans = (False, True) if runner.short_rows else (False,)
        assert runner.short_rows == (max_seq_len > SHORT_ROW_KEYS)
        for short in plans:
            n = runner._warm_length(short, steps)
            hi = SHORT_ROW_KEYS if short else max_seq_len
            lo = 0 if short or not runner.short_rows else SHORT_ROW_KEYS
            assert lo < n + steps <= hi, (short, n)
            assert n >= (lo + hi) // 2 - steps  # the middle of the range, not an edge
        runner._warm_rows(2, 5)
        assert bool((runner.lengths[:, :2] == 5).all())
        assert runner._inputs[1, :2].tolist() == [5, 5]

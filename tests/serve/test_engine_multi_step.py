"""Multi-step decoding of a lone request (``Engine(multi_step=m)``): while one greedy
request runs alone in slot 0, each engine iteration runs ``m`` decode steps at once
(``ModelRunner.decode_multi``; one CUDA graph on a GPU). The tokens are those of single
steps: greedy outputs equal ``sk.generate`` alone, ends inside a run drop the rest, and the
engine goes back to single steps as soon as anything else arrives."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels import settings
from sentinel_kernels.serve import Engine, SamplingParams
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _alone(model, prompt, n, device="cpu"):
    out = sk.generate(
        model, torch.tensor([prompt], device=device), max_new_tokens=n, eos_token_id=[]
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", level=1)


@pytest.mark.parametrize("fused_pick", ["0", "1"], ids=["argmax", "greedy_advance"])
@pytest.mark.parametrize("max_tokens", [1, 4, 5, 11, 30])
def test_lone_request_equals_generate_alone(model, max_tokens, fused_pick, monkeypatch):
    monkeypatch.setenv(settings.FUSED_PICK_ENV, fused_pick)
    prompt = [5, 17, 99, 3, 42, 8, 250]
    with Engine(model, None, max_slots=4, max_seq_len=64, multi_step=4) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **GREEDY))[0]
        st = engine.stats()
    assert out.token_ids == _alone(model, prompt, max_tokens)
    assert out.finish_reason == "length"
    # the prefill gives token 1; runs of 4 go while 4 more fit
    assert st["multi_steps"] == (max_tokens - 1) // 4
    assert st["decode_steps"] == max_tokens - 1
    assert st["generated_tokens"] == max_tokens and st["free_slots"] == 4


@pytest.mark.parametrize("level", [1, 2])
def test_rope_attention_lone_request_equals_generate_alone(level, monkeypatch):
    """``SENTINEL_ROPE_ATTENTION=1`` (read when the engine's cache is made): the decode
    steps' rotation and append run in the attention; the tokens are ``sk.generate``'s."""
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "1")
    model = tiny_model("llama", level=level)
    prompt = [5, 17, 99, 3, 42, 8, 250]
    with Engine(model, None, max_slots=4, max_seq_len=64, multi_step=4) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=13, **GREEDY))[0]
        assert engine._runner.cache.layers[0].rope_in_attention
    assert out.token_ids == _alone(model, prompt, 13)


def test_an_end_inside_a_run_drops_the_rest(model):
    prompt = [9, 8, 7, 6, 5]
    free = _alone(model, prompt, 20)
    stop = free[6]  # ends in the second run of 4 (tokens 2-5, 6-9)
    want = free[: free.index(stop) + 1]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop,))
    with Engine(model, None, max_slots=2, max_seq_len=64, multi_step=4) as engine:
        out = engine.generate([prompt], params)[0]
        again = engine.generate([prompt], SamplingParams(max_tokens=20, **GREEDY))[0]
        st = engine.stats()
    assert out.finish_reason == "stop" and out.token_ids == want
    assert again.token_ids == free  # the slot the first request freed is clean
    assert st["multi_steps"] > 0 and st["free_slots"] == 2


def test_not_for_sampling_or_logprobs(model):
    prompt = [1, 2, 3, 4]
    with Engine(model, None, max_slots=2, max_seq_len=64, multi_step=4) as engine:
        engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.7, seed=1))
        engine.generate([prompt], SamplingParams(max_tokens=12, logprobs=2, **GREEDY))
        assert engine.stats()["multi_steps"] == 0


def test_arrivals_switch_back_to_single_steps(model):
    """A long lone request runs multi-steps; others arrive from threads while it runs;
    every request still gets the tokens of ``sk.generate`` alone."""
    rng = random.Random(3)
    first = [rng.randrange(3, 256) for _ in range(9)]
    others = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    news = [rng.randint(1, 25) for _ in others]
    results: dict[int, list[int]] = {}
    with Engine(model, None, max_slots=8, max_seq_len=128, max_wait_ms=0.0, multi_step=4) as engine:
        lead = engine.submit(first, SamplingParams(max_tokens=90, **GREEDY))

        def late(i: int) -> None:
            time.sleep(0.01 * i)
            out = engine.submit(others[i], SamplingParams(max_tokens=news[i], **GREEDY))
            results[i] = out.result().token_ids

        threads = [threading.Thread(target=late, args=(i,)) for i in range(len(others))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = lead.result().token_ids
        st = engine.stats()
    assert got == _alone(model, first, 90)
    assert [results[i] for i in range(len(others))] == [
        _alone(model, p, n) for p, n in zip(others, news, strict=True)
    ]
    assert st["multi_steps"] > 0 and st["free_slots"] == 8


def test_cancel_during_multi_steps(model):
    with Engine(model, None, max_slots=2, max_seq_len=200, multi_step=4) as engine:
        stream = engine.submit([4, 5, 6], SamplingParams(max_tokens=190, **GREEDY))
        it = iter(stream)
        next(it)
        stream.cancel()
        out = stream.result()
        assert out.finish_reason == "cancelled"
        deadline = time.monotonic() + 10
        while engine.stats()["free_slots"] != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["free_slots"] == 2
        after = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=9, **GREEDY))[0]
    assert after.token_ids == _alone(model, [4, 5, 6], 9)


def test_multi_step_argument_checked(model):
    with pytest.raises(ValueError, match="multi_step"):
        Engine(model, None, max_slots=2, max_seq_len=32, multi_step=0)
    with pytest.raises(TypeError, match="multi_step"):
        Engine(model, None, max_slots=2, max_seq_len=32, multi_step=2.0)
    with Engine(model, None, max_slots=2, max_seq_len=32) as engine:
        assert engine.multi_step == 1  # the CPU default: off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rope", ["0", "1"], ids=["rope_kv_append", "rope_attention"])
@pytest.mark.parametrize("fused_pick", ["0", "1"], ids=["argmax", "greedy_advance"])
@pytest.mark.parametrize("level", [1, 2])
def test_multi_step_graphs_equal_generate_alone_gpu(level, fused_pick, rope, monkeypatch):
    monkeypatch.setenv(settings.FUSED_PICK_ENV, fused_pick)
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, rope)
    model = tiny_model("llama", level=level).cuda()
    prompt = [7, 3, 200, 19, 64]
    with Engine(model, None, max_slots=4, max_seq_len=1024) as engine:
        assert engine.multi_step == 8
        runner = engine._runner
        assert set(runner._multi_graphs) == {False, True}
        outs = [
            engine.generate([prompt], SamplingParams(max_tokens=n, **GREEDY))[0].token_ids
            for n in (3, 9, 40, 700)
        ]
        st = engine.stats()
    assert outs == [_alone(model, prompt, n, "cuda") for n in (3, 9, 40, 700)]
    assert st["multi_steps"] > 0
    # runs below SHORT_ROW_KEYS count as short-plan steps, the one past it does not
    assert 0 < st["short_row_steps"] < st["decode_steps"]

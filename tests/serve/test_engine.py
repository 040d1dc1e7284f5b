"""The continuous-batching engine on the CPU: outputs equal ``sk.generate`` of each request
alone (bit for bit, greedy, float32) under concurrent arrivals and cancellations, slots
return to free, seeded sampling does not depend on the batch, errors stay with their
request, and bad input is refused clearly."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.quant.lowrank import calibrate_lowrank
from sentinel_kernels.serve import (
    Engine,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
)
from sentinel_kernels.serve.engine import _PhaseClock
from tests.helpers import ByteTokenizer, needs_smollm2, random_text, run_threads, tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _reference(model, prompt: list[int], n: int) -> list[int]:
    """``sk.generate`` of one request alone (greedy, no early stop): the new tokens."""
    out = sk.generate(model, torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])
    return out[0, len(prompt) :].tolist()


def _assert_all_free(engine: Engine) -> None:
    st = engine.stats()
    assert st["free_slots"] == engine.max_slots, st
    assert st["running"] == st["prefilling"] == st["waiting"] == 0, st
    assert not engine._runner.lengths.any(), "a free slot kept tokens"


def _workload(seed: int, n: int, max_prompt: int, max_new: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    news = [rng.randint(1, max_new) for _ in range(n)]
    # every fifth request is cancelled after its second token (it asks for more)
    cancel = [i % 5 == 3 for i in range(n)]
    for i in range(n):
        if cancel[i]:
            news[i] = max_new + 20
    return prompts, news, cancel


ARCH_LEVELS = [(a, lv) for a in ("llama", "qwen2", "mistral", "gpt2") for lv in (0, 1, 2)]


@pytest.mark.parametrize(
    ("arch", "level"), ARCH_LEVELS, ids=[f"{a}-L{lv}" for a, lv in ARCH_LEVELS]
)
def test_concurrent_greedy_equals_generate_alone(arch, level):
    model = tiny_model(arch, level=level)
    n, max_prompt, max_new = 40, 40, 24
    prompts, news, cancel = _workload(1000 + level, n, max_prompt, max_new)
    refs = [_reference(model, p, k) for p, k in zip(prompts, news, strict=True)]
    results: dict[int, object] = {}
    seen_before_cancel: dict[int, list[int]] = {}
    with Engine(
        model, None, max_slots=8, max_seq_len=96, max_prefill_tokens=48, max_wait_ms=1.0
    ) as engine:

        def client(c: int) -> None:
            rng = random.Random(c)
            for j in range(c, n, 4):
                time.sleep(rng.uniform(0, 0.004))  # arrivals while others run
                s = engine.submit(prompts[j], SamplingParams(max_tokens=news[j], **GREEDY))
                if cancel[j]:
                    got = []
                    for t in s:
                        got.append(t)
                        if len(got) == 2:
                            s.cancel()
                            break
                    seen_before_cancel[j] = got
                results[j] = s.result(timeout=120)

        run_threads(client, 4, timeout=300)
        _assert_all_free(engine)
        stats = engine.stats()
    assert stats["gpu_prefill_s"] is None and stats["gpu_decode_s"] is None  # CPU: no clock
    assert stats["host_prefill_s"] is None
    cancelled = 0
    for j in range(n):
        r = results[j]
        if cancel[j]:
            assert r.finish_reason == "cancelled", j
            cancelled += 1
            assert 2 <= len(r.token_ids) < news[j]
            assert r.token_ids == refs[j][: len(r.token_ids)], j
            assert seen_before_cancel[j] == r.token_ids[:2]
        else:
            assert r.finish_reason == "length", j
            assert r.token_ids == refs[j], f"request {j}: engine != sk.generate alone"
        assert r.prompt_tokens == len(prompts[j])
        t = r.timings
        assert t.arrival <= t.admitted <= t.first_token <= t.finished
        assert len(t.token_times) == len(r.token_ids)
    assert cancelled == sum(cancel)
    assert stats["cancelled"] == cancelled and stats["finished"] == n - cancelled
    assert stats["prefill_tokens"] == sum(len(p) for p in prompts)
    # the requests really shared steps: fewer decode steps than decoded tokens
    assert stats["decode_steps"] < stats["decode_tokens"]
    assert stats["generated_tokens"] == sum(len(results[j].token_ids) for j in range(n))


def test_long_prompt_is_prefilled_in_chunks_and_others_keep_decoding():
    model = tiny_model("llama", level=1)
    long_prompt = [random.Random(5).randrange(3, 256) for _ in range(150)]
    short = [7, 8, 9]
    # the short request runs until cancelled, so it is still decoding however late the
    # (possibly starved) test thread submits the long one
    with Engine(model, None, max_slots=4, max_seq_len=256, max_prefill_tokens=32) as engine:
        s_short = engine.submit(short, SamplingParams(max_tokens=250, **GREEDY))
        next(iter(s_short))  # running before the long prompt arrives
        s_long = engine.submit(long_prompt, SamplingParams(max_tokens=8, **GREEDY))
        long_out = s_long.result(timeout=60)
        s_short.cancel()
        short_out = s_short.result(timeout=60)
        st = engine.stats()
        _assert_all_free(engine)
    # 150 tokens in chunks of at most 32 = 5 chunks, plus the short prompt's one
    assert st["prefill_chunks"] == 6 and st["prefill_tokens"] == 153
    # the short request kept decoding while the long one was prefilled chunk by chunk: five
    # chunks take five steps, so at least three of the short one's tokens fall strictly
    # between the long one's admission and its first token (whatever the steps' pipelining)
    lt = long_out.timings
    assert lt.admitted is not None and lt.first_token is not None
    during = [t for t in short_out.timings.token_times if lt.admitted < t < lt.first_token]
    assert len(during) >= 3, (lt, short_out.timings.token_times)
    assert short_out.finish_reason == "cancelled"
    n_short = len(short_out.token_ids)
    assert short_out.token_ids == _reference(model, short, n_short)
    assert len(long_out.token_ids) == 8
    # chunked prefill reads the stored past: close to one whole prefill, not bit-equal
    # in general, so the first tokens are compared against the whole-prompt reference
    ref = _reference(model, long_prompt, 8)
    assert long_out.token_ids[:2] == ref[:2]


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny_model("llama", level=1)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    prompt = [5, 6, 7, 8]
    with Engine(model, None, max_slots=8, max_seq_len=64) as engine:
        alone = engine.generate([prompt], params)[0].token_ids
        others = [SamplingParams(max_tokens=25, temperature=1.3, seed=s) for s in range(3)] + [
            SamplingParams(max_tokens=15, **GREEDY),
            SamplingParams(max_tokens=22),
        ]
        batch = engine.generate(
            [[9, 9], [4] * 10, prompt[:2], [11], [100, 101, 102], prompt],
            [*others, params],
        )
        again = engine.generate([prompt], params)[0].token_ids
        other_seed = engine.generate(
            [prompt], SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=7)
        )[0].token_ids
        _assert_all_free(engine)
    assert batch[-1].token_ids == alone == again
    assert other_seed != alone  # 20 draws from ~40 tokens: equal only by a 1e-20 fluke


def test_stop_token_and_eos_end_a_request():
    model = tiny_model("llama", level=1)
    prompt = [3, 4, 5, 6]
    free = _reference(model, prompt, 30)
    stop_tok = free[10]
    first = free.index(stop_tok)
    with Engine(model, None, max_slots=2, max_seq_len=64) as engine:
        r = engine.generate(
            [prompt], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_tok])
        )[0]
        assert r.finish_reason == "stop" and r.token_ids == free[: first + 1]
        engine._eos = frozenset({stop_tok})  # the model's EOS, as generation_config gives it
        r = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0))[0]
        assert r.finish_reason == "stop" and r.token_ids == free[: first + 1]
        r = engine.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
        assert r.finish_reason == "length" and r.token_ids == free


def test_text_streams_and_stop_strings_with_a_tokenizer():
    model = tiny_model("llama", level=1)
    tok = ByteTokenizer()
    prompt = "hello"
    ids = tok(prompt)["input_ids"]
    free = _reference(model, ids, 40)
    text = tok.decode(free)
    with Engine(model, tok, max_slots=2, max_seq_len=64) as engine:
        s = engine.submit(prompt, SamplingParams(max_tokens=40, **GREEDY))
        streamed = list(s)
        r = s.result()
        assert streamed == r.token_ids == free and r.text == text
        # a two-character stop string from the middle of the text (spans two tokens)
        mid = len(text) // 2
        stop = text[mid : mid + 2]
        r = engine.generate([prompt], SamplingParams(max_tokens=40, stop=[stop], **GREEDY))[0]
    assert r.finish_reason == "stop"
    assert r.text == text[: text.find(stop)]
    assert r.token_ids == free[: len(r.token_ids)] and len(r.token_ids) < 40


def test_async_iteration():
    model = tiny_model("llama", level=1)
    ref = _reference(model, [1, 2, 3], 12)

    async def main(engine: Engine) -> list[list[int]]:
        async def one() -> list[int]:
            s = engine.submit([1, 2, 3], SamplingParams(max_tokens=12, **GREEDY))
            return [t async for t in s]

        return list(await asyncio.gather(one(), one(), one()))

    with Engine(model, None, max_slots=4, max_seq_len=32) as engine:
        outs = asyncio.run(main(engine))
        _assert_all_free(engine)
    assert outs == [ref, ref, ref]


def test_a_failing_prefill_fails_only_its_request():
    model = tiny_model("llama", level=1)
    good = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    refs = [_reference(model, p, 10) for p in good]
    with Engine(model, None, max_slots=4, max_seq_len=32) as engine:
        real = engine._runner.prefill

        def prefill(slots, prompts, *args):
            if any(p[0] == 250 for p in prompts):  # a batch holding it fails as a whole
                raise RuntimeError("injected prefill failure")
            return real(slots, prompts, *args)

        engine._runner.prefill = prefill
        params = SamplingParams(max_tokens=10, **GREEDY)
        streams = [engine.submit(p, params) for p in [good[0], [250, 1], good[1], good[2]]]
        with pytest.raises(RequestFailedError, match="injected prefill failure") as info:
            streams[1].result(timeout=30)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(RequestFailedError):
            list(streams[1])
        outs = [s.result(timeout=30).token_ids for s in (streams[0], streams[2], streams[3])]
        _assert_all_free(engine)
        assert engine.stats()["failed"] == 1
    assert outs == refs


def test_a_failing_decode_step_fails_its_rows_and_the_engine_goes_on():
    model = tiny_model("llama", level=1)
    with Engine(model, None, max_slots=4, max_seq_len=48) as engine:
        real = engine._runner.decode
        calls = {"n": 0}

        def decode(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected decode failure")
            return real(*args)

        engine._runner.decode = decode
        first = engine.generate
        s = engine.submit([5, 6, 7], SamplingParams(max_tokens=10, **GREEDY))
        with pytest.raises(RequestFailedError, match="injected decode failure"):
            s.result(timeout=30)
        _assert_all_free(engine)
        after = first([[5, 6, 7], [9, 9, 9, 9]], SamplingParams(max_tokens=10, **GREEDY))
    assert [a.token_ids for a in after] == [
        _reference(model, [5, 6, 7], 10),
        _reference(model, [9, 9, 9, 9], 10),
    ]


def test_queue_full_is_refused_and_blocking_submit_waits():
    model = tiny_model("llama", level=1)
    with Engine(model, None, max_slots=1, max_seq_len=400, max_queued=1, max_wait_ms=0) as engine:
        long = engine.submit([5, 6], SamplingParams(max_tokens=300, **GREEDY))
        next(iter(long))  # admitted: the one slot is taken
        queued = engine.submit([7], SamplingParams(max_tokens=2, **GREEDY))
        with pytest.raises(QueueFullError, match="max_queued=1"):
            engine.submit([8], SamplingParams(max_tokens=2, **GREEDY))
        assert engine.stats()["rejected"] == 1
        done = []
        t = threading.Thread(
            target=lambda: done.append(
                engine.submit([8], SamplingParams(max_tokens=2, **GREEDY), block=True).result()
            )
        )
        t.start()
        long.cancel()
        t.join(60)
        assert not t.is_alive() and len(done) == 1 and len(done[0].token_ids) == 2
        assert queued.result(timeout=30).finish_reason == "length"
        _assert_all_free(engine)


def test_bad_requests_are_refused_clearly():
    model = tiny_model("llama", level=1)
    with Engine(model, None, max_slots=2, max_seq_len=32) as engine:
        ok = SamplingParams(max_tokens=8)
        engine.submit([1] * 24, ok).result(timeout=30)  # exactly max_seq_len: accepted
        with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
            engine.submit([1] * 25, ok)
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], ok)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([1, 256], ok)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([-1], ok)
        with pytest.raises(TypeError, match="needs a tokenizer"):
            engine.submit("text", ok)
        with pytest.raises(TypeError, match="sequence of token ids"):
            engine.submit([1.5, 2], ok)
        with pytest.raises(TypeError, match="SamplingParams"):
            engine.submit([1], {"max_tokens": 3})
        with pytest.raises(ValueError, match="2 params for 1 prompts"):
            engine.generate([[1]], [ok, ok])
        with pytest.raises(ValueError, match="exceeds max_seq_len"):  # nothing queued
            engine.generate([[1], [1] * 40], ok)
        assert engine.stats()["finished"] == 1
        _assert_all_free(engine)
    for kwargs, err in [
        ({"max_slots": 0}, ValueError),
        ({"max_seq_len": 1}, ValueError),
        ({"max_prefill_tokens": 0}, ValueError),
        ({"max_wait_ms": -1.0}, ValueError),
        ({"max_queued": 0}, ValueError),
        ({"max_slots": 2.0}, TypeError),
        ({"cuda_graph": True}, ValueError),
    ]:
        with pytest.raises(err):
            Engine(model, None, **kwargs)


def test_shutdown_cancels_pending_work_and_restores_the_model():
    model = tiny_model("llama", level=0)
    assert model.config._attn_implementation == "eager"
    engine = Engine(model, None, max_slots=1, max_seq_len=600)
    assert model.config._attn_implementation == "sentinel"
    running = engine.submit([5], SamplingParams(max_tokens=500, **GREEDY))
    waiting = engine.submit([6], SamplingParams(max_tokens=5, **GREEDY))
    next(iter(running))
    engine.shutdown()
    assert running.result(timeout=10).finish_reason == "cancelled"
    assert waiting.result(timeout=10).finish_reason == "cancelled"
    with pytest.raises(EngineShutdownError):
        engine.submit([5], SamplingParams(max_tokens=2))
    assert model.config._attn_implementation == "eager"
    engine.shutdown()  # idempotent


def test_generate_keeps_input_order_with_a_progress_bar(capsys):
    model = tiny_model("gpt2", level=2)
    prompts = [[3 + i] * (1 + 3 * i) for i in range(10)]
    news = [10 - i for i in range(10)]
    with Engine(model, None, max_slots=3, max_seq_len=64) as engine:
        outs = engine.generate(
            prompts, [SamplingParams(max_tokens=k, **GREEDY) for k in news], progress=True
        )
    assert [len(o.token_ids) for o in outs] == news
    assert [o.prompt_token_ids for o in outs] == prompts
    assert "10/10" in capsys.readouterr().err


@pytest.mark.model
@needs_smollm2
@pytest.mark.parametrize("level", [1, 2])
def test_smollm2_chat_requests_equal_generate(level):
    model, tok = sk.models.load_smollm2()
    sk.patch_model(model, level=level)
    questions = ["What is the capital of France?", "Name a prime number.", "Say hi.", "2+2="]
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        for q in questions
    ]
    ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    refs = [_reference(model, p, 12) for p in ids]
    with Engine(model, tok, max_slots=4, max_seq_len=128) as engine:
        outs = engine.generate(ids, SamplingParams(max_tokens=12, **GREEDY))
        _assert_all_free(engine)
    assert [o.token_ids for o in outs] == refs
    assert [o.text for o in outs] == [tok.decode(r, skip_special_tokens=True) for r in refs]


@pytest.mark.parametrize("level", [1, 2])
def test_a_burst_is_prefilled_in_one_padded_batch(level):
    model = tiny_model("qwen2", level=level)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(10, 16))] for _ in range(8)]
    refs = [_reference(model, p, 12) for p in prompts]
    # a long batching window: the first arrival waits until all eight are there
    with Engine(
        model, None, max_slots=8, max_seq_len=64, max_wait_ms=5000.0, packed_prefill=False
    ) as engine:
        streams = [engine.submit(p, SamplingParams(max_tokens=12, **GREEDY)) for p in prompts]
        outs = [s.result(timeout=60).token_ids for s in streams]
        st = engine.stats()
        _assert_all_free(engine)
    assert st["prefill_chunks"] == 1 and st["prefill_tokens"] == sum(map(len, prompts))
    assert outs == refs


def test_phase_clock_sums_reached_iterations_only():
    """The engine's GPU phase clock adds an iteration's prefill and decode spans only once
    its last event has been reached (``query``), in order, and never waits."""

    class FakeEvent:
        def __init__(self, t_ms: float, reached: bool = True) -> None:
            self.t, self.reached = t_ms, reached

        def query(self) -> bool:
            return self.reached

        def elapsed_time(self, other: FakeEvent) -> float:
            assert self.reached and other.reached
            return other.t - self.t

    clock = _PhaseClock()
    clock.add(FakeEvent(0.0), FakeEvent(2.0), FakeEvent(5.0))
    assert (clock.prefill_s, clock.decode_s, clock.iterations) == (0.002, 0.003, 1)
    pending = FakeEvent(9.0, reached=False)
    clock.add(FakeEvent(6.0), FakeEvent(6.5), pending)
    assert clock.iterations == 1  # not reached yet: nothing read
    clock.add(FakeEvent(10.0), FakeEvent(11.0), FakeEvent(12.0))
    assert clock.iterations == 1  # a later iteration waits for the earlier one
    pending.reached = True
    clock.add(FakeEvent(13.0), FakeEvent(13.0), FakeEvent(14.0))
    assert clock.iterations == 4
    assert clock.prefill_s == pytest.approx(0.002 + 0.0005 + 0.001 + 0.0)
    assert clock.decode_s == pytest.approx(0.003 + 0.0025 + 0.001 + 0.001)
    assert len(clock._free) == 12  # every read event is kept for mark() to record again


def test_prefill_computed_tokens_count_the_pads():
    """``prefill_computed_tokens`` counts the positions the prefill forwards computed: a
    lone prompt's own length; a batch of unequal prompts, its rows x its longest (CPU:
    eager forwards, no graph buckets; the left-padded prefill, packing off)."""
    model = tiny_model("llama", level=1)
    params = SamplingParams(max_tokens=2, **GREEDY)
    with Engine(
        model, None, max_slots=4, max_seq_len=64, max_prefill_tokens=64, packed_prefill=False
    ) as engine:
        engine.generate([[5] * 9], params)
        st = engine.stats()
        assert st["prefill_computed_tokens"] == st["prefill_tokens"] == 9
        # submitted together: one batched forward of 3 rows padded to the longest (12)
        streams = [engine.submit(p, params) for p in ([6] * 4, [7] * 12, [8] * 7)]
        for s in streams:
            s.result(timeout=60)
        st = engine.stats()
    assert st["prefill_tokens"] == 9 + 4 + 12 + 7
    real, computed = st["prefill_tokens"], st["prefill_computed_tokens"]
    assert real <= computed <= 9 + 3 * 12


@pytest.mark.parametrize("kv", ["dense", "int8", "int4", "lowrank:8"])
def test_tail_rows_move_down_to_smaller_buckets_with_the_same_outputs(kv):
    """Requests left in high slots at the end of a workload move to free low slots
    (the decode bucket shrinks from 8 rows to 2, then 1), in every cache format, with
    the outputs of an engine that never moves them; slots end all free."""
    model = tiny_model("llama", level=1)
    if kv.startswith("lowrank"):
        calibrate_lowrank(
            model, ByteTokenizer(), random_text(2000), n_samples=4, max_length=64, progress=False
        )
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    # slots 0-5 finish early; slots 6 and 7 (admitted last) run on alone
    news = [3, 4, 2, 5, 3, 4, 30, 26]
    outs, stats = {}, {}
    for compact in (True, False):
        with Engine(
            model,
            None,
            max_slots=8,
            max_seq_len=96,
            max_wait_ms=50.0,
            kv_cache=kv,
            compact_rows=compact,
        ) as engine:
            streams = [
                engine.submit(p, SamplingParams(max_tokens=k, **GREEDY))
                for p, k in zip(prompts, news, strict=True)
            ]
            outs[compact] = [s.result(timeout=120).token_ids for s in streams]
            _assert_all_free(engine)
            stats[compact] = engine.stats()
    assert [len(o) for o in outs[True]] == news
    assert outs[True] == outs[False]
    assert stats[False]["compactions"] == stats[False]["moved_rows"] == 0
    assert stats[True]["compactions"] >= 1 and stats[True]["moved_rows"] >= 2, stats[True]
    if kv == "dense":
        for p, k, got in zip(prompts, news, outs[True], strict=True):
            assert got == _reference(model, p, k)


def test_moving_rows_keeps_a_request_that_is_still_in_flight():
    """A request moved while its last step is still in flight (its token on the device,
    fed from the moved row next step) decodes on as if it had never moved."""
    model = tiny_model("llama", level=2)
    prompt_a, prompt_b = [9, 8, 7, 6, 5], [3, 4, 5, 6, 7, 8, 9, 10, 11]
    with Engine(model, None, max_slots=4, max_seq_len=64, max_wait_ms=50.0) as engine:
        a = engine.submit(prompt_a, SamplingParams(max_tokens=2, **GREEDY))
        b = engine.submit(prompt_b, SamplingParams(max_tokens=20, **GREEDY))
        got_a, got_b = a.result(timeout=60), b.result(timeout=60)
        st = engine.stats()
        _assert_all_free(engine)
    assert st["moved_rows"] == 1, st  # b left slot 1 for slot 0 once a had ended
    assert got_a.token_ids == _reference(model, prompt_a, 2)
    assert got_b.token_ids == _reference(model, prompt_b, 20)


def test_a_failing_move_fails_only_the_moved_requests():
    model = tiny_model("llama", level=1)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    with Engine(model, None, max_slots=4, max_seq_len=64, max_wait_ms=50.0) as engine:

        def broken(src, dst, n):
            raise RuntimeError("move failed")

        engine._runner.move = broken  # type: ignore[method-assign]
        streams = [
            engine.submit(p, SamplingParams(max_tokens=k, **GREEDY))
            for p, k in zip(prompts, [2, 2, 12], strict=True)
        ]
        first = [s.result(timeout=60) for s in streams[:2]]
        with pytest.raises(RequestFailedError, match="move failed"):
            streams[2].result(timeout=60)
        # the engine serves on, from the slots the failure left free
        again = engine.generate([prompts[2]], SamplingParams(max_tokens=12, **GREEDY))[0]
        _assert_all_free(engine)
        assert engine.stats()["failed"] == 1
    assert [len(r.token_ids) for r in first] == [2, 2]
    assert again.token_ids == _reference(model, prompts[2], 12)


def test_compact_rows_must_be_a_bool():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="compact_rows"):
        Engine(model, None, max_slots=2, max_seq_len=32, compact_rows=1)  # type: ignore[arg-type]

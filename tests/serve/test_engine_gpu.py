"""The engine on a GPU: one CUDA graph per batch bucket captured at start-up and only
replayed while serving; greedy outputs equal ``sk.generate`` alone (float32)."""

from __future__ import annotations

import random

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams
from tests.helpers import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graph_engine_equals_generate_alone(arch, level):
    model = tiny_model(arch, level=level).cuda()
    rng = random.Random(level)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 50))] for _ in range(24)]
    news = [rng.randint(1, 30) for _ in prompts]
    refs = []
    for p, n in zip(prompts, news, strict=True):
        out = sk.generate(
            model, torch.tensor([p], device="cuda"), max_new_tokens=n, eos_token_id=[]
        )
        refs.append(out[0, len(p) :].tolist())
    captured = []
    real_graph = torch.cuda.CUDAGraph

    with Engine(
        model, None, max_slots=12, max_seq_len=96, max_prefill_tokens=64, packed_prefill=False
    ) as engine:
        assert engine._runner.graph_buckets == (1, 2, 4, 8, 12)
        # rows (1, 2, 4, 8, 12) x widths (32, 64, 96) within 4 * 64 padded tokens
        assert engine._runner.prefill_buckets == (
            (1, 32),
            (1, 64),
            (1, 96),
            (2, 32),
            (2, 64),
            (2, 96),
            (4, 32),
            (4, 64),
            (8, 32),
        )

        def no_capture(*a, **k):  # nothing may be captured while serving
            captured.append(1)
            return real_graph(*a, **k)

        torch.cuda.CUDAGraph = no_capture
        try:
            outs = engine.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in news])
            seeded = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=3)
            alone = engine.generate([prompts[0]], seeded)[0].token_ids
            mixed = engine.generate(prompts[:5], [seeded] * 5)
        finally:
            torch.cuda.CUDAGraph = real_graph
        st = engine.stats()
    assert not captured
    assert [o.token_ids for o in outs] == refs
    assert mixed[0].token_ids == alone
    assert st["free_slots"] == 12 and st["decode_steps"] < st["decode_tokens"]
    # the loop's GPU time by phase, from CUDA events: both phases ran, and together they
    # fit in the engine's lifetime
    assert st["gpu_prefill_s"] > 0 and st["gpu_decode_s"] > 0
    assert st["gpu_prefill_s"] + st["gpu_decode_s"] < st["uptime_s"]
    assert 0 < st["host_prefill_s"] < st["uptime_s"]
    # most prefills replay a graph; those whose padded width leaves no room run eagerly
    assert 0 < st["prefill_graph_replays"] < st["prefill_chunks"] or (
        st["prefill_graph_replays"] == st["prefill_chunks"] > 0
    )


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_graph_engine_equals_generate_alone(arch, level):
    """Packed prefill graphs (the GPU default): a burst of 24 prompts packed into rows of
    up to 128 positions, replayed from the packed graphs (widths 32, 64, 128), nothing
    captured while serving, each greedy output equal to ``sk.generate`` alone; the
    prefill computes the real tokens plus each row's rounding to a width only."""
    model = tiny_model(arch, level=level).cuda()
    rng = random.Random(20 + level)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 50))] for _ in range(24)]
    news = [rng.randint(1, 30) for _ in prompts]
    refs = []
    for p, n in zip(prompts, news, strict=True):
        out = sk.generate(
            model, torch.tensor([p], device="cuda"), max_new_tokens=n, eos_token_id=[]
        )
        refs.append(out[0, len(p) :].tolist())
    captured = []
    real_graph = torch.cuda.CUDAGraph
    with Engine(
        model, None, max_slots=12, max_seq_len=96, max_prefill_tokens=128, max_wait_ms=5000.0
    ) as engine:
        assert engine.stats()["packed_width"] == 128  # max_prefill_tokens > max_seq_len
        assert engine._runner.packed_buckets == (32, 64, 128)
        assert engine._runner.prefill_buckets == ()

        def no_capture(*a, **k):
            captured.append(1)
            return real_graph(*a, **k)

        torch.cuda.CUDAGraph = no_capture
        try:
            streams = [
                engine.submit(p, SamplingParams(max_tokens=n, **GREEDY))
                for p, n in zip(prompts, news, strict=True)
            ]
            outs = [s.result(timeout=120) for s in streams]
        finally:
            torch.cuda.CUDAGraph = real_graph
        st = engine.stats()
        assert not engine._runner.lengths.any()
    assert not captured
    assert [o.token_ids for o in outs] == refs
    assert st["prefill_graph_replays"] == st["prefill_chunks"] > 0
    real = sum(map(len, prompts))
    assert st["prefill_tokens"] == real
    # each packed row rounds up to the next of 32, 64, 128: less than 64 per forward
    assert real <= st["prefill_computed_tokens"] < real + 64 * st["prefill_chunks"]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("level", [1, 2])
def test_prefill_graphs_equal_eager_prefill(level, packed):
    """The same requests with and without prefill graphs give the same greedy tokens."""
    model = tiny_model("llama", level=level).cuda()
    rng = random.Random(10 + level)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 120))] for _ in range(20)]
    params = SamplingParams(max_tokens=12, **GREEDY)
    outs = {}
    for graphs in (False, True):
        with Engine(
            model,
            None,
            max_slots=8,
            max_seq_len=160,
            max_prefill_tokens=128,
            prefill_graphs=graphs,
            packed_prefill=packed,
        ) as engine:
            outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
            st = engine.stats()
        assert (st["prefill_graph_replays"] > 0) == graphs
    assert outs[True] == outs[False]


def test_step_launches_without_a_host_sync():
    """A decode step, the device pick and the start of its token copy, and a batched
    prefill launch without any host sync (``set_sync_debug_mode("error")`` raises on a
    stream sync or a blocking copy, such as ``torch.tensor(list, device="cuda")``), so
    the scheduler keeps the GPU a step ahead."""
    model = tiny_model("llama", level=1).cuda()
    with Engine(model, None, max_slots=4, max_seq_len=96, max_prefill_tokens=64) as engine:
        # the loop is idle: drive the runner directly, as the engine thread does
        runner = engine._runner
        slots, prompts = [0, 1], [[5, 6, 7], [8, 9, 10, 11, 12]]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        # the runner's buffers are inference tensors, as the engine thread makes them
        try:
            with torch.inference_mode():
                runner.prefill(slots, prompts)
                logits = runner.decode([3, 4], [5, 5], [1, 1])
                picked = runner.pick_device(logits, [None, None])
                host, event = runner.to_host(picked)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        event.synchronize()
        assert host.shape == (2,)
        with torch.inference_mode():
            runner.release(0)
            runner.release(1)


def test_engine_serves_without_a_stream_sync():
    """A whole greedy + sampled + logprobs workload through the engine loop under
    ``set_sync_debug_mode("error")``: any stream sync or blocking copy inside the loop
    (its one wait per step is an event's, which the mode does not flag) would fail the
    requests it hit with that error."""
    model = tiny_model("llama", level=1).cuda()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    params = [
        SamplingParams(max_tokens=12, **GREEDY),
        SamplingParams(max_tokens=9, temperature=0.8, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=7, logprobs=2, **GREEDY),
    ]
    with Engine(model, None, max_slots=4, max_seq_len=96, max_prefill_tokens=64) as engine:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = engine.generate(prompts, [params[i % 3] for i in range(len(prompts))])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    assert [len(o.token_ids) for o in outs] == [[12, 9, 7][i % 3] for i in range(len(prompts))]

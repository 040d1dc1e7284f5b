"""Chunk graphs (``serve.runner.ModelRunner``): a later chunk of a long prompt, or a
prompt's rest after a prefix hit, runs over the slot's stored past from a CUDA graph
captured once per width: the slot's row is copied to a staging row, the right-padded
chunk runs there reading the past by the device lengths, and the row is copied back.

On the CPU the graph's body runs eagerly against the eager chunk route (the same values
in float32, the pads invisible); on a GPU the engine with chunk graphs gives the greedy
tokens of the eager chunked prefill, and with the dense cache those of ``sk.generate``
alone."""

from __future__ import annotations

import random

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.cache.slots import gather_row
from sentinel_kernels.nn.attention import past_by_device_lengths
from sentinel_kernels.serve import Engine, SamplingParams
from sentinel_kernels.serve.runner import ModelRunner, _ChunkGraph
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def _runner(model, spec: str) -> ModelRunner:
    return ModelRunner(
        model, spec, max_slots=3, max_seq_len=192, device=torch.device("cpu"), use_graph=False
    )


def _row(runner: ModelRunner, slot: int, n: int) -> list[torch.Tensor]:
    out = []
    for layer in runner.cache._layers:
        for name in ("k_store", "v_store", "k_scale", "v_scale"):
            t = getattr(layer, name)
            if t is not None:
                out.append(t[slot, :, :n].float().clone())
    return out


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("real,width", [(35, 64), (64, 64), (1, 32), (7, 32), (100, 128)])
def test_chunk_body_equals_eager_chunk(level, real, width):
    model = tiny_model("llama", level=level)
    spec = "int8" if level == 2 else "dense"
    rng = random.Random(real + width)
    prompt = [rng.randrange(3, 256) for _ in range(40 + real)]
    slot, start = 1, 40
    with torch.inference_mode():
        eager = _runner(model, spec)
        eager.prefill([slot], [prompt[:start]])
        # the eager route the graph takes (on a GPU, the one-attention route of long
        # chunks would round differently; an int8 cache would read the chunk unquantized)
        with past_by_device_lengths():
            want = eager.prefill([slot], [prompt[start:]], start)

        graphed = _runner(model, spec)
        graphed.prefill([slot], [prompt[:start]])
        # poison what the body must overwrite or never read: the staging row, and the
        # slot's positions past the chunk
        for layer in graphed.cache._layers:
            for t in (layer.k_store, layer.v_store):
                if t.is_floating_point():
                    t[graphed.max_slots].fill_(float("nan"))
                    t[slot, :, start + width :].fill_(float("nan"))
        g = _ChunkGraph(width, torch.device("cpu"))
        chunk = prompt[start:]
        g.ids[0, :real] = torch.tensor(chunk)
        g.ids[0, real:] = 7  # pads: any token
        g.slot.fill_(slot)
        g.start.fill_(start)
        g.real.fill_(real)
        g.pick.fill_(real - 1)
        got = graphed._chunk_body(g)()

        assert got.shape == want.shape == (1, model.config.vocab_size)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        assert graphed.lengths[:, slot].tolist() == [start + real] * graphed.lengths.shape[0]
        assert graphed.lengths[:, graphed.max_slots].eq(0).all()
        assert graphed.key_mask[graphed.max_slots].eq(1).all()
        for a, b in zip(
            _row(graphed, slot, start + real), _row(eager, slot, start + real), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        # the next decode steps read the row alike (the pads' keys lie past the length)
        tok = [int(want.argmax())]
        for i in range(4):
            pos = start + real + i
            a = eager.decode([0, tok[-1]], [0, pos], [0, 1])[1]
            b = graphed.decode([0, tok[-1]], [0, pos], [0, 1])[1]
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
            tok.append(int(a.argmax()))


@pytest.mark.parametrize("level", [1, 2])
def test_chunk_body_after_a_padded_batched_prefill(level):
    """A row filled by a batched (left-padded) prefill keeps its pads before position 0:
    the chunk goes after them, at the row's device length, not at slot ``start``."""
    model = tiny_model("llama", level=level)
    spec = "int8" if level == 2 else "dense"
    rng = random.Random(level)
    short = [rng.randrange(3, 256) for _ in range(20)]
    other = [rng.randrange(3, 256) for _ in range(40)]
    rest = [rng.randrange(3, 256) for _ in range(35)]
    with torch.inference_mode():
        outs, runners = [], []
        for graphed in (False, True):
            runner = _runner(model, spec)
            runner.prefill([1, 2], [short, other])
            assert runner.row_offset[1] == 20
            if graphed:
                g = _ChunkGraph(64, torch.device("cpu"))
                g.ids[0, :35] = torch.tensor(rest)
                g.slot.fill_(1)
                g.start.fill_(20)
                g.real.fill_(35)
                g.pick.fill_(34)
                outs.append(runner._chunk_body(g)())
            else:
                with past_by_device_lengths():
                    outs.append(runner.prefill([1], [rest], 20))
            runners.append(runner)
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)
        eager, graphed_runner = runners
        assert graphed_runner.lengths[:, 1].tolist() == eager.lengths[:, 1].tolist()
        assert eager.lengths[0, 1] == 40 + 35
        tok = int(outs[0].argmax())
        a = eager.decode([0, tok], [0, 55], [0, 1])[1]
        b = graphed_runner.decode([0, tok], [0, 55], [0, 1])[1]
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


def test_gather_row_copies_a_row_by_device_index():
    model = tiny_model("llama", level=1)
    cache = sk.kv_cache(model, "int8", max_cache_len=16, batch_size=3)
    layer = cache._layers[0]
    for t in (layer.k_store, layer.v_store, layer.k_scale, layer.v_scale):
        t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
    before = [t.clone() for t in (layer.k_store, layer.k_scale)]
    gather_row(cache, torch.tensor([2]), 0, 10)
    torch.testing.assert_close(layer.k_store[0, :, :10], before[0][2, :, :10])
    torch.testing.assert_close(layer.k_scale[0, :, :10], before[1][2, :, :10])
    torch.testing.assert_close(layer.k_store[0, :, 10:], before[0][0, :, 10:])  # untouched
    torch.testing.assert_close(layer.k_store[1:], before[0][1:])
    with pytest.raises(ValueError, match="row 3"):
        gather_row(cache, torch.tensor([0]), 3, 4)
    with pytest.raises(ValueError, match="int64"):
        gather_row(cache, torch.tensor([0], dtype=torch.int32), 1, 4)
    with pytest.raises(ValueError, match="int64"):
        gather_row(cache, torch.tensor([0, 1]), 1, 4)
    with pytest.raises(ValueError, match="capacity"):
        gather_row(cache, torch.tensor([0]), 1, 17)


def test_chunk_graph_choice():
    """The narrowest width holding the chunk whose pads still fit in the row."""
    model = tiny_model("llama", level=1)
    runner = _runner(model, "dense")
    for w in (32, 64, 128):
        runner._chunk_graphs[w] = _ChunkGraph(w, torch.device("cpu"))
    pick = runner.chunk_graph_for
    assert pick(10, 1).width == 32
    assert pick(10, 33).width == 64
    assert pick(128, 33).width == 64  # 128 + 64 == 192: the pads still fit
    assert pick(130, 33) is None  # 130 + 64 > 192
    assert pick(10, 129) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", [1, 2])
def test_chunk_graphs_equal_eager_and_generate_alone_gpu(level):
    model = tiny_model("llama", level=level).cuda()
    rng = random.Random(20 + level)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(70, 300))] for _ in range(6)]
    prompts.append([rng.randrange(3, 256) for _ in range(20)])
    params = SamplingParams(max_tokens=8, **GREEDY)
    outs, stats = {}, {}
    for graphs in (False, True):
        with Engine(
            model,
            None,
            max_slots=4,
            max_seq_len=384,
            max_prefill_tokens=64,
            prefill_graphs=graphs,
        ) as engine:
            if graphs:
                assert engine._runner.chunk_widths == (32, 64)
            outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
            stats[graphs] = engine.stats()
    assert stats[False]["chunk_graph_replays"] == 0
    assert stats[True]["chunk_graph_replays"] > 0
    assert outs[True] == outs[False]
    if level == 2:
        return  # an int8 cache: chunks read the quantized past, a whole prefill does not
    want = []
    for p in prompts:
        out = sk.generate(
            model, torch.tensor([p], device="cuda"), max_new_tokens=8, eos_token_id=[]
        )
        want.append(out[0, len(p) :].tolist())
    assert outs[True] == want


def test_a_failed_capture_warns_and_drops_that_kind():
    runner = _runner(tiny_model("llama", level=1), "dense")
    graphs = {64: object()}
    runner._pool = object()
    with pytest.warns(RuntimeWarning, match="chunk CUDA graphs disabled, eager: .*boom"):
        runner._capture_failed("chunk", "eager", ValueError("boom"), graphs)
    assert graphs == {} and runner._pool is None

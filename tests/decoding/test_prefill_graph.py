"""``sk.generate(prefill_graph=True)``: the bookkeeping around the prefill graph, on the CPU.

A CUDA graph cannot run here, so ``fast._record`` is replaced by a stand-in with a graph's
contract: recording does not run the body (no cache write, no output), the output is a
fixed tensor, and ``replay()`` runs the body again, reading the static inputs it was
recorded with. What this checks: a shape's first call is eager, its second records and
replays, later calls replay; the replayed prefill reads the current prompt (copied into
the static inputs), leaves the cache where the eager prefill leaves it, and the outputs
equal the eager loop's; a failed recording falls back with a warning. The real graphs are
checked by ``test_generate.py::test_cuda_prefill_graph_greedy_equals_model_generate``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_model

import sentinel_kernels as sk
from sentinel_kernels.decoding import fast, session
from sentinel_kernels.decoding.session import DecodeRequest

EOS, PAD = 2, 0


class _FakeGraph:
    def __init__(self, body, out: torch.Tensor) -> None:
        self.body, self.out, self.replays = body, out, 0

    def replay(self) -> None:
        self.out.copy_(self.body())
        self.replays += 1


def _fake_record(vocab: int, recorded: list[_FakeGraph]):
    def record(body):
        g = _FakeGraph(body, torch.full((2, vocab), float("nan")))
        recorded.append(g)
        return g, g.out

    return record


def _run(model, ids, mask, new, prefill_graph):
    padded = mask is not None and not bool(mask.all())
    req = DecodeRequest(
        model,
        ids,
        mask if padded else None,
        new,
        {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "generator": None},
        torch.tensor([EOS]),
        PAD,
        None,
        "dense",
        padded=padded,
    )
    with torch.inference_mode():
        return fast.run(req, False, torch.device("cpu"), prefill_graph=prefill_graph)


def _level1_with_fake_graphs(monkeypatch) -> tuple[torch.nn.Module, int, list[_FakeGraph]]:
    """A tiny level-1 Llama, its vocabulary size, and the list the fake recorder fills."""
    model = tiny_model("llama", level=1)
    vocab = model.config.vocab_size
    recorded: list[_FakeGraph] = []
    monkeypatch.setattr(fast, "_record", _fake_record(vocab, recorded))
    return model, vocab, recorded


@pytest.mark.parametrize("pads", [{}, {1: 5}], ids=["unpadded", "left-padded"])
def test_second_call_records_then_replays(monkeypatch, pads):
    model, vocab, recorded = _level1_with_fake_graphs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (2, 19), generator=g) for _ in range(4)]
    mask = torch.ones(2, 19, dtype=torch.int64)
    for row, n in pads.items():
        mask[row, :n] = 0
        for p in prompts:
            p[row, :n] = PAD
    want = [_run(model, p, mask, 9, prefill_graph=False) for p in prompts]
    sk.clear_sessions(model)
    got = []
    for i, p in enumerate(prompts):
        got.append(_run(model, p, mask, 9, prefill_graph=True))
        assert len(recorded) == (0 if i == 0 else 1), i  # recorded on the second call
        assert recorded == [] or recorded[0].replays == i
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    (sess,) = getattr(model, session.SESSIONS_ATTR).values()
    (pg,) = sess.prefill.values()
    assert pg is not None and (pg.mask is not None) == bool(pads)


def test_a_failed_recording_falls_back_with_a_warning(monkeypatch):
    model = tiny_model("llama", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)

    def broken(body):
        body()  # part of a real capture runs the cache's host bookkeeping before failing
        raise RuntimeError("operation not permitted when stream is capturing (simulated)")

    monkeypatch.setattr(fast, "_record", broken)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1)
    )
    want = _run(model, ids, None, 6, prefill_graph=False)
    sk.clear_sessions(model)
    assert torch.equal(_run(model, ids, None, 6, prefill_graph=True), want)
    with pytest.warns(RuntimeWarning, match="prefill CUDA graph disabled.*simulated"):
        assert torch.equal(_run(model, ids, None, 6, prefill_graph=True), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not tried (nor reported) again for this shape
        assert torch.equal(_run(model, ids, None, 6, prefill_graph=True), want)


def test_graphs_per_session_are_bounded_least_recently_used_first(monkeypatch):
    """Prompt shapes of one session (same batch and cache length) beyond
    ``PREFILL_GRAPHS`` captured ones drop the least recently used graph; a dropped shape is
    seen again as new (eager, then captured again), and outputs stay the eager ones."""
    model, vocab, recorded = _level1_with_fake_graphs(monkeypatch)
    capacity = 30
    lengths = [9, 11, 13, 15]  # new tokens = capacity - length: one session for all
    g = torch.Generator().manual_seed(2)
    prompts = {n: torch.randint(3, vocab, (2, n), generator=g) for n in lengths}
    want = {n: _run(model, p, None, capacity - n, prefill_graph=False) for n, p in prompts.items()}
    sk.clear_sessions(model)
    for _ in range(2):  # first sighting (eager), then captured
        for n in lengths:
            assert torch.equal(_run(model, prompts[n], None, capacity - n, True), want[n])
    (sess,) = getattr(model, session.SESSIONS_ATTR).values()
    held = [k[0] for k, v in sess.prefill.items() if v is not None and v.graph is not None]
    assert held == lengths[-fast.PREFILL_GRAPHS :]
    assert len(recorded) == len(lengths)
    # the oldest shape again: forgotten, so eager once more, then captured again
    first = lengths[0]
    assert torch.equal(_run(model, prompts[first], None, capacity - first, True), want[first])
    assert len(recorded) == len(lengths)
    assert torch.equal(_run(model, prompts[first], None, capacity - first, True), want[first])
    assert len(recorded) == len(lengths) + 1
    held = [k[0] for k, v in sess.prefill.items() if v is not None and v.graph is not None]
    assert len(held) == fast.PREFILL_GRAPHS and held[-1] == first
    # a replayed shape becomes the most recently used
    kept = held[0]
    assert torch.equal(_run(model, prompts[kept], None, capacity - kept, True), want[kept])
    assert list(sess.prefill)[-1] == (kept, False)


def test_remember_prefill_bounds_the_shapes_seen(monkeypatch):
    monkeypatch.setattr(fast, "PREFILL_SHAPES", 3)
    store: fast.OrderedDict = fast.OrderedDict()
    for n in range(5):
        fast._remember_prefill(store, (n, False), None)
    assert list(store) == [(2, False), (3, False), (4, False)]


def test_generate_default_prefill_graph_is_off_on_cpu():
    """The default (``None``) turns the prefill graph on only with CUDA graphs; on the CPU
    the call is the plain one, and ``True`` there is an error."""
    model = tiny_model("llama", 0)
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    out = sk.generate(model, ids, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 8)
    with pytest.raises(ValueError, match="prefill_graph=True needs a CUDA model"):
        sk.generate(model, ids, max_new_tokens=3, prefill_graph=True)
    with pytest.raises(TypeError, match="prefill_graph must be a bool or None"):
        sk.generate(model, ids, max_new_tokens=3, prefill_graph="yes")

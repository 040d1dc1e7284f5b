"""Log-probabilities from the engine (``SamplingParams.logprobs``): they match a float64
``log_softmax`` of a plain full forward over prompt + new tokens, the top ones come most
likely first, asking for them changes no token (greedy or seeded sampling), requests that
do not ask get None, and bad values are refused."""

from __future__ import annotations

import random

import pytest
import torch

from sentinel_kernels.serve import Engine, SamplingParams
from tests.helpers import tiny_model

GREEDY = {"temperature": 0.0, "ignore_eos": True}
# The engine's values are float32 log_softmax of float32 logits from the cached prefill /
# decode path; the reference is a whole-sequence forward (other reduction orders and
# kernels), then log_softmax in float64. The values are O(1) (V = 256: about -5.5), where a
# float32 ulp is ~5e-7; the largest difference seen here is 5.7e-7 (about one ulp plus the
# forward's rounding), so 2e-5 leaves ~35x room while a wrong row or token (differences
# of 1e-1 and more) fails.
ATOL = 2e-5


def _reference_logprobs(model, prompt: list[int], new: list[int]) -> torch.Tensor:
    """float64 ``log_softmax`` ``[len(new), V]`` of a full forward over prompt + new: row
    ``i`` is the distribution new token ``i`` was drawn from."""
    ids = torch.tensor([prompt + new], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(new)]


def _check_against_reference(model, prompt, completion, n: int, atol: float = ATOL) -> None:
    lps = completion.logprobs
    assert lps is not None and len(lps) == len(completion.token_ids)
    ref = _reference_logprobs(model, prompt, completion.token_ids)
    for i, (tok, (chosen, top)) in enumerate(zip(completion.token_ids, lps, strict=True)):
        assert len(top) == n
        assert chosen == pytest.approx(float(ref[i, tok]), abs=atol), i
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True), i
        for tid, v in top:
            assert v == pytest.approx(float(ref[i, tid]), abs=atol), (i, tid)
        # the ids are the n most likely of the reference (ties within ATOL aside)
        ref_top = torch.topk(ref[i], n).values
        assert torch.allclose(torch.tensor(values, dtype=torch.float64), ref_top.cpu(), atol=atol)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", level=1)


def test_greedy_logprobs_match_a_full_forward(model):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = SamplingParams(max_tokens=12, logprobs=5, **GREEDY)
    plain = SamplingParams(max_tokens=12, **GREEDY)
    with Engine(model, None, max_slots=4, max_seq_len=64, max_wait_ms=1.0) as engine:
        outs = engine.generate(prompts, params)
        base = engine.generate(prompts, plain)
    for p, o, b in zip(prompts, outs, base, strict=True):
        assert o.token_ids == b.token_ids  # asking changes no token
        assert b.logprobs is None
        _check_against_reference(model, p, o, 5)
        for tok, (chosen, top) in zip(o.token_ids, o.logprobs, strict=True):
            # greedy: the chosen token is the most likely one
            assert chosen == top[0][1]
            assert tok == top[0][0] or top[0][1] == dict(top).get(tok)


def test_mixed_rows_and_zero_alternatives(model):
    """Rows with logprobs 0, 3, 20 and None share prefill and decode steps; each gets its
    own count, and row selection does not mix rows up."""
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 20))] for _ in range(8)]
    counts = [0, None, 3, 20, None, 1, 0, 7]
    params = [SamplingParams(max_tokens=10, logprobs=c, **GREEDY) for c in counts]
    with Engine(model, None, max_slots=8, max_seq_len=64, max_wait_ms=5.0) as engine:
        outs = engine.generate(prompts, params)
        stats = engine.stats()
    assert stats["decode_steps"] < stats["decode_tokens"]  # rows really shared steps
    for p, c, o in zip(prompts, counts, outs, strict=True):
        if c is None:
            assert o.logprobs is None
        else:
            _check_against_reference(model, p, o, c)
            if c == 0:
                assert all(top == [] for _, top in o.logprobs)


def test_seeded_sampling_gives_the_same_tokens_with_logprobs(model):
    prompt = [5, 6, 7, 8, 9]
    kw = {"max_tokens": 16, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 77}
    with Engine(model, None, max_slots=4, max_seq_len=64) as engine:
        without = engine.generate([prompt], SamplingParams(**kw))[0]
        with_lp = engine.generate([prompt], SamplingParams(logprobs=4, **kw))[0]
        stream = engine.submit(prompt, SamplingParams(logprobs=2, **kw))
        streamed = list(stream)
        streamed_lp = stream.logprobs
    assert with_lp.token_ids == without.token_ids == streamed
    assert without.logprobs is None
    # raw logprobs: of the model's distribution, before temperature and the filters
    _check_against_reference(model, prompt, with_lp, 4)
    assert streamed_lp is not None and len(streamed_lp) == len(streamed)
    assert [c for c, _ in streamed_lp] == pytest.approx([c for c, _ in with_lp.logprobs])


def test_async_batches_carry_their_logprobs(model):
    import asyncio

    prompt = [11, 12, 13]

    async def collect(engine):
        stream = engine.submit(prompt, SamplingParams(max_tokens=9, logprobs=2, **GREEDY))
        ids, lps = [], []
        async for new, lp in stream.batches_with_logprobs():
            assert lp is not None and len(lp) == len(new)
            ids += new
            lps += lp
        plain = engine.submit(prompt, SamplingParams(max_tokens=3, **GREEDY))
        async for new, lp in plain.batches_with_logprobs():
            assert lp is None and new
        return ids, lps, stream.result()

    with Engine(model, None, max_slots=2, max_seq_len=64) as engine:
        ids, lps, done = asyncio.run(collect(engine))
    assert ids == done.token_ids and lps == done.logprobs


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ValueError), (21, ValueError), (2.0, TypeError), (True, TypeError), ("5", TypeError)],
)
def test_bad_logprobs_are_refused(value, error):
    with pytest.raises(error, match="logprobs"):
        SamplingParams(max_tokens=4, logprobs=value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_engine_logprobs_match_a_full_forward():
    """On a GPU the decode step is a replayed CUDA graph and the prefill a prefill graph;
    the logprobs are computed after the replay on the graph's static logits. GPU kernels
    round differently from the full forward (float32, no TF32): 1e-4."""
    model = tiny_model("llama", level=1).cuda()
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    counts = [5, None, 0, 20, 3, None, 1, 5, 2, 8]
    params = [SamplingParams(max_tokens=12, logprobs=c, **GREEDY) for c in counts]
    with Engine(model, None, max_slots=8, max_seq_len=64, max_prefill_tokens=64) as engine:
        assert engine._runner.graph_buckets
        outs = engine.generate(prompts, params)
        base = engine.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
    for p, c, o, b in zip(prompts, counts, outs, base, strict=True):
        assert o.token_ids == b.token_ids
        if c is None:
            assert o.logprobs is None
        else:
            _check_against_reference(model, p, o, c, atol=1e-4)

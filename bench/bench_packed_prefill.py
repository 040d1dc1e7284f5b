"""The engine's packed prefill against its left-padded batched prefill, in one run.

Workload: a burst of ``N_REQUESTS`` (24) prompts of ``PROMPT_LEN`` (16-128, uniform,
seeded) random tokens arriving together, ``max_tokens=4`` each (greedy, EOS ignored): a
prefill-heavy load, the case packing is for. ``Engine(max_slots=8, max_seq_len=256,
max_prefill_tokens=512, packed_prefill=...)`` over SmolLM2 at level 1 (float32 on the
CPU, bf16 with CUDA graphs on a GPU). Each entry times ``engine.generate`` of the whole
burst (after one warm-up burst of two prompts), ``ROUNDS`` rounds; the "packed" entry
records ``padded_over_packed`` (median time ratio, > 1: packing is faster), the prompt
positions each computed, and whether the two gave the same tokens.

Run: ``pytest bench/bench_packed_prefill.py -q --benchmark-json OUT.json``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from benchlib import smollm2_only, smollm2_patched

N_REQUESTS = 24
PROMPT_LEN = (16, 128)
ROUNDS = 3
_results: dict[str, Any] = {}


@pytest.fixture(scope="module")
def smollm2_level1() -> Any:
    return smollm2_patched(1)


@smollm2_only
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_packed_prefill_burst(benchmark: Any, smollm2_level1: Any, mode: str) -> None:
    from sentinel_kernels.serve import Engine, SamplingParams

    model = smollm2_level1
    vocab = int(model.get_input_embeddings().num_embeddings)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(10, vocab - 10) for _ in range(rng.randint(*PROMPT_LEN))]
        for _ in range(N_REQUESTS)
    ]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with Engine(
        model,
        None,
        max_slots=8,
        max_seq_len=256,
        max_prefill_tokens=512,
        packed_prefill=mode == "packed",
    ) as engine:
        engine.generate(prompts[:2], params)  # warm-up
        before = engine.stats()
        outs = benchmark.pedantic(
            lambda: engine.generate(prompts, params), rounds=ROUNDS, iterations=1
        )
        after = engine.stats()
    per_round = {
        k: (after[k] - before[k]) // ROUNDS
        for k in ("prefill_tokens", "prefill_computed_tokens", "prefill_chunks")
    }
    _results[mode] = (benchmark.stats.stats.median, [o.token_ids for o in outs])
    benchmark.extra_info.update(
        mode=mode,
        device=str(next(model.parameters()).device),
        requests=N_REQUESTS,
        prompt_len=list(PROMPT_LEN),
        packed_width=after["packed_width"],
        **per_round,
    )
    if mode == "packed" and "padded" in _results:
        padded_s, padded_tokens = _results["padded"]
        packed_s, packed_tokens = _results["packed"]
        benchmark.extra_info["padded_over_packed"] = padded_s / packed_s
        benchmark.extra_info["tokens_equal_padded"] = packed_tokens == padded_tokens
        assert packed_tokens == padded_tokens

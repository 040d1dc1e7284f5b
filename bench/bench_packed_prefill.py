"""The engine's packed prefill against its left-padded batched prefill, in one run.

Two prefill-heavy workloads (greedy, EOS ignored, prompts of random tokens, seeded), each
a burst of requests arriving together; each entry times ``engine.generate`` of the whole
burst (after one warm-up burst of two prompts), ``ROUNDS`` rounds, over SmolLM2 at level
1 (float32 on the CPU, bf16 with CUDA graphs on a GPU):

- ``short``: 24 prompts of 16-128 tokens, ``max_tokens=4``; ``Engine(max_slots=8,
  max_seq_len=256, max_prefill_tokens=512)``;
- ``chat``: 32 prompts of 32-512 tokens (``bench_engine``'s prompt lengths),
  ``max_tokens=8``; ``Engine(max_slots=16, max_seq_len=1024, max_prefill_tokens=2048)``
  (the engine's defaults but for the slots).

The "packed" entry of each records ``padded_over_packed`` (median time ratio, > 1:
packing is faster), the prompt positions each computed, and whether the two gave the
same tokens.

Run: ``pytest bench/bench_packed_prefill.py -q --benchmark-json OUT.json``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from benchlib import smollm2_only, smollm2_patched


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_len: tuple[int, int]
    max_tokens: int
    max_slots: int
    max_seq_len: int
    max_prefill_tokens: int


WORKLOADS = {
    "short": Workload(24, (16, 128), 4, 8, 256, 512),
    "chat": Workload(32, (32, 512), 8, 16, 1024, 2048),
}
ROUNDS = 3
_results: dict[tuple[str, str], Any] = {}


@pytest.fixture(scope="module")
def smollm2_level1() -> Any:
    return smollm2_patched(1)


@smollm2_only
@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_packed_prefill_burst(
    benchmark: Any, smollm2_level1: Any, workload: str, mode: str
) -> None:
    from sentinel_kernels.serve import Engine, SamplingParams

    w = WORKLOADS[workload]
    model = smollm2_level1
    vocab = int(model.get_input_embeddings().num_embeddings)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(10, vocab - 10) for _ in range(rng.randint(*w.prompt_len))]
        for _ in range(w.requests)
    ]
    params = SamplingParams(max_tokens=w.max_tokens, temperature=0.0, ignore_eos=True)
    benchmark.group = f"packed prefill {workload}"
    with Engine(
        model,
        None,
        max_slots=w.max_slots,
        max_seq_len=w.max_seq_len,
        max_prefill_tokens=w.max_prefill_tokens,
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
    _results[(workload, mode)] = (benchmark.stats.stats.median, [o.token_ids for o in outs])
    benchmark.extra_info.update(
        mode=mode,
        workload=workload,
        device=str(next(model.parameters()).device),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(w).items()},
        packed_width=after["packed_width"],
        **per_round,
    )
    if mode == "packed" and (workload, "padded") in _results:
        padded_s, padded_tokens = _results[(workload, "padded")]
        packed_s, packed_tokens = _results[(workload, "packed")]
        benchmark.extra_info["padded_over_packed"] = padded_s / packed_s
        benchmark.extra_info["tokens_equal_padded"] = packed_tokens == padded_tokens
        assert packed_tokens == padded_tokens

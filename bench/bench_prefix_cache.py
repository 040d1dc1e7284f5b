"""The engine's prefix cache: time to first token of chat requests that share a system
prompt, with the cache off and on, in one run.

Workload: ``N_REQUESTS`` (16) prompts = one shared system prompt of ``SYSTEM_TOKENS`` (512)
random tokens + a question of ``QUESTION_TOKENS`` (16) random tokens, sent one after
another (each waits for the previous one, so TTFT is the prefill alone, no queueing),
``max_tokens=1``; SmolLM2 at level 1 (the dense KV cache; the prefix cache is refused for
quantized caches), float32 on the CPU, bf16 on a GPU; ``max_seq_len`` 2048, so that on a
GPU the whole prompts fit a prefill graph (1024 wide) with room for the output. The first
request of each run fills the cache (a miss); the median TTFT of the other 15 is the entry's
time. The "on" entry
records ``ttft_ratio_off_over_on`` (> 1: the cache helps) and the prompt tokens it did not
prefill.

Run: ``pytest bench/bench_prefix_cache.py -q --benchmark-json OUT.json``.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import pytest
from benchlib import smollm2_only, smollm2_patched

N_REQUESTS = 16
SYSTEM_TOKENS = 512
QUESTION_TOKENS = 16
_results: dict[str, float] = {}


@pytest.fixture(scope="module")
def smollm2_level1() -> Any:
    return smollm2_patched(1)


@smollm2_only
@pytest.mark.parametrize("cache", ["off", "on"])
def test_prefix_cache_ttft(benchmark: Any, smollm2_level1: Any, cache: str) -> None:
    from sentinel_kernels.serve import Engine, SamplingParams

    model = smollm2_level1
    vocab = int(model.get_input_embeddings().num_embeddings)
    rng = random.Random(0)
    system = [rng.randrange(10, vocab - 10) for _ in range(SYSTEM_TOKENS)]
    prompts = [
        system + [rng.randrange(10, vocab - 10) for _ in range(QUESTION_TOKENS)]
        for _ in range(N_REQUESTS)
    ]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    tokens = 4 * (SYSTEM_TOKENS + QUESTION_TOKENS + 1) if cache == "on" else 0
    with Engine(
        model, None, max_slots=4, max_seq_len=2048, max_wait_ms=0, prefix_cache_tokens=tokens
    ) as engine:
        engine.generate([prompts[0][::-1]], params)  # warm-up, a different prefix

        def run() -> list[float]:
            ttfts = []
            for p in prompts:
                t0 = time.perf_counter()
                out = engine.generate([p], params)[0]
                assert out.timings.first_token is not None
                ttfts.append(time.perf_counter() - t0)
            return ttfts

        ttfts = benchmark.pedantic(run, rounds=1, iterations=1)
        stats = engine.stats()
    median = statistics.median(ttfts[1:])
    _results[cache] = median
    benchmark.extra_info.update(
        cache=cache,
        device=str(next(model.parameters()).device),
        ttft_first_ms=ttfts[0] * 1e3,
        ttft_median_rest_ms=median * 1e3,
        prefill_tokens=stats["prefill_tokens"],
        prefix_hit_tokens=stats["prefix_hit_tokens"],
        requests=N_REQUESTS,
        system_tokens=SYSTEM_TOKENS,
        question_tokens=QUESTION_TOKENS,
    )
    if cache == "on" and "off" in _results:
        benchmark.extra_info["ttft_ratio_off_over_on"] = _results["off"] / median

"""The op layer's eager calls: through torch's dispatcher vs the direct call of
``ops._dispatch.call_op``, in one run.

* CPU (2 cores): SmolLM2 at level 2, float32, ``sk.generate`` of 32 new tokens after a
  16-token prompt, batch 1, greedy (eager: no graphs on the CPU; every step makes ~270
  op calls);
* GPU: an eager prefill of 128 tokens of the same model, bf16 (host-bound on the H200's
  machine, `scripts/prefill_probe.py`).

``dispatcher`` forces every call through ``torch.ops`` (``_direct_ok`` patched to False);
``direct`` is the library's default. The ``direct`` entry records ``speedup`` (dispatcher
median / direct median); the two entries run one after the other, 5 rounds each.

Run: ``pytest bench/bench_dispatch.py -q --benchmark-json OUT.json``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from benchlib import HAS_CUDA, smollm2_only, smollm2_patched

ROUNDS = 5
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def work() -> Any:
    import sentinel_kernels as sk

    model = smollm2_patched(2)
    g = torch.Generator().manual_seed(0)
    if HAS_CUDA:
        ids = torch.randint(10, 40000, (1, 128), generator=g).to("cuda")

        @torch.inference_mode()
        def run() -> None:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()

    else:
        ids = torch.randint(10, 40000, (1, 16), generator=g)

        def run() -> None:
            sk.generate(model, ids, max_new_tokens=32, eos_token_id=[])

    run()  # warm-up
    return run


@smollm2_only
@pytest.mark.parametrize("mode", ["dispatcher", "direct"])
def test_op_dispatch(benchmark: Any, work: Any, mode: str, monkeypatch: Any) -> None:
    from sentinel_kernels.ops import _dispatch

    if mode == "dispatcher":
        monkeypatch.setattr(_dispatch, "_direct_ok", lambda args: False)
    benchmark.pedantic(work, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _medians[mode] = median
    benchmark.extra_info.update(
        mode=mode,
        case="eager prefill 128 tokens" if HAS_CUDA else "sk.generate 16 + 32 tokens, CPU",
        median_s=median,
    )
    if mode == "direct" and "dispatcher" in _medians:
        benchmark.extra_info["speedup"] = _medians["dispatcher"] / median

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

    with Engine(model, None, max_slots=12, max_seq_len=96, max_prefill_tokens=64) as engine:
        assert engine._runner.graph_buckets == (1, 2, 4, 8, 12)

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

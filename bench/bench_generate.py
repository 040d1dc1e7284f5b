"""End-to-end decoding speed: ``sk.generate`` per patch level against transformers' ``generate``.

Every timed function is one whole generation call (prefill of the prompt + all decode
steps, greedy, a fixed number of new tokens: ``min_new_tokens`` for transformers,
``eos_token_id=[]`` for ``sk.generate``), after one warm-up call (which captures the CUDA
graph and autotunes; sentinel levels get a second one, which captures the session's
16-step chunk graph and, with ``-pg``, the prompt's prefill graph).
``extra_info["tokens_per_s"]`` = batch x new tokens / median time.

Groups (GPU):

* ``smollm2 b1``: SmolLM2-135M-Instruct bf16, batch 1. Baselines ``hf-eager`` and
  ``hf-sdpa`` (``model.generate`` of the unpatched model with that attention); candidates
  ``sk-level1``, ``sk-level2`` (``patch_model(level)`` + ``sk.generate``), and
  ``sk-level2-unfused`` (level 2 with the decoder-layer fusion undone: the "before" of
  issue 19's fused step, ``benchlib.unfused_decoder``), ``sk-level2-nopdl`` (level 2
  without programmatic dependent launch, ``SENTINEL_PDL=0``; the sentinel entries
  otherwise run the default ``batch1``, PDL in batch-1 decode steps) and ``sk-level2-pdl``
  (``SENTINEL_PDL=1``: PDL at every batch size, against ``sk-level2`` in the b16 group),
  ``sk-level2-nochunk`` (level 2
  with ``SENTINEL_CHUNK_GRAPHS=0``: one graph replay per step instead of 16-step chunk
  graphs, to see what the chunks gain in the same run), ``sk-level2-pick``
  (``SENTINEL_FUSED_PICK=1``: greedy tokens picked and recorded by ``ops.greedy_advance``
  instead of ``torch.argmax`` and torch ops; its "before" is ``sk-level2``), ``-rope``
  entries (``SENTINEL_ROPE_ATTENTION=1``: each decode step's rotary embedding and K/V
  append run inside the decode attention, ``ops.rope_decode_attention``: one launch per
  layer fewer; their "before" is the same entry without ``-rope``; since 5b695c3 level 2
  folds by default, and ``sk-level2-norope`` (``SENTINEL_ROPE_ATTENTION=0``) is the
  entry without it); a ``-pg`` suffix passes
  ``prefill_graph=True`` (the repeated prompt's prefill is a graph replay after its
  second call, one more warm-up call; ``sk.generate``'s default on CUDA since
  2026-12-05), the others ``prefill_graph=False`` (eager prefill). Targets: level 1 >=
  1000 tokens/s, level 2 >= level 1; issue 19: level 2 >= 2,000 tokens/s (stretch 3,000). Batch-1
  sentinel entries record ``step_kernels`` (per decode step, from a profiler trace) and
  ``step_kernels_per_layer`` (target <= 6).
* ``smollm2-shape b1``: the same cases on a random-init model of SmolLM2's shape
  (``benchlib.smollm2_shape``), for machines without the GGUF file.
* ``llama1b b1`` / ``llama1b b16``: random-init Llama of ~1.2B parameters (hidden 2048, 16
  layers, 32/8 heads, intermediate 8192, vocab 128256, tied embeddings) bf16. Targets: b1
  level 1 >= 700 tokens/s, level 2 >= 1100 (issue 19: >= 1,800); b16 >= 5x transformers'
  ``generate``. The b16
  prompts have 16 different lengths (left padding).

* ``smollm2 b16 int8`` ... ``llama1b b128 int8`` (``test_int8_batched``, issue 19 item 2):
  random-init models of both shapes at batch 16, 64 and 128, baseline ``sk-level1``,
  candidate ``sk-level2``. Target: level 2 >= 1.1x level 1 tokens/s everywhere.

Group (CPU): ``smollm2 cpu``: float32 model as loaded, ``hf-fp32`` against ``sk-level2``.
Target: >= 3x.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import pytest
import torch
from benchlib import (
    HAS_CUDA,
    cuda_only,
    decode_step_kernels,
    llama_1b,
    pdl_off,
    pdl_on,
    smollm2_only,
    smollm2_shape,
    unfused_decoder,
)

PROMPT = "The European lobster is a species of clawed lobster found in"


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def _batch_prompts(vocab: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    longest = 48
    ids = torch.randint(3, vocab, (batch, longest), generator=g)
    mask = torch.ones_like(ids)
    for r in range(batch):
        n = longest - (r * 29) % 33  # 16 different lengths in [16, 48]
        mask[r, : longest - n] = 0
        ids[r, : longest - n] = 0
    return ids.to(device), mask.to(device)


def _run_case(
    benchmark, model, impl: str, ids, mask, new: int, rounds: int, group: str, baseline: bool
) -> None:
    import sentinel_kernels as sk

    level = int(impl[len("sk-level")]) if impl.startswith("sk-level") else 0
    pg = impl.endswith("-pg")
    base = impl.removesuffix("-pg")
    unfused = base.endswith("-unfused")
    pdl = base.endswith("-pdl")
    nopdl = base.endswith("-nopdl")
    nochunk = base.endswith("-nochunk")
    fused_pick = base.endswith("-pick")
    rope = "-rope" in base
    norope = "-norope" in base
    attn_before = model.config._attn_implementation
    if impl == "hf-eager":
        model.set_attn_implementation("eager")
    elif impl == "hf-sdpa":
        model.set_attn_implementation("sdpa")
    elif impl == "hf-fp32":
        pass
    if level:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = sk.patch_model(model, level=level)
    stack = contextlib.ExitStack()
    if unfused:
        stack.enter_context(unfused_decoder(model))
    if pdl:
        stack.enter_context(pdl_on())
    if nopdl:
        stack.enter_context(pdl_off())
    if nochunk:
        from sentinel_kernels import settings

        stack.enter_context(settings.override(settings.CHUNK_GRAPHS_ENV, "0"))
    if fused_pick:
        from sentinel_kernels import settings

        stack.enter_context(settings.override(settings.FUSED_PICK_ENV, "1"))
    if rope or norope:
        from sentinel_kernels import settings

        value = "1" if rope else "0"
        stack.enter_context(settings.override(settings.ROPE_ATTENTION_ENV, value))
    try:

        def run():
            with torch.inference_mode():
                if level:
                    out = sk.generate(
                        model,
                        ids,
                        attention_mask=mask,
                        max_new_tokens=new,
                        eos_token_id=[],
                        prefill_graph=pg,
                    )
                else:
                    out = model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=0,
                    )
            _sync()
            assert out.shape[1] == ids.shape[1] + new
            return out

        run()  # warm-up: graph capture, autotuning
        if level:
            run()  # the second call of a session captures its chunk and prefill graphs
        benchmark.group = group
        benchmark.pedantic(run, rounds=rounds, iterations=1)
        median = benchmark.stats.stats.median
        if level and HAS_CUDA and ids.shape[0] == 1:
            # the batch-1 step's kernels, from a profiler trace (issue 19: <= 6 per layer)
            spec = report.options.get("kv_cache") or "dense"
            kernels = len(decode_step_kernels(model, ids, spec))
            layers = model.config.num_hidden_layers
            benchmark.extra_info.update(
                {"step_kernels": kernels, "step_kernels_per_layer": kernels / layers}
            )
        benchmark.extra_info.update(
            {
                "impl": impl,
                "role": "baseline" if baseline else "candidate",
                "level": level,
                "batch": ids.shape[0],
                "prompt_tokens": ids.shape[1],
                "new_tokens": new,
                "tokens_per_s": ids.shape[0] * new / median,
                "device": str(ids.device),
                "dtype": str(next(model.parameters()).dtype),
            }
        )
    finally:
        stack.close()
        if level:
            sk.unpatch_model(model)
            sk.generate.clear_sessions(model)
        model.set_attn_implementation(attn_before)
        if HAS_CUDA:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def smollm2_gpu():
    import sentinel_kernels as sk

    return sk.models.load_smollm2(device="cuda", dtype=torch.bfloat16)


def _run_b1(benchmark, model, impl: str, ids: torch.Tensor, *, sk_rounds: int, group: str):
    """One batch-1 case: Hugging Face baselines generate 64 tokens 3 times, sentinel levels
    256 tokens ``sk_rounds`` times."""
    hf = impl.startswith("hf")
    _run_case(
        benchmark,
        model,
        impl,
        ids,
        torch.ones_like(ids),
        64 if hf else 256,
        rounds=3 if hf else sk_rounds,
        group=group,
        baseline=hf,
    )


SMOLLM2_B1_IMPLS = [
    "hf-eager",
    "hf-sdpa",
    "sk-level1",
    "sk-level2-unfused",
    "sk-level2-nopdl",
    "sk-level2",
]


@cuda_only
@smollm2_only
@pytest.mark.parametrize("impl", SMOLLM2_B1_IMPLS)
def test_smollm2_b1(benchmark, smollm2_gpu, impl):
    model, tok = smollm2_gpu
    ids = tok(PROMPT, return_tensors="pt").input_ids.cuda()
    _run_b1(benchmark, model, impl, ids, sk_rounds=10, group="smollm2 b1")


@pytest.fixture(scope="module")
def llama1b():
    return llama_1b()


B1_IMPLS = [
    "hf-sdpa",
    "sk-level1",
    "sk-level1-rope",
    "sk-level2-unfused",
    "sk-level2-nopdl",
    "sk-level2",
    "sk-level2-pick",
    "sk-level2-rope",
    "sk-level2-rope-pick",
    "sk-level2-norope",
    "sk-level2-nochunk",
    "sk-level2-nopdl-pg",
    "sk-level2-pg",
]


@cuda_only
@pytest.mark.parametrize("impl", B1_IMPLS)
def test_llama1b_b1(benchmark, llama1b, impl):
    ids = torch.randint(3, 128256, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    _run_b1(benchmark, llama1b, impl, ids, sk_rounds=5, group="llama1b b1")


@cuda_only
@pytest.mark.parametrize("impl", ["hf-sdpa", "sk-level1", "sk-level2", "sk-level2-pdl"])
def test_llama1b_b16(benchmark, llama1b, impl):
    ids, mask = _batch_prompts(128256, 16, "cuda")
    new = 64 if impl.startswith("hf") else 128
    _run_case(
        benchmark,
        llama1b,
        impl,
        ids,
        mask,
        new,
        rounds=3,
        group="llama1b b16",
        baseline=impl.startswith("hf"),
    )


@pytest.fixture(scope="module")
def smollm2_shape_gpu():
    return smollm2_shape()


@cuda_only
@pytest.mark.parametrize("impl", B1_IMPLS)
def test_smollm2_shape_b1(benchmark, smollm2_shape_gpu, impl):
    """``smollm2 b1`` on a random-init model of the same shape: runs where the GGUF file is
    not installed (the lent GPU machine); timing does not depend on the weights."""
    ids = torch.randint(3, 49152, (1, 13), generator=torch.Generator().manual_seed(0)).cuda()
    _run_b1(benchmark, smollm2_shape_gpu, impl, ids, sk_rounds=10, group="smollm2-shape b1")


@cuda_only
@pytest.mark.parametrize("impl", ["sk-level1", "sk-level2"])
@pytest.mark.parametrize("batch", [16, 64, 128], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("shape", ["smollm2", "llama1b"])
def test_int8_batched(benchmark, request, shape, batch, impl):
    """Issue 19, item 2: INT8 weights (level 2) against level 1's bf16 cuBLAS linears at
    batch 16, 64 and 128 (target: level 2 >= 1.1x level 1 tokens/s on both shapes);
    random-init models of SmolLM2's and Llama-3.2-1B's shapes, 16 prompt lengths in
    [16, 48] (left padding), 128 new tokens."""
    model = request.getfixturevalue("smollm2_shape_gpu" if shape == "smollm2" else "llama1b")
    ids, mask = _batch_prompts(model.config.vocab_size, batch, "cuda")
    _run_case(
        benchmark,
        model,
        impl,
        ids,
        mask,
        128,
        rounds=3,
        group=f"{shape} b{batch} int8",
        baseline=impl == "sk-level1",
    )


# ----------------------------------------------------------------------------- CPU


@pytest.fixture(scope="module")
def smollm2_cpu():
    import sentinel_kernels as sk

    return sk.models.load_smollm2(device="cpu", dtype=torch.float32)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU group runs on the CPU machine")
@smollm2_only
@pytest.mark.parametrize("impl", ["hf-fp32", "sk-level1", "sk-level2", "sk-level2-torch1"])
def test_smollm2_cpu(benchmark, smollm2_cpu, impl, monkeypatch):
    # "-torch1": torch on one thread, the C++ kernels on all cores (SENTINEL_NUM_THREADS):
    # torch's OpenMP workers otherwise keep spinning on the second core between ops
    model, tok = smollm2_cpu
    ids = tok(PROMPT, return_tensors="pt").input_ids
    threads = torch.get_num_threads()
    if impl.endswith("-torch1"):
        monkeypatch.setenv("SENTINEL_NUM_THREADS", str(threads))
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        _run_case(
            benchmark,
            model,
            impl.removesuffix("-torch1"),
            ids,
            torch.ones_like(ids),
            64,
            rounds=3,
            group="smollm2 cpu",
            baseline=impl == "hf-fp32",
        )
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["wall_s"] = time.perf_counter() - start
    benchmark.extra_info["torch_threads"] = 1 if impl.endswith("-torch1") else threads

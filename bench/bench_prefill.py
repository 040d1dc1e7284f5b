"""Prefill speed (time to first token): the patched model's prompt forward against
transformers' sdpa (issue 19, item 1).

Models: random-init Llamas, bf16 on the GPU, built offline (no download; speed does not
depend on trained weights): ``smollm2`` = SmolLM2-135M's shape (hidden 576, 30 layers,
9 query / 3 KV heads of 64, intermediate 1536, vocab 49152, tied embeddings, RoPE theta
1e5; ``benchlib.smollm2_shape``), ``llama1b`` = Llama-3.2-1B's shape (``benchlib.llama_1b``).
Batch 1, one prompt of 2048 random token ids (3 different prompts rotated).

Groups (GPU), ``<shape>`` in ``smollm2``, ``llama1b``:

* ``prefill 2048 <shape>``: one forward over the whole prompt, logits of the last position
  only (``logits_to_keep=1``), under ``torch.inference_mode``. Baseline ``hf-sdpa``: the
  unpatched model (``attn_implementation="sdpa"``) with a new ``DynamicCache`` (what its
  forward would create itself). Candidates ``sk-level1``, ``sk-level2``:
  ``sk.patch_model(level)`` on a copy of the model, the forward into the level's
  preallocated cache (``sk.kv_cache(model, <the patch's kv_cache spec>, max_cache_len=2049)``,
  dense at level 1, INT8 at level 2: the cache ``sk.generate(..., max_new_tokens=1)``
  allocates), allocated once and reset at the start of every call
  (``cache.reset()`` + ``set_static_key_mask(None)``, what ``sk.generate`` does when it
  reuses its session's cache).
* ``prefill 4x512 <shape>``: the same 2048 tokens as four chunks of 512 fed into one
  cache (chunked prefill as the engine runs it: each chunk a forward with the cache of
  the previous ones, ``position_ids`` continuing, ``logits_to_keep=1``). Same impls
  (``hf-sdpa`` fills one ``DynamicCache`` chunk by chunk; the levels their preallocated
  cache, whose later chunks attend over the stored past: one prefill attention over the
  past and the chunk). ``sk-level1-pieces``, ``sk-level2-pieces``: the same with the
  later chunks read as before 2026-12-05, by decode attention in pieces of 64 queries
  (``nn.attention._long_chunk_fits`` off), the same-run "before". ``sk-level1-engine``,
  ``sk-level2-engine``: the serving engine's own route for a long prompt
  (``Engine(max_slots=1, max_seq_len=2049, max_prefill_tokens=512)``, its
  ``ModelRunner.prefill`` called chunk by chunk as the engine's scheduler does): the first
  chunk replays a prefill graph, the later three replay the chunk graph of width 512
  (past copied to a staging row, read by the device lengths, copied back); the prompt's
  ids are host lists, as the engine holds them.
* ``prefill 2048 <shape> generate``: the whole call a user makes for the first token.
  Baseline ``hf-sdpa-generate``: ``model.generate(ids, attention_mask=ones,
  max_new_tokens=1, do_sample=False)`` of the unpatched model; candidates
  ``sk-level1-generate``, ``sk-level2-generate``: ``sk.generate(model, ids,
  attention_mask=ones, max_new_tokens=1)`` of the patched copy (eager prefill, the
  default; its session's cache is allocated by the warm-up call and reused, as by any
  repeated call); ``sk-level1-generate-pg``, ``sk-level2-generate-pg``: the same with
  ``prefill_graph=True`` (the prompt shape repeats, so after the warm-up calls every
  prefill is a CUDA graph's replay). A group of its own, so that its speedups are
  against the whole call of transformers, not against a bare forward.

Timed: one call as above, ending in ``torch.cuda.synchronize()`` inside the timed
function (the host's Python is part of time to first token, so nothing is hidden behind
the launch queue); ``measure`` runs 100 rounds after its warm-up calls (which also
autotune the Triton kernels). Outside the timed region: building and patching the model,
the prompts, and the levels' cache allocation. ``extra_info``: ``tokens``, ``chunks``,
``chunk_tokens``, ``ms`` (median), ``level``, ``kv_cache``, ``whole_call``, ``flops`` /
``tflops`` (``2 x tokens x`` the layers' linear weights ``+ 4 x Hq x D x T(T+1)/2`` per
layer for causal attention ``+ 2 x hidden x vocab`` per forward for the last position's
logits); ``bytes`` = the unpatched model's weight bytes x forwards, charged to every entry
of the group (what a call must read at least; prefill is compute-bound, so the GB/s is
only a floor, TFLOP/s is the figure of merit). The speedup over
``hf-sdpa`` is the report's "speedup vs baseline" (baseline median / entry median, same
run, same group).

Targets (issue 19, item 1): ``sk-level1`` and ``sk-level2`` >= 1.5x ``hf-sdpa`` on both
shapes, in ``prefill 2048`` and ``prefill 4x512``.

Group (CPU): ``prefill 1024 as 4x256 cpu smollm2`` (``test_prefill_cpu``): the SmolLM2
shape in float32, 1024 tokens as four chunks of 256, ``hf-sdpa`` against the levels and
their ``-pieces`` routes; one call per round, rounds filling ~2 s.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from benchlib import HAS_CUDA, cuda_only, llama_1b, smollm2_shape

TOKENS = 2048
CHUNK = 512
#: The levels' cache length: what ``sk.generate(ids, max_new_tokens=1)`` allocates.
CAPACITY = TOKENS + 1
#: Prompts rotated (the weights, >= 135 MB even with INT8 linears, exceed the L2 anyway).
PROMPT_SETS = 3


SHAPES: dict[str, Callable[..., torch.nn.Module]] = {
    "smollm2": smollm2_shape,
    "llama1b": llama_1b,
}


@dataclass(frozen=True)
class Mode:
    """How a group feeds the prompt: ``chunk`` tokens per forward, or a whole call."""

    label: str  # "2048" or "4x512", the group's name
    chunk: int
    whole_call: bool = False


MODES = (Mode("2048", TOKENS), Mode("4x512", CHUNK), Mode("2048", TOKENS, whole_call=True))


def _impls(mode: Mode) -> tuple[str, ...]:
    base = ("hf-sdpa", "sk-level1", "sk-level2")
    if mode.chunk < TOKENS:
        return (
            *base,
            "sk-level1-pieces",
            "sk-level2-pieces",
            "sk-level1-engine",
            "sk-level2-engine",
        )
    if not mode.whole_call:
        return base
    return (*(f"{i}-generate" for i in base), "sk-level1-generate-pg", "sk-level2-generate-pg")


def _group(mode: Mode, shape: str) -> str:
    return f"prefill {mode.label} {shape}" + (" generate" if mode.whole_call else "")


CASES = [
    pytest.param(shape, mode, impl, id=f"{shape}-{mode.label}-{impl}")
    for shape in SHAPES  # outermost: one shape's model in memory at a time
    for mode in MODES
    for impl in _impls(mode)
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def level_of(impl: str) -> int:
    """The patch level of an entry name (``sk-level2-generate`` -> 2; ``hf-*`` -> 0)."""
    return int(impl[len("sk-level")]) if impl.startswith("sk-level") else 0


def patched_copy(model: torch.nn.Module, level: int) -> torch.nn.Module:
    """A deep copy of ``model`` patched at ``level`` (the original keeps its sdpa)."""
    import sentinel_kernels as sk

    out = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(out, level=level)
    return out


def level_cache_spec(model: torch.nn.Module) -> str:
    """The ``kv_cache`` spec of ``model``'s patch, ``"dense"`` without one (what
    ``sk.generate`` allocates for it)."""
    from sentinel_kernels.patching import patch_report

    report = patch_report(model)
    return str((None if report is None else report.options.get("kv_cache")) or "dense")


def level_cache(model: torch.nn.Module, capacity: int, batch: int = 1) -> Any:
    """The preallocated cache ``sk.generate`` gives a patched ``model``
    (:func:`level_cache_spec`, ``capacity`` slots, ``batch`` rows, the model's device and
    dtype)."""
    import sentinel_kernels as sk

    return sk.kv_cache(model, level_cache_spec(model), max_cache_len=capacity, batch_size=batch)


def forward_call(
    model: torch.nn.Module, level: int, chunk: int, capacity: int = CAPACITY
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(ids)``: the prefill of ``ids`` ``[B, T]`` as ``ceil(T / chunk)`` forwards into
    one cache, returning the last position's logits ``[B, V]`` after a device sync.

    ``level`` 0 (``model`` unpatched): a new ``transformers.DynamicCache`` per call.
    ``level`` > 0 (``model`` patched at that level): :func:`level_cache`, allocated here
    once and reset inside every call, as ``sk.generate`` reuses its session's cache.
    Every chunk: ``position_ids`` continuing from the previous chunk, ``use_cache=True``,
    ``logits_to_keep=1`` (what the engine's prefill passes)."""
    from transformers import DynamicCache

    from sentinel_kernels.hf_compat import cache_kwargs

    device = next(model.parameters()).device
    cache = level_cache(model, capacity) if level else None

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if cache is not None:
                c = cache
                c.reset()
                c.set_static_key_mask(None)
            else:
                c = DynamicCache(config=model.config)
            kw = {"use_cache": True, "logits_to_keep": 1, **cache_kwargs(model, c)}
            batch, total = ids.shape
            logits = None
            for start in range(0, total, chunk):
                part = ids[:, start : start + chunk]
                pos = torch.arange(start, start + part.shape[1], device=ids.device)
                out = model(input_ids=part, position_ids=pos[None].expand(batch, -1), **kw)
                logits = out.logits[:, -1]
                del out
        _sync(device)
        assert logits is not None
        return logits

    return run


def engine_call(
    model: torch.nn.Module, chunk: int, capacity: int
) -> tuple[Callable[[list[int]], torch.Tensor], Any]:
    """``(run, engine)``: ``run(ids)`` prefills the host list ``ids`` into slot 0 of a
    one-slot :class:`~sentinel_kernels.serve.Engine` of ``capacity`` positions through its
    ``ModelRunner.prefill``, ``chunk`` tokens per call with ``start`` advancing (the
    engine's chunked prefill), and returns the last position's logits ``[1, V]`` after a
    device sync. The caller shuts ``engine`` down."""
    from sentinel_kernels.serve import Engine

    device = next(model.parameters()).device
    engine = Engine(model, None, max_slots=1, max_seq_len=capacity, max_prefill_tokens=chunk)
    runner = engine._runner

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            runner.release(0)
            logits = None
            for start in range(0, len(ids), chunk):
                logits = runner.prefill([0], [ids[start : start + chunk]], start)
        _sync(device)
        assert logits is not None
        return logits

    return run, engine


def generate_call(
    model: torch.nn.Module, level: int, prefill_graph: bool = False
) -> Callable[..., torch.Tensor]:
    """``run(ids, mask)``: the whole call for one new token, ``sk.generate`` of a patched
    model (``level`` > 0; ``prefill_graph``: its CUDA-graph prefill of a repeated prompt
    shape) or transformers' ``model.generate`` (``level`` 0), greedy, ending in a device
    sync; returns ``[B, T + 1]``."""
    import sentinel_kernels as sk

    device = next(model.parameters()).device

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if level:
            out = sk.generate(
                model,
                ids,
                attention_mask=mask,
                max_new_tokens=1,
                eos_token_id=[],
                prefill_graph=prefill_graph,
            )
        else:
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0
            )
        _sync(device)
        return out

    return run


def prefill_flops(config: Any, tokens: int, chunk: int) -> float:
    """FLOPs of a prefill of ``tokens`` tokens in chunks of ``chunk``: the layers' linear
    weights (``2 x tokens x`` their size), causal attention (``4 x Hq x D x T(T+1)/2`` per
    layer: scores and the weighted sum over the keys each query sees) and the last
    position's logits of each forward (``2 x hidden x vocab``)."""
    h, inter = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    layers, vocab = config.num_hidden_layers, config.vocab_size
    linear = h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * inter
    attention = 4 * hq * d * tokens * (tokens + 1) / 2
    forwards = -(-tokens // chunk)
    return float(layers * (2 * tokens * linear + attention) + forwards * 2 * h * vocab)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each tensor counted once (tied
    embeddings share one)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


class _Models:
    """The current shape's unpatched base model (one shape in memory at a time)."""

    def __init__(self) -> None:
        self.shape: str | None = None
        self.model: torch.nn.Module | None = None

    def get(self, shape: str) -> torch.nn.Module:
        if shape != self.shape or self.model is None:
            self.free()
            self.model = SHAPES[shape]("cuda", "sdpa")
            self.shape = shape
        return self.model

    def free(self) -> None:
        self.model, self.shape = None, None
        gc.collect()
        if HAS_CUDA:
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def base_models() -> Iterator[_Models]:
    models = _Models()
    yield models
    models.free()


def run_case(
    benchmark: Any,
    measure: Any,
    base: torch.nn.Module,
    shape: str,
    mode: Mode,
    impl: str,
    tokens: int = TOKENS,
) -> dict[str, Any]:
    """Time entry ``impl`` of group ``_group(mode, shape)`` on ``base`` (the unpatched
    model; a level's entry patches a copy, freed afterwards) with ``measure`` over
    :data:`PROMPT_SETS` random prompts of ``tokens`` tokens; the first call is checked
    (output shape, finite logits) before timing. Returns ``extra_info``."""
    import sentinel_kernels as sk

    param = next(base.parameters())
    dev, dt = param.device, param.dtype
    level = level_of(impl)
    chunk = min(mode.chunk, tokens)
    forwards = -(-tokens // chunk)
    # every entry of a group is charged the unpatched weights once per forward
    nbytes = weight_bytes(base) * forwards
    model = patched_copy(base, level) if level else base
    vocab = model.config.vocab_size
    pieces = contextlib.ExitStack()  # undone after the entry
    if impl.endswith("-pieces"):
        from sentinel_kernels.nn import attention as sk_attention

        old_fits = sk_attention._long_chunk_fits
        sk_attention._long_chunk_fits = lambda kv, sq: False
        pieces.callback(setattr, sk_attention, "_long_chunk_fits", old_fits)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, vocab, (1, tokens), generator=g).to(dev) for _ in range(PROMPT_SETS)
    ]
    try:
        sets: list[tuple[torch.Tensor, ...]]
        if mode.whole_call:
            fn: Callable[..., torch.Tensor] = generate_call(
                model, level, prefill_graph=impl.endswith("-pg")
            )
            sets = [(ids, torch.ones_like(ids)) for ids in prompts]
            check = fn(*sets[0])
            assert check.shape == (1, tokens + 1), check.shape
        elif impl.endswith("-engine"):
            fn, engine = engine_call(model, chunk, tokens + 1)
            pieces.callback(engine.shutdown)
            sets = [(ids[0].tolist(),) for ids in prompts]
            check = fn(*sets[0])
            assert check.shape == (1, vocab), check.shape
            assert bool(torch.isfinite(check).all()), "non-finite logits"
            runner = engine._runner
            # every chunk replayed a graph: one prefill graph, then chunk graphs
            assert runner.prefill_replays == 1, runner.prefill_replays
            assert runner.chunk_replays == forwards - 1, runner.chunk_replays
        else:
            fn = forward_call(model, level, chunk, capacity=tokens + 1)
            sets = [(ids,) for ids in prompts]
            check = fn(*sets[0])
            assert check.shape == (1, vocab), check.shape
            assert bool(torch.isfinite(check).all()), "non-finite logits"
        del check
        info = measure(
            benchmark,
            fn,
            sets,
            group=_group(mode, shape),
            impl=impl,
            role="baseline" if level == 0 else "candidate",
            backend="sentinel" if level else "transformers-sdpa",
            device=dev,
            nbytes=nbytes,
            shape=(1, tokens),
            dtype=dt,
            flops=prefill_flops(model.config, tokens, chunk),
            extra={
                "model_shape": shape,
                "tokens": tokens,
                "chunks": forwards,
                "chunk_tokens": chunk,
                "level": level,
                "kv_cache": level_cache_spec(model) if level else "DynamicCache",
                "capacity": tokens + 1 if level else None,
                "whole_call": mode.whole_call,
            },
        )
        median = info.get("median_s")
        if median:
            info["ms"] = benchmark.extra_info["ms"] = median * 1e3
        return info
    finally:
        pieces.close()
        if level:
            sk.generate.clear_sessions(model)
            del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "mode", "impl"), CASES)
def test_prefill(benchmark, measure, base_models, shape: str, mode: Mode, impl: str) -> None:
    run_case(benchmark, measure, base_models.get(shape), shape, mode, impl)


#: The CPU group: a shorter prompt (a float32 forward of the SmolLM2 shape takes ~0.5 s per
#: 256 tokens on 2 cores), the engine's chunked prefill route before and after 0a93558.
CPU_MODE = Mode("1024 as 4x256 cpu", 256)
CPU_TOKENS = 1024
CPU_IMPLS = ("hf-sdpa", "sk-level1", "sk-level1-pieces", "sk-level2", "sk-level2-pieces")


@functools.cache
def _cpu_model() -> torch.nn.Module:
    return smollm2_shape("cpu", "sdpa").float()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_prefill_cpu(benchmark, measure, impl: str) -> None:
    """``prefill 1024 as 4x256 cpu smollm2``: a float32 model of SmolLM2's shape on the CPU,
    1024 prompt tokens fed as 4 chunks of 256 (the later three read the stored past), as
    the engine prefills a long prompt on a CPU server."""
    run_case(benchmark, measure, _cpu_model(), "smollm2", CPU_MODE, impl, tokens=CPU_TOKENS)

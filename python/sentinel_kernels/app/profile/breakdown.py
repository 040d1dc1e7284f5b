"""Where inference time goes: torch.profiler over prefill and decode, grouped by category.

:func:`profile_model` patches a model at one level, runs a prefill forward and a plain
greedy decode loop (warm-up, then an un-profiled timed run, then a run under
``torch.profiler``), unpatches it and returns a :class:`ProfileResult`: per phase
(``prefill``, ``decode``) the total time and the time of each :data:`CATEGORIES` entry,
plus tokens/s of the timed run. :func:`profile_levels` does that for several levels
("before" = level 0, "after" = the requested level).

Ranges recorded (``torch.profiler.record_function``):

* ``sentinel::prefill``: the prompt's forward plus the sampling of the first new token;
* ``sentinel::decode``: one decode step (forward of one token per row plus its sampling);
* ``sentinel::sampling``: greedy argmax of the last logits, on the device (nested in the
  phase range);
* ``sentinel::kv_cache``: every ``cache.update`` call (the cache object is ours, so its
  bound method is wrapped for the profiled run only);
* ``sentinel::module.attention`` / ``sentinel::module.linear``: the forward of each
  attention module (class name containing ``Attention``) and each linear layer
  (``nn.Linear``, ``Int8Linear``, GPT-2's ``Conv1D``, any class named ``*Linear``). They
  are needed because some work calls no op the profiler sees: the CPU fast path of
  ``Int8Linear`` calls ``sentinel_kernels._C`` directly, and HF's eager attention is a
  handful of generic matmuls. These hooks are installed for the profiled run only, so the
  timed run (tokens/s) carries no profiler bookkeeping.

Classification (:func:`classify_name`, then :func:`resolve_category`): every event name
maps to a category with a *strength*:

* strong names: the ranges above; ``sentinel::knn_search`` and
  ``sentinel::knn_interpolate`` (knn: k-NN retrieval and the kNN-LM mixture, recorded by
  :mod:`sentinel_kernels.knn` whenever it runs); our custom ops ``sentinel::attention``,
  ``sentinel::decode_attention`` (attention), ``sentinel::kv_append`` (kv_cache),
  ``sentinel::int8_linear``, ``sentinel::int8_linear_a8`` (linear); ``aten::linear``,
  ``aten::_int_mm`` (linear); ``aten::scaled_dot_product_attention`` and the
  ``aten::_scaled_dot_product_*`` / ``aten::_flash_attention_*`` /
  ``aten::_efficient_attention_*`` ops (attention); ``aten::multinomial`` (sampling);
  kernel names containing ``kv_append`` (kv_cache), ``flash``, ``fmha``, ``attn``,
  ``attention``, ``sdpa`` or our Triton attention kernels ``_decode_split_kernel``,
  ``_decode_combine_kernel``, ``_head_tables_kernel`` (attention), ``_w8a16``, ``_w8a8``,
  ``int8_linear``, ``_dequant_weight_kernel`` (linear).
* weak names (generic matmuls, which are linear layers unless something says otherwise):
  ``aten::mm``, ``aten::addmm``, ``aten::matmul``, ``aten::bmm``, ``aten::baddbmm``,
  ``sentinel::quantize_int8`` / ``dequantize_int8`` and their ``_quantize_rows`` kernels
  (W8A8 activation quantization), kernel names containing ``gemm``, ``gemv``, ``nvjet``
  (cuBLAS on Hopper), ``cutlass`` or ``splitkreduce``.

An event's category is that of the innermost strong name on its path (itself, then its
parents up to the phase range); if there is none, the innermost weak one; else
``other``. So the two matmuls of HF's eager attention count as attention (they sit inside
an attention module), the q/k/v/o projections inside that module count as linear (their
linear range is inner), a cuBLAS GEMM launched by ``aten::linear`` counts as linear, and
everything in the sampling range counts as sampling.

Time basis, so that nothing is counted twice:

* CUDA (``time_basis="device"``): each kernel's device time (kernels, memcpys and memsets
  linked by the profiler to the CPU op that launched them), classified by the kernel's own
  name, then its launching op's path. Only kernels launched inside a phase range count;
  the phase total is the sum of its kernels (device busy time), so the categories add up
  to it exactly. Device entries that are the GPU shadows of ``record_function`` ranges
  (``gpu_user_annotation``, which the profiler attaches to the range as a "kernel") are
  skipped. The phase's CPU wall time is reported next to it (``wall_ms``): the gap is
  launch overhead and idle device time.
* CPU (``time_basis="cpu"``): the *self* CPU time of every event inside the phase range
  (the event's duration minus its children's), so nested ops are never counted twice and
  the categories add up to the range's duration. Python time between ops (HF module code,
  mask building) is the self time of the enclosing range: ``other`` at the phase level,
  ``attention`` inside an attention module.

Decode tokens/s come from the un-profiled timed run: ``batch * steps / seconds`` of the
decode loop (forward + greedy sampling per step, CUDA synchronised at both ends, no host
sync per step).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function
from transformers import DynamicCache

from ...cache import kv_cache
from ...hf_compat import cache_kwargs
from ...knn.lm import KNN_INTERPOLATE_RANGE, KnnScorer, capture_lm_head_input, lm_head_input
from ...knn.search import KNN_SEARCH_RANGE
from ...patching import patch_model, unpatch_model

__all__ = [
    "CATEGORIES",
    "PHASES",
    "PhaseBreakdown",
    "ProfileResult",
    "classify_name",
    "profile_levels",
    "profile_model",
    "resolve_category",
]

#: Categories, in report order.
CATEGORIES: tuple[str, ...] = ("attention", "linear", "kv_cache", "sampling", "knn", "other")
#: Categories only some runs have (kNN-LM decoding).
_OPTIONAL_CATEGORIES = frozenset({"knn"})
#: Phases, in report order.
PHASES: tuple[str, ...] = ("prefill", "decode")

PREFILL_RANGE = "sentinel::prefill"
DECODE_RANGE = "sentinel::decode"
SAMPLING_RANGE = "sentinel::sampling"
KV_CACHE_RANGE = "sentinel::kv_cache"
ATTENTION_MODULE_RANGE = "sentinel::module.attention"
LINEAR_MODULE_RANGE = "sentinel::module.linear"
_PHASE_OF_RANGE = {PREFILL_RANGE: "prefill", DECODE_RANGE: "decode"}
_OUR_RANGES = frozenset(
    {
        PREFILL_RANGE,
        DECODE_RANGE,
        SAMPLING_RANGE,
        KV_CACHE_RANGE,
        ATTENTION_MODULE_RANGE,
        LINEAR_MODULE_RANGE,
    }
)

STRONG = 2
WEAK = 1

# Exact names (lower case) -> (category, strength).
_EXACT: dict[str, tuple[str, int]] = {
    SAMPLING_RANGE: ("sampling", STRONG),
    # k-NN retrieval (sentinel_kernels.knn): the search (FAISS or our exact device search,
    # whose matmul must not count as a linear layer) and the kNN-LM interpolation
    KNN_SEARCH_RANGE: ("knn", STRONG),
    KNN_INTERPOLATE_RANGE: ("knn", STRONG),
    "sentinel::knn_topk": ("knn", STRONG),
    KV_CACHE_RANGE: ("kv_cache", STRONG),
    ATTENTION_MODULE_RANGE: ("attention", STRONG),
    LINEAR_MODULE_RANGE: ("linear", STRONG),
    "sentinel::attention": ("attention", STRONG),
    "sentinel::decode_attention": ("attention", STRONG),
    "sentinel::kv_append": ("kv_cache", STRONG),
    "sentinel::int8_linear": ("linear", STRONG),
    "sentinel::int8_linear_a8": ("linear", STRONG),
    "sentinel::quantize_int8": ("linear", WEAK),
    "sentinel::dequantize_int8": ("linear", WEAK),
    "aten::linear": ("linear", STRONG),
    "aten::_int_mm": ("linear", STRONG),
    "aten::scaled_dot_product_attention": ("attention", STRONG),
    "aten::multinomial": ("sampling", STRONG),
    "aten::mm": ("linear", WEAK),
    "aten::addmm": ("linear", WEAK),
    "aten::matmul": ("linear", WEAK),
    "aten::bmm": ("linear", WEAK),
    "aten::baddbmm": ("linear", WEAK),
}

# Substrings (lower case), checked in order after the exact names: first match wins, so
# the KV-cache and attention kernels are tested before the generic GEMM names (a cutlass
# fmha kernel is attention, a cutlass gemm is linear).
_SUBSTRINGS: tuple[tuple[str, str, int], ...] = (
    ("kv_append", "kv_cache", STRONG),
    ("_knn_chunk_topk", "knn", STRONG),
    ("aten::_scaled_dot_product", "attention", STRONG),
    ("aten::_flash_attention", "attention", STRONG),
    ("aten::_efficient_attention", "attention", STRONG),
    ("_decode_split_kernel", "attention", STRONG),
    ("_decode_combine_kernel", "attention", STRONG),
    ("_head_tables_kernel", "attention", STRONG),
    ("flash", "attention", STRONG),
    ("fmha", "attention", STRONG),
    ("sdpa", "attention", STRONG),
    ("attention", "attention", STRONG),
    ("attn", "attention", STRONG),
    ("_w8a16", "linear", STRONG),
    ("_w8a8", "linear", STRONG),
    ("int8_linear", "linear", STRONG),
    ("_dequant_weight_kernel", "linear", STRONG),
    ("_quantize_rows", "linear", WEAK),
    ("gemm", "linear", WEAK),
    ("gemv", "linear", WEAK),
    ("nvjet", "linear", WEAK),
    ("cutlass", "linear", WEAK),
    ("splitkreduce", "linear", WEAK),
)


@functools.lru_cache(maxsize=4096)
def classify_name(name: str) -> tuple[str, int] | None:
    """Category and strength of one op, range or kernel name, or ``None`` (no opinion).

    Returns ``(category, STRONG)`` for names that settle the category whatever encloses
    them, ``(category, WEAK)`` for generic matmuls (linear unless an enclosing strong name
    says otherwise), ``None`` for everything else. Case-insensitive; the rules are listed
    in the module docstring.
    """
    low = name.strip().lower()
    hit = _EXACT.get(low)
    if hit is not None:
        return hit
    if low in (PREFILL_RANGE, DECODE_RANGE):
        return None
    for needle, category, strength in _SUBSTRINGS:
        if needle in low:
            return category, strength
    return None


def resolve_category(names_inner_to_outer: Sequence[str]) -> str:
    """The category of an event given the names on its path, innermost first.

    The innermost strong name wins; without one, the innermost weak name; without any,
    ``"other"``. For a kernel the path starts with the kernel's own name, followed by the
    op that launched it and that op's ancestors.
    """
    weak: str | None = None
    for name in names_inner_to_outer:
        hit = classify_name(name)
        if hit is None:
            continue
        category, strength = hit
        if strength == STRONG:
            return category
        if weak is None:
            weak = category
    return weak if weak is not None else "other"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class PhaseBreakdown:
    """Time of one phase at one level.

    Attributes:
        total_ms: the phase's time on the ``time_basis`` (device busy time of its kernels on
            CUDA, CPU wall time of its ranges on CPU); the categories add up to it.
        categories: ms per category (every entry of :data:`CATEGORIES`).
        wall_ms: CPU wall time of the phase's ranges under the profiler.
        steps: forwards in the phase (1 for prefill, the decode steps for decode).
        tokens: tokens processed (``batch * prompt`` for prefill, ``batch * steps`` for
            decode).
        top: per category, the names with the most time, ``[(name, ms), ...]`` (up to 5).
    """

    total_ms: float
    categories: dict[str, float]
    wall_ms: float
    steps: int
    tokens: int
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def percent(self, category: str) -> float:
        """Share of ``category`` in ``total_ms``, in percent (0 when the total is 0)."""
        return 100.0 * self.categories.get(category, 0.0) / self.total_ms if self.total_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (ms, percent per category, top names)."""
        return {
            "total_ms": self.total_ms,
            "wall_ms": self.wall_ms,
            "steps": self.steps,
            "tokens": self.tokens,
            "categories_ms": dict(self.categories),
            "categories_percent": {c: self.percent(c) for c in self.categories},
            "top": {c: [[n, ms] for n, ms in v] for c, v in self.top.items()},
        }


@dataclass
class ProfileResult:
    """One level's profile: see :func:`profile_model`.

    Attributes:
        level: the patch level (0 = unpatched baseline).
        patch: ``PatchReport.to_dict()`` of the patch.
        device, dtype: where and in what the model ran.
        batch, prompt_tokens, decode_tokens: the workload.
        cache: the KV cache used (``"dynamic"`` or a ``sk.kv_cache`` spec).
        time_basis: ``"device"`` (CUDA kernel time) or ``"cpu"`` (CPU self time).
        phases: ``{"prefill": PhaseBreakdown, "decode": PhaseBreakdown}``.
        prefill_tokens_per_s, decode_tokens_per_s: from the un-profiled timed run
            (``None`` when it was skipped).
        notes: remarks (e.g. a fallback of the time basis).
        profiler: the ``torch.profiler.profile`` object (for the Chrome trace); not
            serialised.
    """

    level: int
    patch: dict[str, Any]
    device: str
    dtype: str
    batch: int
    prompt_tokens: int
    decode_tokens: int
    cache: str
    time_basis: str
    phases: dict[str, PhaseBreakdown]
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    notes: list[str] = field(default_factory=list)
    profiler: Any = field(default=None, repr=False, compare=False)
    _trace_file: Path | None = field(default=None, init=False, repr=False, compare=False)

    def export_chrome_trace(self, path: str | Path) -> Path:
        """Write the Chrome trace of the profiled run to ``path``.

        ``torch.profiler`` can save a trace only once, so the first call saves it to a
        temporary file owned by this result (removed when the result is garbage collected)
        and every call copies that file to ``path``.

        Raises:
            RuntimeError: the result holds no profiler.
        """
        if self._trace_file is None:
            if self.profiler is None:
                raise RuntimeError("this ProfileResult holds no profiler to export")
            fd, tmp = tempfile.mkstemp(prefix="sentinel_trace_", suffix=".json")
            os.close(fd)
            self.profiler.export_chrome_trace(tmp)
            self._trace_file = Path(tmp)
            weakref.finalize(self, _remove_quietly, tmp)
        path = Path(path)
        shutil.copyfile(self._trace_file, path)
        return path

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of everything but the profiler object."""
        return {
            "level": self.level,
            "device": self.device,
            "dtype": self.dtype,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "cache": self.cache,
            "time_basis": self.time_basis,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "phases": {p: b.to_dict() for p, b in self.phases.items()},
            "patch": self.patch,
            "notes": list(self.notes),
        }


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


# --------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_attention_module(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _is_linear_module(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.Linear) or name == "Conv1D" or name.endswith("Linear")


@contextlib.contextmanager
def _module_ranges(model: nn.Module) -> Iterator[None]:
    """Wrap every attention and linear module's forward in a profiler range (see the
    module docstring), through forward hooks removed on exit."""
    handles: list[Any] = []

    def add(module: nn.Module, range_name: str) -> None:
        stack: list[Any] = []

        def pre(_mod: nn.Module, _args: Any) -> None:
            rf = record_function(range_name)
            rf.__enter__()
            stack.append(rf)

        def post(_mod: nn.Module, _args: Any, _out: Any) -> None:
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        # always_call: close the range even when the forward raises.
        handles.append(module.register_forward_hook(post, always_call=True))

    try:
        for module in model.modules():
            if _is_linear_module(module):
                add(module, LINEAR_MODULE_RANGE)
            elif _is_attention_module(module):
                add(module, ATTENTION_MODULE_RANGE)
        yield
    finally:
        for h in handles:
            h.remove()


def _instrument_cache(cache: Any) -> None:
    """Run ``cache.update`` inside the ``sentinel::kv_cache`` range (this instance only)."""
    update = cache.update

    @functools.wraps(update)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(KV_CACHE_RANGE):
            return update(*args, **kwargs)

    cache.update = wrapped


def _new_cache(model: nn.Module, spec: str | None, max_len: int, batch: int) -> Any:
    if spec:
        return kv_cache(model, spec, max_cache_len=max_len, batch_size=batch)
    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


@dataclass
class _RunTimes:
    prefill_s: float
    decode_s: float


class _Runner:
    """The prefill + greedy decode loop, shared by the warm-up, timed and profiled runs."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        steps: int,
        cache_spec: str | None,
        knn: KnnScorer | None = None,
    ) -> None:
        self.model = model
        self.knn = knn
        self.hidden: torch.Tensor | None = None
        if knn is not None:
            _, dtype = lm_head_input(model)
            self.hidden = torch.zeros(
                input_ids.shape[0], knn.store.query_dim, dtype=dtype, device=input_ids.device
            )
        self.input_ids = input_ids
        self.steps = steps
        self.cache_spec = cache_spec
        self.device = input_ids.device
        params = inspect.signature(model.forward).parameters
        # Prefill only needs the last position's logits (as generate() does).
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1, :]
        if self.knn is not None and self.hidden is not None:
            last = self.knn(last, self.hidden)  # its own ranges: the knn category
        with record_function(SAMPLING_RANGE):
            return last.argmax(dim=-1, keepdim=True)

    def run(self, steps: int, instrument: bool = False) -> _RunTimes:
        """Prefill, then ``steps`` decode steps; wall times with CUDA synchronised."""
        if self.hidden is None:
            return self._run(steps, instrument)
        with capture_lm_head_input(self.model, self.hidden):
            return self._run(steps, instrument)

    def _run(self, steps: int, instrument: bool) -> _RunTimes:
        batch, prompt = self.input_ids.shape
        cache = _new_cache(self.model, self.cache_spec, prompt + self.steps + 1, batch)
        if instrument:
            _instrument_cache(cache)
        _sync(self.device)
        t0 = time.perf_counter()
        with record_function(PREFILL_RANGE):
            kw = cache_kwargs(self.model, cache)
            out = self.model(input_ids=self.input_ids, use_cache=True, **kw, **self.extra)
            token = self._sample(out.logits)
        _sync(self.device)
        t1 = time.perf_counter()
        for _ in range(steps):
            with record_function(DECODE_RANGE):
                out = self.model(input_ids=token, use_cache=True, **kw)
                token = self._sample(out.logits)
        _sync(self.device)
        t2 = time.perf_counter()
        return _RunTimes(t1 - t0, t2 - t1)


# --------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------


@dataclass
class _Acc:
    # the optional categories (knn: only runs with a datastore have it) get an entry when
    # first seen; the breakdowns report every category (0 when absent)
    totals: dict[str, float] = field(
        default_factory=lambda: {c: 0.0 for c in CATEGORIES if c not in _OPTIONAL_CATEGORIES}
    )
    names: dict[str, dict[str, float]] = field(default_factory=dict)
    wall_us: float = 0.0
    steps: int = 0

    def add(self, category: str, name: str, us: float) -> None:
        if us <= 0:
            return
        self.totals[category] = self.totals.get(category, 0.0) + us
        per = self.names.setdefault(category, {})
        per[name] = per.get(name, 0.0) + us


def _walk(root: Any) -> Iterator[tuple[Any, tuple[str, ...]]]:
    """Every CPU event under ``root`` (itself included) with its path of names, innermost
    first (iterative: deep module nests must not hit the recursion limit)."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(root, (root.name,))]
    while stack:
        evt, path = stack.pop()
        yield evt, path
        for child in evt.cpu_children:
            stack.append((child, (child.name, *path)))


def _is_range_shadow(evt: Any, kernel_name: str) -> bool:
    # The GPU shadow of a record_function range is attached to it as a "kernel" of the same
    # name (gpu_user_annotation): it spans real kernels, counting it would double count.
    return kernel_name == evt.name and (
        getattr(evt, "is_user_annotation", False) or kernel_name in _OUR_RANGES
    )


def _analyse(prof: Any, device_basis: bool) -> tuple[dict[str, _Acc], bool]:
    """Group the profiled events by phase and category. Returns the per-phase
    accumulators and whether any device kernel was found (for the CUDA basis)."""
    accs = {p: _Acc() for p in PHASES}
    found_kernels = False
    events = prof.events()
    roots = [
        e
        for e in events
        if e.name in _PHASE_OF_RANGE
        and getattr(e, "device_type", None) is not None
        and str(e.device_type).endswith("CPU")
    ]
    for root in roots:
        # Phase ranges are not nested in each other; an outer phase range (if any) would
        # already contain this one, so only take the outermost ones.
        parent = root.cpu_parent
        nested = False
        while parent is not None:
            if parent.name in _PHASE_OF_RANGE:
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        acc = accs[_PHASE_OF_RANGE[root.name]]
        acc.wall_us += root.cpu_time_total
        acc.steps += 1
        for evt, path in _walk(root):
            if device_basis:
                for k in evt.kernels:
                    if _is_range_shadow(evt, k.name):
                        continue
                    found_kernels = True
                    acc.add(resolve_category((k.name, *path)), k.name, float(k.duration))
            else:
                acc.add(resolve_category(path), evt.name, float(evt.self_cpu_time_total))
    return accs, found_kernels


def _phase_breakdowns(accs: dict[str, _Acc], tokens: dict[str, int]) -> dict[str, PhaseBreakdown]:
    out: dict[str, PhaseBreakdown] = {}
    for phase, acc in accs.items():
        cats = {c: acc.totals.get(c, 0.0) / 1000.0 for c in CATEGORIES}
        top = {
            c: [
                (n, us / 1000.0)
                for n, us in sorted(acc.names.get(c, {}).items(), key=lambda kv: -kv[1])[:5]
            ]
            for c in CATEGORIES
        }
        total = sum(cats.values())
        out[phase] = PhaseBreakdown(
            total_ms=total,
            categories=cats,
            wall_ms=acc.wall_us / 1000.0,
            steps=acc.steps,
            tokens=tokens[phase],
            top=top,
        )
    return out


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _progress_step(progress: Any, text: str) -> None:
    if progress is not None:
        progress.set_postfix_str(text, refresh=True)
        progress.update(1)


#: Stages :func:`profile_model` reports to a progress bar (patch, warm-up, timed, profiled,
#: analysis).
STAGES_PER_LEVEL = 5


def profile_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    level: int,
    max_new_tokens: int,
    tokenizer: Any = None,
    calibration_text: str | None = None,
    patch_options: dict[str, Any] | None = None,
    warmup: bool = True,
    timed_run: bool = True,
    module_ranges: bool = True,
    progress: Any = None,
    knn: Any = None,
    knn_k: int = 32,
    knn_lambda: float = 0.25,
    knn_temperature: float = 1.0,
) -> ProfileResult:
    """Profile prefill + greedy decode of ``model`` patched at ``level``.

    Steps: ``sk.patch_model(model, level=level, **options)`` (level 0 is the unpatched
    baseline), a warm-up (prefill + 2 decode steps: Triton compilation, allocator), an
    un-profiled timed run (tokens/s), a run under ``torch.profiler.profile`` (CPU activity
    always, CUDA when ``input_ids`` is on CUDA), then ``sk.unpatch_model`` (also on error).
    Each run uses a fresh cache: ``sk.kv_cache(model, spec, ...)`` when the patch turned on
    ``kv_cache`` (``report.options["kv_cache"]``), else a ``transformers.DynamicCache``.
    The decode loop is ``out = model(input_ids=token, cache=cache,
    use_cache=True)`` then greedy ``argmax`` on the device, without host syncs.

    Args:
        model: a transformers causal LM, on the device it should run on.
        input_ids: ``[batch, prompt]`` int64 prompt on the model's device.
        level: patch level 0-3.
        max_new_tokens: decode steps (>= 1). The prefill also samples a token, so
            ``max_new_tokens + 1`` tokens are generated per row.
        tokenizer, calibration_text: passed to ``patch_model`` when the level needs them
            (level 3: SmoothQuant and head pruning); ignored by levels that do not.
        patch_options: extra ``patch_model`` options (override the level's).
        warmup, timed_run: switch off the warm-up / the timed run (``*_tokens_per_s`` are
            then ``None``).
        module_ranges: record the per-module ranges (needed to see the CPU int8 fast path
            and eager attention; see the module docstring).
        progress: a tqdm-like bar, advanced :data:`STAGES_PER_LEVEL` times.
        knn, knn_k, knn_lambda, knn_temperature: a :class:`sentinel_kernels.knn.Datastore`
            (on the model's device, built with this model: checked before patching) makes
            every token a kNN-LM choice (:class:`~sentinel_kernels.knn.lm.KnnScorer`, no
            result cache); its search and interpolation are the ``knn`` category.

    Returns:
        A :class:`ProfileResult`. Its ``profiler`` holds the profile for
        ``export_chrome_trace``.

    Raises:
        ValueError: bad arguments, or the level needs calibration input it did not get
            (``patch_model``'s message).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt >= 1], got {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    steps = int(max_new_tokens)
    device = input_ids.device
    options = dict(patch_options or {})
    if level >= 3 or options.get("int8_activations") or options.get("prune_ratio"):
        if calibration_text is not None:
            options.setdefault("calibration_text", calibration_text)
        if tokenizer is not None:
            options.setdefault("tokenizer", tokenizer)
    batch, prompt = (int(s) for s in input_ids.shape)
    scorer = None
    if knn is not None:
        scorer = KnnScorer(knn, knn_k, knn_lambda, knn_temperature)
        knn.check_model(model)
        if knn.device != device:
            raise ValueError(f"the datastore is on {knn.device}, the input on {device}")

    report = patch_model(model, level=level, **options)
    _progress_step(progress, f"level {level}: patched")
    try:
        cache_spec = report.options.get("kv_cache") or None
        runner = _Runner(model, input_ids, steps, cache_spec, knn=scorer)
        times: _RunTimes | None = None
        with torch.inference_mode():
            if warmup:
                runner.run(min(2, steps))
            _progress_step(progress, f"level {level}: warm-up done")
            if timed_run:
                times = runner.run(steps)
            _progress_step(progress, f"level {level}: timed run done")
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            ranges = _module_ranges(model) if module_ranges else contextlib.nullcontext()
            with ranges, torch.profiler.profile(activities=activities) as prof:
                runner.run(steps, instrument=True)
            _progress_step(progress, f"level {level}: profiled")
        device_basis = device.type == "cuda"
        accs, found = _analyse(prof, device_basis)
        notes: list[str] = []
        if device_basis and not found:
            notes.append(
                "no CUDA kernels were recorded (CUPTI unavailable?): CPU self times are "
                "reported instead"
            )
            device_basis = False
            accs, _ = _analyse(prof, device_basis=False)
        phases = _phase_breakdowns(accs, {"prefill": batch * prompt, "decode": batch * steps})
        _progress_step(progress, f"level {level}: analysed")
    finally:
        unpatch_model(model)

    return ProfileResult(
        level=level,
        patch=report.to_dict(),
        device=str(device),
        dtype=str(_model_dtype(model)).removeprefix("torch."),
        batch=batch,
        prompt_tokens=prompt,
        decode_tokens=steps,
        cache=str(cache_spec) if cache_spec else "dynamic",
        time_basis="device" if device_basis else "cpu",
        phases=phases,
        prefill_tokens_per_s=(batch * prompt / times.prefill_s) if times else None,
        decode_tokens_per_s=(batch * steps / times.decode_s) if times else None,
        notes=notes + list(report.notes),
        profiler=prof,
    )


def profile_levels(
    model: nn.Module,
    input_ids: torch.Tensor,
    levels: Sequence[int],
    *,
    max_new_tokens: int,
    on_level: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> list[ProfileResult]:
    """:func:`profile_model` for each level in ``levels`` (e.g. ``[0, 2]``: before and
    after), on the same model and input. ``kwargs`` are passed through; ``on_level`` is
    called with each level before it runs."""
    results = []
    for level in levels:
        if on_level is not None:
            on_level(level)
        results.append(
            profile_model(model, input_ids, level=level, max_new_tokens=max_new_tokens, **kwargs)
        )
    return results

"""The demo behind ``sentinel-kernels demo``: one model, patch levels 0-3, side by side.

For every level in turn the same model is patched (:func:`sentinel_kernels.patch_model`),
measured and unpatched again:

* **perplexity** of the evaluation part of a text (by default the bundled WikiText-2
  *validation* excerpt, ``data/excerpt.txt``): ``sk.eval.perplexity`` in windows of
  ``window`` tokens, one forward pass each. The text is split by lines: the first
  ``calibration_fraction`` (40%) of its lines are the *calibration* part, which only feeds
  the calibrated options of level 3 (gradient head pruning, SmoothQuant), and the rest is
  the *evaluation* part, scored at every level. Calibrating on the text that is scored would
  flatter level 3 (the design forbids it).
* **KV-cache perplexity** for levels with a KV-cache option (``report.options
  ["kv_cache"]``: a preallocated dense, INT8, INT4 or low-rank cache): the same windows fed
  ``chunk`` tokens at a time through that cache (``sk.eval.perplexity(..., chunk=32,
  cache=spec)``), so every chunk after the first reads the keys/values the earlier chunks
  wrote, compressed where the format compresses. The one-pass number above never touches
  the cache, so for compressed caches this is the honest one. Level 0 gets the same
  chunked evaluation over a dense cache as the baseline of that column.
* **tokens/s** at batch 1 (the demo prompt) and at batch ``batch_size`` (16 different
  prompts of different lengths, left-padded, with the attention mask): greedy, exactly
  ``max_new_tokens`` new tokens per row. Level 0 is the baseline, transformers'
  ``model.generate`` (``min_new_tokens = max_new_tokens`` forces the length); levels >= 1
  use the fast path ``sk.generate(..., eos_token_id=[])`` (never stops early). One warm-up
  call comes first (CUDA-graph capture and Triton autotuning happen there; on CUDA it is
  the identical call so that the timed one reuses the captured graph), and the timed call
  is bracketed by ``torch.cuda.synchronize``. tokens/s = rows x new tokens / wall time of
  the whole call, prefill included.
* **memory**: the model's weight bytes after patching (``report.weight_bytes_after``), the
  KV-cache bytes of the batch run (:func:`sentinel_kernels.cache.kv_cache_bytes`, dense
  at levels 0-1: transformers' own cache holds the same bytes at the end of the run) and,
  on CUDA, ``torch.cuda.max_memory_allocated`` over the timed batch run.
* **a sample**: greedy continuation of the demo prompt (batch 1, up to ``max_new_tokens``,
  stopping at EOS).

A stage that fails (a level that needs an input, an option not implemented) is recorded
with its reason and shown as ``n/a``; the demo goes on.

:func:`run_demo` does the measuring on any model/tokenizer pair (tests use a tiny random
model); :func:`format_report`, :func:`write_png` and :class:`DemoResult.to_dict` present it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import eval as sk_eval
from .. import settings
from ..cache import kv_cache_bytes, kv_cache_layout
from ..decoding import clear_sessions
from ..decoding import generate as sk_generate
from ..patching import LEVEL_OPTIONS, patch_model, unpatch_model

__all__ = [
    "BATCH_PROMPTS",
    "CALIBRATION_FRACTION",
    "DEMO_PROMPT",
    "EXCERPT",
    "DemoResult",
    "LevelResult",
    "format_report",
    "matplotlib_available",
    "run_demo",
    "split_text",
    "table_rows",
    "write_json",
    "write_png",
]

#: The WikiText-2 validation excerpt shipped with the package (see data/NOTICE.md).
EXCERPT = Path(__file__).resolve().parents[1] / "data" / "excerpt.txt"
#: Prompt of the batch-1 speed run and of the sample generation.
DEMO_PROMPT = "The European lobster is a species of"
#: Prompts of the batched speed run: different topics and lengths, so the batch is
#: left-padded as a real one would be.
BATCH_PROMPTS: tuple[str, ...] = (
    "The European lobster is a species of",
    "Once upon a time",
    "The capital of France is",
    "In mathematics, a prime number is a natural number greater than one that",
    "Photosynthesis converts light energy into",
    "The history of the Roman Empire began when",
    "A good recipe for bread needs flour, water, salt and",
    "Python is a programming language that",
    "The most important rule of chess is",
    "Water boils at a temperature of",
    "The first person to walk on the Moon was Neil Armstrong, who in July 1969",
    "To learn a new language quickly, you should",
    "The heart pumps blood through",
    "Volcanoes form where tectonic plates",
    "My favourite book is",
    "The museum opened a new exhibition about ancient Egypt, showing statues, jewellery and",
)
#: Share of the text's lines (from the start) used as calibration text.
CALIBRATION_FRACTION = 0.4

_STAGES = ("patch", "perplexity", "kv perplexity", "speed b1", "speed batch", "sample")


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    """What the demo measured at one patch level; ``None`` where it did not (see
    ``errors``: stage -> reason).

    Attributes:
        level: the patch level.
        ppl: one-pass windowed perplexity of the evaluation part.
        ppl_rel: ``ppl / level-0 ppl - 1``.
        kv_cache: the KV-cache format of the level (``"dense"`` for level 0's baseline run
            of the chunked evaluation, ``None`` when the level sets no cache).
        kv_ppl: chunked perplexity through that cache; ``kv_ppl_rel`` against level 0's
            chunked perplexity over a dense cache.
        tokens_per_s: ``{batch size: new tokens per second}``.
        speedup: ``{batch size: tokens_per_s / level 0's}``.
        generator: ``"model.generate"`` (level 0) or ``"sk.generate"``.
        weight_bytes: parameters + buffers after patching.
        kv_bytes: KV-cache bytes of the batched run.
        peak_bytes: CUDA peak allocated bytes over the timed batched run (None on CPU).
        budget: the report's accuracy budget (relative PPL increase); ``budget_level`` the
            level it belongs to; ``within_budget`` compares ``kv_ppl_rel`` when there is
            one, else ``ppl_rel``.
        sample: the greedy continuation of the demo prompt.
        seconds: wall time of the level.
        report: ``PatchReport.to_dict()``.
    """

    level: int
    ppl: float | None = None
    ppl_rel: float | None = None
    kv_cache: str | None = None
    kv_ppl: float | None = None
    kv_ppl_rel: float | None = None
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    generator: str | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None
    peak_bytes: int | None = None
    budget: float | None = None
    budget_level: int | None = None
    within_budget: bool | None = None
    sample: str | None = None
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Whether the level was patched (later stages may still have failed)."""
        return "patch" not in self.errors


@dataclass
class DemoResult:
    """All levels plus the settings they were measured with (``meta``)."""

    meta: dict[str, Any]
    levels: list[LevelResult]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (batch sizes become string keys)."""
        rows = []
        for r in self.levels:
            d = asdict(r)
            d["tokens_per_s"] = {str(k): v for k, v in r.tokens_per_s.items()}
            d["speedup"] = {str(k): v for k, v in r.speedup.items()}
            rows.append(d)
        return {"meta": dict(self.meta), "levels": rows}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def split_text(text: str, fraction: float = CALIBRATION_FRACTION) -> tuple[str, str]:
    """Split ``text`` by lines into ``(calibration, evaluation)``: the first
    ``round(fraction * lines)`` lines (at least one, at most all but one) and the rest.

    Raises:
        ValueError: fewer than two lines, or ``fraction`` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    lines = text.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(
            "the text needs at least two lines to split into calibration and evaluation parts"
        )
    k = min(max(1, round(fraction * len(lines))), len(lines) - 1)
    return "".join(lines[:k]), "".join(lines[k:])


def _ids_of(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def _pad_id(tokenizer: Any, model: Any) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _left_padded(
    tokenizer: Any, prompts: Sequence[str], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, S]`` int64, each prompt tokenized on its own and
    left-padded to the longest (what ``padding_side="left"`` does, also for tokenizers
    without padding support)."""
    rows = [_ids_of(tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {prompts[i]!r} tokenizes to nothing")
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _needs_calibration(level: int) -> bool:
    """Whether the level turns on an option that reads ``calibration_text``."""
    opts = LEVEL_OPTIONS.get(level, {})
    kv = opts.get("kv_cache")
    return bool(
        opts.get("int8_activations")
        or opts.get("prune_ratio")
        or (isinstance(kv, str) and kv.startswith("lowrank:"))
    )


class _Progress:
    """One bar over all (level, stage) steps: tqdm when installed, else a printed line per
    step (stderr). ``write`` prints a message without breaking the bar."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.bar = None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="demo", unit="step", file=sys.stderr)

    def start(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _split_threads(native_threads: int | None) -> Iterator[None]:
    """With ``native_threads``: torch on one thread and the sentinel C++ kernels on
    ``native_threads`` (``SENTINEL_NUM_THREADS``) inside the block, both restored after.

    Why: torch's OpenMP workers spin on the cores for a while after each parallel region,
    so when torch ops (level 1's float matmuls) and the C++ kernels' own threads alternate
    on a small CPU they wait for each other (see ``sentinel_kernels._backend.
    native_threads``)."""
    if native_threads is None:
        yield
        return
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with settings.override(settings.NUM_THREADS_ENV, str(native_threads)):
            yield
    finally:
        torch.set_num_threads(torch_threads)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def _generate(
    model: Any,
    level: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    pad_id: int,
    *,
    forced: bool,
) -> torch.Tensor:
    """Greedy generation: level 0 through transformers, the rest through ``sk.generate``.
    ``forced``: exactly ``n`` new tokens (EOS does not stop), else stop at EOS."""
    if level == 0:
        kwargs: dict[str, Any] = {"min_new_tokens": n} if forced else {}
        with torch.inference_mode():
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
                **kwargs,
            )
    return sk_generate(
        model, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[] if forced else None
    )


def _time_generation(
    generate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    device: torch.device,
    warmup_tokens: int,
    repeats: int = 1,
    on_timed: Callable[[], None] | None = None,
) -> float:
    """New tokens per second of ``generate(ids, mask, n)`` (a greedy generation of exactly
    ``n`` tokens per row), after one warm-up call of ``warmup_tokens``: rows x ``n`` / wall
    time of the whole call (prefill and every decode step), CUDA synchronised on both
    sides; the fastest of ``repeats`` timed calls (best-of-N, as ``timeit`` does: on a
    shared machine the slower runs measure the neighbours)."""
    generate(ids, mask, warmup_tokens)
    _sync(device)
    if on_timed is not None:
        on_timed()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(ids, mask, n)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        new = out.shape[1] - ids.shape[1]
        if new != n:
            raise RuntimeError(f"generation returned {new} new tokens per row, asked for {n}")
    return ids.shape[0] * n / best


def _decode_sample(tokenizer: Any, tokens: torch.Tensor, eos: list[int]) -> str:
    row = tokens.reshape(-1).tolist()
    for i, t in enumerate(row):
        if t in eos:
            row = row[:i]
            break
    try:
        return str(tokenizer.decode(row, skip_special_tokens=True))
    except TypeError:  # minimal tokenizers without the keyword
        return str(tokenizer.decode(row))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run_demo(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    levels: Sequence[int] = (0, 1, 2, 3),
    text: str | None = None,
    text_name: str | None = None,
    calibration_fraction: float = CALIBRATION_FRACTION,
    window: int = 512,
    max_windows: int | None = None,
    chunk: int = 32,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    prompt: str = DEMO_PROMPT,
    prompts: Sequence[str] = BATCH_PROMPTS,
    warmup_tokens: int | None = None,
    repeats: int = 1,
    split_threads: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> DemoResult:
    """Measure ``model`` at each patch level in ``levels`` (see the module docstring).

    The model is patched in place and unpatched after every level (also after a failure),
    so it comes back as it went in. Level 0's numbers are the baseline of every "vs level
    0" ratio; without level 0 in ``levels`` those ratios are ``None``.

    Args:
        model: a transformers causal LM (SmolLM2 for the real demo, ``sk.models.tiny`` in
            tests), on the device to measure.
        tokenizer: its tokenizer; needs ``tokenizer(text)["input_ids"]`` and ``decode``.
        levels: patch levels, measured in this order.
        text: the text to split and score (default: the bundled excerpt).
        text_name: how to name the text in the output (default: the excerpt's file name).
        calibration_fraction: share of the text's lines used as calibration text (level 3).
        window, max_windows: perplexity windows (tokens per window; ``None``: all windows).
        chunk: tokens per forward pass of the KV-cache perplexity.
        max_new_tokens: new tokens per row of the speed runs and the sample.
        batch_size: rows of the batched speed run (prompts cycle through ``prompts``).
        prompt: prompt of the batch-1 run and of the sample.
        prompts: prompts of the batched run.
        warmup_tokens: new tokens of the warm-up call; default ``max_new_tokens`` on CUDA
            (the timed call then reuses the captured decode graph) and 4 on the CPU.
        repeats: timed calls per speed run; the fastest counts.
        split_threads: CPU only: levels >= 1 generate with torch on one thread and the
            sentinel C++ kernels on this many (``SENTINEL_NUM_THREADS``), the setting the
            measurements doc recommends for CPU decoding; level 0 keeps torch's own setting (its
            best). ``None``: every level runs with the process's settings.
        progress: progress bars (tqdm when installed) on stderr.
        model_name: shown in the report.

    Returns:
        A :class:`DemoResult`.
    """
    if text is None:
        text = EXCERPT.read_text(encoding="utf-8")
        text_name = text_name or EXCERPT.name
    calibration, evaluation = split_text(text, calibration_fraction)
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if warmup_tokens is None:
        warmup_tokens = max_new_tokens if device.type == "cuda" else min(4, max_new_tokens)
    pad_id = _pad_id(tokenizer, model)
    eos = _eos_ids(tokenizer, model)
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch_size)]
    ids1, mask1 = _left_padded(tokenizer, [prompt], pad_id, device)
    idsb, maskb = _left_padded(tokenizer, batch_prompts, pad_id, device)
    levels = list(levels)
    want_kv_baseline = 0 in levels and any(
        _level_kv(level) is not None for level in levels if level != 0
    )

    meta: dict[str, Any] = {
        "model": model_name or type(model).__name__,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU {platform.machine()}"
        ),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "levels": levels,
        "text": text_name or "<text>",
        "text_lines": len(text.splitlines()),
        "calibration_lines": len(calibration.splitlines()),
        "calibration_tokens": len(_ids_of(tokenizer, calibration)),
        "evaluation_tokens": len(_ids_of(tokenizer, evaluation)),
        "window": window,
        "max_windows": max_windows,
        "chunk": chunk,
        "max_new_tokens": max_new_tokens,
        "warmup_tokens": warmup_tokens,
        "repeats": repeats,
        "split_threads": split_threads if device.type == "cpu" else None,
        "batch_size": batch_size,
        "batch_prompt_tokens": [int(n) for n in maskb.sum(dim=1).tolist()],
        "prompt": prompt,
        # The layout sk.kv_cache picks for the batch run's cache (it depends on the length:
        # a short int4 cache keeps keys per token and a smaller full-precision ring).
        "kv_slots": int(idsb.shape[1]) + max_new_tokens,
        "kv_layouts": _kv_layouts(
            kv_cache_layout,
            model,
            levels,
            int(idsb.shape[1]) + max_new_tokens,
            int(idsb.shape[0]),
            dtype,
        ),
    }

    results: list[LevelResult] = []
    bar = _Progress(len(levels) * len(_STAGES), progress)
    try:
        for level in levels:
            r = LevelResult(level=level)
            results.append(r)
            start = time.perf_counter()
            with _level_patched(
                model, level, tokenizer, calibration, r, bar, patch_model, unpatch_model
            ) as report:
                if report is not None:
                    _measure_level(
                        model,
                        tokenizer,
                        r,
                        report,
                        bar,
                        sk_eval=sk_eval,
                        kv_cache_bytes=kv_cache_bytes,
                        evaluation=evaluation,
                        window=window,
                        max_windows=max_windows,
                        chunk=chunk,
                        kv_baseline=want_kv_baseline and level == 0,
                        progress=progress,
                        ids1=ids1,
                        mask1=mask1,
                        idsb=idsb,
                        maskb=maskb,
                        max_new_tokens=max_new_tokens,
                        warmup_tokens=warmup_tokens,
                        repeats=repeats,
                        pad_id=pad_id,
                        eos=eos,
                        device=device,
                        split_threads=split_threads,
                    )
                else:
                    for _ in _STAGES[1:]:
                        bar.advance()
            r.seconds = time.perf_counter() - start
            for stage, why in r.errors.items():
                bar.write(f"level {level}: {stage} n/a ({why})")
    finally:
        bar.close()
    # after the loop, so that levels listed before 0 are compared too
    base = next((r for r in results if r.level == 0 and r.ok), None)
    for r in results:
        _relate(r, base)
    return DemoResult(meta=meta, levels=results)


def _kv_layouts(
    kv_cache_layout: Any,
    model: torch.nn.Module,
    levels: Sequence[int],
    slots: int,
    batch: int,
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """``{spec: layout in words}`` of the compressed caches the levels use, as
    :func:`sentinel_kernels.kv_cache` builds them for ``batch`` rows of ``slots`` tokens."""
    out: dict[str, str] = {}
    for level in levels:
        spec = _level_kv(level)
        if spec is None or spec == "dense" or spec in out:
            continue
        try:
            out[spec] = kv_cache_layout(model, spec, slots, batch, dtype=dtype)
        except (NotImplementedError, TypeError, ValueError, AttributeError) as exc:
            out[spec] = f"n/a ({_short(exc)})"
    return out


def _level_kv(level: int) -> str | None:
    kv = LEVEL_OPTIONS.get(level, {}).get("kv_cache")
    return str(kv) if kv else None


@contextmanager
def _level_patched(
    model: Any,
    level: int,
    tokenizer: Any,
    calibration: str,
    r: LevelResult,
    bar: _Progress,
    patch_model: Any,
    unpatch_model: Any,
) -> Iterator[Any]:
    """Patch for the level (yield the report, or None when patching failed) and always
    unpatch and drop ``sk.generate``'s cached sessions (caches, CUDA graphs) afterwards."""
    bar.start(f"level {level}: patch")
    extra: dict[str, Any] = {}
    if _needs_calibration(level):
        extra = {"calibration_text": calibration, "tokenizer": tokenizer}
    report = None
    try:
        report = patch_model(model, level=level, **extra)
    except NotImplementedError as exc:
        r.errors["patch"] = f"not implemented: {_short(exc)}"
    except Exception as exc:  # a level that needs more input, or a broken option
        r.errors["patch"] = _short(exc)
    bar.advance()
    try:
        yield report
    finally:
        if report is not None:
            unpatch_model(model)
        clear_sessions(model)
        if _model_device(model).type == "cuda":
            torch.cuda.empty_cache()


def _measure_level(
    model: Any,
    tokenizer: Any,
    r: LevelResult,
    report: Any,
    bar: _Progress,
    *,
    sk_eval: Any,
    kv_cache_bytes: Any,
    evaluation: str,
    window: int,
    max_windows: int | None,
    chunk: int,
    kv_baseline: bool,
    progress: bool,
    ids1: torch.Tensor,
    mask1: torch.Tensor,
    idsb: torch.Tensor,
    maskb: torch.Tensor,
    max_new_tokens: int,
    warmup_tokens: int,
    repeats: int,
    pad_id: int,
    eos: list[int],
    device: torch.device,
    split_threads: int | None,
) -> None:
    """Run the stages after patching (perplexity, KV perplexity, speed at batch 1 and at
    the batch size, sample) into ``r``, each one guarded: a failure becomes ``r.errors
    [stage]`` and the next stage runs."""
    level = r.level
    r.report = report.to_dict()
    r.weight_bytes = int(report.weight_bytes_after)
    r.budget = float(report.accuracy_budget)
    r.budget_level = int(report.budget_level)
    spec = report.options.get("kv_cache") or None
    r.kv_cache = str(spec) if spec else ("dense" if kv_baseline else None)
    r.generator = "model.generate" if level == 0 else "sk.generate"

    def stage(name: str, fn: Callable[[], None]) -> None:
        bar.start(f"level {level}: {name}")
        try:
            fn()
        except Exception as exc:  # shown as n/a with the reason; the demo goes on
            r.errors[name] = _short(exc)
        bar.advance()

    def perplexity(**through_cache: Any) -> float:
        return sk_eval.perplexity(
            model,
            tokenizer,
            evaluation,
            window=window,
            max_windows=max_windows,
            progress=progress,
            **through_cache,
        )

    def ppl() -> None:
        r.ppl = perplexity()

    def kv_ppl() -> None:
        if r.kv_cache is not None:
            r.kv_ppl = perplexity(chunk=chunk, cache=r.kv_cache)

    def forced(ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        # exactly n new tokens (EOS does not stop): what the timings divide by
        return _generate(model, level, ids, mask, n, pad_id, forced=True)

    def speed1() -> None:
        r.tokens_per_s[1] = _time_generation(
            forced, ids1, mask1, max_new_tokens, device, warmup_tokens, repeats
        )

    def speedb() -> None:
        b = idsb.shape[0]
        r.kv_bytes = int(
            kv_cache_bytes(
                model,
                str(spec) if spec else "dense",
                max_cache_len=idsb.shape[1] + max_new_tokens,
                batch_size=b,
            )
        )

        def reset_peak() -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        r.tokens_per_s[b] = _time_generation(
            forced, idsb, maskb, max_new_tokens, device, warmup_tokens, repeats, reset_peak
        )
        if device.type == "cuda":
            r.peak_bytes = int(torch.cuda.max_memory_allocated(device))

    def sample() -> None:
        out = _generate(model, level, ids1, mask1, max_new_tokens, pad_id, forced=False)
        r.sample = _decode_sample(tokenizer, out[0, ids1.shape[1] :], eos)

    stage("perplexity", ppl)
    stage("kv perplexity", kv_ppl)
    split = split_threads if device.type == "cpu" and level != 0 else None
    with _split_threads(split):
        stage("speed b1", speed1)
        stage("speed batch", speedb)
        stage("sample", sample)


def _relate(r: LevelResult, base: LevelResult | None) -> None:
    """Fill the "vs level 0" fields and the budget verdict."""
    if base is not None:
        if r.ppl is not None and base.ppl:
            r.ppl_rel = r.ppl / base.ppl - 1.0
        if r.kv_ppl is not None and base.kv_ppl:
            r.kv_ppl_rel = r.kv_ppl / base.kv_ppl - 1.0
        for b, tps in r.tokens_per_s.items():
            if base.tokens_per_s.get(b):
                r.speedup[b] = tps / base.tokens_per_s[b]
    rel = r.kv_ppl_rel if r.kv_ppl_rel is not None else r.ppl_rel
    if rel is not None and r.budget is not None:
        # 1e-9: level 0 against itself, and rounding of a bit-identical run
        r.within_budget = rel <= r.budget + 1e-9


# --------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------


def _fmt_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(f"{str(c):<{w}}" if i == len(widths) - 1 else f"{str(c):>{w}}")
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _with_rel(
    value: float | None, rel: float | None, fmt: str, rel_fmt: str, suffix: str = ""
) -> str:
    if value is None:
        return "n/a"
    text = format(value, fmt)
    if rel is None:
        return text
    shown = format(rel, rel_fmt)
    if shown.startswith("-") and float(shown.rstrip("%x")) == 0.0:
        shown = "+" + shown[1:]  # a rounding-level decrease reads as "-0.00%"; it is none
    return f"{text} ({shown}{suffix})"


def table_rows(result: DemoResult) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows (strings), as printed by :func:`format_report`."""
    batch = result.meta["batch_size"]
    cuda = result.meta["device"].startswith("cuda")
    header = [
        "level",
        "ppl (vs L0)",
        "KV ppl (vs L0)",
        "cache",
        "tok/s b1 (vs L0)",
        f"tok/s b{batch} (vs L0)",
        "weights MiB",
        f"KV MiB b{batch}",
    ]
    if cuda:
        header.append("peak MiB")
    header += ["budget", "note"]
    rows = []
    for r in result.levels:
        if not r.ok:
            cells = [str(r.level), "n/a", "n/a", "", "n/a", "n/a", "n/a", "n/a"]
            cells += ["n/a"] if cuda else []
            cells += ["", _note(r.errors["patch"])]
            rows.append(cells)
            continue
        pct = "+.2%"
        kv = "" if r.kv_cache is None else _with_rel(r.kv_ppl, r.kv_ppl_rel, ".3f", pct)
        cells = [
            str(r.level),
            _with_rel(r.ppl, r.ppl_rel, ".3f", pct),
            kv,
            r.kv_cache or "",
            _with_rel(r.tokens_per_s.get(1), r.speedup.get(1), ".1f", ".2f", "x"),
            _with_rel(r.tokens_per_s.get(batch), r.speedup.get(batch), ".1f", ".2f", "x"),
            _mib(r.weight_bytes),
            _mib(r.kv_bytes),
        ]
        if cuda:
            cells.append(_mib(r.peak_bytes))
        budget = "" if r.budget is None else f"<= {r.budget:.1%}"
        if r.budget_level == 3:
            budget += " target"
        if r.within_budget is not None:
            budget += " ok" if r.within_budget else " OVER"
        cells.append(budget)
        cells.append(_note("; ".join(f"{k} n/a" for k in r.errors)))
        rows.append(cells)
    return header, rows


def _note(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(result: DemoResult) -> str:
    """The demo's printed output: settings, the table, footnotes, failures, samples."""
    m = result.meta
    batch = m["batch_size"]
    windows = "all windows" if m["max_windows"] is None else f"first {m['max_windows']} windows"
    header, rows = table_rows(result)
    used_kv = {r.kv_cache for r in result.levels if r.ok}
    lines = [
        f"model {m['model']}, device {m['device']} ({m['device_name']}), dtype {m['dtype']}, "
        f"torch {m['torch']}, {m['torch_threads']} torch thread(s)",
        f"text: {m['text']}, split by lines: calibration = first {m['calibration_lines']} of "
        f"{m['text_lines']} lines ({m['calibration_tokens']} tokens; used only by levels "
        f"that calibrate, i.e. level 3's head pruning and SmoothQuant), evaluation = the "
        f"rest ({m['evaluation_tokens']} tokens; every perplexity below)",
        f"ppl: one forward pass per window of {m['window']} tokens ({windows}). KV ppl: the "
        f"same windows fed {m['chunk']} tokens at a time through the level's KV cache "
        f"(level 0: dense), so attention reads the compressed cache; for levels with a "
        f"compressed cache it is the honest number, and the budget is checked on it.",
        f"tok/s: greedy, {m['max_new_tokens']} new tokens per row, new tokens (rows x "
        f"{m['max_new_tokens']}) / wall time of the whole call, prefill included, after one "
        f"warm-up call ({m['warmup_tokens']} tokens)"
        + (f", best of {m['repeats']} calls" if m["repeats"] > 1 else "")
        + f". Level 0: transformers model.generate "
        f"(the baseline); levels >= 1: sk.generate. b1: the demo prompt; b{batch}: "
        f"{batch} prompts of {min(m['batch_prompt_tokens'])}-{max(m['batch_prompt_tokens'])} "
        f"tokens, left-padded."
        + (
            f" Threads: level 0 torch's {m['torch_threads']}; levels >= 1 torch 1 and the "
            f"sentinel C++ kernels {m['split_threads']} (SENTINEL_NUM_THREADS)."
            if m.get("split_threads")
            else ""
        ),
        f"memory: weights = parameters + buffers after patching; KV = cache bytes of the "
        f"b{batch} run (prompt + new tokens)"
        + (
            f"; peak = torch.cuda.max_memory_allocated over the timed b{batch} run."
            if m["device"].startswith("cuda")
            else "."
        )
        + "".join(
            f" KV layout of the b{batch} run's {spec} cache ({m.get('kv_slots')} slots): {layout}."
            for spec, layout in (m.get("kv_layouts") or {}).items()
            if spec in used_kv
        ),
        "",
        _fmt_table(header, rows),
    ]
    failures = [(r.level, k, v) for r in result.levels for k, v in r.errors.items()]
    if failures:
        lines += ["", "n/a reasons:"]
        lines += [f"  level {lv} {stage}: {why}" for lv, stage, why in failures]
    samples = [r for r in result.levels if r.sample is not None]
    if samples:
        lines += [
            "",
            f"samples (greedy, batch 1, up to {m['max_new_tokens']} new tokens, "
            f"stop at EOS); prompt: {m['prompt']!r}",
        ]
        lines += [f"  level {r.level}: {r.sample!r}" for r in samples]
    return "\n".join(lines)


def write_json(result: DemoResult, path: str | Path) -> Path:
    """Write :meth:`DemoResult.to_dict` as indented JSON (NaN/inf become ``null``)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.write_text(json.dumps(clean(result.to_dict()), indent=2) + "\n", encoding="utf-8")
    return path


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the PNG is skipped without it)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_png(result: DemoResult, path: str | Path) -> Path:
    """Bar charts of tokens/s (batch 1 and the batch run) and perplexity (one-pass and
    through the KV cache) per level, saved as a PNG.

    Uses matplotlib's object API (``matplotlib.figure.Figure``, the Agg canvas), not
    ``pyplot``, so it works without a display and leaves the global backend alone.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (check
            :func:`matplotlib_available` first).
    """
    from matplotlib.figure import Figure

    m = result.meta
    batch = m["batch_size"]
    rows = [r for r in result.levels if r.ok]
    labels = [f"L{r.level}" for r in rows]
    x = list(range(len(rows)))
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)

    def bars(
        ax: Any, values: list[float | None], offset: float, width: float, label: str, fmt: str
    ) -> None:
        xs = [i + offset for i, v in zip(x, values, strict=True) if v is not None]
        vs = [v for v in values if v is not None]
        if not vs:
            return
        cont = ax.bar(xs, vs, width=width, label=label)
        ax.bar_label(cont, labels=[format(v, fmt) for v in vs], fontsize=8)

    for ax, b in ((axes[0], 1), (axes[1], batch)):
        bars(ax, [r.tokens_per_s.get(b) for r in rows], 0.0, 0.6, f"batch {b}", ".1f")
        ax.set_title(f"tokens/s, batch {b} (higher is better)")
        ax.set_ylabel("new tokens / s")
    ax = axes[2]
    bars(ax, [r.ppl for r in rows], -0.2, 0.4, "one pass", ".2f")
    bars(ax, [r.kv_ppl for r in rows], 0.2, 0.4, "through the KV cache", ".2f")
    values = [v for r in rows for v in (r.ppl, r.kv_ppl) if v is not None]
    title = "perplexity (lower is better)"
    if values:
        # Level differences are a few percent at most: start the axis near the smallest
        # bar so they are visible, and say so in the title.
        bottom = 0.9 * min(values)
        ax.set_ylim(bottom=bottom, top=max(values) + 0.3 * (max(values) - bottom) + 1e-9)
        title += f"; axis from {bottom:.3g}"
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set_title(title)
    for ax in axes:
        ax.set_xticks(x, labels)
    for ax in axes[:2]:
        ax.margins(y=0.15)
    fig.suptitle(
        f"sentinel-kernels demo: {m['model']} on {m['device_name']} ({m['dtype']}), "
        f"{m['max_new_tokens']} new tokens, greedy",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path

"""``patch_model`` / ``unpatch_model``: swap a model's modules for the sentinel ones, per level.

A *level* (0-3, see the design's table) is a set of option defaults; options passed to
:func:`patch_model` override them. What each option does is registered by its
implementation in :mod:`sentinel_kernels.nn.registry`; this module walks the model, applies
the registered replacements and transforms, remembers what it replaced, and reports.

| level | options it turns on | accuracy budget (wikitext-2 PPL, relative) |
|---|---|---|
| 0 | nothing | 0 |
| 1 | ``attention="sentinel"``, ``fused_layers``, ``kv_cache="dense"``, ``sk.generate`` | <= 0.1% |
| 2 | + ``int8_weights``, ``kv_cache="int8"`` | <= 1% |
| 3 | + ``int8_activations``, ``prune_ratio``, ``kv_cache="int4"`` | reported; <= 5% target |

The :class:`PatchReport` prints as a table: options, the accuracy budget, weight bytes
before/after, the KV-cache bytes per token of context (the patched kind against a dense
cache in the model dtype), and the replaced modules grouped by option and type with counts
(``report.format(verbose=True)`` lists each).

Architectures: levels 1-3 are tested on Llama, Mistral, Qwen2, Qwen3 and GPT-2
(:data:`TESTED_MODEL_TYPES`). The options that act through the sentinel attention raise
``NotImplementedError`` up front, naming the architecture and the option, on models it
cannot serve (attention layers outside transformers' ``AttentionInterface``: Falcon, BLOOM,
GPT-J, MPT, CodeGen ...; soft-capped attention: Gemma 2). Other architectures are patched
where the options apply, with a warning; int8 options that leave matmul weights in float
(no replacement for the module type, e.g. GPT-2's ``Conv1D``) warn and say so in the report.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import (
    prune,  # noqa: F401  (registers the head_mask / prune_ratio options)
    settings,
)
from .nn import registry

__all__ = [
    "ACCURACY_BUDGET",
    "ATTENTION_OPTIONS",
    "LEVEL_OPTIONS",
    "LEVEL_ENV",
    "TESTED_MODEL_TYPES",
    "PatchReport",
    "ReplacedModule",
    "is_patched",
    "kv_bytes_per_token",
    "patch_model",
    "resolve_level",
    "unpatch_model",
    "weight_bytes",
]

#: Environment variable giving the level when ``patch_model(level=None)``.
LEVEL_ENV = settings.LEVEL_ENV

#: Options each level turns on (explicit options override them). Level 3's
#: ``prune_ratio`` is small on purpose: on SmolLM2 (270 heads), measured with the whole
#: level (W8A8 + INT4 KV + pruning; scripts/level_ppl.py, H200 bf16, 40 x 1024 wikitext-2
#: test tokens, chunked through the INT4 cache for 10 windows; bench/results/
#: 2026-11-24_nvidia-h200_level3_prune_ppl.json and *_level_ppl.json): prune_ratio 0 gives
#: +1.3% (+2.8% chunked), 0.02 gives +2.5% (+3.6%), 0.05 gives +6.3% (+7.0%), over the
#: level's 5% target. 0.02 prunes 5 of SmolLM2's heads.
LEVEL_OPTIONS: dict[int, dict[str, Any]] = {
    0: {},
    1: {"attention": "sentinel", "fused_layers": True, "kv_cache": "dense"},
    2: {"attention": "sentinel", "fused_layers": True, "int8_weights": True, "kv_cache": "int8"},
    3: {
        "attention": "sentinel",
        "fused_layers": True,
        "int8_weights": True,
        "int8_activations": True,
        "kv_cache": "int4",
        "prune_ratio": 0.02,
    },
}

#: Allowed relative increase of wikitext-2 perplexity per level (level 3: target, reported).
ACCURACY_BUDGET: dict[int, float] = {0: 0.0, 1: 0.001, 2: 0.01, 3: 0.05}

#: ``config.model_type`` of the architectures levels 1-3 are tested on (tests/test_patch.py
#: patches tiny random models of each and compares logits / runs generate). Patching any
#: other transformers model works where the options apply (unsupported attention raises),
#: with a warning that the architecture is untested.
TESTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

#: Options that act through the sentinel attention function (``kv_cache`` reads the
#: compressed cache in it; head masks are applied by it).
ATTENTION_OPTIONS: tuple[str, ...] = ("attention", "kv_cache", "head_mask", "prune_ratio")


_STATE_ATTR = "_sentinel_patch_state"
_KV_RE = re.compile(r"^(dense|int8|int4|lowrank:([1-9][0-9]*))$")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplacedModule:
    """One module swap: qualified name, old and new class (``module.QualName``), option."""

    name: str
    old_type: str
    new_type: str
    option: str


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _summarise(value: Any) -> Any:
    """A short, JSON-friendly rendering of an option value."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= 60 else f"<text, {len(value)} chars>"
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    text = repr(value)
    return text if len(text) <= 60 else f"<{type(value).__name__}>"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


_INDEX_RE = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _name_patterns(names: Iterable[str]) -> list[str]:
    """Compress module names for the grouped table: layer indices become ``*`` and
    siblings share a brace, e.g. ``["model.layers.*.self_attn.{q_proj,k_proj}", "lm_head"]``."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = _INDEX_RE.sub("*", name).rpartition(".")
        leaves = by_parent.setdefault(parent, [])
        if leaf not in leaves:
            leaves.append(leaf)
    parts = []
    for parent, leaves in by_parent.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
        parts.append(f"{parent}.{leaf}" if parent else leaf)
    return parts


#: Name patterns shown per group before "... (n more)" (``format(verbose=True)``: all).
_MAX_PATTERNS = 6


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Plain-text table lines: columns padded to their widest cell, ``right`` columns
    right-aligned, the last column left unpadded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            elif i in right:
                out.append(f"{cell:>{widths[i]}}")
            else:
                out.append(f"{cell:<{widths[i]}}")
        return "  ".join(out).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


@dataclass
class PatchReport:
    """What :func:`patch_model` did.

    Attributes:
        level: the patch level (0-3).
        options: the resolved options (level defaults merged with the explicit ones; every
            known option, ``None`` when off).
        replaced: the module swaps, in model order.
        transforms: labels of the model transforms applied.
        weight_bytes_before / weight_bytes_after: bytes of parameters + buffers before and
            after (each tensor counted once, tied/shared ones too; see :func:`weight_bytes`).
        accuracy_budget: allowed relative wikitext-2 PPL increase: the budget of the highest
            level among ``level`` and the levels that introduce the enabled options (so
            ``level=0, int8_weights=True`` has the level-2 budget, 1%).
        budget_level: the level whose budget that is.
        notes: remarks, e.g. an enabled option that matched no module of this model, an
            untested architecture, or weights no int8 replacement covers.
        architecture: the model's class name (``LlamaForCausalLM``).
        model_type: its ``config.model_type`` (``"llama"``), ``None`` for a plain module.
        kv_cache: the KV-cache kind ``model.generate`` uses after the patch: the
            ``kv_cache`` option (``"int8"``, ``"int4"``, ``"lowrank:r"``) or ``"dense"``.
        kv_bytes_per_token: bytes that KV cache adds per token of context, batch 1, all
            layers, K and V, codes plus scales (:func:`kv_bytes_per_token`), in its
            long-context layout (caches of at least ``kv_long_from`` tokens); ``None`` when
            the model's KV geometry cannot be read from its config.
        kv_dense_bytes_per_token: the same for a dense cache in the model's dtype (the
            baseline).
        kv_fixed_bytes: bytes of that cache that do not grow with the context, in the same
            layout (int4's full-precision ring of recent tokens, length counters).
        kv_dtype: the model dtype the dense baseline stores (``"bfloat16"``).
        kv_long_from: the cache length (``max_cache_len``) from which
            :func:`sentinel_kernels.kv_cache` uses ``kv_layout`` (and the two sizes above
            hold: ``kv_fixed_bytes + L * kv_bytes_per_token`` for ``L`` a whole number of
            key blocks); shorter caches use ``kv_short_layout``, which is never larger than
            a dense cache (:func:`sentinel_kernels.kv_cache.kv_cache_switch_len`; int4:
            where KIVI keys start, the same at every batch size). 1 when the layout does
            not depend on the length.
        kv_layout: that long-context layout in words, brief (``"KIVI keys over 64-token
            blocks + 128-slot float32 ring"``).
        kv_short_layout: the layout of a cache one token shorter than ``kv_long_from``
            (``"per-token int4 keys + 32-slot float32 ring"``; still shorter ones keep a
            smaller ring where 32 slots would exceed the dense bytes); ``None`` when
            ``kv_long_from`` is 1.
        kv_shared_bytes: bytes the cache reads but shares with every cache of the model on
            a device, not counted above: low-rank bases (fp32); 0 otherwise.
    """

    level: int
    options: dict[str, Any]
    replaced: list[ReplacedModule] = field(default_factory=list)
    transforms: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    accuracy_budget: float = 0.0
    budget_level: int = 0
    notes: list[str] = field(default_factory=list)
    architecture: str = ""
    model_type: str | None = None
    kv_cache: str = "dense"
    kv_bytes_per_token: int | None = None
    kv_dense_bytes_per_token: int | None = None
    kv_fixed_bytes: int | None = None
    kv_dtype: str | None = None
    kv_long_from: int | None = None
    kv_layout: str | None = None
    kv_short_layout: str | None = None
    kv_shared_bytes: int | None = None

    @property
    def enabled_options(self) -> dict[str, Any]:
        """The options that are on."""
        return {k: v for k, v in self.options.items() if registry.is_enabled(v)}

    @property
    def compression(self) -> float:
        """``weight_bytes_before / weight_bytes_after`` (1.0 when nothing changed)."""
        if self.weight_bytes_after == 0:
            return 1.0
        return self.weight_bytes_before / self.weight_bytes_after

    @property
    def kv_compression(self) -> float | None:
        """``kv_dense_bytes_per_token / kv_bytes_per_token`` (``None`` when unknown)."""
        if not self.kv_bytes_per_token or self.kv_dense_bytes_per_token is None:
            return None
        return self.kv_dense_bytes_per_token / self.kv_bytes_per_token

    def replaced_groups(self) -> list[tuple[str, str, str, list[str]]]:
        """The swaps grouped by ``(option, old type, new type)`` in first-seen order:
        ``[(option, old_type, new_type, [module names])]`` (types fully qualified)."""
        groups: dict[tuple[str, str, str], list[str]] = {}
        for r in self.replaced:
            groups.setdefault((r.option, r.old_type, r.new_type), []).append(r.name)
        return [(*key, names) for key, names in groups.items()]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (option values summarised: long text and tensors become
        short descriptions)."""
        return {
            "level": self.level,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "options": {k: _summarise(v) for k, v in self.options.items()},
            "replaced": [
                {"name": r.name, "old_type": r.old_type, "new_type": r.new_type, "option": r.option}
                for r in self.replaced
            ],
            "transforms": list(self.transforms),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "kv_cache": self.kv_cache,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_dense_bytes_per_token": self.kv_dense_bytes_per_token,
            "kv_fixed_bytes": self.kv_fixed_bytes,
            "kv_dtype": self.kv_dtype,
            "kv_long_from": self.kv_long_from,
            "kv_layout": self.kv_layout,
            "kv_short_layout": self.kv_short_layout,
            "kv_shared_bytes": self.kv_shared_bytes,
            "accuracy_budget": self.accuracy_budget,
            "budget_level": self.budget_level,
            "notes": list(self.notes),
        }

    def _kv_line(self) -> str:
        if self.kv_bytes_per_token is None or self.kv_dense_bytes_per_token is None:
            return f"{self.kv_cache}, size n/a (no KV-cache geometry in the model's config)"
        per = f"{_fmt_bytes(self.kv_bytes_per_token)}/token"
        dense = f"{_fmt_bytes(self.kv_dense_bytes_per_token)}/token"
        if self.kv_cache == "dense":
            return f"dense {self.kv_dtype}, {per} (batch 1, all layers, K+V)"
        ratio = self.kv_compression
        text = f"{self.kv_cache}, {per} (dense {self.kv_dtype} {dense}, {ratio:.2f}x)"
        if self.kv_fixed_bytes and self.kv_fixed_bytes >= 1024:
            text += f" + {_fmt_bytes(self.kv_fixed_bytes)} fixed (recent ring)"
        if self.kv_shared_bytes:
            text += f" + {_fmt_bytes(self.kv_shared_bytes)} bases shared by the model's caches"
        if self.kv_long_from and self.kv_long_from > 1 and self.kv_short_layout:
            text += (
                f"; from {self.kv_long_from} tokens (any batch): {self.kv_layout}; "
                f"shorter: {self.kv_short_layout} at most (never above dense)"
            )
        return text

    def format(self, verbose: bool = False) -> str:
        """The report as a plain-text table: a summary (options, accuracy budget, weight and
        KV-cache bytes), the replaced modules grouped by option and type with counts (names
        compressed as ``model.layers.*.mlp.{gate_proj,up_proj}``), transforms and notes.
        ``verbose=True`` also lists every replaced module. ``str(report)`` is
        ``report.format()``."""
        on = self.enabled_options
        opts = ", ".join(f"{k}={_summarise(v)}" for k, v in on.items()) or "none"
        target = "; a target, reported" if self.budget_level == 3 else ""
        arch = ""
        if self.architecture:
            arch = f" on {self.architecture}"
            if self.model_type:
                arch += f" ({self.model_type})"
        rows = [
            ("options on", opts),
            (
                "accuracy budget",
                f"<= {self.accuracy_budget:.1%} wikitext-2 PPL increase "
                f"(level {self.budget_level}{target})",
            ),
            (
                "weights",
                f"{_fmt_bytes(self.weight_bytes_before)} -> "
                f"{_fmt_bytes(self.weight_bytes_after)} ({self.compression:.2f}x)",
            ),
            ("KV cache", self._kv_line()),
        ]
        lines = [f"sentinel-kernels patch: level {self.level}{arch}"]
        lines.extend(f"  {k:<16}: {v}" for k, v in rows)
        if self.replaced:
            hint = "" if verbose else "; report.format(verbose=True) lists each"
            lines.append(f"  replaced modules: {len(self.replaced)}{hint}")
            table: list[tuple[str, ...]] = []
            for option, old, new, names in self.replaced_groups():
                parts = _name_patterns(names)
                if not verbose and len(parts) > _MAX_PATTERNS:
                    more = len(parts) - _MAX_PATTERNS + 1
                    parts = parts[: _MAX_PATTERNS - 1] + [f"... ({more} more)"]
                table.append((option, _short(old), _short(new), str(len(names)), parts[0]))
                # One name pattern per line: continuation rows leave the other cells empty.
                table.extend(("", "", "", "", part) for part in parts[1:])
            header = ("option", "was", "now", "count", "modules")
            lines.extend("    " + t for t in _table(header, table, right={3}))
            if verbose:
                lines.append("  each replaced module:")
                each = [
                    (r.name, _short(r.old_type), f"{_short(r.new_type)} ({r.option})")
                    for r in self.replaced
                ]
                lines.extend(
                    "    " + t for t in _table(("module", "was", "now (option)"), each, right=set())
                )
        else:
            lines.append("  replaced modules: none")
        if self.transforms:
            lines.append(f"  {'transforms':<16}: {', '.join(self.transforms)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, each tensor counted once.

    Tied or shared tensors (the same ``Parameter`` reachable under two names, or two
    tensors that are the identical view of the same memory) count once. Meta tensors count
    their nominal size.
    """
    seen: set[Any] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        try:
            ptr = t.data_ptr()
        except (RuntimeError, NotImplementedError):  # exotic tensor subclasses
            ptr = 0
        if ptr and t.device.type != "meta":
            key = (str(t.device), ptr, t.dtype, tuple(t.shape), tuple(t.stride()))
            if key in seen:
                continue
            seen.add(key)
        total += t.numel() * t.element_size()
    return total


def resolve_level(level: int | None) -> int:
    """The patch level: ``level``, else ``int($SENTINEL_LEVEL)``, else 0; must be 0-3."""
    source = "level"
    if level is None:
        env = settings.level()
        if env is None:
            return 0
        source = LEVEL_ENV
        level = env
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int 0-3 or None, got {level!r}")
    if level not in LEVEL_OPTIONS:
        raise ValueError(f"{source}={level} is out of range; levels are 0, 1, 2, 3")
    return level


def _kv_sizes(model: nn.Module, spec: str, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(bytes per token, fixed bytes)`` of a :func:`sentinel_kernels.kv_cache` of kind
    ``spec`` for batch 1 in its long-context layout: the allocation is ``fixed + L *
    per_token`` for ``L >= kv_cache_switch_len`` a whole number of steps
    (:func:`sentinel_kernels.kv_cache_bytes` at two such ``L`` one step apart; the step is
    1, or the key block of a KIVI int4 cache, which allocates whole blocks)."""
    from . import kv_cache as kvc

    start = kvc.kv_cache_switch_len(model, spec, 1, dtype=dtype)
    step = kvc.DEFAULT_KEY_BLOCK if kvc.parse_spec(spec).kind == "int4" else 1
    step = step or 1
    first = -(-start // step) * step
    one = kvc.kv_cache_bytes(model, spec, first, 1, dtype=dtype)
    two = kvc.kv_cache_bytes(model, spec, first + step, 1, dtype=dtype)
    per_step = two - one
    # Per token: the per-channel key scales spread over their block (4 D / T bytes a head).
    return per_step // step, one - (first // step) * per_step


def kv_bytes_per_token(
    model: nn.Module, spec: str = "dense", *, dtype: torch.dtype | None = None
) -> int:
    """KV-cache bytes per token of context, batch 1, summed over layers, K and V.

    ``dense``: ``2 * sum_layers(Hkv * D) * elem`` (``elem`` the model dtype's size, or
    ``dtype``'s); ``int8``: ``2 * sum_layers(Hkv * (D + 2 G))`` (int8 codes plus one fp16
    scale per group); ``int4`` (KIVI, key blocks of ``T``): ``sum_layers(Hkv * (2 ceil(D/2)
    + 4 D / T + 4 G))`` (packed codes, a fp16 scale and minimum per channel per key block,
    and per value group); ``lowrank:r``: ``2 * sum_layers(Hkv * r) *
    elem``. Fixed costs (int4's full-precision ring of recent tokens) are not per token and
    are left out. It is the slope of :func:`sentinel_kernels.kv_cache_bytes` in
    ``max_cache_len`` in the long-context layout (int4: KIVI keys, used from
    :func:`sentinel_kernels.kv_cache.kv_cache_switch_len` tokens on; shorter int4 caches
    store keys per token, ``2 * sum_layers(Hkv * (ceil(D/2) + 4 G))`` a token, plus a
    smaller ring), so it agrees with what :func:`sentinel_kernels.kv_cache` allocates there.

    Raises:
        NotImplementedError / TypeError: the KV geometry cannot be read from ``model``'s
            config. ValueError: a bad ``spec``.
    """
    return _kv_sizes(model, spec, dtype)[0]


def _fill_kv(report: PatchReport, model: nn.Module) -> None:
    """Fill the KV-cache fields of ``report`` (before patching: the float model's dtype)."""
    kv = report.options.get("kv_cache")
    report.kv_cache = kv if registry.is_enabled(kv) and isinstance(kv, str) else "dense"
    if getattr(model, "config", None) is None:
        return  # not a transformers model: no KV geometry (and no transformers import)
    # The dtype sk.kv_cache stores dense K/V in: the model's first floating parameter.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    from . import kv_cache as kvc

    try:
        dense, _ = _kv_sizes(model, "dense", dtype)
        per, fixed = _kv_sizes(model, report.kv_cache, dtype)
        start = kvc.kv_cache_switch_len(model, report.kv_cache, 1, dtype=dtype)
        layout = kvc.kv_cache_layout(model, report.kv_cache, start, dtype=dtype, brief=True)
        short = (
            kvc.kv_cache_layout(model, report.kv_cache, start - 1, dtype=dtype, brief=True)
            if start > 1
            else None
        )
        spec = kvc.parse_spec(report.kv_cache)
        shared = kvc._shared_bytes(spec, kvc._geometry(model))
    except (NotImplementedError, TypeError, ValueError, AttributeError):
        return  # no readable KV geometry (not a transformers decoder): left as unknown
    report.kv_dtype = str(dtype).removeprefix("torch.")
    report.kv_dense_bytes_per_token = dense
    report.kv_bytes_per_token = per
    report.kv_fixed_bytes = fixed
    report.kv_long_from = start
    report.kv_layout = layout
    report.kv_short_layout = short
    report.kv_shared_bytes = shared


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) and value else None


def _attention_blocker(model: nn.Module) -> str | None:
    """Why the sentinel attention cannot serve ``model`` (``None`` when it can); see
    :func:`sentinel_kernels.nn.attention.supports_sentinel_attention`."""
    from .nn.attention import supports_sentinel_attention

    ok, reason = supports_sentinel_attention(model)
    return None if ok else reason


def _check_architecture(
    model: nn.Module, level: int, enabled: Mapping[str, Any], explicit: Mapping[str, Any]
) -> list[str]:
    """Refuse options this architecture cannot honour, before anything is changed; return
    notes (an untested architecture) to add to the report.

    The attention options (:data:`ATTENTION_OPTIONS`) need the sentinel attention: on a
    model it cannot serve, patching raises ``NotImplementedError`` naming the architecture
    and the option (up front, so that e.g. head scoring does not run for nothing, and
    Gemma-2-style soft-capping fails here rather than on the first forward).
    """
    needs = [n for n in ATTENTION_OPTIONS if n in enabled]
    if needs:
        blocker = _attention_blocker(model)
        if blocker is not None:
            names = ", ".join(
                f"{n}={_summarise(enabled[n])!r} "
                f"({'set explicitly' if n in explicit else f'turned on by level {level}'})"
                for n in needs
            )
            raise NotImplementedError(
                f"patch option(s) {names} need the sentinel attention, which cannot serve "
                f"this model: {blocker}. Turn these options off (e.g. level=0 with "
                "int8_weights=True) to patch the rest"
            )
    notes = []
    model_type = _model_type(model)
    features = [n for n in enabled if n not in registry.INPUT_OPTIONS]
    if model_type is not None and model_type not in TESTED_MODEL_TYPES and features:
        notes.append(
            f"architecture {type(model).__name__} (model_type {model_type!r}) is not one of "
            f"the tested ones ({', '.join(TESTED_MODEL_TYPES)}); compare its outputs with "
            "the unpatched model's"
        )
    return notes


_INT8_OPTIONS = ("int8_weights", "int8_activations")


def _float_matmul_weights_left(
    model: nn.Module, enabled: Mapping[str, Any], replaced: Iterable[str]
) -> dict[str, tuple[int, int, str, str]]:
    """Modules that still hold a floating-point matmul weight (a parameter of 2 or more
    dims, not an embedding table) although an int8 option is on, because no replacement
    registered for that option handles their type (transformers' ``Conv1D`` in GPT-2,
    fused 3-D expert weights in mixture-of-experts blocks):
    ``{type name: (modules, bytes, dtype, first module name)}``.

    A type some registered replacement matches counts as handled even where its factory
    declined (a deliberate choice, e.g. a tied head). Modules put in by the patch
    (``replaced`` names and what is under them) are skipped. Nothing is reported when the
    patch replaced nothing and no module matches a replacement for the option: then the
    option is implemented another way (a transform), which this check cannot see into.
    """
    options = [o for o in _INT8_OPTIONS if o in enabled]
    if not options:
        return {}
    new = set(replaced)

    def from_patch(name: str) -> bool:
        return name in new or any(a in new for a in _ancestors(name))

    def handled(module: nn.Module) -> bool:
        return any(r.option in options for r in registry.replacements_for(module))

    modules = [(n, m) for n, m in model.named_modules() if not from_patch(n)]
    if not any(handled(m) for _, m in modules) and not new:
        return {}
    left: dict[str, tuple[int, int, str, str]] = {}
    for name, module in modules:
        if isinstance(module, nn.Embedding) or handled(module):
            continue
        params = [
            p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dim() >= 2
        ]
        if not params:
            continue
        key = type(module).__name__
        count, size, dtype, first = left.get(key, (0, 0, "", name))
        size += sum(p.numel() * p.element_size() for p in params)
        dtype = dtype or str(params[0].dtype).removeprefix("torch.")
        left[key] = (count + 1, size, dtype, first)
    return left


def _validate(name: str, value: Any) -> None:
    """Type/value checks of one explicit option (the feature may still be unimplemented)."""
    if value is None:
        return
    if name == "attention":
        if value is not False and value != "sentinel":
            raise ValueError(f'attention must be "sentinel", False or None; got {value!r}')
    elif name in ("int8_weights", "int8_activations", "fused_layers"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None; got {value!r}")
    elif name == "kv_cache":
        if value is not False and not (isinstance(value, str) and _KV_RE.match(value)):
            raise ValueError(
                'kv_cache must be "dense", "int8", "int4", "lowrank:<rank>", False or None; '
                f"got {value!r}"
            )
    elif name == "prune_ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"prune_ratio must be a number in [0, 1) or None; got {value!r}")
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1); got {value!r}")
    elif name == "head_mask":
        if value is False:
            return
        if not isinstance(value, (torch.Tensor, list, tuple, Mapping)):
            raise ValueError(
                "head_mask must be a tensor ([layers, heads] or [heads]), a sequence or a "
                f"mapping of per-layer masks; got {type(value).__name__}"
            )
    elif name == "calibration_text":
        from .quant.calibrate import Calibration

        if isinstance(value, Calibration):
            return
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                "calibration_text must be a non-empty str (with tokenizer=...), a "
                "sentinel_kernels.quant.Calibration, or None"
            )


def _option_level(name: str, value: Any) -> int:
    """The level that introduces option ``name`` with ``value``."""
    if name in ("attention", "fused_layers"):
        return 1
    if name == "int8_weights":
        return 2
    if name == "kv_cache":
        return {"dense": 1, "int8": 2}.get(value, 3)
    return 3


def _resolve_options(level: int, explicit: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(explicit) - set(registry.KNOWN_OPTIONS))
    if unknown:
        raise TypeError(
            f"patch_model() got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(registry.KNOWN_OPTIONS)}"
        )
    for name, value in explicit.items():
        _validate(name, value)
    options: dict[str, Any] = dict.fromkeys(registry.KNOWN_OPTIONS)
    options.update(LEVEL_OPTIONS[level])
    # An explicit head mask replaces the level's prune ratio (both select pruned heads).
    if registry.is_enabled(explicit.get("head_mask")) and "prune_ratio" not in explicit:
        options["prune_ratio"] = None
    options.update(explicit)
    if registry.is_enabled(options["head_mask"]) and registry.is_enabled(options["prune_ratio"]):
        raise ValueError("give either head_mask or prune_ratio, not both")
    if registry.is_enabled(options["calibration_text"]):
        kv = options["kv_cache"]
        users = [
            n for n in ("int8_activations", "prune_ratio") if registry.is_enabled(options[n])
        ] + (["kv_cache"] if isinstance(kv, str) and kv.startswith("lowrank:") else [])
        if not users:
            raise ValueError(
                "calibration_text was given but no enabled option uses it (it feeds "
                "int8_activations, prune_ratio and kv_cache='lowrank:r')"
            )
    return options


def _set_submodule(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class _PatchState:
    """Kept on a patched model: how to undo the patch."""

    report: PatchReport
    swaps: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, original)
    undos: list[Callable[[], None]] = field(default_factory=list)  # in application order
    # Order of events, so unpatch undoes them in exact reverse: ("swap", i) / ("undo", i).
    events: list[tuple[str, int]] = field(default_factory=list)
    used_options: set[str] = field(default_factory=set)  # options that changed something


def _rollback(model: nn.Module, state: _PatchState) -> None:
    errors: list[BaseException] = []
    for kind, i in reversed(state.events):
        try:
            if kind == "swap":
                name, original = state.swaps[i]
                _set_submodule(model, name, original)
            else:
                state.undos[i]()
        except Exception as exc:  # keep restoring the rest, report afterwards
            errors.append(exc)
    if errors:
        raise RuntimeError(f"unpatching failed for {len(errors)} step(s)") from errors[0]


def _apply_transforms(
    model: nn.Module, ctx: registry.PatchContext, state: _PatchState, before: bool
) -> None:
    for tr in registry.transforms_for(ctx):
        if (tr.order < 0) != before:
            continue
        counts = dict(ctx.log.applied)
        undo = tr.apply(model, ctx)
        if undo is not None:
            if not callable(undo):
                raise TypeError(f"transform {tr.name} returned {undo!r}, not a callable or None")
            state.undos.append(undo)
            state.events.append(("undo", len(state.undos) - 1))
        # A transform that itemises what it applied is listed item by item, with counts.
        items = [
            (label, n - counts.get(label, 0))
            for label, n in ctx.log.applied.items()
            if n > counts.get(label, 0)
        ]
        if items:
            state.report.transforms.extend(f"{label} x{n} ({tr.option})" for label, n in items)
        else:
            state.report.transforms.append(f"{tr.name} ({tr.option})")
        state.used_options.add(tr.option)


def _apply_replacements(model: nn.Module, ctx: registry.PatchContext, state: _PatchState) -> None:
    entries = list(model.named_modules(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, module in entries:
        if name:
            names_of.setdefault(id(module), []).append(name)
    done: set[int] = set()
    replaced_names: set[str] = set()

    def under_replaced(name: str) -> bool:
        return any(a in replaced_names for a in _ancestors(name))

    for name, module in entries:
        if not name or id(module) in done or under_replaced(name):
            continue
        done.add(id(module))
        for rep in registry.replacements_for(module):
            if not ctx.enabled(rep.option):
                continue
            new = rep.factory(module, ctx.for_module(name))
            if new is None:
                continue
            if new is module or not isinstance(new, nn.Module):
                raise TypeError(
                    f"replacement {rep.name} for {name} must return a new nn.Module or None, "
                    f"got {new!r}"
                )
            for qualified in names_of[id(module)]:
                if under_replaced(qualified):
                    continue
                _set_submodule(model, qualified, new)
                state.swaps.append((qualified, module))
                state.events.append(("swap", len(state.swaps) - 1))
                replaced_names.add(qualified)
            state.report.replaced.append(
                ReplacedModule(name, _type_name(module), _type_name(new), rep.option)
            )
            state.used_options.add(rep.option)
            break


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by :func:`patch_model`."""
    return isinstance(getattr(model, _STATE_ATTR, None), _PatchState)


def patch_model(model: nn.Module, level: int | None = None, **options: Any) -> PatchReport:
    """Patch ``model`` in place for faster, smaller inference and report what changed.

    Args:
        model: a transformers causal LM (any ``nn.Module`` works; only registered module
            types are touched).
        level: 0-3 (see the module docstring); ``None`` reads ``$SENTINEL_LEVEL``, default
            0. Level 0 changes nothing.
        **options: override the level's defaults: ``attention="sentinel"``,
            ``int8_weights=True``, ``int8_activations=True``,
            ``kv_cache="int8"|"int4"|"lowrank:<r>"``, ``head_mask=...`` or
            ``prune_ratio=...``, ``calibration_text=...``. ``None``/``False`` turns an
            option off.

    Returns:
        A :class:`PatchReport`. :func:`unpatch_model` undoes the patch exactly.

    Raises:
        TypeError: an unknown option name (or a non-int level).
        ValueError: a level outside 0-3 (argument or ``$SENTINEL_LEVEL``), a bad option
            value, ``head_mask`` together with ``prune_ratio``, or ``calibration_text``
            with no enabled option that uses it.
        NotImplementedError: an option is on but no implementation is registered for it,
            or an option that acts through the sentinel attention (``attention``,
            ``kv_cache``, ``head_mask``, ``prune_ratio``) is on for a model the sentinel
            attention cannot serve (its attention layers bypass transformers'
            ``AttentionInterface``, as in Falcon, BLOOM, GPT-J, MPT; or its config asks for
            soft-capping, as in Gemma 2); the message names the architecture and options.

    Warns (``UserWarning``, also in ``report.notes``) when the model is a transformers
    architecture outside :data:`TESTED_MODEL_TYPES`, and when an int8 option leaves
    matmul weights in floating point because no replacement handles their module type
    (GPT-2's ``Conv1D``, fused mixture-of-experts weights): those modules keep running in
    float, correct but not compressed.
        RuntimeError: ``model`` is already patched (call :func:`unpatch_model` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise RuntimeError(
            "model is already patched; call sentinel_kernels.unpatch_model(model) before "
            "patching it again"
        )
    level = resolve_level(level)
    resolved = _resolve_options(level, options)

    enabled = {k: v for k, v in resolved.items() if registry.is_enabled(v)}
    implemented = registry.registered_options()
    for name, value in enabled.items():
        if name in registry.INPUT_OPTIONS or name in implemented:
            continue
        how = "set explicitly" if name in options else f"turned on by level {level}"
        raise NotImplementedError(
            f"patch option {name}={_summarise(value)!r} ({how}) is not implemented yet: "
            "nothing is registered for it in sentinel_kernels.nn"
        )

    warn_notes = _check_architecture(model, level, enabled, options)

    budget_level = max(
        [level]
        + [_option_level(n, v) for n, v in enabled.items() if n not in registry.INPUT_OPTIONS]
    )
    report = PatchReport(
        level=level,
        options=resolved,
        weight_bytes_before=weight_bytes(model),
        accuracy_budget=ACCURACY_BUDGET[budget_level],
        budget_level=budget_level,
        architecture=type(model).__name__,
        model_type=_model_type(model),
    )
    _fill_kv(report, model)
    state = _PatchState(report)
    ctx = registry.PatchContext(resolved, level, model)
    try:
        _apply_transforms(model, ctx, state, before=True)
        _apply_replacements(model, ctx, state)
        _apply_transforms(model, ctx, state, before=False)
    except BaseException:
        _rollback(model, state)
        raise
    warn_notes.extend(ctx.log.not_applied)
    for name in enabled:
        if name not in registry.INPUT_OPTIONS and name not in state.used_options:
            warn_notes.append(f"option {name} is on but changed nothing in this model")
    left = _float_matmul_weights_left(model, enabled, (r.name for r in report.replaced))
    for type_name, (count, size, dtype, first) in left.items():
        opts = "/".join(o for o in _INT8_OPTIONS if o in enabled)
        warn_notes.append(
            f"{opts}: {count} {type_name} module(s) (e.g. {first}; {_fmt_bytes(size)} of "
            f"weights) have no int8 replacement and stay {dtype}"
        )
    for note in warn_notes:
        # A partial patch must not look like a complete one: say so where it is seen.
        warnings.warn(f"sentinel-kernels patch_model: {note}", UserWarning, stacklevel=2)
    report.notes.extend(warn_notes)
    report.weight_bytes_after = weight_bytes(model)
    setattr(model, _STATE_ATTR, state)
    return report


def unpatch_model(model: nn.Module) -> PatchReport:
    """Undo :func:`patch_model`: put back the original module objects (the identical
    objects, not copies), run the transforms' undo callables in reverse order and remove the
    patch state from ``model``.

    Returns:
        The :class:`PatchReport` of the patch that was undone.

    Raises:
        RuntimeError: ``model`` is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if not isinstance(state, _PatchState):
        raise RuntimeError("model is not patched (patch_model was not called on it)")
    try:
        _rollback(model, state)
    finally:
        delattr(model, _STATE_ATTR)
    return state.report

"""What :func:`sentinel_kernels.patch_model` did: :class:`PatchReport`, and the weight and
KV-cache byte counts it reports (:func:`weight_bytes`, :func:`kv_bytes_per_token`).

The :class:`PatchReport` prints as a table: options, the accuracy budget, weight bytes
before/after, the KV-cache bytes per token of context (the patched kind against a dense
cache in the model dtype), and the replaced modules grouped by option and type with counts
(``report.format(verbose=True)`` lists each).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache import (
    DEFAULT_KEY_BLOCK,
    CacheSpec,
    kv_cache_bytes,
    kv_cache_layout,
    kv_cache_switch_len,
    parse_spec,
)
from ..cache.sizing import layer_geometry, shared_bytes
from .context import is_enabled

__all__ = ["PatchReport", "ReplacedModule", "fill_kv", "kv_bytes_per_token", "weight_bytes"]


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
    if isinstance(value, CacheSpec):
        return str(value)
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


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: set[int]) -> list[str]:
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
            a dense cache (:func:`sentinel_kernels.cache.kv_cache_switch_len`; int4:
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
        return {k: v for k, v in self.options.items() if is_enabled(v)}

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
# Byte counts
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


def _kv_sizes(model: nn.Module, spec: str, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """``(bytes per token, fixed bytes)`` of a :func:`sentinel_kernels.kv_cache` of kind
    ``spec`` for batch 1 in its long-context layout: the allocation is ``fixed + L *
    per_token`` for ``L >= kv_cache_switch_len`` a whole number of steps
    (:func:`sentinel_kernels.kv_cache_bytes` at two such ``L`` one step apart; the step is
    1, or the key block of a KIVI int4 cache, which allocates whole blocks)."""
    start = kv_cache_switch_len(model, spec, 1, dtype=dtype)
    step = DEFAULT_KEY_BLOCK if parse_spec(spec).kind == "int4" else 1
    step = step or 1
    first = -(-start // step) * step
    one = kv_cache_bytes(model, spec, first, 1, dtype=dtype)
    two = kv_cache_bytes(model, spec, first + step, 1, dtype=dtype)
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
    :func:`sentinel_kernels.cache.kv_cache_switch_len` tokens on; shorter int4 caches
    store keys per token, ``2 * sum_layers(Hkv * (ceil(D/2) + 4 G))`` a token, plus a
    smaller ring), so it agrees with what :func:`sentinel_kernels.kv_cache` allocates there.

    Raises:
        NotImplementedError / TypeError: the KV geometry cannot be read from ``model``'s
            config. ValueError: a bad ``spec``.
    """
    return _kv_sizes(model, spec, dtype)[0]


def fill_kv(report: PatchReport, model: nn.Module) -> None:
    """Fill the KV-cache fields of ``report`` from ``model``'s config, for the cache kind of
    ``report.options["kv_cache"]`` (call it before patching: the sizes are those of the
    float model's dtype). Fields stay ``None`` when the KV geometry cannot be read."""
    kv = report.options.get("kv_cache")
    report.kv_cache = str(parse_spec(kv)) if kv is not None and is_enabled(kv) else "dense"
    if getattr(model, "config", None) is None:
        return  # not a transformers model: no KV geometry (and no transformers import)
    # The dtype sk.kv_cache stores dense K/V in: the model's first floating parameter.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        dense, _ = _kv_sizes(model, "dense", dtype)
        per, fixed = _kv_sizes(model, report.kv_cache, dtype)
        start = kv_cache_switch_len(model, report.kv_cache, 1, dtype=dtype)
        layout = kv_cache_layout(model, report.kv_cache, start, dtype=dtype, brief=True)
        short = (
            kv_cache_layout(model, report.kv_cache, start - 1, dtype=dtype, brief=True)
            if start > 1
            else None
        )
        spec = parse_spec(report.kv_cache)
        shared = shared_bytes(spec, layer_geometry(model))
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

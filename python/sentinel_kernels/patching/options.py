"""The patch options of :func:`sentinel_kernels.patch_model`, declared in one table.

Each option is a :class:`PatchOption`: its name, the level that introduces it, how an
explicit value is checked and turned into a typed value (:attr:`PatchOption.parse`), and
what it does to a model: model :class:`Transform` steps and module :class:`Replacement`
steps, each naming the function of the feature module that does the work. :data:`OPTIONS`
lists them all, explicitly: importing a feature module registers nothing.

Order of the steps. Transforms run by ascending ``order`` (those with ``order < 0`` before
the module replacements, the others after), then by their place in :data:`OPTIONS`; the
undo callables run in reverse. A module is offered to the matching replacements by
descending ``priority``, then by their place in :data:`OPTIONS`; the first whose option is
on and whose factory returns a module wins. The orders used below:

======  =====================================================================
order   transform
======  =====================================================================
-100    head scoring for ``prune_ratio`` (needs the untouched float model)
-50     ``kv_cache`` (a low-rank calibration must see the float model)
-2, -1  tied embedding/head int8, SmoothQuant folding (before the int8 linears)
0       sentinel attention, explicit head masks
5       fused MLP / attention forwards (after the replacements they wrap)
10**6   check that head masks are read by the sentinel attention
======  =====================================================================
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache import CacheSpec, parse_spec
from ..cache.option import KV_CACHE_ORDER, apply_kv_cache
from ..nn import attention as sk_attention
from ..nn import fused_layers, rotary_table
from ..prune import patching as prune_patching
from ..quant.calibrate import Calibration
from . import int8
from .context import PatchContext

__all__ = [
    "FEATURE_OPTIONS",
    "INPUT_OPTIONS",
    "KNOWN_OPTIONS",
    "OPTIONS",
    "PatchOption",
    "Replacement",
    "ReplacementFactory",
    "Transform",
    "TransformFn",
    "option",
]

ReplacementFactory = Callable[[nn.Module, PatchContext], "nn.Module | None"]
TransformFn = Callable[[nn.Module, PatchContext], "Callable[[], None] | None"]

# Registration order: ties of ``order`` / ``priority`` go to the step declared first.
_counter = itertools.count()


@dataclass(frozen=True, eq=False)
class Replacement:
    """A module replacement: while ``option`` is on, every submodule of exactly
    ``module_type`` (or a subclass, with ``match_subclasses``) is handed to
    ``factory(module, ctx)``, which returns the module to put in its place or ``None`` to
    leave it alone. It must not modify ``module`` (``unpatch_model`` puts the original
    object back) and must return a *new* module. ``name`` labels it in errors."""

    module_type: type[nn.Module]
    option: str
    factory: ReplacementFactory
    priority: int = 0
    match_subclasses: bool = False
    name: str = ""
    seq: int = field(default_factory=lambda: next(_counter), repr=False)

    def matches(self, module: nn.Module) -> bool:
        """Whether this replacement applies to ``module``'s type."""
        if self.match_subclasses:
            return isinstance(module, self.module_type)
        return type(module) is self.module_type


@dataclass(frozen=True, eq=False)
class Transform:
    """A model transform: while ``option`` is on, ``apply(model, ctx)`` changes the model
    (registers an attention function, wraps ``generate``, stores head masks ...) and returns
    a callable that undoes it, or ``None``. ``name`` labels it in the report."""

    option: str
    apply: TransformFn
    order: int = 0
    name: str = ""
    seq: int = field(default_factory=lambda: next(_counter), repr=False)


@dataclass(frozen=True)
class PatchOption:
    """One keyword option of :func:`sentinel_kernels.patch_model`.

    Attributes:
        name: the keyword.
        level: the patch level that introduces the option (its accuracy budget applies
            when the option is on), or a function of the parsed value giving it
            (``kv_cache``: dense 1, int8 2, the others 3).
        parse: checks an explicit, non-``None`` value and returns it typed; raises
            ``ValueError`` with a message naming the option. ``False`` (and the other
            "off" values of :func:`~sentinel_kernels.patching.context.is_enabled`) must
            pass for a feature option.
        transforms / replacements: what the option does while it is on (see the module
            docstring for the order).
        is_input: an input the features read (``calibration_text``, ``tokenizer``), not
            a feature: it needs no steps and does not count towards the budget level.
    """

    name: str
    level: int | Callable[[Any], int]
    parse: Callable[[Any], Any]
    transforms: tuple[Transform, ...] = ()
    replacements: tuple[Replacement, ...] = ()
    is_input: bool = False

    def level_of(self, value: Any) -> int:
        """The level that introduces this option with ``value`` (already parsed)."""
        return self.level(value) if callable(self.level) else self.level


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _parse_attention(value: Any) -> str | bool:
    if value is not False and value != sk_attention.ATTN_IMPLEMENTATION:
        raise ValueError(f'attention must be "sentinel", False or None; got {value!r}')
    return value


def _flag(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None; got {value!r}")
        return value

    return parse


def _parse_kv_cache(value: Any) -> CacheSpec | bool:
    if value is False:
        return False
    try:
        return parse_spec(value)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(
            'kv_cache must be "dense", "int8", "int4", "lowrank:<rank>", False or None; '
            f"got {value!r}"
        ) from None


def _kv_cache_level(spec: Any) -> int:
    kind = spec.kind if isinstance(spec, CacheSpec) else None
    return {"dense": 1, "int8": 2}.get(kind, 3) if kind is not None else 3


def _parse_prune_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"prune_ratio must be a number in [0, 1) or None; got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1); got {value!r}")
    return float(value)


def _parse_head_mask(value: Any) -> Any:
    if value is not False and not isinstance(value, (torch.Tensor, list, tuple, Mapping)):
        raise ValueError(
            "head_mask must be a tensor ([layers, heads] or [heads]), a sequence or a "
            f"mapping of per-layer masks; got {type(value).__name__}"
        )
    return value


def _parse_calibration_text(value: Any) -> str | Calibration:
    if isinstance(value, Calibration):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            "calibration_text must be a non-empty str (with tokenizer=...), a "
            "sentinel_kernels.quant.Calibration, or None"
        )
    return value


def _any(value: Any) -> Any:
    return value


def _rotary_table(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    return rotary_table.rotary_table_factory(module)


# --------------------------------------------------------------------------------------
# The options (this order is the order of PatchReport.options)
# --------------------------------------------------------------------------------------


def _int8_steps(
    option: str, linear: ReplacementFactory, conv1d: ReplacementFactory, prio: int
) -> tuple[Replacement, ...]:
    mode = "w8a16" if option == "int8_weights" else "w8a8"
    return (
        Replacement(nn.Linear, option, linear, priority=prio, name=f"Int8Linear({mode})"),
        Replacement(nn.Embedding, option, int8.embedding, name="Int8Embedding(tied)"),
        # GPT-2's Conv1D (matched by class name, below the nn.Linear steps)
        Replacement(
            nn.Module,
            option,
            conv1d,
            priority=prio - 10,
            match_subclasses=True,
            name=f"Int8Linear({mode}, from Conv1D)",
        ),
    )


def _tied_int8(option: str) -> Transform:
    # Both int8 options quantize a tied embedding / LM head pair before the replacements.
    return Transform(option, int8.tied_int8, order=-2, name="tied embedding/head int8")


_SENTINEL_CHECK = "sentinel attention check"

#: Every option ``patch_model`` accepts, in report order. To add one, see
#: :mod:`sentinel_kernels.patching`.
OPTIONS: tuple[PatchOption, ...] = (
    PatchOption(
        "attention",
        level=1,
        parse=_parse_attention,
        transforms=(
            Transform("attention", sk_attention.use_sentinel_attention, name="sentinel attention"),
        ),
    ),
    PatchOption(
        "int8_weights",
        level=2,
        parse=_flag("int8_weights"),
        transforms=(_tied_int8("int8_weights"),),
        replacements=_int8_steps("int8_weights", int8.w8a16, int8.conv1d_w8a16, 0),
    ),
    PatchOption(
        "int8_activations",
        level=3,
        parse=_flag("int8_activations"),
        transforms=(
            _tied_int8("int8_activations"),
            Transform("int8_activations", int8.smoothing, order=-1, name="SmoothQuant folding"),
        ),
        replacements=_int8_steps("int8_activations", int8.w8a8, int8.conv1d_w8a8, 1),
    ),
    PatchOption(
        "kv_cache",
        level=_kv_cache_level,
        parse=_parse_kv_cache,
        transforms=(
            Transform("kv_cache", apply_kv_cache, order=KV_CACHE_ORDER, name="compressed KV cache"),
        ),
    ),
    PatchOption(
        "head_mask",
        level=3,
        parse=_parse_head_mask,
        transforms=(
            Transform("head_mask", prune_patching.apply_head_mask, name="head mask"),
            Transform(
                "head_mask",
                prune_patching.check_sentinel_attention,
                order=prune_patching.CHECK_ORDER,
                name=_SENTINEL_CHECK,
            ),
        ),
    ),
    PatchOption(
        "prune_ratio",
        level=3,
        parse=_parse_prune_ratio,
        transforms=(
            Transform(
                "prune_ratio",
                prune_patching.apply_prune_ratio,
                order=prune_patching.SCORE_ORDER,
                name="head pruning (gradient)",
            ),
            Transform(
                "prune_ratio",
                prune_patching.check_sentinel_attention,
                order=prune_patching.CHECK_ORDER,
                name=_SENTINEL_CHECK,
            ),
        ),
    ),
    PatchOption(
        "fused_layers",
        level=1,
        parse=_flag("fused_layers"),
        transforms=(
            Transform(
                "fused_layers",
                fused_layers._fuse_model,
                order=5,
                name="fused MLP / attention forward",
            ),
        ),
        # The norm classes live in transformers' per-model modules, which are not imported
        # here: any module is matched, by class name, below every other replacement.
        replacements=(
            Replacement(
                nn.Module,
                "fused_layers",
                fused_layers._norm_factory_by_name,
                priority=-100,
                match_subclasses=True,
                name="SentinelRMSNorm",
            ),
            # transformers' rotary embedding modules, matched by class name as well
            Replacement(
                nn.Module,
                "fused_layers",
                _rotary_table,
                priority=-100,
                match_subclasses=True,
                name="RotaryTable",
            ),
        ),
    ),
    PatchOption("calibration_text", level=0, parse=_parse_calibration_text, is_input=True),
    PatchOption("tokenizer", level=0, parse=_any, is_input=True),
)

_BY_NAME: dict[str, PatchOption] = {o.name: o for o in OPTIONS}

#: Every keyword option ``patch_model`` accepts.
KNOWN_OPTIONS: tuple[str, ...] = tuple(_BY_NAME)
#: Options that turn a feature on; each needs an implementation when it is on.
FEATURE_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if not o.is_input)
#: Inputs that feed features rather than turn one on (``calibration_text`` with the
#: ``tokenizer`` that reads it).
INPUT_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.is_input)


def option(name: str) -> PatchOption:
    """The :class:`PatchOption` called ``name`` (``KeyError`` if there is none)."""
    return _BY_NAME[name]

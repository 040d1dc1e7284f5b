"""``patch_model`` / ``unpatch_model``: swap a model's modules for the sentinel ones, per level.

A *level* (0-3, :mod:`.levels`) is a set of option defaults; options passed to
:func:`patch_model` override them. What each option does is declared in
:data:`.options.OPTIONS` (looked up through :mod:`.registry`); this module walks the model,
applies the replacements and transforms of the options that are on, remembers what it
replaced, and reports (:class:`~.report.PatchReport`).

Architectures: levels 1-3 are tested on Llama, Mistral, Qwen2, Qwen3 and GPT-2
(:data:`TESTED_MODEL_TYPES`). The options that act through the sentinel attention raise
``NotImplementedError`` up front, naming the architecture and the option, on models it
cannot serve (attention layers outside transformers' ``AttentionInterface``: Falcon, BLOOM,
GPT-J, MPT, CodeGen ...; soft-capped attention: Gemma 2). Other architectures are patched
where the options apply, with a warning; int8 options that leave matmul weights in float
(no replacement for the module type, e.g. GPT-2's ``Conv1D``) warn and say so in the report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..nn.attention import supports_sentinel_attention
from . import registry
from .context import PatchContext, is_enabled
from .levels import ACCURACY_BUDGET, LEVEL_OPTIONS, resolve_level
from .options import INPUT_OPTIONS, KNOWN_OPTIONS, option
from .report import PatchReport, ReplacedModule, _fmt_bytes, _summarise, _type_name, fill_kv
from .report import weight_bytes as weight_bytes

__all__ = [
    "ATTENTION_OPTIONS",
    "TESTED_MODEL_TYPES",
    "is_patched",
    "patch_model",
    "patch_report",
    "unpatch_model",
]

#: ``config.model_type`` of the architectures levels 1-3 are tested on (tests/test_patch.py
#: patches tiny random models of each and compares logits / runs generate). Patching any
#: other transformers model works where the options apply (unsupported attention raises),
#: with a warning that the architecture is untested.
TESTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

#: Options that act through the sentinel attention function (``kv_cache`` reads the
#: compressed cache in it; head masks are applied by it).
ATTENTION_OPTIONS: tuple[str, ...] = ("attention", "kv_cache", "head_mask", "prune_ratio")


_STATE_ATTR = "_sentinel_patch_state"


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) and value else None


def _attention_blocker(model: nn.Module) -> str | None:
    """Why the sentinel attention cannot serve ``model`` (``None`` when it can); see
    :func:`sentinel_kernels.nn.attention.supports_sentinel_attention`."""
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
    features = [n for n in enabled if n not in INPUT_OPTIONS]
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


def _resolve_options(level: int, explicit: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(explicit) - set(KNOWN_OPTIONS))
    if unknown:
        raise TypeError(
            f"patch_model() got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(KNOWN_OPTIONS)}"
        )
    for name, value in explicit.items():
        if value is not None:
            option(name).parse(value)  # raises ValueError on a bad value
    options: dict[str, Any] = dict.fromkeys(KNOWN_OPTIONS)
    options.update(LEVEL_OPTIONS[level])
    # An explicit head mask replaces the level's prune ratio (both select pruned heads).
    if is_enabled(explicit.get("head_mask")) and "prune_ratio" not in explicit:
        options["prune_ratio"] = None
    options.update(explicit)
    if is_enabled(options["head_mask"]) and is_enabled(options["prune_ratio"]):
        raise ValueError("give either head_mask or prune_ratio, not both")
    if is_enabled(options["calibration_text"]):
        kv = options["kv_cache"]
        users = [n for n in ("int8_activations", "prune_ratio") if is_enabled(options[n])] + (
            ["kv_cache"] if isinstance(kv, str) and kv.startswith("lowrank:") else []
        )
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
    model: nn.Module, ctx: PatchContext, state: _PatchState, before: bool
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


def _apply_replacements(model: nn.Module, ctx: PatchContext, state: _PatchState) -> None:
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


def patch_report(model: nn.Module) -> PatchReport | None:
    """The :class:`PatchReport` of the patch ``model`` currently has, ``None`` when it is
    not patched. A new object per :func:`patch_model` call (decode sessions key on it)."""
    state = getattr(model, _STATE_ATTR, None)
    return state.report if isinstance(state, _PatchState) else None


def patch_model(model: nn.Module, level: int | None = None, **options: Any) -> PatchReport:
    """Patch ``model`` in place for faster, smaller inference and report what changed.

    Args:
        model: a transformers causal LM (any ``nn.Module`` works; only module types some
            option replaces are touched).
        level: 0-3 (:mod:`.levels`); ``None`` reads ``$SENTINEL_LEVEL``, default 0. Level 0
            changes nothing.
        **options: override the level's defaults (:data:`.options.OPTIONS`):
            ``attention="sentinel"``, ``fused_layers=True``, ``int8_weights=True``,
            ``int8_activations=True``, ``kv_cache="int8"|"int4"|"lowrank:<r>"`` (or a
            :class:`~sentinel_kernels.cache.CacheSpec`), ``head_mask=...`` or
            ``prune_ratio=...``, ``calibration_text=...`` with ``tokenizer=...``.
            ``None``/``False`` turns an option off.

    Returns:
        A :class:`PatchReport`. :func:`unpatch_model` undoes the patch exactly.

    Raises:
        TypeError: an unknown option name (or a non-int level).
        ValueError: a level outside 0-3 (argument or ``$SENTINEL_LEVEL``), a bad option
            value, ``head_mask`` together with ``prune_ratio``, or ``calibration_text``
            with no enabled option that uses it.
        NotImplementedError: an option is on but no step is declared for it,
            or an option that acts through the sentinel attention (``attention``,
            ``kv_cache``, ``head_mask``, ``prune_ratio``) is on for a model the sentinel
            attention cannot serve (its attention layers bypass transformers'
            ``AttentionInterface``, as in Falcon, BLOOM, GPT-J, MPT; or its config asks for
            soft-capping, as in Gemma 2); the message names the architecture and options.
        RuntimeError: ``model`` is already patched (call :func:`unpatch_model` first).

    Warns (``UserWarning``, also in ``report.notes``) when the model is a transformers
    architecture outside :data:`TESTED_MODEL_TYPES`, and when an int8 option leaves
    matmul weights in floating point because no replacement handles their module type
    (GPT-2's ``Conv1D``, fused mixture-of-experts weights): those modules keep running in
    float, correct but not compressed.
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

    enabled = {k: v for k, v in resolved.items() if is_enabled(v)}
    implemented = registry.registered_options()
    for name, value in enabled.items():
        if name in INPUT_OPTIONS or name in implemented:
            continue
        how = "set explicitly" if name in options else f"turned on by level {level}"
        raise NotImplementedError(
            f"patch option {name}={_summarise(value)!r} ({how}) is not implemented yet: "
            "no step is declared for it in sentinel_kernels.patching.options"
        )

    warn_notes = _check_architecture(model, level, enabled, options)

    budget_level = max(
        [level]
        + [
            option(n).level_of(option(n).parse(v))
            for n, v in enabled.items()
            if n not in INPUT_OPTIONS
        ]
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
    fill_kv(report, model)
    state = _PatchState(report)
    ctx = PatchContext(resolved, level, model)
    try:
        _apply_transforms(model, ctx, state, before=True)
        _apply_replacements(model, ctx, state)
        _apply_transforms(model, ctx, state, before=False)
    except BaseException:
        _rollback(model, state)
        raise
    warn_notes.extend(ctx.log.not_applied)
    for name in enabled:
        if name not in INPUT_OPTIONS and name not in state.used_options:
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

"""Registry of what :func:`sentinel_kernels.patch_model` can do to a model.

Each feature of ``patch_model`` is a *patch option* (``attention``, ``int8_weights`` ...).
An implementation makes an option work by registering, at import time of its module in
``sentinel_kernels.nn`` (or ``quant``/``prune``), either or both of:

* a **module replacement** (:func:`register_replacement`): for every submodule of exactly
  ``module_type`` (or a subclass, with ``match_subclasses=True``) ``factory(module, ctx)``
  is called while the option is on; it returns the module to put in its place, or ``None``
  to leave that module alone. ``patch_model`` does the swapping and keeps the original
  object, so ``unpatch_model`` puts the identical object back;
* a **model transform** (:func:`register_transform`): ``apply(model, ctx)`` changes the
  model in some other way (registering an attention function, installing a cache class,
  computing head masks) and returns a callable that undoes it (or ``None`` if there is
  nothing to undo).

``ctx`` is a :class:`PatchContext`: a read-only mapping of the resolved options (level
defaults merged with the user's options) that also carries the patch ``level``, the root
``model`` and, for replacements, the qualified ``name`` of the module considered.

An option that is turned on while nothing is registered for it makes ``patch_model`` raise
``NotImplementedError``: options are never silently ignored.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "FEATURE_OPTIONS",
    "KNOWN_OPTIONS",
    "PatchContext",
    "PatchLog",
    "Replacement",
    "Transform",
    "is_enabled",
    "register_replacement",
    "register_transform",
    "registered_options",
    "replacements_for",
    "transforms_for",
    "unregister_replacement",
    "unregister_transform",
]

#: Options that turn a feature on; each needs a registered implementation when it is on.
FEATURE_OPTIONS: tuple[str, ...] = (
    "attention",
    "int8_weights",
    "int8_activations",
    "kv_cache",
    "head_mask",
    "prune_ratio",
    "fused_layers",
)
#: Every keyword option ``patch_model`` accepts. ``calibration_text`` (with the
#: ``tokenizer`` that reads it) is an input consumed
#: by the calibrated features, not a feature of its own.
KNOWN_OPTIONS: tuple[str, ...] = (*FEATURE_OPTIONS, "calibration_text", "tokenizer")
#: Inputs that feed features rather than turn one on.
INPUT_OPTIONS: tuple[str, ...] = ("calibration_text", "tokenizer")


def is_enabled(value: Any) -> bool:
    """Whether an option value turns its feature on: anything but ``None``, ``False``,
    ``0``/``0.0`` and ``""``. (Tensors, e.g. a ``head_mask``, count as on.)"""
    if value is None or value is False:
        return False
    if isinstance(value, (int, float, str)) and not value:
        return False
    return True


@dataclass
class PatchLog:
    """What the transforms of one ``patch_model`` call say they did and did not do.

    ``applied``: labels of the optimisations put in effect, each with its count, in order.
    ``not_applied``: one sentence per optimisation an enabled option asked for that could
    not be applied to (some of) the model, with the reason; the report lists and warns them
    (a partial patch must never look like a complete one).
    """

    applied: dict[str, int] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)


class PatchContext(Mapping[str, Any]):
    """Read-only view of the resolved patch options handed to factories and transforms.

    ``ctx["int8_weights"]`` reads an option (every known option is present, ``None`` when
    off); ``ctx.enabled("kv_cache")`` says whether it is on; ``ctx.level`` is the patch level,
    ``ctx.model`` the root model being patched and ``ctx.name`` the qualified name of the
    module a replacement factory is asked about (``""`` for transforms). A transform records
    what it put in effect with :meth:`applied` and what it could not with
    :meth:`not_applied`; both reach the :class:`~sentinel_kernels.PatchReport`.
    """

    __slots__ = ("_options", "level", "log", "model", "name")

    def __init__(
        self,
        options: Mapping[str, Any],
        level: int,
        model: nn.Module,
        name: str = "",
        log: PatchLog | None = None,
    ) -> None:
        self._options = dict(options)
        self.level = level
        self.model = model
        self.name = name
        self.log = PatchLog() if log is None else log

    def applied(self, label: str, count: int = 1) -> None:
        """Record that the optimisation ``label`` is in effect on ``count`` more modules."""
        self.log.applied[label] = self.log.applied.get(label, 0) + int(count)

    def not_applied(self, reason: str) -> None:
        """Record an optimisation that could not be applied, with the reason (a sentence)."""
        self.log.not_applied.append(reason)

    def __getitem__(self, key: str) -> Any:
        return self._options[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def enabled(self, option: str) -> bool:
        """Whether ``option`` is on in this patch."""
        return is_enabled(self._options.get(option))

    def for_module(self, name: str) -> PatchContext:
        """The same context, naming module ``name``."""
        return PatchContext(self._options, self.level, self.model, name, self.log)

    def __repr__(self) -> str:
        on = {k: v for k, v in self._options.items() if is_enabled(v)}
        return f"PatchContext(level={self.level}, name={self.name!r}, options={on})"


ReplacementFactory = Callable[[nn.Module, PatchContext], "nn.Module | None"]
TransformFn = Callable[[nn.Module, PatchContext], "Callable[[], None] | None"]

_counter = itertools.count()


@dataclass(frozen=True, eq=False)
class Replacement:
    """A registered module replacement (returned by :func:`register_replacement`; pass it
    to :func:`unregister_replacement` to remove it)."""

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
    """A registered model transform (returned by :func:`register_transform`)."""

    option: str
    apply: TransformFn
    order: int = 0
    name: str = ""
    seq: int = field(default_factory=lambda: next(_counter), repr=False)


_lock = threading.Lock()
_replacements: list[Replacement] = []
_transforms: list[Transform] = []


def _check_option(option: str) -> None:
    if option not in FEATURE_OPTIONS:
        raise ValueError(
            f"cannot register for option {option!r}: not one of {', '.join(FEATURE_OPTIONS)}"
        )


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def register_replacement(
    module_type: type[nn.Module],
    option: str,
    factory: ReplacementFactory,
    *,
    priority: int = 0,
    match_subclasses: bool = False,
    name: str | None = None,
) -> Replacement:
    """Register ``factory`` to replace modules of ``module_type`` while ``option`` is on.

    Args:
        module_type: the ``nn.Module`` class to replace (exact type match unless
            ``match_subclasses``; exact by default so that, e.g., a registration for
            ``nn.Linear`` leaves a third-party ``nn.Linear`` subclass alone).
        option: the patch option (one of :data:`FEATURE_OPTIONS`) that turns it on.
        factory: ``factory(module, ctx) -> nn.Module | None`` (see :class:`PatchContext`);
            it must not modify ``module`` (the original is restored by ``unpatch_model``)
            and must return a *new* module or ``None``.
        priority: when several registrations match a module, the highest priority whose
            option is on and whose factory returns a module wins (ties: first registered).
        match_subclasses: match subclasses of ``module_type`` too.
        name: a label for reports and errors (default: the factory's qualified name).

    Returns:
        The :class:`Replacement` handle.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _check_option(option)
    if not callable(factory):
        raise TypeError("factory must be callable")
    rep = Replacement(
        module_type, option, factory, priority, match_subclasses, name or _callable_name(factory)
    )
    with _lock:
        _replacements.append(rep)
    return rep


def unregister_replacement(handle: Replacement) -> None:
    """Remove a registration made by :func:`register_replacement` (``ValueError`` if it is
    not registered). Models patched with it keep their replacements until unpatched."""
    with _lock:
        for i, rep in enumerate(_replacements):
            if rep is handle:
                del _replacements[i]
                return
    raise ValueError(f"{handle!r} is not registered")


def register_transform(
    option: str, apply: TransformFn, *, order: int = 0, name: str | None = None
) -> Transform:
    """Register ``apply(model, ctx) -> undo | None`` to run while ``option`` is on.

    Transforms with ``order < 0`` run before the module replacements, the others after;
    within a group they run by ascending ``order``, then registration order. ``unpatch_model``
    calls the returned ``undo`` callables in reverse order.
    """
    _check_option(option)
    if not callable(apply):
        raise TypeError("apply must be callable")
    tr = Transform(option, apply, order, name or _callable_name(apply))
    with _lock:
        _transforms.append(tr)
    return tr


def unregister_transform(handle: Transform) -> None:
    """Remove a registration made by :func:`register_transform`."""
    with _lock:
        for i, tr in enumerate(_transforms):
            if tr is handle:
                del _transforms[i]
                return
    raise ValueError(f"{handle!r} is not registered")


def replacements_for(module: nn.Module) -> list[Replacement]:
    """Registrations matching ``module``, best first (priority, then registration order)."""
    with _lock:
        found = [r for r in _replacements if r.matches(module)]
    return sorted(found, key=lambda r: (-r.priority, r.seq))


def transforms_for(options: Mapping[str, Any]) -> list[Transform]:
    """Transforms whose option is on in ``options``, in run order."""
    with _lock:
        found = [t for t in _transforms if is_enabled(options.get(t.option))]
    return sorted(found, key=lambda t: (t.order, t.seq))


def registered_options() -> set[str]:
    """Options with at least one registered replacement or transform."""
    with _lock:
        return {r.option for r in _replacements} | {t.option for t in _transforms}

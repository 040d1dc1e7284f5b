"""The steps :func:`sentinel_kernels.patch_model` looks up: those :data:`~.options.OPTIONS`
declares, plus any added at run time with :func:`register_replacement` /
:func:`register_transform` (experiments, tests: a step for an existing option without
editing the table).

An option that is turned on while no step is declared or registered for it makes
``patch_model`` raise ``NotImplementedError``: options are never silently ignored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .context import is_enabled
from .options import (
    FEATURE_OPTIONS,
    OPTIONS,
    Replacement,
    ReplacementFactory,
    Transform,
    TransformFn,
)

__all__ = [
    "register_replacement",
    "register_transform",
    "registered_options",
    "replacements_for",
    "transforms_for",
    "unregister_replacement",
    "unregister_transform",
]

_lock = threading.Lock()
_replacements: list[Replacement] = [r for o in OPTIONS for r in o.replacements]
_transforms: list[Transform] = [t for o in OPTIONS for t in o.transforms]


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
    """Add a step replacing modules of ``module_type`` while ``option`` is on.

    Args:
        module_type: the ``nn.Module`` class to replace (exact type match unless
            ``match_subclasses``; exact by default so that, e.g., a step for ``nn.Linear``
            leaves a third-party ``nn.Linear`` subclass alone).
        option: the patch option (one of :data:`~.options.FEATURE_OPTIONS`) that turns it on.
        factory: ``factory(module, ctx) -> nn.Module | None`` (see
            :class:`~.context.PatchContext`); it must not modify ``module`` (the original is
            restored by ``unpatch_model``) and must return a *new* module or ``None``.
        priority: when several steps match a module, the highest priority whose option is
            on and whose factory returns a module wins (ties: declared or registered first).
        match_subclasses: match subclasses of ``module_type`` too.
        name: a label for errors (default: the factory's qualified name).

    Returns:
        The :class:`~.options.Replacement` handle (for :func:`unregister_replacement`).

    Raises:
        TypeError: ``module_type`` is not an ``nn.Module`` class or ``factory`` is not
            callable. ValueError: ``option`` is not a feature option.
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


def _remove(steps: list[Any], handle: object) -> None:
    # Remove ``handle`` itself (by identity, not equality) from a registry list.
    with _lock:
        for i, step in enumerate(steps):
            if step is handle:
                del steps[i]
                return
    raise ValueError(f"{handle!r} is not registered")


def unregister_replacement(handle: Replacement) -> None:
    """Remove a step (``ValueError`` if it is not there). Models patched with it keep their
    replacements until unpatched."""
    _remove(_replacements, handle)


def register_transform(
    option: str, apply: TransformFn, *, order: int = 0, name: str | None = None
) -> Transform:
    """Add a step ``apply(model, ctx) -> undo | None`` that runs while ``option`` is on.

    Transforms with ``order < 0`` run before the module replacements, the others after;
    within a group they run by ascending ``order``, then declaration/registration order.
    ``unpatch_model`` calls the returned ``undo`` callables in reverse order.

    Raises:
        ValueError: ``option`` is not a feature option. TypeError: ``apply`` is not callable.
    """
    _check_option(option)
    if not callable(apply):
        raise TypeError("apply must be callable")
    tr = Transform(option, apply, order, name or _callable_name(apply))
    with _lock:
        _transforms.append(tr)
    return tr


def unregister_transform(handle: Transform) -> None:
    """Remove a step added by :func:`register_transform` or declared in the table."""
    _remove(_transforms, handle)


def replacements_for(module: nn.Module) -> list[Replacement]:
    """Replacement steps matching ``module``, best first (priority, then order of
    declaration/registration)."""
    with _lock:
        found = [r for r in _replacements if r.matches(module)]
    return sorted(found, key=lambda r: (-r.priority, r.seq))


def transforms_for(options: Mapping[str, Any]) -> list[Transform]:
    """Transform steps whose option is on in ``options``, in run order."""
    with _lock:
        found = [t for t in _transforms if is_enabled(options.get(t.option))]
    return sorted(found, key=lambda t: (t.order, t.seq))


def registered_options() -> set[str]:
    """Options with at least one replacement or transform step."""
    with _lock:
        return {r.option for r in _replacements} | {t.option for t in _transforms}

"""What differs between the transformers versions sentinel-kernels supports, decided once.

The project supports transformers from :data:`MIN_TRANSFORMERS` to the newest release pip
resolves (CI runs the suite against both ends). Where transformers renamed something, the
code asks this module which name the installed version (or the given model) expects instead
of hard-coding one: a rename then breaks a CI run here, not a user.

* The cache argument: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old
  name warns and is announced for removal in 5.40). :func:`cache_kwargs` builds the keyword
  the model's ``forward`` declares.

Nothing here imports transformers at module import: the checks read signatures of the
objects they are given.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "CACHE_NAMES",
    "MIN_TRANSFORMERS",
    "accepts",
    "cache_kwarg",
    "cache_kwargs",
    "cache_param",
    "import_from_transformers",
    "output_cache",
]

#: The oldest transformers release the project claims and tests in CI (pyproject agrees).
MIN_TRANSFORMERS = "5.17"

#: Names transformers has used for the key/value cache argument, newest first.
CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values")

_PARAMS: dict[Any, frozenset[str] | None] = {}


def _parameters(fn: Callable[..., Any]) -> frozenset[str] | None:
    """Parameter names of ``fn`` (``None`` when its signature cannot be read), memoised by
    the underlying function so that bound methods of one class share the entry."""
    key = getattr(fn, "__func__", fn)
    try:
        return _PARAMS[key]
    except (KeyError, TypeError):
        pass
    try:
        names: frozenset[str] | None = frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = None
    try:
        _PARAMS[key] = names
    except TypeError:  # unhashable callable: not memoised
        pass
    return names


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` declares a parameter called ``name`` (False when unreadable)."""
    names = _parameters(fn)
    return names is not None and name in names


def cache_param(fn: Callable[..., Any]) -> str | None:
    """The cache parameter ``fn`` declares: ``"cache"`` (transformers >= 5.25),
    ``"past_key_values"`` (older), or ``None`` when it declares neither."""
    names = _parameters(fn)
    if names is None:
        return None
    return next((n for n in CACHE_NAMES if n in names), None)


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``"cache"`` on transformers
    >= 5.25, ``"past_key_values"`` before (also when the signature hides it)."""
    return cache_param(model.forward) or "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{cache_kwarg(model): cache}``: splice into a ``model(...)`` call, e.g.
    ``model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))``."""
    return {cache_kwarg(model): cache}


def output_cache(output: Any) -> Any:
    """The cache a model output (or ``generate(..., return_dict_in_generate=True)``)
    returns: ``output.cache`` from transformers 5.25 (where ``.past_key_values`` warns),
    ``output.past_key_values`` before."""
    fields = getattr(output, "__dataclass_fields__", {})
    if "cache" in fields:
        return output.cache
    return output.past_key_values


def import_from_transformers(name: str, since: str, module: str = "transformers") -> Any:
    """``from <module> import <name>``, with an error that gives the real cause.

    A failed import is not always an old transformers: the name can exist and its import
    fail (transformers 5.25 imports Hugging Face's ``kernels`` package, which a folder named
    ``kernels`` on ``sys.path`` shadows). The message says which it is.

    Args:
        name: the attribute to import. since: the transformers version that introduced it.
        module: the module to import it from.

    Raises:
        RuntimeError: transformers is missing, older than ``since``, or its import of
            ``name`` failed (the original exception is chained and quoted).
    """
    try:
        import transformers
    except Exception as exc:
        raise RuntimeError(
            f"{name} needs transformers >= {since}, and importing transformers failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    installed = getattr(transformers, "__version__", "unknown")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        cause = f"{type(exc).__name__}: {exc}"
        if _older(installed, since):
            raise RuntimeError(
                f"{name} needs transformers >= {since}; installed: {installed} ({cause})"
            ) from exc
        hint = ""
        if "kernels" in str(exc):
            hint = (
                " A module named 'kernels' on sys.path may be shadowing Hugging Face's "
                "`kernels` package (e.g. a checkout's kernels/ folder with the checkout "
                "on sys.path)."
            )
        raise RuntimeError(
            f"importing {name} from {module} (transformers {installed}, which has it) "
            f"failed: {cause}.{hint}"
        ) from exc


def _older(installed: str, since: str) -> bool:
    """Whether version ``installed`` is older than ``since`` (False when unparsable)."""
    try:
        from packaging.version import Version

        return Version(installed) < Version(since)
    except Exception:  # an unparsable version: do not claim it is old
        return False

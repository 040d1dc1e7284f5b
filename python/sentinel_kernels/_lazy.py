"""Lazy package attributes (PEP 562): names imported on first use, so that ``import
sentinel_kernels`` (and ``sentinel-kernels --help``) pulls in no torch."""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["lazy_attribute", "lazy_dir"]


def lazy_attribute(
    package: str,
    namespace: dict[str, Any],
    submodules: Collection[str],
    attrs: Mapping[str, str],
    name: str,
) -> Any:
    """A package's ``__getattr__`` (PEP 562) for names imported on first use: the
    submodule ``name`` when it is one of ``submodules``, else ``name`` of the submodule
    ``attrs[name]``; stored in ``namespace`` (the package's globals) so that the next
    access is a plain lookup.

    Raises:
        AttributeError: ``name`` is neither, worded as Python's own.
    """
    if name in submodules:
        value = importlib.import_module(f".{name}", package)
    elif name in attrs:
        value = getattr(importlib.import_module(f".{attrs[name]}", package), name)
    else:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    namespace[name] = value
    return value


def lazy_dir(
    namespace: dict[str, Any], submodules: Collection[str], attrs: Mapping[str, str]
) -> list[str]:
    """A lazy package's ``__dir__``: its globals and the names it imports on first use."""
    return sorted(set(namespace) | set(submodules) | set(attrs))

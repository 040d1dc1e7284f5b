"""torch.profiler breakdowns of inference time and their exports.

``profile_model(model, input_ids, level=N, max_new_tokens=...)`` runs prefill and a greedy
decode loop under ``torch.profiler`` and groups the time into attention / linear /
kv_cache / sampling / other (:mod:`.breakdown`); :mod:`.export` writes JSON, CSV, Chrome
traces and a PNG chart; :mod:`.command` is the ``sentinel-kernels profile`` subcommand.

The names below are imported from their submodules on first use, so that the CLI can
import :mod:`.command` (to build its parser) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {"breakdown", "command", "export"}
# name -> submodule that defines it
_LAZY_ATTRS = {
    "CATEGORIES": "breakdown",
    "PHASES": "breakdown",
    "PhaseBreakdown": "breakdown",
    "ProfileResult": "breakdown",
    "classify_name": "breakdown",
    "profile_levels": "breakdown",
    "profile_model": "breakdown",
    "resolve_category": "breakdown",
    "export_all": "export",
    "format_table": "export",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_LAZY_ATTRS))


__all__ = sorted(_LAZY_ATTRS)

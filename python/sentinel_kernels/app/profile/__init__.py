"""torch.profiler breakdowns of inference time and their exports.

``profile_model(model, input_ids, level=N, max_new_tokens=...)`` runs prefill and a greedy
decode loop under ``torch.profiler`` and groups the time into attention / linear /
kv_cache / sampling / other (:mod:`.breakdown`); :mod:`.export` writes JSON, CSV, Chrome
traces and a PNG chart; :mod:`.command` is the ``sentinel-kernels profile`` subcommand.

The names below are imported from their submodules on first use, so that the CLI can
import :mod:`.command` (to build its parser) without importing torch.
"""

from __future__ import annotations

from typing import Any

from ..._lazy import lazy_attribute, lazy_dir

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
    return lazy_attribute(__name__, globals(), _SUBMODULES, _LAZY_ATTRS, name)


def __dir__() -> list[str]:
    return lazy_dir(globals(), _SUBMODULES, _LAZY_ATTRS)


__all__ = sorted(_LAZY_ATTRS)

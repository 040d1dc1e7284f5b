"""torch.profiler breakdowns of inference time and their exports.

``profile_model(model, input_ids, level=N, max_new_tokens=...)`` runs prefill and a greedy
decode loop under ``torch.profiler`` and groups the time into attention / linear /
kv_cache / sampling / other (:mod:`.breakdown`); :mod:`.export` writes JSON, CSV, Chrome
traces and a PNG chart; :mod:`.command` is the ``sentinel-kernels profile`` subcommand.
"""

from __future__ import annotations

from .breakdown import (
    CATEGORIES,
    PHASES,
    PhaseBreakdown,
    ProfileResult,
    classify_name,
    profile_levels,
    profile_model,
    resolve_category,
)
from .export import export_all, format_table

__all__ = [
    "CATEGORIES",
    "PHASES",
    "PhaseBreakdown",
    "ProfileResult",
    "classify_name",
    "export_all",
    "format_table",
    "profile_levels",
    "profile_model",
    "resolve_category",
]

"""Exports of :class:`~sentinel_kernels.app.profile.breakdown.ProfileResult` lists.

Into one output folder:

* ``profile.json``: everything (``{"meta": ..., "results": [ProfileResult.to_dict(), ...]}``);
* ``profile.csv``: one row per level x phase x category (:data:`CSV_HEADER`);
* ``trace_level{N}.json``: the Chrome trace of level ``N``'s profiled run
  (``torch.profiler.profile.export_chrome_trace``; open in ``chrome://tracing`` or
  Perfetto);
* ``profile.png``: stacked bars per level, one panel per phase (prefill: ms for the whole
  prompt; decode: ms per step), when matplotlib is installed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .breakdown import CATEGORIES, PHASES, ProfileResult

__all__ = [
    "CSV_HEADER",
    "export_all",
    "format_table",
    "has_matplotlib",
    "write_csv",
    "write_json",
    "write_png",
    "write_traces",
]

CSV_HEADER: tuple[str, ...] = (
    "level",
    "phase",
    "category",
    "ms",
    "percent",
    "phase_total_ms",
    "ms_per_step",
    "steps",
    "time_basis",
    "device",
    "dtype",
)

#: Bar colours per category (matplotlib's tab10 entries, fixed so charts compare).
_COLOURS = {
    "attention": "#1f77b4",
    "linear": "#ff7f0e",
    "kv_cache": "#2ca02c",
    "sampling": "#d62728",
    "knn": "#9467bd",
    "other": "#7f7f7f",
}


def _level_label(result: ProfileResult, results: Sequence[ProfileResult]) -> str:
    if len(results) > 1 and result.level == 0:
        return "level 0 (before)"
    if len(results) > 1 and result is results[-1]:
        return f"level {result.level} (after)"
    return f"level {result.level}"


def write_json(
    results: Sequence[ProfileResult], path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``{"meta": meta, "results": [r.to_dict() ...]}`` to ``path`` (indented)."""
    path = Path(path)
    doc = {"meta": dict(meta or {}), "results": [r.to_dict() for r in results]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_csv(results: Sequence[ProfileResult], path: str | Path) -> Path:
    """Write one row per level x phase x category (columns :data:`CSV_HEADER`; ms with
    microsecond resolution, percent of the phase total)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for r in results:
            for phase in PHASES:
                b = r.phases[phase]
                for cat in CATEGORIES:
                    ms = b.categories[cat]
                    writer.writerow(
                        [
                            r.level,
                            phase,
                            cat,
                            f"{ms:.3f}",
                            f"{b.percent(cat):.2f}",
                            f"{b.total_ms:.3f}",
                            f"{ms / b.steps:.4f}" if b.steps else "",
                            b.steps,
                            r.time_basis,
                            r.device,
                            r.dtype,
                        ]
                    )
    return path


def write_traces(results: Sequence[ProfileResult], out_dir: str | Path) -> list[Path]:
    """Write ``trace_level{N}.json`` (Chrome trace) for every result that still holds its
    profiler; returns the paths written."""
    out_dir = Path(out_dir)
    paths = []
    for r in results:
        if r.profiler is None:
            continue
        paths.append(r.export_chrome_trace(out_dir / f"trace_level{r.level}.json"))
    return paths


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported (the PNG chart needs it)."""
    try:
        import matplotlib  # noqa: F401
    except Exception:
        return False
    return True


def write_png(results: Sequence[ProfileResult], path: str | Path, title: str | None = None) -> Path:
    """Stacked bar chart: one panel per phase, one bar per level, one segment per category
    (prefill in ms for the whole prompt, decode in ms per step). Uses matplotlib's Agg
    canvas directly, so the global backend is left alone.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(4.0 + 1.6 * len(results), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PHASES), squeeze=False)[0]
    labels = [_level_label(r, results) for r in results]
    xs = list(range(len(results)))
    for ax, phase in zip(axes, PHASES, strict=True):
        bottoms = [0.0] * len(results)
        for cat in CATEGORIES:
            vals = []
            for r in results:
                b = r.phases[phase]
                ms = b.categories[cat]
                vals.append(ms / b.steps if phase == "decode" and b.steps else ms)
            ax.bar(xs, vals, bottom=bottoms, color=_COLOURS[cat], label=cat, width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        for x, top in zip(xs, bottoms, strict=True):
            ax.annotate(f"{top:.3g}", (x, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels, rotation=15, fontsize=8)
        basis = results[0].time_basis if results else "cpu"
        what = "device" if basis == "device" else "CPU"
        if phase == "decode":
            ax.set_ylabel(f"{what} ms per decode step")
        else:
            ax.set_ylabel(f"{what} ms (whole prompt)")
        ax.set_title(phase)
        ax.margins(y=0.12)
    handles, names = axes[-1].get_legend_handles_labels()
    # Reversed so the legend reads top-down like the stacks.
    fig.legend(handles[::-1], names[::-1], loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def format_table(results: Sequence[ProfileResult]) -> str:
    """A plain-text table: one row per level x phase; total ms, ms and % per category,
    and tokens/s of the timed run."""
    header = ["level", "phase", "total ms", *(f"{c} ms (%)" for c in CATEGORIES), "tok/s"]
    rows: list[list[str]] = []
    for r in results:
        for phase in PHASES:
            b = r.phases[phase]
            tps = r.prefill_tokens_per_s if phase == "prefill" else r.decode_tokens_per_s
            rows.append(
                [
                    str(r.level),
                    phase,
                    f"{b.total_ms:.2f}",
                    *(f"{b.categories[c]:.2f} ({b.percent(c):.0f}%)" for c in CATEGORIES),
                    f"{tps:.1f}" if tps is not None else "",
                ]
            )
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def export_all(
    results: Sequence[ProfileResult],
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write every export into ``out_dir`` (created if needed).

    Returns ``{"json": Path, "csv": Path, "traces": [Path, ...], "png": Path | None,
    "png_skipped": str | None}``; the PNG is skipped (with the reason) when matplotlib is
    missing, never an error.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {
        "json": write_json(results, out_dir / "profile.json", meta),
        "csv": write_csv(results, out_dir / "profile.csv"),
        "traces": write_traces(results, out_dir),
        "png": None,
        "png_skipped": None,
    }
    if has_matplotlib():
        written["png"] = write_png(results, out_dir / "profile.png", title=title)
    else:
        written["png_skipped"] = (
            "matplotlib is not installed: profile.png was not written (pip install matplotlib)"
        )
    return written

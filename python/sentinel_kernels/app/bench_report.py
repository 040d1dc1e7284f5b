"""Turn a pytest-benchmark JSON file into a markdown table and a speedup chart.

Usage::

    python -m sentinel_kernels.app.bench_report RUN.json [--out DIR] [--stem NAME | --suite SUITE]

The table (printed and written to ``DIR/NAME.md``, default ``report.md``) has one row per
benchmark, grouped by pytest-benchmark ``group``: median time, effective bandwidth (when the
benchmark stored ``bytes`` in ``extra_info``), speedup over the group's baseline and the
fraction of the group's device-copy bandwidth. ``DIR/NAME.png`` is a bar chart of the
speedups (and of the copy fractions, when there are any). With ``--suite quantize`` the
outputs follow the ``bench/results/`` convention, ``<date>_<device-slug>_<suite>``, and the
JSON is copied beside them under that name.

Roles within a group are read from ``extra_info["role"]`` (``baseline``, ``copy``,
``candidate``) as written by the ``bench/`` suites; without it the entry named
``eager-torch`` is the baseline and ``device-copy`` the copy. Entry names are
``extra_info["impl"]``, else the test's parameter id, else the benchmark name.
Missing fields never raise: the cell shows ``-``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE_NAMES = ("eager-torch", "eager")
COPY_NAMES = ("device-copy", "copy")

__all__ = [
    "Entry",
    "Group",
    "conventional_stem",
    "group_entries",
    "load",
    "main",
    "render_markdown",
    "write_png",
]


@dataclass
class Entry:
    """One benchmark of the JSON file, with the numbers the report derives from it."""

    group: str
    name: str
    role: str
    median_s: float | None
    nbytes: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    speedup: float | None = None  # baseline median / this median
    copy_fraction: float | None = None  # this GB/s / copy GB/s

    @property
    def gbps(self) -> float | None:
        """Effective bandwidth in GB/s (1e9 bytes/s): bytes / median, else stored ``gbps``."""
        if self.nbytes and self.median_s:
            return self.nbytes / self.median_s / 1e9
        stored = self.extra.get("gbps")
        return float(stored) if isinstance(stored, (int, float)) else None


@dataclass
class Group:
    """The entries of one pytest-benchmark group and its reference entries."""

    name: str
    entries: list[Entry]
    baseline: Entry | None = None
    copy: Entry | None = None


def _num(value: Any) -> float | None:
    """``value`` as a positive finite float, else None."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out > 0 and out != float("inf") else None


def _entry(bench: dict[str, Any]) -> Entry:
    extra = bench.get("extra_info") or {}
    if not isinstance(extra, dict):
        extra = {}
    stats = bench.get("stats") or {}
    name = extra.get("impl") or bench.get("param") or bench.get("name") or "?"
    name = str(name)
    role = str(extra.get("role") or "")
    if not role:
        if name in BASELINE_NAMES:
            role = "baseline"
        elif name in COPY_NAMES:
            role = "copy"
        else:
            role = "candidate"
    median = _num(stats.get("median")) if isinstance(stats, dict) else None
    if median is None:
        median = _num(extra.get("median_s"))
    return Entry(
        group=str(bench.get("group") or "(no group)"),
        name=name,
        role=role,
        median_s=median,
        nbytes=_num(extra.get("bytes")),
        extra=extra,
    )


def load(path: str | Path) -> dict[str, Any]:
    """Read a pytest-benchmark JSON file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a pytest-benchmark JSON object")
    return data


def group_entries(data: dict[str, Any]) -> list[Group]:
    """Group the benchmarks of ``data`` and compute speedups and copy fractions.

    Groups keep the order in which they first appear in the file; inside a group the
    baseline comes first, then the candidates, then the copy.
    """
    groups: dict[str, Group] = {}
    for bench in data.get("benchmarks") or []:
        if not isinstance(bench, dict):
            continue
        entry = _entry(bench)
        groups.setdefault(entry.group, Group(entry.group, [])).entries.append(entry)
    order = {"baseline": 0, "candidate": 1, "copy": 2}
    for grp in groups.values():
        grp.entries.sort(key=lambda e: order.get(e.role, 1))
        grp.baseline = next((e for e in grp.entries if e.role == "baseline"), None)
        grp.copy = next((e for e in grp.entries if e.role == "copy"), None)
        base_t = grp.baseline.median_s if grp.baseline else None
        copy_bw = grp.copy.gbps if grp.copy else None
        for e in grp.entries:
            if base_t and e.median_s:
                e.speedup = base_t / e.median_s
            if copy_bw and e.gbps:
                e.copy_fraction = e.gbps / copy_bw
    return list(groups.values())


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _header(data: dict[str, Any], source: str) -> list[str]:
    mi = data.get("machine_info") or {}
    ci = data.get("commit_info") or {}
    si = mi.get("sentinel") or {}
    cpu = mi.get("cpu") or {}
    if not isinstance(si, dict):
        si = {}
    if not isinstance(cpu, dict):
        cpu = {}
    facts = [
        ("source", source),
        ("date", si.get("date") or data.get("datetime")),
        ("device", si.get("cuda_device")),
        ("cpu", si.get("cpu_model") or cpu.get("brand_raw")),
        ("cpu count", si.get("cpu_count") or cpu.get("count")),
        ("torch threads", si.get("torch_threads")),
        ("SIMD level (_C)", si.get("simd_level")),
        ("host", mi.get("node")),
        ("python", mi.get("python_version")),
        ("torch", si.get("torch")),
        ("CUDA (torch)", si.get("torch_cuda")),
        ("triton", si.get("triton")),
        ("transformers", si.get("transformers")),
        ("sentinel-kernels", si.get("sentinel_kernels")),
        ("pytest-benchmark", data.get("version")),
    ]
    if ci:
        commit = str(ci.get("id") or "?")
        if ci.get("dirty"):
            commit += " (dirty)"
        if ci.get("branch"):
            commit += f" on {ci.get('branch')}"
        facts.append(("commit", commit))
    lines = ["# Benchmark report", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts if v not in (None, "")]
    return lines


def render_markdown(data: dict[str, Any], groups: Sequence[Group], source: str = "") -> str:
    """The markdown report: machine header, one table row per benchmark, and notes."""
    lines = _header(data, source)
    with_do_bench = any(_num(e.extra.get("do_bench_median_s")) for g in groups for e in g.entries)
    head = ["group", "name", "backend", "median", "GB/s", "speedup vs baseline", "% of copy GB/s"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---:"]
    if with_do_bench:
        head.append("do_bench median")
        align.append("---:")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for grp in groups:
        for e in grp.entries:
            name = f"**{e.name}**" if e.role == "candidate" else e.name
            if e.role == "baseline":
                name += " (baseline)"
            pct = None if e.copy_fraction is None else 100 * e.copy_fraction
            cells = [
                grp.name,
                name,
                str(e.extra.get("backend", "-")),
                _fmt_time(e.median_s),
                _fmt(e.gbps, ".1f"),
                _fmt(e.speedup, ".2f", "x"),
                _fmt(pct, ".1f", "%"),
            ]
            if with_do_bench:
                cells.append(_fmt_time(_num(e.extra.get("do_bench_median_s"))))
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Median is pytest-benchmark's per-call median. GB/s = bytes the op must read and "
        "write (`extra_info.bytes`) / median, in 1e9 bytes/s; the eager baseline is charged "
        "the same bytes as the op. Speedup = baseline median / this median. % of copy = this "
        "GB/s / the group's device-copy GB/s."
        + (
            " do_bench median: `triton.testing.do_bench(return_mode='median')` (CUDA events, "
            "L2 flushed between calls), a cross-check of the median."
            if with_do_bench
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def write_png(groups: Sequence[Group], path: str | Path, title: str = "") -> Path | None:
    """Bar chart of speedup vs baseline (and % of copy bandwidth) per group.

    Returns the path written, or None when there is nothing to plot.
    """
    rows = [(g.name, e) for g in groups for e in g.entries if e.role != "baseline"]
    speed = [(f"{g}\n{e.name}", e.speedup, e.role) for g, e in rows if e.speedup is not None]
    copy = [
        (f"{g}\n{e.name}", 100 * e.copy_fraction, e.role)
        for g, e in rows
        if e.copy_fraction is not None and e.role != "copy"
    ]
    if not speed and not copy:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(speed, "speedup vs eager baseline (x)", 1.0), (copy, "% of device-copy GB/s", 100)]
    panels = [p for p in panels if p[0]]
    height = max(2.5, 0.45 * max(len(p[0]) for p in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), height), squeeze=False)
    for ax, (items, xlabel, ref) in zip(axes[0], panels, strict=True):
        labels = [lab for lab, _, _ in items]
        values = [v for _, v, _ in items]
        colors = ["tab:gray" if role == "copy" else "tab:blue" for _, _, role in items]
        ypos = list(range(len(items)))[::-1]
        bars = ax.barh(ypos, values, color=colors)
        ax.set_yticks(ypos, labels, fontsize=7)
        ax.axvline(ref, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.margins(x=0.15)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(data: dict[str, Any]) -> str:
    si = (data.get("machine_info") or {}).get("sentinel") or {}
    if not isinstance(si, dict):
        return ""
    parts = [si.get("cuda_device") or si.get("cpu_model"), si.get("date")]
    if si.get("torch"):
        parts.append(f"torch {si['torch']}")
    return " | ".join(str(p) for p in parts if p)


def conventional_stem(data: dict[str, Any], suite: str) -> str:
    """``<date>_<device-slug>_<suite>``, the ``bench/results/`` file stem for a run.

    The date is the run's (UTC, ``YYYY-MM-DD``); the slug is the CUDA device name in lower
    case with dashes (``nvidia-h200``), else ``cpu-<N>core``.
    """
    mi = data.get("machine_info") or {}
    raw = mi.get("sentinel")
    si: dict[str, Any] = raw if isinstance(raw, dict) else {}
    date = str(si.get("date") or data.get("datetime") or "undated")[:10]
    if si.get("cuda_device"):
        slug = str(si["cuda_device"])
    else:
        raw = mi.get("cpu")
        cpu: dict[str, Any] = raw if isinstance(raw, dict) else {}
        count = si.get("cpu_count") or cpu.get("count")
        slug = f"cpu-{count}core" if count else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-") or "unknown"
    suite = re.sub(r"[^A-Za-z0-9_.-]+", "-", suite).strip("-") or "bench"
    return f"{date}_{slug}_{suite}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sentinel_kernels.app.bench_report",
        description="Markdown table and PNG chart from a pytest-benchmark JSON file.",
    )
    parser.add_argument("json_file", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", type=Path, default=Path("."), help="output folder (default .)")
    parser.add_argument("--stem", default=None, help="output file stem (default report)")
    parser.add_argument(
        "--suite",
        default=None,
        help="name the outputs <date>_<device-slug>_<suite>.{md,png} (bench/results "
        "convention) and copy the JSON beside them under the same stem",
    )
    parser.add_argument("--no-png", action="store_true", help="skip the chart")
    args = parser.parse_args(argv)

    try:
        data = load(args.json_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stem = args.stem or (conventional_stem(data, args.suite) if args.suite else "report")
    groups = group_entries(data)
    text = render_markdown(data, groups, source=args.json_file.name)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    md_path = args.out / f"{stem}.md"
    png_path = args.out / f"{stem}.png"
    written = [md_path]
    if not args.no_png and write_png(groups, png_path, title=_title(data)):
        text += f"\n![speedup]({png_path.name})\n"
        written.append(png_path)
    md_path.write_text(text, encoding="utf-8")
    if args.suite:
        json_path = args.out / f"{stem}.json"
        if json_path.resolve() != args.json_file.resolve():
            shutil.copyfile(args.json_file, json_path)
            written.append(json_path)
    print("wrote " + " and ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

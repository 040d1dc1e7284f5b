"""Markdown report of ``scripts/serve_compare.sh``: our server against the peer.

Usage::

    python scripts/serve_compare_report.py OUT/serve_compare.json [MORE.json ...] [--png chart.png]

Several files (one plan split over device calls on one held machine) are merged when
their device, commit, versions and settings agree.

Reads the combined JSON the script writes and prints (stdout) one table of every run
(output-token throughput, p50/p99 TTFT, p50 TPOT, p50 ITL, completed/sent) and, per level of
our server, the issue-17 targets against the peer measured in the same file:

* rate inf: ours / peer output-token throughput >= 10;
* every rate: peer p50 TTFT / ours p50 TTFT >= 5 (ours at most 1/5 of the peer's);
* rate 4 per second: ours p50 TPOT <= 2 ms.

A target whose run is missing (skipped, failed) reads "n/a"; a run with failed requests is
flagged, since its latency statistics cover only the completed requests. Exit status 0
(the report is informational); 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

#: Issue 17's targets.
THROUGHPUT_RATIO = 10.0
TTFT_RATIO = 5.0
TPOT_MS_AT_4 = 2.0


def _rate_key(rate: str) -> float:
    """Sort order of a rate label: numbers ascending, ``inf`` last."""
    try:
        return float(rate)
    except ValueError:
        return math.inf


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _stat(summary: dict[str, Any] | None, metric: str, stat: str = "median") -> float | None:
    """``summary[metric][stat]`` (``summary["output_throughput"]`` for that metric), or
    ``None`` when the run is missing or completed no request."""
    if not summary or not summary.get("completed"):
        return None
    value = summary.get(metric) if metric == "output_throughput" else summary[metric].get(stat)
    return None if value is None else float(value)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:,.2f}x"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _variant(r: dict[str, Any]) -> str:
    """What kind of our server a run used: ``oursN`` (engine in the server's process),
    ``oursNp`` (``--engine-process``) or ``oursNwK`` (``--http-workers K``), each with an
    optional ``fM`` (``--max-prefill-forwards M``)."""
    key, _, forwards = str(r["key"]).partition("f")
    extra = f", {forwards} prefill forwards a step" if forwards else ""
    if key[5:6] == "p":
        return "engine process" + extra
    if key[5:6] == "w":
        return f"{key[6:]} HTTP workers" + extra
    return "one process" + extra


def render(doc: dict[str, Any], peer_key: str = "peer") -> str:
    """The markdown report of a ``serve_compare.json`` document ``doc``."""
    runs = doc.get("runs", [])
    lines = [
        f"# Serving: our server vs transformers serve ({doc.get('device', '?')})",
        "",
        f"commit {doc.get('git_commit', '?')}, {doc.get('date', '?')}; versions: "
        + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items() if v),
        "",
    ]
    st = doc.get("settings", {})
    if st:
        lines += [
            f"{st.get('num_prompts')} requests per run ({st.get('endpoint')} endpoint, synthetic "
            f"prompts of {st.get('input_len')} words, max_tokens {st.get('output_len')}, "
            f"EOS ignored, greedy); our server: max batch {st.get('max_batch')}, "
            f"result cache off.",
            "",
        ]
    lines += [
        "| server | level | rate (req/s) | completed / sent | output tok/s | TTFT p50 ms "
        "| TTFT p99 ms | TPOT p50 ms | ITL p50 ms | to headers p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(
        runs,
        key=lambda r: (
            r["key"] == peer_key,
            r.get("level") or 0,
            str(r["key"]),
            _rate_key(r["rate"]),
        ),
    )
    for r in ordered:
        s = r.get("summary")
        name = (
            "transformers serve (CB)"
            if r["key"] == peer_key
            else f"sentinel-kernels serve ({_variant(r)})"
        )
        level = "-" if r.get("level") is None else str(r["level"])
        if not s:
            lines.append(
                f"| {name} | {level} | {r['rate']} | no results (exit {r.get('exit')}) "
                "| | | | | | |"
            )
            continue
        done = f"{s['completed']} / {s['num_requests']}"
        if s.get("failed"):
            done += " (" + ", ".join(f"{k}: {v}" for k, v in s["failures"].items()) + ")"
        lines.append(
            f"| {name} | {level} | {r['rate']} | {done} | {_fmt(s['output_throughput'])} | "
            f"{_fmt(s['ttft']['median'], 2)} | {_fmt(s['ttft']['p99'], 2)} | "
            f"{_fmt(s['tpot']['median'], 3)} | {_fmt(s['itl']['median'], 3)} | "
            f"{_fmt((s.get('headers') or {}).get('median'), 2)} |"
        )
    for sk in doc.get("skipped", []):
        lines.append(f"\nSkipped: {sk['server']} at rate {sk['rate']} ({sk['reason']}).")

    peer = {r["rate"]: r.get("summary") for r in runs if r["key"] == peer_key}
    variants = sorted(
        {
            (r["level"], str(r["key"]), _variant(r))
            for r in runs
            if r["key"] != peer_key and r.get("level") is not None
        }
    )
    for level, key, variant in variants:
        ours = {r["rate"]: r.get("summary") for r in runs if r["key"] == key}
        lines += [
            "",
            f"## Targets, level {level}, {variant} (ratios against the peer in this file)",
            "",
            "| target | ours | peer | ratio | result |",
            "|---|---:|---:|---:|---|",
        ]
        o, p = (
            _stat(ours.get("inf"), "output_throughput"),
            _stat(peer.get("inf"), "output_throughput"),
        )
        ratio = o / p if o is not None and p else None
        ok = None if ratio is None else ratio >= THROUGHPUT_RATIO
        lines.append(
            f"| rate inf: output tok/s, ours/peer >= {THROUGHPUT_RATIO:g} | {_fmt(o)} | "
            f"{_fmt(p)} | {_times(ratio)} | {_verdict(ok)} |"
        )
        for rate in sorted(set(ours) | set(peer), key=_rate_key):
            o = _stat(ours.get(rate), "ttft", "median")
            p = _stat(peer.get(rate), "ttft", "median")
            ratio = p / o if o and p is not None else None
            ok = None if ratio is None else ratio >= TTFT_RATIO
            lines.append(
                f"| rate {rate}: p50 TTFT ms, peer/ours >= {TTFT_RATIO:g} | {_fmt(o, 2)} | "
                f"{_fmt(p, 2)} | {_times(ratio)} | {_verdict(ok)} |"
            )
        o = _stat(ours.get("4"), "tpot", "median")
        p = _stat(peer.get("4"), "tpot", "median")
        ok = None if o is None else o <= TPOT_MS_AT_4
        lines.append(
            f"| rate 4: p50 TPOT ms <= {TPOT_MS_AT_4:g} | {_fmt(o, 3)} | {_fmt(p, 3)} | - | "
            f"{_verdict(ok)} |"
        )
        flagged = [rate for rate, s in ours.items() if s and s.get("failed")] + [
            f"peer {rate}" for rate, s in peer.items() if s and s.get("failed")
        ]
        if flagged:
            lines.append(
                f"\nRuns with failed requests (statistics of the completed ones only): "
                f"{', '.join(flagged)}."
            )
    return "\n".join(lines) + "\n"


def write_png(doc: dict[str, Any], path: Path, peer_key: str = "peer") -> None:
    """A chart of ``doc``: output-token throughput and p50 TTFT per request rate, one bar
    per server (our levels and the peer), log scales (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc.get("runs", []) if r.get("summary") and r["summary"].get("completed")]
    rates = sorted({r["rate"] for r in runs}, key=_rate_key)
    series: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        label = (
            "transformers serve"
            if r["key"] == peer_key
            else f"ours, level {r['level']}"
            + ("" if _variant(r) == "one process" else f", {_variant(r)}")
        )
        series.setdefault(label, {})[r["rate"]] = r["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        width = 0.8 / max(1, len(series))
        panels = (
            ("output tokens/s", lambda s: s["output_throughput"]),
            ("p50 TTFT (ms)", lambda s: s["ttft"]["median"]),
        )
        for ax, (title, value) in zip(axes, panels, strict=True):
            for j, (label, by_rate) in enumerate(sorted(series.items())):
                xs = [i + (j - (len(series) - 1) / 2) * width for i, rate in enumerate(rates)]
                ys = [value(by_rate[rate]) if rate in by_rate else 0.0 for rate in rates]
                ax.bar(xs, ys, width, label=label)
            ax.set_xticks(range(len(rates)))
            ax.set_xticklabels([f"{rate}/s" if rate != "inf" else "inf" for rate in rates])
            ax.set_xlabel("request rate")
            ax.set_yscale("log")
            ax.set_title(title)
            ax.legend()
        fig.suptitle(f"bench-serve, {doc.get('device', '?')} ({doc.get('git_commit', '?')})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


#: Settings that may differ between the calls of one merged report (what ran, for how long).
_PER_CALL_SETTINGS = ("plan", "budget_s", "notes")


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One document of several ``serve_compare.json`` files, for a plan split over device
    calls on one held machine: the runs of all of them in order (a later run of the same
    server and rate is what the targets read). Raises ``ValueError`` unless every file has
    the same device, commit, versions and settings (apart from the plan and budget)."""
    if len(docs) == 1:
        return docs[0]
    first = docs[0]

    def fixed(doc: dict[str, Any]) -> tuple[Any, ...]:
        st = {k: v for k, v in doc.get("settings", {}).items() if k not in _PER_CALL_SETTINGS}
        return doc.get("device"), doc.get("git_commit"), doc.get("versions"), st

    for i, doc in enumerate(docs[1:], start=2):
        if fixed(doc) != fixed(first):
            raise ValueError(
                f"file {i} differs from file 1 in device, commit, versions or settings; "
                "only calls of one configuration can share a report"
            )
    merged = dict(first)
    merged["date"] = " + ".join(str(d.get("date", "?")) for d in docs)
    merged["settings"] = dict(first.get("settings", {}))
    merged["settings"]["plan"] = " | ".join(str(d["settings"].get("plan")) for d in docs)
    for key in ("runs", "startups", "skipped"):
        merged[key] = [item for d in docs for item in d.get(key, [])]
    return merged


def main(argv: list[str] | None = None) -> int:
    """Print the report of the file(s) named on the command line (several: merged, see
    :func:`merge`); 2 when one cannot be read or they do not belong together."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json",
        type=Path,
        nargs="+",
        help="serve_compare.json written by serve_compare.sh (several: calls of one plan)",
    )
    parser.add_argument("--peer-key", default="peer", help="the peer's key in the runs (peer)")
    parser.add_argument("--png", type=Path, help="also write a chart (throughput, p50 TTFT)")
    args = parser.parse_args(argv)
    docs = []
    for path in args.json:
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"serve_compare_report: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    try:
        doc = merge(docs)
    except ValueError as exc:
        print(f"serve_compare_report: {exc}", file=sys.stderr)
        return 2
    print(render(doc, args.peer_key), end="")
    if args.png:
        write_png(doc, args.png, args.peer_key)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

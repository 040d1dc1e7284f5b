"""What Triton's autotuner measured: every candidate's time, per kernel and tuning key.

Reads the autotune choices of a GPU model (``.gpu/autotune_<GPU>.tgz``, as
``scripts/gpu_autotune_cache.sh save`` writes them, or a Triton cache folder). Every
``*.autotune.json`` there holds the key it was tuned for and the timings of *all* its
candidates (``cache_results=True``, ``kernels/_autotune.py``), so the question "is the
pick bad, or is every candidate slow?" needs no GPU. Per key: the number of candidates,
the best / median / worst median time, the best config, and ``flat`` where the median
candidate lies within ``--flat`` of the best (a spread that small, at a time far above the same
shape's other row buckets, points at a disturbed measurement, not at the kernel).

    python scripts/autotune_report.py .gpu/autotune_NVIDIA_H100_80GB_HBM3.tgz \\
        --kernel _w8a16_gemm_kernel --json out.json

``--clean OUT.tgz`` (archive input only) writes the archive without the keys marked
``suspect``: flat, and with a best time over ``--slow`` times the best of the same kernel
and key at another row bucket (the key's first element). The next process then tunes
those keys again instead of keeping an arbitrary pick.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def entries(source: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kernel name, autotune record) for every ``*.autotune.json`` in an archive or folder."""
    suffix = ".autotune.json"
    if source.is_dir():
        for path in sorted(source.rglob(f"*{suffix}")):
            yield path.name[: -len(suffix)], json.loads(path.read_text())
        return
    with tarfile.open(source) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if not (member.isfile() and name.endswith(suffix)):
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                yield name[: -len(suffix)], json.loads(handle.read())


def summarize(record: dict[str, Any], flat: float) -> dict[str, Any] | None:
    """Best / median / worst of one key's candidates (the middle of each candidate's
    timing triple, in us), or None for a record without timings."""
    timed = record.get("configs_timings")
    if not timed:
        return None
    # Triton stores each candidate's do_bench quantiles: [median, low, high] in ms
    rows = sorted(((t[0] * 1000.0, c) for c, t in timed), key=lambda r: r[0])
    times = [t for t, _ in rows]
    best_cfg = rows[0][1]
    return {
        "key": record["key"],
        "candidates": len(rows),
        "best_us": round(times[0], 2),
        "median_us": round(statistics.median(times), 2),
        "worst_us": round(times[-1], 2),
        "flat": len(rows) > 1 and statistics.median(times) <= times[0] * (1.0 + flat),
        "best": {
            **best_cfg.get("kwargs", {}),
            "num_warps": best_cfg.get("num_warps"),
            "num_stages": best_cfg.get("num_stages"),
        },
    }


#: Kernels whose autotune key starts with the row bucket (``M_BUCKET``, kernels/int8_matmul.py):
#: only there do keys that differ in their first element time the same weights. (The
#: GEMV's key starts with N: a flat 100 us there is a 262 MB LM head read at full bandwidth.)
ROW_BUCKET_KERNELS = frozenset({"_w8a16_gemm_kernel", "_w8a8_gemm_kernel"})


def mark_suspects(rows: list[dict[str, Any]], slow: float) -> None:
    """Set ``suspect`` on each row of a :data:`ROW_BUCKET_KERNELS` kernel: flat, and slower
    than ``slow`` times the best of the rows of the same kernel whose keys differ only in
    their row bucket (the same weights, other row counts)."""
    best_elsewhere: dict[tuple[str, str], list[tuple[Any, float]]] = {}
    for r in rows:
        rest = json.dumps(r["key"][1:])
        best_elsewhere.setdefault((r["kernel"], rest), []).append((r["key"][0], r["best_us"]))
    for r in rows:
        others = [
            t
            for m, t in best_elsewhere[(r["kernel"], json.dumps(r["key"][1:]))]
            if m != r["key"][0]
        ]
        r["suspect"] = bool(
            r["kernel"] in ROW_BUCKET_KERNELS
            and r["flat"]
            and others
            and r["best_us"] > slow * min(others)
        )


def write_clean(source: Path, out: Path, suspects: set[str]) -> int:
    """Copy archive ``source`` to ``out`` without the members whose JSON key (as text) is
    in ``suspects``; returns how many were left out."""
    dropped = 0
    with tarfile.open(source) as tar, tarfile.open(out, "w:gz") as dst:
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            data = handle.read() if handle is not None else None
            if data is not None and member.name.endswith(".autotune.json"):
                record = json.loads(data)
                kernel = Path(member.name).name[: -len(".autotune.json")]
                if f"{kernel}:{json.dumps(record.get('key'))}" in suspects:
                    dropped += 1
                    continue
            if data is None:
                dst.addfile(member)
            else:
                dst.addfile(member, io.BytesIO(data))
    return dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", type=Path, help="an autotune archive (.tgz) or a Triton cache folder")
    ap.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    ap.add_argument("--flat", type=float, default=0.15, help="relative spread counted as flat")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--slow", type=float, default=2.0, help="suspect: best over this x other buckets'"
    )
    ap.add_argument("--clean", type=Path, help="write the archive without the suspect keys here")
    args = ap.parse_args()
    if not args.source.exists():
        raise SystemExit(f"autotune_report: {args.source} does not exist")
    rows: list[dict[str, Any]] = []
    for kernel, record in entries(args.source):
        if args.kernel and kernel not in args.kernel:
            continue
        row = summarize(record, args.flat)
        if row is not None:
            rows.append({"kernel": kernel, **row})
    rows.sort(key=lambda r: (r["kernel"], [str(k) for k in r["key"]]))
    mark_suspects(rows, args.slow)
    for r in rows:
        key = ", ".join(str(k) for k in r["key"][:6])
        print(
            f"{r['kernel'][:24]:24s} [{key}] n={r['candidates']:2d} "
            f"best {r['best_us']:8.1f} us  median {r['median_us']:8.1f}  worst {r['worst_us']:8.1f}"
            f"{'  flat' if r['flat'] else ''}{'  suspect' if r['suspect'] else ''}"
        )
    print(f"{len(rows)} keys, {sum(r['suspect'] for r in rows)} suspect")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.clean:
        if args.source.is_dir():
            raise SystemExit("autotune_report: --clean needs an archive as its source")
        if args.kernel:
            raise SystemExit("autotune_report: --clean looks at every kernel; drop --kernel")
        suspects = {f"{r['kernel']}:{json.dumps(r['key'])}" for r in rows if r["suspect"]}
        print(f"wrote {args.clean}, {write_clean(args.source, args.clean, suspects)} keys left out")


if __name__ == "__main__":
    main()

"""How much CPU does one ``bench-serve`` client process spend per streamed chunk? (issue
17: at rate inf our server streams ~50k chunks/s on an H100, and the client's TTFT was
~10x the engine's own.)

Runs ``sentinel-kernels bench-serve`` (in this process, one client process) against the
tests' fake OpenAI server (``tests/app/test_bench_serve.py``: uvicorn in a thread, each
request streams ``--tokens`` chunks 1 ms apart) for two request counts and reads the
client thread's CPU time (``time.thread_time``) around each run. The difference between
the two runs over the difference in chunks is the client's CPU per chunk (the fixed costs:
start-up, summary, chart, cancel out). At that cost, a client process can read at most
``1 / cost`` chunks a second.

    PYTHONPATH=. python scripts/bench_serve_client_cost.py [--requests 50 200] [--tokens 64]
        [--repeat 1] [--client-src OLD_bench_serve.py] [--out FILE]

``--client-src FILE`` also measures another version of ``app/bench_serve.py`` (e.g.
``git show REV:python/sentinel_kernels/app/bench_serve.py > old.py``), alternating with
the installed one ``--repeat`` times; each variant reports the median per-chunk cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _load_variant(path: Path) -> Any:
    """``path`` as a module of the ``sentinel_kernels.app`` package (its relative imports
    resolve there), beside the installed ``bench_serve``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sentinel_kernels.app._client_variant", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _measure(client: Any, fake: Any, requests: list[int], tokens: int) -> dict[str, Any]:
    """Client CPU of two runs of ``client.run`` and the per-chunk difference."""
    rows = []
    for n in requests:
        with fake.fake_server() as (url, _state):
            out = Path(tempfile.mkdtemp())
            run_args = fake._args(url, out, "--num-prompts", str(n))
            run_args.output_len = tokens
            c0, w0 = time.thread_time(), time.perf_counter()
            assert client.run(run_args) == 0
            cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        rows.append({"requests": n, "chunks": n * tokens, "client_cpu_s": cpu, "wall_s": wall})
    (a, b) = rows
    per_chunk = (b["client_cpu_s"] - a["client_cpu_s"]) / (b["chunks"] - a["chunks"])
    return {"rows": rows, "client_cpu_us_per_chunk": per_chunk * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, nargs=2, default=[50, 200])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--client-src", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "app"))
    import test_bench_serve as fake  # the fake server of the tests

    from sentinel_kernels.app import bench_serve

    fake.K, fake.DELAY = args.tokens, 0.001
    variants: dict[str, Any] = {"installed": bench_serve}
    if args.client_src is not None:
        variants[str(args.client_src)] = _load_variant(args.client_src)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, client in variants.items():
            m = _measure(client, fake, args.requests, args.tokens)
            runs[name].append(m)
            for r in m["rows"]:
                print(
                    f"{name}: {r['requests']} requests, {r['chunks']} chunks: "
                    f"client CPU {r['client_cpu_s']:.2f} s"
                )
    record: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "variants": {},
    }
    for name, ms in runs.items():
        costs = sorted(m["client_cpu_us_per_chunk"] for m in ms)
        med = statistics.median(costs)
        record["variants"][name] = {
            "runs": ms,
            "client_cpu_us_per_chunk_median": med,
            "max_chunks_per_s_one_process": 1e6 / med,
        }
        print(
            f"{name}: client CPU per chunk {med:.1f} us (median of {len(costs)}): one client "
            f"process reads at most {1e6 / med:,.0f} chunks/s"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

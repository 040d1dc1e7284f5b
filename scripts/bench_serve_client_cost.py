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
        [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, nargs=2, default=[50, 200])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "app"))
    import test_bench_serve as fake  # the fake server of the tests

    from sentinel_kernels.app import bench_serve

    fake.K, fake.DELAY = args.tokens, 0.001
    rows = []
    for n in args.requests:
        with fake.fake_server() as (url, _state):
            out = Path(tempfile.mkdtemp())
            run_args = fake._args(url, out, "--num-prompts", str(n))
            run_args.output_len = args.tokens
            c0, w0 = time.thread_time(), time.perf_counter()
            assert bench_serve.run(run_args) == 0
            cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        rows.append({"requests": n, "chunks": n * args.tokens, "client_cpu_s": cpu, "wall_s": wall})
    (a, b) = rows
    per_chunk = (b["client_cpu_s"] - a["client_cpu_s"]) / (b["chunks"] - a["chunks"])
    record = {
        "rows": rows,
        "client_cpu_us_per_chunk": per_chunk * 1e6,
        "max_chunks_per_s_one_process": 1 / per_chunk,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    for r in rows:
        cpu = r["client_cpu_s"]
        print(f"{r['requests']} requests, {r['chunks']} chunks: client CPU {cpu:.2f} s")
    print(
        f"client CPU per chunk {per_chunk * 1e6:.1f} us: one client process reads at most "
        f"{1 / per_chunk:,.0f} chunks/s"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

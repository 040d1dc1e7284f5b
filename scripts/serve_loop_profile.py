"""Where does the server's event loop spend its CPU, per request and per streamed chunk?
(issue 17: at request rate inf the engine's own p50 TTFT is 24 ms, the client's 1.5-2 s;
one asyncio loop parses, templates and tokenizes every request and writes every SSE
chunk of every running stream.)

The real server (:func:`sentinel_kernels.serve.server.create_app` under uvicorn with h11
and the plain asyncio loop, the logging and thread switch interval of ``sentinel-kernels
serve``) on 127.0.0.1, a free port, in this process. The model is a tiny random Llama
(hidden 16, one layer) with SmolLM2's vocabulary, behind SmolLM2-135M-Instruct's real
tokenizer and chat template (from its GGUF): the HTTP side pays what it pays with SmolLM2
(template, BPE encoding of a ~230-token chat prompt, byte-level detokenization), while the
engine, which on a 2-core CPU would take minutes to prefill 200 such prompts with
SmolLM2 itself, stays cheap. The load is ``sentinel-kernels bench-serve`` in a child
process: ``--num-prompts`` streaming chat requests posted at once (``--request-rate
inf``), ``--input-len`` words, EOS ignored, ``stream_options.include_usage``.

Each pass (after a warm-up of a few requests) reads the loop thread's CPU time
(``time.thread_time``, inside the loop) before and after the load; the client reports
TTFT. One round is two plain passes that differ only in ``max_tokens`` (``--output-len``
and 1); ``cpu = requests * per_request + chunks * per_chunk`` over the two gives

* ``per_request_ms``: everything a request costs the loop whatever its length (HTTP
  parsing, middleware and routing, body parsing and validation, chat template and
  tokenization, ``Engine.submit``, the response headers, the role, finish and usage
  chunks and ``[DONE]``, metrics and log line);
* ``per_chunk_us``: one more content chunk (wake-up, detokenization, chunk JSON, the
  send through starlette, uvicorn and h11 to the socket).

chunks are the content chunks the client received. A last pass runs under ``cProfile`` of
the loop thread only, with ``time.thread_time`` as its clock (waiting for the GIL held by
the engine thread is not counted), for the split by function: its absolute times are
inflated several times by the profiler (most in code of many small calls), so only its
shares and the list of functions are reported: ``request`` (uvicorn's ``run_asgi``, the
ASGI call but the stream, plus h11's ``data_received``), ``stream`` (starlette's
``StreamingResponse.stream_response``, which runs in a task of its own) and ``other``
(selector, task scheduling, wake-ups). It needs Python 3.11 (from 3.12 on cProfile sees
every thread). The client's TTFT on this CPU is set mostly by the engine's prefill, not by
the loop.

``--serve-src DIR`` loads the ``sentinel_kernels.serve`` package from DIR instead (e.g.
an older commit's, exported read-only with ``git archive COMMIT python/sentinel_kernels/
serve | tar -x -C /tmp/old``), so two versions can be measured back to back::

    python scripts/serve_loop_profile.py --repeat 2 \\
        --serve-src /tmp/old/python/sentinel_kernels/serve --tag before --out a.json
    python scripts/serve_loop_profile.py --repeat 2 --tag after --out b.json

Prints each pass and the top functions by own CPU time; ``--out`` writes all as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.util
import io
import json
import logging
import platform
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from sentinel_kernels.app.cli import SERVE_SWITCH_INTERVAL_MS


def use_serve_from(src: Path) -> None:
    """Make ``import sentinel_kernels.serve`` load the package in ``src``."""
    import sentinel_kernels

    init = src / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "sentinel_kernels.serve", init, submodule_search_locations=[str(src)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--serve-src {src}: no package there")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sentinel_kernels.serve"] = module
    spec.loader.exec_module(module)
    sentinel_kernels.serve = module  # type: ignore[attr-defined]


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer from its GGUF (no weights de-quantised)."""
    from transformers import AutoTokenizer

    from sentinel_kernels import models

    path = Path(models.find_smollm2())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make_engine(tok: Any, level: int, slots: int, max_seq_len: int) -> Any:
    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine

    model = sk.models.tiny(
        "llama",
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        max_position_embeddings=max_seq_len,
        # as small as the engine takes: the HTTP side, not the model, is measured here
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    sk.patch_model(model, level=level)
    return Engine(model, tok, max_slots=slots, max_seq_len=max_seq_len, max_queued=4096)


class LoopServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a thread with its own event
    loop; :meth:`in_loop` runs a function on that loop's thread."""

    def __init__(self, app: Any, log_level: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="serve-loop", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    @contextlib.contextmanager
    def running(self, ready_s: float = 600.0) -> Iterator[str]:
        self.thread.start()
        try:
            deadline = time.monotonic() + ready_s
            while not self.server.started:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            while httpx.get(self.url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "engine did not get ready"
                time.sleep(0.1)
            yield self.url
        finally:
            self.server.should_exit = True
            self.thread.join(60)
            self.sock.close()


def bench_serve(
    url: str, args: argparse.Namespace, n: int, output_len: int, out: Path
) -> dict[str, Any]:
    """``sentinel-kernels bench-serve`` against ``url`` in a child process; its
    results.json."""
    cmd = [
        sys.executable,
        "-m",
        "sentinel_kernels.app.cli",
        "bench-serve",
        "--base-url",
        url,
        "--endpoint",
        "chat",
        "--num-prompts",
        str(n),
        "--request-rate",
        "inf",
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(output_len),
        "--seed",
        str(args.seed),
        "--timeout",
        "600",
        "--disable-tqdm",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=900)
    return dict(json.loads((out / "results.json").read_text()))


def _match(stats: pstats.Stats, file_end: str, name: str) -> tuple[int, float, float]:
    """(calls, own s, cumulative s) summed over functions ``name`` in files ending so."""
    calls, own, cum = 0, 0.0, 0.0
    for (file, _, func), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and file.replace("\\", "/").endswith(file_end):
            calls, own, cum = calls + nc, own + tt, cum + ct
    return calls, own, cum


#: Functions whose cumulative CPU is reported (file suffix, name).
PARTS = {
    "asgi_run": ("uvicorn/protocols/http/h11_impl.py", "run_asgi"),
    "http_parse": ("uvicorn/protocols/http/h11_impl.py", "data_received"),
    "stream_response": ("starlette/responses.py", "stream_response"),
    "route_handle": ("sentinel_kernels/serve/server.py", "_handle"),
    "body_parse": ("sentinel_kernels/serve/server.py", "_parse"),
    "prompt_ids": ("sentinel_kernels/serve/server.py", "_prompt_ids"),
    "submit": ("sentinel_kernels/serve/engine.py", "submit"),
    "sse_generator": ("sentinel_kernels/serve/server.py", "_stream"),
    "sse_send": ("uvicorn/protocols/http/h11_impl.py", "send"),
}


def _rounded(stats: dict[str, float | None], digits: int) -> dict[str, float | None]:
    return {k: None if v is None else round(v, digits) for k, v in stats.items()}


def one_pass(
    server: LoopServer, args: argparse.Namespace, output_len: int, profile: bool
) -> dict[str, Any]:
    prof = cProfile.Profile(time.thread_time) if profile else None
    with tempfile.TemporaryDirectory() as tmp:
        cpu0 = server.in_loop(time.thread_time)
        if prof is not None:
            server.in_loop(prof.enable)
        t0 = time.perf_counter()
        res = bench_serve(server.url, args, args.num_prompts, output_len, Path(tmp))
        wall = time.perf_counter() - t0
        if prof is not None:
            server.in_loop(prof.disable)
        cpu = server.in_loop(time.thread_time) - cpu0
    recs = res["requests"]
    ok = [r for r in recs if r["success"]]
    summary = res["summary"]
    out: dict[str, Any] = {
        "mode": "profile" if profile else "plain",
        "output_len": output_len,
        "requests": len(recs),
        "completed": len(ok),
        "content_chunks": sum(len(r["itl_s"]) + 1 for r in ok),
        "input_tokens": summary["total_input_tokens"],
        "output_tokens": summary["total_output_tokens"],
        "client_wall_s": round(wall, 3),
        "loop_cpu_s": round(cpu, 4),
        "ttft_ms": _rounded(summary["ttft"], 1),
        "tpot_ms": _rounded(summary["tpot"], 2),  # None with one token per request
    }
    if prof is None:
        return out
    stats = pstats.Stats(prof)
    parts = {k: _match(stats, *v) for k, v in PARTS.items()}
    cum = {k: v[2] for k, v in parts.items()}
    total = stats.total_tt  # type: ignore[attr-defined]
    # the stream runs in a task of its own (starlette's task group), not under run_asgi
    request = cum["asgi_run"] + cum["http_parse"]
    stream = cum["stream_response"]
    out["profile_share"] = {
        "request": round(request / total, 3),
        "stream": round(stream / total, 3),
        "other": round((total - request - stream) / total, 3),
        **{k: round(c / total, 3) for k, c in cum.items()},
    }
    out["profile_calls"] = {k: v[0] for k, v in parts.items()}
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(args.top)
    out["top_by_own_time"] = buf.getvalue()
    return out


def split_costs(long: dict[str, Any], short: dict[str, Any]) -> dict[str, float]:
    """Loop CPU per request and per content chunk from two plain passes that differ only
    in output length: ``cpu = requests * per_request + chunks * per_chunk``."""
    d_chunks = long["content_chunks"] - short["content_chunks"]
    per_chunk = (long["loop_cpu_s"] - short["loop_cpu_s"]) / d_chunks
    per_request = (short["loop_cpu_s"] - per_chunk * short["content_chunks"]) / short["requests"]
    return {
        "per_request_ms": round(1e3 * per_request, 3),
        "per_chunk_us": round(1e6 * per_chunk, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=200, help="prompt words (~1 token each)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of the long passes")
    p.add_argument("--level", type=int, default=1, help="patch level of the tiny model")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--log-level",
        default="info",
        help="the server's logging, as `sentinel-kernels serve --log-level` (a file here)",
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of plain long + short passes")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled pass")
    p.add_argument("--top", type=int, default=30, help="functions listed by own time")
    p.add_argument("--serve-src", type=Path, help="load sentinel_kernels.serve from here")
    p.add_argument("--tag", default="", help="a label stored with the result")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args()

    if args.serve_src is not None:
        use_serve_from(args.serve_src.resolve())
    from sentinel_kernels.serve.server import ServerConfig, create_app

    # as `sentinel-kernels serve` runs: its logging (one line per request, uvicorn's
    # access log; to a file here, as a served process's output would be) and its thread
    # switch interval
    log_file = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(message)s",
        stream=log_file,
    )
    sys.setswitchinterval(SERVE_SWITCH_INTERVAL_MS / 1000.0)
    tok = smollm2_tokenizer()
    config = ServerConfig(model_name="smollm2-tokenizer-tiny", level=1, result_cache_size=0)
    app = create_app(lambda: make_engine(tok, args.level, args.slots, args.max_seq_len), config)
    server = LoopServer(app, args.log_level)
    passes: list[dict[str, Any]] = []
    splits: list[dict[str, float]] = []

    def run(output_len: int, profile: bool = False) -> dict[str, Any]:
        res = one_pass(server, args, output_len, profile)
        top = res.pop("top_by_own_time", None)
        print(json.dumps(res), flush=True)
        if top:
            print(top, flush=True)
            res["top_by_own_time"] = top
        passes.append(res)
        return res

    with server.running():
        with tempfile.TemporaryDirectory() as tmp:  # warm-up: first-call costs, not measured
            bench_serve(server.url, args, 8, args.output_len, Path(tmp))
        for _ in range(args.repeat):
            long, short = run(args.output_len), run(1)
            splits.append(split_costs(long, short))
            print(json.dumps(splits[-1]), flush=True)
        if not args.no_profile:
            run(args.output_len, profile=True)
    longs = [r for r in passes if r["mode"] == "plain" and r["output_len"] == args.output_len]
    summary = {
        "per_request_ms": statistics.median(s["per_request_ms"] for s in splits),
        "per_chunk_us": statistics.median(s["per_chunk_us"] for s in splits),
        "loop_cpu_per_request_ms": statistics.median(
            1e3 * r["loop_cpu_s"] / r["requests"] for r in longs
        ),
        "client_ttft_p50_ms": statistics.median(r["ttft_ms"]["median"] for r in longs),
    }
    print(json.dumps(summary))
    result = {
        "tag": args.tag,
        "serve_src": str(args.serve_src) if args.serve_src else "working tree",
        "python": platform.python_version(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "num_prompts",
                "input_len",
                "output_len",
                "level",
                "slots",
                "max_seq_len",
                "seed",
                "repeat",
                "log_level",
            )
        },
        "summary": summary,
        "splits": splits,
        "passes": passes,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""How fast does the engine process hand out first tokens when a burst of requests
arrives at once through ``--http-workers`` connections? (issue 17: at request rate inf
the first tokens reached the HTTP workers ~4 ms per prompt apart on an H100, while a
packed prefill forward of 8 such prompts costs ~2.5 ms of GPU time.)

    python scripts/serve_burst_probe.py [--device cpu|cuda] [--model tiny|smolshape]
        [--requests 500] [--prompt-len 230] [--max-tokens 64] [--slots 256]
        [--clients 4] [--modes remote local] [--forwards 1 4] [--json out.json]

The engine runs as ``sentinel-kernels serve --http-workers N`` runs it: an
:class:`~sentinel_kernels.serve.remote.EngineProcess` child, with ``--clients``
processes connected to it as the HTTP workers connect (``mode remote``). Each client
process submits its share of ``--requests`` token-id prompts at one moment (a shared
start time), then waits for all of them; the per-request times (``perf_counter``, one
clock across processes on Linux) come back to this process. ``mode local`` runs the same
burst on an :class:`~sentinel_kernels.serve.Engine` in this process, submitted from one
thread (every ``--forwards`` value on one engine, twice): the difference is what the
process boundary costs. ``mode remote`` builds an engine process per ``--forwards``
value.

Reported per mode: the first tokens' times after the burst's start (the 64th, 128th,
256th and the median request), the engine's decode steps and prefill forwards up to the
median first token, and the wall time of the whole burst. With ``--model tiny`` on a CPU
the forward passes are cheap, so what remains is the engine's host work per step and
the messages' way to the clients.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def build_engine(
    model_name: str, device: str, level: int, slots: int, seq: int, forwards: int
) -> Any:
    """The engine (module level: the engine process is spawned and unpickles this)."""
    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine

    if model_name == "tiny":
        model = sk.models.tiny("llama", max_position_embeddings=seq, vocab_size=512)
        if device == "cuda":
            model = model.to("cuda", torch.bfloat16)
    else:
        from benchlib import smollm2_shape

        model = smollm2_shape(device)
        if device != "cuda":
            model = model.float()
    sk.patch_model(model, level=level)
    return Engine(
        model,
        None,
        max_slots=slots,
        max_seq_len=seq,
        max_prefill_tokens=2048,
        max_prefill_forwards=forwards,
    )


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _collect(streams: list[Any]) -> list[tuple[float, float | None, float | None]]:
    out = []
    for s in streams:
        s.result()
        t = s.timings
        out.append((t.arrival, t.first_token, t.finished))
    return out


def _client(
    address: str,
    authkey: bytes,
    prompts: list[list[int]],
    max_tokens: int,
    start_at: Any,
    ready: Any,
    results: Any,
) -> None:
    from sentinel_kernels.serve import SamplingParams
    from sentinel_kernels.serve.remote import connect

    engine = connect(address, authkey, timeout=600)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ready.put(1)
    t0 = start_at.get()
    while time.perf_counter() < t0:
        time.sleep(0.0002)
    streams = [engine.submit(p, params) for p in prompts]
    results.put(_collect(streams))
    engine.shutdown()


def _summary(times: list[tuple[float, float | None, float | None]], t0: float) -> dict[str, Any]:
    firsts = sorted(f - t0 for _, f, _ in times if f is not None)
    ends = [e - t0 for _, _, e in times if e is not None]
    ttfts = sorted(f - a for a, f, _ in times if f is not None)

    def nth(k: int) -> float | None:
        return round(1e3 * firsts[k - 1], 1) if len(firsts) >= k else None

    return {
        "requests": len(times),
        "first_token_ms_64th": nth(64),
        "first_token_ms_128th": nth(128),
        "first_token_ms_256th": nth(256),
        "ttft_ms_p50": round(1e3 * statistics.median(ttfts), 1),
        "ttft_ms_p90": round(1e3 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
        "wall_s": round(max(ends), 3),
    }


def run_remote(args: argparse.Namespace, prompts: list[list[int]], forwards: int) -> dict[str, Any]:
    from sentinel_kernels.serve.remote import EngineProcess

    build = functools.partial(
        build_engine, args.model, args.device, args.level, args.slots, args.seq, forwards
    )
    ctx = multiprocessing.get_context("spawn")
    with EngineProcess(build) as proc:
        address, authkey = proc.endpoint
        warm = proc.connect(timeout=900)
        from sentinel_kernels.serve import SamplingParams

        warm_params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for s in [warm.submit(p, warm_params) for p in prompts[:16]]:
            s.result()
        before = warm.stats()
        ready, start_at, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        shares = [prompts[i :: args.clients] for i in range(args.clients)]
        clients = [
            ctx.Process(
                target=_client,
                args=(address, authkey, share, args.max_tokens, start_at, ready, results),
            )
            for share in shares
        ]
        for c in clients:
            c.start()
        for _ in clients:
            ready.get(timeout=900)
        t0 = time.perf_counter() + 0.2
        for _ in clients:
            start_at.put(t0)
        times = [t for _ in clients for t in results.get(timeout=900)]
        for c in clients:
            c.join(30)
        after = warm.stats()
        warm.shutdown()
    out = _summary(times, t0)
    out["engine"] = {k: after[k] - before[k] for k in ("steps", "prefill_chunks", "decode_steps")}
    return out


def run_local(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    """Every ``--forwards`` value on one engine built once (the setting is read each
    step), each burst twice; returns ``{f"local_f{n}_r{round}": summary}``."""
    from sentinel_kernels.serve import SamplingParams

    engine = build_engine(
        args.model, args.device, args.level, args.slots, args.seq, args.forwards[0]
    )
    results: dict[str, Any] = {}
    try:
        warm_params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for s in [engine.submit(p, warm_params) for p in prompts[:16]]:
            s.result()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for rnd in range(2):
            for forwards in args.forwards:
                engine.max_prefill_forwards = forwards
                before = engine.stats()
                t0 = time.perf_counter()
                streams = [engine.submit(p, params) for p in prompts]
                times = _collect(streams)
                after = engine.stats()
                out = _summary(times, t0)
                out["engine"] = {
                    k: after[k] - before[k] for k in ("steps", "prefill_chunks", "decode_steps")
                }
                results[f"local_f{forwards}_r{rnd}"] = out
                print(f"local_f{forwards}_r{rnd}", json.dumps(out), flush=True)
    finally:
        engine.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=("tiny", "smolshape"), default="tiny")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--prompt-len", type=int, default=230)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--modes", nargs="+", choices=("remote", "local"), default=["remote"])
    ap.add_argument(
        "--forwards",
        type=int,
        nargs="+",
        default=[1],
        help="Engine max_prefill_forwards values, each run in every mode",
    )
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    vocab = 512 if args.model == "tiny" else 49152
    prompts = _prompts(args.requests, args.prompt_len, vocab, seed=0)
    result: dict[str, Any] = {"args": vars(args).copy()}
    if "local" in args.modes:
        result.update(run_local(args, prompts))
    if "remote" in args.modes:
        for forwards in args.forwards:
            key = f"remote_f{forwards}"
            result[key] = run_remote(args, prompts, forwards)
            print(key, json.dumps(result[key]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where does the engine's loop spend its host time? (issue 16: the engine reaches only
~1.1-1.2x static batching although static batching computes ~1.9x more tokens.)

A random model of SmolLM2-135M's shape (bf16, CUDA), patched at ``--level``, served by
``Engine(max_slots=--slots (64), max_seq_len=1024, max_prefill_tokens=2048)`` over the offline
workload of ``bench/bench_engine.py`` (512 requests, prompts of 32-512 random tokens,
outputs of 16-256 tokens, EOS ignored). Two passes after a warm-up:

1. timers: wall time of the engine thread's parts per step (``_schedule``,
   ``_prefill_step`` (launch), ``_finish_prefill`` (first tokens), ``runner.decode``,
   ``pick_device``, ``to_host``, ``_finish_step`` and inside it the wait for the step's
   event, i.e. host idle while the GPU works);
2. ``cProfile`` of the engine thread (its functions by own time).

Run on a GPU machine: ``python scripts/engine_step_probe.py --out $OUT``
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams

# by path: `python -P` (used on the GPU machine) leaves bench/ off sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import smollm2_shape  # noqa: E402


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(10, 49142) for _ in range(rng.randint(32, 512))], rng.randint(16, 256))
        for _ in range(n)
    ]


def run(engine: Engine, work: list[tuple[list[int], int]]) -> float:
    t0 = time.perf_counter()
    streams = [
        engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
        for p, m in work
    ]
    for s in streams:
        s.result()
    return time.perf_counter() - t0


def gpu_time_split(engine: Engine, work: list[tuple[list[int], int]]) -> dict[str, Any]:
    """GPU time of the decode graphs, by bucket, and of the prefill graphs, by (rows,
    width): a pair of CUDA events around every replay (read after the run), so the
    engine's step is split between decode and prefill work on the device."""
    runner = engine._runner
    kinds: dict[int, str] = {}
    for bucket, (graph, _) in runner._graphs.items():
        kinds[id(graph)] = f"decode/{bucket}"
    for (rows, width), g in runner._prefill_graphs.items():
        kinds[id(g.graph)] = f"prefill/{rows}x{width}"
    for width, pg in runner._packed_graphs.items():
        kinds[id(pg.graph)] = f"prefill/packed{width}"
    events: list[tuple[str, Any, Any]] = []
    orig = torch.cuda.CUDAGraph.replay

    def replay(self: Any) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        orig(self)
        end.record()
        events.append((kinds.get(id(self), "other"), start, end))

    torch.cuda.CUDAGraph.replay = replay  # type: ignore[method-assign]
    try:
        wall = run(engine, work)
    finally:
        torch.cuda.CUDAGraph.replay = orig  # type: ignore[method-assign]
    torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for kind, start, end in events:
        per[kind][0] += start.elapsed_time(end)
        per[kind][1] += 1
    decode_ms = sum(v[0] for k, v in per.items() if k.startswith("decode"))
    prefill_ms = sum(v[0] for k, v in per.items() if k.startswith("prefill"))
    return {
        "wall_s": wall,
        "decode_graph_ms": decode_ms,
        "prefill_graph_ms": prefill_ms,
        "other_graph_ms": sum(v[0] for k, v in per.items() if k == "other"),
        "by_graph": {k: {"ms": v[0], "replays": v[1]} for k, v in sorted(per.items())},
        "note": "events on the current stream around each replay; eager prefills and "
        "sampling between replays are not counted",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--slots", type=int, default=64, help="max_slots (the server ran 256)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument(
        "--admit-rows",
        type=int,
        nargs="*",
        default=[],
        help="also run the workload with the engine admitting a backlog once this many "
        "slots are free (its private _admit_batch; default min(4, max_slots / 4))",
    )
    ap.add_argument(
        "--one-split-from",
        type=int,
        help="plan one KV split (no merge pass) for decode attention launches of at least "
        "this many programs (batch x KV heads x row blocks; 64 rows of SmolLM2: 192), "
        "instead of kernels.decode_attention.choose_num_splits' count (2 there)",
    )
    args = ap.parse_args()
    if args.one_split_from is not None:
        from sentinel_kernels.kernels import decode_attention as kda

        plan = kda.choose_num_splits
        least = args.one_split_from

        def one_split_for_many(programs: int, seq_len: int, sms: int) -> int:
            return 1 if programs >= least else plan(programs, seq_len, sms)

        # before any step is planned or captured
        kda.choose_num_splits = one_split_for_many  # type: ignore[assignment]
    out = Path(args.out)
    model = smollm2_shape(args.device)
    if args.device != "cuda":
        model = model.float()
    sk.patch_model(model, level=args.level)
    engine = Engine(model, None, max_slots=args.slots, max_seq_len=1024, max_prefill_tokens=2048)
    work = workload(args.requests)
    run(engine, work[:16])  # warm-up (autotuning)

    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] += time.perf_counter() - t0
                counts[name] += 1

        return wrapper

    runner = engine._runner
    patches = [
        (engine, "_schedule"),
        (engine, "_prefill_step"),
        (engine, "_decode_step"),
        (engine, "_finish_step"),
        (engine, "_finish_prefill"),
        (runner, "decode"),
        (runner, "pick_device"),
        (runner, "to_host"),
        (runner, "prefill"),
    ]
    originals = {(id(o), n): getattr(o, n) for o, n in patches}
    for obj, name in patches:
        setattr(obj, name, timed(name, getattr(obj, name)))
    orig_sync = torch.cuda.Event.synchronize
    torch.cuda.Event.synchronize = timed("event.synchronize", orig_sync)  # type: ignore[method-assign]
    steps0 = engine.stats()["steps"]
    wall = run(engine, work)
    steps = engine.stats()["steps"] - steps0
    torch.cuda.Event.synchronize = orig_sync  # type: ignore[method-assign]
    for obj, name in patches:
        setattr(obj, name, originals[(id(obj), name)])
    tokens = sum(m for _, m in work)
    timers = {
        k: {"total_s": v, "calls": counts[k], "per_step_us": 1e6 * v / max(1, steps)}
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
    }
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "level": args.level,
        "slots": args.slots,
        "requests": len(work),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "steps": steps,
        "wall_per_step_us": 1e6 * wall / max(1, steps),
        "one_split_from": args.one_split_from,
        "timers": timers,
        "stats": engine.stats(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=1))
    if args.device == "cuda":
        result["gpu_time"] = gpu_time_split(engine, work)
        print(json.dumps(result["gpu_time"], indent=1))
    default_admit = engine._admit_batch
    sweep = []
    for rows in args.admit_rows:
        engine._admit_batch = rows
        s0 = engine.stats()["steps"]
        secs = run(engine, work)
        sweep.append(
            {
                "admit_rows": rows,
                "wall_s": secs,
                "tokens_per_s": tokens / secs,
                "steps": engine.stats()["steps"] - s0,
            }
        )
        print(f"admit {rows}: {tokens / secs:.0f} tok/s, {sweep[-1]['steps']} steps", flush=True)
    engine._admit_batch = default_admit
    result["admit_sweep"] = {"default": default_admit, "runs": sweep}

    # pass 2: cProfile of the engine thread (enabled around each loop iteration's work)
    prof = cProfile.Profile()
    for name in ("_prefill_step", "_decode_step", "_finish_prefill"):
        fn = getattr(engine, name)

        def profiled(*a: Any, _fn: Any = fn, **kw: Any) -> Any:
            prof.enable()
            try:
                return _fn(*a, **kw)
            finally:
                prof.disable()

        setattr(engine, name, profiled)
    wall2 = run(engine, work)
    engine.shutdown()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumulative").print_stats(args.top)
    text = f"wall under cProfile: {wall2:.2f} s\n" + buf.getvalue()
    print(text[:6000])
    result["cprofile_wall_s"] = wall2
    (out / f"engine_step_probe_L{args.level}.json").write_text(json.dumps(result, indent=1))
    (out / f"engine_step_probe_L{args.level}_cprofile.txt").write_text(text)


if __name__ == "__main__":
    main()

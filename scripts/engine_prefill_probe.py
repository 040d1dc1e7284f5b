"""What does one prefill graph of the engine cost, packed or left-padded, and in which
kernels?

Builds ``Engine(max_slots=64, max_seq_len=--max-seq-len, max_prefill_tokens=--budget)``
over a SmolLM2-shaped random model at ``--level`` (CUDA graphs on), once with packed
prefill and once without, and for each captured prefill graph replays it ``--reps``
times back to back (CUDA events around the whole run: GPU time per replay, and per
computed position), with inputs staged as a real prefill would (``--rows`` prompts of
equal length filling the graph). Then profiles one replay of the widest packed graph and
one of the (rows, width) graph of the same size with torch.profiler and prints their
kernels by GPU time (attention, linears, copies), to tell what a packed position costs
against a padded one (session 20, H100, level 1: ~1.6 ms per packed forward whatever
its width, ~0.5 us more per position).

    python scripts/engine_prefill_probe.py [--level 1] [--max-seq-len 1024]
        [--budget 2048] [--rows 4] [--reps 20] [--top 15] [--modes both|packed|padded]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _profile import kernel_totals  # noqa: E402 (after the path set-up)


def _replay_ms(fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _kernels(fn: Any, top: int) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = kernel_totals(prof)
    total = sum(us for us, _ in totals.values())
    print(f"    {total / 1e3:.3f} ms kernel time, {sum(c for _, c in totals.values())} kernels")
    for name, (us, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / 1e3:8.3f} ms {c:5d}x  {name[:90]}")


def main() -> None:
    from benchlib import smollm2_shape

    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument(
        "--modes",
        choices=("both", "packed", "padded"),
        default="both",
        help="which engines to build (each pays the engine's start-up)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("engine_prefill_probe needs a CUDA GPU (it replays prefill graphs)")
    torch.manual_seed(0)
    model = smollm2_shape("cuda", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=args.level)
    vocab = model.config.vocab_size
    # a copy: vars() is the namespace's own dict, and args.out must stay a Path
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "args": {**vars(args), "out": str(args.out)},
    }
    slots = list(range(args.rows))
    modes = {"both": (True, False), "packed": (True,), "padded": (False,)}[args.modes]
    for packed in modes:
        with Engine(
            model,
            None,
            max_slots=64,
            max_seq_len=args.max_seq_len,
            max_prefill_tokens=args.budget,
            packed_prefill=packed,
        ) as engine:
            runner = engine._runner  # noqa: SLF001 - a probe of the engine's internals
            sizes = (
                [(args.rows, w) for w in runner.packed_buckets]
                if packed
                else [rw for rw in runner.prefill_buckets if rw[0] == args.rows]
            )
            rows = []
            with torch.inference_mode():
                for k, width in sizes:
                    # prompts that fill the graph: k equal prompts of width // k tokens
                    # (packed) or of width tokens (padded rows)
                    n = width // k if packed else width
                    if n < 1:
                        continue
                    prompts = torch.randint(3, vocab, (k, n)).tolist()
                    ms = _replay_ms(functools.partial(runner.prefill, slots, prompts), args.reps)
                    computed = width if packed else k * width
                    rows.append({"rows": k, "width": width, "ms": ms, "computed": computed})
                    print(
                        f"{'packed' if packed else 'padded'} rows {k:2d} width {width:5d}: "
                        f"{ms:7.3f} ms per replay, {ms * 1e3 / computed:6.2f} us per "
                        "computed position",
                        flush=True,
                    )
                if sizes:
                    k, width = sizes[-1]
                    n = width // k if packed else width
                    prompts = torch.randint(3, vocab, (k, n)).tolist()
                    print(f"  kernels of one replay (rows {k}, width {width}):")
                    _kernels(functools.partial(runner.prefill, slots, prompts), args.top)
                for s in slots:
                    runner.release(s)
            record["packed" if packed else "padded"] = rows
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

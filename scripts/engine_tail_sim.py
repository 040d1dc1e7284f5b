"""A slot-level model of the engine's scheduler on ``bench_engine``'s offline workload:
how many decode steps run at each batch bucket, with and without row compaction
(``Engine(compact_rows=...)``), and what that would cost under a per-bucket step-time
model. A model, not a measurement: no model runs, and the step times are inputs.

Modelled: FCFS admission to the lowest free slot; with a backlog, admission waits until
``--admit-batch`` slots are free (the engine's ``_admit_batch``); whole prompts prefilled
within ``--prefill-tokens`` per step (the first token comes from the prefill); one token
per running request per decode step; a finished request frees its slot after the step;
compaction as the engine does it (nothing waiting or prefilling, the running requests fit
a smaller bucket than their highest slot needs). Not modelled: the step launched ahead,
chunked prefill of prompts longer than the budget (the workload has none).

    python scripts/engine_tail_sim.py --json bench/results/<file>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from bench_engine import GPU_SIZES, make_workload  # noqa: E402


def buckets(max_slots: int) -> list[int]:
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    return [*out, max_slots]


def bucket_for(rows: int, bs: list[int]) -> int:
    return next(b for b in bs if b >= rows)


def simulate(
    prompts: list[int], outputs: list[int], slots: int, admit_batch: int, budget: int, compact: bool
) -> dict[int, int]:
    """Decode steps by bucket."""
    bs = buckets(slots)
    waiting = list(range(len(prompts)))
    free = list(range(slots))
    left: dict[int, int] = {}  # slot -> tokens still to decode
    steps: dict[int, int] = {}
    while waiting or left:
        backlog = len(waiting) > len(free)
        if waiting and free and not (left and backlog and len(free) < admit_batch):
            used = 0
            while waiting and free and used + prompts[waiting[0]] <= budget:
                r = waiting.pop(0)
                used += prompts[r]
                free.sort()
                left[free.pop(0)] = outputs[r] - 1  # the prefill gave the first token
        for s in [s for s, n in left.items() if n <= 0]:
            del left[s]
            free.append(s)
        if compact and left and not waiting:
            target = bucket_for(len(left), bs)
            if bucket_for(max(left) + 1, bs) > target:
                movers = sorted(s for s in left if s >= target)
                holes = sorted(f for f in free if f < target)[: len(movers)]
                for s, d in zip(movers, holes, strict=True):
                    left[d] = left.pop(s)
                    free.remove(d)
                    free.append(s)
        if not left:
            continue
        b = bucket_for(max(left) + 1, bs)
        steps[b] = steps.get(b, 0) + 1
        for s in left:
            left[s] -= 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=GPU_SIZES.max_slots)
    ap.add_argument("--admit-batch", type=int, default=4)
    ap.add_argument("--prefill-tokens", type=int, default=GPU_SIZES.max_prefill_tokens)
    ap.add_argument(
        "--step-ms",
        type=float,
        nargs=2,
        default=(0.625, 1.877),
        metavar=("ONE_ROW", "FULL"),
        help="step-time model: linear in the bucket between these ms at 1 row and at "
        "--slots rows (default: the H200's level-2 SmolLM2-shape batch-1 graph replay, "
        "2026-12-05, and 64-row graph replay, session 22)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    wl = make_workload(49152, GPU_SIZES)
    prompts = [len(p) for p in wl.prompts]
    one, full = args.step_ms

    def cost(steps: dict[int, int]) -> float:
        slope = (full - one) / max(1, args.slots - 1)
        return sum(n * (one + slope * (b - 1)) for b, n in steps.items()) / 1e3

    out: dict = {"model": "slot-level scheduler model, not a measurement", **vars(args)}
    for compact in (False, True):
        steps = simulate(
            prompts, wl.outputs, args.slots, args.admit_batch, args.prefill_tokens, compact
        )
        name = "compact" if compact else "fixed_rows"
        out[name] = {
            "steps_by_bucket": dict(sorted(steps.items())),
            "steps": sum(steps.values()),
            "modelled_decode_s": cost(steps),
        }
        print(
            f"{name:10s} {out[name]['steps']} steps, by bucket {out[name]['steps_by_bucket']}, "
            f"modelled decode {out[name]['modelled_decode_s']:.3f} s"
        )
    saved = out["fixed_rows"]["modelled_decode_s"] - out["compact"]["modelled_decode_s"]
    out["modelled_saving_s"] = saved
    print(f"modelled saving {saved:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

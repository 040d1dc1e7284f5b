"""Sweep launch configurations of the M=1 W8A16 GEMV on the GPU (tuning aid, not a proof).

For each decode shape of the INT8 issue, every forced config (BLOCK_N, BLOCK_K, warps,
SPLIT_K) is timed from CUDA-graph replays over weight sets larger than L2, next to bf16
``F.linear`` timed the same way, and the table of ratios is printed and written as JSON.
The proof stays in ``bench/bench_int8_matmul.py`` (the autotuned op, pytest-benchmark).

    python scripts/int8_gemv_sweep.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def _time_graph(fn, arg_sets, reps: int = 20) -> float:
    """Median seconds per call: one graph holding one call per arg set, replayed."""
    for a in arg_sets:
        fn(*a)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for a in arg_sets:
            fn(*a)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(arg_sets))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()

    import sentinel_kernels as sk
    from sentinel_kernels.kernels import int8_matmul as kim

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    grid = [
        dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sp, num_warps=nw, num_stages=1)
        for bn, bk, sp, nw in itertools.product(
            (8, 16, 32, 64), (128, 256, 512, 1024), (1, 2), (4, 8)
        )
        if 2048 <= bn * bk <= 16384
    ]
    rows = []
    for n, k in SHAPES:
        sets = max(3, math.ceil(3 * l2 / (n * k * 2)))
        ws = []
        for i in range(sets):
            w = torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
            q, s = sk.ops.quantize_int8(w * 0.02)
            ws.append((w.to(torch.bfloat16), q, s))
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
        outs = [torch.empty(1, n, device="cuda", dtype=torch.bfloat16) for _ in ws]
        base = _time_graph(F.linear, [(x, w) for x, (w, _, _) in zip(xs, ws, strict=True)])
        auto = _time_graph(
            sk.ops.int8_linear, [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
        )
        print(
            f"N={n} K={k}: bf16 {base * 1e6:.1f} us, autotuned op {auto * 1e6:.1f} us "
            f"({base / auto:.2f}x)",
            flush=True,
        )
        best = None
        for cfg in grid:
            if k // cfg["SPLIT_K"] < 2 * cfg["BLOCK_K"]:
                continue

            def call(x, q, s, o, cfg=cfg):
                kim.w8a16(x, q, s, None, o, 0, config=cfg)

            try:
                t = _time_graph(
                    call,
                    [(x, q, s, o) for x, (_, q, s), o in zip(xs, ws, outs, strict=True)],
                    reps=10,
                )
            except Exception as exc:  # a config that does not compile is skipped
                print("  skip", cfg, type(exc).__name__, str(exc)[:100])
                continue
            rows.append(
                {
                    "n": n,
                    "k": k,
                    **cfg,
                    "us": t * 1e6,
                    "bf16_us": base * 1e6,
                    "ratio": base / t,
                    "autotuned_us": auto * 1e6,
                }
            )
            if best is None or t < best[0]:
                best = (t, cfg)
        print(f"  best {best[1]}: {best[0] * 1e6:.1f} us ({base / best[0]:.2f}x bf16)", flush=True)
        del ws, xs, outs
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_gemv_sweep.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )
    for n, k in SHAPES:
        top = sorted((r for r in rows if (r["n"], r["k"]) == (n, k)), key=lambda r: r["us"])[:5]
        print(f"N={n} K={k} top 5:")
        for r in top:
            print(
                f"  BN{r['BLOCK_N']} BK{r['BLOCK_K']} SK{r['SPLIT_K']} W{r['num_warps']}: "
                f"{r['us']:.1f} us {r['ratio']:.2f}x"
            )


if __name__ == "__main__":
    main()

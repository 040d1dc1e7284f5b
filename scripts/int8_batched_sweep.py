"""W8A16 at batched-decode row counts: how far the tuned Triton GEMM is from cuBLAS bf16,
and which launch configuration would close the gap (issue 19, item 2).

    python scripts/int8_batched_sweep.py --m 32 64 128 --json out.json

For each projection of the SmolLM2 and Llama-3.2-1B shapes (``bench_int8_matmul``'s
``BATCHED_SHAPES``) and each row count ``M``, three things are timed the same way, as a CUDA
graph of ``R`` launches over ``R`` different weight sets (together larger than L2, so every
launch streams its weights from HBM as in a model's step; time per launch = replay / R,
median of 7 replays):

* ``cublas``: ``F.linear`` with the bf16 weights (level 1's projection);
* ``dispatch``: ``ops.int8_linear`` as dispatched (the autotuned GEMM; level 2's);
* every configuration of a grid (``BLOCK_M`` x ``BLOCK_N`` x ``BLOCK_K`` x ``SPLIT_K`` x
  ``SWAP_AB``) forced through ``kernels.int8_matmul.w8a16(config=...)``.

* the W8A8 alternatives at the same rows and weights (:func:`w8a8_times`): the project's
  Triton W8A8 (activation quantization + int8 GEMM), cuBLASLt's int8 GEMM
  (``torch._int_mm``) with that quantization and a torch scale epilogue, and that GEMM
  alone. ``--no-grid`` times only cuBLAS, the dispatched op and these.

Prints, per case, cuBLAS, the dispatched op, the best forced configurations and their ratios;
``--json`` keeps every measurement. A configuration that fails to compile (shared memory) is
recorded as such and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
# the projections of the two benchmark shapes, (name, N, K): the bench's own list
from bench_int8_matmul import BATCHED_SHAPES as SHAPES  # noqa: E402


def grid_configs() -> list[dict]:
    """Swap-AB tiles (the weights fill the MMA's M dimension; rows pad to BLOCK_M >= 16)
    over BLOCK_M x BLOCK_N x BLOCK_K x SPLIT_K, and a few row-major ones; 3 stages, 4 warps
    (each distinct configuration is a compile: the grid stays small)."""
    out = []
    grid = [
        (True, bm, bn, bk, sp)
        for bm in (16, 32, 64)
        for bn in (32, 64, 128)
        for bk in (64, 128)
        for sp in (1, 2, 4)
    ]
    grid += [
        (False, bm, bn, bk, sp)
        for bm in (32, 64)
        for bn in (64, 128)
        for bk in (64, 128)
        for sp in (1, 2)
    ]
    # wide weight tiles: each program re-reads all M rows of x (from L2), as many bytes as
    # its weight tile at BLOCK_N = 2M; a wider tile halves that share
    grid += [(True, bm, 256, bk, sp) for bm in (32, 64) for bk in (64, 128) for sp in (1, 2, 4)]
    for swap, bm, bn, bk, split in grid:
        out.append(
            dict(
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_K=bk,
                GROUP_M=8,
                SWAP_AB=swap,
                SPLIT_K=split,
                num_warps=4,
                num_stages=3,
            )
        )
    return out


def time_graph(fn, reps: int = 7) -> float:
    """Seconds per launch of ``fn`` (which runs R launches), from graph replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    del g
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[64, 128, 32])
    ap.add_argument(
        "--shapes", nargs="*", choices=[s[0] for s in SHAPES], help="in this order (default: all)"
    )
    ap.add_argument("--bytes", type=float, default=150e6, help="weight bytes per graph")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--json")
    ap.add_argument(
        "--no-grid", action="store_true", help="time cuBLAS, the dispatch and W8A8 only"
    )
    args = ap.parse_args()
    import sentinel_kernels as sk
    from sentinel_kernels.kernels import int8_matmul as kim

    t0 = time.perf_counter()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    configs = [] if args.no_grid else grid_configs()
    failed: set[str] = set()
    results = []
    by_name = {s[0]: s for s in SHAPES}
    shapes = [by_name[name] for name in args.shapes] if args.shapes else SHAPES
    for name, n, k in shapes:
        r = max(4, min(400, math.ceil(args.bytes / (n * k))))
        wf = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(r)]
        q = [sk.ops.quantize_int8(w.float()) for w in wf]
        for m in args.m:
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget spent, stopping before {name} M{m}")
                break
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(r)]
            outs = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(r)]

            def run_cublas(xs=xs, outs=outs, wf=wf):
                for x, w, o in zip(xs, wf, outs, strict=True):
                    torch.matmul(x, w.t(), out=o)

            def run_dispatch(xs=xs, q=q):
                for x, (qw, s) in zip(xs, q, strict=True):
                    sk.ops.int8_linear(x, qw, s)

            case = {"linear": name, "n": n, "k": k, "m": m, "sets": r}
            case["cublas_us"] = time_graph(run_cublas) * 1e6 / r
            case["dispatch_us"] = time_graph(run_dispatch) * 1e6 / r
            case.update(w8a8_times(kim, xs, q, outs, r))
            forced = []
            for cfg in configs:
                if cfg["BLOCK_M"] > max(16, triton_next_pow2(m)):
                    continue
                if cfg["SPLIT_K"] > 1 and math.ceil(k / cfg["SPLIT_K"]) < cfg["BLOCK_K"]:
                    continue
                tag = json.dumps(cfg, sort_keys=True)
                if tag in failed:
                    continue

                def run_forced(cfg=cfg, xs=xs, outs=outs, q=q):
                    for x, (qw, s), o in zip(xs, q, outs, strict=True):
                        kim.w8a16(x, qw, s, None, o, 0, config=cfg)

                try:
                    run_forced()
                    torch.cuda.synchronize()
                    us = time_graph(run_forced, reps=5) * 1e6 / r
                except Exception as exc:  # out of shared memory and the like
                    failed.add(tag)
                    print(f"  config failed ({type(exc).__name__}): {cfg}")
                    continue
                forced.append({"config": cfg, "us": us})
            forced.sort(key=lambda e: e["us"])
            case["forced_top"] = forced[:8]
            case["forced_count"] = len(forced)
            best = forced[0]["us"] if forced else float("nan")
            print(
                f"    W8A8: triton {case.get('w8a8_us', float('nan')):7.2f} us, "
                f"torch._int_mm + quant + scale {case.get('intmm_us', float('nan')):7.2f} us, "
                f"_int_mm alone {case.get('intmm_gemm_us', float('nan')):7.2f} us"
            )
            print(
                f"{name:16s} M{m:<4d} cuBLAS {case['cublas_us']:7.2f} us  dispatch "
                f"{case['dispatch_us']:7.2f} us ({case['cublas_us'] / case['dispatch_us']:.2f}x)  "
                f"best forced {best:7.2f} us ({case['cublas_us'] / best:.2f}x) of {len(forced)}"
            )
            for e in forced[:3]:
                c = e["config"]
                print(
                    f"      {e['us']:7.2f} us  BM{c['BLOCK_M']} BN{c['BLOCK_N']} BK{c['BLOCK_K']} "
                    f"split{c['SPLIT_K']} st{c['num_stages']} swap{int(c['SWAP_AB'])}"
                )
            results.append(case)
            if args.json:
                Path(args.json).write_text(
                    json.dumps(
                        {
                            "device": torch.cuda.get_device_name(),
                            "torch": torch.__version__,
                            "cases": results,
                        },
                        indent=1,
                    )
                )


def w8a8_times(kim, xs, q, outs, r: int) -> dict:
    """The W8A8 alternatives at the same rows and weights, microseconds per launch group:
    ``w8a8_us`` the project's Triton W8A8 (activation quantization + int8 GEMM, 2 launches);
    ``intmm_us`` cuBLASLt's int8 GEMM (``torch._int_mm``) with the same activation
    quantization and an eager scale epilogue; ``intmm_gemm_us`` that GEMM alone (the floor
    of any W8A8 path built on it). A path that cannot run here is left out, with the reason."""
    out: dict = {}
    m, k = xs[0].shape
    scales = [s.reshape(-1).float() for _, s in q]
    if scales[0].numel() != q[0][0].shape[0]:
        return {"w8a8_skipped": "group-wise weight scales"}
    xq = [torch.empty(m, k, dtype=torch.int8, device=xs[0].device) for _ in xs]
    xsc = [torch.empty(m, dtype=torch.float32, device=xs[0].device) for _ in xs]

    def run_triton():
        for x, (qw, _), s, o in zip(xs, q, scales, outs, strict=True):
            kim.w8a8(x, qw, s, None, None, o)

    def run_intmm_only():
        for a, (qw, _) in zip(xq, q, strict=True):
            torch._int_mm(a, qw.t())

    def run_intmm():
        for x, a, asc, (qw, _), s, o in zip(xs, xq, xsc, q, scales, outs, strict=True):
            kim.quantize_activations(x, None, a, asc)
            acc = torch._int_mm(a, qw.t())
            torch.mul(acc * asc[:, None], s[None, :], out=o)

    for key, fn in (
        ("w8a8_us", run_triton),
        ("intmm_us", run_intmm),
        ("intmm_gemm_us", run_intmm_only),
    ):
        try:
            fn()
            torch.cuda.synchronize()
            out[key] = time_graph(fn, reps=5) * 1e6 / r
        except Exception as exc:  # _int_mm wants M > 16 and K, N multiples of 8
            out[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return out


def triton_next_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


if __name__ == "__main__":
    main()

"""One launch each of level 1's and level 2's projection at batched-decode rows, as a
target for Nsight Compute (issue 19, item 2: why the W8A16 GEMM takes ~2.5x cuBLAS's
time at 64 rows):

    ncu --clock-control none --kernel-name regex:'w8a16|gemm|gemv' --launch-skip 3 \\
        --section SpeedOfLight --section WarpStateStats \\
        python scripts/int8_gemm_once.py --shape smollm2-gate_up --m 64

Warms both up (and lets the autotuner pick, or load its saved pick) first, then runs
each once more after a synchronize: ``--launch-skip`` should skip the warm-up launches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_int8_matmul import BATCHED_SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-gate_up", choices=[s[0] for s in BATCHED_SHAPES])
    ap.add_argument("--m", type=int, default=64)
    args = ap.parse_args()
    import sentinel_kernels as sk

    _, n, k = next(s for s in BATCHED_SHAPES if s[0] == args.shape)
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qw, s = sk.ops.quantize_int8(w.float())
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        ref = torch.nn.functional.linear(x, w)
        y = sk.ops.int8_linear(x, qw, s)
    torch.cuda.synchronize()
    ref = torch.nn.functional.linear(x, w)
    y = sk.ops.int8_linear(x, qw, s)
    torch.cuda.synchronize()
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{args.shape} M{args.m}: relative difference of W8A16 from bf16 {err:.2e}")


if __name__ == "__main__":
    main()

"""Where does per-call host time go? Prints microseconds per call for each layer of an op.

Run on a GPU machine: PYTHONPATH=scripts python scripts/overhead_probe.py
"""

from __future__ import annotations

import time

import torch
import triton
from _profile import graph_ms

import sentinel_kernels as sk
from sentinel_kernels.kernels import quantize as kq
from sentinel_kernels.ops import quantize as opq


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def graph_us(fn, n: int = 50) -> float:
    """us per call of ``fn`` from a CUDA graph of 10 calls (median of 3 timings of ``n``
    replays)."""
    return graph_ms(lambda: [fn() for _ in range(10)], n, 3) * 1e3 / 10


def main() -> None:
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(32, 4096, device="cuda", dtype=torch.int8)
    s = torch.empty(32, device="cuda", dtype=torch.float32)
    rows = [
        ("torch x.abs() (dispatcher floor)", lambda: x.abs()),
        ("raw triton launch", lambda: kq.quantize_rows(x, q, s)),
        (
            "op impl fn (no dispatcher)",
            lambda: (
                opq._quantize_int8_op._init_fn(x)
                if hasattr(opq._quantize_int8_op, "_init_fn")
                else None
            ),
        ),
        ("torch.ops.sentinel.quantize_int8", lambda: torch.ops.sentinel.quantize_int8(x)),
        ("sk.ops.quantize_int8", lambda: sk.ops.quantize_int8(x)),
    ]
    for name, fn in rows:
        try:
            print(f"{name:40s} {per_call_us(fn):8.1f} us/call")
        except Exception as e:  # noqa: BLE001
            print(f"{name:40s} failed: {e!r}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        xs = [torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(3)]
        qs = [torch.empty(8192, 8192, device="cuda", dtype=torch.int8) for _ in range(3)]
        ss = [torch.empty(8192, device="cuda", dtype=torch.float32) for _ in range(3)]
        ys = [torch.empty_like(t) for t in xs]
        i = [0]

        def launch():
            k = i[0] % 3
            i[0] += 1
            kq.quantize_rows(xs[k], qs[k], ss[k])

        def copy():
            k = i[0] % 3
            i[0] += 1
            ys[k].copy_(xs[k])

        tq = graph_us(launch)
        tc = graph_us(copy)
        nbytes_q = xs[0].numel() * (xs[0].element_size() + 1) + 8192 * 4
        nbytes_c = xs[0].numel() * xs[0].element_size() * 2
        print(
            f"{str(dtype):16s} graph: quantize {tq:7.1f} us ({nbytes_q / tq / 1e3:6.0f} GB/s)"
            f"  copy {tc:7.1f} us ({nbytes_c / tc / 1e3:6.0f} GB/s)"
            f"  ratio {nbytes_q / tq / (nbytes_c / tc):.2f}"
        )


if __name__ == "__main__":
    main()

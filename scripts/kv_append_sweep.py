"""GPU probe: launch configurations of the quantize-on-append kernel against a device copy.

    python scripts/kv_append_sweep.py --out sweep.json

B8 H8 S2048 D128 bf16 written into an L=8192 cache (the ``kv_append`` bench group), each
variant timed from a CUDA graph whose 18 calls rotate over 6 input sets (more than L2):
``device-copy`` (``dst.copy_(x)``, contiguous, the bandwidth reference) and
``kernels.kv_cache.kv_append_fwd`` for int8 / int4 with the tile size (tokens x channels
per program, ``_TILE_ELEMS``) and warp count varied. GB/s = bf16 read + codes and scales
written. Picks the default for ``_TILE_ELEMS`` / ``_num_warps``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from kv_decode_probe import time_graph  # scripts/ is on sys.path when run as a script

from sentinel_kernels.kernels import kv_cache as kkv
from sentinel_kernels.reference import kv_cache as ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    b, h, s, cap, d = 8, 8, 2048, 8192, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    x_bytes = b * h * s * d * 2
    start = torch.zeros(b, dtype=torch.int32, device=dev)
    xs = [torch.randn(b, h, s, d, device=dev, dtype=dt) for _ in range(6)]

    def rotating(call):
        # One call per set in turn: the graph's calls stream over all sets (> L2).
        idx = itertools.cycle(range(len(xs)))
        return lambda: call(next(idx))

    rows = []
    dsts = [torch.empty_like(x) for x in xs]
    us = time_graph(rotating(lambda i: dsts[i].copy_(xs[i])), 18)
    copy_gbps = 2 * x_bytes / us / 1e3
    rows.append({"variant": "device-copy", "us": us, "gbps": copy_gbps})
    print(rows[-1], flush=True)
    orig_tile, orig_warps = kkv._TILE_ELEMS, kkv._num_warps
    for fmt in ("int8", "int4"):
        caches = [
            torch.empty(
                (b, h, cap, ref.kv_code_width(d, fmt)),
                dtype=torch.int8 if fmt == "int8" else torch.uint8,
                device=dev,
            )
            for _ in xs
        ]
        scales = [
            torch.empty(ref.kv_scale_shape((b, h, cap), 1, fmt), dtype=torch.float16, device=dev)
            for _ in xs
        ]
        written = x_bytes // 2 + b * h * s * 2 if fmt == "int8" else x_bytes // 4 + b * h * s * 4
        for tile in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8):
                kkv._TILE_ELEMS = tile
                kkv._num_warps = lambda _e, w=warps: w
                try:
                    us = time_graph(
                        rotating(
                            lambda i, fmt=fmt, c=caches, sc=scales: kkv.kv_append_fwd(
                                xs[i], c[i], start, kv_format=fmt, scales=sc[i], wrap=False
                            )
                        ),
                        18,
                    )
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    print(fmt, tile, warps, "failed", e, flush=True)
                    continue
                finally:
                    kkv._TILE_ELEMS, kkv._num_warps = orig_tile, orig_warps
                gbps = (x_bytes + written) / us / 1e3
                rows.append(
                    {
                        "variant": fmt,
                        "tile": tile,
                        "warps": warps,
                        "us": us,
                        "gbps": gbps,
                        "vs_copy": gbps / copy_gbps,
                    }
                )
                print(rows[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(), "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

"""GPU probe: decode attention over INT8/INT4 KV at GQA 32/8 B8 L8192 D128, per launch config.

    python scripts/kv_decode_probe.py --out probe.json

Times (CUDA graph of 20 calls, median of 15 replays) the Triton split kernel + merge with
each launch config forced (``BLOCK_N``, warps, stages), split counts, and the one-group
scales loaded inline or a tile ahead (``SCALES_AHEAD``), next to our dense
kernel at L8192 and at L4096 (the same bytes as INT8 at L8192: the bandwidth reference).
(The recorded probes also timed two loop variants that were then dropped; see the comment
above ``_configs`` in kernels/decode_attention.py.)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import sentinel_kernels as sk
from sentinel_kernels.kernels import decode_attention as kda
from sentinel_kernels.reference import kv_cache as ref

CONFIGS = [
    (64, 4, 2),
    (64, 4, 3),
    (128, 4, 2),
    (128, 4, 3),
    (64, 8, 2),
    (32, 4, 2),
    (32, 4, 3),
    (128, 8, 2),
]


def time_graph(fn, reps: int = 20) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    b, hq, hkv, length, d = 8, 32, 8, 8192, 128
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, 1, d, device=dev, dtype=dt)
    k = torch.randn(b, hkv, length, d, device=dev, dtype=dt)
    v = torch.randn(b, hkv, length, d, device=dev, dtype=dt)
    lens = torch.full((b,), length, dtype=torch.int32, device=dev)
    rows = []
    for name, n in (("dense L8192", length), ("dense L4096", length // 2)):
        kk, vv = k[:, :, :n].contiguous(), v[:, :, :n].contiguous()
        ll = torch.full((b,), n, dtype=torch.int32, device=dev)
        t = time_graph(lambda kk=kk, vv=vv, ll=ll: sk.ops.decode_attention(q, kk, vv, ll))
        rows.append({"case": name, "us": t})
        print(name, f"{t:.1f} us", flush=True)
    stores = {}
    for fmt, groups in (("int8", 1), ("int4", 1), ("int4", 2)):
        codes = []
        for x in (k, v):
            c = torch.empty(
                (b, hkv, length, ref.kv_code_width(d, fmt)),
                dtype=torch.int8 if fmt == "int8" else torch.uint8,
                device=dev,
            )
            s = torch.empty(
                ref.kv_scale_shape((b, hkv, length), groups, fmt), dtype=torch.float16, device=dev
            )
            sk.ops.kv_append(x, c, torch.zeros(b, dtype=torch.int32, device=dev), fmt, s)
            codes += [c, s]
        stores[(fmt, groups)] = codes
    orig = kda._configs
    cases = [(key, ahead) for key in stores for ahead in (False, True) if key[1] == 1 or not ahead]
    for (fmt, groups), ahead in cases:
        kc, ks, vc, vs = stores[(fmt, groups)]
        kda.SCALES_AHEAD = ahead
        for bn, warps, stages in CONFIGS[: 3 if groups > 1 else None]:
            for splits in (None, 24):
                cfg = kda._cfg(bn, warps, stages)
                kda._configs = lambda *a, cfg=cfg, **kw: (cfg,)
                try:
                    t = time_graph(
                        lambda kc=kc, vc=vc, ks=ks, vs=vs, fmt=fmt, n=splits: (
                            sk.ops.decode_attention(
                                q, kc, vc, lens, kv_format=fmt, k_scale=ks, v_scale=vs, num_splits=n
                            )
                        )
                    )
                except Exception as exc:  # out of resources etc.
                    t = float("nan")
                    print(fmt, groups, bn, warps, stages, splits, "failed:", str(exc)[:80])
                finally:
                    kda._configs = orig
                rows.append(
                    {
                        "case": f"{fmt} G{groups}",
                        "scales_ahead": ahead,
                        "block_n": bn,
                        "warps": warps,
                        "stages": stages,
                        "splits": splits,
                        "us": t,
                    }
                )
                print(
                    fmt,
                    groups,
                    "ahead" if ahead else "inline",
                    bn,
                    warps,
                    stages,
                    splits,
                    f"{t:.1f} us",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU probe: decode attention over a KIVI cache (per-channel int4 keys) by key block size.

    python scripts/kivi_decode_probe.py --out probe.json

GQA 32/8, B8, L8192, D128, bf16 queries (the bench group), each variant timed from a CUDA
graph whose 12 calls rotate over 3 input sets: ``sdpa`` over bf16 K/V (the baseline),
``int4 g1`` (per-token keys and values, one scale group), and KIVI caches with key blocks
of T = 32 / 64 / 128 tokens and values in 1 or 4 groups, rows 16 tokens into an open
block (read from the ring). The kernel's tile is one key block, so T sets the tile; the
split count (programs per KV head) is the heuristic's or forced to 12 / 24 / 48.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from kv_decode_probe import time_graph  # scripts/ is on sys.path when run as a script

import sentinel_kernels as sk
from sentinel_kernels.reference import kv_cache as ref


def _codes(x, fmt, groups):
    b, h, n, d = x.shape
    c = torch.empty((b, h, n, ref.kv_code_width(d, fmt)), dtype=torch.uint8, device=x.device)
    s = torch.empty(
        ref.kv_scale_shape((b, h, n), groups, fmt), dtype=torch.float16, device=x.device
    )
    sk.ops.kv_append(x, c, torch.zeros(b, dtype=torch.int32, device=x.device), fmt, s)
    return c, s


def _kivi(k, v, t, v_groups):
    b, h, n, d = k.shape
    dev = k.device
    start = torch.zeros(b, dtype=torch.int32, device=dev)
    kc = torch.empty((b, h, n, (d + 1) // 2), dtype=torch.uint8, device=dev)
    ks = torch.empty((b, h, n // t, d, 2), dtype=torch.float16, device=dev)
    kr = torch.empty((b, h, 2 * t, d), dtype=k.dtype, device=dev)
    vr = torch.empty_like(kr)
    keep = n - 16
    sk.ops.kv_append_key_blocks(k[:, :, :keep], kc, ks, kr, start, t)
    vc, vs = _codes(v, "int4", v_groups)
    sk.ops.kv_append(v[:, :, :keep], vr, start, "dense", None, True)
    return kc, vc, ks, vs, kr, vr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    b, hq, hkv, n, d = 8, 32, 8, 8192, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    sets = []
    for i in range(3):
        g = torch.Generator(device="cuda").manual_seed(i)
        sets.append(
            tuple(
                torch.randn(*shape, device=dev, dtype=dt, generator=g)
                for shape in ((b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, d))
            )
        )

    def timed(call, prepared):
        idx = itertools.cycle(range(len(prepared)))
        return time_graph(lambda: call(*prepared[next(idx)]), 12)

    rows = []
    us = timed(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), sets)
    rows.append({"variant": "sdpa", "us": us})
    print(rows[-1], flush=True)
    base = us
    prep = [(q, *_codes(k, "int4", 1), *_codes(v, "int4", 1)) for q, k, v in sets]
    us = timed(
        lambda q, kc, ks, vc, vs: sk.ops.decode_attention(
            q, kc, vc, lens, kv_format="int4", k_scale=ks, v_scale=vs
        ),
        prep,
    )
    rows.append({"variant": "int4 g1 (per-token)", "us": us, "speedup": base / us})
    print(rows[-1], flush=True)
    del prep
    kivi_lens = lens - 16
    for t in (32, 64, 128):
        for vg in (1, 4):
            prep = [(q, *_kivi(k, v, t, vg)) for q, k, v in sets]
            for splits in (None, 12, 24, 48):
                us = timed(
                    lambda q, kc, vc, ks, vs, kr, vr, t=t, ns=splits: sk.ops.decode_attention(
                        q,
                        kc,
                        vc,
                        kivi_lens,
                        kv_format="int4",
                        k_scale=ks,
                        v_scale=vs,
                        k_recent=kr,
                        v_recent=vr,
                        key_block=t,
                        num_splits=ns,
                    ),
                    prep,
                )
                rows.append(
                    {
                        "variant": f"kivi T={t} values g{vg}",
                        "splits": splits,
                        "us": us,
                        "speedup": base / us,
                    }
                )
                print(rows[-1], flush=True)
            del prep
    out = {
        "device": torch.cuda.get_device_name(),
        "shape": "GQA 32/8 B8 L8192 D128 bf16",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()

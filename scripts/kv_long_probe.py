"""Long-context decode attention on the GPU, per split count (issue 19, item 4).

Builds the inputs of ``bench/bench_kv_cache.py``'s long group (bf16 queries, K/V
compressed as each entry reads them, 3 sets rotated so that one call's bytes are not
in L2 from the call before) and times each entry for each split count from CUDA graphs
(3 calls a graph, one per set; median of 7 timings of 20 replays). ``auto`` is the
launcher's own choice. With ``--once`` it only warms up and runs each entry once more
(for ``ncu --launch-skip``: the last launches are the ones to read).

    python scripts/kv_long_probe.py --length 32768 --batch 1 --heads 32 8 128 \
        --impls sdpa sentinel-int8 sentinel-int4-kivi --splits auto 16 33 66 128
    python scripts/kv_long_probe.py --impls sentinel-int8 --configs tuned 128:8:2 64:4:3:168 \
        --int8-loops default f16:F16_CODES=1
    python scripts/kv_long_probe.py --impls sentinel-int4-kivi --kivi-configs tuned 4:3:168 8:3
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import triton
from _profile import graph_ms
from bench_kv_cache import _decode_fn, _decode_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, nargs=3, default=(32, 8, 128), metavar=("HQ", "HKV", "D"))
    ap.add_argument("--impls", nargs="+", default=["sdpa", "sentinel-int8", "sentinel-int4-kivi"])
    ap.add_argument("--splits", nargs="+", default=["auto"])
    ap.add_argument(
        "--kivi-loops",
        nargs="+",
        default=["default"],
        help="KIVI entries: one run per variant NAME or NAME:K=V,K=V (kernels KIVI_LOOP keys)",
    )
    ap.add_argument(
        "--kivi-configs",
        nargs="+",
        default=["tuned"],
        help="KIVI entries: one run per KIVI-kernel config WARPS:STAGES[:MAXNREG] (forced) or"
        " 'tuned'",
    )
    ap.add_argument(
        "--int8-loops",
        nargs="+",
        default=["default"],
        help="INT8 entries: one run per variant NAME or NAME:K=V,... (kernels INT8_LOOP keys)",
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["tuned"],
        help="INT8/dense entries: one run per split-kernel config BLOCK_N:WARPS:STAGES[:MAXNREG]"
        " (forced, no autotuning) or 'tuned'",
    )
    ap.add_argument("--once", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import sentinel_kernels as sk
    from sentinel_kernels.kernels import decode_attention as kda

    hq, hkv, d = args.heads
    dims = (args.batch, hq, hkv, args.length, d)
    lens = torch.full((args.batch,), args.length, dtype=torch.int32, device="cuda")
    rows = []
    # the variants' defaults, restored before each entry
    default_loop = dict(kda.KIVI_LOOP)
    default_int8 = dict(kda.INT8_LOOP)
    for impl in args.impls:
        sets, nbytes = _decode_sets(impl, dims, 3)
        fn, _, _ = _decode_fn(impl, lens)
        splits = ["auto"] if impl == "sdpa" else args.splits
        # Each entry is CONFIG/VARIANT: a launch config ("tuned", or forced: BN:W:S[:R] for
        # the split kernel, W:S[:R] for KIVI's), then a loop variant NAME[:K=V,...].
        if "kivi" in impl:
            configs, variants = args.kivi_configs, args.kivi_loops
        elif impl == "sdpa":
            configs, variants = ["tuned"], ["default"]
        else:
            configs = args.configs
            variants = args.int8_loops if "int8" in impl else ["default"]
        loops = [f"{c}/{v}" for c in configs for v in variants]
        runs = [(sp, lp) for lp in loops for sp in splits]
        for sp, lp in runs:
            name, _, variant = lp.partition("/")
            spec = variant.partition(":")[2]
            kda.KIVI_LOOP.clear()
            kda.KIVI_LOOP.update(default_loop)
            kda.INT8_LOOP.clear()
            kda.INT8_LOOP.update(default_int8)
            for kv in filter(None, spec.split(",")):
                key, val = kv.split("=")
                loop = kda.KIVI_LOOP if "kivi" in impl else kda.INT8_LOOP
                loop[key] = bool(int(val)) if isinstance(loop[key], bool) else int(val)
            forced = contextlib.nullcontext()
            if name != "tuned" and "kivi" in impl:
                warps, stages, *reg = (int(x) for x in name.split(":"))
                cap = reg[0] if reg else None
                cfg = triton.Config({}, num_warps=warps, num_stages=stages, maxnreg=cap)
                forced = kda.force_config(cfg)
            elif name != "tuned":
                bn, warps, stages, *reg = (int(x) for x in name.split(":"))
                forced = kda.force_config(kda._cfg(bn, warps, stages, reg[0] if reg else None))
            if sp == "auto":
                call = fn
            else:
                n = int(sp)

                def call(*s, _fn=fn, _n=n):
                    # every entry's fn ends in sk.ops.decode_attention: pass the count
                    orig = sk.ops.decode_attention

                    def fixed(*a, **k):
                        return orig(*a, **{**k, "num_splits": _n})

                    sk.ops.decode_attention = fixed
                    try:
                        return _fn(*s)
                    finally:
                        sk.ops.decode_attention = orig

            with forced:
                if args.once:
                    for s in sets:
                        call(*s)
                    torch.cuda.synchronize()
                    for s in sets[:1]:
                        call(*s)
                    torch.cuda.synchronize()
                    print(f"{impl} {name} splits={sp}: ran", flush=True)
                    continue
                # one graph of a call per set; median of 7 timings of 20 replays
                t = graph_ms(lambda c=call, ss=sets: [c(*x) for x in ss], 20, 7) / 1e3
                t /= len(sets)
            row = {
                "impl": impl,
                "loop": lp,
                "splits": sp,
                "us": t * 1e6,
                "bytes": nbytes,
                "tb_s": nbytes / t / 1e12,
            }
            rows.append(row)
            us, tbs = t * 1e6, row["tb_s"]
            print(f"{impl:22s} {lp:16s} splits={sp:>5s} {us:8.1f} us {tbs:5.2f} TB/s", flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"dims": dims, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()

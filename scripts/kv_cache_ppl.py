"""SmolLM2 wikitext-2 perplexity through compressed KV caches (chunked evaluation).

    python scripts/kv_cache_ppl.py --windows 10 --out bench/results/kv_cache_ppl_cpu.json

Every setting runs ``sk.eval.perplexity(..., chunk=32, cache=...)``: each 1024-token window
is fed 32 tokens at a time, so every chunk's attention reads the cache (compressed) that
the earlier chunks wrote. The baseline is the same chunked evaluation over a full-precision
("dense") cache. Settings: INT8 with 1 or 2 scale groups per head vector; INT4 with scale
groups of 64/32/16 channels, each without and with a 32-token full-precision recent ring
(KIVI's residual); KIVI caches (keys per channel over blocks of T tokens, values per token
in groups, the open block in a 2T-slot ring) at T = 32, 64, 128; low-rank caches at r = D,
3D/4, D/2 (bases from
``sk.quant.calibrate_lowrank`` on wikitext-2 *valid*). The INT8/INT4 defaults of
``sk.kv_cache`` are the cheapest settings within the issue's budgets in this table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _wikitext import add_common_args, load_texts_and_model

import sentinel_kernels as sk
from sentinel_kernels.cache import spec as kvc
from sentinel_kernels.reference.kv_formats import kv_bytes_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    add_common_args(ap)
    args = ap.parse_args()
    test, valid, model, tok = load_texts_and_model(args)
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    only = set(args.only.split(",")) if args.only else None

    # (name, spec, group size, recent ring, KIVI key block)
    settings: list[tuple[str, str, int | None, int, int]] = [("dense", "dense", None, 0, 0)]
    settings += [("int8 g=D", "int8", d, 0, 0), ("int8 g=D/2", "int8", d // 2, 0, 0)]
    for g in (64, 32, 16):
        for recent in (0, 32):
            settings.append((f"int4 g={g} recent={recent}", "int4", g, recent, 0))
    for t, g in ((32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (128, 64)):
        settings.append((f"int4 kivi T={t} values g={g}", "int4", g, 2 * t, t))
    for r in (d, 3 * d // 4, d // 2):
        settings.append((f"lowrank:{r}", f"lowrank:{r}", None, 0, 0))

    rows = []
    calibrated = False
    for name, spec, group, recent, key_block in settings:
        if only is not None and name not in only and name != "dense":
            continue
        if spec.startswith("lowrank") and not calibrated:
            t0 = time.time()
            sk.quant.calibrate_lowrank(
                model, tok, valid, n_samples=args.calib_samples, max_length=1024
            )
            print(f"calibrate_lowrank: {time.time() - t0:.0f} s", flush=True)
            calibrated = True
        kind = spec.split(":")[0]
        if kind in ("int8", "int4"):
            kvc.DEFAULT_GROUP_SIZE[kind] = group
            kvc.DEFAULT_RECENT[kind] = recent
            kvc.DEFAULT_KEY_BLOCK = key_block
        t0 = time.time()
        ppl = sk.eval.perplexity(
            model,
            tok,
            test,
            window=1024,
            max_windows=args.windows,
            chunk=args.chunk,
            cache=spec,
            progress=False,
        )
        if key_block:
            # Keys: codes + a (s, m) fp16 pair per channel per block; values per token.
            per_token = (
                (d + 1) // 2 + 4 * d / key_block + kv_bytes_per_token(d, kind, -(-d // group))
            ) / 2
        elif kind in ("int8", "int4"):
            groups = -(-d // group)
            per_token = kv_bytes_per_token(d, kind, groups)
        elif kind == "lowrank":
            per_token = int(spec.split(":")[1]) * 2  # latents in a bf16 model's dtype
        else:
            per_token = d * 2  # a bf16 model's dense cache
        base = rows[0]["ppl"] if rows else ppl
        rows.append(
            {
                "setting": name,
                "spec": spec,
                "group_size": group,
                "recent": recent,
                "key_block": key_block,
                "ppl": ppl,
                "rel_change_pct": 100 * (ppl / base - 1),
                "bytes_per_head_token": per_token,
                "compression_vs_bf16": 2 * d / per_token,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(
            f"{name:24s} ppl {ppl:.4f} ({rows[-1]['rel_change_pct']:+.3f}%)  "
            f"{per_token} B/head/token  {rows[-1]['seconds']} s",
            flush=True,
        )

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "dtype": args.dtype,
        "windows": args.windows,
        "window": 1024,
        "chunk": args.chunk,
        "head_dim": d,
        "host": platform.node(),
        "torch": torch.__version__,
        "command": "python scripts/kv_cache_ppl.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if v is not None and k != "data"
        ),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        md = [
            f"# SmolLM2 chunked perplexity through compressed KV caches ({args.device}, "
            f"{args.dtype}, {args.windows} x 1024 tokens, chunk {args.chunk})",
            "",
            "| setting | PPL | vs dense cache | bytes / head / token | vs bf16 |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            md.append(
                f"| {r['setting']} | {r['ppl']:.4f} | {r['rel_change_pct']:+.3f}% | "
                f"{r['bytes_per_head_token']} | {r['compression_vs_bf16']:.2f}x |"
            )
        Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

"""SmolLM2 wikitext-2 perplexity with INT8 linear layers (W8A16; W8A8 at several alphas).

    python scripts/int8_ppl.py --windows 40 --out bench/results/int8_ppl_cpu.json

Calibration reads wikitext-2 *valid*; perplexity reads *test*. fp32 on CPU by default.
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
from sentinel_kernels.patching import int8 as int8_patching
from sentinel_kernels.quant import calibrate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--alphas", default="0,0.5,0.8")
    add_common_args(ap)
    args = ap.parse_args()
    test, valid, model, tok = load_texts_and_model(args)
    rows = []

    def measure(name: str, **opts) -> None:
        t0 = time.time()
        report = sk.patch_model(model, level=0, **opts) if opts else None
        ppl = sk.eval.perplexity(model, tok, test, window=1024, max_windows=args.windows)
        rows.append(
            {
                "config": name,
                "ppl": ppl,
                "seconds": round(time.time() - t0, 1),
                "weight_bytes": sk.patching.weight_bytes(model),
            }
        )
        base = rows[0]["ppl"]
        print(f"{name:24s} ppl {ppl:.4f} ({100 * (ppl / base - 1):+.3f}%)", flush=True)
        if report is not None:
            sk.unpatch_model(model)

    measure("float")
    measure("w8a16", int8_weights=True)
    cal = calibrate(model, tok, valid, n_samples=args.calib_samples, seq_len=512)
    for a in [float(x) for x in args.alphas.split(",")]:
        int8_patching.SMOOTHQUANT_ALPHA = a
        measure(f"w8a8 alpha={a}", int8_activations=True, calibration_text=cal)
    measure("w8a8 no smoothing", int8_activations=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "windows": args.windows,
        "window": 1024,
        "calibration": f"wikitext2 valid, {args.calib_samples} x 512 tokens",
        "rows": rows,
    }
    for r in rows:
        r["rel_change"] = r["ppl"] / rows[0]["ppl"] - 1
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

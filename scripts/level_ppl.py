"""Do the level table's perplexity budgets hold? SmolLM2 on wikitext-2 test, levels 0-3.

    python scripts/level_ppl.py --device cuda --dtype bfloat16 --windows 40 --json out.json
    python scripts/level_ppl.py --device cpu --dtype float32 --windows 10

Per level: ``patch_model(model, level)`` (level 3 calibrates SmoothQuant and head pruning on
wikitext-2 *validation* text, never on the test split), then
* the one-pass perplexity (windows of 1024 tokens, no cache: what the weights, attention and
  pruning cost), and
* for levels with a KV cache (1: dense, 2: int8, 3: int4) the chunked perplexity that feeds
  each window 32 tokens at a time through the level's cache
  (``sk.eval.perplexity(chunk=32, cache=...)``), so attention reads what the cache stores.
The relative change against level 0 is compared with ``patch.ACCURACY_BUDGET``; the
chunked number of a level is compared with level 0's chunked dense number.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import sentinel_kernels as sk
from sentinel_kernels.patching import ACCURACY_BUDGET

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument(
        "--chunk-windows",
        type=int,
        default=None,
        help="windows for the chunked (cache-reading) perplexity; default = --windows",
    )
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--calibration-chars", type=int, default=60000)
    ap.add_argument(
        "--prune-ratios",
        type=float,
        nargs="+",
        default=None,
        help="level 3 only: run it once per prune_ratio (default: the level's)",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    data = Path(args.data)
    test = (data / "test.txt").read_text(encoding="utf-8")
    calib = (data / "valid.txt").read_text(encoding="utf-8")[: args.calibration_chars]
    model, tok = sk.models.load_smollm2(device=args.device, dtype=dtype)
    cw = args.chunk_windows or args.windows
    rows = []
    base = base_chunk = None
    runs = []
    for level in args.levels:
        if level == 3 and args.prune_ratios:
            runs += [(3, {"prune_ratio": r}) for r in args.prune_ratios]
        else:
            runs.append((level, {}))
    for level, override in runs:
        extra = {"calibration_text": calib, "tokenizer": tok, **override} if level == 3 else {}
        t0 = time.perf_counter()
        report = sk.patch_model(model, level=level, **extra)
        patch_s = time.perf_counter() - t0
        ppl = sk.eval.perplexity(
            model, tok, test, window=1024, max_windows=args.windows, progress=False
        )
        spec = report.options.get("kv_cache") or "dense"
        chunked = sk.eval.perplexity(
            model, tok, test, window=1024, max_windows=cw, progress=False, chunk=32, cache=spec
        )
        sk.unpatch_model(model)
        if level == 0:
            base, base_chunk = ppl, chunked
        row = {
            "level": level,
            "override": override,
            "ppl": ppl,
            "chunked_ppl": chunked,
            "kv_cache": spec,
            "rel": ppl / base - 1 if base else None,
            "chunked_rel": chunked / base_chunk - 1 if base_chunk else None,
            "budget": ACCURACY_BUDGET[level],
            "patch_s": patch_s,
            "options": {
                k: str(v)[:40]
                for k, v in report.enabled_options.items()
                if k not in ("calibration_text", "tokenizer")
            },
        }
        worst = max(abs(row["rel"] or 0.0), abs(row["chunked_rel"] or 0.0))
        row["within_budget"] = level == 0 or worst <= ACCURACY_BUDGET[level]
        rows.append(row)
        print(
            f"level {level} {override or ''}: ppl {ppl:.4f} ({row['rel'] or 0:+.3%}), "
            f"chunked via {spec} "
            f"cache {chunked:.4f} ({row['chunked_rel'] or 0:+.3%}), budget "
            f"{ACCURACY_BUDGET[level]:.1%}: {'ok' if row['within_budget'] else 'OVER'}",
            flush=True,
        )
    meta = {
        "device": args.device,
        "dtype": str(dtype),
        "windows": args.windows,
        "chunk_windows": cw,
        "window": 1024,
        "chunk": 32,
        "text": "wikitext2/test.txt",
        "calibration": f"wikitext2/valid.txt first {args.calibration_chars} chars",
        "torch": torch.__version__,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

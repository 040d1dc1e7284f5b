"""Where the host time of a warm ``sk.generate`` call goes (cProfile), next to its wall time.

    python scripts/host_profile.py --model smollm2-shape --level 2 [--new 256] [--json out.json]

Runs one warm call (graph captured, kernels autotuned) under ``cProfile`` and prints the
functions with the most own time, and one eager prefill forward the same way. On a GPU
the decode loop is host-bound when the host time per token exceeds the graph's replay
time: this says which Python calls make up the difference.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

import sentinel_kernels as sk
from sentinel_kernels.hf_compat import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import llama_1b, smollm2_shape  # noqa: E402


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def _top(prof: cProfile.Profile, n: int) -> list[dict]:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "fn": f"{Path(file).name}:{line}:{name}",
                "calls": nc,
                "tottime_ms": tt * 1e3,
                "cumtime_ms": ct * 1e3,
            }
        )
    return sorted(rows, key=lambda r: -r["tottime_ms"])[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2-shape", "llama1b"], default="smollm2-shape")
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = smollm2_shape("cuda") if args.model == "smollm2-shape" else llama_1b("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sk.patch_model(model, level=args.level)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), device="cuda")

    def call(n: int = args.new, **kw) -> None:
        with torch.inference_mode():
            sk.generate(model, ids, max_new_tokens=n, eos_token_id=[], **kw)

    out: dict = {"model": args.model, "level": args.level, "prompt": args.prompt, "new": args.new}
    eager, graph = {"prefill_graph": False}, {"prefill_graph": True}
    for label, kw in (("eager_prefill", eager), ("prefill_graph", graph)):
        for _ in range(3):
            call(**kw)
        out[f"call_ms_{label}"] = min(_timed(lambda kw=kw: call(**kw)) for _ in range(5))
        for _ in range(2):
            call(1, **kw)
        out[f"call1_ms_{label}"] = min(_timed(lambda kw=kw: call(1, **kw)) for _ in range(5))
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    call()
    torch.cuda.synchronize()
    prof.disable()
    out["call_top"] = _top(prof, args.top)
    spec = report.options.get("kv_cache") or "dense"
    cache = sk.kv_cache(model, spec, max_cache_len=args.prompt + 8)
    with torch.inference_mode():
        for _ in range(3):
            cache.reset()
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        prof = cProfile.Profile()
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prof.enable()
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        prof.disable()
        out["prefill_host_ms"] = (time.perf_counter() - t0) * 1000
        torch.cuda.synchronize()
        out["prefill_wall_ms"] = (time.perf_counter() - t0) * 1000
    out["prefill_top"] = _top(prof, args.top)
    print(
        f"{args.model} level {args.level}: call {out['call_ms_eager_prefill']:.1f} ms "
        f"(1 token {out['call1_ms_eager_prefill']:.1f}); "
        f"prefill_graph: {out['call_ms_prefill_graph']:.1f} "
        f"(1 token {out['call1_ms_prefill_graph']:.1f}); eager prefill host "
        f"{out['prefill_host_ms']:.1f} ms, wall {out['prefill_wall_ms']:.1f} ms"
    )
    for key in ("call_top", "prefill_top"):
        print(f"-- {key} (own time ms, calls)")
        for r in out[key]:
            print(f"  {r['tottime_ms']:8.2f} {r['cumtime_ms']:8.2f} {r['calls']:6d}  {r['fn']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

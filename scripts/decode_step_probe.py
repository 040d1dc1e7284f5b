"""Where a decode step's time goes: kernel count, kernel time and CUDA-graph replay time.

    python scripts/decode_step_probe.py --model smollm2 --levels 1 2 [--json out.json]
    python scripts/decode_step_probe.py --model llama1b --levels 1 2
    python scripts/decode_step_probe.py --model smollm2-shape   # random init, no GGUF file

For each level: patch, run ``sk.generate`` once (captures its decode graph), then
* replay the captured graph 200 times between CUDA events: ms per step (the pure decode
  step, without sampling or the host loop);
* profile one eager decode step (``torch.profiler``, CUDA activity): number of kernels,
  the sum of their durations, and the top kernels by total time.
The gap between replay time and summed kernel time is the per-kernel launch/idle cost
inside the graph.

``--variants fused unfused`` measures each level twice in one run: as patched, and with
the decoder-layer fusion undone (each decoder layer back on its class forward, and the
cache's one-launch RoPE + K/V append switched off): the same step before and after.
``pdl``: the fused step with programmatic dependent launch on (``SENTINEL_PDL``);
``rope``: with each step's RoPE and K/V append inside the decode attention
(``SENTINEL_ROPE_ATTENTION=1``); ``pick``: with the greedy pick of ``ops.greedy_advance``
(``SENTINEL_FUSED_PICK=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

import sentinel_kernels as sk
from sentinel_kernels.decoding import session
from sentinel_kernels.hf_compat import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import (  # noqa: E402  (shared with bench_generate)
    decode_step_kernels,
    llama_1b,
    pdl_on,
    smollm2_shape,
    unfused_decoder,
)


def _model(name: str):
    if name == "smollm2":
        model, _ = sk.models.load_smollm2(device="cuda", dtype=torch.bfloat16)
        return model
    if name == "smollm2-shape":  # random init: timing does not depend on the weights
        return smollm2_shape("cuda")
    return llama_1b("cuda")


def probe(model, level: int, batch: int, prompt: int, new: int, variant: str = "fused") -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sk.patch_model(model, level=level)
    from sentinel_kernels import settings

    ctx = {
        "unfused": unfused_decoder(model),
        "pdl": pdl_on(),
        "rope": settings.override(settings.ROPE_ATTENTION_ENV, "1"),
        "pick": settings.override(settings.FUSED_PICK_ENV, "1"),
    }.get(variant)
    with ctx or contextlib.nullcontext():
        out = _measure(model, report, batch, prompt, new)
    sk.unpatch_model(model)
    session.clear_sessions(model)
    return {
        "level": level,
        "variant": variant,
        "batch": batch,
        "prompt": prompt,
        **out,
        "layers": model.config.num_hidden_layers,
        "options": {k: str(v) for k, v in report.enabled_options.items()},
    }


def _measure(model, report, batch: int, prompt: int, new: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    sk.generate(model, ids, max_new_tokens=new, eos_token_id=[])
    sess = next(reversed(getattr(model, session.SESSIONS_ATTR).values()))
    graph = sess.graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):
        graph.replay()
    start.record()
    for _ in range(200):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 200

    # whole calls: the slope gives the per-token cost (both lengths replay their graph)
    call_ms = {}
    for n in (66, 130):
        sk.generate(model, ids, max_new_tokens=n, eos_token_id=[])
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sk.generate(model, ids, max_new_tokens=n, eos_token_id=[])
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        call_ms[n] = best * 1000
    per_token_ms = (call_ms[130] - call_ms[66]) / 64
    fixed_ms = call_ms[66] - 66 * per_token_ms

    spec = report.options.get("kv_cache") or "dense"
    cache = sk.kv_cache(model, spec, max_cache_len=prompt + 8, batch_size=batch)
    with torch.inference_mode():
        for _ in range(3):  # eager prefill of a fresh cache: the per-call cost
            cache.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            prefill_ms = (time.perf_counter() - t0) * 1000
    kernels = decode_step_kernels(model, ids, spec)
    by_name: dict[str, float] = defaultdict(float)
    n_by_name: Counter[str] = Counter()
    for e in kernels:
        by_name[e.name[:80]] += e.device_time
        n_by_name[e.name[:80]] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {
        "replay_ms": replay_ms,
        "per_token_ms": per_token_ms,
        "fixed_ms": fixed_ms,
        "prefill_ms": prefill_ms,
        "kernels": len(kernels),
        "kernel_us": sum(e.device_time for e in kernels),
        "top": [{"name": n, "us": round(us, 1), "count": n_by_name[n]} for n, us in top],
    }


def main() -> None:
    # the "fused" variant must time the fused kernels, never their fallback
    os.environ.setdefault("SENTINEL_STRICT_KERNELS", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "smollm2-shape", "llama1b"], default="smollm2")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=["fused", "unfused", "pdl", "rope", "pick"],
        default=["fused"],
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    model = _model(args.model)
    results = []
    for level, variant in [(lv, v) for lv in args.levels for v in args.variants]:
        r = probe(model, level, args.batch, args.prompt, args.new, variant)
        r["model"] = args.model
        results.append(r)
        print(
            f"{args.model} level {level} {variant} b{args.batch}: "
            f"replay {r['replay_ms']:.3f} ms/step, "
            f"{r['kernels']} kernels ({r['kernels'] / r['layers']:.1f}/layer), "
            f"kernel time {r['kernel_us'] / 1000:.3f} ms; sk.generate "
            f"{r['per_token_ms']:.3f} ms/token ({1000 / r['per_token_ms']:.0f} tok/s) + "
            f"{r['fixed_ms']:.2f} ms per call (eager "
            f"prefill {r['prefill_ms']:.2f} ms)"
        )
        for t in r["top"][:12]:
            print(f"    {t['us']:8.1f} us  x{t['count']:<4d} {t['name']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

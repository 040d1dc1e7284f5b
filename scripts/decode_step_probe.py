"""Where a decode step's time goes: kernel count, kernel time and CUDA-graph replay time.

    python scripts/decode_step_probe.py --model smollm2 --levels 1 2 [--json out.json]
    python scripts/decode_step_probe.py --model llama1b --levels 1 2

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
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

import sentinel_kernels as sk
from sentinel_kernels.cache import SentinelKVCache
from sentinel_kernels.decoding import session
from sentinel_kernels.nn import fused_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import llama_1b  # noqa: E402  (the Llama-1B shape bench_generate times)


def _model(name: str):
    if name == "smollm2":
        model, _ = sk.models.load_smollm2(device="cuda", dtype=torch.bfloat16)
        return model
    return llama_1b("cuda")


def _unfuse(model) -> None:
    """Undo the decoder-layer fusion of ``fused_layers`` (the "before" of issue 19)."""
    for m in model.modules():
        if type(m).__name__ in fused_layers.DECODER_CLASSES:
            fused_layers._restore(m)
    SentinelKVCache.update_rotary = lambda *args, **kwargs: None  # type: ignore[method-assign]


def probe(model, level: int, batch: int, prompt: int, new: int, variant: str = "fused") -> dict:
    original_update_rotary = SentinelKVCache.update_rotary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sk.patch_model(model, level=level)
    if variant == "unfused":
        _unfuse(model)
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

    extra = {"use_cache": True, "logits_to_keep": 1}
    spec = report.options.get("kv_cache") or "dense"
    cache = sk.kv_cache(model, spec, max_cache_len=prompt + 8, batch_size=batch)
    with torch.inference_mode():
        for _ in range(3):  # eager prefill of a fresh cache: the per-call cost
            cache.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, **extra)
            torch.cuda.synchronize()
            prefill_ms = (time.perf_counter() - t0) * 1000
        step_ids = ids[:, -1:].clone()
        pos = torch.full((batch, 1), prompt, device="cuda", dtype=torch.int64)
        model(input_ids=step_ids, position_ids=pos, past_key_values=cache, **extra)  # warm
        pos += 1
        torch.cuda.synchronize()
    with (
        torch.inference_mode(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof,
    ):
        model(input_ids=step_ids, position_ids=pos, past_key_values=cache, **extra)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    count = len(kernels)
    total_us = sum(e.device_time for e in kernels)
    by_name: dict[str, float] = defaultdict(float)
    n_by_name: Counter[str] = Counter()
    for e in kernels:
        by_name[e.name[:80]] += e.device_time
        n_by_name[e.name[:80]] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    sk.unpatch_model(model)
    session.clear_sessions(model)
    SentinelKVCache.update_rotary = original_update_rotary  # type: ignore[method-assign]
    return {
        "level": level,
        "variant": variant,
        "batch": batch,
        "prompt": prompt,
        "replay_ms": replay_ms,
        "per_token_ms": per_token_ms,
        "fixed_ms": fixed_ms,
        "prefill_ms": prefill_ms,
        "kernels": count,
        "kernel_us": total_us,
        "layers": model.config.num_hidden_layers,
        "options": {k: str(v) for k, v in report.enabled_options.items()},
        "top": [{"name": n, "us": round(us, 1), "count": n_by_name[n]} for n, us in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "llama1b"], default="smollm2")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--variants", nargs="+", choices=["fused", "unfused"], default=["fused"])
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

"""Why is one request through the engine slower than ``sk.generate`` at batch 1? (issue 16:
single-engine 0.83x / 0.88x of ``sk.generate`` at levels 1 / 2 on the H200, commit a2a062a.)

A random model of SmolLM2-135M's shape (bf16, CUDA), patched at each ``--levels`` level;
one 128-token prompt, 256 greedy new tokens (EOS ignored), through ``sk.generate`` and
through ``Engine(max_slots=64, max_seq_len=1024)`` with and without its short-rows
attention plan (``serve.runner.SHORT_ROW_KEYS``), each after a warm-up call. For each,
a ``torch.profiler`` trace of one timed call gives, per generated token:

* wall time (the call), GPU kernel time (sum of kernel durations), kernel launches;
* the GPU idle share (1 - kernel time / wall);
* the kernels by total time (top ``--top``), to see which step work differs.

Run on a GPU machine: ``python scripts/engine_single_probe.py --out $OUT``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams

# by path: `python -P` (used on the GPU machine) leaves bench/ off sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchlib import smollm2_shape  # noqa: E402

PROMPT, NEW = 128, 256


def kernel_table(prof: Any, tokens: int, top: int) -> dict[str, Any]:
    """Kernel count and time per token from a trace, and the top kernels by time."""
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    total_us, count = 0.0, 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        by_name[ev.name][0] += 1
        by_name[ev.name][1] += us
        total_us += us
        count += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "gpu_us_per_token": total_us / tokens,
        "kernels_per_token": count / tokens,
        "top": [
            {"name": n[:90], "calls_per_token": c / tokens, "us_per_token": t / tokens}
            for n, (c, t) in rows
        ],
    }


def measure(call: Any, top: int) -> dict[str, Any]:
    call()  # warm-up (graphs, autotuning)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t1 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        wall_prof = time.perf_counter() - t1
    out = kernel_table(prof, NEW, top)
    out["wall_us_per_token"] = wall / NEW * 1e6
    out["wall_us_per_token_profiled"] = wall_prof / NEW * 1e6
    out["gpu_idle_share_profiled"] = 1 - out["gpu_us_per_token"] / out["wall_us_per_token_profiled"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=".")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(10, 49142, (PROMPT,), generator=g).tolist()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "prompt": PROMPT,
        "new": NEW,
        "levels": {},
    }
    for level in args.levels:
        model = smollm2_shape("cuda")
        sk.patch_model(model, level=level)
        ids = torch.tensor([prompt], device="cuda")

        def gen(model: Any = model, ids: torch.Tensor = ids) -> Any:
            return sk.generate(model, ids, max_new_tokens=NEW, eos_token_id=[])

        entry: dict[str, Any] = {"sk_generate": measure(gen, args.top)}
        engine = Engine(model, None, max_slots=64, max_seq_len=1024, max_prefill_tokens=2048)
        params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
        try:

            def eng(engine: Engine = engine, params: SamplingParams = params) -> Any:
                return engine.generate([prompt], params)

            entry["engine"] = measure(eng, args.top)
            # The same engine without the short-rows attention plan (serve.runner.SHORT_ROW_KEYS):
            # its steps replay the graphs planned for the 1024-key capacity (split + merge).
            engine._runner.short_rows = False
            entry["engine_no_short_plan"] = measure(eng, args.top)
            engine._runner.short_rows = True
            same = engine.generate([prompt], params)[0].token_ids == gen()[0, PROMPT:].tolist()
            entry["same_tokens"] = same
        finally:
            engine.shutdown()
        report["levels"][str(level)] = entry
        for k in ("sk_generate", "engine", "engine_no_short_plan"):
            e = entry[k]
            print(
                f"L{level} {k:12s} wall {e['wall_us_per_token']:7.1f} us/tok "
                f"(profiled {e['wall_us_per_token_profiled']:7.1f}), "
                f"GPU {e['gpu_us_per_token']:7.1f} us/tok, "
                f"{e['kernels_per_token']:6.1f} kernels/tok, "
                f"idle {e['gpu_idle_share_profiled']:.0%}"
            )
            for row in e["top"][:12]:
                print(
                    f"    {row['us_per_token']:7.1f} us {row['calls_per_token']:5.2f}x",
                    row["name"],
                )
        del engine, model
        torch.cuda.empty_cache()
    path = Path(args.out) / "engine_single_probe.json"
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()

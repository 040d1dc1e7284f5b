"""Which kernels make the engine's lone decode step slower than ``sk.generate``'s?

Profiles (torch.profiler, CUDA kernel time) one warm ``sk.generate`` call and one warm
``Engine.generate`` of the same single greedy request (SmolLM2-shaped random model, level
1; ``Engine(max_slots=64, max_seq_len=1024)``) and prints each side's kernels by total
time per generated token, with launch counts per token.

    python scripts/engine_kernel_probe.py [--new 128] [--slots 64] [--max-seq-len 1024]
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _kernels(prof: profile, new: int) -> list[tuple[str, float, float]]:
    tot: dict[str, float] = collections.defaultdict(float)
    cnt: dict[str, int] = collections.defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name] += ev.device_time_total
            cnt[ev.name] += 1
    rows = [(n[:90], tot[n] / new, cnt[n] / new) for n in tot]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    from benchlib import smollm2_shape

    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = smollm2_shape("cuda", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)
    prompt = torch.randint(3, model.config.vocab_size, (128,)).tolist()
    ids = torch.tensor([prompt], device="cuda")

    def gen() -> None:
        sk.generate(model, ids, max_new_tokens=args.new, eos_token_id=[])

    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    with Engine(model, None, max_slots=args.slots, max_seq_len=args.max_seq_len) as engine:
        runs = {"sk.generate": gen, "engine": lambda: engine.generate([prompt], params)}
        for name, fn in runs.items():
            fn()
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            rows = _kernels(prof, args.new)
            total = sum(r[1] for r in rows)
            launches = sum(r[2] for r in rows)
            print(f"== {name}: {total:.1f} us kernel time / token, {launches:.1f} kernels / token")
            for n, us, c in rows[: args.top]:
                print(f"  {us:8.2f} us {c:6.2f}x  {n}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

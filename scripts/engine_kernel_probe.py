"""Which kernels make the engine's lone decode step slower than ``sk.generate``'s?

Profiles (torch.profiler, CUDA kernel time) one warm ``sk.generate`` call and one warm
``Engine.generate`` of the same ``--batch`` greedy requests of ``--prompt`` random tokens
(SmolLM2-shaped random model, ``--level``; ``Engine(max_slots=64, max_seq_len=1024)``;
``sk.generate`` runs them as one batch, no padding since the prompts are equally long)
and prints each side's kernels (``sk.generate`` twice: before the engine is built and
after) by total time per decode step (one new token for every
row), with launch counts per step, then the launch configs the decode-attention
autotuner picked (per autotune key), since the engine autotunes at start-up.

    python scripts/engine_kernel_probe.py [--batch 1] [--prompt 128] [--new 128]
        [--level 1] [--slots 64] [--max-seq-len 1024]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _profile import kernel_totals  # noqa: E402 (after the path set-up)


def _kernels(prof: profile, new: int) -> list[tuple[str, float, float]]:
    rows = [(n[:90], us / new, c / new) for n, (us, c) in kernel_totals(prof).items()]
    return sorted(rows, key=lambda r: -r[1])


def _gaps(prof: profile, new: int, top: int) -> None:
    """Idle GPU time between consecutive kernels (from the trace's start/end times), per
    step, in total and by the kernel the gap follows: where a step's span exceeds its
    kernels' sum."""
    spans = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA
    )
    if not spans:
        return
    by_prev: dict[str, float] = collections.defaultdict(float)
    idle = 0.0
    end = spans[0][1]
    prev = spans[0][2]
    for s, e, name in spans[1:]:
        if s > end:
            idle += s - end
            by_prev[prev[:70]] += s - end
        if e >= end:
            end, prev = e, name
    span = end - spans[0][0]
    print(f"  span {span / new:.1f} us / step, idle between kernels {idle / new:.1f} us / step")
    for name, us in sorted(by_prev.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    idle after {name}: {us / new:.2f} us / step")


def main() -> None:
    from benchlib import smollm2_shape

    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = smollm2_shape("cuda", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=args.level)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt)).tolist()
    ids = torch.tensor(prompts, device="cuda")

    def gen() -> None:
        sk.generate(model, ids, max_new_tokens=args.new, eos_token_id=[])

    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)

    def probe(name: str, fn) -> None:  # noqa: ANN001 - a probe
        fn()
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = _kernels(prof, args.new)
        total = sum(r[1] for r in rows)
        launches = sum(r[2] for r in rows)
        print(f"== {name}: {total:.1f} us kernel time / step, {launches:.1f} kernels / step")
        for n, us, c in rows[: args.top]:
            print(f"  {us:8.2f} us {c:6.2f}x  {n}")
        _gaps(prof, args.new, args.top)

    # sk.generate before any engine exists, then again beside it: building an engine
    # left sk.generate ~13% slower for the rest of the process (H100, session 18,
    # scripts/generate_drift_probe.py), so "before" is the state a user of sk.generate
    # alone sees.
    probe("sk.generate, before the engine", gen)
    with Engine(model, None, max_slots=args.slots, max_seq_len=args.max_seq_len) as engine:
        probe("sk.generate, engine built", gen)
        probe("engine", lambda: engine.generate(prompts, params))
    _print_tuned()


def _print_tuned() -> None:
    """The decode-attention autotuner's choice per key (BLOCK_D, ROWS, num_splits,
    L_BUCKET, ...): the engine's first call of a key is its start-up warm-up."""
    from sentinel_kernels.kernels import decode_attention as kda

    for tuner in kda._tuners.values():
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"  tuned {key[:4]}: {cfg}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

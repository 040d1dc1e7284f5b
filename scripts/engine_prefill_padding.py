"""How many prompt tokens does the engine's prefill pay for, padding included?

Runs ``bench_engine``'s offline workload (512 requests, prompts of 32-512 tokens, outputs
of 16-256; ``GPU_SIZES``: 64 slots, ``max_seq_len`` 1024, ``max_prefill_tokens`` 2048)
through a CPU engine over a one-layer random Llama (the scheduling does not depend on the
model), records every prefill forward's prompts, and counts the tokens a GPU engine's
prefill graphs would compute for them: each group padded to the smallest captured
(rows, width) bucket (``runner.buckets_for`` rows up to 16, ``runner.widths_for`` widths,
at most 4 x ``max_prefill_tokens`` padded tokens; the engine's rule). Also the padding
of the same groups without buckets (rows x longest prompt), and of regroupings of each
step's prompts (sorted, cut into contiguous groups by a dynamic program minimizing
padded tokens + ``C`` per forward, for several ``C``: a forward's fixed cost in tokens).
The static baseline of ``bench_engine`` pads its 64-prompt batches to the longest prompt.

With ``--packed`` the engine packs each step's whole prompts into one row
(``Engine(packed_prefill=True)``, the GPU default): every forward is then counted at its
real total and at the packed graph width a GPU engine would replay
(``runner.packed_widths``).

    python scripts/engine_prefill_padding.py [--packed] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def main() -> None:
    import bench_engine as be

    import sentinel_kernels as sk
    from sentinel_kernels.serve import Engine, SamplingParams
    from sentinel_kernels.serve.runner import (
        MAX_PREFILL_BATCH,
        buckets_for,
        packed_widths,
        widths_for,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packed", action="store_true", help="the engine's packed prefill")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = be.GPU_SIZES
    # SmolLM2's vocabulary: the workload's prompt lengths depend on it (its rng draws ids)
    model = sk.models.tiny(
        "llama",
        vocab_size=49152,
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=2048,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)
    wl = be.make_workload(model.config.vocab_size, sizes)
    steps: dict[int, list[list[int]]] = collections.defaultdict(list)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.outputs]
    with Engine(
        model,
        None,
        max_slots=sizes.max_slots,
        max_seq_len=sizes.max_seq_len,
        max_prefill_tokens=sizes.max_prefill_tokens,
        packed_prefill=args.packed,
    ) as engine:
        runner = engine._runner  # noqa: SLF001 - a probe of the engine's internals
        prefill = runner.prefill

        def record(slots, prompts, start=0, max_width=None):  # noqa: ANN001, ANN202
            steps[engine.stats()["steps"]].append([len(p) for p in prompts])
            return prefill(slots, prompts, start, max_width)

        runner.prefill = record
        engine.generate(wl.prompts, params)
        pack_width = runner.pack_width
    if args.packed:
        groups = [g for v in steps.values() for g in v]
        real = sum(sum(g) for g in groups)
        widths = packed_widths(pack_width)
        # whole prompts that packed replay the narrowest width; a long prompt's chunk alone
        # runs as before (its own length)
        packed = sum(min((w for w in widths if w >= sum(g)), default=sum(g)) for g in groups)
        rows_p = {
            "packed": True,
            "pack_width": pack_width,
            "real_prompt_tokens": real,
            "forwards": len(groups),
            "packed_graph_tokens": packed,
            "group_sizes": collections.Counter(len(g) for g in groups).most_common(),
        }
        print(
            f"packed: {real} real prompt tokens in {len(groups)} forwards; at the packed "
            f"graph widths {packed} ({packed / real:.2f}x); group sizes {rows_p['group_sizes']}"
        )
        if args.out is not None:
            args.out.write_text(json.dumps(rows_p, indent=1))
        return
    cap = 4 * sizes.max_prefill_tokens
    graphs = [
        (r, w)
        for r in buckets_for(min(sizes.max_slots, MAX_PREFILL_BATCH))
        for w in widths_for(min(sizes.max_seq_len, cap))
        if r * w <= cap
    ]

    def padded(k: int, w: int) -> int:
        fits = [(gw, gr) for gr, gw in graphs if gr >= k and gw >= w]
        if not fits:
            return k * w  # eager: no bucket
        gw, gr = min(fits)
        return gr * gw

    groups = [g for v in steps.values() for g in v]
    real = sum(sum(g) for g in groups)
    rows = {
        "real_prompt_tokens": real,
        "forwards": len(groups),
        "graph_padded_tokens": sum(padded(len(g), max(g)) for g in groups),
        "group_padded_tokens": sum(len(g) * max(g) for g in groups),
        "static_padded_tokens": sum(
            len(b) * max(len(p) for p in b)
            for b in (
                wl.prompts[i : i + sizes.static_batch]
                for i in range(0, len(wl.prompts), sizes.static_batch)
            )
        ),
        "group_sizes": collections.Counter(len(g) for g in groups).most_common(),
        "regrouped": [],
    }
    for c in (0, 128, 256, 512, 1024):
        total = forwards = 0
        for v in steps.values():
            lens = sorted(n for g in v for n in g)

            @functools.cache
            def best(i: int, lens: tuple[int, ...] = tuple(lens), c: int = c) -> tuple[int, int]:
                if i == len(lens):
                    return (0, 0)
                out = None
                for j in range(i + 1, min(len(lens), i + MAX_PREFILL_BATCH) + 1):
                    k, w = j - i, lens[j - 1]
                    if k > 1 and k * w > sizes.max_prefill_tokens:
                        break
                    cost, n = best(j)
                    cand = (padded(k, w) + c + cost, n + 1)
                    if out is None or cand[0] < out[0]:
                        out = cand
                assert out is not None
                return out

            cost, n = best(0)
            total += cost - c * n
            forwards += n
        rows["regrouped"].append({"C": c, "padded_tokens": total, "forwards": forwards})
    for k in ("graph_padded_tokens", "group_padded_tokens", "static_padded_tokens"):
        print(f"{k:<22} {rows[k]:>8}  ({rows[k] / real:.2f}x the {real} real prompt tokens)")
    print(f"forwards {rows['forwards']}, group sizes {rows['group_sizes']}")
    for r in rows["regrouped"]:
        print(
            f"regrouped, C = {r['C']:>4}: {r['padded_tokens']} padded tokens "
            f"({r['padded_tokens'] / real:.2f}x) in {r['forwards']} forwards"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()

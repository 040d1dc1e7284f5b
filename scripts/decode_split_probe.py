"""Decode attention time against the number of KV splits, dense and with head masks.

Tuning aid for ``kernels/decode_attention.py`` (the proof is ``bench/bench_attention.py``):
GQA 32/8, B8, L8192, D128 bf16, CUDA-graph replays, median of 20.

    python scripts/decode_split_probe.py
"""

from __future__ import annotations

import torch

import sentinel_kernels as sk
from sentinel_kernels.kernels import decode_attention as kda


def main() -> None:
    b, hq, hkv, length, d = 8, 32, 8, 8192, 128
    sets = [
        (
            torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16),
            torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(3)
    ]
    lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    heads = torch.arange(hq, device="cuda")
    masks = {"dense": None, "50pct-groups": (heads // 4) % 2 == 0, "50pct-heads": heads % 2 == 0}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("default splits:", kda.choose_num_splits(b * hkv, length, sms))
    for splits in (None, 4, 6, 8, 12, 16, 24, 32):
        line = []
        for name, m in masks.items():

            def call(q, k, v, m=m, splits=splits):
                return sk.ops.decode_attention(q, k, v, lens, head_mask=m, num_splits=splits)

            for a in sets:
                call(*a)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for a in sets:
                    call(*a)
            ts = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                g.replay()
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e) * 1e3 / len(sets))
            ts.sort()
            line.append(f"{name} {ts[10]:.1f} us")
        print(f"splits {splits}: " + ", ".join(line), flush=True)


if __name__ == "__main__":
    main()

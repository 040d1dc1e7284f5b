"""GPU probe: does the INT8 V-code layout limit decode attention over an INT8 KV cache?

    python scripts/kv_layout_probe.py --out probe.json

A stripped-down split-KV decode loop (GQA group of 4 query rows padded to 16, online
softmax, no masks, no scales, partial results discarded) streams B8 x Hkv8 x L8192 x D128
K/V in four variants, each timed from a CUDA graph:

* ``bf16``: K and V bf16, ``[L, D]`` rows (the dense kernel's layout);
* ``int8 rows``: K and V int8 codes, both ``[L, D]`` (the cache's layout today);
* ``int8 vT``: K int8 ``[L, D]``, V int8 stored transposed ``[D, L]`` (the key axis, the
  reduction axis of P.V, contiguous);
* ``int8 K only``: the QK half alone (no P.V), to split the cost.

If ``int8 vT`` is much faster than ``int8 rows``, storing V codes transposed is the fix for
the compressed decode (README, "Compressed KV cache").
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from kv_decode_probe import time_graph  # scripts/ is on sys.path when run as a script


@triton.jit
def _probe_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    L,
    num_splits,
    MODE: tl.constexpr,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # MODE 0: bf16 rows; 1: int8 rows; 2: int8 K rows + V transposed; 3: int8 K only.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_d = tl.arange(0, D)
    rows = tl.arange(0, ROWS)
    q = tl.load(q_ptr + pid * ROWS * D + rows[:, None] * D + offs_d[None, :])
    chunk = L // num_splits
    start = split * chunk
    k_base = k_ptr + pid.to(tl.int64) * L * D
    v_base = v_ptr + pid.to(tl.int64) * L * D
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for n0 in range(start, start + chunk, BLOCK_N):
        offs_n = n0 + offs_n0
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :])
        s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MODE == 3:
            acc = acc * alpha[:, None]
        elif MODE == 2:
            vt = tl.load(v_base + offs_d[:, None] * L + offs_n[None, :])  # [D, BLOCK_N]
            acc = tl.dot(p.to(tl.bfloat16), tl.trans(vt.to(tl.bfloat16)), acc * alpha[:, None])
        else:
            v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :])
            acc = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc * alpha[:, None])
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(
        out_ptr + (pid * num_splits + split) * ROWS * D + rows[:, None] * D + offs_d[None, :], o
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    groups, length, d, rows = 64, 8192, 128, 16  # B8 x Hkv8; 4 query heads padded to 16
    q = torch.randn(groups, rows, d, device="cuda", dtype=torch.bfloat16)
    kb = torch.randn(groups, length, d, device="cuda", dtype=torch.bfloat16)
    vb = torch.randn(groups, length, d, device="cuda", dtype=torch.bfloat16)
    k8 = torch.randint(-127, 128, (groups, length, d), device="cuda", dtype=torch.int8)
    v8 = torch.randint(-127, 128, (groups, length, d), device="cuda", dtype=torch.int8)
    v8t = v8.transpose(1, 2).contiguous()
    results = []
    for name, mode, k, v in (
        ("bf16", 0, kb, vb),
        ("int8 rows", 1, k8, v8),
        ("int8 vT", 2, k8, v8t),
        ("int8 K only", 3, k8, v8),
    ):
        for block_n, warps, stages in ((64, 4, 3), (128, 4, 2), (64, 4, 4), (128, 4, 3)):
            for splits in (4, 8):
                out = torch.empty(groups * splits * rows * d, device="cuda")

                def fn(
                    mode=mode,
                    k=k,
                    v=v,
                    out=out,
                    splits=splits,
                    block_n=block_n,
                    warps=warps,
                    stages=stages,
                ):
                    _probe_kernel[(groups, splits)](
                        q,
                        k,
                        v,
                        out,
                        length,
                        splits,
                        MODE=mode,
                        D=d,
                        ROWS=rows,
                        BLOCK_N=block_n,
                        num_warps=warps,
                        num_stages=stages,
                    )

                try:
                    t = time_graph(fn)
                except Exception as exc:  # out of shared memory etc.
                    print(name, block_n, warps, stages, splits, "failed:", str(exc)[:80])
                    t = float("nan")
                results.append(
                    {
                        "variant": name,
                        "block_n": block_n,
                        "warps": warps,
                        "stages": stages,
                        "splits": splits,
                        "us": t,
                    }
                )
                print(
                    f"{name:12s} BN{block_n} w{warps} s{stages} splits{splits}: {t:.1f} us",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "triton": triton.__version__,
                    "rows": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

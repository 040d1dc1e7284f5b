"""Instructions per loop iteration of the decode-attention kernels on sm_90, without a GPU.

The launcher (``kernels.decode_attention.decode_attention_fwd``) is called on CPU tensors
of the named case with its kernels replaced by recorders, so the arguments and
constexprs are exactly the ones a GPU launch would pass; each recorded kernel is then
compiled for ``GPUTarget("cuda", 90, 32)`` (integer arguments divisible by 16 marked as
Triton specializes them at run time) and its SASS (``cuobjdump`` of Triton's wheel) is
cut at backward branches: each loop's length and its opcode mix. A loop that issues
more instructions per tile than the memory system needs cycles to deliver the tile's
bytes is issue-bound, which is what this is for (issue 19, item 4).

    python scripts/decode_sass_probe.py --case kivi --set K_FULL=1 V_DEQ=1 V_FULL=1 ASM=1
    python scripts/decode_sass_probe.py --case int8 --block-n 128 --stages 2
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sentinel_kernels.kernels import decode_attention as da

TARGET = GPUTarget("cuda", 90, 32)
_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
       torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


class _Recorder:
    def __init__(self, name: str, fn, calls: list) -> None:
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((self.name, self.fn, args, kw))

        return launch


def _case(name: str, length: int, batch: int, hq: int, hkv: int, d: int):
    from sentinel_kernels.reference import kv_formats  # noqa: F401 (import check)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, 1, d, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    lens = torch.full((batch,), length, dtype=torch.int32)
    kw: dict = dict(scale=d**-0.5, window=0, key_mask=None, head_active=None)
    if name == "int8":
        k = torch.zeros(batch, hkv, length, d, dtype=torch.int8)
        ks = torch.ones(batch, hkv, length, 1, dtype=torch.float16)
        kw.update(kv_format="int8", k_scale=ks, v_scale=ks.clone())
        return q, k, k.clone(), out, lens, kw
    if name == "kivi":
        # KIVI_T / KIVI_NG: the key block and value groups (default 64 and one per 32)
        t = int(os.environ.get("KIVI_T", "64"))
        ring, ng = 128, int(os.environ.get("KIVI_NG", max(1, d // 32)))
        k = torch.zeros(batch, hkv, length, d // 2, dtype=torch.uint8)
        ks = torch.ones(batch, hkv, length // t, d, 2, dtype=torch.float16)
        vs = torch.ones(batch, hkv, length, ng, 2, dtype=torch.float16)
        kr = torch.zeros(batch, hkv, ring, d, dtype=torch.bfloat16)
        kw.update(
            kv_format="int4", k_scale=ks, v_scale=vs, k_recent=kr, v_recent=kr.clone(), key_block=t
        )
        return q, k, k.clone(), out, lens - t // 2, kw
    k = torch.zeros(batch, hkv, length, d, dtype=torch.bfloat16)
    return q, k, k.clone(), out, lens, kw


def _compile(fn, args, meta, warps: int, stages: int, maxnreg: int | None = None):
    names = fn.arg_names
    consts = {n: v for n, v in meta.items() if n in names}
    sig, attrs = {}, {}
    pos = 0
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            continue
        a = args[pos]
        pos += 1
        if isinstance(a, torch.Tensor):
            sig[n] = "*" + _TT[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if a % 16 == 0 and a != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts: dict = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=opts)


def _loops(cubin: bytes) -> None:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [f"{bindir}/cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [f"{bindir}/cuobjdump", "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    print("  " + res.strip().splitlines()[-1].strip())
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), line))
    for addr, op, line in ins:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", line.split("BRA")[1])
            if t and int(t.group(1), 16) < addr:
                lo = int(t.group(1), 16)
                body = [o for a, o, _ in ins if lo <= a <= addr]
                mix = collections.Counter(o.split(".")[0] for o in body).most_common(14)
                spill = sum(o.split(".")[0] in ("STL", "LDL") for o in body)
                print(f"  loop {lo:#x}..{addr:#x}: {len(body)} instructions ({spill} STL/LDL)")
                print("    " + " ".join(f"{o}:{c}" for o, c in mix))
                dump = os.environ.get("SASS_DUMP")
                if dump:
                    with open(f"{dump}_{lo:x}.sass", "w") as f:
                        f.write("\n".join(ln for a, _, ln in ins if lo <= a <= addr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["dense", "int8", "kivi"], default="kivi")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, nargs=3, default=(32, 8, 128))
    ap.add_argument("--block-n", type=int, default=0, help="split kernel: BLOCK_N (0: default)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap (0: none)")
    ap.add_argument("--set", nargs="*", default=[], help="constexpr overrides NAME=INT")
    a = ap.parse_args()
    # The counts depend on the compiler: match the GPU machine's Triton (scripts/README.md).
    print(f"triton {triton.__version__}")
    calls: list = []
    da._AUTOTUNE = False
    da._num_sms = lambda t: 132
    da._split_jit = _Recorder("split", da._decode_split_kernel, calls)
    da._decode_kivi_kernel = _Recorder("kivi", da._decode_kivi_kernel, calls)
    da._decode_combine_kernel = _Recorder("combine", None, [])
    q, k, v, out, lens, kw = _case(a.case, a.length, a.batch, *a.heads)
    da.decode_attention_fwd(q, k, v, out, lens, **kw)
    for name, fn, args, meta in calls:
        meta = {m: x for m, x in meta.items() if m not in ("num_warps", "num_stages")}
        if a.block_n:
            meta["BLOCK_N"] = a.block_n
        for s in a.set:
            n, x = s.split("=")
            meta[n] = bool(int(x)) if isinstance(meta.get(n), bool) else int(x)
        shown = {m: x for m, x in meta.items() if m.isupper()}
        print(f"{name}: {shown}")
        c = _compile(fn, args, meta, a.warps, a.stages, a.maxnreg or None)
        if os.environ.get("TTGIR_DUMP"):
            with open(os.environ["TTGIR_DUMP"], "w") as f:
                f.write(c.asm["ttgir"])
        print(f"  shared {c.metadata.shared} B")
        _loops(c.asm["cubin"])


if __name__ == "__main__":
    main()

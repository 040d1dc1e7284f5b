"""Each KIVI loop variant (kernels.decode_attention.KIVI_LOOP) against the fp64 oracle on
the cases of tests/ops/test_decode_attention_kivi.py: which variant breaks where.

    SENTINEL_AUTOTUNE=0 python scripts/kivi_variant_check.py [VARIANT ...]
"""

from __future__ import annotations

import sys

import torch

sys.path[:0] = ["tests", "tests/ops"]
from helpers import randn, rel_error  # noqa: E402
from test_decode_attention_kivi import DECODE_CASES, _kivi_cache, _run  # noqa: E402

from sentinel_kernels.kernels import decode_attention as kda  # noqa: E402

VARIANTS = {
    "base": dict(K_FULL=False, V_DEQ=False, V_FULL=False, ASM=False),
    "vdeq": dict(K_FULL=False, V_DEQ=True, V_FULL=False, ASM=False),
    "vdeq-asm": dict(K_FULL=False, V_DEQ=True, V_FULL=False, ASM=True),
    "kfull": dict(K_FULL=True, V_DEQ=False, V_FULL=False, ASM=False),
    "kfull-asm": dict(K_FULL=True, V_DEQ=False, V_FULL=False, ASM=True),
    "vfull": dict(K_FULL=False, V_DEQ=True, V_FULL=True, ASM=False),
    "vfull-asm": dict(K_FULL=False, V_DEQ=True, V_FULL=True, ASM=True),
    "full-asm": dict(K_FULL=True, V_DEQ=True, V_FULL=True, ASM=True),
}


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    for case in DECODE_CASES:
        b, hq, hkv, sq, d, t, cap, w, lens, ng = case
        if d & (d - 1) or ng == 1:
            continue  # the variants differ only where D is a power of two and NG > 1
        for dt in (torch.float16, torch.bfloat16):
            cache = _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dt, seed=d + t)
            q = randn((b, hq, sq, d), dt, "cuda", seed=5)
            errs = []
            for name in names:
                kda.KIVI_LOOP.update(**VARIANTS[name])
                out, exp = _run(q, cache, lens)
                errs.append(f"{name}={rel_error(out, exp):.1e}")
            print(f"D{d} T{t} NG{ng} Sq{sq} {str(dt)[6:]}: " + " ".join(errs), flush=True)


if __name__ == "__main__":
    main()

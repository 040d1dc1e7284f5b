"""Where does an eager prefill forward spend its time? Wall time per forward and a cProfile
of one forward, for a random Llama of SmolLM2-135M's shape (bf16), unpatched (sdpa) and at
patch levels 1 and 2.

Run on a GPU machine: python scripts/prefill_probe.py [--tokens 128 2048] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

import sentinel_kernels as sk

# by path: `python -P` (used on the GPU machine) leaves scripts/ and bench/ off sys.path
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "scripts"), str(_ROOT / "bench")]
from benchlib import smollm2_shape  # noqa: E402
from overhead_probe import per_call_us  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    for level in args.levels:
        model = smollm2_shape("cuda")
        if level:
            sk.patch_model(model, level=level)
        for n in args.tokens:
            ids = torch.randint(0, 49152, (1, n), device="cuda")

            @torch.inference_mode()
            def fwd(model: torch.nn.Module = model, ids: torch.Tensor = ids) -> None:
                model(input_ids=ids, use_cache=True, logits_to_keep=1)

            ms = per_call_us(fwd, n=10) / 1e3
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fwd()
            host = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
            print(f"level {level} tokens {n}: {ms:.2f} ms per forward (host part {host:.2f} ms)")
            if n == args.tokens[0]:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(5):
                    fwd()
                prof.disable()
                torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
                print(s.getvalue()[-9000:])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

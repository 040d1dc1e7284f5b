"""Would KIVI's per-channel key quantization beat per-token INT4 keys on SmolLM2?

    python scripts/kivi_channel_ppl.py --windows 3 --out result.json

A *simulation* (fake quantization), not a kernel: a dense ``sk.kv_cache`` whose appends
store ``dequantize(quantize(x))``, fed by ``sk.eval.perplexity(chunk=32)`` so each chunk of
32 tokens is quantized when it is appended and later chunks read it. Settings, all 4-bit
asymmetric (scale and minimum in fp16, as the INT4 cache):

* ``per-token g32``: keys and values per token, groups of 32 channels (what the INT4 cache
  stores, without its recent ring);
* ``KIVI keys per-channel``: keys per channel over each 32-token chunk (KIVI, Liu et al.
  2024: key outliers sit in fixed channels), values per token in groups of 32;
* the dense cache as the baseline.
The chunk is the quantization group along tokens, which is KIVI's group size 32; KIVI's
full-precision residual of recent tokens is not modelled (compare with the ring-less INT4
rows of the README table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sentinel_kernels as sk
from sentinel_kernels import kv_cache as kvc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"


def _fake4(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Asymmetric 4-bit round trip with min/max taken along ``dim`` (fp16 scale and min)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / 15.0).to(torch.float16).float()
    lo = lo.to(torch.float16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - lo) / safe), 0, 15)
    return torch.where(scale > 0, q * scale + lo, lo)


def per_token(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """[B, H, S, D]: groups of ``group`` channels per token."""
    b, h, s, d = x.shape
    g = x.float().reshape(b, h, s, d // group, group)
    return _fake4(g, -1).reshape(b, h, s, d).to(x.dtype)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D]: each channel over the S tokens of the chunk."""
    return _fake4(x.float(), 2).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out")
    args = ap.parse_args()
    test = (Path(args.data) / "test.txt").read_text()
    model, tok = sk.models.load_smollm2(device="cpu", dtype=torch.float32)
    original = kvc.SentinelKVLayer.append
    settings = {
        "dense": None,
        "per-token g32 (keys and values)": (per_token, per_token),
        "KIVI keys per-channel, values per-token g32": (per_channel, per_token),
        # One group per value vector (D = 64 on SmolLM2): the cheapest value layout to read.
        "KIVI keys per-channel, values per-token g64": (
            per_channel,
            lambda x: per_token(x, x.shape[-1]),
        ),
    }
    rows = {}
    try:
        for name, fns in settings.items():
            if fns is None:
                kvc.SentinelKVLayer.append = original
            else:
                kf, vf = fns

                def append(self, key, value, kf=kf, vf=vf):
                    return original(self, kf(key), vf(value))

                kvc.SentinelKVLayer.append = append
            ppl = sk.eval.perplexity(
                model,
                tok,
                test,
                window=1024,
                max_windows=args.windows,
                chunk=32,
                cache="dense",
                progress=False,
            )
            rows[name] = ppl
            print(f"{name}: {ppl:.4f} ({ppl / rows['dense'] - 1:+.2%})", flush=True)
    finally:
        kvc.SentinelKVLayer.append = original
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"windows": args.windows, "chunk": 32, "device": "cpu fp32", "ppl": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()

"""Shared setup of the WikiText-2 perplexity scripts (``int8_ppl.py``, ``kv_cache_ppl.py``).

The scripts run as ``python scripts/<name>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sentinel_kernels as sk

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """``--device --dtype --calib-samples --out --data``, the options both scripts take."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--data", default=str(DATA))


def load_texts_and_model(args: argparse.Namespace):
    """``(test text, valid text, model, tokenizer)``: SmolLM2 on ``args.device`` / ``dtype``."""
    dtype = getattr(torch, args.dtype)
    test = (Path(args.data) / "test.txt").read_text()
    valid = (Path(args.data) / "valid.txt").read_text()
    model, tok = sk.models.load_smollm2(device=args.device, dtype=dtype)
    return test, valid, model, tok

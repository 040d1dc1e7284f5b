"""Write a transformers folder holding a random-init model of SmolLM2-135M's shape (bf16)
with SmolLM2's real tokenizer and chat template, for speed runs where weights do not matter
(the serving comparison: both servers load the same folder; ``generation_config.eos_token_id
= -1`` makes `transformers serve` generate ``max_tokens`` like ``ignore_eos`` does for ours).

Here (with SmolLM2 installed):   python scripts/random_smollm2_folder.py --export .gpu/smolcfg
On the GPU machine:              python3 scripts/random_smollm2_folder.py .gpu/smolcfg /tmp/smol_hf
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch


def export(dst: str) -> None:
    """Save SmolLM2's tokenizer files and config (without the GGUF quantization entry)."""
    import sentinel_kernels as sk

    model, tok = sk.models.load_smollm2(device="cpu")
    os.makedirs(dst, exist_ok=True)
    tok.save_pretrained(dst)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    with open(os.path.join(dst, "sk_config.json"), "w") as f:
        json.dump(cfg, f)


def build(src: str, dst: str, device: str) -> None:
    """The random-init model of ``src``'s config (seed 0, bf16) and its tokenizer, in ``dst``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(os.path.join(src, "sk_config.json")) as f:
        cfg = json.load(f)
    for k in ("_name_or_path", "transformers_version", "quantization_config"):
        cfg.pop(k, None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.generation_config.eos_token_id = -1
    model.save_pretrained(dst)
    for name in os.listdir(src):
        if name != "sk_config.json" and not name.endswith(".py"):
            shutil.copy(os.path.join(src, name), dst)
    print("saved", dst, sum(p.numel() for p in model.parameters()), "parameters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", help="a folder written by --export")
    ap.add_argument("dst", nargs="?", help="the transformers folder to write")
    ap.add_argument("--export", metavar="DIR", help="write SmolLM2's tokenizer and config here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.export:
        export(args.export)
    elif args.src and args.dst:
        build(args.src, args.dst, args.device)
    else:
        ap.error("give SRC DST, or --export DIR")


if __name__ == "__main__":
    main()

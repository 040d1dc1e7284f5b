"""Greedy parity of ``sk.generate`` on the GPU: transformers' ``generate`` with its own
cache, with a preallocated ``sk.kv_cache`` of the same length, and ``sk.generate`` with and
without the CUDA graph; prints where the outputs first differ.

    python scripts/generate_parity.py
"""

from __future__ import annotations

import warnings

import torch

import sentinel_kernels as sk


def first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "equal"
    cols = (a != b).any(0).nonzero()
    return f"differ from column {int(cols[0])} of {a.shape[1]}"


def main() -> None:
    warnings.simplefilter("ignore")
    for level in (1, 2):
        for dtype in (torch.float16, torch.bfloat16):
            torch.manual_seed(0)
            model = sk.models.tiny("llama").eval().to("cuda", dtype)
            report = sk.patch_model(model, level=level)
            spec = report.options.get("kv_cache") or "dense"
            ids = torch.randint(3, model.config.vocab_size, (3, 13), device="cuda")
            mask = torch.ones_like(ids)
            mask[2, :5] = 0
            kw = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=2, pad_token_id=0)
            with torch.inference_mode():
                hf = model.generate(ids, do_sample=False, **kw)
                cache = sk.kv_cache(model, spec, max_cache_len=53, batch_size=3)
                hf_static = model.generate(ids, do_sample=False, past_key_values=cache, **kw)
            eager = sk.generate(model, ids, cuda_graph=False, **kw)
            graph = sk.generate(model, ids, cuda_graph=True, **kw)
            print(
                f"level {level} {dtype}: hf vs hf_static {first_diff(hf, hf_static)}; "
                f"hf_static vs eager {first_diff(hf_static, eager)}; "
                f"eager vs graph {first_diff(eager, graph)}"
            )


if __name__ == "__main__":
    main()

"""Speculative decoding on the GPU: SmolLM2-135M bf16 at level 2, batch 1, greedy.

Group ``speculative <task>``: one whole ``sk.generate`` call of 128 new tokens
(``eos_token_id=[]``), after a warm-up call; the baseline ``none`` is non-speculative
``sk.generate`` at the same level (CUDA-graph decode). Candidates: ``ngram`` (prompt
lookup), ``early_exit:8`` / ``early_exit:15`` (the model's first 8 / 15 of 30 layers),
``model-8L`` (a separate HF model: a copy of SmolLM2 truncated to its first 8 layers, with
its own cache), each with ``num_draft_tokens=4`` (adapted between 1 and 4).

Tasks, 4 prompts each (the timed function runs all 4, batch 1 each):

* ``wikitext``: continue 128 tokens of wikitext-2 *test* text;
* ``grounded``: a wikitext-2 test passage, then an instruction to repeat it, then its
  first words (an input-grounded copy task, where the output reuses the prompt).

``extra_info``: tokens/s, acceptance rate, mean accepted drafts per step, and whether
every output equals the non-speculative greedy output (``equal_to_plain``).
Target (the speculative-decoding issue): >= 1.8x tokens/s for the best drafter on the
input-grounded task.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
NEW = 128
pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf"),
]


def _wikitext() -> str:
    for d in (
        os.environ.get("SENTINEL_WIKITEXT2_DIR"),
        ROOT.parent / "shared" / "data" / "wikitext2",
        ROOT / "data" / "wikitext2",
    ):
        if d and (Path(d) / "test.txt").exists():
            return (Path(d) / "test.txt").read_text(encoding="utf-8")
    pytest.skip("wikitext-2 test.txt not found (SENTINEL_WIKITEXT2_DIR)")


@pytest.fixture(scope="module")
def setup():
    import sentinel_kernels as sk

    model, tok = sk.models.load_smollm2(device="cuda", dtype=torch.bfloat16)
    draft = copy.deepcopy(model)  # before patching: a patch's undo closures are not copied
    draft.model.layers = draft.model.layers[:8]
    draft.config.num_hidden_layers = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=2)
        sk.patch_model(draft, level=2)
    ids = tok(_wikitext()[:200000], return_tensors="pt").input_ids[0]
    prompts = {"wikitext": [], "grounded": []}
    for i in range(4):
        start = 2000 + i * 5000
        prompts["wikitext"].append(ids[start : start + 128][None].cuda())
        passage = tok.decode(ids[start + 1000 : start + 1150])
        text = (
            f"{passage}\n\nRepeat the text above word for word.\n\n{' '.join(passage.split()[:6])}"
        )
        prompts["grounded"].append(tok(text, return_tensors="pt").input_ids.cuda())
    plain = {
        t: [sk.generate(model, p, max_new_tokens=NEW, eos_token_id=[]) for p in ps]
        for t, ps in prompts.items()
    }
    return model, draft, prompts, plain


@pytest.mark.parametrize("task", ["wikitext", "grounded"])
@pytest.mark.parametrize("drafter", ["none", "ngram", "early_exit:8", "early_exit:15", "model-8L"])
def test_speculative(benchmark, setup, task, drafter):
    import sentinel_kernels as sk

    model, draft_model, prompts, plain = setup
    draft = None if drafter == "none" else draft_model if drafter == "model-8L" else drafter
    stats_all: list[dict] = []
    outs: list[torch.Tensor] = []

    def run():
        stats_all.clear()
        outs.clear()
        for p in prompts[task]:
            out, st = sk.generate(
                model,
                p,
                max_new_tokens=NEW,
                eos_token_id=[],
                draft=draft,
                num_draft_tokens=4,
                return_stats=True,
            )
            outs.append(out)
            stats_all.append(st)
        torch.cuda.synchronize()

    run()  # warm-up: graph capture, autotuning
    benchmark.group = f"speculative {task} smollm2 level2 b1"
    benchmark.pedantic(run, rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    n_prompts = len(prompts[task])
    info = {
        "impl": drafter,
        "role": "baseline" if drafter == "none" else "candidate",
        "task": task,
        "prompts": n_prompts,
        "new_tokens": NEW,
        "tokens_per_s": n_prompts * NEW / median,
        "equal_to_plain": all(torch.equal(o, r) for o, r in zip(outs, plain[task], strict=True)),
        "equal_rows": sum(torch.equal(o, r) for o, r in zip(outs, plain[task], strict=True)),
    }
    if draft is not None:
        info["acceptance_rate"] = sum(s["acceptance_rate"] for s in stats_all) / n_prompts
        info["mean_accepted"] = sum(s["mean_accepted"] for s in stats_all) / n_prompts
        info["steps"] = sum(s["steps"] for s in stats_all) / n_prompts
    benchmark.extra_info.update(info)

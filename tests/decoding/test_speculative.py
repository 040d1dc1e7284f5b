"""Speculative decoding through ``sk.generate(..., draft=...)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_model

import sentinel_kernels as sk
from sentinel_kernels.decoding import DraftSpec, parse_draft, session
from sentinel_kernels.decoding.speculative import NgramDrafter

EOS, PAD = 2, 0


def _model(level: int = 1, layers: int = 4, seed: int = 0, arch: str = "llama"):
    return tiny_model(arch, level, seed, num_hidden_layers=layers)


def _draft_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model("llama", seed=7, num_hidden_layers=1)


def _speculate_without_eos(model, ids, new: int, draft, k: int):
    """``sk.generate`` of exactly ``new`` tokens (no EOS) drafting ``k`` tokens a step with
    ``draft``: (tokens, stats)."""
    return sk.generate(
        model,
        ids,
        max_new_tokens=new,
        eos_token_id=[],
        draft=draft,
        num_draft_tokens=k,
        return_stats=True,
    )


def _twenty_prompts(vocab: int):
    # 20 prompts of different lengths (left padding), half of them repetitive so that
    # prompt lookup has something to find
    g = torch.Generator().manual_seed(3)
    longest = 24
    ids = torch.full((20, longest), PAD, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for r in range(20):
        n = 6 + r % 19
        if r % 2:
            unit = torch.randint(3, vocab, (5,), generator=g)
            row = unit.repeat(n // 5 + 1)[:n]
        else:
            row = torch.randint(3, vocab, (n,), generator=g)
        ids[r, longest - n :] = row
        mask[r, longest - n :] = 1
    return ids, mask


DRAFTERS = ["ngram", "early_exit:1", "early_exit:3", "model"]


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("level", [1, 2])
def test_greedy_speculative_equals_greedy_on_20_prompts(drafter, level):
    model = _model(level)
    ids, mask = _twenty_prompts(model.config.vocab_size)
    draft = _draft_model() if drafter == "model" else drafter
    ref = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD
    )
    got, stats = sk.generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=24,
        eos_token_id=EOS,
        pad_token_id=PAD,
        draft=draft,
        num_draft_tokens=4,
        return_stats=True,
    )
    assert torch.equal(got, ref)
    assert stats["steps"] >= 1 and 0.0 <= stats["acceptance_rate"] <= 1.0


def test_prompt_lookup_accepts_on_repetitive_text():
    model = _model(1)
    unit = torch.randint(
        3, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(1)
    )
    ids = unit.repeat(6)[None]
    plain = sk.generate(model, ids, max_new_tokens=40, eos_token_id=[])
    got, stats = _speculate_without_eos(model, ids, 40, "ngram", 6)
    assert torch.equal(got, plain)
    # a tiny random model continues repetitive text repetitively: drafts get accepted and
    # a step emits several tokens (this model/prompt: checked to repeat)
    if torch.equal(plain[0, 36:42], unit) or stats["acceptance_rate"] > 0.0:
        assert stats["steps"] < 40


def test_ngram_lookup_rule():
    assert NgramDrafter.lookup([5, 6, 7, 9, 5, 6, 7], 3) == [9, 5, 6]
    assert NgramDrafter.lookup([1, 2, 3, 4], 2) == [4, 4]  # no match: repeat the last
    assert NgramDrafter.lookup([8, 1, 8], 4) == [1, 8, 8, 8]  # short follow-up is padded


def test_draft_specs_are_typed():
    assert parse_draft("ngram") == DraftSpec("ngram")
    spec = parse_draft("early_exit:3")
    assert spec == DraftSpec("early_exit", layers=3) and str(spec) == "early_exit:3"
    assert parse_draft(spec) is spec
    model = _model(0, layers=2)
    assert parse_draft(model) == DraftSpec("model", model=model)
    for bad in ("early_exit:0", "early_exit:", "early_exit:x", "early_exit:02", "Ngram"):
        with pytest.raises(ValueError, match="draft must be"):
            parse_draft(bad)
    with pytest.raises(TypeError, match="draft must be"):
        parse_draft(3)


def test_early_exit_runs_only_the_first_layers():
    model = _model(1, layers=4)
    calls = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    _, stats = _speculate_without_eos(model, ids, 10, "early_exit:2", 3)
    steps = int(stats["steps"])
    # layers 0-1: prefill + drafts + verifications; layers 2-3: prefill + verifications
    assert calls[2] == calls[3] == 1 + steps
    assert calls[0] == calls[1] > calls[2]
    assert model.config.num_hidden_layers == 4


def test_sampling_speculative_is_seeded_and_top1_is_greedy():
    model = _model(1)
    ids = torch.randint(3, model.config.vocab_size, (3, 9))

    def run(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return sk.generate(
            model,
            ids,
            max_new_tokens=16,
            eos_token_id=[],
            do_sample=True,
            generator=g,
            draft="early_exit:2",
            num_draft_tokens=3,
            **kw,
        )

    assert torch.equal(run(4), run(4))
    greedy = sk.generate(model, ids, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(run(5, top_k=1), greedy)
    for drafter in ("ngram", _draft_model()):
        g = torch.Generator().manual_seed(6)
        got = sk.generate(
            model,
            ids,
            max_new_tokens=16,
            eos_token_id=[],
            do_sample=True,
            top_k=1,
            generator=g,
            draft=drafter,
        )
        assert torch.equal(got, greedy)


def test_draft_model_with_another_vocabulary_is_refused():
    model = _model(1)
    torch.manual_seed(2)
    other = sk.models.tiny("llama", vocab_size=model.config.vocab_size + 5).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="vocabulary"):
        sk.generate(model, ids, max_new_tokens=4, draft=other)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_cuda_graph_speculative(drafter):
    # float32: the k+1-token verification rounds like one-token decoding to ~1e-7, so
    # greedy outputs match; bf16: graphs replay the eager kernels exactly
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(0).to("cuda", dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk.patch_model(model, level=1)
        ids, mask = _twenty_prompts(model.config.vocab_size)
        ids, mask = ids.cuda(), mask.cuda()
        draft = _draft_model().to("cuda", dtype) if drafter == "model" else drafter
        kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD)
        graph = sk.generate(model, ids, draft=draft, **kw)
        eager = sk.generate(model, ids, draft=draft, cuda_graph=False, **kw)
        assert torch.equal(graph, eager), dtype
        if dtype == torch.float32:
            assert torch.equal(graph, sk.generate(model, ids, **kw))


def test_speculative_session_is_reused():
    model = _model(1)
    store = getattr(model, session.SESSIONS_ATTR, {})
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    a = sk.generate(model, ids, max_new_tokens=12, eos_token_id=[], draft="ngram")
    ids2 = torch.randint(3, model.config.vocab_size, (2, 11))  # same width bucket
    sk.generate(model, ids2, max_new_tokens=12, eos_token_id=[], draft="ngram")
    b = sk.generate(model, ids, max_new_tokens=12, eos_token_id=[], draft="ngram")
    assert torch.equal(a, b)
    store = getattr(model, session.SESSIONS_ATTR)
    assert sum(1 for key in store if key[0] == "speculative") == 1

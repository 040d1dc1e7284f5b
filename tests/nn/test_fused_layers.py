"""The ``fused_layers`` patch option: fused RMSNorm / SiLU-mul / RoPE in Llama-family layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import hf_greedy

import sentinel_kernels as sk
from sentinel_kernels.nn.fused_layers import SentinelRMSNorm


def _tiny(arch: str, **kw):
    torch.manual_seed(0)
    return sk.models.tiny(arch, **kw).eval()


def _patch(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.patch_model(model, **kw)


def _logits(model, ids, mask=None):
    with torch.inference_mode():
        return model(ids, attention_mask=mask).logits.double()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_layers_match_transformers(arch):
    model = _tiny(arch)
    ids = torch.randint(3, model.config.vocab_size, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ref = _logits(model, ids, mask)
    report = _patch(model, level=0, attention="sentinel", fused_layers=True)
    norms = [m for m in model.modules() if isinstance(m, SentinelRMSNorm)]
    # two per layer and the final norm (+ q_norm / k_norm per layer on Qwen3)
    layers = model.config.num_hidden_layers
    assert len(norms) == 2 * layers + 1 + (2 * layers if arch == "qwen3" else 0)
    assert any("fused" in t for t in report.transforms)
    overridden = [m for m in model.modules() if "forward" in vars(m)]
    # attention, MLP and the decoder layer (nn.Linear projections: the add before the
    # second norm goes into that norm, ops.add_rms_norm)
    assert len(overridden) == 3 * layers
    got = _logits(model, ids, mask)
    keep = mask.bool()
    # fp32: the norm's fp32 sum order differs from torch's; everything else is the same
    # elementwise arithmetic, so differences stay at the fp32 rounding level
    err = (got - ref)[keep].abs().max() / ref[keep].abs().max()
    assert err < 1e-5, err
    sk.unpatch_model(model)
    assert not [m for m in model.modules() if "forward" in vars(m)]
    assert not [m for m in model.modules() if isinstance(m, SentinelRMSNorm)]
    assert torch.equal(_logits(model, ids, mask), ref)


def test_without_sentinel_attention_the_attention_keeps_its_forward():
    model = _tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    ref = _logits(model, ids)
    _patch(model, level=0, fused_layers=True)  # eager attention: fused norm + MLP only
    got = _logits(model, ids)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_non_silu_mlp_is_left_alone():
    model = _tiny("llama", hidden_act="gelu")
    _patch(model, level=1)
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all("forward" not in vars(m) for m in mlps)


def test_gpt2_fused_layers_changes_nothing_and_still_runs():
    model = _tiny("gpt2")
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    ref = _logits(model, ids)
    _patch(model, level=1)
    assert not [m for m in model.modules() if isinstance(m, SentinelRMSNorm)]
    got = _logits(model, ids)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_level1_generate_uses_fused_layers_and_matches_sk_generate():
    model = _tiny("qwen3")
    _patch(model, level=1)
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ref = hf_greedy(
        model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=2, pad_token_id=0
    )
    got = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=16, eos_token_id=2, pad_token_id=0
    )
    assert torch.equal(got, ref)


@pytest.mark.parametrize("level", [1, 2])
def test_projections_are_concatenated_without_copies(level):
    from sentinel_kernels.nn import fused_layers as fl

    model = _tiny("llama")
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    name = "weight" if level == 1 else "weight_int8"
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    _patch(model, level=level)
    before = _logits(model, ids)
    for module, parts in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        fused, sizes = getattr(module, fl._CONCAT_ATTR)
        full = getattr(fused, name)
        views = [getattr(getattr(module, p), name) for p in parts]
        assert sizes == [v.shape[0] for v in views]
        # every part is a row view of the concatenated weight: stored once
        assert all(
            v.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() for v in views
        )
        assert torch.equal(torch.cat(views), full)
    # the class forward (training-mode fallback) reads the views
    model.train()
    with torch.no_grad():
        again = model(ids).logits.double()
    model.eval()
    assert (again - before).abs().max() / before.abs().max() < 1e-5
    sk.unpatch_model(model)
    assert not hasattr(attn, fl._CONCAT_ATTR)
    ptrs = {getattr(attn, p).weight.untyped_storage().data_ptr() for p in ("q_proj", "k_proj")}
    assert len(ptrs) == 2  # own storage again


def test_moving_a_patched_model_rebuilds_the_concatenation():
    model = _tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    _patch(model, level=1)
    ref = _logits(model, ids)
    model.to(torch.bfloat16)  # every parameter gets new storage; the concat is stale
    got = _logits(model, ids)
    # bf16 weights and activations now: agreement to bf16 precision
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
    from sentinel_kernels.nn import fused_layers as fl

    fused, _ = getattr(model.model.layers[0].self_attn, fl._CONCAT_ATTR)
    assert fused.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()

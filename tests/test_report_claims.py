"""What a PatchReport claims is what runs.

Each optimisation the report lists as applied (``"<label> x<count> (<option>)"`` in
``report.transforms``, and every module swap in ``report.replaced``) is checked against
evidence from one forward pass: the sentinel ops dispatched (a TorchDispatchMode counts
them) and which projection modules actually ran (forward hooks). A claim without its
evidence fails the test, so an optimisation that silently stops applying (as the fused
attention did when transformers 5.25 renamed its cache argument) cannot hide behind the
report.
"""

from __future__ import annotations

import collections
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import smollm2_missing
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sentinel_kernels as sk
from sentinel_kernels.nn import fused_layers as fl

_ITEM = re.compile(r"^(?P<label>.*) x(?P<count>\d+) \((?P<option>\w+)\)$")


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.name()
        self.counts[name] += 1
        if name == "sentinel::int8_linear_fused":
            # what the fused GEMV took over: "...[norm]", "...[silu]", "...[residual]"
            bound = dict(zip([a.name for a in func._schema.arguments], args, strict=False))
            bound.update(kwargs or {})
            for part, arg in (("norm", "norm_weight"), ("residual", "residual")):
                if bound.get(arg) is not None:
                    self.counts[f"{name}[{part}]"] += 1
            if bound.get("silu_input"):
                self.counts[f"{name}[silu]"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _calls(modules: list[nn.Module]) -> Iterator[collections.Counter[int]]:
    """Count forward calls per module (keyed by id)."""
    counts: collections.Counter[int] = collections.Counter()
    handles = [m.register_forward_hook(lambda mod, *_: counts.update([id(mod)])) for m in modules]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def claimed(report: sk.PatchReport) -> dict[str, int]:
    """``{label: count}`` of the itemised optimisations the report says are applied."""
    out = {}
    for item in report.transforms:
        m = _ITEM.match(item)
        if m:
            out[m["label"]] = int(m["count"])
    return out


def check_claims(model: nn.Module, report: sk.PatchReport, ids: torch.Tensor) -> dict[str, int]:
    """Raise AssertionError when a claim of ``report`` is not in effect in ``model``."""
    claims = claimed(report)
    # Module swaps: the module now at each name is the claimed type.
    for r in report.replaced:
        now = model.get_submodule(r.name)
        assert f"{type(now).__module__}.{type(now).__qualname__}" == r.new_type, r
    attn = [m for m in model.modules() if type(m).__name__ in fl.ATTENTION_CLASSES]
    mlps = [m for m in model.modules() if type(m).__name__ in fl.MLP_CLASSES]
    qkv = [getattr(m, n) for m in attn for n in ("q_proj", "k_proj", "v_proj")]
    gate_up = [getattr(m, n) for m in mlps for n in ("gate_proj", "up_proj")]
    counter = _OpCounter()
    with torch.inference_mode(), _calls(qkv + gate_up) as ran, counter:
        model(ids)
    ops = counter.counts
    if "sentinel attention (attention)" in report.transforms:
        assert model.config._attn_implementation == "sentinel"
        layers = model.config.num_hidden_layers
        assert ops["sentinel::attention"] + ops["sentinel::decode_attention"] == layers, ops
    if fl.FUSED_ATTENTION in claims:
        # one RoPE kernel per fused attention forward (transformers' RoPE is ~10 ops)
        assert ops["sentinel::rotary_embedding"] == claims[fl.FUSED_ATTENTION], ops
    fused = "sentinel::int8_linear_fused"
    if fl.FUSED_MLP in claims:
        # SiLU-mul on its own, or in the down GEMV of a fused decoder layer
        silu = ops["sentinel::silu_mul"] + ops[f"{fused}[silu]"]
        assert silu == claims[fl.FUSED_MLP], ops
    if fl.FUSED_DECODER in claims:
        # both norms of a layer in its q/k/v and gate/up GEMVs, both adds in o and down
        assert ops[f"{fused}[norm]"] == 2 * claims[fl.FUSED_DECODER], ops
        assert ops[f"{fused}[residual]"] == 2 * claims[fl.FUSED_DECODER], ops
    if fl.CONCAT_QKV in claims:
        # the concatenated projection ran instead of the three separate ones
        not_run = [m for m in qkv if ran[id(m)] == 0]
        assert len(not_run) == 3 * claims[fl.CONCAT_QKV], (len(not_run), claims)
    if fl.CONCAT_GATE_UP in claims:
        not_run = [m for m in gate_up if ran[id(m)] == 0]
        assert len(not_run) == 2 * claims[fl.CONCAT_GATE_UP], (len(not_run), claims)
    if fl.FUSED_DECODER_ADD_NORM in claims:
        # the add after the attention and the second norm of each layer in one launch,
        # and in a linked layer the add after the MLP with the next norm
        linked = claims.get(fl.FUSED_NEXT_NORM, 0)
        assert linked <= claims[fl.FUSED_DECODER_ADD_NORM], claims
        assert ops["sentinel::add_rms_norm"] == claims[fl.FUSED_DECODER_ADD_NORM] + linked, ops
    norms = [r for r in report.replaced if r.new_type.endswith("SentinelRMSNorm")]
    if norms:
        ran = ops["sentinel::rms_norm"] + ops[f"{fused}[norm]"] + ops["sentinel::add_rms_norm"]
        assert ran == len(norms), ops
    return claims


def _patch(model: nn.Module, level: int) -> sk.PatchReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.patch_model(model, level=level)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("level", [1, 2])
def test_tiny_model_claims_are_in_effect(arch, level):
    torch.manual_seed(0)
    model = sk.models.tiny(arch).eval()
    report = _patch(model, level)
    claims = check_claims(model, report, torch.randint(3, 200, (2, 9)))
    layers = model.config.num_hidden_layers
    labels = [fl.FUSED_ATTENTION, fl.CONCAT_QKV, fl.FUSED_MLP, fl.CONCAT_GATE_UP]
    # level 2's W8A16 GEMVs take the decoder layer's norms and adds; level 1's cuBLAS not
    labels += [fl.FUSED_DECODER] if level == 2 else []
    # level 1: each layer's adds in its second norm's launch and the next norm's
    labels += [fl.FUSED_DECODER_ADD_NORM, fl.FUSED_NEXT_NORM] if level == 1 else []
    for label in labels:
        assert claims.get(label) == layers, (label, report.transforms)
    assert (fl.FUSED_DECODER in claims) == (level == 2), report.transforms
    assert not [n for n in report.notes if "not applied" in n], report.notes
    sk.unpatch_model(model)


def test_a_claim_that_is_not_in_effect_fails_the_check():
    """The checker is not a tautology: undo one fused forward behind the report's back."""
    torch.manual_seed(0)
    model = sk.models.tiny("llama").eval()
    report = _patch(model, 2)
    ids = torch.randint(3, 200, (1, 7))
    attn = model.model.layers[0].self_attn
    fused_forward = vars(attn).pop("forward")
    with pytest.raises(AssertionError):
        check_claims(model, report, ids)
    attn.forward = fused_forward
    check_claims(model, report, ids)
    decoder = model.model.layers[1]
    fused_decoder = vars(decoder).pop("forward")  # the class's norms and adds again
    with pytest.raises(AssertionError):
        check_claims(model, report, ids)
    decoder.forward = fused_decoder
    check_claims(model, report, ids)
    object.__delattr__(attn, fl._CONCAT_ATTR)  # fused forward now runs q/k/v separately
    with pytest.raises(AssertionError):
        check_claims(model, report, ids)
    sk.unpatch_model(model)


def test_an_unlinked_level1_layer_fails_the_check():
    torch.manual_seed(0)
    model = sk.models.tiny("llama").eval()
    report = _patch(model, 1)
    ids = torch.randint(3, 200, (1, 7))
    check_claims(model, report, ids)
    layer = model.model.layers[0]
    nxt = vars(layer).pop(fl._NEXT_NORM_ATTR)  # its last add and the next norm apart again
    with pytest.raises(AssertionError):
        check_claims(model, report, ids)
    vars(layer)[fl._NEXT_NORM_ATTR] = nxt
    check_claims(model, report, ids)
    sk.unpatch_model(model)


def test_unappliable_fusion_is_reported_not_silent():
    # A GELU MLP cannot take the SiLU-mul kernel: the report says so and warns.
    torch.manual_seed(0)
    model = sk.models.tiny("llama", hidden_act="gelu").eval()
    with pytest.warns(UserWarning, match="not SiLU"):
        report = sk.patch_model(model, level=1)
    assert any("fused_layers: not applied" in n and "not SiLU" in n for n in report.notes)
    assert fl.FUSED_MLP not in claimed(report)
    check_claims(model, report, torch.randint(3, 200, (1, 5)))
    sk.unpatch_model(model)


def test_fused_attention_without_sentinel_attention_is_reported():
    torch.manual_seed(0)
    model = sk.models.tiny("llama").eval()
    with pytest.warns(UserWarning, match="does not run attention='sentinel'"):
        report = sk.patch_model(model, level=0, fused_layers=True)
    assert fl.FUSED_ATTENTION not in claimed(report)
    assert claimed(report)[fl.FUSED_MLP] == model.config.num_hidden_layers
    check_claims(model, report, torch.randint(3, 200, (1, 5)))
    sk.unpatch_model(model)


@pytest.mark.model
@pytest.mark.skipif(smollm2_missing() is not None, reason=str(smollm2_missing()))
def test_smollm2_level2_report_lists_fused_attention_and_concatenations():
    model, tok = sk.models.load_smollm2(device="cpu", dtype=torch.float32)
    report = _patch(model, 2)
    text = str(report)
    assert fl.FUSED_ATTENTION in text and fl.CONCAT_QKV in text and fl.CONCAT_GATE_UP in text
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    claims = check_claims(model, report, ids)
    assert claims[fl.FUSED_ATTENTION] == claims[fl.CONCAT_QKV] == 30
    assert claims[fl.FUSED_MLP] == claims[fl.CONCAT_GATE_UP] == claims[fl.FUSED_DECODER] == 30
    sk.unpatch_model(model)

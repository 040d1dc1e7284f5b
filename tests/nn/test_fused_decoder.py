"""The fused decoder layer of ``fused_layers``: the input norms and residual adds handed to
the projections (``ops.int8_linear_fused``) and a decode chunk's RoPE + K/V append in one op
(``ops.rope_kv_append`` through ``SentinelKVCache.update_rotary``).

On the CPU backends both ops are compositions of the unfused ops, so the fused layer must
give the very same bits as the class's own layer forward. Through the Triton interpreter
the fused kernels run, and agree with the unfused model to fp32 rounding."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import feed_in_pieces, random_ids

import sentinel_kernels as sk
from sentinel_kernels import _backend, ops, settings
from sentinel_kernels.cache import layer as cache_layer
from sentinel_kernels.nn import fused_layers as fl


def _model(arch: str, level: int, **kw):
    torch.manual_seed(0)
    model = sk.models.tiny(arch, **kw).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sk.patch_model(model, level=level)
    return model, report


def _decoders(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in fl.DECODER_CLASSES]


def _unfuse_decoders(model) -> None:
    for m in _decoders(model):
        fl._restore(m)


def _counting(monkeypatch, owner, name: str) -> dict[str, int]:
    calls = {"n": 0}
    fn = getattr(owner, name)

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def _steps(model, ids: torch.Tensor, cache_spec: str, steps: int) -> torch.Tensor:
    """Logits of a prefill of ``ids[:, :-steps]`` then ``steps`` one-token decode steps
    through a fresh ``sk.kv_cache`` of the given format (int4: per-token keys, no ring,
    the layout the one-launch RoPE + append writes)."""
    b, s = ids.shape
    kw = {"recent": 0, "key_block": 0} if cache_spec == "int4" else {}
    cache = sk.kv_cache(model, cache_spec, max_cache_len=s + 4, batch_size=b, **kw)
    cuts = list(range(s - steps, s + 1))
    return feed_in_pieces(model, ids, cache, cuts).double()


@pytest.mark.parametrize(
    ("arch", "cache_spec"),
    [("llama", "int8"), ("llama", "dense"), ("qwen3", "int4"), ("mistral", "int8")],
)
def test_fused_decoder_gives_the_unfused_bits_on_cpu(monkeypatch, arch, cache_spec):
    # the cache's own append (update_rotary); the fold into the attention is in
    # tests/decoding/test_generate.py and tests/ops/test_rope_decode_attention.py
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "0")
    model, report = _model(arch, 2)
    layers = model.config.num_hidden_layers
    assert any(fl.FUSED_DECODER in t for t in report.transforms)
    assert len(_decoders(model)) == layers
    assert all("forward" in vars(m) for m in _decoders(model))
    fused_gemv = _counting(monkeypatch, ops, "int8_linear_fused")
    rope_append = _counting(monkeypatch, cache_layer, "rope_kv_append")
    ids = random_ids(2, 12, seed=3)
    steps = 4
    got = _steps(model, ids, cache_spec, steps)
    # the decode steps took the fused append (the prefill into an empty cache does not)
    assert rope_append["n"] == steps * layers
    # q/k/v, o, gate/up and down of every layer, in the prefill and each step
    assert fused_gemv["n"] == 4 * layers * (steps + 1)
    _unfuse_decoders(model)
    ref = _steps(model, ids, cache_spec, steps)
    assert fused_gemv["n"] == 4 * layers * (steps + 1)  # the class's layer: none
    assert rope_append["n"] == 2 * steps * layers  # the attention forward still fuses RoPE
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_level1_fuses_the_add_into_the_second_norm(monkeypatch, arch, backend):
    """Level 1's projections are nn.Linear (cuBLAS): nothing takes the norms, so each
    decoder layer hands ``h = x + attn`` to the second norm and its output ``h + mlp`` to
    the norm that reads it next (the next layer's input norm, the final norm after the
    last layer; ``ops.add_rms_norm``, one launch each), and the attention forward rotates
    and appends in one op. Only layer 0's input norm runs alone. The same bits as the
    class's layer forward, on the C++ backend and through the Triton interpreter."""
    if backend == "triton" and not _backend.triton_interpreter() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (CPU CI) or a GPU")
    model, report = _model(arch, 1)
    layers = model.config.num_hidden_layers
    assert any(fl.FUSED_DECODER_ADD_NORM in t for t in report.transforms)
    assert not any(
        fl.FUSED_DECODER in t and fl.FUSED_DECODER_ADD_NORM not in t
        for t in report.transforms + report.notes
    )
    assert sum("forward" in vars(m) for m in _decoders(model)) == layers
    add_norm = _counting(monkeypatch, ops, "add_rms_norm")
    norm = _counting(monkeypatch, ops, "rms_norm")
    rope_append = _counting(monkeypatch, cache_layer, "rope_kv_append")
    ids = random_ids(2, 9, seed=6)
    with _backend.use_backend(backend), _backend.poisoned_outputs():
        got = _steps(model, ids, "dense", 3)
        assert rope_append["n"] == 3 * layers
        # the prefill and each of the 3 steps: two per layer, one norm alone
        assert add_norm["n"] == 4 * 2 * layers
        qk = 2 * layers if arch == "qwen3" else 0  # Qwen3's q and k norms, per head
        assert norm["n"] == 4 * (1 + qk)
        _unfuse_decoders(model)
        ref = _steps(model, ids, "dense", 3)
    assert add_norm["n"] == 4 * 2 * layers  # the class's layer: none
    assert norm["n"] == 4 * (1 + qk) + 4 * (2 * layers + 1 + qk)  # every norm alone
    assert torch.equal(got, ref)


def test_level1_linked_norm_ignores_another_input():
    """The norm after a linked layer returns the result made in that layer's launch only
    for that layer's very output; called with any other tensor it computes, and the
    held result is dropped either way."""
    model, _ = _model("llama", 1)
    layer0, layer1 = _decoders(model)[:2]
    nxt = layer0.__dict__[fl._NEXT_NORM_ATTR]
    assert nxt is layer1.input_layernorm
    assert _decoders(model)[-1].__dict__[fl._NEXT_NORM_ATTR] is model.model.norm
    x = torch.randn(2, 3, model.config.hidden_size)
    y = torch.randn_like(x)
    nxt.__dict__[fl._READY_ATTR] = (x, torch.full_like(x, float("nan")))
    assert torch.equal(nxt(y), ops.rms_norm(y, nxt.weight, nxt.variance_epsilon))
    assert nxt.__dict__[fl._READY_ATTR] is None
    marker = torch.zeros_like(x)
    nxt.__dict__[fl._READY_ATTR] = (x, marker)
    assert nxt(x) is marker


def test_level1_unpatch_unlinks_the_norms():
    model, _ = _model("llama", 1)
    sk.generate(model, random_ids(1, 5, seed=2), max_new_tokens=3, eos_token_id=[])
    sk.unpatch_model(model)
    for m in model.modules():
        assert fl._NEXT_NORM_ATTR not in vars(m) and fl._READY_ATTR not in vars(m)


def test_greedy_generate_is_unchanged_by_the_fused_decoder():
    model, _ = _model("llama", 2)
    ids = random_ids(2, 7, seed=5)
    got = sk.generate(model, ids, max_new_tokens=10, eos_token_id=[])
    _unfuse_decoders(model)
    ref = sk.generate(model, ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(got, ref)


def test_unpatch_restores_the_decoder_layers():
    model, _ = _model("llama", 2)
    ids = random_ids(1, 9, seed=1)
    sk.unpatch_model(model)
    assert not [m for m in model.modules() if "forward" in vars(m)]
    plain = sk.models.tiny("llama").eval()
    with torch.inference_mode():
        # int8 weights were quantized from the float ones, which unpatch puts back
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_training_mode_takes_the_class_forward():
    model, _ = _model("llama", 2)
    ids = random_ids(1, 9, seed=2)
    with torch.inference_mode():
        fused = model(ids).logits.double()
    model.train()
    with torch.no_grad():
        again = model(ids).logits.double()
    assert (again - fused).abs().max() / fused.abs().max() < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("rope", ["0", ""], ids=["rope_kv_append", "rope_in_attention"])
def test_fused_kernels_in_a_model_through_the_triton_interpreter(monkeypatch, batch, rope):
    """A level-2 model (W8A16 projections) decoding one token per row and step: the fused
    Triton kernels (norm/SiLU prologues, residual epilogues, RoPE + int8 append) against
    the same model with the class's layer forward, fp32: equal up to fp32 summation order.
    One row per step runs the four fused GEMVs of a layer; several rows (the batch of 3,
    and every prefill) the two launches that need no whole-row statistic (o + residual,
    SiLU-mul -> down + residual) on the decode MMA / GEMM paths.
    ``rope``: ``SENTINEL_ROPE_ATTENTION`` (unset: an int8 cache's step rotates and appends
    inside the decode attention, ``ops.rope_decode_attention``; ``0``: in
    ``rope_kv_append``).
    (One cache format: ~1 min in the interpreter; the op tests cover every format.)"""
    cache_spec = "int8"
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, rope)
    if not _backend.triton_interpreter() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter (CPU CI) or a GPU")
    from sentinel_kernels.kernels import decode_attention as kda
    from sentinel_kernels.kernels import int8_matmul as kim
    from sentinel_kernels.kernels import kv_append as kka

    model, _ = _model("llama", 2)
    ids = random_ids(batch, 10, seed=4)
    gemv = _counting(monkeypatch, kim, "w8a16_fused")
    append = _counting(monkeypatch, kka, "rope_kv_append_fwd")
    folded = [0]
    attend = kda.decode_attention_fwd

    def counted(*args, **kwargs):
        folded[0] += kwargs.get("rope") is not None
        return attend(*args, **kwargs)

    monkeypatch.setattr(kda, "decode_attention_fwd", counted)
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        got = _steps(model, ids, cache_spec, 2)
        layers = model.config.num_hidden_layers
        per_step = 4 if batch == 1 else 2
        assert gemv["n"] == (2 + 2 * per_step) * layers
        if rope == "0":
            assert append["n"] == 2 * layers and folded[0] == 0
        else:
            assert append["n"] == 0 and folded[0] == 2 * layers
        _unfuse_decoders(model)
        ref = _steps(model, ids, cache_spec, 2)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


def test_decoder_fusion_notes_only_where_it_had_something_to_fuse():
    # level 2, GELU MLP (no fused MLP forward): the W8A16 GEMVs could have taken the
    # norms, so the report says why the decoder layer was left alone; level 1: silence
    _, report2 = _model("llama", 2, hidden_act="gelu")
    assert not any(fl.FUSED_DECODER in t for t in report2.transforms)
    assert any(fl.FUSED_DECODER in n and "keeps its own forward" in n for n in report2.notes)
    _, report1 = _model("llama", 1, hidden_act="gelu")
    assert not any(fl.FUSED_DECODER in t for t in report1.transforms + report1.notes)

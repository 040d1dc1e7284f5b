"""sk.ops.rms_norm / add_rms_norm / rotary_embedding / silu_mul on every backend.

The oracle is transformers' own eager code (``LlamaRMSNorm``, ``apply_rotary_pos_emb``,
``F.silu(gate) * up``), run on the same tensors, plus an fp64 evaluation of the formulas.

* rotary_embedding: pure multiplies and adds, each rounded as torch rounds it, so it must be
  bit-exact with transformers on every backend and dtype.
* silu_mul: fp16/bf16 must be bit-exact. In fp32 the exponential is a different ~1 ulp
  implementation on each backend (torch CPU: its vectorised exp; C++: its own polynomial
  exp; Triton interpreter: fp64 ``exp`` rounded; Triton GPU: libdevice ``expf``, which is
  what torch's CUDA kernel calls), and ``g / (1 + e)`` amplifies that where ``e > 2^24``:
  torch's CPU ``silu`` and the C++ one are each within ~2.2 ulps of the exact value
  (measured over 2.5M inputs) and differ by up to 4 ulps (in ~3.5% of elements). The
  test allows 4 ulps of ``silu`` (times ``|up|``, plus one rounding of the product); a
  16-bit rounding of ``silu`` hides all of it in practice (0 mismatches in 1M inputs).
* rms_norm: the fp32 sum of squares is reduced in another order than torch's, so the mean
  may differ in its last bits (allowed: a relative 2^-20, i.e. 16 fp32 ulps). Everything
  after it is rounded as transformers rounds it, so the normalised row ``h`` (rounded to
  ``x.dtype``) can differ from transformers' by at most one ulp of ``x.dtype`` where the
  tiny difference straddles a rounding boundary, and ``y = w * h`` by ``|w| * ulp_x(h)``
  plus one rounding of the output dtype. For 16-bit ``x`` such flips must also be rare
  (< 1% of elements), which shows the intermediate rounding of ``h`` is reproduced.

Outputs are NaN-poisoned by the ``backend`` fixture, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Backend
from helpers import assert_rel_close, randn, skip_interpreted_bf16
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import sentinel_kernels as sk
from sentinel_kernels.reference import fused as ref

HALF_DTYPES = (torch.float16, torch.bfloat16)
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
MIN_EXP = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s numbers at ``|v|`` (fp64; subnormal spacing near 0)."""
    a = v.detach().to("cpu", torch.float64).abs()
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    e = torch.clamp(e - 1, min=MIN_EXP[dtype])
    return torch.ldexp(torch.ones_like(a), e - MANTISSA_BITS[dtype])


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    iview = torch.int32 if a.element_size() == 4 else torch.int16
    return bool(torch.equal(a.view(iview), b.view(iview)))


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str):
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values (an unwritten poisoned output?)"
    excess = (a - e).abs() - tol
    worst = int(excess.argmax())
    assert (excess <= 0).all(), (
        f"{what}: |actual - expected| beyond tolerance, worst at flat index {worst}: "
        f"{a.flatten()[worst].item()!r} vs {e.flatten()[worst].item()!r} "
        f"(tol {tol.flatten()[worst].item():.3e})"
    )


# ------------------------------------------------------------------------------ RMSNorm


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _check_rms(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """``y`` against transformers' RMSNorm (see the module docstring) and against fp64."""
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    assert y.dtype == out_dtype and y.shape == x.shape and y.device == x.device
    assert y.is_contiguous()
    y_hf = _hf_rms_norm(x, weight, eps)
    # transformers' normalised row, rounded to x.dtype: the value weight multiplies.
    xf = x.detach().float()
    h_hf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    flips = 1.0 if x.dtype in HALF_DTYPES else 2.0
    tol_h = flips * _ulp(h_hf, x.dtype) + h_hf.cpu().double().abs() * 2.0**-20
    tol = weight.detach().cpu().double().abs() * tol_h + _ulp(y_hf, out_dtype)
    _assert_within(y, y_hf, tol, "rms_norm vs LlamaRMSNorm")
    if x.dtype in HALF_DTYPES and y.numel() >= 100:
        differ = (y.cpu() != y_hf.cpu()).double().mean().item()
        assert differ < 0.01, f"{differ:.2%} of elements differ from LlamaRMSNorm"
    # fp64: h rounded to x.dtype, then the product rounded to the output dtype.
    x64 = x.detach().cpu().double()
    y64 = (
        weight.detach().cpu().double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    )
    coarser = x.dtype if x.dtype in HALF_DTYPES else out_dtype
    assert_rel_close(y, y64, coarser, factor=2.0)


def _weight(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).to(device)


NORM_DTYPES = [  # (x dtype, weight dtype): output is their promotion, as in transformers
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize(("dtype", "w_dtype"), NORM_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 7), (1, 127), (7, 1000), (3, 4096)])
def test_rms_norm_matches_transformers(backend: Backend, dtype, w_dtype, rows, cols):
    skip_interpreted_bf16(backend, dtype, w_dtype)
    x = randn((rows, cols), dtype, backend.device, seed=rows * 7919 + cols)
    w = _weight(cols, w_dtype, backend.device, seed=cols)
    eps = 1e-6 if cols > 1 else 1e-5
    y = sk.ops.rms_norm(x, w, eps)
    _check_rms(y, x, w, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_strided_and_batched(backend: Backend, dtype):
    dev = backend.device
    base = randn((12, 2, 300), dtype, dev, seed=11)
    w_base = _weight(600, dtype, dev, seed=12)
    cases = {
        "3-D contiguous": base,
        "row slice": base[::3],
        "column slice": base[:, :, 5:250],
        "last-dim stride 2": base[..., ::2],
        "transposed": base.transpose(0, 2),  # last dim has stride 600
        "expanded rows": base[:1].expand(4, 2, 300),
    }
    for name, x in cases.items():
        n = x.shape[-1]
        for w in (w_base[:n], w_base[::2][:n]):  # contiguous and strided weight
            y = sk.ops.rms_norm(x, w, 1e-6)
            try:
                _check_rms(y, x, w, 1e-6)
            except AssertionError as exc:
                raise AssertionError(f"{name}, weight stride {w.stride(0)}: {exc}") from exc


def test_rms_norm_long_rows(backend: Backend):
    # Longer than the single-pass Triton tile (16384): the looping path.
    x = randn((2, 20000), torch.float32, backend.device, seed=13)
    w = _weight(20000, torch.float32, backend.device, seed=14)
    _check_rms(sk.ops.rms_norm(x, w, 1e-5), x, w, 1e-5)
    r = randn((2, 20000), torch.float32, backend.device, seed=15)
    y, new_res = sk.ops.add_rms_norm(x, r, w, 1e-5)
    assert _bits_equal(new_res, r + x)
    _check_rms(y, r + x, w, 1e-5)


@pytest.mark.parametrize(("dtype", "w_dtype"), NORM_DTYPES[:4], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 7, 1000)])
def test_add_rms_norm_matches_decoder_layer(backend: Backend, dtype, w_dtype, shape):
    skip_interpreted_bf16(backend, dtype, w_dtype)
    dev = backend.device
    x = randn(shape, dtype, dev, seed=sum(shape))
    residual = randn(shape, dtype, dev, seed=sum(shape) + 1)
    w = _weight(shape[-1], w_dtype, dev, seed=3)
    y, new_res = sk.ops.add_rms_norm(x, residual, w, 1e-6)
    # transformers: hidden = residual + hidden; hidden = norm(hidden)
    expected_res = residual + x
    assert new_res.is_contiguous() and _bits_equal(new_res, expected_res)
    _check_rms(y, expected_res, w, 1e-6)


def test_add_rms_norm_strided(backend: Backend):
    dev = backend.device
    base = randn((6, 2, 256), torch.float16, dev, seed=21)
    x = base[:, 0, :200]  # rows stride 512
    residual = randn((200, 6), torch.float16, dev, seed=22).t()  # last-dim stride 6
    w = _weight(200, torch.float16, dev, seed=23)
    y, new_res = sk.ops.add_rms_norm(x, residual, w, 1e-6)
    assert _bits_equal(new_res, residual + x)
    _check_rms(y, residual + x, w, 1e-6)


def test_rms_norm_empty_and_bad_inputs(backend: Backend):
    dev = backend.device
    w = torch.ones(16, device=dev)
    y = sk.ops.rms_norm(torch.empty(0, 16, device=dev), w)
    assert y.shape == (0, 16)
    y, r = sk.ops.add_rms_norm(
        torch.empty(3, 0, 16, device=dev), torch.empty(3, 0, 16, device=dev), w
    )
    assert y.shape == r.shape == (3, 0, 16)
    x = torch.randn(4, 16, device=dev)
    with pytest.raises(ValueError, match="empty dimension"):
        sk.ops.rms_norm(torch.empty(4, 0, device=dev), torch.ones(0, device=dev))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        sk.ops.rms_norm(x, torch.ones(15, device=dev))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        sk.ops.rms_norm(x, torch.ones(1, 16, device=dev))
    with pytest.raises(TypeError, match="dtype float64"):
        sk.ops.rms_norm(x.double(), w)
    with pytest.raises(TypeError, match="weight has dtype int32"):
        sk.ops.rms_norm(x, w.int())
    with pytest.raises(ValueError, match="at least 1 dimension"):
        sk.ops.rms_norm(torch.tensor(1.0, device=dev), w[:1])
    with pytest.raises(ValueError, match="eps must be"):
        sk.ops.rms_norm(x, w, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        sk.ops.rms_norm(x, w, eps=float("nan"))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sk.ops.rms_norm([1.0], w)
    with pytest.raises(ValueError, match="residual must have x's shape and dtype"):
        sk.ops.add_rms_norm(x, x[:3], w)
    with pytest.raises(ValueError, match="residual must have x's shape and dtype"):
        sk.ops.add_rms_norm(x, x.half(), w)


# ------------------------------------------------------------------------------ rotary


def _hf_cos_sin(b: int, s: int, d: int, dtype, device, offset: int = 0):
    """cos/sin as ``LlamaRotaryEmbedding`` makes them: ``cat(freqs, freqs)``, cast to dtype."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(offset, offset + s, dtype=torch.float32)[None, :] + torch.arange(b)[:, None]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def _hf_layout(b, h, s, d, dtype, device, seed):
    """q or k as attention sees it: ``proj(x).view(B, S, H, D).transpose(1, 2)``."""
    return randn((b, s, h * d), dtype, device, seed=seed).view(b, s, h, d).transpose(1, 2)


def _check_rope(q, k, cos, sin):
    q_out, k_out = sk.ops.rotary_embedding(q, k, cos, sin)
    cos_hf, sin_hf = (cos, sin) if cos.dim() == 3 else (cos[None], sin[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    for out, hf, src in ((q_out, q_hf, q), (k_out, k_hf, k)):
        assert out.shape == src.shape and out.dtype == src.dtype and out.is_contiguous()
        assert torch.isfinite(out).all(), "non-finite output (unwritten poisoned element?)"
        if not _bits_equal(out, hf):
            diff = (out.cpu().double() - hf.cpu().double()).abs()
            raise AssertionError(
                f"rotary_embedding differs from apply_rotary_pos_emb in {(diff > 0).sum()} of "
                f"{diff.numel()} elements (max {diff.max().item():.3e})"
            )
    return q_out, k_out


ROPE_SHAPES = [  # (B, Hq, Hkv, S, D)
    (1, 1, 1, 1, 2),
    (1, 9, 3, 1, 64),  # SmolLM2 decode step
    (7, 1, 1, 7, 96),
    (1, 7, 7, 7, 128),
    (2, 4, 1, 33, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "hq", "hkv", "s", "d"), ROPE_SHAPES)
def test_rotary_matches_transformers(backend: Backend, dtype, b, hq, hkv, s, d):
    skip_interpreted_bf16(backend, dtype)
    dev = backend.device
    q = _hf_layout(b, hq, s, d, dtype, dev, seed=b * 100 + s)
    k = _hf_layout(b, hkv, s, d, dtype, dev, seed=b * 100 + s + 1)
    cos, sin = _hf_cos_sin(b, s, d, dtype, dev, offset=5)
    _check_rope(q, k, cos, sin)
    # Random cos/sin whose halves differ: catches a kernel that reads one half for both.
    cos_r = randn((b, s, d), dtype, dev, seed=3)
    sin_r = randn((b, s, d), dtype, dev, seed=4)
    _check_rope(q, k, cos_r, sin_r)
    # Contiguous [B, H, S, D] inputs too.
    _check_rope(q.contiguous(), k.contiguous(), cos_r, sin_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_broadcast_and_strided(backend: Backend, dtype):
    dev = backend.device
    b, hq, hkv, s, d = 7, 4, 2, 5, 64
    q = _hf_layout(b, hq, s, d, dtype, dev, seed=31)
    k = _hf_layout(b, hkv, s, d, dtype, dev, seed=32)
    cos1, sin1 = _hf_cos_sin(1, s, d, dtype, dev)
    _check_rope(q, k, cos1, sin1)  # [1, S, D]: broadcast over batch
    _check_rope(q, k, cos1[0], sin1[0])  # [S, D]
    _check_rope(q, k, cos1.expand(b, s, d), sin1.expand(b, s, d))  # batch stride 0
    big_c = randn((b, 2 * s, d + 8), dtype, dev, seed=33)
    big_s = randn((b, 2 * s, d + 8), dtype, dev, seed=34)
    _check_rope(q, k, big_c[:, ::2, 4 : 4 + d], big_s[:, ::2, 4 : 4 + d])  # strided cos/sin
    # q/k sliced out of a fused qkv projection [B, S, (Hq + 2 Hkv) * D]
    qkv = randn((b, s, (hq + 2 * hkv) * d), dtype, dev, seed=35)
    q2 = qkv[..., : hq * d].view(b, s, hq, d).transpose(1, 2)
    k2 = qkv[..., hq * d : (hq + hkv) * d].view(b, s, hkv, d).transpose(1, 2)
    _check_rope(q2, k2, cos1, sin1)
    # head_dim with a non-unit stride
    q3 = randn((b, hq, s, 2 * d), dtype, dev, seed=36)[..., ::2]
    _check_rope(q3, k, cos1, sin1)


def test_rotary_empty_and_bad_inputs(backend: Backend):
    dev = backend.device
    q = torch.randn(2, 4, 3, 8, device=dev)
    k = torch.randn(2, 2, 3, 8, device=dev)
    cos, sin = torch.randn(2, 3, 8, device=dev), torch.randn(2, 3, 8, device=dev)
    qo, ko = sk.ops.rotary_embedding(q[:, :, :0], k[:, :, :0], cos[:, :0], sin[:, :0])
    assert qo.shape == (2, 4, 0, 8) and ko.shape == (2, 2, 0, 8)
    with pytest.raises(ValueError, match="must be 4-D"):
        sk.ops.rotary_embedding(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="must match q"):
        sk.ops.rotary_embedding(q, k[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="must match q"):
        sk.ops.rotary_embedding(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        sk.ops.rotary_embedding(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos/sin must be"):
        sk.ops.rotary_embedding(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="cos/sin must be"):
        sk.ops.rotary_embedding(
            q, k, torch.randn(3, 3, 8, device=dev), torch.randn(3, 3, 8, device=dev)
        )
    with pytest.raises(ValueError, match="cos and sin must have one shape"):
        sk.ops.rotary_embedding(q, k, cos, sin[:1])
    with pytest.raises(TypeError, match="one dtype"):
        sk.ops.rotary_embedding(q, k, cos.half(), sin.half())
    with pytest.raises(TypeError, match="one dtype"):
        sk.ops.rotary_embedding(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="dtype int64"):
        sk.ops.rotary_embedding(q.long(), k, cos, sin)


# ------------------------------------------------------------------------------ SiLU * up


def _silu_tol(gate: torch.Tensor, up: torch.Tensor, y_hf: torch.Tensor) -> torch.Tensor:
    """fp32: torch's ``silu`` and ours are each within ~2.2 ulps of the exact value
    (measured), so they may differ by 4 ulps; the product adds ``|up|`` times that plus one
    rounding."""
    silu_hf = F.silu(gate)
    return 4 * _ulp(silu_hf, gate.dtype) * up.cpu().double().abs() + _ulp(y_hf, y_hf.dtype)


def _check_silu_mul(y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
    assert y.shape == gate.shape and y.dtype == gate.dtype and y.is_contiguous()
    y_hf = F.silu(gate) * up
    if gate.dtype in HALF_DTYPES:
        assert _bits_equal(y, y_hf), (
            f"{(y.cpu() != y_hf.cpu()).sum().item()} of {y.numel()} differ from F.silu(g) * up"
        )
    else:
        _assert_within(y, y_hf, _silu_tol(gate, up, y_hf), "silu_mul vs F.silu(gate) * up")
    g64, u64 = gate.cpu().double(), up.cpu().double()
    assert_rel_close(y, g64 * torch.sigmoid(g64) * u64, y.dtype, factor=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (1, 127), (7, 1000), (2, 3, 4096)])
def test_silu_mul_matches_transformers(backend: Backend, dtype, shape):
    skip_interpreted_bf16(backend, dtype)
    gate = randn(shape, dtype, backend.device, seed=sum(shape))
    up = randn(shape, dtype, backend.device, seed=sum(shape) + 1)
    _check_silu_mul(sk.ops.silu_mul(gate, up), gate, up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_strided(backend: Backend, dtype):
    dev = backend.device
    gate_up = randn((5, 3, 2 * 300), dtype, dev, seed=41)  # a fused gate/up projection
    gate, up = gate_up[..., :300], gate_up[..., 300:]
    _check_silu_mul(sk.ops.silu_mul(gate, up), gate, up)
    g_t = randn((300, 7), dtype, dev, seed=42).t()
    u_t = randn((7, 600), dtype, dev, seed=43)[:, ::2]
    _check_silu_mul(sk.ops.silu_mul(g_t, u_t), g_t, u_t)
    g_e = randn((1, 300), dtype, dev, seed=44).expand(4, 300)
    _check_silu_mul(sk.ops.silu_mul(g_e, u_t[:4]), g_e, u_t[:4])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # exp(1e30): inf, as wanted
def test_silu_mul_special_values(backend: Backend, dtype):
    big = 60000.0 if dtype == torch.float16 else 1e30
    g = torch.tensor(
        [
            0.0,
            -0.0,
            1e-6,
            -1e-6,
            10.0,
            -10.0,
            20.0,
            -20.0,
            88.0,
            -88.0,
            89.0,
            -89.0,
            100.0,
            -100.0,
            big,
            -big,
        ],
        dtype=dtype,
    )
    u = torch.linspace(-3.0, 3.0, g.numel(), dtype=dtype)
    y = sk.ops.silu_mul(g.to(backend.device), u.to(backend.device))
    y_hf = F.silu(g) * u
    if dtype == torch.float16:
        assert _bits_equal(y, y_hf)
    else:
        _assert_within(y, y_hf, _silu_tol(g, u, y_hf), "silu_mul special values")
        assert torch.equal(torch.signbit(y.cpu()), torch.signbit(y_hf))


def test_silu_mul_empty_and_bad_inputs(backend: Backend):
    dev = backend.device
    assert sk.ops.silu_mul(torch.empty(0, 8, device=dev), torch.empty(0, 8, device=dev)).shape == (
        0,
        8,
    )
    assert sk.ops.silu_mul(torch.empty(3, 0, device=dev), torch.empty(3, 0, device=dev)).shape == (
        3,
        0,
    )
    g = torch.randn(4, 8, device=dev)
    with pytest.raises(ValueError, match="one shape and dtype"):
        sk.ops.silu_mul(g, g[:3])
    with pytest.raises(ValueError, match="one shape and dtype"):
        sk.ops.silu_mul(g, g.half())
    with pytest.raises(TypeError, match="dtype int32"):
        sk.ops.silu_mul(g.int(), g.int())
    with pytest.raises(ValueError, match="at least 1 dimension"):
        sk.ops.silu_mul(torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev))


# ------------------------------------------------------------------------------ all ops


def test_reference_is_transformers(backend: Backend):
    # The plain-PyTorch reference is transformers' code, bit for bit (on any backend run).
    x = randn((3, 64), torch.float16, "cpu", seed=51)
    w = _weight(64, torch.float16, "cpu", seed=52)
    assert _bits_equal(ref.rms_norm(x, w, 1e-6), _hf_rms_norm(x, w, 1e-6))
    q = _hf_layout(2, 4, 5, 64, torch.float16, "cpu", 53)
    k = _hf_layout(2, 2, 5, 64, torch.float16, "cpu", 54)
    cos, sin = _hf_cos_sin(2, 5, 64, torch.float16, "cpu")
    ours, theirs = ref.rotary_embedding(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(ours, theirs, strict=True):
        assert _bits_equal(a, b)


def test_opcheck(backend: Backend):
    dev = backend.device
    x = randn((3, 5, 33), torch.float32, dev, seed=61)
    r = randn((3, 5, 33), torch.float32, dev, seed=62)
    w = _weight(33, torch.float32, dev, seed=63)
    torch.library.opcheck(torch.ops.sentinel.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.sentinel.rms_norm.default, (x.half(), w, 1e-5))
    torch.library.opcheck(torch.ops.sentinel.add_rms_norm.default, (x, r, w, 1e-6))
    q = _hf_layout(2, 4, 3, 16, torch.float32, dev, 64)
    k = _hf_layout(2, 2, 3, 16, torch.float32, dev, 65)
    cos, sin = _hf_cos_sin(1, 3, 16, torch.float32, dev)
    torch.library.opcheck(torch.ops.sentinel.rotary_embedding.default, (q, k, cos, sin))
    torch.library.opcheck(torch.ops.sentinel.silu_mul.default, (x, r))


@pytest.mark.gpu
def test_device_mismatch():
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        sk.ops.rms_norm(x, torch.ones(16))
    with pytest.raises(ValueError, match="one device"):
        sk.ops.silu_mul(x, x.cpu())
    q = torch.randn(1, 2, 3, 8, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        sk.ops.rotary_embedding(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8))


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The fused ops capture into a CUDA graph and replay on new inputs."""
    dev = "cuda"
    x = torch.randn(1, 1, 576, device=dev, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(576, device=dev, dtype=torch.bfloat16)
    q = _hf_layout(1, 9, 1, 64, torch.bfloat16, dev, seed=1)
    k = _hf_layout(1, 3, 1, 64, torch.bfloat16, dev, seed=2)
    cos, sin = _hf_cos_sin(1, 1, 64, torch.bfloat16, dev)
    g = torch.randn(1, 1, 1536, device=dev, dtype=torch.bfloat16)
    u = torch.randn_like(g)

    def step():
        return (
            sk.ops.rms_norm(x, w, 1e-5),
            *sk.ops.add_rms_norm(x, r, w, 1e-5),
            *sk.ops.rotary_embedding(q, k, cos, sin),
            sk.ops.silu_mul(g, u),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, r, w, q, k, cos, sin, g, u):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for a, b in zip(outs, expected, strict=True):
        assert _bits_equal(a, b)

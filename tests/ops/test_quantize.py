"""quantize_int8 / dequantize_int8 on every backend against the reference and fp64."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, Backend
from helpers import randn, skip_interpreted_bf16
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import quantize as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_SIZES = [1, 7, 127, 1000]


def _check_against_fp64(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dim: int) -> None:
    """The properties the op promises, checked in fp64 independently of any backend."""
    x64 = x.detach().cpu().double()
    q64 = q.cpu().double()
    s64 = scale.cpu().double().unsqueeze(dim)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert (q.cpu() >= -127).all(), "q holds -128: poisoned or out of the symmetric range"
    absmax = x64.abs().amax(dim=dim, keepdim=True)
    # scale is absmax / 127 rounded once to fp32
    assert torch.allclose(s64, absmax / 127, rtol=2.0**-23, atol=0)
    # dequantization error at most scale / 2 (plus fp32 rounding of scale and of x*inv)
    err = (x64 - q64 * s64).abs()
    assert (err <= s64 * (0.5 + 1e-5) + 1e-30).all(), f"max err/scale {(err / s64).max()}"
    # the absmax element maps to +-127
    assert (q64.abs().amax(dim=dim, keepdim=True)[absmax > 0] == 127).all()


def _run_and_compare(backend: Backend, x: torch.Tensor, dim: int = -1) -> None:
    q, scale = sk.ops.quantize_int8(x, dim=dim)
    assert q.shape == x.shape and q.device == x.device
    xm = x.movedim(dim, -1)
    q_ref, s_ref = ref.quantize_int8(xm.cpu())
    assert torch.equal(scale.cpu(), s_ref), "scales differ from the reference"
    mismatch = (q.movedim(dim, -1).cpu() != q_ref).sum().item()
    assert mismatch == 0, f"{mismatch} of {q.numel()} int8 values differ from the reference"
    _check_against_fp64(x, q, scale, dim % x.dim())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ODD_SIZES)
@pytest.mark.parametrize("cols", ODD_SIZES + [4096])
def test_quantize_matches_reference(backend: Backend, dtype, rows, cols):
    skip_interpreted_bf16(backend, dtype)
    if backend.interpreted and rows * cols > 200_000:
        pytest.skip("kept small for the interpreter")
    x = randn((rows, cols), dtype, backend.device, seed=rows * 10007 + cols)
    _run_and_compare(backend, x)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.lists(st.sampled_from([1, 2, 3, 7, 16, 33, 127]), min_size=1, max_size=3),
    dim=st.integers(-3, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_random_shapes(backend: Backend, shape, dim, seed):
    x = randn(tuple(shape), torch.float32, backend.device, seed=seed)
    dim = dim % x.dim()
    _run_and_compare(backend, x, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_non_contiguous(backend: Backend, dtype):
    base = randn((64, 300), dtype, backend.device, seed=1)
    cases = {
        "transposed": base.t(),  # column stride != 1
        "column slice": base[:, ::3],
        "row slice": base[::2, 5:250],
        "expanded": base[3:4].expand(5, 300),  # row stride 0
        "3-D permuted": randn((4, 33, 17), dtype, backend.device, seed=2).permute(2, 0, 1),
    }
    for name, x in cases.items():
        assert not x.is_contiguous(), name
        _run_and_compare(backend, x)
    _run_and_compare(backend, base, dim=0)  # per-column quantization
    _run_and_compare(backend, randn((3, 5, 7), dtype, backend.device, seed=3), dim=1)


def test_quantize_long_rows(backend: Backend):
    # Longer than the single-pass Triton tile: the two-pass path.
    x = randn((3, 40_000), torch.float32, backend.device, seed=4)
    _run_and_compare(backend, x)


def test_quantize_zero_rows_and_ties(backend: Backend):
    x = randn((5, 9), torch.float32, backend.device, seed=5)
    x[1] = 0.0
    x[3] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0, 3.5])
    q, scale = sk.ops.quantize_int8(x)
    _run_and_compare(backend, x)
    assert scale[1].item() == 0.0 and (q[1] == 0).all()
    # scale of row 3 is exactly 1, so q is x rounded half to even
    assert scale[3].item() == 1.0
    assert q[3].tolist() == [127, 0, 2, 2, 0, -2, 126, -127, 4]


def test_quantize_empty(backend: Backend):
    q, scale = sk.ops.quantize_int8(torch.empty(0, 16, device=backend.device))
    assert q.shape == (0, 16) and scale.shape == (0,)
    with pytest.raises(ValueError, match="empty dimension"):
        sk.ops.quantize_int8(torch.empty(4, 0, device=backend.device))


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize(backend: Backend, out_dtype):
    skip_interpreted_bf16(backend, out_dtype)
    x = randn((7, 1000), torch.float32, backend.device, seed=6)
    q, scale = sk.ops.quantize_int8(x)
    out = sk.ops.dequantize_int8(q, scale, dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == x.shape
    expected = ref.dequantize_int8(q.cpu(), scale.cpu(), out_dtype)
    assert torch.equal(out.cpu(), expected), "dequantized values differ from the reference"
    # round trip: within scale/2 of x (plus the output dtype's rounding)
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
    err = (out.cpu().double() - x.cpu().double()).abs()
    bound = scale.cpu().double().unsqueeze(-1) * 0.5 * (1 + 1e-5) + x.cpu().double().abs() * u
    assert (err <= bound).all()
    # strided q (column stride 2) and a non-last dim
    q_s = q[:, ::2]
    out_s = sk.ops.dequantize_int8(q_s, scale, dtype=out_dtype)
    assert torch.equal(out_s.cpu(), ref.dequantize_int8(q_s.cpu(), scale.cpu(), out_dtype))
    qd, sd = sk.ops.quantize_int8(x, dim=0)
    back = sk.ops.dequantize_int8(qd, sd, dim=0, dtype=out_dtype)
    ref_back = ref.dequantize_int8(qd.movedim(0, -1).cpu(), sd.cpu(), out_dtype).movedim(-1, 0)
    assert torch.equal(back.cpu(), ref_back)


def test_bad_inputs(backend: Backend):
    dev = backend.device
    with pytest.raises(TypeError, match="dtype int32"):
        sk.ops.quantize_int8(torch.ones(4, 4, dtype=torch.int32, device=dev))
    with pytest.raises(TypeError, match="float64"):
        sk.ops.quantize_int8(torch.ones(4, 4, dtype=torch.float64, device=dev))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        sk.ops.quantize_int8(torch.tensor(1.0, device=dev))
    with pytest.raises(IndexError, match="out of range"):
        sk.ops.quantize_int8(torch.ones(4, 4, device=dev), dim=2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sk.ops.quantize_int8([1.0, 2.0])
    q, s = sk.ops.quantize_int8(torch.randn(4, 8, device=dev))
    with pytest.raises(ValueError, match="scale shape"):
        sk.ops.dequantize_int8(q, s[:3])
    with pytest.raises(TypeError, match="dtype float32"):
        sk.ops.dequantize_int8(q.float(), s)
    with pytest.raises(TypeError, match="output dtype"):
        sk.ops.dequantize_int8(q, s, dtype=torch.int32)


def test_opcheck(backend: Backend):
    x = randn((7, 33), torch.float32, backend.device, seed=7)
    torch.library.opcheck(torch.ops.sentinel.quantize_int8.default, (x,))
    q, s = sk.ops.quantize_int8(x)
    torch.library.opcheck(torch.ops.sentinel.dequantize_int8.default, (q, s, torch.float16))


@pytest.mark.gpu
def test_device_mismatch():
    q, s = sk.ops.quantize_int8(torch.randn(4, 8, device="cuda"))
    with pytest.raises(ValueError, match="one device"):
        sk.ops.dequantize_int8(q, s.cpu())


def test_backend_selection_errors(monkeypatch):
    monkeypatch.setenv("SENTINEL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not one of"):
        sk.ops.quantize_int8(torch.randn(2, 2))
    monkeypatch.setenv("SENTINEL_BACKEND", "native")
    if HAS_CUDA:
        with pytest.raises(_backend.BackendUnavailableError, match="CPU tensors only"):
            sk.ops.quantize_int8(torch.randn(2, 2, device="cuda"))


def test_poison_is_active(backend: Backend):
    # The harness itself: outputs allocated inside the fixture start as NaN / -128.
    out = _backend.empty_output((3,), torch.float32, torch.device(backend.device))
    assert torch.isnan(out).all()
    qout = _backend.empty_output((3,), torch.int8, torch.device(backend.device))
    assert (qout == -128).all()

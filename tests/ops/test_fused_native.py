"""The C++ fused kernels: ``sentinel_kernels._C.rms_norm``, ``rotary_embedding``, ``silu_mul``.

Called on raw pointers, as the op layer calls them: results against the plain-PyTorch
reference (transformers' formulas: rotary bit-exact; RMSNorm to within the last bits of
the fp32 mean; SiLU bit-exact in 16-bit dtypes), bytes outside the output rows (row
padding) untouched, the same bits with 1 and several threads, and every bad size, stride,
pointer or dtype rejected with a ValueError naming it (never a crash).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import DTYPE_NAMES, assert_rejects, bits, forced_simd_level, matrix_args

_C = pytest.importorskip("sentinel_kernels._C")
if not hasattr(_C, "rotary_embedding"):
    pytest.skip("sentinel_kernels._C was built without the fused kernels", allow_module_level=True)
from sentinel_kernels.reference import fused as ref  # noqa: E402

PAD = 7.0  # fill of output padding that must survive


def randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- callers


def native_rms_norm(x, w, eps, *, residual=None, y_pad=0, threads=1):
    """``_C.rms_norm`` on 2-D ``x`` (any strides); outputs padded by ``y_pad`` columns."""
    rows, cols = x.shape
    y_dtype = torch.promote_types(w.dtype, x.dtype)
    y_buf = torch.full((rows, cols + y_pad), PAD, dtype=y_dtype)
    r_buf = torch.full((rows, cols + y_pad), PAD, dtype=x.dtype)
    _C.rms_norm(
        *matrix_args(x),
        residual.data_ptr() if residual is not None else 0,
        residual.stride(0) if residual is not None else 0,
        residual.stride(1) if residual is not None else 0,
        r_buf.data_ptr() if residual is not None else 0,
        cols + y_pad,
        w.data_ptr(),
        DTYPE_NAMES[w.dtype],
        w.stride(0),
        eps,
        y_buf.data_ptr(),
        DTYPE_NAMES[y_dtype],
        cols + y_pad,
        threads,
    )
    assert bool((y_buf[:, cols:] == PAD).all()), "wrote into y row padding"
    assert bool((r_buf[:, cols:] == PAD).all()), "wrote into residual_out row padding"
    if residual is None:
        assert bool((r_buf == PAD).all()), "wrote a residual without one"
    return y_buf[:, :cols], r_buf[:, :cols]


def native_rope(q, k, cos, sin, *, out_layout="bhsd", threads=1):
    """``_C.rotary_embedding``; outputs in ``[B, H, S, D]`` or (strided) ``[B, S, H, D]``."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    if out_layout == "bhsd":
        q_out, k_out = torch.full_like(q, math.nan), torch.full_like(k, math.nan)
        q_out, k_out = q_out.contiguous(), k_out.contiguous()
    else:
        q_out = torch.full((b, s, hq, d), math.nan, dtype=q.dtype).transpose(1, 2)
        k_out = torch.full((b, s, hkv, d), math.nan, dtype=k.dtype).transpose(1, 2)

    def cs_strides(t):
        return [t.stride(0) if t.shape[0] > 1 else 0, 0, t.stride(1), t.stride(2)]

    _C.rotary_embedding(
        q.data_ptr(),
        k.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q_out.data_ptr(),
        k_out.data_ptr(),
        DTYPE_NAMES[q.dtype],
        b,
        hq,
        hkv,
        s,
        d,
        list(q.stride()),
        list(k.stride()),
        cs_strides(cos),
        cs_strides(sin),
        list(q_out.stride()),
        list(k_out.stride()),
        threads,
    )
    return q_out, k_out


def native_silu_mul(g, u, *, y_pad=0, threads=1):
    rows, cols = g.shape
    y_buf = torch.full((rows, cols + y_pad), PAD, dtype=g.dtype)
    _C.silu_mul(
        g.data_ptr(),
        u.data_ptr(),
        y_buf.data_ptr(),
        DTYPE_NAMES[g.dtype],
        rows,
        cols,
        g.stride(0),
        g.stride(1),
        u.stride(0),
        u.stride(1),
        cols + y_pad,
        threads,
    )
    assert bool((y_buf[:, cols:] == PAD).all()), "wrote into y row padding"
    return y_buf[:, :cols]


# --------------------------------------------------------------------------- results


def _rms_close(y, x, w, eps):
    """Within the last bits of the fp32 mean of the reference (see tests/ops/test_fused.py):
    16-bit dtypes practically always equal, fp32 within a relative 2^-20."""
    y_ref = ref.rms_norm(x, w, eps)
    assert y.dtype == y_ref.dtype
    d = (y.double() - y_ref.double()).abs()
    scale = y_ref.double().abs()
    if y.dtype == torch.float32 and x.dtype == torch.float32:
        assert bool((d <= scale * 2.0**-20 + 1e-30).all())
    else:
        assert (d > 0).double().mean().item() < 0.01


@pytest.mark.parametrize("x_dtype", list(DTYPE_NAMES))
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 7, 127, 1000])
def test_rms_norm(x_dtype, w_dtype, cols):
    rows = 5
    x = randn((rows, cols), x_dtype, seed=cols)
    w = randn((cols,), w_dtype, seed=cols + 1)
    y, _ = native_rms_norm(x, w, 1e-6, y_pad=3)
    _rms_close(y, x, w, 1e-6)
    y2, _ = native_rms_norm(x, w, 1e-6, threads=3)
    assert torch.equal(bits(y), bits(y2)), "thread count changed the result"
    res = randn((rows, cols), x_dtype, seed=cols + 2)
    y3, r3 = native_rms_norm(x, w, 1e-6, residual=res, y_pad=2, threads=2)
    assert torch.equal(bits(r3), bits(res + x))
    _rms_close(y3, res + x, w, 1e-6)


def test_rms_norm_strides():
    base = randn((8, 600), torch.float16, seed=3)
    x = base[::2, ::3]  # row stride 1200, column stride 3
    w = randn((600,), torch.float16, seed=4)[::3]
    y, _ = native_rms_norm(x, w, 1e-5)
    _rms_close(y, x, w, 1e-5)
    res = randn((200, 4), torch.float16, seed=5).t()
    y, r = native_rms_norm(x, w, 1e-5, residual=res)
    assert torch.equal(bits(r), bits(res + x))
    ones = torch.ones(1, dtype=torch.float16).expand(200)  # weight stride 0
    y, _ = native_rms_norm(x, ones, 1e-5)
    _rms_close(y, x, ones.contiguous(), 1e-5)


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "s", "d"), [(1, 1, 1, 1, 2), (2, 9, 3, 5, 64), (3, 4, 1, 7, 96)]
)
def test_rotary(dtype, b, hq, hkv, s, d):
    q = randn((b, s, hq, d), dtype, seed=1).transpose(1, 2)
    k = randn((b, s, hkv, d), dtype, seed=2).transpose(1, 2)
    cos, sin = randn((b, s, d), dtype, seed=3), randn((b, s, d), dtype, seed=4)
    q_ref, k_ref = ref.rotary_embedding(q, k, cos, sin)
    for layout in ("bhsd", "bshd"):
        q_out, k_out = native_rope(q, k, cos, sin, out_layout=layout, threads=2)
        assert torch.equal(bits(q_out), bits(q_ref)) and torch.equal(bits(k_out), bits(k_ref))
    q_out, k_out = native_rope(q, k, cos[:1], sin[:1])  # batch broadcast (stride 0)
    q_ref, k_ref = ref.rotary_embedding(q, k, cos[:1], sin[:1])
    assert torch.equal(bits(q_out), bits(q_ref)) and torch.equal(bits(k_out), bits(k_ref))


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
def test_silu_mul(dtype):
    g = randn((6, 1000), dtype, seed=7) * 4
    u = randn((6, 1000), dtype, seed=8)
    y = native_silu_mul(g, u, y_pad=5)
    y_ref = ref.silu_mul(g, u)
    if dtype == torch.float32:
        assert torch.allclose(y, y_ref, rtol=2.0**-20, atol=1e-37)
    else:
        assert torch.equal(bits(y), bits(y_ref))
    assert torch.equal(bits(native_silu_mul(g, u, threads=4)), bits(y))
    gs, us = g[:, ::2], u.t().contiguous().t()[:, 1::2]  # column strides 2 and 6
    assert torch.equal(
        bits(native_silu_mul(gs, us)), bits(native_silu_mul(gs.contiguous(), us.contiguous()))
    )


@pytest.mark.parametrize("x_dtype", list(DTYPE_NAMES))
def test_simd_levels_agree(x_dtype):
    """AVX2 (contiguous rows) and scalar code (strided rows, or a forced scalar level) do
    the same IEEE operations: every level and layout gives the same bits."""
    cols = 1000 + 37  # full blocks of 32 and of 8, and a tail
    x = randn((3, cols), x_dtype, seed=91) * 3
    res = randn((3, cols), x_dtype, seed=92)
    w = randn((cols,), torch.float32, seed=93)
    g = randn((3, cols), x_dtype, seed=94) * 8
    x_strided = torch.zeros((3, 2 * cols), dtype=x_dtype)[:, ::2]
    x_strided.copy_(x)
    results = {}
    for level in _C.supported_simd_levels():
        with forced_simd_level(level):
            for name, xx in (("contiguous", x), ("strided", x_strided)):
                y, r = native_rms_norm(xx, w, 1e-6, residual=res, threads=2)
                results[(level, name)] = (
                    bits(y),
                    bits(r),
                    bits(native_silu_mul(xx, g)),
                    bits(native_silu_mul(g, xx)),
                )
    first_key, first = next(iter(results.items()))
    for key, got in results.items():
        for a, b in zip(first, got, strict=True):
            assert torch.equal(a, b), f"{key} differs from {first_key}"


# --------------------------------------------------------------------------- bad arguments


def test_rms_norm_bad_arguments():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    y = torch.empty(4, 8)
    r = torch.empty(4, 8)

    good = dict(
        x_ptr=x.data_ptr(),
        x_dtype="float32",
        rows=4,
        cols=8,
        x_stride_row=8,
        x_stride_col=1,
        residual_ptr=0,
        res_stride_row=0,
        res_stride_col=0,
        residual_out_ptr=0,
        res_out_stride_row=8,
        weight_ptr=w.data_ptr(),
        w_dtype="float32",
        w_stride=1,
        eps=1e-6,
        y_ptr=y.data_ptr(),
        y_dtype="float32",
        y_stride_row=8,
        num_threads=1,
    )
    assert_rejects(
        _C.rms_norm,
        good,
        [
            (dict(rows=-1), "rows must be >= 0"),
            (dict(cols=0), "cols must be >= 1"),
            (dict(x_stride_row=-8), "x_stride_row"),
            (dict(x_stride_col=0), "x_stride_col"),
            (dict(w_stride=-1), "w_stride"),
            (dict(y_stride_row=7), "y_stride_row must be >= 8"),
            (dict(num_threads=0), "num_threads"),
            (dict(eps=-1e-6), "eps"),
            (dict(eps=math.nan), "eps"),
            (dict(eps=math.inf), "eps"),
            (dict(x_ptr=0), "x_ptr is a null pointer"),
            (dict(weight_ptr=0), "weight_ptr is a null pointer"),
            (dict(y_ptr=0), "y_ptr is a null pointer"),
            (
                dict(residual_ptr=x.data_ptr(), res_stride_row=8, res_stride_col=1),
                "residual_out_ptr is a null pointer",
            ),
            (
                dict(
                    residual_ptr=x.data_ptr(),
                    res_stride_row=8,
                    res_stride_col=0,
                    residual_out_ptr=r.data_ptr(),
                ),
                "res_stride_col",
            ),
            (
                dict(
                    residual_ptr=x.data_ptr(),
                    res_stride_row=8,
                    res_stride_col=1,
                    residual_out_ptr=r.data_ptr(),
                    res_out_stride_row=4,
                ),
                "res_out_stride_row",
            ),
            (dict(x_dtype="float64"), "unsupported dtype"),
            (dict(w_dtype="int8"), "unsupported dtype"),
            (dict(y_dtype=""), "unsupported dtype"),
            (dict(x_dtype="float16", y_dtype="bfloat16"), "y_dtype must be x_dtype or float32"),
        ],
    )
    call = functools.partial(_C.rms_norm, **good)
    call(rows=0, x_ptr=0, weight_ptr=0, y_ptr=0)  # nothing to do: no pointer is read


def test_rotary_bad_arguments():
    q = torch.randn(1, 2, 3, 8)
    cs = torch.randn(1, 3, 8)
    q_out, k_out = torch.empty_like(q), torch.empty_like(q)  # alive for every call

    good = dict(
        q_ptr=q.data_ptr(),
        k_ptr=q.data_ptr(),
        cos_ptr=cs.data_ptr(),
        sin_ptr=cs.data_ptr(),
        q_out_ptr=q_out.data_ptr(),
        k_out_ptr=k_out.data_ptr(),
        dtype="float32",
        B=1,
        Hq=2,
        Hkv=2,
        S=3,
        D=8,
        q_strides=list(q.stride()),
        k_strides=list(q.stride()),
        cos_strides=[0, 0, 8, 1],
        sin_strides=[0, 0, 8, 1],
        q_out_strides=list(q.stride()),
        k_out_strides=list(q.stride()),
        num_threads=1,
    )
    assert_rejects(
        _C.rotary_embedding,
        good,
        [
            (dict(B=-1), "B must be >= 0"),
            (dict(Hq=-1), "Hq must be >= 0"),
            (dict(S=-2), "S must be >= 0"),
            (dict(D=7), "D must be even"),
            (dict(D=0), "D must be >= 2"),
            (dict(q_strides=[1, 2, 3]), "rotary_embedding: q_strides must have 4 entries"),
            (dict(cos_strides=[0, 0, 8, 1, 1]), "cos_strides must have 4 entries"),
            (dict(k_strides=[48, 24, -8, 1]), "k_strides must be >= 0"),
            (dict(q_out_strides=[-1, 0, 0, 1]), "q_out_strides must be >= 0"),
            (dict(num_threads=0), "num_threads"),
            (dict(cos_ptr=0), "cos_ptr is a null pointer"),
            (dict(sin_ptr=0), "sin_ptr is a null pointer"),
            (dict(q_ptr=0), "q_ptr is a null pointer"),
            (dict(k_out_ptr=0), "k_out_ptr is a null pointer"),
            (dict(dtype="half"), "unsupported dtype"),
        ],
    )
    call = functools.partial(_C.rotary_embedding, **good)
    call(S=0, q_ptr=0, k_ptr=0, cos_ptr=0, sin_ptr=0, q_out_ptr=0, k_out_ptr=0)
    call(Hkv=0, k_ptr=0, k_out_ptr=0)  # no k heads: k is never read


def test_silu_mul_bad_arguments():
    g = torch.randn(4, 8)
    y = torch.empty(4, 8)

    good = dict(
        gate_ptr=g.data_ptr(),
        up_ptr=g.data_ptr(),
        y_ptr=y.data_ptr(),
        dtype="float32",
        rows=4,
        cols=8,
        gate_stride_row=8,
        gate_stride_col=1,
        up_stride_row=8,
        up_stride_col=1,
        y_stride_row=8,
        num_threads=1,
    )
    assert_rejects(
        _C.silu_mul,
        good,
        [
            (dict(rows=-1), "rows must be >= 0"),
            (dict(cols=-1), "cols must be >= 0"),
            (dict(gate_stride_row=-1), "gate_stride_row"),
            (dict(up_stride_col=-1), "up_stride_col"),
            (dict(y_stride_row=4), "y_stride_row must be >= 8"),
            (dict(num_threads=-3), "num_threads"),
            (dict(gate_ptr=0), "gate_ptr is a null pointer"),
            (dict(up_ptr=0), "up_ptr is a null pointer"),
            (dict(y_ptr=0), "y_ptr is a null pointer"),
            (dict(dtype="int8"), "unsupported dtype"),
        ],
    )
    call = functools.partial(_C.silu_mul, **good)
    call(cols=0, gate_ptr=0, up_ptr=0, y_ptr=0)

"""The C++ INT8 quantizer (``sentinel_kernels._C.quantize_int8`` / ``dequantize_int8``).

Every SIMD level this CPU supports (forced in turn) must give results bit-identical to
``reference.quantize``, whose contract is: ``absmax = max|x|``, ``scale = absmax / 127``,
``inv = 127 / absmax`` (both correctly rounded fp32 divisions), ``q =
clamp(round_half_even(x * inv), -127, 127)``, all-zero rows give scale 0 and q 0.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPE_NAMES,
    assert_rejects,
    assert_same_bits,
    forced_simd_level,
    native_quantize,
    quantize_input,
)

_C = pytest.importorskip("sentinel_kernels._C")
from sentinel_kernels.reference.quantize import quantize_int8  # noqa: E402

LEVELS = _C.supported_simd_levels()
COLS = (1, 7, 15, 16, 17, 127, 1000, 4096)
ROWS = (1, 3, 64)


def native_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    num_threads: int = 1,
    out_stride_row: int | None = None,
) -> torch.Tensor:
    rows, cols = q.shape
    osr = cols if out_stride_row is None else out_stride_row
    out_buf = torch.full((rows, osr), 7.0, dtype=dtype)
    _C.dequantize_int8(
        q.data_ptr(),
        rows,
        cols,
        q.stride(0),
        q.stride(1),
        scale.data_ptr(),
        scale.stride(0),
        out_buf.data_ptr(),
        DTYPE_NAMES[dtype],
        osr,
        num_threads,
    )
    if osr > cols:
        assert bool((out_buf[:, cols:] == 7.0).all()), "wrote into out row padding"
    return out_buf[:, :cols]


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
def test_quantize_matches_reference(simd_level, dtype):
    for rows in ROWS:
        for cols in COLS:
            x = quantize_input(rows, cols, dtype, seed=rows * 10007 + cols)
            q_ref, s_ref = quantize_int8(x)
            for threads in (1, 2):
                q, s = native_quantize(x, threads)
                assert_same_bits(s, s_ref)
                assert_same_bits(q, q_ref)


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
def test_quantize_strided(simd_level, dtype):
    for rows in ROWS:
        for cols in COLS:
            base = quantize_input(rows, 2 * cols + 3, dtype, seed=cols * 31 + rows)
            # column stride 2 (gather path), row stride 2 * cols + 3
            x = base[:, : 2 * cols : 2]
            assert x.shape == (rows, cols) and x.stride(1) == 2
            # column stride 1, row stride > cols (contiguous SIMD path)
            y = quantize_input(rows, cols, dtype, seed=cols + rows, wide=5)
            assert y.stride(0) == cols + 5
            for t in (x, y):
                q_ref, s_ref = quantize_int8(t)
                for threads in (1, 2):
                    q, s = native_quantize(t, threads, q_stride_row=cols + 9)
                    assert_same_bits(s, s_ref)
                    assert_same_bits(q, q_ref)
                    # strided and contiguous inputs agree bit for bit
                    q2, s2 = native_quantize(t.contiguous(), threads)
                    assert_same_bits(q2, q)
                    assert_same_bits(s2, s)


def test_quantize_transposed_input(simd_level):
    x = quantize_input(64, 200, torch.float32, seed=5).t()  # [200, 64], strides (1, 200)
    q_ref, s_ref = quantize_int8(x)
    q, s = native_quantize(x, 2)
    assert_same_bits(q, q_ref)
    assert_same_bits(s, s_ref)


def test_quantize_large_rows_threads(simd_level):
    x = quantize_input(257, 4096, torch.float32, seed=11)
    q_ref, s_ref = quantize_int8(x)
    for threads in (1, 2, 3, 8):
        q, s = native_quantize(x, threads)
        assert_same_bits(q, q_ref)
        assert_same_bits(s, s_ref)


def _quantized_same_at_all_levels(run):
    """``run()`` (a sequence of ``(q, scale)`` pairs) at every SIMD level: each level's pairs
    are bit-identical to the first level's, which are returned."""
    results = _run_all_levels(run)
    first = results[LEVELS[0]]
    for name in LEVELS[1:]:
        for (q0, s0), (q1, s1) in zip(first, results[name], strict=True):
            assert_same_bits(q1, q0)
            assert_same_bits(s1, s0)
    return first


def _run_all_levels(fn):
    results = {}
    for name in LEVELS:
        with forced_simd_level(name):
            results[name] = fn()
    return results


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_quantize_every_16bit_pattern_consistent(dtype):
    """All 65536 bit patterns (NaN, inf, subnormals included), one per row and mixed
    into long rows: every SIMD level agrees bit for bit, and finite rows match the
    reference."""
    pats = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    single = pats.reshape(-1, 1)
    g = torch.Generator().manual_seed(3)
    mixed = pats[torch.randperm(pats.numel(), generator=g)].reshape(-1, 1000 + 24)[:, :1000]
    mixed = mixed.contiguous()
    finite = torch.isfinite(mixed.float()).all(dim=1)

    def run():
        return [native_quantize(t, 2) for t in (single, mixed, mixed[:, ::3])]

    first = _quantized_same_at_all_levels(run)
    q, s = first[0]
    ok = torch.isfinite(single.float()).squeeze(1)
    q_ref, s_ref = quantize_int8(single[ok])
    assert_same_bits(q[ok], q_ref)
    assert_same_bits(s[ok], s_ref)
    q, s = first[1]
    q_ref, s_ref = quantize_int8(mixed[finite])
    assert_same_bits(q[finite], q_ref)
    assert_same_bits(s[finite], s_ref)


def test_quantize_special_float32_consistent():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(48, 100, generator=g)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = -float("inf")
    x[3] = 1e-42  # subnormal absmax: 127 / absmax overflows to inf
    x[4, ::2] = float("nan")
    x[5] = torch.randint(0, 2**31, (100,), generator=g, dtype=torch.int32).view(torch.float32)
    x[6] = torch.tensor(3.4e38)
    x[7, 50] = -3.4e38

    def run():
        return native_quantize(x, 2), native_quantize(x[:, ::2], 1)

    first = _quantized_same_at_all_levels(run)
    (q, s), _ = first
    assert torch.isnan(s[0]) and torch.isnan(s[4]) and bool((q[0] == 0).all())
    assert torch.isinf(s[1]) and torch.isinf(s[2])
    finite_rows = [r for r in range(48) if r not in (0, 1, 2, 3, 4, 5)]
    q_ref, s_ref = quantize_int8(x[finite_rows])
    assert_same_bits(q[finite_rows], q_ref)
    assert_same_bits(s[finite_rows], s_ref)


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
def test_dequantize_matches_reference(simd_level, dtype):
    g = torch.Generator().manual_seed(1)
    for rows in ROWS:
        for cols in COLS:
            q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
            scale = torch.rand(rows, generator=g) * torch.pow(
                10.0, torch.randint(-6, 4, (rows,), generator=g)
            )
            ref = (q.float() * scale[:, None]).to(dtype)
            for threads in (1, 2):
                out = native_dequantize(q, scale, dtype, threads)
                assert_same_bits(out, ref)
                out = native_dequantize(q, scale, dtype, threads, out_stride_row=cols + 3)
                assert_same_bits(out, ref)
            # strided q columns and scale stride 2
            q_wide = torch.randint(-127, 128, (rows, 2 * cols), dtype=torch.int8, generator=g)
            q_s = q_wide[:, ::2]
            scale_wide = torch.rand(2 * rows, generator=g)
            scale_s = scale_wide[::2]
            out = native_dequantize(q_s, scale_s, dtype, 2)
            assert_same_bits(out, (q_s.float() * scale_s[:, None]).to(dtype))


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=list(DTYPE_NAMES.values()))
def test_dequantize_conversion_edge_cases(dtype):
    """q = +-1 times scales with arbitrary bit patterns: exercises the fp32 -> fp16/bf16
    rounding (ties, overflow to inf, subnormals, NaN) on every level."""
    g = torch.Generator().manual_seed(2)
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            65504.0,
            65519.99,
            65520.0,
            2.0**-24,
            2.0**-25,
            1.5 * 2.0**-25,
            2.0**-14,
            3.0e38,
            1e-40,
            1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8,
        ]
    )
    rnd = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int32)
    near_half = (
        torch.randint(0x33000000, 0x47800000, (100_000,), generator=g, dtype=torch.int32) & ~0xFFF
    ) | 0x1000  # exact fp16 ties
    scale = torch.cat([specials, rnd.view(torch.float32), near_half.view(torch.float32)])
    q = torch.where(torch.rand(scale.numel(), 1, generator=g) < 0.5, 1, -1).to(torch.int8)
    q = q.expand(-1, 17).contiguous()  # 17 columns: SIMD body plus tail

    results = _run_all_levels(lambda: native_dequantize(q, scale, dtype, 2))
    first = results[LEVELS[0]]
    for name in LEVELS[1:]:
        assert_same_bits(results[name], first)
    prod = q.float() * scale[:, None]
    ref = prod.to(dtype)
    nan = torch.isnan(prod)
    assert bool(torch.isnan(first[nan].float()).all())
    assert_same_bits(first[~nan], ref[~nan])
    if dtype == torch.bfloat16:
        assert bool((first[nan].view(torch.int16) == 0x7FC0).all())


def test_round_trip(simd_level):
    for dtype in DTYPE_NAMES:
        x = quantize_input(64, 1000, dtype, seed=4)
        q, s = native_quantize(x, 2)
        y = native_dequantize(q, s, torch.float32, 2)
        err = (y - x.float()).abs()
        assert bool((err <= s[:, None] * 0.5001 + 1e-30).all())
        y16 = native_dequantize(q, s, dtype, 2)
        assert_same_bits(y16, y.to(dtype))


# Invalid values of the arguments quantize_int8 and dequantize_int8 share.
BAD_IN_BOTH = [
    dict(rows=-1),
    dict(cols=0),
    dict(q_ptr=0),
    dict(scale_ptr=0),
    dict(q_stride_row=0),
    dict(num_threads=0),
]


def test_bad_arguments_raise_value_error():
    x = torch.randn(4, 8)
    q = torch.empty(4, 8, dtype=torch.int8)
    s = torch.empty(4)
    xp, qp, sp = x.data_ptr(), q.data_ptr(), s.data_ptr()
    good = dict(
        x_ptr=xp,
        dtype="float32",
        rows=4,
        cols=8,
        x_stride_row=8,
        x_stride_col=1,
        q_ptr=qp,
        q_stride_row=8,
        scale_ptr=sp,
        num_threads=1,
    )
    assert_rejects(
        _C.quantize_int8,
        good,
        BAD_IN_BOTH
        + [
            dict(dtype="float64"),
            dict(dtype="int8"),
            dict(cols=-3),
            dict(x_ptr=0),
            dict(x_stride_row=0),
            dict(x_stride_row=-8),
            dict(x_stride_col=0),
            dict(x_stride_col=-1),
            dict(q_stride_row=7),
            dict(num_threads=-2),
        ],
    )
    # zero rows: nothing to do, null pointers allowed
    _C.quantize_int8(**{**good, "rows": 0, "x_ptr": 0, "q_ptr": 0, "scale_ptr": 0})

    out = torch.empty(4, 8)
    goodd = dict(
        q_ptr=qp,
        rows=4,
        cols=8,
        q_stride_row=8,
        q_stride_col=1,
        scale_ptr=sp,
        scale_stride=1,
        out_ptr=out.data_ptr(),
        out_dtype="float32",
        out_stride_row=8,
        num_threads=1,
    )
    assert_rejects(
        _C.dequantize_int8,
        goodd,
        BAD_IN_BOTH
        + [
            dict(out_dtype="float64"),
            dict(out_dtype=""),
            dict(out_ptr=0),
            dict(q_stride_col=0),
            dict(scale_stride=0),
            dict(scale_stride=-1),
            dict(out_stride_row=7),
            dict(out_stride_row=0),
        ],
    )
    _C.dequantize_int8(**{**goodd, "rows": 0, "q_ptr": 0, "scale_ptr": 0, "out_ptr": 0})

    with pytest.raises(TypeError):
        _C.quantize_int8(xp, "float32", 4, 8, 8, 1, qp, 8, sp)  # missing num_threads


def test_error_message_is_clear():
    with pytest.raises(ValueError, match="dtype"):
        _C.quantize_int8(1, "float64", 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="q_stride_row"):
        _C.quantize_int8(1, "float32", 1, 8, 8, 1, 1, 4, 1, 1)

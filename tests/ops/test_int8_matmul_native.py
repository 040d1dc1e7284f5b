"""The C++ INT8 linear kernels (``sentinel_kernels._C.int8_linear_w8a16`` / ``_w8a8``).

``int8_linear_w8a16``: y = x @ (w * s)^T + bias accumulated in fp32. Checked element-wise
against a float64 reference built from the same int8 weights and fp32 scales, with the
error model of fp32 accumulation plus one rounding to the output dtype:
``|y - ref| <= ACC_TOL * (|x| @ |w * s|^T + |bias|) + u_out * |ref|``.

``int8_linear_w8a8``: per-token quantization (the quantize_int8 rule, optionally after
dividing by SmoothQuant factors), exact int32 products, and the epilogue
``((float)acc * a_scale) * w_scale + bias`` in fp32. Checked against a float64
reference built from the same quantized activations, and bit for bit against the same
epilogue evaluated by PyTorch in fp32; every SIMD level must give identical bits.

Every SIMD level this CPU supports is forced in turn with ``set_simd_level``.
Output buffers are prefilled with NaN (and rows padded past N) to catch elements that
are left unwritten or written out of bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import bits, forced_simd_level, int8_linear_args

_C = pytest.importorskip("sentinel_kernels._C")
from sentinel_kernels.reference.quantize import quantize_int8  # noqa: E402

LEVELS = _C.supported_simd_levels()

# Unit roundoff of a round-to-nearest conversion to each output dtype.
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# fp32 accumulation over K <= 1000 terms: the worst case gamma_K ~ K * 2^-24 = 6e-5 is
# never approached by blocked/vector summation (observed <= 2e-7); 1e-5 keeps a wide
# margin while still catching any wrong term (one term of |x w s| is >= 1e-3 of the sum).
ACC_TOL = 1e-5


def make_x(M, K, dtype, x_stride, gen, zero_row=False):
    """x as a view with row stride x_stride (>= K) into a NaN-padded buffer."""
    buf = torch.full((max(M, 1), x_stride), float("nan"), dtype=torch.float32)
    buf[:M, :K] = torch.randn(M, K, generator=gen) * 2.0
    if zero_row and M > 1:
        buf[1, :K] = 0.0
    x = buf.to(dtype)[:M, :K]
    assert x.stride() == (x_stride, 1)
    return x


def make_w(N, K, gen):
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    return w


def out_buffer(M, N, dtype, out_stride):
    return torch.full((max(M, 1), out_stride), float("nan"), dtype=dtype)


def check_padding_untouched(buf, M, N):
    if buf.shape[1] > N:
        assert torch.isnan(buf[:M, N:].float()).all(), "kernel wrote past N"


# --------------------------------------------------------------------------- W8A16


def expand_scale(scale, K, group_size):
    """Per-element fp64 scale [N, K] from per-channel [N, 1] or per-group [N, G] scales."""
    s = scale.double()
    if group_size == 0:
        return s[:, :1].expand(-1, K)
    return s.repeat_interleave(group_size, dim=1)[:, :K]


def run_w8a16(x, w, scale, group_size, bias, out_dtype, out_stride, num_threads):
    M, N = x.shape[0], w.shape[0]
    out = out_buffer(M, N, out_dtype, out_stride)
    kw = dict(bias=bias, group_size=group_size, threads=num_threads)
    _C.int8_linear_w8a16(**int8_linear_args(x, w, scale, out[:M], **kw))
    check_padding_untouched(out, M, N)
    return out[:M, :N]


def check_w8a16(x, w, scale, group_size, bias, out_dtype, y):
    K = x.shape[1]
    ws = w.double() * expand_scale(scale, K, group_size)
    ref = x.double() @ ws.T
    absref = x.double().abs() @ ws.abs().T
    if bias is not None:
        ref = ref + bias.double()
        absref = absref + bias.double().abs()
    yd = y.double()
    assert torch.isfinite(yd).all(), "unwritten (NaN) or non-finite outputs"
    bound = ACC_TOL * absref + UNIT[out_dtype] * ref.abs() + 1e-30
    if out_dtype == torch.float16:
        bound = bound + 2.0**-25  # fp16 subnormal spacing / 2
    excess = (yd - ref).abs() - bound
    worst = excess.max().item()
    assert worst <= 0, f"max error exceeds the bound by {worst:g}"


# (M, K, N, group_size): covers K % 16 and K % 64 tails, N = 1, N tails of the 32-wide
# panels, M tails of every kernel (GEMV up to M = 12, GEMM above), full and partial last
# groups, and a group size that is not a multiple of the vector width (generic packer).
W8A16_SHAPES = [
    (1, 1, 1, 0),
    (1, 7, 5, 0),
    (1, 127, 33, 32),
    (1, 1000, 70, 128),
    (1, 64, 17, 16),
    (3, 127, 9, 0),
    (7, 1000, 33, 32),
    (7, 100, 20, 7),
    (17, 127, 70, 128),
    (17, 1000, 1, 0),
    (64, 127, 33, 0),
    (64, 1000, 70, 32),
    (64, 96, 40, 48),
]


@pytest.mark.parametrize("M,K,N,group_size", W8A16_SHAPES)
def test_w8a16_matches_reference(simd_level, M, K, N, group_size):
    gen = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N * 7 + group_size)
    w = make_w(N, K, gen)
    G = 1 if group_size == 0 else math.ceil(K / group_size)
    # Scale rows padded past G: the kernel must use scale_stride_row.
    scale_buf = torch.rand(N, G + 3, generator=gen) * 0.01 + 1e-4
    scale = scale_buf[:, :G]
    for i, (x_dtype, out_dtype, with_bias, threads) in enumerate(
        [
            (torch.float32, torch.float32, False, 1),
            (torch.float32, torch.float32, True, 2),
            (torch.float16, torch.float16, True, 2),
            (torch.bfloat16, torch.bfloat16, False, 1),
            (torch.bfloat16, torch.float32, True, 2),
        ]
    ):
        x_stride = K + (3 if i % 2 else 0)
        out_stride = N + (5 if i % 2 == 0 else 0)
        x = make_x(M, K, x_dtype, x_stride, gen)
        bias = (torch.randn(N, generator=gen) * 0.1).to(x_dtype) if with_bias else None
        y = run_w8a16(x, w, scale, group_size, bias, out_dtype, out_stride, threads)
        check_w8a16(x, w, scale, group_size, bias, out_dtype, y)


def test_w8a16_strided_weights_and_large_n(simd_level):
    """w rows with stride > K; N large enough for the work to be split across threads
    (the kernels only hand a worker >= ~100 us of work)."""
    gen = torch.Generator().manual_seed(5)
    M, K, N = 2, 1000, 3000
    w_buf = make_w(N, K + 24, gen)
    w = w_buf[:, :K]
    scale = torch.rand(N, 1, generator=gen) * 0.01
    x = make_x(M, K, torch.float32, K, gen)
    for threads in (1, 2, 3):
        y = run_w8a16(x, w, scale, 0, None, torch.float32, N, threads)
        check_w8a16(x, w, scale, 0, None, torch.float32, y)


def test_w8a16_thread_count_does_not_change_bits():
    gen = torch.Generator().manual_seed(11)
    for M in (1, 5, 40):
        K, N = 1000, 3000
        w = make_w(N, K, gen)
        scale = torch.rand(N, 1, generator=gen) * 0.01
        x = make_x(M, K, torch.float32, K, gen)
        y1 = run_w8a16(x, w, scale, 0, None, torch.float32, N, 1)
        y2 = run_w8a16(x, w, scale, 0, None, torch.float32, N, 2)
        assert torch.equal(bits(y1), bits(y2))
    assert _C.thread_pool_size() >= 1  # the work was split


# --------------------------------------------------------------------------- W8A8


def run_w8a8(x, smooth, w, w_scale, bias, out_dtype, out_stride, num_threads):
    M, N = x.shape[0], w.shape[0]
    out = out_buffer(M, N, out_dtype, out_stride)
    kw = dict(bias=bias, smooth=smooth, w8a8=True, threads=num_threads)
    _C.int8_linear_w8a8(**int8_linear_args(x, w, w_scale, out[:M], **kw))
    check_padding_untouched(out, M, N)
    return out[:M, :N]


def check_w8a8(x, smooth, w, w_scale, bias, out_dtype, y):
    xs = x.float()
    if smooth is not None:
        xs = xs / smooth
    q, a_scale = quantize_int8(xs)
    acc = q.double() @ w.double().T  # exact: |acc| < 2^31
    # float64 reference of the same quantized problem.
    prod = acc * a_scale.double()[:, None] * w_scale.double()[None, :]
    ref = prod + (0.0 if bias is None else bias.double())
    absref = prod.abs() + (0.0 if bias is None else bias.double().abs())
    yd = y.double()
    assert torch.isfinite(yd).all(), "unwritten (NaN) or non-finite outputs"
    # int -> fp32, two products and a sum in fp32, then the output rounding.
    bound = 4 * 2.0**-24 * absref + UNIT[out_dtype] * ref.abs()
    if out_dtype == torch.float16:
        bound = bound + 2.0**-25
    worst = ((yd - ref).abs() - bound).max().item()
    assert worst <= 0, f"max error exceeds the bound by {worst:g}"
    # The documented fp32 epilogue, evaluated by PyTorch: identical bits.
    y32 = (acc.to(torch.int32).float() * a_scale[:, None]) * w_scale[None, :]
    if bias is not None:
        y32 = y32 + bias.float()
    exact = y32.to(out_dtype)
    mismatch = (bits(exact) != bits(y.contiguous())).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} elements differ from the fp32 epilogue"


W8A8_SHAPES = [
    (1, 1, 1),
    (1, 7, 5),
    (1, 127, 33),
    (1, 1000, 70),
    (2, 64, 17),
    (4, 65, 32),
    (7, 1000, 33),
    (17, 127, 70),
    (17, 1000, 1),
    (64, 127, 33),
    (64, 1000, 65),
]


@pytest.mark.parametrize("M,K,N", W8A8_SHAPES)
def test_w8a8_matches_reference(simd_level, M, K, N):
    gen = torch.Generator().manual_seed(M * 1000003 + K * 1009 + N)
    w = make_w(N, K, gen)
    w_scale = torch.rand(N, generator=gen) * 0.01 + 1e-4
    smooth = torch.rand(K, generator=gen) * 2.0 + 0.25
    for i, (x_dtype, out_dtype, with_bias, with_smooth, threads) in enumerate(
        [
            (torch.float32, torch.float32, False, False, 1),
            (torch.float32, torch.float32, True, True, 2),
            (torch.float16, torch.float16, True, False, 2),
            (torch.bfloat16, torch.bfloat16, False, True, 1),
            (torch.float16, torch.float32, True, True, 2),
        ]
    ):
        x_stride = K + (3 if i % 2 else 0)
        out_stride = N + (5 if i % 2 == 0 else 0)
        x = make_x(M, K, x_dtype, x_stride, gen, zero_row=True)
        bias = (torch.randn(N, generator=gen) * 0.1).to(x_dtype) if with_bias else None
        sm = smooth if with_smooth else None
        y = run_w8a8(x, sm, w, w_scale, bias, out_dtype, out_stride, threads)
        check_w8a8(x, sm, w, w_scale, bias, out_dtype, y)


@pytest.mark.parametrize("M", [1, 3, 7, 17, 64])
def test_w8a8_bit_identical_across_levels_and_threads(M):
    gen = torch.Generator().manual_seed(100 + M)
    # Large enough for the work to be split across 2 threads at every M (the kernels only
    # hand a worker >= ~100 us of work).
    K, N = 1000, (7001 if M <= 3 else 2001)
    w = make_w(N, K, gen)
    w_scale = torch.rand(N, generator=gen) * 0.01
    smooth = torch.rand(K, generator=gen) + 0.5
    x = make_x(M, K, torch.bfloat16, K + 1, gen, zero_row=True)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    outs = {}
    for name in LEVELS:
        with forced_simd_level(name):
            for threads in (1, 2):
                for out_dtype in (torch.float32, torch.float16):
                    outs[(name, threads, out_dtype)] = run_w8a8(
                        x, smooth, w, w_scale, bias, out_dtype, N, threads
                    )
    for out_dtype in (torch.float32, torch.float16):
        base = outs[(LEVELS[0], 1, out_dtype)]
        for key, y in outs.items():
            if key[2] is out_dtype:
                assert torch.equal(bits(y), bits(base)), f"{key} differs from {LEVELS[0]}"


def test_w8a8_row_results_do_not_depend_on_m():
    """Token m's output is the same whether it is computed alone or in a batch."""
    gen = torch.Generator().manual_seed(3)
    K, N = 300, 50
    w = make_w(N, K, gen)
    w_scale = torch.rand(N, generator=gen) * 0.01
    x = make_x(40, K, torch.float32, K, gen)
    full = run_w8a8(x, None, w, w_scale, None, torch.float32, N, 2)
    for m in (0, 13, 39):
        one = run_w8a8(x[m : m + 1], None, w, w_scale, None, torch.float32, N, 1)
        assert torch.equal(bits(one), bits(full[m : m + 1]))


def test_w8a8_extreme_weights(simd_level):
    """w = -128 everywhere and |q| = 127: the largest products, exact in int32."""
    M, K, N = 3, 1000, 20
    w = torch.full((N, K), -128, dtype=torch.int8)
    x = torch.ones(M, K)
    x[1] = -1.0
    w_scale = torch.ones(N)
    y = run_w8a8(x, None, w, w_scale, None, torch.float32, N, 2)
    # q = +-127, a_scale = 1/127: y = +-127 * (1/127) * (-128 * 1000)
    check_w8a8(x, None, w, w_scale, None, torch.float32, y)
    assert y[0, 0].item() == pytest.approx(-128000.0, rel=1e-6)


# --------------------------------------------------------------------------- arguments


def _args(w8a8: bool, **over):
    """Valid keyword arguments of the W8A16 (W8A8) entry point with overrides, plus the
    tensors they point into (the caller keeps them alive for the duration of the call)."""
    x, w, out = torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.zeros(2, 4)
    s = torch.ones(4) if w8a8 else torch.ones(4, 1)
    args = int8_linear_args(x, w, s, out, w8a8=w8a8)
    args.update(over)
    return args, (x, w, s, out)


def _w8a16_args(**over):
    return _args(False, **over)


def _w8a8_args(**over):
    return _args(True, **over)


COMMON_BAD = [
    dict(M=-1),
    dict(K=0),
    dict(N=0),
    dict(x_stride_row=7),
    dict(w_stride_row=7),
    dict(out_stride_row=3),
    dict(num_threads=0),
    dict(x_dtype="float64"),
    dict(out_dtype="int8"),
    dict(bias_dtype="half"),
    dict(x_ptr=0),
    dict(w_ptr=0),
    dict(out_ptr=0),
]


@pytest.mark.parametrize(
    "over",
    COMMON_BAD
    + [
        dict(scale_ptr=0),
        dict(group_size=-1),
        dict(scale_stride_row=0),
        dict(group_size=3, scale_stride_row=2),  # ceil(8 / 3) = 3 groups
    ],
)
def test_w8a16_bad_arguments(over):
    args, keep = _w8a16_args(**over)
    with pytest.raises(ValueError):
        _C.int8_linear_w8a16(**args)


@pytest.mark.parametrize(
    "over",
    COMMON_BAD + [dict(w_scale_ptr=0), dict(K=132105, x_stride_row=132105, w_stride_row=132105)],
)
def test_w8a8_bad_arguments(over):
    args, keep = _w8a8_args(**over)
    with pytest.raises(ValueError):
        _C.int8_linear_w8a8(**args)


def test_valid_argument_sets_run():
    args, keep = _w8a16_args(group_size=3, scale_stride_row=3)
    s = torch.ones(4, 3)
    args["scale_ptr"] = s.data_ptr()
    _C.int8_linear_w8a16(**args)
    args, keep = _w8a8_args()
    _C.int8_linear_w8a8(**args)


def test_m_zero_returns_immediately():
    # No pointer is dereferenced (or even checked) when there is nothing to compute.
    args, keep = _w8a16_args(M=0, x_ptr=0, w_ptr=0, scale_ptr=0, out_ptr=0)
    _C.int8_linear_w8a16(**args)
    args, keep = _w8a8_args(M=0, x_ptr=0, w_ptr=0, w_scale_ptr=0, out_ptr=0)
    _C.int8_linear_w8a8(**args)

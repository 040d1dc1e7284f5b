"""int8_linear (W8A16) and int8_linear_a8 (W8A8) on every backend against an fp64 oracle.

The oracle is computed in fp64 from the very int8 weights and fp32 scales the op gets
(and, for W8A8, from the int8 activations of the reference quantizer, which every
backend reproduces bit for bit), so the only error left is the op's own arithmetic:
fp32 products and sums and one rounding of the output to ``x.dtype``.

Tolerances (norm-wise relative error): the output rounding contributes at most the unit
roundoff u of the output dtype, so ``helpers.REL_TOL`` (4u for fp16/bf16, 1e-5 for fp32)
covers it with margin; on top, an fp32 sum of K terms contributes about ``sqrt(K) * 2**-24``
(rounding errors of a K-term sum grow like a random walk), allowed 4x. That second
term only matters for fp32 outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, Backend, skip_unless_available
from helpers import REL_TOL, randn, rel_error, skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import int8_matmul as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): K not a multiple of 16, N = 1, M on both sides of the decode limit (16), and
# K = 256, a multiple of every K tile (the kernels' unmasked EVEN_K loops).
SHAPES = [
    (1, 1, 7),
    (1, 33, 127),
    (1, 33, 256),
    (16, 5, 1000),
    (17, 1, 127),
    (17, 40, 1000),
    (24, 20, 256),
    (40, 17, 7),
]


def _tol(dtype: torch.dtype, k: int) -> float:
    return REL_TOL[dtype] + 4 * math.sqrt(max(k, 1)) * 2.0**-24


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, k: int):
    assert actual.dtype == dtype
    err = rel_error(actual, expected)
    tol = _tol(dtype, k)
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.3e} ({dtype}, K={k})"


def _weights(n: int, k: int, device: str, group_size: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    shape = (n,) if group_size is None else (n, -(-k // group_size))
    scale = (torch.rand(shape, generator=g) * 0.02 + 0.001).float()
    return w.to(device), scale.to(device)


def _bias(kind: str | None, n: int, dtype: torch.dtype, device: str, seed: int = 1):
    if kind is None:
        return None
    return randn((n,), dtype if kind == "x" else torch.float32, device, seed=seed)


def _w64(w: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    s = scale.detach().cpu().double()
    if group_size is not None:
        s = s.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    else:
        s = s[:, None]
    return w.cpu().double() * s


def _expected_w8a16(x, w, scale, bias=None, group_size=None) -> torch.Tensor:
    y = x.detach().cpu().double() @ _w64(w, scale, group_size).t()
    return y + bias.cpu().double() if bias is not None else y


def _expected_w8a8(x, w, scale, smooth=None, bias=None) -> torch.Tensor:
    q, a_scale = ref.quantize_activations(x.cpu(), None if smooth is None else smooth.cpu())
    xq = q.double() * a_scale.double().unsqueeze(-1)
    y = xq @ _w64(w, scale, None).t()
    return y + bias.cpu().double() if bias is not None else y


# ------------------------------------------------------------------------------ W8A16


@pytest.mark.parametrize("bias_kind", [None, "x", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}N{}K{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_matches_fp64(backend: Backend, dtype, shape, bias_kind):
    skip_interpreted_bf16(backend, dtype)
    if bias_kind == "fp32" and dtype == torch.float32:
        pytest.skip("same as bias_kind='x'")
    m, n, k = shape
    dev = backend.device
    x = randn((m, k), dtype, dev, seed=m * 1000 + k)
    w, scale = _weights(n, k, dev, seed=n + k)
    bias = _bias(bias_kind, n, dtype, dev)
    y = sk.ops.int8_linear(x, w, scale, bias)
    assert y.shape == (m, n) and y.device == x.device
    _assert_close(y, _expected_w8a16(x, w, scale, bias), dtype, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_3d_and_strided(backend: Backend, dtype):
    skip_interpreted_bf16(backend, dtype)
    dev = backend.device
    w, scale = _weights(24, 130, dev, seed=3)
    bias = _bias("x", 24, dtype, dev)
    base = randn((3, 2, 130), dtype, dev, seed=4)
    cases = {
        "3-D": base,  # 6 rows: decode path
        "3-D prefill": randn((2, 11, 130), dtype, dev, seed=5),  # 22 rows: prefill path
        "permuted leading dims": base.transpose(0, 1),  # needs a copy to flatten
        "row slice": randn((40, 140), dtype, dev, seed=6)[::2, 5:135],  # row stride 280
        "column stride 2": randn((5, 260), dtype, dev, seed=7)[:, ::2],
    }
    for name, x in cases.items():
        y = sk.ops.int8_linear(x, w, scale, bias)
        assert y.shape == (*x.shape[:-1], 24), name
        _assert_close(y, _expected_w8a16(x, w, scale, bias), dtype, 130)
    # strided weights: a column slice of a wider int8 matrix, and a transposed copy
    w_wide, _ = _weights(24, 200, dev, seed=8)
    w_view = w_wide[:, 10:140]
    y = sk.ops.int8_linear(cases["3-D"], w_view, scale)
    _assert_close(y, _expected_w8a16(cases["3-D"], w_view, scale), dtype, 130)


@pytest.mark.parametrize("group_size", [32, 48, 128])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_groupwise(backend: Backend, dtype, m, group_size):
    skip_interpreted_bf16(backend, dtype)
    dev = backend.device
    k = 1000  # not a multiple of any group size here: the last group is partial
    x = randn((m, k), dtype, dev, seed=m)
    w, scale = _weights(33, k, dev, group_size=group_size, seed=group_size)
    assert scale.shape == (33, -(-k // group_size))
    bias = _bias("fp32", 33, dtype, dev)
    y = sk.ops.int8_linear(x, w, scale, bias, group_size=group_size)
    _assert_close(y, _expected_w8a16(x, w, scale, bias, group_size), dtype, k)
    # group_size >= K: one group, a [N, 1] scale
    w1, s1 = _weights(7, 100, dev, group_size=128, seed=9)
    x1 = randn((m, 100), dtype, dev, seed=10)
    y1 = sk.ops.int8_linear(x1, w1, s1, group_size=128)
    _assert_close(y1, _expected_w8a16(x1, w1, s1, None, 128), dtype, 100)


def test_int8_linear_empty(backend: Backend):
    dev = backend.device
    w, scale = _weights(6, 16, dev)
    y = sk.ops.int8_linear(torch.empty(0, 16, device=dev), w, scale)
    assert y.shape == (0, 6)
    y = sk.ops.int8_linear(torch.empty(2, 0, 16, device=dev), w, scale)
    assert y.shape == (2, 0, 6)
    # K = 0: an empty sum, the output is the bias
    bias = randn((6,), torch.float32, dev, seed=11)
    y = sk.ops.int8_linear(torch.empty(3, 0, device=dev), w[:, :0], scale, bias)
    assert torch.equal(y.cpu(), bias.cpu().expand(3, 6))
    w0, s0 = _weights(0, 16, dev)
    assert sk.ops.int8_linear(torch.ones(3, 16, device=dev), w0, s0).shape == (3, 0)


# ------------------------------------------------------------------------------- W8A8


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("use_smooth", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}N{}K{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_linear_a8_matches_fp64(backend: Backend, dtype, shape, use_smooth, use_bias):
    skip_interpreted_bf16(backend, dtype)
    m, n, k = shape
    dev = backend.device
    x = randn((m, k), dtype, dev, seed=m * 1000 + k)
    w, scale = _weights(n, k, dev, seed=n + k)
    smooth = (torch.rand(k, generator=torch.Generator().manual_seed(k)) * 4 + 0.25).to(dev)
    smooth = smooth if use_smooth else None
    bias = _bias("x", n, dtype, dev) if use_bias else None
    y = sk.ops.int8_linear_a8(x, w, scale, smooth, bias)
    assert y.shape == (m, n)
    _assert_close(y, _expected_w8a8(x, w, scale, smooth, bias), dtype, k)


def test_int8_linear_a8_3d_zero_rows_and_fp32_bias(backend: Backend):
    dev = backend.device
    x = randn((2, 9, 100), torch.float16, dev, seed=12)
    x[0, 3] = 0.0  # a zero row quantizes to scale 0, q 0: its output is the bias
    w, scale = _weights(20, 100, dev, seed=13)
    bias = _bias("fp32", 20, torch.float16, dev)
    y = sk.ops.int8_linear_a8(x, w, scale, None, bias)
    assert y.shape == (2, 9, 20)
    _assert_close(y, _expected_w8a8(x, w, scale, None, bias), torch.float16, 100)
    assert torch.equal(y[0, 3].cpu(), bias.to(torch.float16).cpu())


def test_int8_linear_a8_approximates_float_linear(backend: Backend):
    # End to end: SmoothQuant-style smoothing, weights pre-multiplied by smooth, int8
    # both sides; the result approximates the fp32 layer within int8 quantization noise.
    dev = backend.device
    g = torch.Generator().manual_seed(14)
    m, n, k = 24, 48, 256
    x = torch.randn(m, k, generator=g)
    x[:, :4] *= 30.0  # outlier channels, the case SmoothQuant is for
    w = torch.randn(n, k, generator=g) * 0.05
    absx, absw = x.abs().amax(0), w.abs().amax(0)
    smooth = (absx.sqrt() / absw.sqrt()).float()  # alpha = 0.5
    w_q, w_s = sk.reference.quantize_int8(w * smooth)
    y = sk.ops.int8_linear_a8(x.to(dev), w_q.to(dev), w_s.to(dev), smooth.to(dev))
    y_plain = sk.ops.int8_linear_a8(x.to(dev), *(t.to(dev) for t in sk.reference.quantize_int8(w)))
    exact = x.double() @ w.double().t()
    err_smooth, err_plain = rel_error(y, exact), rel_error(y_plain.to(dev), exact)
    assert err_smooth < 0.02, err_smooth
    assert err_smooth < err_plain, (err_smooth, err_plain)


# ---------------------------------------------------------------------------- errors


def test_bad_inputs(backend: Backend):
    dev = backend.device
    x = torch.randn(4, 8, device=dev)
    w, s = _weights(6, 8, dev)
    lin, a8 = sk.ops.int8_linear, sk.ops.int8_linear_a8
    with pytest.raises(TypeError, match="x has dtype int32"):
        lin(x.int(), w, s)
    with pytest.raises(TypeError, match="x has dtype float64"):
        a8(x.double(), w, s)
    with pytest.raises(TypeError, match="w_int8 has dtype float32"):
        lin(x, w.float(), s)
    with pytest.raises(TypeError, match="w_scale has dtype float16"):
        a8(x, w, s.half())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        lin([[1.0] * 8], w, s)
    with pytest.raises(ValueError, match="must be 2-D"):
        lin(x, w[0], s)
    with pytest.raises(ValueError, match="x has K=8 but w_int8 has K=7"):
        lin(x, w[:, :7], s)
    with pytest.raises(ValueError, match="x has K=8 but w_int8 has K=7"):
        a8(x, w[:, :7], s)
    with pytest.raises(ValueError, match="w_scale shape"):
        lin(x, w, s[:5])
    with pytest.raises(ValueError, match="w_scale shape"):
        lin(x, w, s, group_size=4)  # needs [6, 2]
    with pytest.raises(ValueError, match="w_scale shape"):
        a8(x, w, s[:, None].expand(6, 2).contiguous())
    with pytest.raises(ValueError, match="group_size must be positive"):
        lin(x, w, s[:, None], group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        lin(x, w, s[:, None], group_size=4.0)
    with pytest.raises(ValueError, match="bias shape"):
        lin(x, w, s, torch.zeros(5, device=dev))
    with pytest.raises(TypeError, match="bias has dtype int64"):
        a8(x, w, s, None, torch.zeros(6, dtype=torch.long, device=dev))
    with pytest.raises(TypeError, match="bias has dtype float16"):
        lin(x, w, s, torch.zeros(6, dtype=torch.float16, device=dev))  # x is fp32
    with pytest.raises(ValueError, match="smooth shape"):
        a8(x, w, s, torch.ones(7, device=dev))
    with pytest.raises(TypeError, match="smooth has dtype float16"):
        a8(x, w, s, torch.ones(8, dtype=torch.float16, device=dev))


@pytest.mark.gpu
def test_device_mismatch():
    x = torch.randn(4, 8, device="cuda")
    w, s = _weights(6, 8, "cuda")
    with pytest.raises(ValueError, match="tensors must be on one device"):
        sk.ops.int8_linear(x, w.cpu(), s)
    with pytest.raises(ValueError, match="tensors must be on one device"):
        sk.ops.int8_linear(x, w, s, torch.zeros(6))
    with pytest.raises(ValueError, match="tensors must be on one device"):
        sk.ops.int8_linear_a8(x, w, s, torch.ones(8))


def test_opcheck(backend: Backend):
    dev = backend.device
    x = randn((2, 3, 40), torch.float32, dev, seed=15)
    w, s = _weights(9, 40, dev)
    w_g, s_g = _weights(9, 40, dev, group_size=16)
    b = randn((9,), torch.float32, dev, seed=16)
    smooth = torch.rand(40, device=dev) + 0.5
    torch.library.opcheck(torch.ops.sentinel.int8_linear.default, (x, w, s, b, None))
    torch.library.opcheck(torch.ops.sentinel.int8_linear.default, (x, w_g, s_g, None, 16))
    torch.library.opcheck(torch.ops.sentinel.int8_linear_a8.default, (x, w, s, smooth, b))
    torch.library.opcheck(torch.ops.sentinel.int8_linear_a8.default, (x, w, s, None, None))


# ------------------------------------------------------------- Triton paths, directly


@pytest.fixture
def triton_device() -> str:
    """The device the Triton kernels run on here (CPU through the interpreter)."""
    dev = "cuda" if HAS_CUDA else "cpu"
    skip_unless_available(Backend(dev, "triton"))
    return dev


def _kim():
    from sentinel_kernels.kernels import int8_matmul as kim

    return kim


def _run_w8a16(dev, m, n, k, group_size, config, dtype=torch.float32, bias=True):
    x = randn((m, k + 3), dtype, dev, seed=m * 7 + k)[:, 3:]  # row stride k + 3
    w, scale = _weights(n, k, dev, group_size=group_size or None, seed=n)
    b = _bias("fp32", n, dtype, dev) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
    _kim().w8a16(x, w, scale, b, out, group_size, config=config)
    _assert_close(out, _expected_w8a16(x, w, scale, b, group_size or None), dtype, k)


# BLOCK_K 64 vs group 32 (groups inside a tile), 128 (tile inside a group), 48 (neither:
# per-element scales).
@pytest.mark.parametrize("group_size", [0, 32, 48, 128])
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1),
        dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3),
        dict(BLOCK_N=8, BLOCK_K=128, SPLIT_K=2),
    ],
    ids=lambda c: "BN{BLOCK_N}-BK{BLOCK_K}-S{SPLIT_K}".format(**c),
)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_decode_path(triton_device, m, config, group_size):
    # M <= 16: the GEMV (M == 1) and the swap-AB MMA (2..16), with and without split-K;
    # K = 300 has a ragged last tile, K = 512 none (EVEN_K).
    for k in (300, 512):
        _run_w8a16(triton_device, m, 37, k, group_size, config)
    if group_size == 0:
        _run_w8a16(triton_device, m, 37, 256, group_size, config, dtype=torch.float16, bias=False)


@pytest.mark.parametrize("group_size", [0, 32, 48])
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SWAP_AB=True),
        dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SWAP_AB=False),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, SWAP_AB=False),
        # serial split-K: 3 slices of 96 over K = 200 (the last one ragged), 2 over 256
        dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, SWAP_AB=True, SPLIT_K=3),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, SWAP_AB=False, SPLIT_K=2),
    ],
    ids=lambda c: "BM{BLOCK_M}-BN{BLOCK_N}-BK{BLOCK_K}-swap{SWAP_AB}-S{}".format(
        c.get("SPLIT_K", 1), **c
    ),
)
@pytest.mark.parametrize("m", [17, 64])
def test_prefill_path(triton_device, m, config, group_size):
    for k in (200, 256):
        _run_w8a16(triton_device, m, 45, k, group_size, config)
    if group_size == 0:
        _run_w8a16(triton_device, m, 45, 256, group_size, config, dtype=torch.float16)


def test_prefill_split_k_more_slices_than_tiles(triton_device):
    # SPLIT_K = 8 over K = 100 and BLOCK_K = 32: slices of 32, the last four empty (they
    # must store zero partials, not skip the store); two launches in a row check that
    # the last program re-arms each tile's counter.
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SWAP_AB=True, SPLIT_K=8)
    for _ in range(2):
        _run_w8a16(triton_device, 19, 40, 100, 0, config)


def test_path_selection(triton_device, monkeypatch):
    kim = _kim()
    calls = []
    for name in ("_w8a16_decode", "_w8a16_prefill"):
        orig = getattr(kim, name)

        def record(*args, _orig=orig, _name=name):
            calls.append((_name, args[0].shape[0]))
            return _orig(*args)

        monkeypatch.setattr(kim, name, record)
    w, s = _weights(8, 32, triton_device)
    with _backend.use_backend("triton"):
        for m in (1, 16, 17, 64):
            sk.ops.int8_linear(torch.randn(m, 32, device=triton_device), w, s)
    assert calls == [
        ("_w8a16_decode", 1),
        ("_w8a16_decode", 16),
        ("_w8a16_prefill", 17),
        ("_w8a16_prefill", 64),
    ]
    assert kim.DECODE_MAX_M == 16


def _fake_bench_last_wins():
    # Stand-in for the autotuner's GPU benchmark: runs each candidate once (so every
    # config is executed and checked) and reports decreasing times, so the last
    # candidate wins.
    t = [100.0]

    def bench(kernel_call, quantiles=None):
        kernel_call()
        t[0] -= 1.0
        return [t[0]] * (len(quantiles) if quantiles else 1)

    return bench


@pytest.mark.skipif(HAS_CUDA, reason="CPU check of the launch logic; GPUs tune for real")
def test_autotuned_split_k_selection(triton_device, monkeypatch):
    # The multi-config path GPUs take: real prune functions, the split-K buffer sized
    # from the pruned candidates, SPLIT_K read back from the autotuner's choice.
    import triton

    kim = _kim()

    def cfgs(**extra):
        return [
            triton.Config({**extra, "SPLIT_K": s}, num_warps=1, num_stages=1) for s in (1, 2, 4)
        ]

    gemv = triton.autotune(
        cfgs(BLOCK_N=16, BLOCK_K=32),
        key=kim._DECODE_KEY,
        prune_configs_by={"early_config_prune": kim._prune_decode},
        do_bench=_fake_bench_last_wins(),
    )(kim._decode_jit)
    w8a8 = triton.autotune(
        cfgs(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1),
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": kim._prune_w8a8},
        do_bench=_fake_bench_last_wins(),
    )(kim._w8a8_jit)
    monkeypatch.setattr(kim, "_gemv_tuned", gemv)
    monkeypatch.setattr(kim, "_w8a8_tuned", w8a8)
    monkeypatch.setattr(kim, "_max_split_cache", {})
    dev = triton_device
    x = randn((1, 300), torch.float32, dev, seed=17)
    w, scale = _weights(37, 300, dev, seed=18)
    for _ in range(2):  # tuning run, then the cached choice
        out = torch.full((1, 37), float("nan"), device=dev)
        kim.w8a16(x, w, scale, None, out)
        assert gemv.best_config.kwargs["SPLIT_K"] == 4
        _assert_close(out, _expected_w8a16(x, w, scale), torch.float32, 300)
        out = torch.full((1, 37), float("nan"), device=dev)
        kim.w8a8(x, w, scale, None, None, out)
        assert w8a8.best_config.kwargs["SPLIT_K"] == 4
        _assert_close(out, _expected_w8a8(x, w, scale), torch.float32, 300)
    # The GEMM path (17 <= M): split-K only while the tiles cannot fill the GPU.
    gemm = triton.autotune(
        [
            triton.Config(
                {
                    "BLOCK_M": 32,
                    "BLOCK_N": 16,
                    "BLOCK_K": 32,
                    "GROUP_M": 1,
                    "SWAP_AB": True,
                    "SPLIT_K": s,
                },
                num_warps=1,
                num_stages=1,
            )
            for s in (1, 2, 4)
        ],
        key=kim._GEMM_KEY,
        prune_configs_by={"early_config_prune": kim._prune_prefill},
        do_bench=_fake_bench_last_wins(),
    )(kim._gemm_jit)
    monkeypatch.setattr(kim, "_gemm_tuned", gemm)
    xm = randn((40, 300), torch.float32, dev, seed=21)
    for _ in range(2):
        out = torch.full((40, 37), float("nan"), device=dev)
        kim.w8a16(xm, w, scale, None, out)
        assert gemm.best_config.kwargs["SPLIT_K"] == 4
        _assert_close(out, _expected_w8a16(xm, w, scale), torch.float32, 300)
    # 600 rows: the M bucket is above SPLIT_GEMM_MAX_M, no split-K candidate is left
    xl = randn((600, 300), torch.float32, dev, seed=22)
    out = torch.full((600, 37), float("nan"), device=dev)
    kim.w8a16(xl, w, scale, None, out)
    assert gemm.best_config.kwargs["SPLIT_K"] == 1
    _assert_close(out, _expected_w8a16(xl, w, scale), torch.float32, 300)
    # K too short to split: the prune keeps SPLIT_K=1 only
    x2 = randn((1, 40), torch.float32, dev, seed=19)
    w2, s2 = _weights(37, 40, dev, seed=20)
    out = torch.full((1, 37), float("nan"), device=dev)
    kim.w8a16(x2, w2, s2, None, out)
    assert gemv.best_config.kwargs["SPLIT_K"] == 1
    _assert_close(out, _expected_w8a16(x2, w2, s2), torch.float32, 40)


@pytest.mark.parametrize("cols", [7, 1000, 20_000])  # 20000: the two-pass quantizer
def test_quantize_activations_bit_exact(triton_device, cols):
    kim = _kim()
    x = randn((5, cols), torch.float16, triton_device, seed=cols)
    x[2] = 0.0
    smooth = (torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.5).to(x.device)
    for sm in (smooth, None):
        q = torch.full((5, cols), -128, dtype=torch.int8, device=x.device)
        scale = torch.full((5,), float("nan"), device=x.device)
        kim.quantize_activations(x, sm, q, scale)
        q_ref, s_ref = ref.quantize_activations(x.cpu(), None if sm is None else sm.cpu())
        assert torch.equal(scale.cpu(), s_ref)
        assert torch.equal(q.cpu(), q_ref)


@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=1),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=3),
        dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=4, SPLIT_K=1),
        dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=4, SPLIT_K=2),
    ],
    ids=["BM16", "BM16-S3", "BM32", "BM32-S2"],
)
@pytest.mark.parametrize("m", [1, 16, 50])
def test_w8a8_kernel_configs(triton_device, m, config):
    kim = _kim()
    dev = triton_device
    for k in (200, 256):
        x = randn((m, k + 3), torch.float16, dev, seed=m)[:, 3:]
        w, scale = _weights(37, k, dev, seed=m)
        smooth = torch.rand(k, device=dev) + 0.5
        b = _bias("fp32", 37, torch.float16, dev)
        out = torch.full((m, 37), float("nan"), dtype=torch.float16, device=dev)
        kim.w8a8(x, w, scale, smooth, b, out, config=config)
        _assert_close(out, _expected_w8a8(x, w, scale, smooth, b), torch.float16, k)


# ----------------------------------------------------------------------- GPU, full size


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 4096, 4096),
        (1, 14336, 4096),
        (1, 4096, 14336),
        (1, 32000, 4096),
        (8, 4096, 4096),
        (16, 14336, 4096),
        (17, 4096, 4096),
        (4096, 4096, 4096),
        (333, 1000, 1000),
    ],
    ids=lambda s: "M{}N{}K{}".format(*s),
)
@pytest.mark.parametrize("group_size", [None, 128])
def test_gpu_full_size(dtype, shape, group_size):
    m, n, k = shape
    x = randn((m, k), dtype, "cuda", seed=m)
    w, scale = _weights(n, k, "cuda", group_size=group_size, seed=n)
    bias = _bias("x", n, dtype, "cuda")
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        y = sk.ops.int8_linear(x, w, scale, bias, group_size)
        expected = (x.double() @ _w64(w, scale, group_size).cuda().t()) + bias.double()
        _assert_close(y, expected, dtype, k)
        if group_size is None:
            smooth = torch.rand(k, device="cuda") + 0.5
            y8 = sk.ops.int8_linear_a8(x, w, scale, smooth, bias)
            _assert_close(y8, _expected_w8a8(x, w, scale, smooth, bias), dtype, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [None, 128, 96])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_dequant_gemm_path_in_chunks(dtype, group_size, with_bias):
    """Large M: dequantize-then-cuBLAS, forced into several odd-sized weight chunks."""
    from sentinel_kernels.kernels import int8_matmul as kim

    m, n, k = kim.DEQUANT_GEMM_MIN_M + 3, 1000, 1056
    x = randn((m, k), dtype, "cuda", seed=5)
    w, scale = _weights(n, k, "cuda", group_size=group_size, seed=6)
    bias = _bias("x", n, dtype, "cuda") if with_bias else None
    y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    # 320-row chunks of the dequantized weights.
    kim.w8a16(x, w, scale, bias, y, group_size or 0, workspace_bytes=2 * k * 320)
    expected = x.double() @ _w64(w, scale, group_size).cuda().t()
    if bias is not None:
        expected = expected + bias.double()
    # One more rounding than the fused path: each dequantized weight is rounded to the
    # activation dtype before the GEMM.
    _assert_close(y, expected, dtype, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(64, 576, 576), (33, 3072, 576), (128, 576, 1536), (256, 2048, 2048), (100, 8192, 2048)],
    ids=lambda s: "M{}N{}K{}".format(*s),
)
@pytest.mark.parametrize("split", [2, 4, 8])
def test_gpu_split_k_gemm_in_cuda_graph(dtype, shape, split):
    """Batched-decode sizes on the split-K GEMM, captured once and replayed on new rows.

    Every replay must re-arm the per-tile arrival counters, or the second replay's last
    program never sees its count and leaves the output unwritten (the poison stays).
    """
    from sentinel_kernels.kernels import int8_matmul as kim

    m, n, k = shape
    config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SWAP_AB=True, SPLIT_K=split)
    w, scale = _weights(n, k, "cuda", seed=n + k)
    bias = _bias("x", n, dtype, "cuda")
    x = randn((m, k), dtype, "cuda", seed=1)
    out = torch.empty((m, n), dtype=dtype, device="cuda")
    kim.w8a16(x, w, scale, bias, out, 0, config=config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kim.w8a16(x, w, scale, bias, out, 0, config=config)
    for seed in (2, 3, 4):
        x.copy_(randn((m, k), dtype, "cuda", seed=seed))
        out.fill_(float("nan"))
        graph.replay()
        expected = x.double() @ _w64(w, scale, None).cuda().t() + bias.double()
        _assert_close(out, expected, dtype, k)

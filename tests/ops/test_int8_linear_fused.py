"""int8_linear_fused: W8A16 linear with a fused SiLU-mul / RMSNorm prologue and residual add.

The op is defined as the composition (``reference.int8_linear_fused``)::

    a = silu_mul(x[..., :K], x[..., K:]) if silu_input else x
    a = rms_norm(a, norm_weight, eps) if norm_weight is not None else a
    y = int8_linear(a, w_int8, w_scale, bias, group_size)
    y = residual + y if residual is not None else y

with every intermediate rounded to ``x.dtype``. Two oracles:

* The composition in the same dtype on the same inputs: the one-launch Triton kernel must
  round where it rounds. What may differ is the order of the fp32 sums only (the GEMV's
  K-term sum and the RMS statistic's sum of squares), plus, on the GPU in fp32, an FMA
  contraction of the last scale multiply with the residual add.

  - float32: a K-term fp32 sum in another order differs by about ``sqrt(K) * 2**-24``
    (norm-wise relative; rounding errors grow like a random walk), and so does the RMS
    statistic, which scales every input element: allowed ``8 * sqrt(K) * 2**-24 + 4u``,
    far below any missing or extra step (those are O(1) or, for a wrong rounding
    point, invisible in fp32 only because fp32 rounding is the identity).
  - float16 / bfloat16: such a tiny fp32 difference can flip the output's rounding (one
    ulp of ``y``), and the residual add's rounding then by another ulp; a flipped rounding
    of an input element (the normalised row) moves ``y`` by one term's ulp only. Allowed:
    ``2 ulps`` of the dtype at the output's magnitude (``max |composition|``), elementwise,
    and fewer than 10% of the elements may differ at all: a rounding step done at another
    point than the composition's changes about half of them (one ulp each), correct
    kernels ~0-1% (the sums' order flips a rounding with probability ~``sqrt(K) u_fp32 /
    u_dtype``).
* fp64 evaluation of the formula without intermediate roundings (looser): the dtype's
  intermediate roundings (silu, product, normalised row, weight product, output, residual
  add) each add at most ``u`` relative per element and average out in the norm:
  ``2 * REL_TOL`` (8u) for 16-bit, plus the sum term for fp32.

The Triton kernel runs through the interpreter on CPU (which has no bfloat16 arithmetic:
bf16 runs on the GPU only). The op on the CPU backends is the composition itself (bit for
bit). Outputs are NaN-poisoned so that an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, Backend, skip_unless_available
from helpers import REL_TOL, UNIT_ROUNDOFF, f64, randn, rel_error, same_bits, skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import int8_matmul as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
EPS = 1e-5

# The prologue/epilogue combinations (norm, silu, residual). The first four are the decode
# layer's uses: RMSNorm -> QKV / gate-up, SiLU-mul -> down -> residual add, o_proj ->
# residual add, and a norm with a residual; the last one combines all three.
VARIANTS = {
    "norm": (True, False, False),
    "silu+residual": (False, True, True),
    "residual": (False, False, True),
    "norm+residual": (True, False, True),
    "silu+norm+residual": (True, True, True),
}
# (K, N, group_size, bias kind): odd K (ragged last K tile), K = 256 (a multiple of the
# K tile: the kernel's unmasked EVEN_K loads), K = 1000 with group 32 (a partial last
# group, groups inside a 64-wide tile) and 48 (per-element scales), odd N.
CASES = [
    (7, 97, None, "fp32"),
    (127, 37, 32, None),
    (256, 96, None, "x"),
    (1000, 37, 32, "fp32"),
    (1000, 37, 48, None),
]
CONFIGS = [
    dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1),
    dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3),
]


# ------------------------------------------------------------------------------ inputs


def _weights(n: int, k: int, device: str, group_size: int | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    shape = (n,) if group_size is None else (n, -(-k // group_size))
    scale = (torch.rand(shape, generator=g) * 0.02 + 0.001).float()
    return w.to(device), scale.to(device)


def _inputs(
    lead: tuple[int, ...],
    k: int,
    n: int,
    dtype: torch.dtype,
    device: str,
    *,
    norm: bool,
    silu: bool,
    residual: bool,
    group_size: int | None = None,
    bias_kind: str | None = None,
    seed: int = 0,
) -> dict:
    """Keyword arguments of int8_linear_fused. ``x`` is a view at an offset into a wider
    buffer (row stride != K) and ``residual`` a view with stride 2 along N."""
    width = 2 * k if silu else k
    x = randn((*lead, width + 3), dtype, device, seed=seed)[..., 3:]
    w, scale = _weights(n, k, device, group_size, seed + 1)
    kw: dict = dict(x=x, w_int8=w, w_scale=scale, group_size=group_size, silu_input=silu)
    if bias_kind is not None:
        kw["bias"] = randn((n,), dtype if bias_kind == "x" else torch.float32, device, seed + 2)
    if norm:
        g = torch.Generator().manual_seed(seed + 3)
        nw = 1.0 + 0.5 * torch.randn(k, generator=g, dtype=torch.float64)
        kw["norm_weight"] = nw.to(dtype).to(device)
        kw["eps"] = EPS
    if residual:
        kw["residual"] = randn((*lead, 2 * n), dtype, device, seed + 4)[..., ::2]
    return kw


def _oracle(x, w_int8, w_scale, bias=None, group_size=None, **kw) -> torch.Tensor:
    """The formula in fp64, without intermediate roundings."""
    k = w_int8.shape[1]
    a = f64(x)
    if kw.get("silu_input"):
        g, u = a[..., :k], a[..., k:]
        a = g * torch.sigmoid(g) * u
    nw = kw.get("norm_weight")
    if nw is not None:
        a = f64(nw) * a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + kw["eps"])
    s = w_scale.cpu().double()
    s = s[:, None] if group_size is None else s.repeat_interleave(group_size, 1)[:, :k]
    y = a @ (w_int8.cpu().double() * s).t()
    if bias is not None:
        y = y + f64(bias)
    res = kw.get("residual")
    return y + f64(res) if res is not None else y


def _ulp_at(v: float, dtype: torch.dtype) -> float:
    """Spacing of ``dtype``'s numbers at magnitude ``v`` (normal range)."""
    return 2.0 ** (math.floor(math.log2(v)) - MANTISSA_BITS[dtype]) if v > 0 else 0.0


def _assert_matches(out: torch.Tensor, kw: dict, what: str) -> None:
    """``out`` against the composition in its dtype and against fp64 (module docstring)."""
    x, k = kw["x"], kw["w_int8"].shape[1]
    dtype = x.dtype
    n = kw["w_int8"].shape[0]
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], n), (out.dtype, out.shape)
    comp = ref.int8_linear_fused(**kw)
    a, e = out.detach().cpu().double(), comp.detach().cpu().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite output (an unwritten poisoned element?)"
    if dtype == torch.float32:
        err = rel_error(out, comp)
        tol = 8 * math.sqrt(k) * 2.0**-24 + 4 * UNIT_ROUNDOFF[dtype]
        assert err <= tol, f"{what}: relative error vs composition {err:.3e} > {tol:.3e}"
    else:
        tol = 2 * _ulp_at(e.abs().max().item(), dtype)
        worst = (a - e).abs().max().item()
        assert worst <= tol, f"{what}: max |fused - composition| {worst:.3e} > 2 ulps {tol:.3e}"
        differ = (a != e).double().mean().item()
        assert differ < 0.1, f"{what}: {differ:.1%} of the elements differ from the composition"
    err = rel_error(out, _oracle(**kw))
    tol = 2 * (REL_TOL[dtype] + 4 * math.sqrt(k) * 2.0**-24)
    assert err <= tol, f"{what}: relative error vs fp64 {err:.3e} > {tol:.3e}"


# ----------------------------------------------------------------- the kernel, directly


@pytest.fixture
def triton_device() -> str:
    """The device the Triton kernels run on here (CPU through the interpreter)."""
    dev = "cuda" if HAS_CUDA else "cpu"
    skip_unless_available(Backend(dev, "triton"))
    return dev


def _kim():
    from sentinel_kernels.kernels import int8_matmul as kim

    return kim


def _launch(kw: dict, config: dict | None) -> torch.Tensor:
    """kernels.int8_matmul.w8a16_fused on ``x``'s rows, into a NaN-poisoned output."""
    x, w = kw["x"], kw["w_int8"]
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    _kim().w8a16_fused(
        x,
        w,
        kw["w_scale"],
        kw.get("bias"),
        out,
        kw["group_size"] or 0,
        config,
        norm_weight=kw.get("norm_weight"),
        eps=kw.get("eps", 1e-6),
        residual=kw.get("residual"),
        silu_input=kw["silu_input"],
    )
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "S{SPLIT_K}".format(**c))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_matches_composition(triton_device, variant, dtype, config):
    skip_interpreted_bf16(Backend(triton_device, "triton"), dtype)
    norm, silu, residual = VARIANTS[variant]
    for i, (k, n, group_size, bias_kind) in enumerate(CASES):
        kw = _inputs(
            (1,),
            k,
            n,
            dtype,
            triton_device,
            norm=norm,
            silu=silu,
            residual=residual,
            group_size=group_size,
            bias_kind=bias_kind,
            seed=100 * i + k,
        )
        _assert_matches(_launch(kw, config), kw, f"{variant} K={k} N={n} g={group_size}")


# Several rows: the decode MMA (2..16 rows) and the GEMM (17+), with and without split-K.
ROW_CONFIGS = {
    2: [None, dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=3)],
    16: [dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=1)],
    17: [None, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SWAP_AB=False, SPLIT_K=2)],
    40: [dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2, SWAP_AB=True, SPLIT_K=3)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("variant", ["silu+residual", "residual", "silu"])
@pytest.mark.parametrize("m", list(ROW_CONFIGS))
def test_kernel_rows_match_composition(triton_device, m, variant, dtype):
    # The multi-row launch (batched decode, chunks): SiLU-mul prologue on the activation
    # tiles, residual epilogue ([M, N], strided), no norm; K = 127 ragged, 256 even.
    # Groups of 64 hold whole K tiles (a tile holding several groups dequantizes per
    # element and rounds the weight to the dtype, the plain MMA's documented extra rounding).
    silu, residual = "silu" in variant, "residual" in variant
    for k, n, group_size, bias_kind in [(127, 37, 64, "fp32"), (256, 45, None, "x")]:
        kw = _inputs(
            (m,),
            k,
            n,
            dtype,
            triton_device,
            norm=False,
            silu=silu,
            residual=residual,
            group_size=group_size,
            bias_kind=bias_kind,
            seed=m + k,
        )
        for config in ROW_CONFIGS[m]:
            _assert_matches(_launch(kw, config), kw, f"{variant} M={m} K={k} {config}")


def test_kernel_rows_refuse_a_norm(triton_device):
    kw = _inputs((3,), 64, 16, torch.float32, triton_device, norm=True, silu=False, residual=True)
    with pytest.raises(ValueError, match="one row"):
        _launch(kw, None)


def test_kernel_autotuned_launch_and_residual_layouts(triton_device):
    # config=None: the autotuned launch (the op's path), with a contiguous [N] residual and
    # a [1, N] one with a large stride along N.
    dtype = torch.float32 if triton_device == "cpu" else torch.bfloat16
    for residual in ("1-D", "stride 5"):
        kw = _inputs((1,), 300, 40, dtype, triton_device, norm=True, silu=True, residual=True)
        if residual == "1-D":
            kw["residual"] = kw["residual"].reshape(-1).contiguous()
        else:
            kw["residual"] = randn((1, 200), dtype, triton_device, seed=9)[:, ::5]
        out = _launch(kw, None)
        comp_kw = dict(kw, residual=kw["residual"].reshape(1, 40))
        _assert_matches(out, comp_kw, f"autotuned, residual {residual}")


def test_kernel_fusion_flags_tune_separately(triton_device, monkeypatch):
    # The fusion flags are in the autotuner's key: a fused launch must not reuse the plain
    # GEMV's cached config (nor the other way round), so each shape tunes per variant.
    if HAS_CUDA:
        pytest.skip("CPU check of the launch logic; GPUs tune for real")
    import triton

    kim = _kim()
    configs = [
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": s}, num_warps=1, num_stages=1)
        for s in (1, 2)
    ]
    calls = []

    def bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        return [float(len(calls))] * (len(quantiles) if quantiles else 1)

    tuned = triton.autotune(
        configs,
        key=kim._DECODE_KEY,
        prune_configs_by={"early_config_prune": kim._prune_decode},
        do_bench=bench,
    )(kim._decode_jit)
    monkeypatch.setattr(kim, "_gemv_tuned", tuned)
    monkeypatch.setattr(kim, "_max_split_cache", {})
    kw = _inputs((1,), 300, 37, torch.float32, "cpu", norm=True, silu=False, residual=True)
    plain = torch.full((1, 37), float("nan"))
    kim.w8a16(kw["x"], kw["w_int8"], kw["w_scale"], None, plain)
    assert len(tuned.cache) == 1
    _assert_matches(_launch(kw, None), kw, "fused after plain")
    assert len(tuned.cache) == 2
    expected = ref.int8_linear(kw["x"], kw["w_int8"], kw["w_scale"])
    assert rel_error(plain, expected) <= 8 * math.sqrt(300) * 2.0**-24


# ------------------------------------------------------------------------------- the op


def _composition_via_ops(x, w_int8, w_scale, bias=None, group_size=None, **kw) -> torch.Tensor:
    """The unfused ops one after the other (what the op must equal off the fused path)."""
    k = w_int8.shape[1]
    a = sk.ops.silu_mul(x[..., :k], x[..., k:]) if kw.get("silu_input") else x
    if kw.get("norm_weight") is not None:
        a = sk.ops.rms_norm(a, kw["norm_weight"], kw["eps"])
    y = sk.ops.int8_linear(a, w_int8, w_scale, bias, group_size)
    res = kw.get("residual")
    return res + y if res is not None else y


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_op_matches_composition(backend: Backend, dtype, variant):
    skip_interpreted_bf16(backend, dtype)
    norm, silu, residual = VARIANTS[variant]
    dev = backend.device
    # (leading dims, K, N, group size): one row as [1, 1, K] (the fused launch on the
    # Triton backend), a few rows (the composition: decode MMA), more rows (prefill).
    shapes = [((1, 1), 127, 37, None), ((5,), 200, 37, 32), ((2, 9), 64, 20, None)]
    for j, (lead, k, n, group_size) in enumerate(shapes):
        kw = _inputs(
            lead,
            k,
            n,
            dtype,
            dev,
            norm=norm,
            silu=silu,
            residual=residual,
            group_size=group_size,
            bias_kind="x" if j != 1 else None,
            seed=7 * j + k,
        )
        y = sk.ops.int8_linear_fused(**kw)
        assert y.device == kw["x"].device and y.is_contiguous()
        what = f"{backend} {variant} {lead}"
        fused_launch = backend.name == "triton" and math.prod(lead) == 1
        if fused_launch:
            _assert_matches(y, kw, what)
        else:
            # Not fused: the composition of the unfused ops, bit for bit.
            assert same_bits(y, _composition_via_ops(**kw)), what
            _assert_matches(y, kw, what)


def test_op_native_is_the_composition_bit_for_bit(native: Backend):
    # On the CPU (C++) backend the op runs the unfused ops: the same bits as calling them.
    for dtype in DTYPES:
        for name, (norm, silu, residual) in VARIANTS.items():
            kw = _inputs(
                (1,), 300, 45, dtype, "cpu", norm=norm, silu=silu, residual=residual, seed=3
            )
            kw["bias"] = randn((45,), torch.float32, "cpu", seed=4)
            y = sk.ops.int8_linear_fused(**kw)
            assert same_bits(y, _composition_via_ops(**kw)), (dtype, name)


def test_op_plain_equals_int8_linear(backend: Backend):
    # No prologue, no residual: exactly int8_linear (one row: the fused launch's plain GEMV).
    dev = backend.device
    x = randn((1, 130), torch.float32, dev, seed=21)
    w, s = _weights(24, 130, dev, None, seed=22)
    assert same_bits(sk.ops.int8_linear_fused(x, w, s), sk.ops.int8_linear(x, w, s))


def test_op_empty(backend: Backend):
    dev = backend.device
    w, s = _weights(6, 16, dev, None, seed=0)
    nw = torch.ones(16, device=dev)
    y = sk.ops.int8_linear_fused(torch.empty(0, 16, device=dev), w, s, norm_weight=nw)
    assert y.shape == (0, 6)
    res = torch.empty(2, 0, 6, device=dev)
    y = sk.ops.int8_linear_fused(
        torch.empty(2, 0, 32, device=dev), w, s, residual=res, silu_input=True
    )
    assert y.shape == (2, 0, 6)
    # N = 0 (one row): nothing to compute
    w0, s0 = _weights(0, 16, dev, None, seed=1)
    y = sk.ops.int8_linear_fused(randn((1, 16), torch.float32, dev, seed=2), w0, s0, norm_weight=nw)
    assert y.shape == (1, 0)
    # K = 0 without a norm: an empty sum, the output is bias + residual
    bias = randn((6,), torch.float32, dev, seed=3)
    r = randn((1, 6), torch.float32, dev, seed=4)
    y = sk.ops.int8_linear_fused(torch.empty(1, 0, device=dev), w[:, :0], s, bias, residual=r)
    assert torch.equal(y.cpu(), (r + bias).cpu())


def test_opcheck(backend: Backend):
    dev = backend.device
    op = torch.ops.sentinel.int8_linear_fused.default
    kw = _inputs((1, 1), 40, 9, torch.float32, dev, norm=True, silu=True, residual=True)
    args = (kw["x"], kw["w_int8"], kw["w_scale"], None, None, kw["norm_weight"], EPS)
    torch.library.opcheck(op, (*args, kw["residual"], True))
    kw = _inputs((3,), 40, 9, torch.float32, dev, norm=False, silu=False, residual=True)
    w_g, s_g = _weights(9, 40, dev, 16, seed=5)
    bias = randn((9,), torch.float32, dev, seed=6)
    torch.library.opcheck(op, (kw["x"], w_g, s_g, bias, 16, None, 1e-6, kw["residual"], False))


# ---------------------------------------------------------------------------- errors


def test_bad_inputs(backend: Backend):
    dev = backend.device
    x = torch.randn(1, 8, device=dev)
    w, s = _weights(6, 8, dev, None, seed=0)
    nw = torch.ones(8, device=dev)
    r = torch.randn(1, 6, device=dev)
    f = sk.ops.int8_linear_fused
    # non-tensors and dtypes
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f([[1.0] * 8], w, s)
    with pytest.raises(TypeError, match="norm_weight must be a torch.Tensor"):
        f(x, w, s, norm_weight=[1.0] * 8)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        f(x, w, s, residual=1.0)
    with pytest.raises(TypeError, match="x has dtype int32"):
        f(x.int(), w, s)
    with pytest.raises(TypeError, match="w_int8 has dtype float32"):
        f(x, w.float(), s)
    with pytest.raises(TypeError, match="w_scale has dtype float16"):
        f(x, w, s.half())
    with pytest.raises(TypeError, match="bias has dtype float16"):
        f(x, w, s, torch.zeros(6, dtype=torch.float16, device=dev))  # x is fp32
    with pytest.raises(TypeError, match="norm_weight must have x's dtype float32"):
        f(x, w, s, norm_weight=nw.half())
    with pytest.raises(TypeError, match="norm_weight has dtype int64"):
        f(x, w, s, norm_weight=nw.long())
    with pytest.raises(TypeError, match="residual must have x's dtype float16"):
        f(x.half(), w, s, residual=r)
    with pytest.raises(TypeError, match="silu_input must be a bool"):
        f(x, w, s, silu_input=1)
    with pytest.raises(TypeError, match="group_size must be an int"):
        f(x, w, s[:, None], group_size=8.0)
    with pytest.raises(TypeError, match="eps must be a number"):
        f(x, w, s, norm_weight=nw, eps="1e-6")
    # shapes and values
    with pytest.raises(ValueError, match="w_int8 must be 2-D"):
        f(x, w[0], s)
    with pytest.raises(ValueError, match="x has K=8 but w_int8 has K=7"):
        f(x, w[:, :7], s)
    with pytest.raises(ValueError, match=r"with silu_input, x is \[..., 2K\]"):
        f(x, w, s, silu_input=True)
    with pytest.raises(ValueError, match="w_scale shape"):
        f(x, w, s[:5])
    with pytest.raises(ValueError, match="w_scale shape"):
        f(x, w, s, group_size=4)
    with pytest.raises(ValueError, match="group_size must be positive"):
        f(x, w, s[:, None], group_size=0)
    with pytest.raises(ValueError, match="bias shape"):
        f(x, w, s, torch.zeros(5, device=dev))
    with pytest.raises(ValueError, match="norm_weight shape"):
        f(x, w, s, norm_weight=torch.ones(7, device=dev))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        f(x, w, s, norm_weight=nw, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        f(x, w, s, norm_weight=nw, eps=float("nan"))
    with pytest.raises(ValueError, match="cannot normalise over an empty dimension"):
        f(x[:, :0], w[:, :0], s, norm_weight=nw[:0])
    with pytest.raises(ValueError, match="residual shape"):
        f(x, w, s, residual=r[:, :5])
    with pytest.raises(ValueError, match="residual shape"):
        f(x, w, s, residual=r[0])  # [N] for a [1, N] output


@pytest.mark.gpu
def test_device_mismatch():
    x = torch.randn(1, 8, device="cuda")
    w, s = _weights(6, 8, "cuda", None, seed=0)
    f = sk.ops.int8_linear_fused
    with pytest.raises(ValueError, match="tensors must be on one device"):
        f(x, w.cpu(), s)
    with pytest.raises(ValueError, match="tensors must be on one device"):
        f(x, w, s, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="tensors must be on one device"):
        f(x, w, s, residual=torch.randn(1, 6))


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("lead", [(1, 1), (4,), (64,)], ids=["row", "rows4", "rows64"])
def test_cuda_fused_equals_unfused_ops_bf16(variant, group_size, lead):
    # Decode rows in bf16 at SmolLM2's sizes (hidden 576, MLP 1536, head 64 x 9) and a
    # tall one: the fused launch against the unfused ops on the GPU, and against the
    # reference composition and fp64 (_assert_matches), with the same tolerances. One row
    # is the fused GEMV, 4 rows the decode MMA, 64 rows the GEMM (split-K candidates).
    norm, silu, residual = VARIANTS[variant]
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        for k, n in ((576, 576), (1536, 576), (576, 1536), (4096, 4096)):
            kw = _inputs(
                lead,
                k,
                n,
                torch.bfloat16,
                "cuda",
                norm=norm,
                silu=silu,
                residual=residual,
                group_size=group_size,
                seed=k + n,
            )
            y = sk.ops.int8_linear_fused(**kw)
            unfused = _composition_via_ops(**kw)
            torch.cuda.synchronize()
            a, e = y.cpu().double(), unfused.cpu().double()
            assert torch.isfinite(a).all()
            tol = 2 * _ulp_at(e.abs().max().item(), torch.bfloat16)
            assert (a - e).abs().max().item() <= tol, (variant, k, n)
            assert (a != e).double().mean().item() < 0.1, (variant, k, n)
            _assert_matches(y, kw, f"cuda {variant} K={k} N={n}")


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The fused op captures into a CUDA graph (no host sync) and replays on new inputs."""
    kw = _inputs(
        (1, 1), 1536, 576, torch.bfloat16, "cuda", norm=True, silu=True, residual=True, seed=1
    )
    kw["residual"] = kw["residual"].contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sk.ops.int8_linear_fused(**kw)  # compile and tune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.ops.int8_linear_fused(**kw)
    for name in ("x", "residual", "norm_weight"):
        kw[name].copy_(torch.randn_like(kw[name]))
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(out, sk.ops.int8_linear_fused(**kw))

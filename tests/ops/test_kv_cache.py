"""sk.ops.kv_append and sk.ops.decode_attention over compressed caches, every backend.

Append: the codes and scales must equal the reference bit for bit (every quantization
step is one correctly rounded fp32 operation), and slots the append does not own must
keep their poison (no stray or out-of-bounds writes). Decode: the oracle is the reference
rule evaluated in fp64 on the same codes and scales, so what remains is the op's own
arithmetic: dequantized values are exact in fp32 (an int8 code times an fp16 scale has at
most 18 significant bits; int4 adds one rounded add), then the same error budget as dense
attention (8u for fp16/bf16: output rounding plus probabilities rounded to the input
dtype; 2e-5 for fp32).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import UNIT_ROUNDOFF, randn, rel_error

import sentinel_kernels as sk
from sentinel_kernels.reference import kv_cache as ref

FORMATS = ["dense", "int8", "int4"]


def _skip_dtype(backend: Backend, dtype: torch.dtype) -> None:
    if backend.interpreted and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic (bf16 is tested on GPU)")


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 8 * UNIT_ROUNDOFF[dtype]


def _empty_cache(b, h, cap, d, fmt, groups, dtype, device):
    """A poisoned cache: codes -128 / 0xEE, scales NaN, dense NaN."""
    if fmt == "dense":
        return torch.full((b, h, cap, d), float("nan"), dtype=dtype, device=device), None
    width = ref.kv_code_width(d, fmt)
    if fmt == "int8":
        codes = torch.full((b, h, cap, width), -128, dtype=torch.int8, device=device)
    else:
        codes = torch.full((b, h, cap, width), 0xEE, dtype=torch.uint8, device=device)
    scales = torch.full(
        ref.kv_scale_shape((b, h, cap), groups, fmt),
        float("nan"),
        dtype=torch.float16,
        device=device,
    )
    return codes, scales


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        a, b = torch.nan_to_num(a, nan=12345.0), torch.nan_to_num(b, nan=12345.0)
    return bool(torch.equal(a, b))


APPEND_CASES = [
    # (B, H, S, D, L, groups, starts, wrap)
    (1, 1, 1, 1, 4, 1, [0], False),
    (2, 3, 5, 7, 16, 1, [0, 9], False),
    (2, 2, 5, 7, 16, 2, [3, 14], False),  # row 1 runs past L: slots >= L skipped
    (1, 2, 3, 64, 8, 2, [6], True),  # wraps around the ring
    (2, 1, 11, 33, 4, 1, [2, 0], True),  # S > L: only the last L tokens land
    (1, 4, 17, 128, 40, 4, [1], False),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "case", APPEND_CASES, ids=lambda c: "B{}H{}S{}D{}L{}G{}-{}-wrap{}".format(*c)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_append_bit_exact(backend: Backend, fmt, case, dtype):
    _skip_dtype(backend, dtype)
    b, h, s, d, cap, groups, starts, wrap = case
    if fmt == "dense":
        groups = 1
    dev = backend.device
    x = randn((b, h, s, d), dtype, dev, seed=s * 7 + d)
    start = torch.tensor(starts, dtype=torch.int32, device=dev)
    cache, scales = _empty_cache(b, h, cap, d, fmt, groups, dtype, dev)
    want_c, want_s = cache.clone().cpu(), scales.clone().cpu() if scales is not None else None
    ref.kv_append(x.cpu(), want_c, start.cpu(), fmt, want_s, wrap)
    sk.ops.kv_append(x, cache, start, fmt, scales, wrap)
    assert _same(cache, want_c), "codes differ from the reference"
    if scales is not None:
        assert _same(scales, want_s), "scales differ from the reference"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_append_strided_input_and_int64_start(backend: Backend, fmt):
    dev = backend.device
    base = randn((2, 9, 4, 6), torch.float32, dev, seed=3)
    x = base.permute(0, 3, 2, 1)[:, :, :, ::2]  # [2, 6, 4, 5], no unit stride anywhere
    assert not x.is_contiguous()
    start = torch.tensor([1, 0], dtype=torch.int64, device=dev)
    cache, scales = _empty_cache(2, 6, 8, 5, fmt, 1, torch.float32, dev)
    want_c, want_s = cache.clone().cpu(), scales.clone().cpu()
    ref.kv_append(x.cpu(), want_c, start.cpu(), fmt, want_s, False)
    sk.ops.kv_append(x, cache, start, fmt, scales)
    assert _same(cache, want_c) and _same(scales, want_s)


def _filled_cache(b, hkv, cap, d, fmt, groups, dtype, device, lens, wrap, seed):
    """A cache holding lens[b] positions (the last `cap` of them when wrapping)."""
    cache, scales = _empty_cache(b, hkv, cap, d, fmt, groups, dtype, device)
    longest = max(max(lens), 1)
    x = randn((b, hkv, longest, d), dtype, device, seed=seed)
    for bi, n in enumerate(lens):
        if n == 0:
            continue
        first = max(0, n - cap) if wrap else 0
        seg = x[bi : bi + 1, :, first:n]
        st = torch.tensor([first], dtype=torch.int32, device=device)
        sk.ops.kv_append(
            seg,
            cache[bi : bi + 1],
            st,
            fmt,
            scales[bi : bi + 1] if scales is not None else None,
            wrap,
        )
    return cache, scales, x


def _f64(t):
    """fp64 copy of a float tensor on the CPU; codes and (fp16) scales stay as stored."""
    if t is None:
        return None
    t = t.detach().cpu()
    return t.double() if t.is_floating_point() and t.dtype != torch.float16 else t


def _f64_data(t):
    """fp64 copy of queries / dense K/V / recent rings (fp16 data too)."""
    return t.detach().cpu().double() if t is not None else None


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, L, lens, groups, recent, wrap, window)
    (1, 1, 1, 1, 64, 16, [9], 1, 0, False, 0),
    (2, 6, 2, 1, 7, 40, [0, 37], 1, 0, False, 0),
    (3, 4, 1, 5, 32, 24, [24, 6, 13], 2, 0, False, 0),
    (2, 3, 3, 1, 64, 20, [20, 11], 1, 4, False, 0),  # full-precision recent ring
    (2, 4, 2, 3, 16, 12, [30, 7], 1, 0, True, 0),  # ring cache, lens > L
    (1, 6, 2, 2, 24, 16, [45], 2, 5, True, 10),  # ring + recent + window
    (1, 8, 2, 33, 16, 40, [40], 1, 0, False, 0),  # a 33-token chunk over the cache
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "case",
    DECODE_CASES,
    ids=lambda c: "B{}H{}x{}Sq{}D{}L{}-{}-G{}-W{}-wrap{}-win{}".format(*c),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_over_cache_matches_fp64(backend: Backend, fmt, case, dtype):
    _skip_dtype(backend, dtype)
    b, hq, hkv, sq, d, cap, lens, groups, w, wrap, window = case
    if fmt == "dense":
        groups = 1
    dev = backend.device
    k, ks, kx = _filled_cache(b, hkv, cap, d, fmt, groups, dtype, dev, lens, wrap, seed=1)
    v, vs, vx = _filled_cache(b, hkv, cap, d, fmt, groups, dtype, dev, lens, wrap, seed=2)
    kr = vr = None
    if w:
        # The ring holds positions j in slot j % w; fill it from the same source vectors.
        kr = torch.full((b, hkv, w, d), float("nan"), dtype=dtype, device=dev)
        vr = kr.clone()
        for bi, n in enumerate(lens):
            for j in range(max(0, n - w), n):
                kr[bi, :, j % w] = kx[bi, :, j]
                vr[bi, :, j % w] = vx[bi, :, j]
    q = randn((b, hq, sq, d), dtype, dev, seed=5)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = sk.ops.decode_attention(
        q,
        k,
        v,
        cl,
        kv_format=fmt,
        window=window,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr,
        v_recent=vr,
        wrap=wrap,
    )
    exp = ref.decode_attention_kv(
        _f64_data(q),
        _f64_data(k) if fmt == "dense" else k.cpu(),
        _f64_data(v) if fmt == "dense" else v.cpu(),
        cl.cpu(),
        kv_format=fmt,
        window=window,
        k_scale=_f64(ks),
        v_scale=_f64(vs),
        k_recent=_f64_data(kr),
        v_recent=_f64_data(vr),
        wrap=wrap,
    )
    assert out.shape == q.shape and out.dtype == dtype
    err = rel_error(out, exp)
    assert err <= _tol(dtype), f"relative error {err:.3e} > {_tol(dtype):.3e}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_masks_and_splits(backend: Backend, fmt):
    dev = backend.device
    b, hq, hkv, d, cap = 2, 6, 2, 16, 64
    lens = [50, 23]
    k, ks, _ = _filled_cache(b, hkv, cap, d, fmt, 1, torch.float32, dev, lens, False, seed=3)
    v, vs, _ = _filled_cache(b, hkv, cap, d, fmt, 1, torch.float32, dev, lens, False, seed=4)
    q = randn((b, hq, 2, d), torch.float32, dev, seed=6)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    head_mask = torch.tensor(
        [[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool, device=dev
    )  # row 0: group 1 pruned entirely
    key_mask = torch.ones(b, cap, dtype=torch.int8, device=dev)
    key_mask[0, :5] = 0
    key_mask[1, 10:12] = 0
    exp = ref.decode_attention_kv(
        q.cpu().double(),
        k.cpu(),
        v.cpu(),
        cl.cpu(),
        head_mask.cpu(),
        fmt,
        key_mask.cpu(),
        None,
        0,
        ks.cpu(),
        vs.cpu(),
    )
    for splits in (None, 1, 3):
        out = sk.ops.decode_attention(
            q, k, v, cl, head_mask, fmt, key_mask, num_splits=splits, k_scale=ks, v_scale=vs
        )
        assert rel_error(out, exp) <= 2e-5
        pruned = ~head_mask.cpu()
        assert torch.equal(out.cpu()[pruned], torch.zeros_like(out.cpu()[pruned]))


def test_compressed_round_trip_error_is_bounded():
    """Reconstruction error: half a grid step (int8: absmax/127, int4: (max-min)/15), plus
    the fp16 rounding of the stored scale and minimum (relative 2^-11 each)."""
    x = randn((4, 3, 50, 64), torch.float32, "cpu", seed=9)
    for fmt, groups in (("int8", 1), ("int8", 2), ("int4", 1), ("int4", 2)):
        codes, scales = ref.quantize_kv(x, fmt, groups)
        y = ref.dequantize_kv(codes, scales, fmt, 64)
        span = x.view(4, 3, 50, groups, 64 // groups)
        absmax = span.abs().amax(-1)
        step = absmax / 127 if fmt == "int8" else (span.amax(-1) - span.amin(-1)) / 15
        err = (y - x).abs().view_as(span).amax(-1)
        assert (err <= step / 2 * (1 + 2**-9) + absmax * 2**-10).all(), fmt


def test_bad_inputs(backend: Backend):
    dev = backend.device
    q = randn((1, 2, 1, 8), torch.float32, dev, seed=1)
    lens = torch.tensor([3], dtype=torch.int32, device=dev)
    k8 = torch.zeros(1, 1, 4, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(1, 1, 4, 1, dtype=torch.float16, device=dev)
    with pytest.raises(ValueError, match="needs k_scale"):
        sk.ops.decode_attention(q, k8, k8, lens, kv_format="int8")
    with pytest.raises(TypeError, match="k_cache has dtype"):
        sk.ops.decode_attention(
            q, k8.float(), k8.float(), lens, kv_format="int8", k_scale=s8, v_scale=s8
        )
    with pytest.raises(TypeError, match="k_scale has dtype"):
        sk.ops.decode_attention(q, k8, k8, lens, kv_format="int8", k_scale=s8.float(), v_scale=s8)
    with pytest.raises(ValueError, match="cannot be cut into 5 groups"):
        s3 = torch.ones(1, 1, 4, 5, dtype=torch.float16, device=dev)
        sk.ops.decode_attention(q, k8, k8, lens, kv_format="int8", k_scale=s3, v_scale=s3)
    k4 = torch.zeros(1, 1, 4, 8, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match=r"\[batch=1, kv_heads, L, 4\]"):
        sk.ops.decode_attention(
            q,
            k4,
            k4,
            lens,
            kv_format="int4",
            k_scale=s8[..., None].expand(1, 1, 4, 1, 2).contiguous(),
            v_scale=s8[..., None].expand(1, 1, 4, 1, 2).contiguous(),
        )
    with pytest.raises(ValueError, match="both k_recent and v_recent"):
        sk.ops.decode_attention(
            q,
            k8,
            k8,
            lens,
            kv_format="int8",
            k_scale=s8,
            v_scale=s8,
            k_recent=q.new_zeros(1, 1, 2, 8),
        )
    with pytest.raises(ValueError, match="only for int8/int4"):
        sk.ops.decode_attention(q, q[:, :1], q[:, :1], lens, k_scale=s8)
    x = randn((1, 1, 2, 8), torch.float32, dev, seed=2)
    with pytest.raises(ValueError, match="needs scales"):
        sk.ops.kv_append(x, k8.clone(), lens, "int8")
    with pytest.raises(ValueError, match="start must be"):
        sk.ops.kv_append(
            x, k8.clone(), torch.zeros(2, dtype=torch.int32, device=dev), "int8", s8.clone()
        )
    with pytest.raises(ValueError, match="unit stride"):
        wide = torch.zeros(1, 1, 4, 16, dtype=torch.int8, device=dev)[..., ::2]
        sk.ops.kv_append(x, wide, lens, "int8", s8.clone())
    with pytest.raises(ValueError, match="kv_format"):
        sk.ops.kv_append(x, k8.clone(), lens, "int2", s8.clone())


def test_opcheck_kv_ops():
    x = randn((1, 2, 3, 8), torch.float32, "cpu", seed=1)
    cache = torch.zeros(1, 2, 6, 8, dtype=torch.int8)
    scales = torch.zeros(1, 2, 6, 1, dtype=torch.float16)
    start = torch.tensor([1], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.sentinel.kv_append.default, (x, cache, start, "int8", scales, False)
    )
    q = randn((1, 4, 1, 8), torch.float32, "cpu", seed=2)
    torch.library.opcheck(
        torch.ops.sentinel.decode_attention.default,
        (
            q,
            cache,
            cache,
            torch.tensor([4], dtype=torch.int32),
            None,
            "int8",
            None,
            None,
            0,
            None,
            scales,
            scales,
            None,
            None,
            False,
        ),
    )

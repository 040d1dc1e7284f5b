"""KIVI keys on the C++ backend: sk.ops.kv_append_key_blocks and decode_attention(key_block=).

Append: per-channel int4 over blocks of T tokens (Liu et al. 2024). Codes, scales and the
full-precision ring must equal :func:`reference.kv_append_key_blocks` bit for bit after
every append of a sequence of uneven pieces (each quantization step is one correctly
rounded fp32 operation; a block's older keys come from the ring, rounded to its dtype).
Decode: the oracle is :func:`reference.decode_attention_kv` evaluated in fp64 on the same
codes, scales and rings, so what remains is the op's own arithmetic (dequantized keys are
exact in fp32: a 4-bit code times an fp16 scale is exact, plus one rounded add), with the
error budget of the other decode tests (2e-5 for fp32, 8u for fp16 / bf16).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import Backend, skip_unless_available
from helpers import UNIT_ROUNDOFF, randn, rel_error

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import kv_cache as ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def native() -> Iterator[None]:
    """The C++ backend, with op outputs NaN-poisoned."""
    skip_unless_available(Backend("cpu", "native"))
    with _backend.use_backend("native"), _backend.poisoned_outputs():
        yield


def _levels() -> list[str]:
    if not _backend.native_available():
        return ["none"]
    # avx512_vnni runs the same kernels as avx512.
    return [lv for lv in _backend.native_module().supported_simd_levels() if lv != "avx512_vnni"]


@pytest.fixture(params=_levels())
def level(request, native) -> Iterator[str]:
    """Force one SIMD level of the C++ kernels (scalar, AVX2, AVX-512), then restore it."""
    mod = _backend.native_module()
    old = mod.simd_level()
    mod.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        mod.set_simd_level(old)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        a, b = torch.nan_to_num(a, nan=12345.0), torch.nan_to_num(b, nan=12345.0)
    return bool(torch.equal(a, b))


def _empty_keys(b, h, cap, w, d, block, ring_dtype):
    """Poisoned KIVI key cache: codes 0xEE, scales NaN, ring NaN."""
    codes = torch.full((b, h, cap, (d + 1) // 2), 0xEE, dtype=torch.uint8)
    scales = torch.full((b, h, cap // block, d, 2), float("nan"), dtype=F16)
    ring = torch.full((b, h, w, d), float("nan"), dtype=ring_dtype)
    return codes, scales, ring


def _strided(x: torch.Tensor, mode: int) -> torch.Tensor:
    """A copy of x [B, H, S, D] with non-contiguous strides (mode 1: permuted storage with
    unit last stride; mode 2: last stride 2 as well)."""
    if mode == 0:
        return x
    if mode == 1:
        return x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
    wide[..., ::2] = x
    return wide.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)[..., ::2]


APPEND_CASES = [
    # (D, block, W, x dtype, ring dtype)
    (7, 4, 8, F32, F32),
    (127, 8, 8, F16, F16),
    (64, 32, 32, BF16, BF16),
    (64, 4, 12, F32, F16),
    (7, 8, 16, F16, BF16),
    (127, 32, 64, F32, F32),
]
PIECES = [1, 3, 7, 40, 1, 3]  # appended in this order after a ragged per-row prefill
PREFILL = [0, 5, 13]  # positions each row holds before the joint appends


@pytest.mark.parametrize(
    "case", APPEND_CASES, ids=lambda c: "D{}-T{}-W{}-{}-{}".format(*c).replace("torch.", "")
)
def test_append_key_blocks_bit_exact(native, case):
    d, block, w, xdt, rdt = case
    b, h = len(PREFILL), 3
    total = max(PREFILL) + sum(PIECES)
    cap = (total - 6) // block * block  # the longest row runs past L: those blocks skipped
    codes, scales, ring = _empty_keys(b, h, cap, w, d, block, rdt)
    want = [t.clone() for t in (codes, scales, ring)]
    seed = 0

    def append(x, cs, ss, rg, wc, ws, wr, st):
        sk.ops.kv_append_key_blocks(x, cs, ss, rg, st, block)
        ref.kv_append_key_blocks(x.contiguous(), wc, ws, wr, st, block)
        assert _same(cs, wc), "codes differ from the reference"
        assert _same(ss, ws), "scales differ from the reference"
        assert _same(rg, wr), "ring differs from the reference"

    for bi, n in enumerate(PREFILL):  # rows of different lengths, one row at a time
        if n:
            seed += 1
            x = randn((1, h, n, d), xdt, "cpu", seed=seed)
            st = torch.zeros(1, dtype=torch.int32)
            append(x, *(t[bi : bi + 1] for t in (codes, scales, ring, *want)), st)
    lens = list(PREFILL)
    for i, s in enumerate(PIECES):
        seed += 1
        x = _strided(randn((b, h, s, d), xdt, "cpu", seed=seed), i % 3)
        st = torch.tensor(lens, dtype=torch.int32 if i % 2 else torch.int64)
        append(x, codes, scales, ring, *want, st)
        lens = [n + s for n in lens]
    # Every block below L that the rows completed was written, and none past it.
    for bi, n in enumerate(lens):
        done = min(n // block, cap // block)
        assert not torch.isnan(scales[bi, :, :done]).any()
        assert torch.isnan(scales[bi, :, done:]).all()


def test_append_key_blocks_native_strides():
    """The C++ entry point with a non-unit channel stride (the op passes unit ones) and a
    ring of another dtype, against the reference."""
    skip_unless_available(Backend("cpu", "native"))
    mod = _backend.native_module()
    b, h, s, d, block, w, cap = 2, 2, 9, 5, 4, 8, 16
    x = _strided(randn((b, h, s, d), F32, "cpu", seed=7), 2)
    assert x.stride(-1) == 2
    codes, scales, ring = _empty_keys(b, h, cap, w, d, block, F16)
    wc, ws, wr = codes.clone(), scales.clone(), ring.clone()
    start = torch.tensor([0, 3], dtype=torch.int32)
    ring[1, :, :3] = randn((h, 3, d), F16, "cpu", seed=8)  # row 1's first 3 positions
    wr.copy_(ring)
    mod.kv_append_key_blocks(
        x.data_ptr(),
        "float32",
        codes.data_ptr(),
        scales.data_ptr(),
        ring.data_ptr(),
        "float16",
        b,
        h,
        s,
        d,
        cap,
        w,
        block,
        list(x.stride()),
        list(codes.stride()[:3]),
        list(scales.stride()[:3]),
        list(ring.stride()[:3]),
        start.data_ptr(),
        2,
    )
    ref.kv_append_key_blocks(x, wc, ws, wr, start, block)
    assert _same(codes, wc) and _same(scales, ws) and _same(ring, wr)


def _kivi_cache(b, hkv, cap, w, d, block, groups, dtype, lens, seed):
    """K/V caches holding lens[b] positions, filled by the reference appends in pieces."""
    kc, ks, kr = _empty_keys(b, hkv, cap, w, d, block, dtype)
    vc = torch.full_like(kc, 0xEE)
    vs = torch.full((b, hkv, cap, groups, 2), float("nan"), dtype=F16)
    vr = torch.full_like(kr, float("nan"))
    for bi, n in enumerate(lens):
        pos, piece = 0, 0
        while pos < n:
            s = min(n - pos, (1, 5, 17, 2)[piece % 4])
            piece += 1
            k = randn((1, hkv, s, d), dtype, "cpu", seed=seed + 31 * bi + 2 * piece)
            v = randn((1, hkv, s, d), dtype, "cpu", seed=seed + 31 * bi + 2 * piece + 1)
            st = torch.tensor([pos], dtype=torch.int32)
            sl = slice(bi, bi + 1)
            ref.kv_append_key_blocks(k, kc[sl], ks[sl], kr[sl], st, block)
            ref.kv_append(v, vc[sl], st, "int4", vs[sl])
            ref.kv_append(v, vr[sl], st, "dense", None, wrap=True)
            pos += s
    return kc, ks, kr, vc, vs, vr


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, T, W, L, lens, value groups, window)
    (2, 4, 2, 1, 64, 8, 16, 64, [29, 45], 2, 0),
    (3, 6, 2, 4, 7, 4, 8, 40, [13, 4, 38], 1, 0),
    (1, 8, 8, 4, 127, 32, 32, 128, [100], 2, 0),
    (2, 4, 1, 1, 32, 16, 32, 64, [64, 50], 1, 20),  # a full row; a window
    (1, 2, 1, 4, 64, 32, 64, 1024, [1001], 1, 0),  # long: the key range is split
]


def _case_id(c) -> str:
    return "B{}H{}x{}Sq{}D{}T{}W{}L{}-{}-G{}-win{}".format(*c)


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_decode_kivi_matches_fp64(native, monkeypatch, case, dtype):
    _check_decode(monkeypatch, case, dtype)


@pytest.mark.parametrize("case", DECODE_CASES[1:3], ids=_case_id)
def test_decode_kivi_every_simd_level(level, monkeypatch, case):
    _check_decode(monkeypatch, case, F32)


def _check_decode(monkeypatch, case, dtype) -> None:
    monkeypatch.setenv("SENTINEL_NUM_THREADS", "2")
    b, hq, hkv, sq, d, block, w, cap, lens, groups, window = case
    kc, ks, kr, vc, vs, vr = _kivi_cache(b, hkv, cap, w, d, block, groups, dtype, lens, seed=3)
    q = randn((b, hq, sq, d), dtype, "cpu", seed=5)
    cl = torch.tensor(lens, dtype=torch.int32)
    out = sk.ops.decode_attention(
        q,
        kc,
        vc,
        cl,
        kv_format="int4",
        window=window,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr,
        v_recent=vr,
        key_block=block,
    )
    exp = ref.decode_attention_kv(
        q.double(),
        kc,
        vc,
        cl,
        kv_format="int4",
        window=window,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr.double(),
        v_recent=vr.double(),
        key_block=block,
    )
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-5 if dtype == F32 else 8 * UNIT_ROUNDOFF[dtype]
    err = rel_error(out, exp)
    assert err <= tol, f"relative error {err:.3e} > {tol:.3e}"


def test_decode_kivi_masks(level, monkeypatch):
    """Head mask (a whole KV group pruned in one row), key mask over store and ring slots,
    Sq = 4, forced splits and one thread."""
    b, hq, hkv, d, block, w, cap = 2, 6, 2, 16, 8, 16, 64
    lens = [61, 27]
    kc, ks, kr, vc, vs, vr = _kivi_cache(b, hkv, cap, w, d, block, 1, F32, lens, seed=11)
    q = randn((b, hq, 4, d), F32, "cpu", seed=6)
    cl = torch.tensor(lens, dtype=torch.int32)
    head_mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    key_mask = torch.ones(b, cap, dtype=torch.int8)
    key_mask[0, :5] = 0
    key_mask[0, 58] = 0  # in row 0's ring (positions >= 56)
    key_mask[1, 10:12] = 0
    exp = ref.decode_attention_kv(
        q.double(),
        kc,
        vc,
        cl,
        head_mask,
        "int4",
        key_mask,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr.double(),
        v_recent=vr.double(),
        key_block=block,
    )
    for threads, splits in (("1", None), ("2", None), ("2", 3)):
        monkeypatch.setenv("SENTINEL_NUM_THREADS", threads)
        out = sk.ops.decode_attention(
            q,
            kc,
            vc,
            cl,
            head_mask,
            "int4",
            key_mask,
            num_splits=splits,
            k_scale=ks,
            v_scale=vs,
            k_recent=kr,
            v_recent=vr,
            key_block=block,
        )
        assert rel_error(out, exp) <= 2e-5
        pruned = ~head_mask
        assert torch.equal(out[pruned], torch.zeros_like(out[pruned]))


def test_kivi_bad_inputs(native):
    mod = _backend.native_module()
    b, h, d, block = 1, 1, 8, 4
    x = randn((b, h, 2, d), F32, "cpu", seed=1)
    st = torch.zeros(b, dtype=torch.int32)
    codes, scales, ring = _empty_keys(b, h, 16, 8, d, block, F32)
    # The op layer.
    with pytest.raises(ValueError, match=r"scales must be float16 \[B, H, L / block, D, 2\]"):
        sk.ops.kv_append_key_blocks(x, codes, scales[:, :, :2], ring, st, block)
    with pytest.raises(ValueError, match="multiple of block=4"):
        sk.ops.kv_append_key_blocks(x, codes[:, :, :10], scales[:, :, :2], ring, st, block)
    with pytest.raises(ValueError, match="ring must hold a positive multiple"):
        sk.ops.kv_append_key_blocks(x, codes, scales, ring[:, :, :2], st, block)

    # The C++ entry point itself.
    def call(cap=16, w=8, blk=block, start=st, sstr=None):
        mod.kv_append_key_blocks(
            x.data_ptr(),
            "float32",
            codes.data_ptr(),
            scales.data_ptr(),
            ring.data_ptr(),
            "float32",
            b,
            h,
            2,
            d,
            cap,
            w,
            blk,
            list(x.stride()),
            list(codes.stride()[:3]),
            sstr or list(scales.stride()[:3]),
            list(ring.stride()[:3]),
            start.data_ptr(),
            1,
        )

    call()  # the valid call works
    with pytest.raises(ValueError, match="L = 10 must be a positive multiple of block = 4"):
        call(cap=10)
    with pytest.raises(ValueError, match="ring must hold a positive multiple of block = 4"):
        call(w=2)
    with pytest.raises(ValueError, match="W = 6"):
        call(w=6)
    with pytest.raises(ValueError, match="block must be >= 1"):
        call(blk=0)
    with pytest.raises(ValueError, match="scales rows overlap"):
        call(sstr=[0, 0, 8])  # a block's [D, 2] pairs need 16 float16
    with pytest.raises(ValueError, match=r"start\[0\] = -1 is negative"):
        call(start=torch.tensor([-1], dtype=torch.int32))

    # decode_attention_kv(key_block=) on the C++ side.
    q = randn((1, 2, 1, d), F32, "cpu", seed=2)
    out = torch.empty_like(q)
    lens = torch.tensor([6], dtype=torch.int32)

    def decode(fmt="int4", w=8, wrap=False, kb=block, cap=16):
        mod.decode_attention_kv(
            q.data_ptr(),
            out.data_ptr(),
            "float32",
            fmt,
            codes.data_ptr(),
            codes.data_ptr(),
            scales.data_ptr(),
            scales.data_ptr(),
            ring.data_ptr(),
            ring.data_ptr(),
            1,
            2,
            1,
            1,
            d,
            cap,
            w,
            1,
            list(q.stride()),
            list(out.stride()),
            list(codes.stride()[:3]),
            list(codes.stride()[:3]),
            list(scales.stride()[:3]),
            [0, 0, 2],
            list(ring.stride()[:3]),
            list(ring.stride()[:3]),
            1.0,
            0,
            0,
            lens.data_ptr(),
            0,
            wrap,
            kb,
            1,
        )

    with pytest.raises(ValueError, match="needs kv_format 'int4'"):
        decode(fmt="int8")
    with pytest.raises(ValueError, match="does not take a wrapping cache"):
        decode(wrap=True)
    with pytest.raises(ValueError, match="W = 6"):
        decode(w=6)
    with pytest.raises(ValueError, match="W = 0"):
        decode(w=0)
    with pytest.raises(ValueError, match="L = 18"):
        decode(cap=18)
    with pytest.raises(ValueError, match="key_block must be >= 0"):
        decode(kb=-1)
    # The op layer refuses a k_scale of the per-token shape with key_block.
    v_scale = torch.zeros(1, 1, 16, 1, 2, dtype=F16)
    with pytest.raises(ValueError, match=r"k_scale for key_block=4 must be \[B, Hkv"):
        sk.ops.decode_attention(
            q,
            codes[..., :4],
            codes[..., :4],
            lens,
            kv_format="int4",
            k_scale=v_scale,
            v_scale=v_scale,
            k_recent=ring,
            v_recent=ring,
            key_block=block,
        )

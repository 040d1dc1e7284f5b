"""KIVI keys (per-channel int4 over blocks of T tokens) on the Triton and reference backends:
sk.ops.kv_append_key_blocks and sk.ops.decode_attention(kv_format="int4", key_block=T).

Append: codes, scales and the full-precision ring must equal
:func:`reference.kv_append_key_blocks` bit for bit after every append of a sequence of
uneven pieces (every quantization step is one correctly rounded fp32 operation, and a
block's older keys come from the ring, already rounded to its dtype). Blocks an append
does not complete keep whatever they held, so the whole tensors are compared against the
reference run on identical (poisoned) copies.

Decode: the oracle is :func:`reference.decode_attention_kv` evaluated in fp64 on the same
codes, scales and rings, so what remains is the op's own arithmetic. Dequantized keys and
values are exact in fp32 (a 4-bit code times an fp16 scale, plus one rounded add), so fp32
is held to the dense decode bound (softmax and accumulation in fp32: 1e-5; measured
~3e-7). For fp16 the kernel rounds ``q_c * s_c`` (the block's key scales folded into the
query), the probabilities and the output to fp16: about one unit roundoff u = 2^-11 of
the output (measured up to 4.9e-4), held to 4u (~2e-3, helpers.REL_TOL).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import HAS_CUDA, Backend, skip_unless_available
from helpers import REL_TOL, randn, rel_error

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import kv_cache as ref

F32, F16 = torch.float32, torch.float16


def _params() -> list:
    return [
        pytest.param(Backend("cpu", "reference"), id="cpu-reference"),
        pytest.param(Backend("cpu", "triton"), id="cpu-triton-interpreter"),
        pytest.param(Backend("cuda", "triton"), id="cuda-triton", marks=pytest.mark.gpu),
    ]


@pytest.fixture(params=_params())
def kb(request) -> Iterator[Backend]:
    """The reference and Triton backends (the C++ one is tested in test_kv_kivi_native),
    with op outputs NaN-poisoned."""
    b: Backend = request.param
    skip_unless_available(b)
    with _backend.use_backend(b.name), _backend.poisoned_outputs():
        yield b


@pytest.fixture
def triton_backend() -> Iterator[Backend]:
    """The Triton backend (interpreted on the CPU, on the GPU when there is one)."""
    b = Backend("cuda" if HAS_CUDA else "cpu", "triton")
    skip_unless_available(b)
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        yield b


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        a, b = torch.nan_to_num(a, nan=12345.0), torch.nan_to_num(b, nan=12345.0)
    return bool(torch.equal(a, b))


def _layout(x: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` with the same values and other strides: 0 as is, 1 a transposed view of
    ``[B, S, H, D]`` storage (unit last stride), 2 a transposed view of ``[B, H, D, S]``
    storage (last stride S)."""
    if mode == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if mode == 2:
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


# --------------------------------------------------------------------------------------
# kv_append_key_blocks
# --------------------------------------------------------------------------------------

PIECES = (1, 3, 17, 40)
APPEND_CASES = [
    # (B, H, D, block, L, W, starts): four appends of PIECES tokens each, from starts
    (2, 2, 7, 16, 64, 32, [0, 5]),  # row 1 ends at 66: the block past L is skipped
    (3, 1, 33, 32, 64, 32, [0, 13, 30]),  # W == T and a 40-token piece longer than the ring
    (1, 3, 64, 16, 48, 16, [2]),  # the last two blocks past L
    (2, 2, 7, 4, 24, 8, [1, 6]),  # block 4: the append kernel takes any block
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: "B{}H{}D{}T{}L{}W{}-{}".format(*c))
@pytest.mark.parametrize(
    "dtypes", [(F32, F32), (F16, F16), (F32, F16)], ids=["f32", "f16", "f32-into-f16-ring"]
)
def test_append_key_blocks_bit_exact(kb: Backend, case, dtypes):
    b, h, d, block, cap, w, starts = case
    x_dtype, ring_dtype = dtypes
    dev = kb.device
    codes = torch.full((b, h, cap, (d + 1) // 2), 0xFF, dtype=torch.uint8, device=dev)
    scales = torch.full((b, h, cap // block, d, 2), float("nan"), dtype=F16, device=dev)
    # Rows that start mid-block read the block's older keys from the ring: finite there,
    # as an earlier append would have left it.
    ring = randn((b, h, w, d), ring_dtype, dev, seed=d + block)
    want = [t.clone().cpu() for t in (codes, scales, ring)]
    pos = torch.tensor(starts, dtype=torch.int32, device=dev)
    for i, s in enumerate(PIECES):
        x = _layout(randn((b, h, s, d), x_dtype, dev, seed=100 * i + s), i % 3)
        ref.kv_append_key_blocks(x.cpu(), *want, pos.cpu(), block)
        sk.ops.kv_append_key_blocks(x, codes, scales, ring, pos, block)
        for name, got, exp in zip(
            ("codes", "scales", "ring"), (codes, scales, ring), want, strict=True
        ):
            assert _same(got, exp), f"{name} differ from the reference after piece {i} (S={s})"
        pos = pos + s
    # Row 0's blocks within L were all completed and quantized.
    assert not torch.isnan(scales[0, :, : min(starts[0] + sum(PIECES), cap) // block]).any()


def test_append_key_blocks_int64_start_and_empty(kb: Backend):
    dev = kb.device
    x = randn((2, 1, 20, 5), F32, dev, seed=1)
    codes = torch.full((2, 1, 32, 3), 0xFF, dtype=torch.uint8, device=dev)
    scales = torch.full((2, 1, 2, 5, 2), float("nan"), dtype=F16, device=dev)
    ring = torch.full((2, 1, 16, 5), float("nan"), dtype=F32, device=dev)
    start = torch.tensor([0, 0], dtype=torch.int64, device=dev)
    want = [t.clone().cpu() for t in (codes, scales, ring)]
    ref.kv_append_key_blocks(x.cpu(), *want, start.cpu(), 16)
    sk.ops.kv_append_key_blocks(x, codes, scales, ring, start, 16)
    assert all(_same(g, e) for g, e in zip((codes, scales, ring), want, strict=True))
    before = [t.clone() for t in (codes, scales, ring)]
    sk.ops.kv_append_key_blocks(x[:, :, :0], codes, scales, ring, start, 16)  # S = 0: no-op
    assert all(_same(g, e) for g, e in zip((codes, scales, ring), before, strict=True))


def test_quantize_key_block_round_trip_error_is_bounded():
    """Per channel over the block: at most half a grid step (max - min) / 15 plus the fp16
    rounding of the stored scale and minimum."""
    x = randn((3, 2, 32, 40), F32, "cpu", seed=7)  # [.., T, D]
    codes, scales = ref.quantize_key_block(x)
    assert codes.shape == (3, 2, 32, 20) and scales.shape == (3, 2, 40, 2)
    y = ref.dequantize_key_block(codes, scales, 40)
    lo, hi = x.amin(-2), x.amax(-2)
    step = (hi - lo) / 15
    absmax = x.abs().amax(-2)
    err = (y - x).abs().amax(-2)
    assert (err <= step / 2 * (1 + 2**-9) + absmax * 2**-10).all()


# --------------------------------------------------------------------------------------
# decode_attention(key_block=T)
# --------------------------------------------------------------------------------------


def _tol(dtype: torch.dtype) -> float:
    return REL_TOL[dtype]


def _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dtype, seed):
    """A KIVI cache holding ``lens[b]`` positions per row, filled by the reference appends
    (on the CPU) one row at a time, in two pieces (the second completes or continues the
    first's open block), over poisoned storage: codes 0xEE, scales and rings NaN."""
    kc = torch.full((b, hkv, cap, (d + 1) // 2), 0xEE, dtype=torch.uint8)
    ks = torch.full((b, hkv, cap // t, d, 2), float("nan"), dtype=F16)
    kr = torch.full((b, hkv, w, d), float("nan"), dtype=dtype)
    vc = kc.clone()
    vs = torch.full((b, hkv, cap, ng, 2), float("nan"), dtype=F16)
    vr = kr.clone()
    n_max = max(max(lens), 1)
    k = randn((b, hkv, n_max, d), dtype, "cpu", seed=seed)
    v = randn((b, hkv, n_max, d), dtype, "cpu", seed=seed + 1)
    for bi, n in enumerate(lens):
        cut = n // 2 + 1 if n > 1 else n
        for lo, hi in ((0, cut), (cut, n)):
            if hi <= lo:
                continue
            st = torch.tensor([lo], dtype=torch.int32)
            row = slice(bi, bi + 1)
            ref.kv_append_key_blocks(k[row, :, lo:hi], kc[row], ks[row], kr[row], st, t)
            ref.kv_append(v[row, :, lo:hi], vc[row], st, "int4", vs[row])
            ref.kv_append(v[row, :, lo:hi], vr[row], st, "dense", None, wrap=True)
    return kc, ks, kr, vc, vs, vr


def _run(q, cache, lens, t, **kw):
    """The op (on q's device) and the fp64 oracle over the same cache."""
    kc, ks, kr, vc, vs, vr = cache
    dev = q.device
    cl = torch.tensor(lens, dtype=torch.int32)
    dkw = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    out = sk.ops.decode_attention(
        q,
        kc.to(dev),
        vc.to(dev),
        cl.to(dev),
        kv_format="int4",
        k_scale=ks.to(dev),
        v_scale=vs.to(dev),
        k_recent=kr.to(dev),
        v_recent=vr.to(dev),
        key_block=t,
        **dkw,
    )
    rkw = {n: x for n, x in kw.items() if n != "num_splits"}
    exp = ref.decode_attention_kv(
        q.cpu().double(),
        kc,
        vc,
        cl,
        kv_format="int4",
        k_scale=ks,
        v_scale=vs,
        k_recent=kr.double(),
        v_recent=vr.double(),
        key_block=t,
        **rkw,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    return out, exp


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, T, L, W, lens, NG)
    (2, 4, 4, 1, 64, 16, 64, 32, [37, 9], 1),  # GQA group 1; a row inside its 1st block
    (3, 6, 1, 3, 48, 16, 64, 32, [48, 21, 63], 3),  # D=48, NG=3 (gather); len % T == 0
    (2, 4, 1, 16, 64, 32, 96, 64, [70, 33], 2),  # Sq = 16 across the block boundary
    (1, 8, 2, 1, 128, 16, 32, 32, [29], 4),  # D=128, NG = 4 (broadcast)
    (2, 4, 2, 5, 33, 16, 48, 16, [45, 0], 1),  # odd D, W == T, an empty row
    (2, 12, 2, 1, 64, 16, 48, 32, [40, 31], 4),  # group 6, NG = 4
    (1, 3, 1, 2, 24, 256, 256, 256, [250], 3),  # T = 256 (the largest), NG = 3
]


@pytest.mark.parametrize(
    "case", DECODE_CASES, ids=lambda c: "B{}H{}x{}Sq{}D{}T{}L{}W{}-{}-NG{}".format(*c)
)
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_decode_kivi_matches_fp64(kb: Backend, case, dtype):
    b, hq, hkv, sq, d, t, cap, w, lens, ng = case
    cache = _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dtype, seed=d + t)
    q = randn((b, hq, sq, d), dtype, kb.device, seed=5)
    out, exp = _run(q, cache, lens, t)
    err = rel_error(out, exp)
    assert err <= _tol(dtype), f"relative error {err:.3e} > {_tol(dtype):.3e}"


@pytest.mark.parametrize("window", [0, 7])
def test_decode_kivi_masks_and_splits(kb: Backend, window):
    """Head mask (row 0's KV group 1 pruned entirely: exact zeros), a slot-indexed key
    mask, a sliding window, forced splits 1/2/3 (all the same answer)."""
    dev = kb.device
    b, hq, hkv, d, t, cap, w, lens = 2, 6, 2, 64, 16, 80, 32, [75, 38]
    cache = _kivi_cache(b, hkv, d, t, cap, w, lens, 2, F32, seed=11)
    q = randn((b, hq, 3, d), F32, dev, seed=6)
    head_mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    key_mask = torch.ones(b, cap, dtype=torch.int8)
    key_mask[0, 3:9] = 0
    key_mask[0, 70:73] = 0  # inside row 0's open block (the ring)
    key_mask[1, 17:20] = 0
    pruned = ~head_mask[:, :, None, None].expand(b, hq, 3, d)
    for splits in (1, 2, 3):
        out, exp = _run(
            q,
            cache,
            lens,
            t,
            head_mask=head_mask,
            attn_mask=key_mask,
            window=window,
            num_splits=splits,
        )
        err = rel_error(out, exp)
        assert err <= _tol(F32), f"num_splits={splits}: relative error {err:.3e}"
        got = out.cpu()[pruned]
        assert torch.equal(got, torch.zeros_like(got)), f"num_splits={splits}: pruned heads"


def test_decode_kivi_window_and_fp16_splits(kb: Backend):
    """A window reaching back into the quantized blocks, fp16, Sq = 2, forced splits."""
    dev = kb.device
    lens = [100, 57]
    cache = _kivi_cache(2, 1, 32, 32, 128, 64, lens, 1, F16, seed=13)
    q = randn((2, 4, 2, 32), F16, dev, seed=8)
    for splits in (1, 3):
        out, exp = _run(q, cache, lens, 32, window=40, num_splits=splits)
        err = rel_error(out, exp)
        assert err <= _tol(F16), f"num_splits={splits}: relative error {err:.3e}"


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _small(t: int, cap: int = 32, w: int = 32, d: int = 8):
    q = torch.randn(1, 2, 1, d)
    kc = torch.zeros(1, 1, cap, (d + 1) // 2, dtype=torch.uint8)
    ks = torch.ones(1, 1, cap // t, d, 2, dtype=F16)
    vs = torch.ones(1, 1, cap, 1, 2, dtype=F16)
    kr = torch.zeros(1, 1, w, d)
    lens = torch.tensor([5], dtype=torch.int32)
    return q, kc, ks, vs, kr, lens


def test_triton_key_block_must_be_a_power_of_two_in_range(triton_backend: Backend):
    dev = triton_backend.device
    for t in (8, 24, 512):
        q, kc, ks, vs, kr, lens = (x.to(dev) for x in _small(t, cap=512, w=512))
        with pytest.raises(ValueError, match="key_block"):
            sk.ops.decode_attention(
                q,
                kc,
                kc,
                lens,
                kv_format="int4",
                k_scale=ks,
                v_scale=vs,
                k_recent=kr,
                v_recent=kr,
                key_block=t,
            )


def test_reference_takes_any_key_block():
    q, kc, ks, vs, kr, lens = _small(8)
    with _backend.use_backend("reference"):
        out = sk.ops.decode_attention(
            q,
            kc,
            kc,
            lens,
            kv_format="int4",
            k_scale=ks,
            v_scale=vs,
            k_recent=kr,
            v_recent=kr,
            key_block=8,
        )
    assert torch.isfinite(out).all()


def test_bad_kivi_arguments(kb: Backend):
    dev = kb.device
    q, kc, ks, vs, kr, lens = (x.to(dev) for x in _small(16))
    kw = dict(kv_format="int4", v_scale=vs, k_recent=kr, v_recent=kr)
    with pytest.raises(ValueError, match="k_scale for key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=vs, key_block=16, **kw)
    with pytest.raises(ValueError, match="k_scale for key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks[:, :, :1], key_block=16, **kw)
    with pytest.raises(ValueError, match="multiple of key_block"):
        sk.ops.decode_attention(
            q,
            kc,
            kc,
            lens,
            k_scale=ks,
            key_block=16,
            **{**kw, "k_recent": kr[:, :, :24], "v_recent": kr[:, :, :24]},
        )
    with pytest.raises(ValueError, match="key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks, key_block=16, wrap=True, **kw)
    with pytest.raises(ValueError, match="key_block"):
        sk.ops.decode_attention(
            q, kc, kc, lens, k_scale=ks, key_block=16, **{**kw, "k_recent": None, "v_recent": None}
        )
    k8 = torch.zeros(1, 1, 32, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(1, 1, 32, 1, dtype=F16, device=dev)
    with pytest.raises(ValueError, match="key_block"):
        sk.ops.decode_attention(
            q,
            k8,
            k8,
            lens,
            kv_format="int8",
            k_scale=s8,
            v_scale=s8,
            k_recent=kr,
            v_recent=kr,
            key_block=16,
        )
    with pytest.raises(ValueError, match="key_block must be an int"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks, key_block=-16, **kw)
    # The append op.
    x = torch.randn(1, 1, 3, 8, device=dev)
    codes = torch.zeros(1, 1, 32, 4, dtype=torch.uint8, device=dev)
    with pytest.raises(ValueError, match="multiple of block=12"):
        sk.ops.kv_append_key_blocks(x, codes, ks, kr, lens, 12)
    with pytest.raises(ValueError, match=r"scales must be float16 \[B, H, L / block"):
        sk.ops.kv_append_key_blocks(x, codes, vs, kr, lens, 16)
    with pytest.raises(ValueError, match="ring must hold a positive multiple of block=16"):
        sk.ops.kv_append_key_blocks(x, codes, ks, kr[:, :, :24], lens, 16)
    with pytest.raises(ValueError, match="block must be an int >= 1"):
        sk.ops.kv_append_key_blocks(x, codes, ks, kr, lens, 0)
    with pytest.raises(ValueError, match="unit stride"):
        wide = torch.zeros(1, 1, 32, 8, dtype=torch.uint8, device=dev)[..., ::2]
        sk.ops.kv_append_key_blocks(x, wide, ks, kr, lens, 16)


def test_opcheck_kivi_ops():
    x = randn((1, 2, 5, 8), F32, "cpu", seed=1)
    codes = torch.zeros(1, 2, 32, 4, dtype=torch.uint8)
    scales = torch.zeros(1, 2, 2, 8, 2, dtype=F16)
    ring = torch.zeros(1, 2, 32, 8)
    start = torch.tensor([14], dtype=torch.int32)
    q = randn((1, 4, 1, 8), F32, "cpu", seed=2)
    vs = torch.ones(1, 2, 32, 1, 2, dtype=F16)
    with _backend.use_backend("reference"):
        torch.library.opcheck(
            torch.ops.sentinel.kv_append_key_blocks.default, (x, codes, scales, ring, start, 16)
        )
        torch.library.opcheck(
            torch.ops.sentinel.decode_attention.default,
            (
                q,
                codes,
                codes,
                torch.tensor([19], dtype=torch.int32),
                None,
                "int4",
                None,
                None,
                0,
                None,
                scales,
                vs,
                ring,
                ring,
                False,
                16,
            ),
        )

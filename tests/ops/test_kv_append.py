"""sk.ops.kv_append and sk.ops.kv_append_key_blocks against the reference, bit for bit.

Every quantization step is one correctly rounded fp32 operation, so the codes and scales
(and, for KIVI keys, the full-precision ring) must equal the reference's exactly, on every
backend; slots an append does not own keep their poison (no stray or out-of-bounds
writes). KIVI appends run on the reference and Triton backends here (the C++ one per SIMD
level in test_kv_append_native.py): a sequence of uneven pieces, each compared whole,
since a block's older keys come from the ring, already rounded to its dtype. Also: the
round-trip error bounds of the storage formats (``reference.kv_formats``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import op_args, poisoned_cache, randn, same_bits, skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference import kv_formats
from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append
from sentinel_kernels.reference.kv_append import kv_append_key_blocks as ref_key_blocks
from sentinel_kernels.reference.kv_formats import KV_FORMATS

F32, F16 = torch.float32, torch.float16


APPEND_CASES = [
    # (B, H, S, D, L, groups, starts, wrap)
    (1, 1, 1, 1, 4, 1, [0], False),
    (2, 3, 5, 7, 16, 1, [0, 9], False),
    (2, 2, 5, 7, 16, 2, [3, 14], False),  # row 1 runs past L: slots >= L skipped
    (1, 2, 3, 64, 8, 2, [6], True),  # wraps around the ring
    (2, 1, 11, 33, 4, 1, [2, 0], True),  # S > L: only the last L tokens land
    (1, 4, 17, 128, 40, 4, [1], False),
]


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize(
    "case", APPEND_CASES, ids=lambda c: "B{}H{}S{}D{}L{}G{}-{}-wrap{}".format(*c)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_append_bit_exact(backend: Backend, fmt, case, dtype):
    skip_interpreted_bf16(backend, dtype)
    b, h, s, d, cap, groups, starts, wrap = case
    if fmt == "dense":
        groups = 1
    dev = backend.device
    x = randn((b, h, s, d), dtype, dev, seed=s * 7 + d)
    start = torch.tensor(starts, dtype=torch.int32, device=dev)
    cache, scales = poisoned_cache(b, h, cap, d, fmt, groups, dtype, dev)
    want_c, want_s = cache.clone().cpu(), scales.clone().cpu() if scales is not None else None
    ref_kv_append(x.cpu(), want_c, start.cpu(), fmt, want_s, wrap)
    sk.ops.kv_append(x, cache, start, fmt, scales, wrap)
    assert same_bits(cache, want_c), "codes differ from the reference"
    if scales is not None:
        assert same_bits(scales, want_s), "scales differ from the reference"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_append_strided_input_and_int64_start(backend: Backend, fmt):
    dev = backend.device
    base = randn((2, 9, 4, 6), torch.float32, dev, seed=3)
    x = base.permute(0, 3, 2, 1)[:, :, :, ::2]  # [2, 6, 4, 5], no unit stride anywhere
    assert not x.is_contiguous()
    start = torch.tensor([1, 0], dtype=torch.int64, device=dev)
    cache, scales = poisoned_cache(2, 6, 8, 5, fmt, 1, torch.float32, dev)
    want_c, want_s = cache.clone().cpu(), scales.clone().cpu()
    ref_kv_append(x.cpu(), want_c, start.cpu(), fmt, want_s, False)
    sk.ops.kv_append(x, cache, start, fmt, scales)
    assert same_bits(cache, want_c) and same_bits(scales, want_s)


# --------------------------------------------------------------------------------------
# kv_append_key_blocks (KIVI keys)
# --------------------------------------------------------------------------------------


def _layout(x: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` with the same values and other strides: 0 as is, 1 a transposed view of
    ``[B, S, H, D]`` storage (unit last stride), 2 a transposed view of ``[B, H, D, S]``
    storage (last stride S)."""
    if mode == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if mode == 2:
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


PIECES = (1, 3, 17, 40)


KIVI_APPEND_CASES = [
    # (B, H, D, block, L, W, starts): four appends of PIECES tokens each, from starts
    (2, 2, 7, 16, 64, 32, [0, 5]),  # row 1 ends at 66: the block past L is skipped
    (3, 1, 33, 32, 64, 32, [0, 13, 30]),  # W == T and a 40-token piece longer than the ring
    (1, 3, 64, 16, 48, 16, [2]),  # the last two blocks past L
    (2, 2, 7, 4, 24, 8, [1, 6]),  # block 4: the append kernel takes any block
]


@pytest.mark.parametrize(
    "case", KIVI_APPEND_CASES, ids=lambda c: "B{}H{}D{}T{}L{}W{}-{}".format(*c)
)
@pytest.mark.parametrize(
    "dtypes", [(F32, F32), (F16, F16), (F32, F16)], ids=["f32", "f16", "f32-into-f16-ring"]
)
def test_append_key_blocks_bit_exact(ref_triton_backend: Backend, case, dtypes):
    b, h, d, block, cap, w, starts = case
    x_dtype, ring_dtype = dtypes
    dev = ref_triton_backend.device
    codes = torch.full((b, h, cap, (d + 1) // 2), 0xFF, dtype=torch.uint8, device=dev)
    scales = torch.full((b, h, cap // block, d, 2), float("nan"), dtype=F16, device=dev)
    # Rows that start mid-block read the block's older keys from the ring: finite there,
    # as an earlier append would have left it.
    ring = randn((b, h, w, d), ring_dtype, dev, seed=d + block)
    want = [t.clone().cpu() for t in (codes, scales, ring)]
    pos = torch.tensor(starts, dtype=torch.int32, device=dev)
    for i, s in enumerate(PIECES):
        x = _layout(randn((b, h, s, d), x_dtype, dev, seed=100 * i + s), i % 3)
        ref_key_blocks(x.cpu(), *want, pos.cpu(), block)
        sk.ops.kv_append_key_blocks(x, codes, scales, ring, pos, block)
        for name, got, exp in zip(
            ("codes", "scales", "ring"), (codes, scales, ring), want, strict=True
        ):
            assert same_bits(got, exp), f"{name} differ from the reference after piece {i} (S={s})"
        pos = pos + s
    # Row 0's blocks within L were all completed and quantized.
    assert not torch.isnan(scales[0, :, : min(starts[0] + sum(PIECES), cap) // block]).any()


def test_append_key_blocks_int64_start_and_empty(ref_triton_backend: Backend):
    dev = ref_triton_backend.device
    x = randn((2, 1, 20, 5), F32, dev, seed=1)
    codes = torch.full((2, 1, 32, 3), 0xFF, dtype=torch.uint8, device=dev)
    scales = torch.full((2, 1, 2, 5, 2), float("nan"), dtype=F16, device=dev)
    ring = torch.full((2, 1, 16, 5), float("nan"), dtype=F32, device=dev)
    start = torch.tensor([0, 0], dtype=torch.int64, device=dev)
    want = [t.clone().cpu() for t in (codes, scales, ring)]
    ref_key_blocks(x.cpu(), *want, start.cpu(), 16)
    sk.ops.kv_append_key_blocks(x, codes, scales, ring, start, 16)
    assert all(same_bits(g, e) for g, e in zip((codes, scales, ring), want, strict=True))
    before = [t.clone() for t in (codes, scales, ring)]
    sk.ops.kv_append_key_blocks(x[:, :, :0], codes, scales, ring, start, 16)  # S = 0: no-op
    assert all(same_bits(g, e) for g, e in zip((codes, scales, ring), before, strict=True))


# --------------------------------------------------------------------------------------
# Storage formats
# --------------------------------------------------------------------------------------


def test_compressed_round_trip_error_is_bounded():
    """Reconstruction error: half a grid step (int8: absmax/127, int4: (max-min)/15), plus
    the fp16 rounding of the stored scale and minimum (relative 2^-11 each)."""
    x = randn((4, 3, 50, 64), torch.float32, "cpu", seed=9)
    for fmt, groups in (("int8", 1), ("int8", 2), ("int4", 1), ("int4", 2)):
        codes, scales = kv_formats.quantize_kv(x, fmt, groups)
        y = kv_formats.dequantize_kv(codes, scales, fmt, 64)
        span = x.view(4, 3, 50, groups, 64 // groups)
        absmax = span.abs().amax(-1)
        step = absmax / 127 if fmt == "int8" else (span.amax(-1) - span.amin(-1)) / 15
        err = (y - x).abs().view_as(span).amax(-1)
        assert (err <= step / 2 * (1 + 2**-9) + absmax * 2**-10).all(), fmt


def test_quantize_key_block_round_trip_error_is_bounded():
    """Per channel over the block: at most half a grid step (max - min) / 15 plus the fp16
    rounding of the stored scale and minimum."""
    x = randn((3, 2, 32, 40), F32, "cpu", seed=7)  # [.., T, D]
    codes, scales = kv_formats.quantize_key_block(x)
    assert codes.shape == (3, 2, 32, 20) and scales.shape == (3, 2, 40, 2)
    y = kv_formats.dequantize_key_block(codes, scales, 40)
    lo, hi = x.amin(-2), x.amax(-2)
    step = (hi - lo) / 15
    absmax = x.abs().amax(-2)
    err = (y - x).abs().amax(-2)
    assert (err <= step / 2 * (1 + 2**-9) + absmax * 2**-10).all()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_bad_append_inputs(backend: Backend):
    dev = backend.device
    k8 = torch.zeros(1, 1, 4, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(1, 1, 4, 1, dtype=torch.float16, device=dev)
    lens = torch.tensor([3], dtype=torch.int32, device=dev)
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


def test_bad_key_blocks_arguments(ref_triton_backend: Backend):
    dev = ref_triton_backend.device
    ks = torch.ones(1, 1, 2, 8, 2, dtype=F16, device=dev)
    vs = torch.ones(1, 1, 32, 1, 2, dtype=F16, device=dev)
    kr = torch.zeros(1, 1, 32, 8, device=dev)
    lens = torch.tensor([5], dtype=torch.int32, device=dev)
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


def test_opcheck_kv_append():
    x = randn((1, 2, 3, 8), torch.float32, "cpu", seed=1)
    cache = torch.zeros(1, 2, 6, 8, dtype=torch.int8)
    scales = torch.zeros(1, 2, 6, 1, dtype=torch.float16)
    start = torch.tensor([1], dtype=torch.int32)
    args = op_args(sk.ops.kv_append, x, cache, start, "int8", scales)
    torch.library.opcheck(torch.ops.sentinel.kv_append.default, args)


def test_opcheck_kv_append_key_blocks():
    x = randn((1, 2, 5, 8), F32, "cpu", seed=1)
    codes = torch.zeros(1, 2, 32, 4, dtype=torch.uint8)
    scales = torch.zeros(1, 2, 2, 8, 2, dtype=F16)
    ring = torch.zeros(1, 2, 32, 8)
    start = torch.tensor([14], dtype=torch.int32)
    args = op_args(sk.ops.kv_append_key_blocks, x, codes, scales, ring, start, 16)
    with _backend.use_backend("reference"):
        torch.library.opcheck(torch.ops.sentinel.kv_append_key_blocks.default, args)

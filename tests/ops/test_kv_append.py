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
from helpers import (
    op_args,
    poisoned_cache,
    randn,
    same_bits,
    skip_interpreted_bf16,
    transposed_randn,
)

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
# kv_append with destination rows
# --------------------------------------------------------------------------------------

I32, I64 = torch.int32, torch.int64


def _rows_loop(x, cache, start, fmt, scales, wrap, rows) -> None:
    """The rows rule by hand: batch row ``b`` appended alone (no rows) into the one-row
    slice ``rows[b]`` of the cache, in batch order; rows outside the cache skipped."""
    for bi, r in enumerate(rows.tolist()):
        if 0 <= r < cache.shape[0]:
            sc = scales[r : r + 1] if scales is not None else None
            ref_kv_append(x[bi : bi + 1], cache[r : r + 1], start[bi : bi + 1], fmt, sc, wrap)


def _check_rows_append(x, cache, scales, start, rows, fmt, wrap) -> None:
    """Run ``sk.ops.kv_append`` with ``rows`` on the poisoned ``cache`` / ``scales`` and
    compare every bit (poison included: nothing but the destination slots may change)
    with the reference and with :func:`_rows_loop`, all from the same poisoned copies."""
    want = [cache.clone().cpu(), scales.clone().cpu() if scales is not None else None]
    loop = [cache.clone().cpu(), scales.clone().cpu() if scales is not None else None]
    ref_kv_append(x.cpu(), want[0], start.cpu(), fmt, want[1], wrap, rows.cpu())
    _rows_loop(x.cpu(), loop[0], start.cpu(), fmt, loop[1], wrap, rows.cpu())
    before = cache.clone().cpu()
    sk.ops.kv_append(x, cache, start, fmt, scales, wrap, rows=rows)
    assert same_bits(want[0], loop[0]), "the reference differs from the per-row loop"
    assert same_bits(cache, want[0]), "codes differ from the reference"
    if scales is not None:
        assert same_bits(want[1], loop[1]), "reference scales differ from the per-row loop"
        assert same_bits(scales, want[1]), "scales differ from the reference"
    assert not same_bits(cache, before), "nothing was written"


ROWS_CASES = [
    # (B, H, S, D, L, groups, Bc, rows, starts, wrap, rows dtype)
    (1, 2, 7, 16, 12, 2, 4, [2], [3], False, I32),  # Bc > B: rows 0, 1, 3 keep their poison
    (2, 2, 7, 9, 12, 1, 5, [4, 1], [0, 8], False, I64),  # row 1 runs past L
    (7, 1, 1, 8, 8, 2, 2, [1, 0, 1, 1, 0, 1, 0], [0, 0, 1, 7, 5, 2, 6], False, I32),  # Bc < B
    (3, 2, 7, 8, 16, 1, 3, [-1, 3, 0], [0, 0, 4], False, I64),  # out-of-range rows skipped
    (2, 2, 7, 16, 5, 2, 3, [2, 0], [3, 9], True, I32),  # wrap, S > L: the last L tokens
    (2, 2, 3, 16, 8, 2, 3, [2, 2], [6, 1], True, I64),  # wrap past L, one row twice
    (1, 1, 127, 5, 140, 1, 2, [1], [6], False, I64),
]


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize(
    "case", ROWS_CASES, ids=lambda c: "B{}H{}S{}D{}L{}G{}-Bc{}-rows{}-{}-wrap{}-{}".format(*c)
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_append_rows_bit_exact(ref_triton_backend: Backend, fmt, case, dtype):
    skip_interpreted_bf16(ref_triton_backend, dtype)
    b, h, s, d, cap, groups, n_rows, rows, starts, wrap, rows_dtype = case
    if fmt == "dense":
        groups = 1
    dev = ref_triton_backend.device
    x = transposed_randn(b, h, s, d, dtype, dev, seed=s * 7 + d + b)
    cache, scales = poisoned_cache(n_rows, h, cap, d, fmt, groups, dtype, dev)
    start = torch.tensor(starts, dtype=torch.int32, device=dev)
    _check_rows_append(
        x, cache, scales, start, torch.tensor(rows, dtype=rows_dtype, device=dev), fmt, wrap
    )
    for r in set(range(n_rows)) - set(rows):  # rows no batch row names: all poison
        fresh, _ = poisoned_cache(1, h, cap, d, fmt, groups, dtype, dev)
        assert same_bits(cache[r : r + 1], fresh), f"cache row {r} was written"


@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_append_rows_packed_prefill(backend: Backend, fmt):
    """The use ``rows`` is for: prompts of 3, 1 and 5 tokens packed one after another in
    one row, their K ``[1, H, 9, D]`` (a transposed projection output) seen as ``[9, H, 1,
    D]`` (one token per batch row, a strided view), each token sent to its request's
    cache row at its position in its prompt, in one append; the same as appending each
    prompt alone into its row (the staging-row-and-copy way)."""
    dev = backend.device
    dtype = torch.float32 if backend.interpreted else torch.float16
    h, d, cap, groups = 2, 16, 8, 2 if fmt != "dense" else 1
    lens, dest = [3, 1, 5], [2, 0, 1]
    k = transposed_randn(1, h, sum(lens), d, dtype, dev, seed=11)  # [1, H, S, D]
    x = k.permute(2, 1, 0, 3)
    assert x.shape == (9, h, 1, d) and not x.is_contiguous() and x.stride(-1) == 1
    rows = torch.tensor([r for r, n in zip(dest, lens, strict=True) for _ in range(n)], device=dev)
    start = torch.tensor([i for n in lens for i in range(n)], dtype=torch.int32, device=dev)
    cache, scales = poisoned_cache(4, h, cap, d, fmt, groups, dtype, dev)
    by_prompt = [cache.clone().cpu(), scales.clone().cpu() if scales is not None else None]
    _check_rows_append(x, cache, scales, start, rows, fmt, False)
    off = 0
    for r, n in zip(dest, lens, strict=True):
        sc = by_prompt[1][r : r + 1] if scales is not None else None
        zero = torch.zeros(1, dtype=torch.int32)
        ref_kv_append(k[:, :, off : off + n].cpu(), by_prompt[0][r : r + 1], zero, fmt, sc)
        off += n
    assert same_bits(cache, by_prompt[0]), "codes differ from one append per prompt"
    if scales is not None:
        assert same_bits(scales, by_prompt[1]), "scales differ from one append per prompt"


def test_append_rows_far_out_of_range_int64(backend: Backend):
    """int64 rows far outside the cache (their low 32 bits inside it) are skipped too."""
    dev = backend.device
    x = randn((5, 2, 3, 8), torch.float32, dev, seed=4)
    cache, scales = poisoned_cache(3, 2, 6, 8, "int8", 2, torch.float32, dev)
    rows = torch.tensor([2**32 + 1, -(2**32) + 2, 3, -1, 1], dtype=torch.int64, device=dev)
    start = torch.tensor([0, 1, 2, 3, 2], dtype=torch.int32, device=dev)
    _check_rows_append(x, cache, scales, start, rows, "int8", False)
    # Only batch row 4 lands: slots 2 .. 4 of cache row 1.
    want, want_s = poisoned_cache(3, 2, 6, 8, "int8", 2, torch.float32, dev)
    want[1, :, 2:5], want_s[1, :, 2:5] = cache[1, :, 2:5], scales[1, :, 2:5]
    assert same_bits(cache, want) and same_bits(scales, want_s)


def test_reference_rows_collision_keeps_the_later_row():
    """Two batch rows on one (row, slot): the reference keeps the later one (the C++
    backend too, test_kv_append_native.py; Triton leaves it unspecified)."""
    x = randn((3, 2, 4, 8), torch.float32, "cpu", seed=5)
    start = torch.tensor([0, 2, 1], dtype=torch.int32)
    rows = torch.tensor([1, 1, 0], dtype=torch.int32)
    cache, scales = poisoned_cache(2, 2, 8, 8, "int4", 1, torch.float32)
    loop = [cache.clone(), scales.clone()]
    ref_kv_append(x, cache, start, "int4", scales, False, rows)
    _rows_loop(x, loop[0], start, "int4", loop[1], False, rows)
    assert same_bits(cache, loop[0]) and same_bits(scales, loop[1])
    alone, alone_s = poisoned_cache(1, 2, 8, 8, "int4", 1, torch.float32)
    ref_kv_append(x[1:2], alone, start[1:2], "int4", alone_s)
    assert same_bits(cache[1, :, 2:6], alone[0, :, 2:6])  # batch row 1's, whole
    assert same_bits(scales[1, :, 2:6], alone_s[0, :, 2:6])


def test_append_rows_none_unchanged(backend: Backend):
    """``rows=None`` and ``rows = arange(B)`` write what the call without rows writes."""
    dev = backend.device
    x = randn((2, 2, 5, 8), torch.float32, dev, seed=6)
    start = torch.tensor([1, 4], dtype=torch.int32, device=dev)
    base = poisoned_cache(2, 2, 8, 8, "int4", 2, torch.float32, dev)
    want = [t.clone() for t in base]
    sk.ops.kv_append(x, want[0], start, "int4", want[1])
    for rows in (None, torch.arange(2, device=dev)):
        got = [t.clone() for t in base]
        sk.ops.kv_append(x, got[0], start, "int4", got[1], rows=rows)
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
    # An empty batch: a cache of no rows without rows, any cache with them; no-ops.
    sk.ops.kv_append(x[:0], want[0][:0], start[:0], "int4", want[1][:0])
    sk.ops.kv_append(x[:0], want[0], start[:0], "int4", want[1], rows=start[:0])
    assert same_bits(want[0], got[0]) and same_bits(want[1], got[1])


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


def test_bad_append_rows(backend: Backend):
    dev = backend.device
    x = randn((2, 2, 3, 8), torch.float32, dev, seed=2)
    k8 = torch.zeros(3, 2, 4, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(3, 2, 4, 1, dtype=torch.float16, device=dev)
    lens = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=dev)

    def append(**over):
        args = dict(x=x, cache=k8.clone(), start=lens, kv_format="int8", scales=s8.clone())
        args.update(over)
        sk.ops.kv_append(**args)

    append(rows=rows)  # valid: a cache of 3 rows for a batch of 2
    with pytest.raises(ValueError, match=r"cache for kv_format 'int8' must be \[batch=2"):
        append()  # without rows the cache must have B rows
    with pytest.raises(TypeError, match="rows has dtype float32; supported: int32, int64"):
        append(rows=rows.float())
    with pytest.raises(TypeError, match="rows must be a torch.Tensor"):
        append(rows=[2, 0])
    with pytest.raises(ValueError, match=r"rows must be \[batch\] = \(2,\), got \(3,\)"):
        append(rows=torch.zeros(3, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match=r"rows must be \[batch\] = \(2,\), got \(2, 1\)"):
        append(rows=rows[:, None])
    with pytest.raises(ValueError, match="tensors must be on one device.*rows on meta"):
        append(rows=torch.zeros(2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"must be \[rows, heads=2, L, 8\].*got \(3, 1, 4, 8\)"):
        append(rows=rows, cache=k8[:, :1].clone(), scales=s8[:, :1].clone())
    with pytest.raises(ValueError, match=r"must be \[rows, heads=2, L, 8\].*got \(3, 2, 4, 4\)"):
        append(rows=rows, cache=k8[..., :4].clone())
    with pytest.raises(ValueError, match="cache has no rows"):
        append(rows=rows, cache=k8[:0].clone(), scales=s8[:0].clone())
    with pytest.raises(ValueError, match=r"scales must be \[B, H, L, G\] matching cache"):
        append(rows=rows, scales=s8[:2].clone())


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


@pytest.mark.parametrize("backend_name", ["reference", "native"])
def test_opcheck_kv_append_rows(backend_name):
    if backend_name == "native" and not _backend.native_available():
        pytest.skip("sentinel_kernels._C not built")
    x = randn((4, 2, 1, 8), torch.float32, "cpu", seed=1)
    cache = torch.zeros(3, 2, 6, 4, dtype=torch.uint8)
    scales = torch.zeros(3, 2, 6, 2, 2, dtype=torch.float16)
    start = torch.tensor([1, 0, 5, 2], dtype=torch.int32)
    rows = torch.tensor([2, 0, 2, 7], dtype=torch.int64)
    args = op_args(sk.ops.kv_append, x, cache, start, "int4", scales, rows=rows)
    with _backend.use_backend(backend_name):
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

"""The C++ KV append (``_C.kv_append``, ``_C.kv_append_key_blocks``), per SIMD level.

Codes and scales (and the KIVI ring) must equal ``reference.kv_append`` bit for bit, and
every byte the append does not own (unwritten slots, the rest of a larger buffer the
cache is a view of) must keep its poison. The entry points are called on raw pointers
as the op layer calls them, and through ``sk.ops`` on the native backend (KIVI keys:
per-channel int4 over blocks of T tokens, Liu et al. 2024, appended in uneven pieces).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPE_NAMES,
    assert_each_rejected,
    assert_rejects,
    poisoned_kivi_keys,
    randn,
    random_cache,
    same_bits,
    strides3,
)

_C = pytest.importorskip("sentinel_kernels._C")
import sentinel_kernels as sk  # noqa: E402
from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append  # noqa: E402
from sentinel_kernels.reference.kv_append import (  # noqa: E402
    kv_append_key_blocks as ref_key_blocks,
)
from sentinel_kernels.reference.kv_formats import KV_FORMATS  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def rows_args(x, start, threads) -> dict:
    """The keyword arguments both append entry points take for the new rows
    ``x [B, H, S, D]`` (any strides), the int32 start positions ``start [B]`` and the
    thread count."""
    b, h, s, d = x.shape
    return dict(
        x_ptr=x.data_ptr(),
        x_dtype=DTYPE_NAMES[x.dtype],
        B=b,
        H=h,
        S=s,
        D=d,
        x_strides=list(x.stride()),
        start_ptr=start.data_ptr(),
        num_threads=threads,
    )


def append_args(x, cache, start, fmt, scales, wrap, threads=2, rows=None) -> dict:
    """The keyword arguments of ``_C.kv_append`` for tensors of any strides; ``rows``
    (int32 ``[B]``, destination cache rows) adds ``rows_ptr`` and ``Bc``, which are
    otherwise left to their defaults."""
    dest = dict(rows_ptr=rows.data_ptr(), Bc=cache.shape[0]) if rows is not None else {}
    return dict(
        rows_args(x, start, threads),
        **dest,
        cache_ptr=cache.data_ptr(),
        scales_ptr=scales.data_ptr() if scales is not None else 0,
        kv_format=fmt,
        L=cache.shape[2],
        n_groups=scales.shape[3] if scales is not None else 1,
        cache_strides=strides3(cache),
        scale_strides=strides3(scales),
        wrap=wrap,
        cache_dtype=DTYPE_NAMES[cache.dtype] if fmt == "dense" else "",
    )


def append_native(x, cache, start, fmt, scales, wrap, threads=2, rows=None):
    """``_C.kv_append`` on tensors (any strides); mutates ``cache`` / ``scales``."""
    _C.kv_append(**append_args(x, cache, start, fmt, scales, wrap, threads, rows))


def key_blocks_args(x, codes, scales, ring, start, block, threads=2) -> dict:
    """The keyword arguments of ``_C.kv_append_key_blocks`` for tensors of any strides."""
    return dict(
        rows_args(x, start, threads),
        codes_ptr=codes.data_ptr(),
        scales_ptr=scales.data_ptr(),
        ring_ptr=ring.data_ptr(),
        ring_dtype=DTYPE_NAMES[ring.dtype],
        L=codes.shape[2],
        W=ring.shape[2],
        block=block,
        codes_strides=strides3(codes),
        scales_strides=strides3(scales),
        ring_strides=strides3(ring),
    )


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
@pytest.mark.parametrize("d", [1, 7, 64, 128])
def test_append_bit_exact(fmt, dtype, d, float_simd_level):
    seed = 100 * KV_FORMATS.index(fmt) + 10 * list(DTYPE_NAMES).index(dtype) + d
    gen = torch.Generator().manual_seed(seed)
    b, h, cap = 2, 3, 11
    for groups in (1, 2):
        if groups > d:
            continue
        for wrap in (False, True):
            for s in (1, 5, cap + 4):
                if s > cap and not wrap:
                    continue
                if wrap:
                    start = torch.randint(0, 3 * cap, (b,), generator=gen, dtype=torch.int32)
                else:  # row 1 runs past L: those slots are skipped
                    start = torch.tensor([0, cap - 2], dtype=torch.int32)
                # x [B, H, S, D] as a transposed view, and with a non-unit channel stride.
                xs = randn(
                    (b, s, h, 2 * d),
                    dtype,
                    "cpu",
                    generator=gen,
                    spread=3.0 if dtype != torch.float16 else 1.0,
                )
                x = xs.permute(0, 2, 1, 3)[..., ::2] if s % 2 else xs.permute(0, 2, 1, 3)[..., :d]
                # The cache is a view into a larger poisoned buffer (slots 2 .. 2 + cap).
                big, big_sc = random_cache(b, h + 1, cap + 3, d, fmt, groups, dtype, gen)
                cache = big[:, 1:, 2 : 2 + cap]
                scales = big_sc[:, 1:, 2 : 2 + cap] if big_sc is not None else None
                want, want_sc = big.clone(), (big_sc.clone() if big_sc is not None else None)
                ref_kv_append(
                    x,
                    want[:, 1:, 2 : 2 + cap],
                    start,
                    fmt,
                    want_sc[:, 1:, 2 : 2 + cap] if want_sc is not None else None,
                    wrap,
                )
                append_native(x, cache, start, fmt, scales, wrap)
                what = f"{fmt} {dtype} D={d} G={groups} wrap={wrap} S={s}"
                assert same_bits(big, want), f"codes differ: {what}"
                if big_sc is not None:
                    assert same_bits(big_sc, want_sc), f"scales differ: {what}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_append_ties_and_extremes(fmt):
    """Half-way cases round to even; huge / tiny groups saturate / go subnormal."""
    gen = torch.Generator().manual_seed(7)
    d = 8
    rows = [
        # int8: absmax 127 -> s = 1, x / s = x exactly (ties at .5)
        [127.0, 2.5, -3.5, 0.5, 1.5, -0.5, -2.5, 126.5],
        # int4: min 0, max 15 -> s = 1, m = 0
        [0.0, 15.0, 0.5, 2.5, 3.5, 14.5, 1.5, 7.5],
        [1e6, -3e5, 2.0, 0.0, 5.0, -1e6, 7.0, 1.0],  # s saturates at 65504
        [1e-6, -3e-7, 2e-7, 0.0, 5e-8, -1e-6, 7e-7, 1e-9],  # subnormal fp16 scales
        [0.0] * 8,  # s == 0
        [3.0] * 8,  # int4: max == min
    ]
    x = torch.tensor(rows, dtype=torch.float32).view(1, len(rows), 1, d)
    x = torch.cat([x, randn((1, len(rows), 1, d), torch.float32, "cpu", generator=gen)], dim=2)
    for groups in (1, 2, 4):
        cache, scales = random_cache(1, len(rows), 4, d, fmt, groups, torch.float32, gen)
        want, want_sc = cache.clone(), scales.clone()
        start = torch.tensor([1], dtype=torch.int32)
        ref_kv_append(x, want, start, fmt, want_sc)
        append_native(x, cache, start, fmt, scales, False)
        assert same_bits(cache, want)
        assert same_bits(scales, want_sc)


def test_append_dense_converts_to_cache_dtype():
    gen = torch.Generator().manual_seed(3)
    x = randn((2, 2, 3, 9), torch.float32, "cpu", generator=gen)
    cache = torch.full((2, 2, 6, 9), float("nan"), dtype=torch.bfloat16)
    want = cache.clone()
    start = torch.tensor([1, 3], dtype=torch.int32)
    ref_kv_append(x, want, start, "dense")
    append_native(x, cache, start, "dense", None, False)
    assert same_bits(cache, want)


def test_append_arg_checks():
    x = torch.randn(1, 2, 3, 6)
    cache = torch.zeros(1, 2, 5, 6, dtype=torch.int8)
    scales = torch.zeros(1, 2, 5, 2, dtype=torch.float16)
    start = torch.tensor([0], dtype=torch.int32)

    def call(**over):
        args = append_args(x, cache, start, "int8", scales, False, threads=1)
        args.update(over)
        _C.kv_append(**args)

    call()  # valid
    bad = [
        (dict(kv_format="fp8"), "kv_format"),
        (dict(D=0), "D must be >= 1"),
        (dict(L=0), "L must be >= 1"),
        (dict(S=-1), "S must be >= 0"),
        (dict(n_groups=4), "cannot be cut"),
        (dict(n_groups=7), r"n_groups must be in \[1, D = 6\]"),
        (dict(x_strides=[1, 2, 3]), "x_strides must have 4 entries"),
        (dict(cache_strides=[60, 30, -6]), "cache_strides must be >= 0"),
        (dict(cache_strides=[60, 30, 3]), "cache rows overlap"),
        (dict(scale_strides=[20, 10, 1]), "scale rows overlap"),
        (dict(scales_ptr=0), "scales_ptr is a null pointer"),
        (dict(start_ptr=0), "start_ptr is a null pointer"),
        (dict(x_ptr=0), "x_ptr is a null pointer"),
        (dict(num_threads=0), "num_threads must be >= 1"),
    ]
    for over, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call(**over)
    neg = torch.tensor([-3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"start\[0\] = -3 is negative"):
        call(start_ptr=neg.data_ptr())

    # Destination rows: Bc rows of cache and scales, checked as such.
    rows = torch.tensor([0], dtype=torch.int32)
    r = rows.data_ptr()
    call(rows_ptr=r, Bc=1, cache_strides=[30, 30, 6], scale_strides=[10, 10, 2])  # valid
    assert_each_rejected(
        call,
        [
            (dict(rows_ptr=r, Bc=0), "Bc must be >= 1, got 0"),
            (dict(rows_ptr=r, Bc=-2), "Bc must be >= 1, got -2"),
            (dict(Bc=2), r"Bc = 2 must be B = 1 \(or -1\) without rows_ptr"),
            # row b's [H, L] block overlaps row b + 1's: fine for one row, not for two
            (dict(rows_ptr=r, Bc=2, cache_strides=[30, 30, 6]), "cache rows overlap"),
            (dict(rows_ptr=r, Bc=2, scale_strides=[10, 10, 2]), "scale rows overlap"),
        ],
    )


# --------------------------------------------------------------------------------------
# Destination rows
# --------------------------------------------------------------------------------------

# (B, S): one token per batch row (a packed prefill) up to a long chunk of one row.
ROWS_SHAPES = [(1, 1), (1, 7), (1, 127), (7, 1), (7, 7)]


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("dtype", list(DTYPE_NAMES))
@pytest.mark.parametrize("d", [7, 64])
def test_append_rows_bit_exact(fmt, dtype, d, float_simd_level):
    """Random destination rows (int32: as the op passes them) into caches of 1, 3 or 9
    rows, out-of-range ones included, with and without wrap; batch rows that collide on
    a slot leave the later one's values (the reference's order)."""
    seed = 100 * KV_FORMATS.index(fmt) + 10 * list(DTYPE_NAMES).index(dtype) + d
    gen = torch.Generator().manual_seed(seed)
    h, cap, groups = 3, 9, 2 if fmt != "dense" else 1
    for k, (b, s) in enumerate(ROWS_SHAPES):
        for wrap in (False, True):
            n_rows = (1, 3, 9)[(k + wrap) % 3]
            rows = torch.randint(-2, n_rows + 2, (b,), generator=gen, dtype=torch.int32)
            start = torch.randint(0, 2 * cap, (b,), generator=gen, dtype=torch.int32)
            xs = randn((b, s, h, d), dtype, "cpu", generator=gen)
            x = xs.permute(0, 2, 1, 3)  # [B, H, S, D], a transposed view
            # The cache is a view into a larger random buffer (slots 1 .. 1 + cap).
            big, big_sc = random_cache(n_rows + 1, h, cap + 2, d, fmt, groups, dtype, gen)
            cache = big[1:, :, 1 : 1 + cap]
            scales = big_sc[1:, :, 1 : 1 + cap] if big_sc is not None else None
            want, want_sc = big.clone(), (big_sc.clone() if big_sc is not None else None)
            ref_kv_append(
                x,
                want[1:, :, 1 : 1 + cap],
                start,
                fmt,
                want_sc[1:, :, 1 : 1 + cap] if want_sc is not None else None,
                wrap,
                rows,
            )
            append_native(x, cache, start, fmt, scales, wrap, rows=rows)
            what = f"{fmt} {dtype} D={d} B={b} S={s} Bc={n_rows} rows={rows.tolist()} wrap={wrap}"
            assert same_bits(big, want), f"codes differ: {what}"
            if big_sc is not None:
                assert same_bits(big_sc, want_sc), f"scales differ: {what}"


@pytest.mark.parametrize("wrap", [False, True])
def test_append_rows_collision_keeps_the_later_row(wrap):
    """Two long batch rows onto the same slots of one cache row, on two threads: every
    slot must hold the second batch row's codes and scales whole (the collision makes the
    append run in batch order instead of racing)."""
    b, h, s, d, cap = 2, 1, 2048, 64, 2048
    x = randn((b, h, s, d), F32, "cpu", seed=21)
    cache = torch.full((1, h, cap, d), -128, dtype=torch.int8)
    scales = torch.full((1, h, cap, 4), float("nan"), dtype=F16)
    # Row 1 starts one slot later: without wrap, slots 1 .. L - 1 collide; with wrap all.
    start = torch.tensor([0, 1], dtype=torch.int32)
    rows = torch.tensor([0, 0], dtype=torch.int32)
    want, want_sc = cache.clone(), scales.clone()
    ref_kv_append(x, want, start, "int8", want_sc, wrap, rows)
    for _ in range(3):
        got, got_sc = cache.clone(), scales.clone()
        append_native(x, got, start, "int8", got_sc, wrap, threads=2, rows=rows)
        assert same_bits(got, want) and same_bits(got_sc, want_sc)


# --------------------------------------------------------------------------------------
# KIVI keys
# --------------------------------------------------------------------------------------


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


KIVI_APPEND_CASES = [
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
    "case", KIVI_APPEND_CASES, ids=lambda c: "D{}-T{}-W{}-{}-{}".format(*c).replace("torch.", "")
)
def test_append_key_blocks_bit_exact(native, case):
    d, block, w, xdt, rdt = case
    b, h = len(PREFILL), 3
    total = max(PREFILL) + sum(PIECES)
    cap = (total - 6) // block * block  # the longest row runs past L: those blocks skipped
    codes, scales, ring = poisoned_kivi_keys(b, h, cap, w, d, block, rdt)
    want = [t.clone() for t in (codes, scales, ring)]
    seed = 0

    def append(x, cs, ss, rg, wc, ws, wr, st):
        sk.ops.kv_append_key_blocks(x, cs, ss, rg, st, block)
        ref_key_blocks(x.contiguous(), wc, ws, wr, st, block)
        assert same_bits(cs, wc), "codes differ from the reference"
        assert same_bits(ss, ws), "scales differ from the reference"
        assert same_bits(rg, wr), "ring differs from the reference"

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
    b, h, s, d, block, w, cap = 2, 2, 9, 5, 4, 8, 16
    x = _strided(randn((b, h, s, d), F32, "cpu", seed=7), 2)
    assert x.stride(-1) == 2
    codes, scales, ring = poisoned_kivi_keys(b, h, cap, w, d, block, F16)
    wc, ws, wr = codes.clone(), scales.clone(), ring.clone()
    start = torch.tensor([0, 3], dtype=torch.int32)
    ring[1, :, :3] = randn((h, 3, d), F16, "cpu", seed=8)  # row 1's first 3 positions
    wr.copy_(ring)
    _C.kv_append_key_blocks(**key_blocks_args(x, codes, scales, ring, start, block))
    ref_key_blocks(x, wc, ws, wr, start, block)
    assert same_bits(codes, wc) and same_bits(scales, ws) and same_bits(ring, wr)


def test_key_blocks_bad_inputs(native):
    b, h, d, block = 1, 1, 8, 4
    x = randn((b, h, 2, d), F32, "cpu", seed=1)
    st = torch.zeros(b, dtype=torch.int32)
    codes, scales, ring = poisoned_kivi_keys(b, h, 16, 8, d, block, F32)
    # The op layer.
    with pytest.raises(ValueError, match=r"scales must be float16 \[B, H, L / block, D, 2\]"):
        sk.ops.kv_append_key_blocks(x, codes, scales[:, :, :2], ring, st, block)
    with pytest.raises(ValueError, match="multiple of block=4"):
        sk.ops.kv_append_key_blocks(x, codes[:, :, :10], scales[:, :, :2], ring, st, block)
    with pytest.raises(ValueError, match="ring must hold a positive multiple"):
        sk.ops.kv_append_key_blocks(x, codes, scales, ring[:, :, :2], st, block)

    # The C++ entry point itself.
    good = key_blocks_args(x, codes, scales, ring, st, block, threads=1)

    neg = torch.tensor([-1], dtype=torch.int32)
    assert_rejects(  # the valid call works; each change is refused
        _C.kv_append_key_blocks,
        good,
        [
            (dict(L=10), "L = 10 must be a positive multiple of block = 4"),
            (dict(W=2), "ring must hold a positive multiple of block = 4"),
            (dict(W=6), "W = 6"),
            (dict(block=0), "block must be >= 1"),
            # a block's [D, 2] pairs need 16 float16
            (dict(scales_strides=[0, 0, 8]), "scales rows overlap"),
            (dict(start_ptr=neg.data_ptr()), r"start\[0\] = -1 is negative"),
        ],
    )

"""Tests for ``sentinel_kernels._C.kv_append`` and ``_C.decode_attention_kv``.

Append: codes and scales must equal ``reference.kv_cache.kv_append`` bit for bit, and
every byte the append does not own (unwritten slots, the rest of a larger buffer the
cache is a view of) must keep its poison. Decode: checked against the fp64 evaluation of
``reference.kv_cache.decode_attention_kv`` on the same codes, scales and rings by
norm-wise relative error (``tests/helpers.py`` tolerances: fp32 1e-5, fp16/bf16 4 unit
roundoffs for the one rounding of the output); pruned heads and rows with no visible key
must be exact zeros; outputs are NaN-prefilled, and every slot no query may read
(unwritten, overwritten by the ring, masked by the key mask) holds NaN so that a stray
read fails the test. Every SIMD level the CPU supports is forced in turn.
"""

from __future__ import annotations

import math

import pytest
from helpers import REL_TOL, rel_error

torch = pytest.importorskip("torch")
_C = pytest.importorskip("sentinel_kernels._C")
if not hasattr(_C, "decode_attention_kv"):
    pytest.skip(
        "sentinel_kernels._C was built without the KV-cache kernels", allow_module_level=True
    )
from sentinel_kernels.reference import kv_cache as ref  # noqa: E402

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# avx512_vnni runs the same kernels as avx512.
LEVELS = [lv for lv in _C.supported_simd_levels() if lv != "avx512_vnni"]
FORMATS = ["dense", "int8", "int4"]


@pytest.fixture(params=LEVELS)
def level(request):
    """Force one SIMD level for the test, restore the previous one afterwards."""
    old = _C.simd_level()
    _C.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        _C.set_simd_level(old)


def _strides3(t: torch.Tensor | None) -> list[int]:
    return list(t.stride()[:3]) if t is not None else [0, 0, 0]


def _groups(scales: torch.Tensor | None, fmt: str) -> int:
    if scales is None:
        return 1
    return scales.shape[-1] if fmt == "int8" else scales.shape[-2]


def append_native(x, cache, start, fmt, scales, wrap, threads=2):
    """``_C.kv_append`` on tensors (any strides); mutates ``cache`` / ``scales``."""
    b, h, s, d = x.shape
    cache_dtype = DTYPES[cache.dtype] if fmt == "dense" else ""
    _C.kv_append(
        x.data_ptr(),
        DTYPES[x.dtype],
        cache.data_ptr(),
        scales.data_ptr() if scales is not None else 0,
        fmt,
        b,
        h,
        s,
        d,
        cache.shape[2],
        _groups(scales, fmt),
        list(x.stride()),
        _strides3(cache),
        _strides3(scales),
        start.data_ptr(),
        wrap,
        threads,
        cache_dtype,
    )


def decode_native(
    q,
    k,
    v,
    lens,
    fmt,
    *,
    k_scale=None,
    v_scale=None,
    k_recent=None,
    v_recent=None,
    head_active=None,
    key_mask=None,
    scale=None,
    window=0,
    wrap=False,
    threads=2,
    out=None,
):
    """``_C.decode_attention_kv`` on tensors; returns ``out`` (NaN-prefilled by default)."""
    b, hq, sq, d = q.shape
    if out is None:
        out = torch.full_like(q, float("nan"))
    w = k_recent.shape[2] if k_recent is not None else 0
    _C.decode_attention_kv(
        q.data_ptr(),
        out.data_ptr(),
        DTYPES[q.dtype],
        fmt,
        k.data_ptr(),
        v.data_ptr(),
        k_scale.data_ptr() if k_scale is not None else 0,
        v_scale.data_ptr() if v_scale is not None else 0,
        k_recent.data_ptr() if k_recent is not None else 0,
        v_recent.data_ptr() if v_recent is not None else 0,
        b,
        hq,
        k.shape[1],
        sq,
        d,
        k.shape[2],
        w,
        _groups(k_scale, fmt),
        list(q.stride()),
        list(out.stride()),
        _strides3(k),
        _strides3(v),
        _strides3(k_scale),
        _strides3(v_scale),
        _strides3(k_recent),
        _strides3(v_recent),
        1.0 / math.sqrt(d) if scale is None else scale,
        window,
        key_mask.data_ptr() if key_mask is not None else 0,
        lens.data_ptr(),
        head_active.data_ptr() if head_active is not None else 0,
        wrap,
        0,
        threads,
    )
    return out


def _rand(shape, dtype, gen, spread=1.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mag = torch.exp(spread * torch.randn(shape[:-1] + (1,), generator=gen, dtype=torch.float64))
    return (x * mag).to(dtype)


def _poisoned_store(b, h, cap, d, fmt, groups, dtype, gen):
    """Random bytes everywhere (codes, scales: any bit pattern, NaN included)."""
    if fmt == "dense":
        return _rand((b, h, cap, d), dtype, gen), None
    width = ref.kv_code_width(d, fmt)
    raw = torch.randint(0, 256, (b, h, cap, width), generator=gen, dtype=torch.int32)
    codes = raw.to(torch.uint8)
    if fmt == "int8":
        codes = codes.view(torch.int8)
    shape = ref.kv_scale_shape((b, h, cap), groups, fmt)
    bits = torch.randint(-(2**15), 2**15, shape, generator=gen, dtype=torch.int32)
    return codes, bits.to(torch.int16).view(torch.float16)


def _bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous().view(torch.uint8)


# --------------------------------------------------------------------------------------
# kv_append
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("d", [1, 7, 64, 128])
def test_append_bit_exact(fmt, dtype, d, level):
    seed = 100 * FORMATS.index(fmt) + 10 * list(DTYPES).index(dtype) + d
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
                xs = _rand(
                    (b, s, h, 2 * d), dtype, gen, spread=3.0 if dtype != torch.float16 else 1.0
                )
                x = xs.permute(0, 2, 1, 3)[..., ::2] if s % 2 else xs.permute(0, 2, 1, 3)[..., :d]
                # The cache is a view into a larger poisoned buffer (slots 2 .. 2 + cap).
                big, big_sc = _poisoned_store(b, h + 1, cap + 3, d, fmt, groups, dtype, gen)
                cache = big[:, 1:, 2 : 2 + cap]
                scales = big_sc[:, 1:, 2 : 2 + cap] if big_sc is not None else None
                want, want_sc = big.clone(), (big_sc.clone() if big_sc is not None else None)
                ref.kv_append(
                    x,
                    want[:, 1:, 2 : 2 + cap],
                    start,
                    fmt,
                    want_sc[:, 1:, 2 : 2 + cap] if want_sc is not None else None,
                    wrap,
                )
                append_native(x, cache, start, fmt, scales, wrap)
                what = f"{fmt} {dtype} D={d} G={groups} wrap={wrap} S={s}"
                assert torch.equal(_bytes(big), _bytes(want)), f"codes differ: {what}"
                if big_sc is not None:
                    assert torch.equal(_bytes(big_sc), _bytes(want_sc)), f"scales differ: {what}"


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
    x = torch.cat([x, _rand((1, len(rows), 1, d), torch.float32, gen)], dim=2)
    for groups in (1, 2, 4):
        cache, scales = _poisoned_store(1, len(rows), 4, d, fmt, groups, torch.float32, gen)
        want, want_sc = cache.clone(), scales.clone()
        start = torch.tensor([1], dtype=torch.int32)
        ref.kv_append(x, want, start, fmt, want_sc)
        append_native(x, cache, start, fmt, scales, False)
        assert torch.equal(_bytes(cache), _bytes(want))
        assert torch.equal(_bytes(scales), _bytes(want_sc))


def test_append_dense_converts_to_cache_dtype():
    gen = torch.Generator().manual_seed(3)
    x = _rand((2, 2, 3, 9), torch.float32, gen)
    cache = torch.full((2, 2, 6, 9), float("nan"), dtype=torch.bfloat16)
    want = cache.clone()
    start = torch.tensor([1, 3], dtype=torch.int32)
    ref.kv_append(x, want, start, "dense")
    append_native(x, cache, start, "dense", None, False)
    assert torch.equal(_bytes(cache), _bytes(want))


# --------------------------------------------------------------------------------------
# decode_attention_kv
# --------------------------------------------------------------------------------------


def _build_store(fmt, b, hkv, cap, d, groups, dtype, gen):
    """A cache holding quantized random vectors in every slot (later poisoned)."""
    if fmt == "dense":
        return _rand((b, hkv, cap, d), dtype, gen), None
    codes, scales = ref.quantize_kv(_rand((b, hkv, cap, d), torch.float32, gen), fmt, groups)
    return codes, scales


def _poison_unread(fmt, store, scales, ring, lens, cap, w, wrap, key_mask):
    """NaN into every cache slot / ring slot no query may read (dense: the vectors; int8 /
    int4: the scales). Key-masked slots are hidden too."""
    for bi, n in enumerate(lens):
        rec_lo = n - w if w else n
        lo, hi = (max(0, n - cap), n) if wrap else (0, min(n, cap))
        read_slots, read_ring = set(), set()
        for j in range(lo, hi):
            slot = j % cap if wrap else j
            if key_mask is not None and key_mask[bi, slot] == 0:
                continue
            if j >= rec_lo:
                read_ring.add(j % w)
            else:
                read_slots.add(slot)
        for slot in range(cap):
            if slot not in read_slots:
                if fmt == "dense":
                    store[bi, :, slot] = float("nan")
                else:
                    scales[bi, :, slot] = float("nan")
        if ring is not None:
            for slot in range(w):
                if slot not in read_ring:
                    ring[bi, :, slot] = float("nan")


# (B, Hq, Hkv, Sq, D, L, W, groups, wrap, lens, window, head_mask, key_mask, dtype)
DECODE_CASES = [
    (2, 3, 3, 1, 64, 40, 0, 1, False, [40, 17], 0, None, False, torch.float32),
    (3, 9, 3, 5, 7, 50, 0, 2, False, [50, 3, 0], 0, None, False, torch.float16),
    (
        2,
        8,
        2,
        33,
        128,
        64,
        0,
        2,
        False,
        [64, 40],
        9,
        [[1, 0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]],
        True,
        torch.bfloat16,
    ),
    (3, 6, 2, 5, 16, 30, 8, 1, False, [30, 5, 25], 0, None, False, torch.float32),
    (4, 4, 4, 5, 32, 16, 0, 2, True, [50, 16, 7, 0], 0, [1, 0, 1, 1], True, torch.float16),
    (2, 6, 2, 1, 64, 20, 6, 2, True, [77, 3], 12, None, True, torch.float32),
    (2, 3, 1, 5, 24, 20, 8, 1, False, [25, 20], 0, None, False, torch.bfloat16),
    (1, 3, 1, 5, 8, 10, 0, 1, False, [2], 0, None, False, torch.float32),  # Sq > len
    (2, 2, 1, 3, 1, 9, 3, 1, True, [30, 9], 0, None, True, torch.float32),  # D = 1
    (2, 4, 2, 2, 48, 33, 0, 2, False, [33, 20], 0, None, True, torch.float32),  # g = 24
    (1, 2, 1, 3, 100, 10, 16, 1, True, [40], 5, None, False, torch.bfloat16),  # W > L
    (1, 2, 2, 1, 256, 20, 0, 4, False, [20], 0, None, False, torch.float16),  # D = 256
    (1, 9, 3, 1, 64, 1100, 0, 1, False, [1037], 0, None, False, torch.float32),  # split
    (1, 9, 3, 4, 64, 1024, 32, 2, True, [2500], 700, None, True, torch.float16),
]


def _decode_case(case, fmt, gen, threads=2):
    (b, hq, hkv, sq, d, cap, w, groups, wrap, lens, window, head_mask, use_km, dtype) = case
    groups = min(groups, d)
    k, ks = _build_store(fmt, b, hkv, cap, d, groups, dtype, gen)
    v, vs = _build_store(fmt, b, hkv, cap, d, groups, dtype, gen)
    kr = vr = None
    if w:
        kr = _rand((b, hkv, w, d), dtype, gen)
        vr = _rand((b, hkv, w, d), dtype, gen)
    key_mask = None
    if use_km:
        key_mask = (torch.rand((b, cap), generator=gen) > 0.25).to(torch.int8)
        if b > 1:
            key_mask[1] = 0  # a row that sees nothing
    _poison_unread(fmt, k, ks, kr, lens, cap, w, wrap, key_mask)
    _poison_unread(fmt, v, vs, vr, lens, cap, w, wrap, key_mask)
    # q as a transposed view [B, Sq, Hq, D] -> [B, Hq, Sq, D]; out likewise.
    q = _rand((b, sq, hq, d), dtype, gen).permute(0, 2, 1, 3)
    out = torch.full((b, sq, hq, d), float("nan"), dtype=dtype).permute(0, 2, 1, 3)
    hm = None
    if head_mask is not None:
        hm = torch.tensor(head_mask, dtype=torch.bool).expand(b, hq)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    scale = 0.7 / math.sqrt(d)
    decode_native(
        q,
        k,
        v,
        lens_t,
        fmt,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr,
        v_recent=vr,
        head_active=hm.to(torch.int8).contiguous() if hm is not None else None,
        key_mask=key_mask,
        scale=scale,
        window=window,
        wrap=wrap,
        threads=threads,
        out=out,
    )
    want = ref.decode_attention_kv(
        q.double(),
        k,
        v,
        lens_t,
        head_mask=hm,
        kv_format=fmt,
        attn_mask=key_mask,
        scale=scale,
        window=window,
        k_scale=ks,
        v_scale=vs,
        k_recent=kr,
        v_recent=vr,
        wrap=wrap,
    )
    return out, want, dtype


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_matches_reference(fmt, case, level):
    gen = torch.Generator().manual_seed(1000 + case)
    out, want, dtype = _decode_case(DECODE_CASES[case], fmt, gen)
    err = rel_error(out, want)
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]:.3e}"
    zero = want == 0
    assert torch.all(out[zero] == 0), "pruned heads / rows with no visible key must be 0"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_threads_agree(fmt):
    """1 thread (no split) vs 2 threads (split keys + log-sum-exp merge)."""
    case = DECODE_CASES[-2]
    outs = []
    for threads in (1, 2):
        gen = torch.Generator().manual_seed(5)
        out, want, dtype = _decode_case(case, fmt, gen, threads=threads)
        assert rel_error(out, want) <= REL_TOL[dtype]
        outs.append(out)
    assert rel_error(outs[0], outs[1]) <= 1e-6


def test_ops_native_backend_roundtrip():
    """sk.ops.kv_append + sk.ops.decode_attention on the native backend vs the reference."""
    import sentinel_kernels as sk

    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, cap, w, groups = 2, 6, 2, 32, 24, 4, 2
    start = torch.tensor([0, 5], dtype=torch.int32)
    stores = {}
    for name in ("k", "v"):
        codes, scales = _poisoned_store(b, hkv, cap, d, "int4", groups, torch.float32, gen)
        want, want_sc = codes.clone(), scales.clone()
        x = _rand((b, hkv, 30, d), torch.float32, gen)
        ref.kv_append(x, want, start, "int4", want_sc, wrap=True)
        with sk.use_backend("native"):
            sk.ops.kv_append(x, codes, start, "int4", scales, wrap=True)
        assert torch.equal(_bytes(codes), _bytes(want))
        assert torch.equal(_bytes(scales), _bytes(want_sc))
        stores[name] = (codes, scales)
    lens = torch.tensor([30, 35], dtype=torch.int32)
    kr = _rand((b, hkv, w, d), torch.float32, gen)
    vr = _rand((b, hkv, w, d), torch.float32, gen)
    q = _rand((b, hq, 3, d), torch.float32, gen)
    kw = dict(
        kv_format="int4",
        k_scale=stores["k"][1],
        v_scale=stores["v"][1],
        k_recent=kr,
        v_recent=vr,
        wrap=True,
    )
    with sk.use_backend("native"):
        got = sk.ops.decode_attention(q, stores["k"][0], stores["v"][0], lens, **kw)
    expect = ref.decode_attention_kv(q.double(), stores["k"][0], stores["v"][0], lens, **kw)
    assert rel_error(got, expect) <= REL_TOL[torch.float32]


# --------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------


def _decode_kwargs():
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 1, 4, 8)
    return dict(q=q, k=k, v=k.clone(), lens=torch.tensor([4], dtype=torch.int32))


def _raw_decode(**over):
    """_C.decode_attention_kv with valid arguments, some replaced by `over`."""
    t = _decode_kwargs()
    q, k, v, lens = t["q"], t["k"], t["v"], t["lens"]
    out = torch.empty_like(q)
    args = dict(
        q_ptr=q.data_ptr(),
        out_ptr=out.data_ptr(),
        dtype="float32",
        kv_format="dense",
        k_ptr=k.data_ptr(),
        v_ptr=v.data_ptr(),
        k_scale_ptr=0,
        v_scale_ptr=0,
        k_recent_ptr=0,
        v_recent_ptr=0,
        B=1,
        Hq=2,
        Hkv=1,
        Sq=1,
        D=8,
        L=4,
        W=0,
        n_groups=1,
        q_strides=list(q.stride()),
        out_strides=list(out.stride()),
        k_strides=list(k.stride()[:3]),
        v_strides=list(v.stride()[:3]),
        ks_strides=[0, 0, 0],
        vs_strides=[0, 0, 0],
        kr_strides=[0, 0, 0],
        vr_strides=[0, 0, 0],
        scale=0.3,
        window=0,
        key_mask_ptr=0,
        cache_lens_ptr=lens.data_ptr(),
        head_active_ptr=0,
        wrap=False,
        key_block=0,
        num_threads=1,
    )
    args.update(over)
    _C.decode_attention_kv(**args)
    return out


def test_decode_arg_checks():
    _raw_decode()  # valid
    bad = [
        (dict(kv_format="int3"), "kv_format"),
        (dict(dtype="float64"), "float64"),
        (dict(D=0), "D must be >= 1"),
        (dict(D=300), "D must be <= 256"),
        (dict(Hq=3, Hkv=2), "multiple of Hkv"),
        (dict(Hkv=0), "Hkv must be >= 1"),
        (dict(L=0), "L must be >= 1"),
        (dict(W=-1), "W must be >= 0"),
        (dict(q_strides=[1, 2, 3]), "q_strides must have 4 entries"),
        (dict(k_strides=[32, 8, -8]), "k_strides must be >= 0"),
        (dict(out_strides=[16, 1, 8, 1]), "out elements overlap"),
        (dict(window=-2), "window must be >= 0"),
        (dict(scale=float("inf")), "scale must be finite"),
        (dict(num_threads=0), "num_threads must be >= 1"),
        (dict(q_ptr=0), "q_ptr is a null pointer"),
        (dict(cache_lens_ptr=0), "cache_lens_ptr is a null pointer"),
        (dict(kv_format="int8", n_groups=1), "k_scale_ptr is a null pointer"),
        (dict(kv_format="int8", n_groups=4, D=6), "cannot be cut"),
        (dict(W=2), "k_recent_ptr is a null pointer"),
    ]
    for over, msg in bad:
        with pytest.raises(ValueError, match=msg):
            _raw_decode(**over)
    neg = torch.tensor([-1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_lens\[0\] = -1"):
        _raw_decode(cache_lens_ptr=neg.data_ptr())


def test_append_arg_checks():
    x = torch.randn(1, 2, 3, 6)
    cache = torch.zeros(1, 2, 5, 6, dtype=torch.int8)
    scales = torch.zeros(1, 2, 5, 2, dtype=torch.float16)
    start = torch.tensor([0], dtype=torch.int32)

    def call(**over):
        args = dict(
            x_ptr=x.data_ptr(),
            x_dtype="float32",
            cache_ptr=cache.data_ptr(),
            scales_ptr=scales.data_ptr(),
            kv_format="int8",
            B=1,
            H=2,
            S=3,
            D=6,
            L=5,
            n_groups=2,
            x_strides=list(x.stride()),
            cache_strides=list(cache.stride()[:3]),
            scale_strides=list(scales.stride()[:3]),
            start_ptr=start.data_ptr(),
            wrap=False,
            num_threads=1,
        )
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

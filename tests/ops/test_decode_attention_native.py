"""The C++ decode attention (``_C.decode_attention_kv``) over every cache format, per SIMD level.

Checked against ``reference.decode_attention`` evaluated in fp64 on the same codes,
scales and rings by norm-wise relative error (``helpers.REL_TOL``: fp32 1e-5, fp16/bf16 4
unit roundoffs for the one rounding of the output; KIVI keys: ``helpers.attention_tol``);
pruned heads and rows with no visible key must be exact zeros; outputs are NaN-prefilled,
and every slot no query may read (unwritten, overwritten by the ring, masked by the key
mask) holds NaN so that a stray read fails the test. The entry point is called on raw
pointers as the op layer calls it, and through ``sk.ops`` on the native backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPE_NAMES,
    REL_TOL,
    assert_attention_close,
    assert_each_rejected,
    data_ptr,
    decode_oracle,
    poisoned_kivi_keys,
    randn,
    random_cache,
    rel_error,
    same_bits,
    strides3,
)

_C = pytest.importorskip("sentinel_kernels._C")
import sentinel_kernels as sk  # noqa: E402
from sentinel_kernels.reference import kv_formats  # noqa: E402
from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append  # noqa: E402
from sentinel_kernels.reference.kv_append import (  # noqa: E402
    kv_append_key_blocks as ref_key_blocks,
)
from sentinel_kernels.reference.kv_formats import KV_FORMATS  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def native_args(
    q,
    k,
    v,
    lens,
    out,
    *,
    kv_format="dense",
    k_scale=None,
    v_scale=None,
    k_recent=None,
    v_recent=None,
    head_active=None,
    attn_mask=None,
    scale=None,
    window=0,
    wrap=False,
    key_block=0,
    threads=2,
) -> dict:
    """The keyword arguments of ``_C.decode_attention_kv`` for tensors of any strides and
    the op's keywords (``head_active``: int8 flags ``[B * Hq]``), as the op layer passes them
    (value groups: ``v_scale``'s)."""
    b, hq, sq, d = q.shape
    return dict(
        q_ptr=q.data_ptr(),
        out_ptr=out.data_ptr(),
        dtype=DTYPE_NAMES[q.dtype],
        kv_format=kv_format,
        k_ptr=k.data_ptr(),
        v_ptr=v.data_ptr(),
        k_scale_ptr=data_ptr(k_scale),
        v_scale_ptr=data_ptr(v_scale),
        k_recent_ptr=data_ptr(k_recent),
        v_recent_ptr=data_ptr(v_recent),
        B=b,
        Hq=hq,
        Hkv=k.shape[1],
        Sq=sq,
        D=d,
        L=k.shape[2],
        W=k_recent.shape[2] if k_recent is not None else 0,
        n_groups=v_scale.shape[3] if v_scale is not None else 1,
        q_strides=list(q.stride()),
        out_strides=list(out.stride()),
        k_strides=strides3(k),
        v_strides=strides3(v),
        ks_strides=strides3(k_scale),
        vs_strides=strides3(v_scale),
        kr_strides=strides3(k_recent),
        vr_strides=strides3(v_recent),
        scale=1.0 / math.sqrt(d) if scale is None else scale,
        window=window,
        key_mask_ptr=data_ptr(attn_mask),
        cache_lens_ptr=lens.data_ptr(),
        head_active_ptr=data_ptr(head_active),
        wrap=wrap,
        key_block=key_block,
        num_threads=threads,
    )


def _build_store(fmt, b, hkv, cap, d, groups, dtype, gen):
    """A cache holding quantized random vectors in every slot (later poisoned)."""
    if fmt == "dense":
        return randn((b, hkv, cap, d), dtype, "cpu", generator=gen), None
    codes, scales = kv_formats.quantize_kv(
        randn((b, hkv, cap, d), torch.float32, "cpu", generator=gen), fmt, groups
    )
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
        kr = randn((b, hkv, w, d), dtype, "cpu", generator=gen)
        vr = randn((b, hkv, w, d), dtype, "cpu", generator=gen)
    key_mask = None
    if use_km:
        key_mask = (torch.rand((b, cap), generator=gen) > 0.25).to(torch.int8)
        if b > 1:
            key_mask[1] = 0  # a row that sees nothing
    _poison_unread(fmt, k, ks, kr, lens, cap, w, wrap, key_mask)
    _poison_unread(fmt, v, vs, vr, lens, cap, w, wrap, key_mask)
    # q as a transposed view [B, Sq, Hq, D] -> [B, Hq, Sq, D]; out likewise.
    q = randn((b, sq, hq, d), dtype, "cpu", generator=gen).permute(0, 2, 1, 3)
    out = torch.full((b, sq, hq, d), float("nan"), dtype=dtype).permute(0, 2, 1, 3)
    hm = None
    if head_mask is not None:
        hm = torch.tensor(head_mask, dtype=torch.bool).expand(b, hq)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kw = dict(kv_format=fmt, attn_mask=key_mask, scale=0.7 / math.sqrt(d), window=window)
    kw.update(k_scale=ks, v_scale=vs, k_recent=kr, v_recent=vr, wrap=wrap)
    head_active = hm.to(torch.int8).contiguous() if hm is not None else None
    _C.decode_attention_kv(
        **native_args(q, k, v, lens_t, out, head_active=head_active, threads=threads, **kw)
    )
    want = decode_oracle(q, k, v, lens_t, head_mask=hm, **kw)
    return out, want, dtype


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_matches_reference(fmt, case, float_simd_level):
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
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, cap, w, groups = 2, 6, 2, 32, 24, 4, 2
    start = torch.tensor([0, 5], dtype=torch.int32)
    stores = {}
    for name in ("k", "v"):
        codes, scales = random_cache(b, hkv, cap, d, "int4", groups, torch.float32, gen)
        want, want_sc = codes.clone(), scales.clone()
        x = randn((b, hkv, 30, d), torch.float32, "cpu", generator=gen)
        ref_kv_append(x, want, start, "int4", want_sc, wrap=True)
        with sk.use_backend("native"):
            sk.ops.kv_append(x, codes, start, "int4", scales, wrap=True)
        assert same_bits(codes, want)
        assert same_bits(scales, want_sc)
        stores[name] = (codes, scales)
    lens = torch.tensor([30, 35], dtype=torch.int32)
    kr = randn((b, hkv, w, d), torch.float32, "cpu", generator=gen)
    vr = randn((b, hkv, w, d), torch.float32, "cpu", generator=gen)
    q = randn((b, hq, 3, d), torch.float32, "cpu", generator=gen)
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
    expect = decode_oracle(q, stores["k"][0], stores["v"][0], lens, **kw)
    assert rel_error(got, expect) <= REL_TOL[torch.float32]


def _raw_decode(**over):
    """_C.decode_attention_kv with valid arguments (a dense cache), some replaced by `over`."""
    # Kept alive until the call: the arguments are raw pointers.
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    lens, out = torch.tensor([4], dtype=torch.int32), torch.empty(1, 2, 1, 8)
    args = native_args(q, k, v, lens, out, scale=0.3, threads=1)
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
    assert_each_rejected(_raw_decode, bad)
    neg = torch.tensor([-1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cache_lens\[0\] = -1"):
        _raw_decode(cache_lens_ptr=neg.data_ptr())


# --------------------------------------------------------------------------------------
# KIVI keys
# --------------------------------------------------------------------------------------


def _kivi_cache(b, hkv, cap, w, d, block, groups, dtype, lens, seed):
    """K/V caches holding lens[b] positions, filled by the reference appends in pieces."""
    kc, ks, kr = poisoned_kivi_keys(b, hkv, cap, w, d, block, dtype)
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
            ref_key_blocks(k, kc[sl], ks[sl], kr[sl], st, block)
            ref_kv_append(v, vc[sl], st, "int4", vs[sl])
            ref_kv_append(v, vr[sl], st, "dense", None, wrap=True)
            pos += s
    return kc, ks, kr, vc, vs, vr


KIVI_DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, T, W, L, lens, value groups, window)
    (2, 4, 2, 1, 64, 8, 16, 64, [29, 45], 2, 0),
    (3, 6, 2, 4, 7, 4, 8, 40, [13, 4, 38], 1, 0),
    (1, 8, 8, 4, 127, 32, 32, 128, [100], 2, 0),
    (2, 4, 1, 1, 32, 16, 32, 64, [64, 50], 1, 20),  # a full row; a window
    (1, 2, 1, 4, 64, 32, 64, 1024, [1001], 1, 0),  # long: the key range is split
]


def _case_id(c) -> str:
    return "B{}H{}x{}Sq{}D{}T{}W{}L{}-{}-G{}-win{}".format(*c)


@pytest.mark.parametrize("case", KIVI_DECODE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_decode_kivi_matches_fp64(native, monkeypatch, case, dtype):
    _check_decode(monkeypatch, case, dtype)


@pytest.mark.parametrize("case", KIVI_DECODE_CASES[1:3], ids=_case_id)
def test_decode_kivi_every_simd_level(native, float_simd_level, monkeypatch, case):
    _check_decode(monkeypatch, case, F32)


def _check_decode(monkeypatch, case, dtype) -> None:
    monkeypatch.setenv("SENTINEL_NUM_THREADS", "2")
    b, hq, hkv, sq, d, block, w, cap, lens, groups, window = case
    kc, ks, kr, vc, vs, vr = _kivi_cache(b, hkv, cap, w, d, block, groups, dtype, lens, seed=3)
    q = randn((b, hq, sq, d), dtype, "cpu", seed=5)
    cl = torch.tensor(lens, dtype=torch.int32)
    kw = dict(kv_format="int4", window=window, k_scale=ks, v_scale=vs, key_block=block)
    out = sk.ops.decode_attention(q, kc, vc, cl, k_recent=kr, v_recent=vr, **kw)
    exp = decode_oracle(q, kc, vc, cl, k_recent=kr, v_recent=vr, **kw)
    assert_attention_close(out, exp, q)


def test_decode_kivi_masks(native, float_simd_level, monkeypatch):
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
    kw = dict(head_mask=head_mask, kv_format="int4", attn_mask=key_mask, k_scale=ks, v_scale=vs)
    kw.update(k_recent=kr, v_recent=vr, key_block=block)
    exp = decode_oracle(q, kc, vc, cl, **kw)
    for threads, splits in (("1", None), ("2", None), ("2", 3)):
        monkeypatch.setenv("SENTINEL_NUM_THREADS", threads)
        out = sk.ops.decode_attention(q, kc, vc, cl, num_splits=splits, **kw)
        assert rel_error(out, exp) <= 2e-5
        pruned = ~head_mask
        assert torch.equal(out[pruned], torch.zeros_like(out[pruned]))


def test_kivi_bad_inputs(native):
    b, h, d, block = 1, 1, 8, 4
    codes, scales, ring = poisoned_kivi_keys(b, h, 16, 8, d, block, F32)
    q = randn((1, 2, 1, d), F32, "cpu", seed=2)
    out = torch.empty_like(q)
    lens = torch.tensor([6], dtype=torch.int32)

    kivi = dict(kv_format="int4", k_scale=scales, v_scale=scales, k_recent=ring, v_recent=ring)
    good = native_args(q, codes, codes, lens, out, scale=1.0, key_block=block, threads=1, **kivi)
    # The keys' (s, m) pairs stand in for one group of value scales.
    good.update(n_groups=1, vs_strides=[0, 0, 2])

    assert_each_rejected(
        lambda **over: _C.decode_attention_kv(**{**good, **over}),
        [
            (dict(kv_format="int8"), "needs kv_format 'int4'"),
            (dict(wrap=True), "does not take a wrapping cache"),
            (dict(W=6), "W = 6"),
            (dict(W=0), "W = 0"),
            (dict(L=18), "L = 18"),
            (dict(key_block=-1), "key_block must be >= 0"),
        ],
    )
    # The op layer refuses a k_scale of the per-token shape with key_block.
    v_scale = torch.zeros(1, 1, 16, 1, 2, dtype=F16)
    with pytest.raises(ValueError, match=r"k_scale for key_block=4 must be \[B, Hkv"):
        kw = {**kivi, "k_scale": v_scale, "v_scale": v_scale}
        sk.ops.decode_attention(q, codes[..., :4], codes[..., :4], lens, key_block=block, **kw)

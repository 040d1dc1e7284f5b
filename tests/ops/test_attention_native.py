"""The C++ attention kernel (``sentinel_kernels._C.attention_fwd``), per SIMD level.

Checked against the fp64 run of ``sentinel_kernels.reference.attention`` on the same
(rounded) inputs by norm-wise relative error with the per-dtype tolerances of
``tests/helpers.py`` (fp32: 1e-5 for fp32 accumulation; fp16/bf16: 4 unit roundoffs for
the one rounding of the output). Pruned heads and rows with no visible key must be exact
zeros, and the output is prefilled with NaN so that an unwritten element fails the test.

Every SIMD level this CPU supports is forced in turn with ``set_simd_level``; shapes
cover both kernel layouts (row mode for items of <= 8 query rows, lanes mode above),
every tail (Sq, Sk, D of 1, 7, 127 ...), GQA group sizes 1 to 8, causal and not, ragged
cache_lens, key padding with fully masked rows, sliding windows, partial / empty head
masks, non-contiguous and zero-stride inputs, and the split-key (decode) path.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPE_NAMES, REL_TOL, rel_error

_C = pytest.importorskip("sentinel_kernels._C")
from sentinel_kernels.reference.attention import attention as ref_attention  # noqa: E402


def strides(t: torch.Tensor) -> list[int]:
    return list(t.stride())


def attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int = 0,
    key_mask: torch.Tensor | None = None,
    cache_lens: torch.Tensor | None = None,
    head_active: torch.Tensor | None = None,
    threads: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Calls ``_C.attention_fwd`` on 4-D tensors of any strides; returns ``out``
    (NaN-prefilled ``[B, Hq, Sq, D]`` unless given)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if out is None:
        out = torch.full((b, hq, sq, d), float("nan"), dtype=q.dtype)
    _C.attention_fwd(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        DTYPE_NAMES[q.dtype],
        b,
        hq,
        hkv,
        sq,
        sk,
        d,
        strides(q),
        strides(k),
        strides(v),
        strides(out),
        causal,
        1.0 / math.sqrt(d) if scale is None else scale,
        window,
        0 if key_mask is None else key_mask.data_ptr(),
        0 if cache_lens is None else cache_lens.data_ptr(),
        0 if head_active is None else head_active.data_ptr(),
        threads,
    )
    return out


def expected(
    q, k, v, *, causal, scale=None, window=0, key_mask=None, cache_lens=None, head_active=None
):
    b, hq = q.shape[:2]
    return ref_attention(
        q.double(),
        k.double(),
        v.double(),
        causal=causal,
        head_mask=None if head_active is None else head_active.view(b, hq),
        attn_mask=key_mask,
        scale=scale,
        window=window,
        cache_lens=cache_lens,
    )


def make_inputs(b, hq, hkv, sq, sk, d, dtype, gen, layout="contiguous"):
    """q, k, v with spread-out magnitudes; layout 'bshd' gives the [B, S, H, D] memory
    order of a projection output, 'dlast' a non-unit stride along D."""

    def rnd(shape, mag=1.0):
        return torch.randn(shape, generator=gen) * mag

    if layout == "bshd":
        q = rnd((b, sq, hq, d), 2.0).to(dtype).transpose(1, 2)
        k = rnd((b, sk, hkv, d)).to(dtype).transpose(1, 2)
        v = rnd((b, sk, hkv, d)).to(dtype).transpose(1, 2)
    elif layout == "dlast":
        q = rnd((b, hq, d, sq), 2.0).to(dtype).transpose(2, 3)
        k = rnd((b, hkv, d, sk)).to(dtype).transpose(2, 3)
        v = rnd((b, hkv, d, sk)).to(dtype).transpose(2, 3)
    else:
        q = rnd((b, hq, sq, d), 2.0).to(dtype)
        k = rnd((b, hkv, sk, d)).to(dtype)
        v = rnd((b, hkv, sk, d)).to(dtype)
    return q, k, v


def left_padding_mask(b, sk, gen, fully_masked_row=True):
    """int8 [B, Sk]: random left padding per row (the last row entirely padded when
    asked), plus a few holes."""
    km = torch.ones(b, sk, dtype=torch.int8)
    for i in range(1, b):
        km[i, : int(torch.randint(0, sk + 1, (1,), generator=gen))] = 0
    if fully_masked_row and b > 1:
        km[-1] = 0
    holes = torch.rand(b, sk, generator=gen) < 0.1
    km[holes] = 0
    return km


# (B, Hq, Hkv, Sq, Sk, D, options). Items hold up to 64 query rows (heads x positions);
# Sq * G <= 8 takes the row-mode kernels on AVX-512.
CASES = [
    (1, 1, 1, 1, 1, 1, {}),
    (2, 3, 3, 1, 7, 24, {"key_mask": True}),
    (2, 9, 3, 1, 1000, 64, {"lens": True, "heads": "partial"}),
    (1, 4, 1, 2, 1000, 128, {"window": 100}),
    (3, 8, 1, 1, 300, 96, {"lens": True, "key_mask": True, "layout": "bshd"}),
    (2, 3, 3, 7, 7, 64, {"causal": False, "layout": "dlast"}),
    (2, 8, 1, 127, 127, 64, {}),
    (1, 6, 2, 127, 300, 96, {"causal": False, "key_mask": True}),
    (2, 4, 4, 33, 80, 256, {"lens": True, "window": 17}),
    (3, 2, 1, 16, 40, 7, {"lens": True, "key_mask": True, "window": 9, "heads": "partial"}),
    (2, 12, 4, 20, 50, 32, {"heads": "partial", "layout": "bshd", "causal": False}),
    (1, 9, 3, 64, 64, 64, {"heads": "none"}),
    (2, 4, 2, 7, 1, 16, {"lens": True}),
    (1, 3, 1, 127, 127, 1, {"window": 5, "scale": 0.7}),
    (2, 80, 1, 3, 90, 24, {"heads": "partial"}),  # a group of more than 64 query heads
]


def run_case(b, hq, hkv, sq, sk, d, opts, dtype, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_inputs(b, hq, hkv, sq, sk, d, dtype, gen, opts.get("layout", "contiguous"))
    causal = opts.get("causal", True)
    key_mask = left_padding_mask(b, sk, gen) if opts.get("key_mask") else None
    cache_lens = None
    if opts.get("lens"):
        cache_lens = torch.randint(0, sk + 1, (b,), generator=gen, dtype=torch.int32)
        cache_lens[0] = sk
    head_active = None
    if opts.get("heads") == "partial":
        head_active = (torch.rand(b * hq, generator=gen) < 0.5).to(torch.int8)
        head_active[0] = 1
    elif opts.get("heads") == "none":
        head_active = torch.zeros(b * hq, dtype=torch.int8)
    kw = dict(
        causal=causal,
        scale=opts.get("scale"),
        window=opts.get("window", 0),
        key_mask=key_mask,
        cache_lens=cache_lens,
        head_active=head_active,
    )
    out = attention_native(q, k, v, threads=threads, **kw)
    ref = expected(q, k, v, **kw)
    err = rel_error(out, ref)
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]:.1e} ({dtype})"
    # Exact zeros where the reference has them: pruned heads, rows with no visible key.
    zero = ref == 0
    assert (out[zero] == 0).all(), "pruned head / fully masked row not exactly zero"
    if head_active is not None:
        assert (out.view(b, hq, sq, d)[head_active.view(b, hq) == 0] == 0).all()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(float_simd_level, case):
    b, hq, hkv, sq, sk, d, opts = CASES[case]
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        if dtype != torch.float32 and float_simd_level == "scalar" and sq * sk > 5000:
            continue  # the scalar level is slow; its conversions are the shared scalar ones
        run_case(b, hq, hkv, sq, sk, d, opts, dtype, threads=1 + (case + i) % 3, seed=case * 10 + i)


def test_split_key_range_decode(float_simd_level):
    """Few (b, KV head) items and a long key range: the key range is split across the
    threads and merged with the log-sum-exp rule."""
    for sk, lens, key_mask in [(2000, False, False), (1500, True, True)]:
        run_case(
            1,
            4,
            1,
            1,
            sk,
            64,
            {"lens": lens, "key_mask": key_mask},
            torch.float32,
            threads=2,
            seed=sk,
        )
        run_case(1, 3, 3, 3, sk, 40, {"window": 700}, torch.float32, threads=3, seed=sk + 1)


def test_zero_stride_kv_and_strided_out(float_simd_level):
    """K/V broadcast over the batch (stride 0) and an output in [B, S, H, D] order."""
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, sq, sk, d = 3, 6, 2, 9, 70, 48
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(1, hkv, sk, d, generator=gen).expand(b, -1, -1, -1)
    v = torch.randn(1, hkv, sk, d, generator=gen).expand(b, -1, -1, -1)
    out_buf = torch.full((b, sq, hq, d), float("nan"))
    out = attention_native(q, k, v, out=out_buf.transpose(1, 2))
    assert rel_error(out, expected(q, k, v, causal=True)) <= REL_TOL[torch.float32]


def test_rows_before_the_cache_and_empty_sizes():
    """cache_lens < Sq puts early queries before the first key (no visible key: zeros);
    Sk = 0 gives all zeros; Sq = 0 / B = 0 are no-ops."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_inputs(2, 2, 1, 6, 6, 16, torch.float32, gen)
    lens = torch.tensor([2, 0], dtype=torch.int32)
    out = attention_native(q, k, v, cache_lens=lens)
    ref = expected(q, k, v, causal=True, cache_lens=lens)
    assert (out[:, :, :4] == 0).all() and (out[1] == 0).all()
    assert rel_error(out, ref) <= REL_TOL[torch.float32]

    q0, k0, v0 = make_inputs(2, 2, 1, 3, 0, 16, torch.float32, gen)
    assert (attention_native(q0, k0, v0, causal=False) == 0).all()
    for shape in [(2, 2, 0, 16), (0, 2, 3, 16)]:
        qe = torch.randn(shape)
        ke = torch.randn(shape[0], 1, 5, 16)
        assert attention_native(qe, ke, ke).numel() == 0


# --------------------------------------------------------------------------- errors


def good_args() -> dict:
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    out = torch.empty(1, 4, 3, 8)
    keep = (q, k, out)  # the tensors must outlive the call
    return dict(
        q_ptr=q.data_ptr(),
        k_ptr=k.data_ptr(),
        v_ptr=k.data_ptr(),
        out_ptr=out.data_ptr(),
        dtype="float32",
        B=1,
        Hq=4,
        Hkv=2,
        Sq=3,
        Sk=5,
        D=8,
        q_strides=strides(q),
        k_strides=strides(k),
        v_strides=strides(k),
        out_strides=strides(out),
        causal=True,
        scale=0.35,
        window=0,
        key_mask_ptr=0,
        cache_lens_ptr=0,
        head_active_ptr=0,
        threads=1,
        _keep=keep,
    )


def call_with(**changes):
    args = good_args()
    args.update(changes)
    keep = args.pop("_keep")  # holds the tensors until the call returns
    _C.attention_fwd(**args)
    del keep


def test_good_args_run():
    call_with()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"B": -1}, "B must be >= 0"),
        ({"Sq": -2}, "Sq must be >= 0"),
        ({"Sk": -1}, "Sk must be >= 0"),
        ({"Hq": -4}, "Hq must be >= 0"),
        ({"Hkv": 0}, "Hkv must be >= 1"),
        ({"Hq": 3}, "multiple of Hkv"),
        ({"D": 0}, "D must be >= 1"),
        ({"D": 257}, "D must be <= 256"),
        ({"dtype": "float64"}, "unsupported dtype"),
        ({"q_ptr": 0}, "q_ptr is a null pointer"),
        ({"k_ptr": 0}, "k_ptr is a null pointer"),
        ({"v_ptr": 0}, "v_ptr is a null pointer"),
        ({"out_ptr": 0}, "out_ptr is a null pointer"),
        ({"q_strides": [96, 24, -8, 1]}, "q_strides must be >= 0"),
        ({"k_strides": [80, 40, 8, -1]}, "k_strides must be >= 0"),
        ({"out_strides": [96, 24, 8]}, "out_strides must have 4 entries"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"window": -1}, "window must be >= 0"),
        ({"scale": float("nan")}, "scale must be finite"),
    ],
)
def test_bad_arguments_raise_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        call_with(**changes)


def test_cache_lens_out_of_range():
    lens = torch.tensor([6], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside"):
        call_with(cache_lens_ptr=lens.data_ptr())

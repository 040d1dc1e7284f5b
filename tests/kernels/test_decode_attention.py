"""Triton decode attention (``kernels.decode_attention.decode_attention_fwd``) over every
cache format, against ``reference.decode_attention``.

The kernel entry point is called directly, with the exact signature the op layer uses: on
the GPU when there is one, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py switches it on). Shapes are tiny: the interpreter runs every program in
Python. The output is compared with the reference evaluated in fp64 on the *same* stored
codes and scales, so only the kernel's own rounding is measured: fp32 ~1e-5 relative (fp32
softmax and accumulation, IEEE dots), fp16 4u = 2e-3 (the kernel rounds p, or p times the
per-token value scale, to fp16 for the tensor-core dot, and the output once), bf16 (GPU
only) 4u = 1.6e-2. Outputs start NaN-poisoned, so an element the kernel forgets fails the
finiteness check.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import (
    assert_rel_close,
    decode_oracle,
    on_device,
    randn,
    require_triton_kernels,
    transposed_randn,
)

from sentinel_kernels.reference import kv_formats
from sentinel_kernels.reference.kv_formats import KV_FORMATS

DEVICE, DTYPES = require_triton_kernels()

from sentinel_kernels.kernels import decode_attention as kda  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    """A decode launch: B rows, Hkv KV heads of ``group`` query heads, Sq queries, head dim
    D, ``cap`` slots, ``lens`` positions per row; a ring of ``ring`` slots, key and head
    masks, forced splits; values scaled by ``v_mag``; ``transposed`` stores the cache as
    ``[B, L, H, ...]``."""

    b: int
    hkv: int
    group: int
    sq: int
    d: int
    cap: int
    lens: tuple[int, ...]
    n_groups: int = 1
    ring: int = 0
    wrap: bool = False
    window: int = 0
    key_mask: bool = False
    head_mask: bool = False
    num_splits: int | None = None
    v_mag: float = 1.0
    transposed: bool = False


def _cache(case: Case, fmt: str, dtype: torch.dtype, seed: int):
    """K/V stores of ``case`` in ``fmt`` (every slot holds a vector) and the rings."""
    b, hkv, cap, d = case.b, case.hkv, case.cap, case.d
    # Keys with a per-channel offset (asymmetric ranges, as real keys have).
    kf = randn((b, hkv, cap, d), torch.float32, "cpu", seed=seed + 2) + torch.linspace(-1.0, 2.0, d)
    vf = randn((b, hkv, cap, d), torch.float32, "cpu", seed=seed + 3) * case.v_mag
    if fmt == "dense":
        kc, vc, ks, vs = kf.to(dtype), vf.to(dtype), None, None
    else:
        kc, ks = kv_formats.quantize_kv(kf, fmt, case.n_groups)
        vc, vs = kv_formats.quantize_kv(vf, fmt, case.n_groups)
    if case.transposed:  # [B, L, H, ...] storage: B/H/L strides free, last dims contiguous

        def tr(t):
            return None if t is None else t.transpose(1, 2).contiguous().transpose(1, 2)

        kc, vc, ks, vs = tr(kc), tr(vc), tr(ks), tr(vs)
    kr = vr = None
    if case.ring:
        kr = randn((b, hkv, case.ring, d), dtype, "cpu", seed=seed + 4)
        vr = randn((b, hkv, case.ring, d), dtype, "cpu", seed=seed + 5) * case.v_mag
    kw = dict(kv_format=fmt, k_scale=ks, v_scale=vs, k_recent=kr, v_recent=vr, wrap=case.wrap)
    return kc, vc, kw


def _decode_case(fmt, dtype, case: Case, seed=0, tol_factor=1.0, **launch):
    """Build a cache, run the kernel into a NaN-poisoned output, compare with fp64.
    ``launch``: launch choices of the kernel (``scales_ahead``, ``group_dots``, ...)."""
    torch.manual_seed(seed)
    b, hq, sq, d = case.b, case.hkv * case.group, case.sq, case.d
    q = transposed_randn(b, hq, sq, d, dtype, DEVICE, seed=seed + 1)
    kc, vc, cache = _cache(case, fmt, dtype, seed)
    cache_lens = torch.tensor(case.lens, dtype=torch.int32)
    attn_mask = None
    if case.key_mask:
        attn_mask = torch.rand(b, case.cap, generator=torch.Generator().manual_seed(seed + 6)) > 0.3
    hmask = None
    if case.head_mask:
        hmask = torch.ones(b, hq, dtype=torch.bool)
        hmask[0, 0] = False
        hmask[-1, -case.group :] = False  # a whole KV group pruned: no K/V reads
    out = torch.full((b, hq, sq, d), float("nan"), dtype=dtype, device=DEVICE)
    opts = dict(scale=1.0 / math.sqrt(d), window=case.window)
    kda.decode_attention_fwd(
        q,
        kc.to(DEVICE),
        vc.to(DEVICE),
        out,
        cache_lens.to(DEVICE),
        key_mask=attn_mask.to(torch.int8).to(DEVICE) if attn_mask is not None else None,
        head_active=hmask.to(DEVICE).view(torch.uint8) if hmask is not None else None,
        num_splits=case.num_splits,
        head_batch_stride=hq if hmask is not None else None,
        **opts,
        **on_device(cache, DEVICE),
        **launch,
    )
    masks = dict(head_mask=hmask, attn_mask=attn_mask)
    want = decode_oracle(q, kc, vc, cache_lens, **masks, **opts, **cache)
    assert_rel_close(out, want, dtype, tol_factor)
    if hmask is not None:
        pruned = out.cpu()[~hmask]
        assert torch.equal(pruned, torch.zeros_like(pruned)), "a pruned head is not exact 0"
    for bi, n in enumerate(case.lens):
        if n == 0:
            row = out[bi].cpu()
            assert torch.equal(row, torch.zeros_like(row)), "an empty row is not exact 0"
    return out


SCENARIOS = {
    # GQA 3, one decode token, ragged lengths (one full), the split count from shapes.
    "plain": Case(2, 2, 3, 1, 64, 40, (40, 17)),
    # Recent ring, wrap (lengths 0 and > L), Sq 5, both masks, odd D, 3 forced splits.
    "ring-wrap-masks": Case(
        2, 2, 3, 5, 7, 24, (57, 0), ring=8, wrap=True, key_mask=True, head_mask=True, num_splits=3
    ),
    # GQA 1, window, wrap without ring, one split, a length below Sq's window.
    "window-wrap": Case(3, 1, 1, 5, 64, 20, (57, 3, 20), wrap=True, window=9, num_splits=1),
    # Two scale groups, ring without wrap, key mask, 3 splits.
    "groups-ring": Case(2, 1, 3, 1, 64, 48, (48, 30), 2, ring=16, key_mask=True, num_splits=3),
    # Strided [B, L, H, ...] cache and scales, D = 1, head mask, Sq 5 over short rows.
    "strided-d1": Case(2, 2, 1, 5, 1, 16, (16, 5), head_mask=True, transposed=True),
}
# fp16 with small V over a long row (one KV head, GQA 2, one decode token).
SMALL_V = Case(1, 1, 2, 1, 32, 300, (300,), v_mag=0.001)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_decode_matches_reference(fmt, dtype, scenario):
    case = SCENARIOS[scenario]
    if fmt == "dense":
        case = dataclasses.replace(case, n_groups=1)
    _decode_case(fmt, dtype, case, seed=len(scenario))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_small_value_scales_fp16(fmt, num_splits):
    """fp16 with small V over a long row: p * scale would be an fp16 subnormal (int8
    fails the tolerance, 5e-3, without the per-tile renormalisation; 2e-4 with it)."""
    case = dataclasses.replace(SMALL_V, num_splits=num_splits)
    _decode_case(fmt, torch.float16, case, seed=1)


@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_decode_ring_only_and_all_splits_empty(fmt):
    """Every visible position in the ring (len <= W), and more splits than key blocks."""
    case = Case(2, 1, 2, 2, 16, 12, (5, 1), ring=8, wrap=True, num_splits=3)
    _decode_case(fmt, torch.float32, case, seed=13)


def test_decode_dense_defaults_unchanged():
    """The pre-existing call (no KV keywords) still matches the plain reference."""
    b, hq, hkv, sq, cap, d = 2, 4, 2, 2, 33, 32
    q = transposed_randn(b, hq, sq, d, torch.float32, DEVICE, seed=21)
    k = randn((b, hkv, cap, d), torch.float32, DEVICE, seed=22)
    v = randn((b, hkv, cap, d), torch.float32, DEVICE, seed=23)
    lens = torch.tensor([33, 12], dtype=torch.int32, device=DEVICE)
    out = torch.full((b, hq, sq, d), float("nan"), device=DEVICE)
    kda.decode_attention_fwd(
        q, k, v, out, lens, scale=0.2, window=0, key_mask=None, head_active=None, num_splits=3
    )
    want = decode_oracle(q, k, v, lens, scale=0.2)
    assert_rel_close(out, want, torch.float32)


# ------------------------------------------------------------------ several scale groups
# Three ways to apply the scales of G > 1 groups (kda.group_mode): per-group dots (one
# decode token per query head, groups of >= 32 channels tiling a power-of-two D), the
# broadcast dequantization (other power-of-two layouts), and the per-element gather
# (anything else). The launch arguments group_dots / group_bcast force the lower ways on
# layouts that would take the first, so each way is checked on the same shapes.
#
# Tolerance: the dots way is held to the 4u of the one-group loop (codes are dotted
# exactly, scales applied in fp32). The two dequantizing ways round each dequantized K
# element to the model dtype before the score dot, so a score is off by up to
# u |scale q| |k|: rows with a large |q| (the test data spreads row magnitudes over
# e^+-2) reach 4u at fp16 (measured over 40 seeds: at most 0.92 x 4u, once 1.03 x 4u;
# the dots way at most 0.22 x 4u). They get 2 x 4u in 16-bit dtypes.


def _tol(mode: str, dtype: torch.dtype) -> float:
    return 2.0 if mode != "dots" and dtype != torch.float32 else 1.0


def _group_ways(mode: str) -> dict:
    """The launch choices that make the kernel take ``mode`` where the layout allows more."""
    return dict(group_dots=mode == "dots", group_bcast=mode in ("dots", "bcast"))


def test_group_mode_selection():
    """Which way each layout takes (rows: padded query rows of a program, >= 16)."""
    cases = [
        (("int4", 1, 128, 16), "one"),
        (("dense", 4, 128, 16), "one"),
        (("int4", 4, 128, 16), "dots"),
        (("int8", 2, 64, 16), "dots"),
        (("int8", 4, 128, 16), "dots"),
        (("int4", 8, 256, 16), "dots"),
        (("int4", 4, 128, 32), "bcast"),  # more than 16 query rows (Sq > 1)
        (("int8", 8, 128, 16), "bcast"),
        (("int4", 4, 64, 16), "bcast"),  # 16-channel groups
        (("int4", 32, 64, 16), "bcast"),  # 2-channel groups
        (("int8", 64, 64, 16), "gather"),  # 1-channel groups
        (("int4", 3, 96, 16), "gather"),
        (("int8", 4, 40, 16), "gather"),  # D not 2^k
        (("int8", 3, 7, 16), "gather"),
    ]
    for args, want in cases:
        assert kda.group_mode(*args) == want, (args, want)


@pytest.mark.parametrize("ring", [0, 16], ids=["noring", "ring"])
@pytest.mark.parametrize("dg", [(64, 2), (128, 4)], ids=lambda t: f"D{t[0]}G{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["dots", "bcast", "gather"])
def test_decode_grouped_ways(mode, fmt, dtype, dg, ring):
    """Each way on the default group width (32 channels): ragged rows (1, 127, one in
    between), GQA 4, with and without a recent ring, one split and three."""
    d, n_groups = dg
    assert kda.group_mode(fmt, n_groups, d, 16, **_group_ways(mode)) == mode
    case = Case(3, 1, 4, 1, d, 127, (127, 1, 50), n_groups, ring, num_splits=None if ring else 3)
    seed = d + n_groups + ring
    _decode_case(fmt, dtype, case, seed, _tol(mode, dtype), **_group_ways(mode))


@pytest.mark.parametrize("ring", [0, 16], ids=["noring", "ring"])
@pytest.mark.parametrize("dg", [(96, 3), (40, 4)], ids=lambda t: f"D{t[0]}G{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_grouped_gather_fallback(fmt, dtype, dg, ring):
    """Head dims that are not a power of two take the per-element gather by themselves."""
    d, n_groups = dg
    assert kda.group_mode(fmt, n_groups, d, 16) == "gather"
    case = Case(3, 1, 2, 1, d, 127, (127, 1, 33), n_groups, ring, num_splits=3)
    _decode_case(fmt, dtype, case, d + ring, _tol("gather", dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_grouped_many_rows(fmt, dtype):
    """Sq 5 x GQA 4 = 20 query rows: the broadcast way by itself; wrap, window, both
    masks, an empty row."""
    assert kda.group_mode(fmt, 2, 64, 32) == "bcast"
    case = Case(2, 2, 4, 5, 64, 40, (57, 0), 2, 8, True, 30, True, True, num_splits=3)
    _decode_case(fmt, dtype, case, 5, _tol("bcast", dtype))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["dots", "bcast"])
def test_decode_grouped_scales_inline(mode, fmt):
    """The group scales loaded in the tile that uses them (``scales_ahead=False``)."""
    case = Case(2, 1, 4, 1, 64, 70, (70, 23), 2, num_splits=2, transposed=True)
    _decode_case(fmt, torch.float32, case, 9, scales_ahead=False, **_group_ways(mode))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_grouped_small_value_scales_fp16(fmt, num_splits):
    """fp16 with small V, per-group dots: each group's p * scale is renormalised by the
    group's tile maximum before the fp16 dot."""
    assert kda.group_mode(fmt, 2, 64, 16) == "dots"
    case = dataclasses.replace(SMALL_V, d=64, n_groups=2, num_splits=num_splits)
    _decode_case(fmt, torch.float16, case, seed=2)


@pytest.mark.parametrize("fmt", ["dense", "int8"])
def test_split_plan_scope_changes_the_split_only(fmt, monkeypatch):
    """Under ``split_plan_scope(max_keys)`` the kernel plans its split count for
    ``min(L, max_keys)`` keys, not the capacity ``L``: one split (direct output) here
    instead of several, and the same values against fp64 even for a row longer than
    ``max_keys`` (each split count covers each row's whole key range)."""
    seen: list[int] = []
    choose = kda.choose_num_splits

    def spy(programs, seq_len, sms):
        seen.append(seq_len)
        return choose(programs, seq_len, sms)

    monkeypatch.setattr(kda, "choose_num_splits", spy)
    case = Case(2, 1, 3, 1, 16, 512, (37, 300))
    dtype = DTYPES[0]
    full = _decode_case(fmt, dtype, case, seed=11)
    with kda.split_plan_scope(60):
        short = _decode_case(fmt, dtype, case, seed=11)
    assert seen == [512, 60]
    assert choose(2, 512, kda._num_sms(full)) > 1 == choose(2, 60, kda._num_sms(full))
    assert_rel_close(short, full.double(), dtype)
    with pytest.raises(ValueError, match="positive int"):
        with kda.split_plan_scope(0):
            pass

"""Compressed KV cache, append side (Triton): quantize-on-append into int8 / int4 codes.

``kv_append_fwd`` writes new head vectors ``x [B, H, S, D]`` into a cache in one fused
pass: read ``x`` once, compute each token's group scales and codes in registers, write
codes and scales at the token's slot. The storage formats and the quantization rule are
those of :mod:`sentinel_kernels.reference.kv_formats` (the oracle:
:mod:`sentinel_kernels.reference.kv_append`), bit for bit. Per token
and per group of ``g = ceil(D / G)`` channels, in fp32::

    int8 (symmetric):   s = f16(min(max_c |x_c| / 127, 65504))
                        code_c = 0 if s == 0 else clamp(rint(x_c / s), -127, 127)
    int4 (asymmetric):  s = f16(min((max_c x_c - min_c x_c) / 15, 65504))
                        m = f16(clamp(min_c x_c, -65504, 65504))
                        code_c = 0 if s == 0 else clamp(rint((x_c - m) / s), 0, 15)
                        two codes per byte, channel c in byte c // 2 (low nibble if c even)
    dense:              a cast-copy into the cache dtype

Token ``i`` of row ``b`` lands in slot ``start[b] + i`` (slots ``>= L`` are skipped, never
written out of bounds) or, for a wrapping (ring) cache, ``(start[b] + i) % L``, where a
wrapping append of ``S > L`` tokens writes only the last ``L`` (the others would be
overwritten within the same call). The slot is in cache row ``b``, or with ``rows`` in
cache row ``rows[b]`` (rows outside the cache are skipped): one append then scatters the
tokens of prompts packed in one row, seen as one token per batch row, to their requests'
rows. ``start`` and ``rows`` are read on the device, so the launch is CUDA-graph
capturable.

The idea is per-token group quantization of the KV cache: KIVI (Liu et al., 2024,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") quantizes values per
token with a min/scale pair (the int4 format here, which this module also applies to
keys) and keeps a full-precision residual window of recent tokens (the op layer's recent
ring); the int8 format is the symmetric absmax quantizer of LLM.int8() applied per token.

Bit-exactness: every step equals one correctly rounded fp32 operation, as in the
reference. FMA contraction is off (``enable_fp_fusion=False``: ``x - m`` and the
rounding below must not fuse). The per-group divisions (``absmax / 127``, ``1 / s``) are
``tl.math.div_rn`` (Triton's ``/`` is approximate on NVIDIA GPUs); the per-element
quotient ``x / s`` is computed without a division, from ``inv = RN(1 / s)`` by
Markstein's FMA correction (see :func:`_div`), which gives the correctly rounded
quotient. rint (half to even) and the clamp are done on ``y + 1.5 * 2**23``, whose low
mantissa bits then hold the code (:func:`_code_bits`): the technique of
:mod:`kernels.quantize` without its float-to-int conversion. About 15 (int8) and 22
(int4) instructions per element on sm_90, in reach of copy bandwidth.

Program layout: one program per (batch row, head, block of ``BLOCK_S`` tokens), holding
whole head vectors, so a group's statistics are register reductions. The tile is
``[BLOCK_S, groups, group width]`` (each padded to a power of two): for the usual shapes
(``g`` a power of two) the channel offsets ``group * g + w`` are contiguous and the loads
and stores stay vectorised. Only int4 with several groups of odd width (a byte would hold
codes of two groups) takes a slower path over a flat channel tile.

``rope_kv_append_fwd`` fuses a decode step's rotary embedding of q and k, the append of
the rotated keys and of the values, and ``lens += S`` into one launch (four otherwise):
one program per batch row, which reads ``lens[b]``, rotates q into ``q_out`` with the
rotary kernel's tile (:func:`kernels.fused._rope_tile`), rotates k per channel while
loading it into the append tile above (same roundings, so bit-exact with the
composition), appends V, and stores ``lens[b] + S`` last.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sentinel_kernels.kernels._pdl import pdl_meta, pdl_release, pdl_wait
from sentinel_kernels.kernels.fused import _rope_tile

__all__ = ["kv_append_fwd", "kv_append_key_blocks_fwd", "rope_kv_append_fwd"]

_F16_MAX = 65504.0
# Elements (tokens x padded channels) one program holds: about 32 per thread at 4 warps,
# the quantize kernel's sweet spot (wide loads, no spills).
_TILE_ELEMS = 4096


@triton.jit
def _div(x, s, inv):
    # RN(x / s) without a division per element: q0 = x * inv with inv = RN(1 / s) (one
    # IEEE division per group), the residual x - q0 * s in one FMA, then one corrective
    # FMA (Markstein's division theorem; Muller et al., Handbook of Floating-Point
    # Arithmetic, ch. 4). Checked against IEEE division for every positive finite fp16
    # s with millions of x near half-integers and near binade tops (no mismatch). An
    # infinite x makes the residual NaN: keep q0 (= +-inf, which clamps like x / s).
    q0 = x * inv
    q1 = tl.fma(tl.fma(-q0, s, x), inv, q0)
    return tl.where(q1 == q1, q1, q0)


@triton.jit
def _code_bits(y, LO: tl.constexpr, HI: tl.constexpr, zero):
    # clamp(rint(y), LO, HI) (0 where `zero`) in the low bits of an int32. t = y + 1.5 *
    # 2**23 rounds y to an integer (half to even; exact for |y| < 2**22, and any larger
    # |y| clamps to LO or HI either way) held in the low mantissa bits: bits(t) =
    # 0x4B400000 + rint(y). The clamp is done on t, where it is exact, and the low byte
    # of the bits is the two's-complement code (the bias has zero low bits): no F2I
    # conversion, no subtraction.
    t = y + 12582912.0
    t = tl.minimum(tl.maximum(t, 12582912.0 + LO), 12582912.0 + HI)
    if zero is not None:
        t = tl.where(zero, 12582912.0, t)
    return t.to(tl.int32, bitcast=True)


@triton.jit
def _int8_codes(x):
    # x [BLOCK_S, BLOCK_G, BLOCK_W] fp32, one group per row of the last axis, padding
    # loaded as 0. Returns (int8 codes, scales fp16 [BLOCK_S, BLOCK_G]). No s == 0
    # select: s rounds to 0 only when max |x| / 127 <= 2**-25, and then x / 1 rounds to
    # the code 0 by itself.
    a = tl.max(tl.abs(x), axis=2)
    s16 = tl.minimum(tl.math.div_rn(a, 127.0), 65504.0).to(tl.float16)
    s = s16.to(tl.float32)
    safe = tl.where(s == 0.0, 1.0, s)
    inv = tl.math.div_rn(1.0, safe)
    y = _div(x, safe[:, :, None], inv[:, :, None])
    return _code_bits(y, -127.0, 127.0, None).to(tl.int8), s16


@triton.jit
def _int4_stats(x, valid, MASKED: tl.constexpr):
    # (s, m) fp16 [BLOCK_S, BLOCK_G] of each group (last axis of the 3-D x / valid).
    # MASKED: the tile has padding channels (which must not count).
    if MASKED:
        lo = tl.min(tl.where(valid, x, float("inf")), axis=2)
        hi = tl.max(tl.where(valid, x, float("-inf")), axis=2)
    else:
        lo = tl.min(x, axis=2)
        hi = tl.max(x, axis=2)
    s16 = tl.minimum(tl.math.div_rn(hi - lo, 15.0), 65504.0).to(tl.float16)
    m16 = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16)
    return s16, m16


@triton.jit
def _int4_codes(x, s, m, valid, MASKED: tl.constexpr):
    # int32 whose low nibble is the code, from fp32 x and broadcastable fp32 s and m.
    # s == 0 must give 0 here (x - m need not be small: m is lo rounded to fp16), and
    # padding channels too (an odd-width group shares its last byte with nothing).
    safe = tl.where(s == 0.0, 1.0, s)
    y = _div(x - m, safe, tl.math.div_rn(1.0, safe))
    if MASKED:
        zero = (s == 0.0) | (valid == 0)
    else:
        zero = s == 0.0
    return _code_bits(y, 0.0, 15.0, zero)


@triton.jit
def _pack_nibbles(bits):
    # (lo, hi) pairs from tl.split of code bits -> bytes, lo in the low nibble.
    lo, hi = tl.split(bits)
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)


@triton.jit
def load_vectors(
    rows, chan, mask, ROPE: tl.constexpr, cos_rows, sin_rows, stride_cd, stride_sd, HALF
):
    # The channels `chan` of the head vectors at `rows` (unit channel stride; pointers
    # broadcastable to chan's shape), in the input dtype. ROPE: rotated first, rounded as
    # kernels.fused._rope_tile rounds (each product and the sum to the input dtype):
    # out[c] = x[c] cos[c] - x[c + HALF] sin[c] (c < HALF), x[c] cos[c] + x[c - HALF]
    # sin[c] (c >= HALF), so any channel tile (a group of them) rotates on its own.
    x = tl.load(rows + chan, mask=mask, other=0.0)
    if ROPE:
        dtype = x.dtype
        lo = chan < HALF
        xp = tl.load(rows + tl.where(lo, chan + HALF, chan - HALF), mask=mask, other=0.0)
        c = tl.load(cos_rows + chan * stride_cd, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_rows + chan * stride_sd, mask=mask, other=0.0).to(tl.float32)
        xpf = xp.to(tl.float32)
        a = (x.to(tl.float32) * c).to(dtype).to(tl.float32)
        b = (tl.where(lo, -xpf, xpf) * s).to(dtype).to(tl.float32)
        x = (a + b).to(dtype)
    return x


@triton.jit
def append_tile(
    x_rows,
    c_rows,
    s_rows,
    ok,
    D,
    cos_rows,
    sin_rows,
    stride_cd,
    stride_sd,
    HALF,
    ROPE: tl.constexpr,
    FMT: tl.constexpr,
    NG: tl.constexpr,
    GW: tl.constexpr,
    FLAT: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Quantize BLOCK_S head vectors (row pointers x_rows, unit channel stride) and store
    # codes / scales at the row pointers c_rows / s_rows where `ok`. FMT: 0 dense, 1 int8,
    # 2 int4. NG groups of GW channels; FLAT picks the flat-channel int4 path (several
    # groups of odd width); MASKED: the [BLOCK_G, BLOCK_W] tile has padding channels
    # (rows not `ok` need no masking: their codes and scales are never stored). ROPE:
    # rotate the vectors first (:func:`load_vectors`; cos_rows / sin_rows per row).
    if FMT == 0:
        offs = tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (offs < D)[None, :]
        x = load_vectors(
            x_rows[:, None],
            offs[None, :],
            mask,
            ROPE,
            cos_rows[:, None],
            sin_rows[:, None],
            stride_cd,
            stride_sd,
            HALF,
        )
        tl.store(c_rows[:, None] + offs[None, :], x.to(c_rows.dtype.element_ty), mask=mask)
    elif not FLAT:
        # [BLOCK_S, BLOCK_G, BLOCK_W] tile: channel g * GW + w.
        g = tl.arange(0, BLOCK_G)
        w = tl.arange(0, BLOCK_W)
        chan = g[:, None] * GW + w[None, :]
        if MASKED:
            cvalid = (w < GW)[None, :] & (chan < D) & (g < NG)[:, None]
            valid = ok[:, None, None] & cvalid[None, :, :]
        else:
            valid = tl.broadcast_to(ok[:, None, None], [BLOCK_S, BLOCK_G, BLOCK_W])
        x = load_vectors(
            x_rows[:, None, None],
            chan[None, :, :],
            valid,
            ROPE,
            cos_rows[:, None, None],
            sin_rows[:, None, None],
            stride_cd,
            stride_sd,
            HALF,
        )
        x = x.to(tl.float32)
        s_ok = ok[:, None] & (g < NG)[None, :]
        if FMT == 1:
            code, s16 = _int8_codes(x)
            tl.store(c_rows[:, None, None] + chan[None, :, :], code, mask=valid)
            tl.store(s_rows[:, None] + g[None, :], s16, mask=s_ok)
        else:
            s16, m16 = _int4_stats(x, valid, MASKED)
            y = _int4_codes(
                x, s16.to(tl.float32)[:, :, None], m16.to(tl.float32)[:, :, None], valid, MASKED
            )
            # GW even (or one group): channel pairs never straddle groups, so byte
            # g * GW / 2 + w2 holds channels g * GW + 2 w2 and + 1 of this group.
            byte = _pack_nibbles(tl.reshape(y, [BLOCK_S, BLOCK_G, BLOCK_W // 2, 2]))
            w2 = tl.arange(0, BLOCK_W // 2)
            boff = g[:, None] * (GW // 2) + w2[None, :]
            if MASKED:
                bvalid = (
                    (2 * w2 < GW)[None, :]
                    & (g[:, None] * GW + 2 * w2[None, :] < D)
                    & (g < NG)[:, None]
                )
                bmask = ok[:, None, None] & bvalid[None, :, :]
            else:
                bmask = tl.broadcast_to(ok[:, None, None], [BLOCK_S, BLOCK_G, BLOCK_W // 2])
            tl.store(c_rows[:, None, None] + boff[None, :, :], byte, mask=bmask)
            sm = tl.join(s16, m16)  # [BLOCK_S, BLOCK_G, 2]: (s, m) contiguous per group
            e = tl.arange(0, 2)
            tl.store(
                s_rows[:, None, None] + (2 * g)[None, :, None] + e[None, None, :],
                sm,
                mask=s_ok[:, :, None],
            )
    else:
        # int4, NG > 1 groups of odd width: a flat channel tile, per-group statistics by
        # membership ([BLOCK_S, BLOCK_G, BLOCK_D], NG times the work; a rare shape).
        offs = tl.arange(0, BLOCK_D)
        g = tl.arange(0, BLOCK_G)
        d_ok = offs < D
        x = load_vectors(
            x_rows[:, None],
            offs[None, :],
            ok[:, None] & d_ok[None, :],
            ROPE,
            cos_rows[:, None],
            sin_rows[:, None],
            stride_cd,
            stride_sd,
            HALF,
        ).to(tl.float32)
        member = ((offs // GW)[None, :] == g[:, None]) & d_ok[None, :]  # [BLOCK_G, BLOCK_D]
        x3 = x[:, None, :]
        valid3 = ok[:, None, None] & member[None, :, :]
        s16, m16 = _int4_stats(x3, valid3, True)
        s = s16.to(tl.float32)
        m = m16.to(tl.float32)
        # Exactly one group matches each channel: the sums below copy, never round.
        sc = tl.sum(tl.where(member[None, :, :], s[:, :, None], 0.0), axis=1)
        mc = tl.sum(tl.where(member[None, :, :], m[:, :, None], 0.0), axis=1)
        y = _int4_codes(x, sc, mc, ok[:, None] & d_ok[None, :], True)
        byte = _pack_nibbles(tl.reshape(y, [BLOCK_S, BLOCK_D // 2, 2]))
        p = tl.arange(0, BLOCK_D // 2)
        tl.store(c_rows[:, None] + p[None, :], byte, mask=ok[:, None] & (2 * p < D)[None, :])
        sm = tl.join(s16, m16)
        e = tl.arange(0, 2)
        tl.store(
            s_rows[:, None, None] + (2 * g)[None, :, None] + e[None, None, :],
            sm,
            mask=(ok[:, None] & (g < NG)[None, :])[:, :, None],
        )


@triton.jit
def _kv_append_kernel(
    x_ptr,
    c_ptr,
    s_ptr,
    start_ptr,
    rows_ptr,
    Bc,
    H,
    S,
    D,
    L,
    i0,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_cb,
    stride_ch,
    stride_cl,
    stride_sb,
    stride_sh,
    stride_sl,
    FMT: tl.constexpr,
    WRAP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    NG: tl.constexpr,
    GW: tl.constexpr,
    FLAT: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (B * H, cdiv(S - i0, BLOCK_S)). Tokens before i0 are not written (a wrapping
    # append longer than the ring). The tile itself: append_tile. One wave of small
    # programs: with PDL the next kernel may launch as soon as this one starts.
    # HAS_ROWS: batch row b writes cache (and scales) row rows_ptr[b] of Bc; otherwise
    # row b, and rows_ptr / Bc are not read.
    pdl_wait(PDL)
    pdl_release(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    i = i0 + tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    pos = tl.load(start_ptr + b) + i
    ok = (i < S) & (pos >= 0)
    if WRAP:
        slot = pos % L
    else:
        ok = ok & (pos < L)  # past the end: never written
        slot = pos
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + b).to(tl.int64)
        # A vector comparison (the interpreter turns scalar & vector masks to ints). The
        # rows are device values: one outside the cache is skipped here, not reported.
        row_v = row + 0 * i
        ok = ok & (row_v >= 0) & (row_v < Bc)
        cb64 = row
    else:
        cb64 = b64
    x_rows = x_ptr + b64 * stride_xb + h64 * stride_xh + i.to(tl.int64) * stride_xs
    c_rows = c_ptr + cb64 * stride_cb + h64 * stride_ch + slot.to(tl.int64) * stride_cl
    s_rows = s_ptr + cb64 * stride_sb + h64 * stride_sh + slot.to(tl.int64) * stride_sl
    append_tile(
        x_rows,
        c_rows,
        s_rows,
        ok,
        D,
        x_rows,
        x_rows,
        0,
        0,
        0,
        False,
        FMT,
        NG,
        GW,
        FLAT,
        MASKED,
        BLOCK_S,
        BLOCK_G,
        BLOCK_W,
        BLOCK_D,
    )


def _num_warps(elements: int) -> int:
    return int(min(8, max(1, triton.next_power_of_2(max(1, elements // 1024)))))


class _Layout(NamedTuple):
    """The constexprs of :func:`append_tile` for one cache, and its tile's elements per
    token (``per_tok``)."""

    FMT: int
    NG: int
    GW: int
    FLAT: bool
    MASKED: bool
    BLOCK_G: int
    BLOCK_W: int
    BLOCK_D: int
    per_tok: int


def append_layout(kv_format: str, d: int, scales: torch.Tensor | None) -> _Layout:
    """The constexprs of :func:`append_tile` for a cache of ``kv_format`` with head dim
    ``d`` and these scales (``None`` for dense)."""
    fmt = {"dense": 0, "int8": 1, "int4": 2}[kv_format]
    if fmt == 0 or scales is None:
        # A cast-copy: one flat channel tile (the group fields are unused).
        block = triton.next_power_of_2(d)
        return _Layout(0, 1, d, False, d != 1, 1, 1, block, block)
    block_d = max(2, triton.next_power_of_2(d))
    ng = scales.shape[3]
    gw = -(-d // ng)
    flat = fmt == 2 and ng > 1 and gw % 2 == 1
    block_g = triton.next_power_of_2(ng)
    block_w = max(2, triton.next_power_of_2(gw))
    per_tok = block_g * block_d if flat else block_g * block_w
    masked = block_g != ng or block_w != gw or ng * gw != d
    return _Layout(fmt, ng, gw, flat, masked, block_g, block_w, block_d, per_tok)


def _constexprs(lay: _Layout, prefix: str = "") -> dict[str, int | bool]:
    return {prefix + k: v for k, v in lay._asdict().items() if k != "per_tok"}


def kv_append_fwd(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    *,
    kv_format: str,
    scales: torch.Tensor | None,
    wrap: bool,
    rows: torch.Tensor | None = None,
) -> None:
    """Quantize ``x [B, H, S, D]`` and write it into ``cache`` (and ``scales``) in place.

    Token ``i`` of row ``b`` goes to slot ``start[b] + i`` (skipped when ``>= L``) or, with
    ``wrap``, ``(start[b] + i) % L`` (only the last ``L`` tokens when ``S > L``), of cache
    row ``b``, or of cache row ``rows[b]`` when ``rows`` is given (skipped when outside
    ``[0, Bc)``). Formats and rule: the module docstring (bit-exact with
    ``reference.kv_append.kv_append``).

    Args:
        x: ``[B, H, S, D]`` fp16/bf16/fp32, unit last stride (other strides free).
        cache: dense ``[Bc, H, L, D]`` (any float dtype: a cast-copy), int8 ``[Bc, H, L,
            D]`` or uint8 ``[Bc, H, L, ceil(D / 2)]``; unit last stride. ``Bc = B``
            without ``rows``.
        start: int32 ``[B]`` on x's device, each row's first position.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        scales: float16 ``[Bc, H, L, G]`` (int8) or ``[Bc, H, L, G, 2]`` (int4, trailing
            ``[G, 2]`` contiguous); ``None`` for dense.
        wrap: ring cache (slot = position mod L).
        rows: int32 or int64 ``[B]`` on x's device, each batch row's cache row, or
            ``None`` (row ``b``). Where two batch rows write one (row, slot), which one
            stays is unspecified (programs run in parallel; a slot's codes and scales
            may even come from different writers).

    No host reads of device values (CUDA-graph capturable). Validated by the op layer.
    """
    bsz, heads, seq, d = x.shape
    cap = cache.shape[2]
    if x.numel() == 0 or cap == 0:
        return
    # A wrapping append longer than the ring writes only its last L tokens.
    i0 = max(0, seq - cap) if wrap else 0
    n_tok = seq - i0
    lay = append_layout(kv_format, d, scales)
    sc = scales if scales is not None else cache  # placeholder for dense, never read
    s_strides = scales.stride()[:3] if scales is not None else (0, 0, 0)
    block_s = max(1, min(triton.next_power_of_2(n_tok), _TILE_ELEMS // lay.per_tok))
    grid = (bsz * heads, triton.cdiv(n_tok, block_s))
    _kv_append_kernel[grid](
        x,
        cache,
        sc,
        start,
        # Without rows: placeholders, never read (a constant Bc adds no specialization).
        rows if rows is not None else start,
        cache.shape[0] if rows is not None else 0,
        heads,
        seq,
        d,
        cap,
        i0,
        *x.stride()[:3],
        *cache.stride()[:3],
        *s_strides,
        WRAP=bool(wrap),
        HAS_ROWS=rows is not None,
        BLOCK_S=block_s,
        **_constexprs(lay),
        **pdl_meta(x),
        num_warps=_num_warps(block_s * lay.per_tok),
        enable_fp_fusion=False,
    )


# ------------------------------------------------------- rotary embedding + K/V append


@triton.jit
def _rope_kv_append_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    kc_ptr,
    ks_ptr,
    vc_ptr,
    vs_ptr,
    lens_ptr,
    Hq,
    Hkv,
    S,
    LK,
    LV,
    sq_b,
    sq_h,
    sq_s,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    scos_b,
    scos_s,
    scos_d,
    ssin_b,
    ssin_s,
    ssin_d,
    skc_b,
    skc_h,
    skc_l,
    sks_b,
    sks_h,
    sks_l,
    svc_b,
    svc_h,
    svc_l,
    svs_b,
    svs_h,
    svs_l,
    stride_lens,
    HALF: tl.constexpr,
    WRAP: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_RQ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    K_FMT: tl.constexpr,
    K_NG: tl.constexpr,
    K_GW: tl.constexpr,
    K_FLAT: tl.constexpr,
    K_MASKED: tl.constexpr,
    K_BLOCK_G: tl.constexpr,
    K_BLOCK_W: tl.constexpr,
    K_BLOCK_D: tl.constexpr,
    V_FMT: tl.constexpr,
    V_NG: tl.constexpr,
    V_GW: tl.constexpr,
    V_FLAT: tl.constexpr,
    V_MASKED: tl.constexpr,
    V_BLOCK_G: tl.constexpr,
    V_BLOCK_W: tl.constexpr,
    V_BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (B,): program b alone reads and advances lens[b], so no other program can see
    # a half-updated length. Rows are (head, token) pairs, r = h * S + i, in tiles of
    # BLOCK_RQ (q) and BLOCK_R (k and v together) rows.
    pdl_wait(PDL)
    pdl_release(PDL)
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    start = tl.load(lens_ptr + b64 * stride_lens)
    cos_b = cos_ptr + b64 * scos_b
    sin_b = sin_ptr + b64 * ssin_b

    # q: rotated into the contiguous q_out (the rotary kernel's tile, one row per pair).
    dd = tl.arange(0, BLOCK_HALF)
    dmask = dd < HALF
    n_q = Hq * S
    for r0 in range(0, n_q, BLOCK_RQ):
        r = r0 + tl.arange(0, BLOCK_RQ)
        h = (r // S).to(tl.int64)
        src = q_ptr + b64 * sq_b + h * sq_h
        dst = qo_ptr + (b64 * Hq + h) * S * (2 * HALF)
        _rope_tile(
            src[:, None],
            dst[:, None],
            cos_b,
            sin_b,
            r % S,
            r < n_q,
            dd,
            dmask,
            sq_s,
            sq_d,
            scos_s,
            scos_d,
            ssin_s,
            ssin_d,
            S,
            HALF,
        )

    # k (rotated) and v: quantized into their caches at slot start + i (kv_append's rule).
    n_kv = Hkv * S
    for r0 in range(0, n_kv, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        h = (r // S).to(tl.int64)
        i = r % S
        i64 = i.to(tl.int64)
        pos = start + i
        ok = (r < n_kv) & (pos >= 0)
        if WRAP:
            # A wrapping append longer than the ring writes only its last L tokens.
            ok_k = ok & (i >= S - LK)
            ok_v = ok & (i >= S - LV)
            slot_k = (pos % LK).to(tl.int64)
            slot_v = (pos % LV).to(tl.int64)
        else:
            ok_k = ok & (pos < LK)  # past the end: never written
            ok_v = ok & (pos < LV)
            slot_k = pos.to(tl.int64)
            slot_v = slot_k
        append_tile(
            k_ptr + b64 * sk_b + h * sk_h + i64 * sk_s,
            kc_ptr + b64 * skc_b + h * skc_h + slot_k * skc_l,
            ks_ptr + b64 * sks_b + h * sks_h + slot_k * sks_l,
            ok_k,
            2 * HALF,
            cos_b + i64 * scos_s,
            sin_b + i64 * ssin_s,
            scos_d,
            ssin_d,
            HALF,
            True,
            K_FMT,
            K_NG,
            K_GW,
            K_FLAT,
            K_MASKED,
            BLOCK_R,
            K_BLOCK_G,
            K_BLOCK_W,
            K_BLOCK_D,
        )
        v_rows = v_ptr + b64 * sv_b + h * sv_h + i64 * sv_s
        append_tile(
            v_rows,
            vc_ptr + b64 * svc_b + h * svc_h + slot_v * svc_l,
            vs_ptr + b64 * svs_b + h * svs_h + slot_v * svs_l,
            ok_v,
            2 * HALF,
            v_rows,
            v_rows,
            0,
            0,
            HALF,
            False,
            V_FMT,
            V_NG,
            V_GW,
            V_FLAT,
            V_MASKED,
            BLOCK_R,
            V_BLOCK_G,
            V_BLOCK_W,
            V_BLOCK_D,
        )

    # Every thread has used `start` (its store addresses depend on it) before any
    # thread overwrites it.
    tl.debug_barrier()
    tl.store(lens_ptr + b64 * stride_lens, start + S)


def rope_kv_append_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lens: torch.Tensor,
    *,
    kv_format: str,
    k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None,
    wrap: bool,
) -> None:
    """Rotary embedding of ``q`` / ``k``, append of the rotated ``k`` and of ``v``, and
    ``lens += S``, in one launch of ``B`` programs.

    The composition ``q_out, k_rot = rotary_embedding(q, k, cos, sin)``;
    ``kv_append(k_rot, k_cache, lens, ...)``; ``kv_append(v, v_cache, lens, ...)``;
    ``lens += S``, bit for bit: the rotation rounds as ``kernels.fused.rotary_embedding``
    (``k_rot`` in k's dtype, then quantized or cast from it) and the appends follow
    :func:`kv_append_fwd`'s rule. Program ``b`` reads ``lens[b]`` once and stores
    ``lens[b] + S`` after its last append, so no program races another.

    Args:
        q: ``[B, Hq, S, D]``, any strides; k, v: ``[B, Hkv, S, D]``, unit last stride.
        cos, sin: ``[B', S, D]``, ``B'`` 1 (broadcast) or ``B``, any strides, q's dtype.
        q_out: contiguous ``[B, Hq, S, D]`` of q's dtype (written).
        k_cache, v_cache, k_scales, v_scales, kv_format, wrap: as :func:`kv_append_fwd`
            (each cache its own ``L``; one format).
        lens: int32 or int64 ``[B]`` (any stride), each row's first position; advanced.

    Meant for short chunks (decode): one program per row loops over the row's heads.
    No host reads of device values (CUDA-graph capturable). Validated by the op layer.
    """
    bsz, hq, seq, d = q.shape
    hkv = k.shape[1]
    if bsz == 0 or seq == 0:
        return
    half = d // 2
    lay_k = append_layout(kv_format, d, k_scales)
    lay_v = append_layout(kv_format, d, v_scales)
    block_half = triton.next_power_of_2(half)
    block_rq = max(
        1, min(triton.next_power_of_2(max(1, hq * seq)), _TILE_ELEMS // (2 * block_half))
    )
    per_tok = max(lay_k.per_tok, lay_v.per_tok)
    block_r = max(1, min(triton.next_power_of_2(max(1, hkv * seq)), _TILE_ELEMS // per_tok))
    # One program per row holds the whole step at batch 1: at least 4 warps so that its
    # loads are spread over enough threads to hide their latency.
    warps = max(4, _num_warps(max(block_rq * 2 * block_half, block_r * per_tok)))
    ks = k_scales if k_scales is not None else k_cache  # placeholders for dense, never read
    vs = v_scales if v_scales is not None else v_cache
    _rope_kv_append_kernel[(bsz,)](
        q,
        k,
        v,
        cos,
        sin,
        q_out,
        k_cache,
        ks,
        v_cache,
        vs,
        lens,
        hq,
        hkv,
        seq,
        k_cache.shape[2],
        v_cache.shape[2],
        *q.stride(),
        *k.stride()[:3],
        *v.stride()[:3],
        cos.stride(0) if cos.shape[0] > 1 else 0,
        cos.stride(1),
        cos.stride(2),
        sin.stride(0) if sin.shape[0] > 1 else 0,
        sin.stride(1),
        sin.stride(2),
        *k_cache.stride()[:3],
        *(k_scales.stride()[:3] if k_scales is not None else (0, 0, 0)),
        *v_cache.stride()[:3],
        *(v_scales.stride()[:3] if v_scales is not None else (0, 0, 0)),
        lens.stride(0),
        HALF=half,
        WRAP=bool(wrap),
        BLOCK_HALF=block_half,
        BLOCK_RQ=block_rq,
        BLOCK_R=block_r,
        **_constexprs(lay_k, "K_"),
        **_constexprs(lay_v, "V_"),
        **pdl_meta(q),
        num_warps=warps,
        enable_fp_fusion=False,
    )


# ------------------------------------------------------------------- KIVI key blocks


@triton.jit
def _kv_key_blocks_kernel(
    x_ptr,
    c_ptr,
    s_ptr,
    r_ptr,
    start_ptr,
    H,
    S,
    D,
    L,
    W,
    T,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_cb,
    stride_ch,
    stride_cl,
    stride_sb,
    stride_sh,
    stride_sk,
    stride_rb,
    stride_rh,
    stride_rw,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_release(PDL)
    # Grid (B * H, max blocks an append of S tokens can complete). Program (bh, i): block
    # floor(start / T) + i of row b, quantized per channel if this append completes it
    # (and it lies inside L); otherwise nothing is stored. Its earlier keys (positions <
    # start) come from the ring, the rest from x rounded to the ring's dtype.
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    st = tl.load(start_ptr + b)
    blk = st // T + tl.program_id(1)
    first = blk * T
    tt = tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    pos = first + tt
    # Vector comparisons throughout (the interpreter turns scalar & vector masks to ints).
    last = first + T + 0 * tt
    t_ok = (tt < T) & (last <= st + S) & (last <= L)
    d_ok = dd < D
    old = pos < st
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    r_rows = r_ptr + b64 * stride_rb + h64 * stride_rh + (pos % W).to(tl.int64) * stride_rw
    x_rows = x_ptr + b64 * stride_xb + h64 * stride_xh + (pos - st).to(tl.int64) * stride_xs
    rv = tl.load(
        r_rows[:, None] + dd[None, :], mask=(t_ok & old)[:, None] & d_ok[None, :], other=0.0
    )
    xv = tl.load(
        x_rows[:, None] + dd[None, :], mask=(t_ok & (pos >= st))[:, None] & d_ok[None, :], other=0.0
    )
    xv = xv.to(r_ptr.dtype.element_ty)
    v = tl.where(old[:, None], rv.to(tl.float32), xv.to(tl.float32))
    valid = t_ok[:, None] & d_ok[None, :]
    # int4 statistics along the tokens (axis 0) of each channel: a [BLOCK_D] (s, m).
    v3 = tl.trans(v)[:, None, :]  # [BLOCK_D, 1, BLOCK_T]: one "group" per channel
    s16, m16 = _int4_stats(v3, tl.trans(valid)[:, None, :], True)
    s16 = tl.reshape(s16, [BLOCK_D])
    m16 = tl.reshape(m16, [BLOCK_D])
    y = _int4_codes(v, s16.to(tl.float32)[None, :], m16.to(tl.float32)[None, :], valid, True)
    byte = _pack_nibbles(tl.reshape(y, [BLOCK_T, BLOCK_D // 2, 2]))
    pp = tl.arange(0, BLOCK_D // 2)
    c_rows = c_ptr + b64 * stride_cb + h64 * stride_ch + pos.to(tl.int64) * stride_cl
    tl.store(c_rows[:, None] + pp[None, :], byte, mask=t_ok[:, None] & (2 * pp < D)[None, :])
    sm = tl.join(s16, m16)  # [BLOCK_D, 2]
    e = tl.arange(0, 2)
    s_row = s_ptr + b64 * stride_sb + h64 * stride_sh + blk.to(tl.int64) * stride_sk
    done_d = (first + T + 0 * dd <= st + S) & (first + T + 0 * dd <= L)
    tl.store(s_row + 2 * dd[:, None] + e[None, :], sm, mask=(done_d & d_ok)[:, None])


def kv_append_key_blocks_fwd(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    ring: torch.Tensor,
    start: torch.Tensor,
    block: int,
) -> None:
    """KIVI keys: quantize the blocks ``x [B, H, S, D]`` completes, then write the ring.

    The rule of ``reference.kv_append.kv_append_key_blocks`` (bit-exact): each block of
    ``block`` positions completed by this append is quantized per channel (int4 scale and
    minimum over its tokens) into ``codes [B, H, L, ceil(D/2)]`` / ``scales [B, H, L /
    block, D, 2]``; then every new key goes to ``ring [B, H, W, D]`` (slot ``j % W``).
    Two launches in stream order: the block kernel reads ring slots the ring write may
    overwrite. ``start`` int32 on the device (CUDA-graph capturable); validated by the op.
    """
    bsz, heads, seq, d = x.shape
    if x.numel() == 0:
        return
    block_t = max(2, triton.next_power_of_2(block))
    block_d = max(2, triton.next_power_of_2(d))
    n_blocks = (block - 1 + seq) // block  # the most blocks S tokens can complete
    if n_blocks > 0:
        _kv_key_blocks_kernel[(bsz * heads, n_blocks)](
            x,
            codes,
            scales,
            ring,
            start,
            heads,
            seq,
            d,
            codes.shape[2],
            ring.shape[2],
            block,
            *x.stride()[:3],
            *codes.stride()[:3],
            *scales.stride()[:3],
            *ring.stride()[:3],
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            **pdl_meta(x),
            num_warps=_num_warps(block_t * block_d),
            enable_fp_fusion=False,
        )
    kv_append_fwd(x, ring, start, kv_format="dense", scales=None, wrap=True)

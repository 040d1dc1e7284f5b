"""Decode attention (Triton): flash-decoding over a (compressed) KV cache, head masking.

A few new query tokens (``Sq`` = 1 to 64: one decode step, or a speculative draft to
verify) attend to a cache of ``cache_lens[b]`` positions per batch row. This is the rule of
``sentinel_kernels.reference.attention`` with ``causal=True`` (and, for compressed or
wrapping caches, of ``sentinel_kernels.reference.decode_attention``)::

    q [B, Hq, Sq, D]   k, v [B, Hkv, L, D]   G = Hq / Hkv   (query head h reads KV head h // G)
    p_t = cache_lens[b] - Sq + t                             (position of query t)
    key j visible to query t  <=>  j < cache_lens[b] and j <= p_t
                                   and j readable: j < L, or j >= cache_lens[b] - L (wrap)
                                   and key_mask[b, slot(j)] != 0  (when a key mask is given)
                                   and p_t - j < window     (when window > 0)
    out[b, h, t] = sum_j softmax_j(scale * q_t . k_j) v_j, 0 when no key is visible,
                   0 for a head with head_active[b * Hq + h] == 0.

Position ``j`` lives in slot ``j`` (``j % L`` for a wrapping ring cache). With a recent
ring ``k_recent / v_recent [B, Hkv, W, D]`` (full precision), positions ``j >=
cache_lens[b] - W`` are read from ring slot ``j % W`` instead of the (compressed) store.

The work is a stream over K and V (one query row against L keys), so the kernel is memory
bound and is built to read the cache once, wide and coalesced:

* GQA packing: one program serves the G query heads of a KV head times the Sq query
  tokens as the ``G * Sq`` rows of one tile (padded to >= 16 rows for ``tl.dot``), so each
  K/V tile is loaded once per KV group, not once per query head.
* Split-KV, "flash-decoding" (Dao, Haziza, Massa, Sizov, 2023): ``B * Hkv`` programs alone
  cannot fill a GPU, so the key range of each row is cut into ``num_splits`` chunks on a
  second grid axis. Each program runs the FlashAttention online softmax (fp32 running
  max ``m``, sum ``l`` and unnormalised accumulator, base-2 exponentials with ``log2 e``
  folded into the scale) over its chunk in ``BLOCK_N`` steps and writes ``(m, l, acc)`` to
  an fp32 workspace; a second kernel merges the splits with the log-sum-exp rule
  ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`` (``M = max_s m_s``). With one
  split the first kernel normalises and writes ``out`` itself.
* The chunks are cut on the device from each row's own visible range
  ``[max(0, len - Sq - window + 1), len)``, so ragged ``cache_lens`` and sliding windows
  spread evenly over the splits; splits past a row's range do no loads and write
  ``m = -inf, l = 0``, which the merge weighs by zero. The split count itself is chosen
  on the host from shapes only (never from ``cache_lens``), so a launch is CUDA-graph
  capturable: no host reads of device values, the workspace comes from ``torch.empty``.
* Head mask: a program whose KV group has no active query head does no K/V loads (its
  loop is empty) and its rows merge to exact zeros; inactive heads inside an active group
  are masked to ``-inf`` scores and also come out as exact zeros.

Compressed caches (formats of ``reference.kv_formats``) are dequantized in registers, never
in memory; each format is a compile-time branch (``FMT``), so the dense path compiles to
the same code as before the formats existed (checked on its Triton IR):

* int8, one scale group (``G == 1``): K codes are dotted raw with q and the per-token scale
  multiplies the score columns, ``s_n = (q . c_n) k_s[n]``; the V scale is folded into the
  probabilities, ``acc += (p * v_s) @ c`` (with fp16, ``v_s`` is first divided by its tile
  maximum, multiplied back after the dot: ``p * v_s`` would otherwise fall into fp16
  subnormals and lose bits for small values).
* int4 (``G == 1``): byte ``c // 2`` holds channels ``2c`` and ``2c + 1``, so scores are
  ``q_even . lo + q_odd . hi`` (no interleave), and with codes centred,
  ``q . k_n = k_s[n] (q . (c_n - 8)) + (k_m[n] + 8 k_s[n]) sum(q)``; V goes into two
  accumulators (even / odd channels) plus ``sum_n p_n (v_m[n] + 8 v_s[n])``, interleaved
  once at the end. Centring keeps the two folded terms from cancelling (their rounding
  to 16 bits would otherwise be amplified by the ratio of the value range to the mean).
* Several scale groups (:func:`group_mode`): with one decode token per query head
  (16 rows), per-group dots: each group's raw codes are dotted with its slice of q and
  the partial scores scaled per key (int4: plus the channel sum of the slice times m +
  8 s), the V scales fold into each group's probabilities, one accumulator per group.
  Otherwise the tile is dequantized in registers (fp32) and dotted in the model dtype,
  the group scales loaded as a [BLOCK_N, G] tile and broadcast over the channels by a
  reshape; head dims that are not a power of two gather a scale per element.
* Codes become the dot dtype exactly: int8 -> bf16 is Triton's packed conversion,
  int8 / int4 -> fp16 add a magic exponent as an integer and subtract it as a float (I2F
  runs at a quarter of the rate HBM delivers int8 at on sm_90).
* The recent ring is a second loop over its positions with the dense tile code; wrapping
  reads slot ``j % L`` (the chunking works on positions, so splits stay balanced).

K and V tiles are loaded through :func:`_load_kv_tile` (model dtype or codes) and the
scale helpers. Any ``D <= 256`` (padded to a power of two with masked loads; int4 pads to
at least 32), fp16/bf16/fp32 (fp32 dots use IEEE precision).
Launch configurations: a heuristic per (D, rows, streamed bytes) that fits shared memory;
with ``SENTINEL_AUTOTUNE=1`` (the default) on a GPU, ``@triton.autotune`` over at most
five configs keyed on (D, rows, split count, L bucket, format, ring, scale groups and
their way). Under ``TRITON_INTERPRET=1``, one small config.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from sentinel_kernels import settings
from sentinel_kernels.kernels._autotune import autotune
from sentinel_kernels.kernels._pdl import pdl_meta, pdl_release, pdl_wait
from sentinel_kernels.kernels._tiles import strides3
from sentinel_kernels.kernels.kv_append import append_layout, append_tile, load_vectors

__all__ = [
    "decode_attention_fwd",
    "choose_num_splits",
    "force_config",
    "group_mode",
    "split_plan_scope",
]

_INTERPRET = settings.triton_interpret()
_AUTOTUNE = settings.autotune() and not _INTERPRET

_INTERPRETED = tl.constexpr(_INTERPRET)
_LOG2E = 1.4426950408889634
_FORMATS = {"dense": 0, "int8": 1, "int4": 2}
# At most this many splits (the merge reads them in chunks, so this only bounds the
# workspace and the merge's serial work).
MAX_SPLITS = 128
# A split covers at least this many keys: shorter ones pay more for their prologue
# (Q load, pipeline fill) and workspace write than they gain in parallelism.
MIN_SPLIT_KEYS = 64 if _INTERPRET else 256
# Rows (query heads x query tokens) times padded head dim one program may hold: the fp32
# accumulator is ROWS x BLOCK_D. Larger groups take several row blocks (K/V read again).
_MAX_TILE_ELEMS = 128 * 128
# Shared memory a config may use for its K/V stages and Q (bytes). H100/H200 allow 227
# KiB per block; the rest is margin for Triton's own scratch (layout conversions).
_SMEM_BUDGET = 160 * 1024


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_kv_tile(base, offs_n, offs_d, stride_n, n_ok, d_ok, EVEN_D: tl.constexpr):
    # One [BLOCK_N, BLOCK_D] tile of K or V in its storage dtype (model dtype, int8 codes
    # or int4 code bytes); rows past the chunk read as 0 (a 0 probability times a garbage
    # V row would be NaN). The row mask is uniform along D, so the loads stay vectorised
    # (16 B per thread) and coalesced. Evict-first: every cache byte is read once per
    # step; keep L2 for Q and the workspace. offs_n are slots (rows of the store).
    ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :]
    if EVEN_D:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & d_ok[None, :]
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_scale_col(base, offs_n, stride_n, n_ok, COL: tl.constexpr):
    # Per-token fp16 scale (G == 1) of each slot as fp32 [BLOCK_N]; COL 0/1 = s/m (int4).
    return tl.load(
        base + offs_n * stride_n + COL, mask=n_ok, other=0.0, eviction_policy="evict_first"
    ).to(tl.float32)


@triton.jit
def _load_scale_tile(base, offs_n, stride_n, col, n_ok, c_ok):
    # Per-channel fp16 scales (G > 1) gathered as fp32 [BLOCK_N, C] from column offsets
    # `col` (group index, or 2 * group (+1) for int4's (s, m) pairs).
    return tl.load(
        base + offs_n[:, None] * stride_n + col[None, :],
        mask=n_ok[:, None] & c_ok[None, :],
        other=0.0,
        eviction_policy="evict_first",
    ).to(tl.float32)


@triton.jit
def _codes_to(c, DTYPE: tl.constexpr, SIGNED: tl.constexpr):
    # int8 codes (SIGNED) -> DTYPE, or 4-bit codes (0..15, in a uint8) -> code - 8 in
    # DTYPE; exact. int4 codes are centred (-8..7) so that the folded sums
    # s * sum_n p_n (c_n - 8) + sum_n p_n (m_n + 8 s_n) do not cancel: with raw codes both
    # terms are about the range of the values while their sum is about their mean, and
    # the rounding of p * s to 16 bits would be amplified by that ratio.
    # bf16 int8: Triton lowers int8 -> bf16 to packed integer ops and one bf16x2
    # subtract per pair. fp16 (and bf16 nibbles): Triton's conversion is I2F (16/clk/SM
    # on sm_90, slower than HBM delivers codes), so add a magic exponent as an integer
    # and subtract it as a float (the FasterTransformer trick: the bits 0x6400 | c are
    # the fp16 1024 + c, 0x4300 | c the bf16 128 + c; exact). fp32: a plain conversion.
    if SIGNED:
        if DTYPE == tl.float16:
            out = ((c.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0).to(DTYPE)
        else:
            out = c.to(DTYPE)
    else:
        if DTYPE == tl.float16:
            out = ((c.to(tl.int16) + 0x6400).to(tl.float16, bitcast=True) - 1032.0).to(DTYPE)
        elif DTYPE == tl.bfloat16 and not _INTERPRETED:
            # (The interpreter keeps bf16 widened to fp32, so a 16-bit bitcast is wrong there.)
            out = ((c.to(tl.int16) + 0x4300).to(tl.bfloat16, bitcast=True) - 136.0).to(DTYPE)
        else:
            out = (c.to(tl.float32) - 8.0).to(DTYPE)
    return out


# _nibbles_to's PTX: per result register, the two bytes it takes (prmt: byte k of the
# input into half k, zeros above), shifted for the high nibbles, then magic | nibble
# (lop3 (a & b) | c) and the magic's value plus 8 taken off exactly (fp16: 0x6400 | c is
# 1024 + c; bf16: 0x4300 | c is 128 + c; see _codes_to).
def _nibble_asm(high: bool, dtype: str) -> str:
    shift = "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;\n" if high else ""
    if dtype == "bf16":
        magic = "0x43004300"
        sub = (
            "mov.b32 m, 0xC308C308;\nmov.b32 one, 0x3F803F80;\n"  # -136 and 1.0, bf16x2
            "fma.rn.bf16x2 $0, t0, one, m;\nfma.rn.bf16x2 $1, t1, one, m;\n"
        )
    else:
        magic = "0x64006400"
        sub = "mov.b32 m, 0x64086408;\nsub.f16x2 $0, t0, m;\nsub.f16x2 $1, t1, m;\n"  # 1032
    return (
        "{\n.reg .b32 t0, t1, m, one;\n"
        "prmt.b32 t0, $2, 0, 0x4140;\nprmt.b32 t1, $2, 0, 0x4342;\n"
        f"{shift}"
        f"lop3.b32 t0, t0, 0x000F000F, {magic}, 0xea;\n"
        f"lop3.b32 t1, t1, 0x000F000F, {magic}, 0xea;\n"
        f"{sub}}}"
    )


# Four int8 codes -> four fp16 in two registers: the sign bits flipped (c + 128, as a
# byte), each byte put under the fp16 exponent 0x64 (1024 + c + 128) and 1152 taken off.
_ASM_I8_F16 = tl.constexpr(
    "{\n.reg .b32 u, t0, t1, m;\n"
    "xor.b32 u, $2, 0x80808080;\n"
    "prmt.b32 t0, u, 0x64646464, 0x4140;\nprmt.b32 t1, u, 0x64646464, 0x4342;\n"
    "mov.b32 m, 0x64806480;\nsub.f16x2 $0, t0, m;\nsub.f16x2 $1, t1, m;\n}"
)
_ASM_BF16_LO = tl.constexpr(_nibble_asm(False, "bf16"))
_ASM_BF16_HI = tl.constexpr(_nibble_asm(True, "bf16"))
_ASM_F16_LO = tl.constexpr(_nibble_asm(False, "f16"))
_ASM_F16_HI = tl.constexpr(_nibble_asm(True, "f16"))


@triton.jit
def _nibbles_to(codes, HIGH: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    # The low (HIGH=False) or high nibble of int4 code bytes as code - 8 in DTYPE, exact:
    # _codes_to(codes & 0xF or codes >> 4). Triton lowers that per element (a byte
    # extract, a 16-bit add and a subtract each, ~5 instructions); ASM (a GPU, 16-bit
    # DTYPE) takes four bytes a call and two codes a 32-bit register, ~1.5 instructions
    # a code (the magic-number conversion of FasterTransformer and Marlin, with lop3).
    if ASM and DTYPE == tl.bfloat16:
        if HIGH:
            asm: tl.constexpr = _ASM_BF16_HI
        else:
            asm: tl.constexpr = _ASM_BF16_LO
        return tl.inline_asm_elementwise(
            asm, "=r,=r,r", [codes], dtype=tl.bfloat16, is_pure=True, pack=4
        )
    elif ASM and DTYPE == tl.float16:
        if HIGH:
            asm: tl.constexpr = _ASM_F16_HI
        else:
            asm: tl.constexpr = _ASM_F16_LO
        return tl.inline_asm_elementwise(
            asm, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4
        )
    elif HIGH:
        return _codes_to(codes >> 4, DTYPE, False)
    else:
        return _codes_to(codes & 0xF, DTYPE, False)


@triton.jit
def _int8_to_f16(c):
    # int8 codes -> fp16, exact: _codes_to(c, fp16, True), four codes a PTX call on a
    # GPU (Triton lowers the magic-number sum per element: a byte extract and an add
    # each), the plain sum in the interpreter.
    if _INTERPRETED:
        return _codes_to(c, tl.float16, True)
    else:
        return tl.inline_asm_elementwise(
            _ASM_I8_F16, "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4
        )


@triton.jit
def _int4_tile(codes, ROWS: tl.constexpr, P: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr):
    # [ROWS, P] int4 code bytes -> [ROWS, 2 P] codes - 8 in DTYPE, in channel order (byte
    # c holds channels 2c (low nibble) and 2c + 1). Bytes are taken in pairs so that
    # each _nibbles_to call sees whole bytes; the joins and the permute stay within a
    # thread's registers.
    b0, b1 = tl.split(tl.reshape(codes, [ROWS, P // 2, 2]))
    w0 = tl.join(_nibbles_to(b0, False, DTYPE, ASM), _nibbles_to(b0, True, DTYPE, ASM))
    w1 = tl.join(_nibbles_to(b1, False, DTYPE, ASM), _nibbles_to(b1, True, DTYPE, ASM))
    return tl.reshape(tl.permute(tl.join(w0, w1), (0, 1, 3, 2)), [ROWS, 2 * P])


@triton.jit
def _visible(
    offs_n,
    n_ok,
    kslot,
    pos,
    row_act,
    window,
    kmask_row,
    HAS_WINDOW: tl.constexpr,
    HAS_KMASK: tl.constexpr,
):
    # [ROWS, BLOCK_N] visibility of positions offs_n (kslot: their slots, for the key
    # mask). The masks cost a few ALU ops per score; the loop waits on HBM anyway, so
    # every tile takes them instead of splitting the loop into masked/unmasked parts.
    vis = n_ok[None, :] & (offs_n[None, :] <= pos[:, None]) & row_act[:, None]
    if HAS_WINDOW:
        vis = vis & (pos[:, None] - offs_n[None, :] < window)
    if HAS_KMASK:
        km = tl.load(kmask_row + kslot, mask=n_ok, other=0)
        vis = vis & (km != 0)[None, :]
    return vis


@triton.jit
def _softmax_step(s, vis, m_i, l_i):
    # Online softmax over one tile of (log2-scaled) scores: (p, alpha, m_new, l_new).
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf: subtract 0 instead, so
    # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _pv_scaled(p, vs, n_ok, DT: tl.constexpr, RENORM: tl.constexpr):
    # p * vs (G == 1 value scales folded into the probabilities) in the dot dtype, and
    # the factor the dot's result must be multiplied by. fp16 (RENORM): p * vs would
    # fall into fp16 subnormals for small scales (lost bits), so the tile's scales are
    # divided by their max first and the max multiplied back after the dot.
    if RENORM:
        vmax = tl.max(tl.where(n_ok, vs, 0.0), axis=0)
        inv = 1.0 / tl.where(vmax > 0.0, vmax, 1.0)
        return (p * (vs * inv)[None, :]).to(DT), vmax
    else:
        return (p * vs[None, :]).to(DT), 1.0


@triton.jit
def _one_group_scales(
    ks_base, vs_base, offs_n, hi, L, stride_ksn, stride_vsn, FMT: tl.constexpr, WRAP: tl.constexpr
):
    # Per-token (one group) scales of positions offs_n (0 past hi): K scale, K minimum,
    # V scale, V minimum; the minimums are int4's (zeros for int8).
    ok = offs_n < hi
    if WRAP:
        slot = offs_n % L
    else:
        slot = offs_n
    ks = _load_scale_col(ks_base, slot, stride_ksn, ok, 0)
    vs = _load_scale_col(vs_base, slot, stride_vsn, ok, 0)
    if FMT == 2:
        km = _load_scale_col(ks_base, slot, stride_ksn, ok, 1)
        vm = _load_scale_col(vs_base, slot, stride_vsn, ok, 1)
    else:
        km = tl.zeros_like(ks)
        vm = tl.zeros_like(vs)
    return ks, km, vs, vm


@triton.jit
def _bcast_scales(
    ks_base,
    vs_base,
    offs_n,
    hi,
    L,
    stride_ksn,
    stride_vsn,
    FMT: tl.constexpr,
    WRAP: tl.constexpr,
    NG: tl.constexpr,
):
    # Scales of NG groups of positions offs_n (0 past hi) as small fp32 [BLOCK_N, NG]
    # tiles: K scale, K offset, V scale, V offset; the offsets are int4's m + 8 s (codes
    # are centred, see _codes_to), zeros for int8.
    ok = offs_n < hi
    if WRAP:
        slot = offs_n % L
    else:
        slot = offs_n
    g = tl.arange(0, NG)
    g_ok = g < NG
    if FMT == 2:
        ks = _load_scale_tile(ks_base, slot, stride_ksn, 2 * g, ok, g_ok)
        km = _load_scale_tile(ks_base, slot, stride_ksn, 2 * g + 1, ok, g_ok) + 8.0 * ks
        vs = _load_scale_tile(vs_base, slot, stride_vsn, 2 * g, ok, g_ok)
        vm = _load_scale_tile(vs_base, slot, stride_vsn, 2 * g + 1, ok, g_ok) + 8.0 * vs
    else:
        ks = _load_scale_tile(ks_base, slot, stride_ksn, g, ok, g_ok)
        vs = _load_scale_tile(vs_base, slot, stride_vsn, g, ok, g_ok)
        km = tl.zeros_like(ks)
        vm = tl.zeros_like(vs)
    return ks, km, vs, vm


@triton.jit
def _bcast_groups(t, BN: tl.constexpr, NG: tl.constexpr, W: tl.constexpr):
    # [BN, NG] -> [BN, NG * W]: column g repeated over the W channels of group g. Triton
    # converts the small tile to the layout the broadcast needs; the broadcast itself
    # is register copies (no per-element gathers).
    return tl.reshape(tl.broadcast_to(t[:, :, None], [BN, NG, W]), [BN, NG * W])


@triton.jit
def _int4_pair_gather(
    codes, base, slot, stride_n, col_e, col_o, n_ok, e_ok, o_ok, DT: tl.constexpr
):
    # A tile of int4 code bytes dequantized to DT as (even, odd) channels with per-element
    # gathered (scale, min) pairs: the fallback for layouts the broadcast cannot take.
    s_e = _load_scale_tile(base, slot, stride_n, col_e, n_ok, e_ok)
    m_e = _load_scale_tile(base, slot, stride_n, col_e + 1, n_ok, e_ok)
    s_o = _load_scale_tile(base, slot, stride_n, col_o, n_ok, o_ok)
    m_o = _load_scale_tile(base, slot, stride_n, col_o + 1, n_ok, o_ok)
    lo = (_codes_to(codes & 0xF, tl.float32, False) * s_e + (m_e + 8.0 * s_e)).to(DT)
    hi = (_codes_to(codes >> 4, tl.float32, False) * s_o + (m_o + 8.0 * s_o)).to(DT)
    return lo, hi


@triton.jit
def _int4_pair_bcast(
    codes, gs, gm, BN: tl.constexpr, NG: tl.constexpr, W: tl.constexpr, DT: tl.constexpr
):
    # The same from [BN, NG] group scales / mins broadcast over each group's W bytes (a
    # group's 2 W channels are W bytes: even and odd channels alike).
    sb = _bcast_groups(gs, BN, NG, W)
    mb = _bcast_groups(gm, BN, NG, W)
    lo = (_codes_to(codes & 0xF, tl.float32, False) * sb + mb).to(DT)
    hi = (_codes_to(codes >> 4, tl.float32, False) * sb + mb).to(DT)
    return lo, hi


@triton.jit
def _group_scales(
    ks_base,
    vs_base,
    offs_n,
    hi,
    L,
    stride_ksn,
    stride_vsn,
    qk_scale,
    FMT: tl.constexpr,
    WRAP: tl.constexpr,
    NG: tl.constexpr,
):
    # Per-group scales of positions offs_n (0 past hi) for the per-group dots: one flat
    # tuple of fp32 [BLOCK_N] columns, group g's K factors at g (and NG + g), its V
    # scale at FMT * NG + g (and int4's V mean factor at 3 NG + g). K factors carry
    # qk_scale: int8 s; int4 s and m + 8 s (the codes are centred, see _codes_to).
    ok = offs_n < hi
    if WRAP:
        slot = offs_n % L
    else:
        slot = offs_n
    ka = ()
    kb = ()
    vs = ()
    vb = ()
    for g in tl.static_range(NG):
        if FMT == 2:
            s = _load_scale_col(ks_base, slot, stride_ksn, ok, 2 * g)
            m = _load_scale_col(ks_base, slot, stride_ksn, ok, 2 * g + 1)
            ka = ka + (s * qk_scale,)
            kb = kb + ((m + 8.0 * s) * qk_scale,)
            s = _load_scale_col(vs_base, slot, stride_vsn, ok, 2 * g)
            m = _load_scale_col(vs_base, slot, stride_vsn, ok, 2 * g + 1)
            vs = vs + (s,)
            vb = vb + (m + 8.0 * s,)
        else:
            ka = ka + (_load_scale_col(ks_base, slot, stride_ksn, ok, g) * qk_scale,)
            vs = vs + (_load_scale_col(vs_base, slot, stride_vsn, ok, g),)
    return ka + kb + vs + vb


@triton.jit
def _group_scores(
    k_base,
    slot,
    stride_kn,
    n_ok,
    q_g,
    q_go,
    q_gs,
    sc,
    FMT: tl.constexpr,
    NG: tl.constexpr,
    GW: tl.constexpr,
    DT: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # Log2-scaled scores [ROWS, BLOCK_N] as a sum of per-group partial dots over the raw
    # codes, each scaled per key: s = sum_g (q_g . c_g,n) ka_g[n] (int8), and with
    # centred int4 codes sum_g (q_g . (c_g,n - 8)) ka_g[n] + sum(q_g) kb_g[n]. The scales
    # touch ROWS x BLOCK_N scores per group instead of BLOCK_N x D codes, and the codes go
    # to the dot as in the one-group loop. int4: q_g / q_go are a group's even / odd
    # channels (byte c holds channels 2c, 2c + 1), q_gs its channel sums.
    GWC: tl.constexpr = GW // FMT  # code bytes per group (int4: two channels a byte)
    offs_c = tl.arange(0, GWC)
    for g in tl.static_range(NG):
        kc = _load_kv_tile(k_base + g * GWC, slot, offs_c, stride_kn, n_ok, n_ok, True)
        if FMT == 2:
            qc = tl.dot(
                q_go[g],
                tl.trans(_codes_to(kc >> 4, DT, False)),
                tl.dot(q_g[g], tl.trans(_codes_to(kc & 0xF, DT, False)), input_precision=IN_PREC),
                input_precision=IN_PREC,
            )
            part = qc * sc[g][None, :] + q_gs[g][:, None] * sc[NG + g][None, :]
        else:
            qc = tl.dot(q_g[g], tl.trans(_codes_to(kc, DT, True)), input_precision=IN_PREC)
            part = qc * sc[g][None, :]
        if g == 0:
            s = part
        else:
            s = s + part
    return s


@triton.jit
def _pv_acc(acc, alpha, pv, vt, f, RENORM: tl.constexpr, IN_PREC: tl.constexpr):
    # acc * alpha + (pv @ vt) * f (f: _pv_scaled's factor; 1 without RENORM).
    if RENORM:
        return acc * alpha[:, None] + tl.dot(pv, vt, input_precision=IN_PREC) * f
    else:
        return tl.dot(pv, vt, acc * alpha[:, None], input_precision=IN_PREC)


@triton.jit
def _concat_groups(parts, ROWS: tl.constexpr, W: tl.constexpr, NG: tl.constexpr):
    # [ROWS, NG * W] from NG tiles [ROWS, W] (group g's channels g*W..), NG a power of
    # two: pairs are merged level by level (join puts the pair last; moving it in front
    # of the channels makes the reshape a concatenation). Runs once, after the loop.
    for lvl in tl.static_range(NG.bit_length() - 1):
        merged = ()
        for i in tl.static_range(NG >> (lvl + 1)):
            pair = tl.permute(tl.join(parts[2 * i], parts[2 * i + 1]), (0, 2, 1))
            merged = merged + (tl.reshape(pair, [ROWS, (2 * W) << lvl]),)
        parts = merged
    return parts[0]


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lens_ptr,
    kmask_ptr,
    hact_ptr,
    m_ws,
    l_ws,
    acc_ws,
    ks_ptr,
    vs_ptr,
    kr_ptr,
    vr_ptr,
    nk_ptr,
    nv_ptr,
    cos_ptr,
    sin_ptr,
    arrive_ptr,
    Hq,
    Hkv,
    L,
    D,
    qk_scale,
    window,
    num_splits,
    stride_hb,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_os,
    stride_ksb,
    stride_ksh,
    stride_ksn,
    stride_vsb,
    stride_vsh,
    stride_vsn,
    W,
    stride_krb,
    stride_krh,
    stride_krn,
    stride_vrb,
    stride_vrh,
    stride_vrn,
    stride_nkb,
    stride_nkh,
    stride_nks,
    stride_nvb,
    stride_nvh,
    stride_nvs,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_sb,
    stride_ss,
    stride_sd,
    L_BUCKET,
    P_BUCKET,
    G: tl.constexpr,
    SQ: tl.constexpr,
    ROWS: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    IN_PREC: tl.constexpr,
    FMT: tl.constexpr,
    GW: tl.constexpr,
    GROUPED: tl.constexpr,
    EVEN_P: tl.constexpr,
    NG: tl.constexpr,
    GROUP_DOTS: tl.constexpr,
    GROUP_BCAST: tl.constexpr,
    HAS_RING: tl.constexpr,
    WRAP: tl.constexpr,
    RENORM_V: tl.constexpr,
    SCALES_AHEAD: tl.constexpr,
    ROPE: tl.constexpr,
    SQ_P: tl.constexpr,
    A_FLAT: tl.constexpr,
    A_MASKED: tl.constexpr,
    A_BLOCK_G: tl.constexpr,
    A_BLOCK_W: tl.constexpr,
    A_BLOCK_D: tl.constexpr,
    F16_CODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (B * Hkv * ROW_BLOCKS, num_splits). Program (bkv, rb; s): rows rb*ROWS.. of the
    # G*SQ (head, token) rows of KV group bkv = b*Hkv + kvh, keys of split s. L_BUCKET
    # and P_BUCKET (capacity, programs) are only autotuning keys. FMT: 0 dense, 1 int8,
    # 2 int4 (codes in k/v, scales in ks/vs; GROUPED: several scale groups of GW
    # channels). HAS_RING: positions >= len - W come from the full-precision rings
    # kr/vr. WRAP: position j in slot j % L. ROPE (dense or int8 with the query in
    # registers, ROW_BLOCKS == 1, no ring or wrap): q and the step's own keys nk arrive
    # unrotated with their cos/sin rows, lens holds the length before the step; the
    # step's keys (rotated) and values nv are stored by rope_kv_append's rule (A_*: its
    # tile layout) and lens advanced by SQ. F16_CODES (int8, one scale group, a bf16
    # query): the codes are dotted in fp16 (see INT8_LOOP).
    pdl_wait(PDL)
    pdl_release(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    bkv = pid // ROW_BLOCKS
    b = bkv // Hkv
    kvh = bkv % Hkv
    GS: tl.constexpr = G * SQ

    rows = rb * ROWS + tl.arange(0, ROWS)
    row_ok = rows < GS
    t = rows % SQ
    head = kvh * G + rows // SQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n0 = tl.arange(0, BLOCK_N)

    seq_len = tl.load(lens_ptr + b)
    if ROPE:
        seq_len += SQ
    pos = seq_len - SQ + t  # position of each row's query token
    if HAS_HEADS:
        row_act = (tl.load(hact_ptr + b * stride_hb + head, mask=row_ok, other=0) != 0) & row_ok
    else:
        row_act = row_ok

    # The keys any row may see: [lo, hi). Cut into num_splits equal, BLOCK_N-aligned
    # chunks (from this row's length, on the device: ragged batches stay balanced).
    if WRAP:
        hi = seq_len  # positions before len - L were overwritten
        lo = tl.maximum(seq_len - L, 0)
    else:
        hi = tl.minimum(seq_len, L)  # lens <= L is the contract; the clamp keeps loads in bounds
        lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - SQ - window + 1, lo)
    span = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    b64 = b.to(tl.int64)
    if ROPE:
        _append_own_step(
            nk_ptr + b64 * stride_nkb + kvh.to(tl.int64) * stride_nkh,
            nv_ptr + b64 * stride_nvb + kvh.to(tl.int64) * stride_nvh,
            k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh,
            v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh,
            ks_ptr + b64 * stride_ksb + kvh.to(tl.int64) * stride_ksh,
            vs_ptr + b64 * stride_vsb + kvh.to(tl.int64) * stride_vsh,
            cos_ptr + b64 * stride_cb,
            sin_ptr + b64 * stride_sb,
            stride_nks,
            stride_nvs,
            stride_kn,
            stride_vn,
            stride_ksn,
            stride_vsn,
            stride_cs,
            stride_cd,
            stride_ss,
            stride_sd,
            seq_len - SQ,
            start,
            end,
            D,
            SQ,
            SQ_P,
            FMT,
            NG,
            GW,
            A_FLAT,
            A_MASKED,
            A_BLOCK_G,
            A_BLOCK_W,
            A_BLOCK_D,
        )
        # Every thread of this program has read lens and stored its keys (read back by
        # this program's loop below) before it arrives; the last program of the row to
        # arrive advances lens, after every program of the row has read it, and re-arms
        # the counter (graph replays).
        tl.debug_barrier()
        if tl.atomic_add(arrive_ptr + b, 1) == Hkv * ROW_BLOCKS * num_splits - 1:
            tl.store(lens_ptr + b, seq_len)
            tl.store(arrive_ptr + b, 0)
    # No active head in this row block: an empty loop, so not one K/V byte is read.
    any_act = tl.max(row_act.to(tl.int32), axis=0) > 0
    end = tl.where(any_act, end, start)
    if HAS_RING:
        # [start, mid) from the (compressed) store, [mid, end) from the ring.
        mid = tl.minimum(tl.maximum(seq_len - W, start), end)
    else:
        mid = end

    q_rows = q_ptr + b64 * stride_qb + head.to(tl.int64) * stride_qh + t * stride_qs
    if ROPE:
        t64 = t.to(tl.int64)
        q = load_vectors(
            q_rows[:, None],
            offs_d[None, :],
            row_ok[:, None] & d_ok[None, :],
            True,
            (cos_ptr + b64 * stride_cb + t64 * stride_cs)[:, None],
            (sin_ptr + b64 * stride_sb + t64 * stride_ss)[:, None],
            stride_cd,
            stride_sd,
            D // 2,
        )
    elif FMT != 2 or HAS_RING:
        q = tl.load(
            q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    kmask_row = kmask_ptr + b64 * L
    DT: tl.constexpr = q_ptr.dtype.element_ty
    if F16_CODES:
        # The query rows divided by their largest magnitude (so fp16 cannot overflow;
        # bf16's 8 bits fit fp16's 11 down to 2^-14 of the row's max), multiplied back
        # into the scores.
        q_amax = tl.max(tl.abs(q.to(tl.float32)), axis=1)
        q_amax = tl.where(q_amax > 0.0, q_amax, 1.0)
        q_c = (q.to(tl.float32) * (1.0 / q_amax)[:, None]).to(tl.float16)
        CT: tl.constexpr = tl.float16
    else:
        CT: tl.constexpr = DT
    if FMT != 0:
        ks_base = ks_ptr + b64 * stride_ksb + kvh.to(tl.int64) * stride_ksh
        vs_base = vs_ptr + b64 * stride_vsb + kvh.to(tl.int64) * stride_vsh
    if FMT == 2:
        # int4: byte p holds channels 2p (low nibble) and 2p + 1. Scores are dotted as
        # q_even . lo + q_odd . hi, so the codes are never interleaved.
        BLOCK_P: tl.constexpr = BLOCK_D // 2
        offs_p = tl.arange(0, BLOCK_P)
        e_ok = 2 * offs_p < D
        o_ok = 2 * offs_p + 1 < D
        p_ok = e_ok  # byte p exists iff channel 2p does
        q_e = tl.load(
            q_rows[:, None] + 2 * offs_p[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0
        )
        q_o = tl.load(
            q_rows[:, None] + 2 * offs_p[None, :] + 1,
            mask=row_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        # sum_c q_c, for q . ((c - 8) s + m + 8 s) = s (q . (c - 8)) + (m + 8 s) sum(q).
        q_sum = tl.sum(q_e.to(tl.float32), axis=1) + tl.sum(q_o.to(tl.float32), axis=1)
        if GROUPED:
            col_e = 2 * ((2 * offs_p) // GW)  # (s, m) pair of each even / odd channel
            col_o = 2 * ((2 * offs_p + 1) // GW)
    if GROUP_DOTS:
        # Per-group query slices (tuples over the NG groups) for the per-group dots:
        # int8 [ROWS, GW]; int4 the even / odd channels [ROWS, GW / 2] and their sum.
        offs_c = tl.arange(0, GW // FMT)
        q_g = ()
        q_go = ()
        q_gs = ()
        for g in tl.static_range(NG):
            if FMT == 2:
                qe = tl.load(
                    q_rows[:, None] + g * GW + 2 * offs_c[None, :], mask=row_ok[:, None], other=0.0
                )
                qo = tl.load(
                    q_rows[:, None] + g * GW + 2 * offs_c[None, :] + 1,
                    mask=row_ok[:, None],
                    other=0.0,
                )
                q_g = q_g + (qe,)
                q_go = q_go + (qo,)
                q_gs = q_gs + (
                    tl.sum(qe.to(tl.float32), axis=1) + tl.sum(qo.to(tl.float32), axis=1),
                )
            else:
                q_g = q_g + (
                    tl.load(
                        q_rows[:, None] + g * GW + offs_c[None, :], mask=row_ok[:, None], other=0.0
                    ),
                )
        if FMT == 2:
            # int4 V: a group's GW / 2 bytes read twice side by side, [BLOCK_N, GW]: the
            # low nibbles (even channels), then the high ones (odd channels), so one dot
            # GW wide serves the group (a GW / 2 wide one would not split over 4 warps).
            offs_v = tl.arange(0, GW) % (GW // 2)
            v_shift = (tl.arange(0, GW) // (GW // 2) * 4).to(tl.uint8)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if FMT == 2:
        acc_e = tl.zeros([ROWS, BLOCK_D // 2], dtype=tl.float32)
        acc_o = tl.zeros([ROWS, BLOCK_D // 2], dtype=tl.float32)
        acc_m = tl.zeros([ROWS], dtype=tl.float32)  # sum_n p_n (m_n + 8 s_n) (G == 1)
    else:
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    if GROUP_DOTS:
        # One accumulator per group (and for int4 its mean term sum_n p_n (m + 8 s)[n]),
        # concatenated after the loop.
        acc_g = ()
        acc_gm = ()
        for _g in tl.static_range(NG):
            acc_g = acc_g + (tl.zeros([ROWS, GW], dtype=tl.float32),)
            if FMT == 2:
                acc_gm = acc_gm + (tl.zeros([ROWS], dtype=tl.float32),)
    # One scale group: the per-token scales are loaded one tile ahead. The code tiles feed
    # the dots and are software-pipelined by Triton; the scale loads are not, and waiting
    # on them each iteration cost 5 us (INT8) to 9 us (INT4) of about 70 (H200 probe,
    # bench/results/*kv_decode_probe*.json, best configs).
    # Several groups: the same, a tuple of scale columns (per-group dots) or [BLOCK_N, NG]
    # tiles (broadcast dequantization).
    if SCALES_AHEAD:
        if GROUP_DOTS:
            gsc_c = _group_scales(
                ks_base,
                vs_base,
                start + offs_n0,
                mid,
                L,
                stride_ksn,
                stride_vsn,
                qk_scale,
                FMT,
                WRAP,
                NG,
            )
        elif GROUP_BCAST:
            ks_c, km_c, vs_c, vm_c = _bcast_scales(
                ks_base, vs_base, start + offs_n0, mid, L, stride_ksn, stride_vsn, FMT, WRAP, NG
            )
        else:
            ks_c, km_c, vs_c, vm_c = _one_group_scales(
                ks_base, vs_base, start + offs_n0, mid, L, stride_ksn, stride_vsn, FMT, WRAP
            )
    for n0 in range(start, mid, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < mid
        if WRAP:
            slot = offs_n % L
        else:
            slot = offs_n
        if GROUP_DOTS:
            if SCALES_AHEAD:
                gsc = gsc_c
                gsc_c = _group_scales(
                    ks_base,
                    vs_base,
                    offs_n + BLOCK_N,
                    mid,
                    L,
                    stride_ksn,
                    stride_vsn,
                    qk_scale,
                    FMT,
                    WRAP,
                    NG,
                )
            else:
                gsc = _group_scales(
                    ks_base,
                    vs_base,
                    offs_n,
                    mid,
                    L,
                    stride_ksn,
                    stride_vsn,
                    qk_scale,
                    FMT,
                    WRAP,
                    NG,
                )
        elif GROUP_BCAST:
            if SCALES_AHEAD:
                ks_x, km_x, vs_x, vm_x = _bcast_scales(
                    ks_base,
                    vs_base,
                    offs_n + BLOCK_N,
                    mid,
                    L,
                    stride_ksn,
                    stride_vsn,
                    FMT,
                    WRAP,
                    NG,
                )
                gks, gkm, gvs, gvm = ks_c, km_c, vs_c, vm_c
            else:
                gks, gkm, gvs, gvm = _bcast_scales(
                    ks_base, vs_base, offs_n, mid, L, stride_ksn, stride_vsn, FMT, WRAP, NG
                )
        elif SCALES_AHEAD:
            ks_x, km_x, vs_x, vm_x = _one_group_scales(
                ks_base, vs_base, offs_n + BLOCK_N, mid, L, stride_ksn, stride_vsn, FMT, WRAP
            )
        if FMT == 0:
            k = _load_kv_tile(k_base, slot, offs_d, stride_kn, n_ok, d_ok, EVEN_D)
            v = _load_kv_tile(v_base, slot, offs_d, stride_vn, n_ok, d_ok, EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * qk_scale
            vis = _visible(
                offs_n, n_ok, slot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK
            )
            p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=IN_PREC)
        elif FMT == 1 and GROUP_DOTS:
            s = _group_scores(
                k_base, slot, stride_kn, n_ok, q_g, q_go, q_gs, gsc, FMT, NG, GW, DT, IN_PREC
            )
            vis = _visible(
                offs_n, n_ok, slot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK
            )
            p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
            # Per group: the V scales folded into p, the raw codes into the dot.
            new = ()
            for g in tl.static_range(NG):
                vc = _load_kv_tile(v_base + g * GW, slot, offs_c, stride_vn, n_ok, n_ok, True)
                pv, f = _pv_scaled(p, gsc[NG + g], n_ok, DT, RENORM_V)
                new = new + (
                    _pv_acc(acc_g[g], alpha, pv, _codes_to(vc, DT, True), f, RENORM_V, IN_PREC),
                )
            acc_g = new
        elif FMT == 1:
            kc = _load_kv_tile(k_base, slot, offs_d, stride_kn, n_ok, d_ok, EVEN_D)
            vc = _load_kv_tile(v_base, slot, offs_d, stride_vn, n_ok, d_ok, EVEN_D)
            if GROUPED:
                # Scales vary along D: dequantize the tile in registers, with the group
                # scales broadcast, or gathered per channel.
                if GROUP_BCAST:
                    ks = _bcast_groups(gks, BLOCK_N, NG, GW)
                else:
                    grp = offs_d // GW
                    ks = _load_scale_tile(ks_base, slot, stride_ksn, grp, n_ok, d_ok)
                k = (_codes_to(kc, tl.float32, True) * ks).to(DT)
                s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * qk_scale
            else:
                # One scale per token: dot the raw codes, scale the score columns.
                if SCALES_AHEAD:
                    ks = ks_c
                else:
                    ks = _load_scale_col(ks_base, slot, stride_ksn, n_ok, 0)
                if F16_CODES:
                    s = tl.dot(q_c, tl.trans(_int8_to_f16(kc)))
                    s = s * (ks * qk_scale)[None, :] * q_amax[:, None]
                else:
                    s = tl.dot(q, tl.trans(_codes_to(kc, DT, True)), input_precision=IN_PREC)
                    s = s * (ks * qk_scale)[None, :]
            vis = _visible(
                offs_n, n_ok, slot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK
            )
            p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
            if GROUPED:
                if GROUP_BCAST:
                    vs = _bcast_groups(gvs, BLOCK_N, NG, GW)
                else:
                    vs = _load_scale_tile(vs_base, slot, stride_vsn, grp, n_ok, d_ok)
                vt = (_codes_to(vc, tl.float32, True) * vs).to(DT)
                acc = tl.dot(p.to(DT), vt, acc * alpha[:, None], input_precision=IN_PREC)
            else:
                if SCALES_AHEAD:
                    vs = vs_c
                else:
                    vs = _load_scale_col(vs_base, slot, stride_vsn, n_ok, 0)
                pv, f = _pv_scaled(p, vs, n_ok, CT, RENORM_V or F16_CODES)
                if F16_CODES:
                    vt = _int8_to_f16(vc)
                else:
                    vt = _codes_to(vc, DT, True)
                if RENORM_V or F16_CODES:
                    acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision=IN_PREC) * f
                else:
                    acc = tl.dot(pv, vt, acc * alpha[:, None], input_precision=IN_PREC)
        elif GROUP_DOTS:
            s = _group_scores(
                k_base, slot, stride_kn, n_ok, q_g, q_go, q_gs, gsc, FMT, NG, GW, DT, IN_PREC
            )
            vis = _visible(
                offs_n, n_ok, slot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK
            )
            p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
            # Per group: s folded into p and one dot with the centred codes [BLOCK_N, GW],
            # even channels then odd ones (a dot GW channels wide keeps the warps split
            # along the channels; reordered after the loop); the mean term
            # sum_n p_n (m + 8 s)[n] in fp32.
            new = ()
            for g in tl.static_range(NG):
                vb = _load_kv_tile(
                    v_base + g * (GW // 2), slot, offs_v, stride_vn, n_ok, n_ok, True
                )
                pv, f = _pv_scaled(p, gsc[2 * NG + g], n_ok, DT, RENORM_V)
                vt = _codes_to((vb >> v_shift[None, :]) & 0xF, DT, False)
                new = new + (_pv_acc(acc_g[g], alpha, pv, vt, f, RENORM_V, IN_PREC),)
            acc_g = new
            new = ()
            for g in tl.static_range(NG):
                new = new + (acc_gm[g] * alpha + tl.sum(p * gsc[3 * NG + g][None, :], axis=1),)
            acc_gm = new
        else:
            kb = _load_kv_tile(k_base, slot, offs_p, stride_kn, n_ok, p_ok, EVEN_P)
            vb = _load_kv_tile(v_base, slot, offs_p, stride_vn, n_ok, p_ok, EVEN_P)
            if GROUPED:
                if GROUP_BCAST:
                    k_e, k_o = _int4_pair_bcast(kb, gks, gkm, BLOCK_N, NG, GW // 2, DT)
                else:
                    k_e, k_o = _int4_pair_gather(
                        kb, ks_base, slot, stride_ksn, col_e, col_o, n_ok, e_ok, o_ok, DT
                    )
                s = (
                    tl.dot(
                        q_o,
                        tl.trans(k_o),
                        tl.dot(q_e, tl.trans(k_e), input_precision=IN_PREC),
                        input_precision=IN_PREC,
                    )
                    * qk_scale
                )
            else:
                if SCALES_AHEAD:
                    ks, km = ks_c, km_c
                else:
                    ks = _load_scale_col(ks_base, slot, stride_ksn, n_ok, 0)
                    km = _load_scale_col(ks_base, slot, stride_ksn, n_ok, 1)
                qc = tl.dot(
                    q_o,
                    tl.trans(_codes_to(kb >> 4, DT, False)),
                    tl.dot(q_e, tl.trans(_codes_to(kb & 0xF, DT, False)), input_precision=IN_PREC),
                    input_precision=IN_PREC,
                )
                # Centred codes: x = (c - 8) s + (m + 8 s).
                s = (qc * ks[None, :] + q_sum[:, None] * (km + 8.0 * ks)[None, :]) * qk_scale
            vis = _visible(
                offs_n, n_ok, slot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK
            )
            p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
            if GROUPED:
                if GROUP_BCAST:
                    v_e, v_o = _int4_pair_bcast(vb, gvs, gvm, BLOCK_N, NG, GW // 2, DT)
                else:
                    v_e, v_o = _int4_pair_gather(
                        vb, vs_base, slot, stride_vsn, col_e, col_o, n_ok, e_ok, o_ok, DT
                    )
                pd = p.to(DT)
                acc_e = tl.dot(pd, v_e, acc_e * alpha[:, None], input_precision=IN_PREC)
                acc_o = tl.dot(pd, v_o, acc_o * alpha[:, None], input_precision=IN_PREC)
            else:
                if SCALES_AHEAD:
                    vs, vm = vs_c, vm_c
                else:
                    vs = _load_scale_col(vs_base, slot, stride_vsn, n_ok, 0)
                    vm = _load_scale_col(vs_base, slot, stride_vsn, n_ok, 1)
                pv, f = _pv_scaled(p, vs, n_ok, DT, RENORM_V)
                v_e = _codes_to(vb & 0xF, DT, False)
                v_o = _codes_to(vb >> 4, DT, False)
                # Two accumulators (even / odd channels), interleaved once at the end.
                if RENORM_V:
                    acc_e = acc_e * alpha[:, None] + tl.dot(pv, v_e, input_precision=IN_PREC) * f
                    acc_o = acc_o * alpha[:, None] + tl.dot(pv, v_o, input_precision=IN_PREC) * f
                else:
                    acc_e = tl.dot(pv, v_e, acc_e * alpha[:, None], input_precision=IN_PREC)
                    acc_o = tl.dot(pv, v_o, acc_o * alpha[:, None], input_precision=IN_PREC)
                acc_m = acc_m * alpha + tl.sum(p * (vm + 8.0 * vs)[None, :], axis=1)
        if SCALES_AHEAD and not GROUP_DOTS:
            ks_c, km_c, vs_c, vm_c = ks_x, km_x, vs_x, vm_x
    if GROUP_DOTS:
        if FMT == 2:
            # Each group's even / odd halves interleaved into channel order, mean added.
            parts = ()
            for g in tl.static_range(NG):
                a = tl.permute(
                    tl.reshape(acc_g[g] + acc_gm[g][:, None], [ROWS, 2, GW // 2]), (0, 2, 1)
                )
                parts = parts + (tl.reshape(a, [ROWS, GW]),)
        else:
            parts = acc_g
        acc = _concat_groups(parts, ROWS, GW, NG)
    elif FMT == 2:
        acc = tl.reshape(tl.join(acc_e + acc_m[:, None], acc_o + acc_m[:, None]), [ROWS, BLOCK_D])
    if HAS_RING:
        # The last W positions, full precision, ring slot j % W.
        kr_base = kr_ptr + b64 * stride_krb + kvh.to(tl.int64) * stride_krh
        vr_base = vr_ptr + b64 * stride_vrb + kvh.to(tl.int64) * stride_vrh
        acc, m_i, l_i = _ring_tiles(
            acc,
            m_i,
            l_i,
            q,
            kr_base,
            vr_base,
            stride_krn,
            stride_vrn,
            mid,
            end,
            W,
            L,
            offs_n0,
            offs_d,
            d_ok,
            pos,
            row_act,
            window,
            kmask_row,
            qk_scale,
            EVEN_D,
            HAS_WINDOW,
            HAS_KMASK,
            WRAP,
            IN_PREC,
        )

    _write_partial(
        acc,
        m_i,
        l_i,
        out_ptr,
        m_ws,
        l_ws,
        acc_ws,
        b64,
        head,
        t,
        rows,
        row_ok,
        offs_d,
        d_ok,
        bkv,
        split,
        num_splits,
        D,
        stride_ob,
        stride_oh,
        stride_os,
        GS,
        DIRECT,
    )


@triton.jit
def _append_own_step(
    nk_row,
    nv_row,
    k_base,
    v_base,
    ks_base,
    vs_base,
    cos_row,
    sin_row,
    stride_nks,
    stride_nvs,
    stride_kn,
    stride_vn,
    stride_ksn,
    stride_vsn,
    stride_cs,
    stride_cd,
    stride_ss,
    stride_sd,
    first,
    start,
    end,
    D,
    SQ: tl.constexpr,
    SQ_P: tl.constexpr,
    FMT: tl.constexpr,
    NG: tl.constexpr,
    GW: tl.constexpr,
    FLAT: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The step's SQ keys (rotated) and values of one KV head, stored (cast or quantized:
    # kv_append's tile) at slots first + i that fall in this program's key range [start,
    # end) (end <= L): each position is in exactly one program's range, and only that
    # program reads it.
    i = tl.arange(0, SQ_P)
    i64 = i.to(tl.int64)
    slot = first + i
    ok = (i < SQ) & (slot >= start) & (slot < end)
    slot64 = slot.to(tl.int64)
    half = D // 2
    nk_rows = nk_row + i64 * stride_nks
    nv_rows = nv_row + i64 * stride_nvs
    append_tile(
        nk_rows,
        k_base + slot64 * stride_kn,
        ks_base + slot64 * stride_ksn,
        ok,
        D,
        cos_row + i64 * stride_cs,
        sin_row + i64 * stride_ss,
        stride_cd,
        stride_sd,
        half,
        True,
        FMT,
        NG,
        GW,
        FLAT,
        MASKED,
        SQ_P,
        BLOCK_G,
        BLOCK_W,
        BLOCK_D,
    )
    append_tile(
        nv_rows,
        v_base + slot64 * stride_vn,
        vs_base + slot64 * stride_vsn,
        ok,
        D,
        nv_rows,
        nv_rows,
        0,
        0,
        half,
        False,
        FMT,
        NG,
        GW,
        FLAT,
        MASKED,
        SQ_P,
        BLOCK_G,
        BLOCK_W,
        BLOCK_D,
    )


@triton.jit
def _ring_tiles(
    acc,
    m_i,
    l_i,
    q,
    kr_base,
    vr_base,
    stride_krn,
    stride_vrn,
    mid,
    end,
    W,
    L,
    offs_t,
    offs_d,
    d_ok,
    pos,
    row_act,
    window,
    kmask_row,
    qk_scale,
    EVEN_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    WRAP: tl.constexpr,
    IN_PREC: tl.constexpr,
):
    # Positions [mid, end) from the full-precision rings (slot j % W), tiles of
    # len(offs_t) keys, continuing the online softmax (acc, m, l). The key mask is by
    # cache slot (j % L when the cache wraps).
    for n0 in range(mid, end, offs_t.shape[0]):
        offs_n = n0 + offs_t
        n_ok = offs_n < end
        rslot = offs_n % W
        if WRAP:
            kslot = offs_n % L
        else:
            kslot = offs_n
        k = _load_kv_tile(kr_base, rslot, offs_d, stride_krn, n_ok, d_ok, EVEN_D)
        v = _load_kv_tile(vr_base, rslot, offs_d, stride_vrn, n_ok, d_ok, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * qk_scale
        vis = _visible(offs_n, n_ok, kslot, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK)
        p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=IN_PREC)
    return acc, m_i, l_i


@triton.jit
def _write_partial(
    acc,
    m_i,
    l_i,
    out_ptr,
    m_ws,
    l_ws,
    acc_ws,
    b64,
    head,
    t,
    rows,
    row_ok,
    offs_d,
    d_ok,
    bkv,
    split,
    num_splits,
    D,
    stride_ob,
    stride_oh,
    stride_os,
    GS: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # A split program's result: the normalised rows (one split) or (m, l, acc) for the
    # merge kernel.
    if DIRECT:
        # One split: normalise here. l == 0 (no visible key, inactive head) -> exact 0.
        o = tl.where((l_i > 0.0)[:, None], acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
        o_ptrs = (out_ptr + b64 * stride_ob + head.to(tl.int64) * stride_oh + t * stride_os)[
            :, None
        ] + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Workspace [B*Hkv, num_splits, G*SQ] for m and l, [..., D] for acc. The merge
        # reads acc only where m > -inf, so empty splits skip that store.
        ws_row = (bkv.to(tl.int64) * num_splits + split) * GS + rows
        tl.store(m_ws + ws_row, m_i, mask=row_ok)
        tl.store(l_ws + ws_row, l_i, mask=row_ok)
        has = row_ok & (m_i > float("-inf"))
        tl.store(
            acc_ws + ws_row[:, None] * D + offs_d[None, :], acc, mask=has[:, None] & d_ok[None, :]
        )


@triton.jit
def _key_block_scales(ks_base, blk, stride_ksk, offs_p, e_ok, o_ok, T: tl.constexpr, mid):
    # KIVI key block `blk`: per-channel scale and offset (m + 8 s: codes are centred) of
    # the even and odd channels, fp32 [BLOCK_P] each; zeros unless the block starts
    # before `mid` (a vector compare: the interpreter mishandles scalar & vector masks).
    row = ks_base + blk * stride_ksk  # < 2**31: one row's blocks
    ok = offs_p * 0 + blk * T < mid
    s_e = tl.load(row + 4 * offs_p, mask=e_ok & ok, other=0.0).to(tl.float32)
    m_e = tl.load(row + 4 * offs_p + 1, mask=e_ok & ok, other=0.0).to(tl.float32)
    s_o = tl.load(row + 4 * offs_p + 2, mask=o_ok & ok, other=0.0).to(tl.float32)
    m_o = tl.load(row + 4 * offs_p + 3, mask=o_ok & ok, other=0.0).to(tl.float32)
    return s_e, m_e + 8.0 * s_e, s_o, m_o + 8.0 * s_o


@triton.jit
def _value_scales(vs_base, offs_n, stride_vsn, n_ok, gi, NG: tl.constexpr, V_BCAST: tl.constexpr):
    # KIVI value scales of a tile's slots: (s, m) per token (NG == 1, fp32 [T] each) or
    # per token and group (V_BCAST, fp32 [T, NG]); nothing for the gather layout, which
    # loads its own per channel.
    if NG == 1:
        vs = _load_scale_col(vs_base, offs_n, stride_vsn, n_ok, 0)
        vm = _load_scale_col(vs_base, offs_n, stride_vsn, n_ok, 1)
    elif V_BCAST:
        g_ok = gi < NG
        vs = _load_scale_tile(vs_base, offs_n, stride_vsn, 2 * gi, n_ok, g_ok)
        vm = _load_scale_tile(vs_base, offs_n, stride_vsn, 2 * gi + 1, n_ok, g_ok)
    else:
        vs = 0.0
        vm = 0.0
    return vs, vm


@triton.jit
def _key_block_scales_full(ks_base, blk, stride_ksk, offs_d, d_ok, T: tl.constexpr, mid):
    # _key_block_scales in channel order: the scale and offset (m + 8 s) of each channel.
    row = ks_base + blk * stride_ksk
    ok = d_ok & (offs_d * 0 + blk * T < mid)
    sc = tl.load(row + 2 * offs_d, mask=ok, other=0.0).to(tl.float32)
    mn = tl.load(row + 2 * offs_d + 1, mask=ok, other=0.0).to(tl.float32)
    return sc, mn + 8.0 * sc


@triton.jit
def _decode_kivi_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lens_ptr,
    kmask_ptr,
    hact_ptr,
    m_ws,
    l_ws,
    acc_ws,
    ks_ptr,
    vs_ptr,
    kr_ptr,
    vr_ptr,
    Hq,
    Hkv,
    L,
    D,
    qk_scale,
    window,
    num_splits,
    stride_hb,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_os,
    stride_ksb,
    stride_ksh,
    stride_ksk,
    stride_vsb,
    stride_vsh,
    stride_vsn,
    W,
    stride_krb,
    stride_krh,
    stride_krn,
    stride_vrb,
    stride_vrh,
    stride_vrn,
    G: tl.constexpr,
    SQ: tl.constexpr,
    ROWS: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DIRECT: tl.constexpr,
    IN_PREC: tl.constexpr,
    T: tl.constexpr,
    NG: tl.constexpr,
    GW: tl.constexpr,
    V_BCAST: tl.constexpr,
    RENORM_V: tl.constexpr,
    EVEN_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    K_FULL: tl.constexpr,
    V_DEQ: tl.constexpr,
    V_FULL: tl.constexpr,
    ASM: tl.constexpr,
    V_AHEAD: tl.constexpr,
    PDL: tl.constexpr,
):
    # KIVI cache: int4 keys per channel over blocks of T slots (scales [.., L / T, D, 2]),
    # int4 values per token in NG groups of GW channels, positions >= floor(len / T) * T
    # in the full-precision rings (slot j % W). Grid and workspace as _decode_split_kernel.
    # The store loop steps one key block per tile, so a tile's key scales are a [D]
    # vector: they scale the query (q_c s_c) instead of the codes, and the minimums give
    # one constant per row, q . k_n = sum_c (q_c s_c) (c_nc - 8) + sum_c q_c (m_c + 8 s_c)
    # (codes centred as in _codes_to): the key codes go to the dot raw, as with one
    # per-token scale, at the cost of ROWS x D multiplies per tile.
    pdl_wait(PDL)
    pdl_release(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    bkv = pid // ROW_BLOCKS
    b = bkv // Hkv
    kvh = bkv % Hkv
    GS: tl.constexpr = G * SQ
    BLOCK_P: tl.constexpr = BLOCK_D // 2

    rows = rb * ROWS + tl.arange(0, ROWS)
    row_ok = rows < GS
    t = rows % SQ
    head = kvh * G + rows // SQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_p = tl.arange(0, BLOCK_P)
    e_ok = 2 * offs_p < D
    o_ok = 2 * offs_p + 1 < D
    offs_t = tl.arange(0, T)

    seq_len = tl.load(lens_ptr + b)
    pos = seq_len - SQ + t
    if HAS_HEADS:
        row_act = (tl.load(hact_ptr + b * stride_hb + head, mask=row_ok, other=0) != 0) & row_ok
    else:
        row_act = row_ok
    hi = tl.minimum(seq_len, L)  # lens <= L is the contract; the clamp keeps loads in bounds
    lo = 0
    if HAS_WINDOW:
        # Block-aligned: a tile is one key block (its leading keys are masked).
        lo = tl.maximum(seq_len - SQ - window + 1, 0) // T * T
    span = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), T) * T
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)
    any_act = tl.max(row_act.to(tl.int32), axis=0) > 0
    end = tl.where(any_act, end, start)
    # [start, mid): quantized blocks; [mid, end): the ring (the open block).
    mid = tl.minimum(tl.maximum(tl.minimum(seq_len // T * T, L), start), end)

    b64 = b.to(tl.int64)
    kv64 = kvh.to(tl.int64)
    q_rows = q_ptr + b64 * stride_qb + head.to(tl.int64) * stride_qh + t * stride_qs
    DT: tl.constexpr = q_ptr.dtype.element_ty
    q_e = tl.load(
        q_rows[:, None] + 2 * offs_p[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0
    ).to(tl.float32)
    q_o = tl.load(
        q_rows[:, None] + 2 * offs_p[None, :] + 1, mask=row_ok[:, None] & o_ok[None, :], other=0.0
    ).to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + kv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv64 * stride_vh
    ks_base = ks_ptr + b64 * stride_ksb + kv64 * stride_ksh
    vs_base = vs_ptr + b64 * stride_vsb + kv64 * stride_vsh
    kmask_row = kmask_ptr + b64 * L
    if not V_BCAST:
        col_e = 2 * ((2 * offs_p) // GW)  # (s, m) pair of each even / odd channel
        col_o = 2 * ((2 * offs_p + 1) // GW)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc_e = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
    acc_o = tl.zeros([ROWS, BLOCK_P], dtype=tl.float32)
    acc_m = tl.zeros([ROWS], dtype=tl.float32)
    if V_FULL:
        acc_f = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    # The key-block scales are loaded one tile ahead: Triton pipelines the code tiles (they
    # feed the dots), not these small loads, and the query scaling waits on them. The
    # value scales too with V_AHEAD (slower on an H100, see KIVI_LOOP); without it they
    # are loaded first in each iteration, so that the key dot and softmax cover them.
    if V_BCAST:
        gi = tl.arange(0, NG)
    else:
        gi = offs_t  # unused
    if V_AHEAD:
        first = start + offs_t
        nxt_v = _value_scales(vs_base, first, stride_vsn, first < mid, gi, NG, V_BCAST)
    if K_FULL:
        nxt_f = _key_block_scales_full(ks_base, start // T, stride_ksk, offs_d, d_ok, T, mid)
        q_f = tl.load(
            q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
    else:
        nxt = _key_block_scales(ks_base, start // T, stride_ksk, offs_p, e_ok, o_ok, T, mid)
    for n0 in range(start, mid, T):
        offs_n = n0 + offs_t
        n_ok = offs_n < mid
        if K_FULL:
            ksf, kmf = nxt_f
            nxt_f = _key_block_scales_full(ks_base, n0 // T + 1, stride_ksk, offs_d, d_ok, T, mid)
        else:
            s_e, mb_e, s_o, mb_o = nxt
            nxt = _key_block_scales(ks_base, n0 // T + 1, stride_ksk, offs_p, e_ok, o_ok, T, mid)
        if V_AHEAD:
            vs_t, vm_t = nxt_v
            ahead = offs_n + T
            nxt_v = _value_scales(vs_base, ahead, stride_vsn, ahead < mid, gi, NG, V_BCAST)
        else:
            vs_t, vm_t = _value_scales(vs_base, offs_n, stride_vsn, n_ok, gi, NG, V_BCAST)
        kb = _load_kv_tile(k_base, offs_n, offs_p, stride_kn, n_ok, e_ok, EVEN_P)
        vb = _load_kv_tile(v_base, offs_n, offs_p, stride_vn, n_ok, e_ok, EVEN_P)
        if K_FULL:
            kf = _int4_tile(kb, T, BLOCK_P, DT, ASM) * ksf.to(DT)[None, :] + kmf.to(DT)[None, :]
            s = tl.dot(q_f, tl.trans(kf), input_precision=IN_PREC) * qk_scale
        else:
            qs_e = (q_e * s_e[None, :]).to(DT)
            qs_o = (q_o * s_o[None, :]).to(DT)
            const = tl.sum(q_e * mb_e[None, :], axis=1) + tl.sum(q_o * mb_o[None, :], axis=1)
            qc = tl.dot(
                qs_o,
                tl.trans(_nibbles_to(kb, True, DT, ASM)),
                tl.dot(qs_e, tl.trans(_nibbles_to(kb, False, DT, ASM)), input_precision=IN_PREC),
                input_precision=IN_PREC,
            )
            s = (qc + const[:, None]) * qk_scale
        vis = _visible(offs_n, n_ok, offs_n, pos, row_act, window, kmask_row, HAS_WINDOW, HAS_KMASK)
        p, alpha, m_i, l_i = _softmax_step(s, vis, m_i, l_i)
        if NG == 1:
            # One value scale per token: folded into p, the raw codes into the dots.
            pv, f = _pv_scaled(p, vs_t, n_ok, DT, RENORM_V)
            acc_e = _pv_acc(acc_e, alpha, pv, _codes_to(vb & 0xF, DT, False), f, RENORM_V, IN_PREC)
            acc_o = _pv_acc(acc_o, alpha, pv, _codes_to(vb >> 4, DT, False), f, RENORM_V, IN_PREC)
            acc_m = acc_m * alpha + tl.sum(p * (vm_t + 8.0 * vs_t)[None, :], axis=1)
        else:
            if V_BCAST:
                gs_ = vs_t
                gm_ = vm_t
                if V_FULL:
                    v4 = _int4_tile(vb, T, BLOCK_P, DT, ASM)
                    sb = _bcast_groups(gs_.to(DT), T, NG, GW)
                    mb = _bcast_groups((gm_ + 8.0 * gs_).to(DT), T, NG, GW)
                    v4 = v4 * sb + mb
                    acc_f = tl.dot(p.to(DT), v4, acc_f * alpha[:, None], input_precision=IN_PREC)
                elif V_DEQ:
                    sb = _bcast_groups(gs_.to(DT), T, NG, GW // 2)
                    mb = _bcast_groups((gm_ + 8.0 * gs_).to(DT), T, NG, GW // 2)
                    v_e = _nibbles_to(vb, False, DT, ASM) * sb + mb
                    v_o = _nibbles_to(vb, True, DT, ASM) * sb + mb
                else:
                    v_e, v_o = _int4_pair_bcast(vb, gs_, gm_ + 8.0 * gs_, T, NG, GW // 2, DT)
            else:
                v_e, v_o = _int4_pair_gather(
                    vb, vs_base, offs_n, stride_vsn, col_e, col_o, n_ok, e_ok, o_ok, DT
                )
            if not V_FULL:
                pd = p.to(DT)
                acc_e = tl.dot(pd, v_e, acc_e * alpha[:, None], input_precision=IN_PREC)
                acc_o = tl.dot(pd, v_o, acc_o * alpha[:, None], input_precision=IN_PREC)
    if V_FULL:
        acc = acc_f
    else:
        acc = tl.reshape(tl.join(acc_e + acc_m[:, None], acc_o + acc_m[:, None]), [ROWS, BLOCK_D])

    # The open block, full precision, ring slot j % W.
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kr_base = kr_ptr + b64 * stride_krb + kv64 * stride_krh
    vr_base = vr_ptr + b64 * stride_vrb + kv64 * stride_vrh
    acc, m_i, l_i = _ring_tiles(
        acc,
        m_i,
        l_i,
        q,
        kr_base,
        vr_base,
        stride_krn,
        stride_vrn,
        mid,
        end,
        W,
        L,
        tl.arange(0, BLOCK_R),
        offs_d,
        d_ok,
        pos,
        row_act,
        window,
        kmask_row,
        qk_scale,
        EVEN_D,
        HAS_WINDOW,
        HAS_KMASK,
        False,
        IN_PREC,
    )

    _write_partial(
        acc,
        m_i,
        l_i,
        out_ptr,
        m_ws,
        l_ws,
        acc_ws,
        b64,
        head,
        t,
        rows,
        row_ok,
        offs_d,
        d_ok,
        bkv,
        split,
        num_splits,
        D,
        stride_ob,
        stride_oh,
        stride_os,
        GS,
        DIRECT,
    )


@triton.jit
def _decode_combine_kernel(
    m_ws,
    l_ws,
    acc_ws,
    out_ptr,
    Hkv,
    D,
    num_splits,
    stride_ob,
    stride_oh,
    stride_os,
    G: tl.constexpr,
    SQ: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    # Grid (B * Hkv * G * SQ): one output row. Log-sum-exp merge of the splits' partial
    # (m, l, acc), in a fixed order (deterministic), base 2 like the split kernel.
    pdl_wait(PDL)
    pdl_release(PDL)
    GS: tl.constexpr = G * SQ
    pid = tl.program_id(0)
    r = pid % GS
    bkv = pid // GS
    b = bkv // Hkv
    head = (bkv % Hkv) * G + r // SQ
    t = r % SQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_s = tl.arange(0, BLOCK_S)
    first = bkv.to(tl.int64) * num_splits * GS + r  # split 0's (m, l) of this row

    m_run = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ss = s0 + offs_s
        m_run = tl.maximum(
            m_run, tl.load(m_ws + first + ss * GS, mask=ss < num_splits, other=float("-inf"))
        )
    m_max = tl.max(m_run, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)

    o = tl.zeros([BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ss = s0 + offs_s
        idx = first + ss * GS
        ms = tl.load(m_ws + idx, mask=ss < num_splits, other=float("-inf"))
        ls = tl.load(l_ws + idx, mask=ss < num_splits, other=0.0)
        w = tl.exp2(ms - m_use)  # 0 for empty splits (m = -inf)
        den += w * ls
        has = ms > float("-inf")  # acc of an empty split was never written
        a = tl.load(
            acc_ws + idx[:, None] * D + offs_d[None, :],
            mask=has[:, None] & d_ok[None, :],
            other=0.0,
        )
        o += tl.sum(w[:, None] * a, axis=0)
    total = tl.sum(den, axis=0)
    res = tl.where(total > 0.0, o / tl.where(total > 0.0, total, 1.0), 0.0)
    o_ptr = out_ptr + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + t * stride_os
    tl.store(o_ptr + offs_d, res.to(out_ptr.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------- configs, autotune


def _cfg(
    block_n: int, num_warps: int, num_stages: int, maxnreg: int | None = None
) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg
    )


# GPU candidates, the first that fits being the default. For D=128 bf16, BLOCK_N=64 with
# 3 stages is 32 KiB of K+V per stage (two programs per SM, two tiles in flight each).
_GPU_CONFIGS = [
    _cfg(64, 4, 3),
    _cfg(128, 4, 2),
    _cfg(64, 4, 4),
    _cfg(128, 4, 3),
    _cfg(32, 4, 4),
]
# Compressed stores: int8/int4 tiles are half/quarter the bytes, and the per-tile work
# (dequantization, scale loads, softmax) is better amortised over 128 keys (on sm_90,
# about 12% fewer instructions per key than BLOCK_N=64 in the int8 loop). 256 keys
# spill at 4 warps.
_GPU_CONFIGS_CODES = [
    _cfg(128, 4, 2),
    _cfg(64, 4, 3),
    _cfg(128, 4, 3),
    _cfg(64, 4, 4),
    _cfg(32, 4, 4),
    # Register caps (uncapped the INT8 loop takes 255 registers a thread: two blocks per
    # SM, 12.5% occupancy, DRAM 34% busy in Nsight Compute).
    _cfg(64, 4, 3, 128),
    _cfg(128, 4, 2, 128),
    _cfg(64, 4, 3, 168),
]
_INTERPRET_CONFIG = _cfg(16, 1, 1)
# Two other loops for compressed stores were built and timed on an H200 and dropped
# (bench/results/*kv_decode_probe*.json; INT8, GQA 32/8 B8
# L8192 D128, best config each; the plain loop above: 72.8 us): a hand-pipelined loop
# (next tile loaded before the current one is used, commit 7faf564) 98 us, and a swap-AB
# loop (transposed scores and accumulator, the converted codes as the dots' left operand,
# which wgmma reads from registers, commit 240bb14) 77.2 us.


@functools.cache
def _configs(
    block_d: int, rows: int, elem_size: int, codes: bool = False
) -> tuple[triton.Config, ...]:
    """The launch configs that fit shared memory for this tile shape (first = default).

    ``elem_size``: bytes per streamed K/V element; ``codes``: a compressed store.
    """
    if _INTERPRET:
        return (_INTERPRET_CONFIG,)
    # Big accumulators ([rows, D] fp32 plus the [rows, BLOCK_N] scores) want 8 warps.
    warps = 8 if rows * block_d >= 128 * 128 else 4
    q_bytes = rows * block_d * elem_size
    kept: list[triton.Config] = []
    seen = set()
    for c in _GPU_CONFIGS_CODES if codes else _GPU_CONFIGS:
        bn, stages = c.kwargs["BLOCK_N"], c.num_stages
        while stages > 2 and stages * 2 * bn * block_d * elem_size + q_bytes > _SMEM_BUDGET:
            stages -= 1
        if stages * 2 * bn * block_d * elem_size + q_bytes > _SMEM_BUDGET:
            continue
        sig = (bn, warps, stages, c.maxnreg)
        if sig not in seen:
            seen.add(sig)
            kept.append(_cfg(bn, warps, stages, c.maxnreg))
    return tuple(kept) or (_cfg(16, warps, 2),)


# What force_config set: one config for each kernel, or None (the normal choice).
_FORCED: dict[str, triton.Config | None] = {"split": None, "kivi": None}


@contextlib.contextmanager
def force_config(cfg: triton.Config) -> Iterator[None]:
    """Launch one decode kernel with ``cfg`` alone inside the block: no autotuning and no
    filtering by shared memory (for tests that check every autotune candidate, and for
    probes that time one). A config with a ``BLOCK_N`` key applies to the split kernel
    (dense/INT8/INT4 stores), one with no keys to the KIVI kernel; the other kernel keeps
    its normal choice. Not thread-safe: the setting is the module's, not the caller's.

    Raises ``ValueError`` for a config with other keys. The autotuner's candidates are
    ``_configs(...)`` (split) and ``_KIVI_GPU_CONFIGS`` (KIVI).
    """
    keys = set(cfg.kwargs)
    if keys not in ({"BLOCK_N"}, set()):
        raise ValueError(
            f"force_config: a config has the key BLOCK_N (split kernel) or none (KIVI), "
            f"got {sorted(keys)}"
        )
    which = "split" if keys else "kivi"
    prev = _FORCED[which]
    _FORCED[which] = cfg
    try:
        yield
    finally:
        _FORCED[which] = prev


_split_jit = _decode_split_kernel
_tuners: dict[tuple, object] = {}


def _tuned(configs: tuple[triton.Config, ...]):
    tuner = _tuners.get(configs)
    if tuner is None:
        tuner = _tuners[configs] = autotune(
            list(configs),
            key=[
                "BLOCK_D",
                "ROWS",
                "num_splits",
                "L_BUCKET",
                "P_BUCKET",
                "FMT",
                "HAS_RING",
                "SCALES_AHEAD",
                "NG",
                "GROUP_DOTS",
                "GROUP_BCAST",
            ],
        )(_split_jit)
    return tuner


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 8  # the interpreter: a pretend GPU small enough that tests see splits
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


_split_hint = threading.local()


def rope_fold_fits(
    q: torch.Tensor,
    hkv: int,
    cache_lens: torch.Tensor,
    kv_format: str,
    n_groups: int,
    ring: bool,
    wrap: bool,
    key_block: int,
) -> bool:
    """Whether :func:`decode_attention_fwd` can take ``rope=`` for this call: a dense or
    int8 cache whose query tile the kernel holds in registers (not the per-group dots of
    :func:`group_mode`), without a ring, wrap or key blocks; one row block per KV group
    (every reader of a new key is the program that writes it); int32 contiguous lengths
    (advanced in place) and at most :data:`MAX_ARRIVAL_ROWS` rows."""
    bsz, hq, sq, d = q.shape
    if kv_format not in ("dense", "int8") or ring or wrap or key_block:
        return False
    if hkv <= 0 or hq % hkv or d % 2 or bsz > MAX_ARRIVAL_ROWS:
        return False
    if cache_lens.dtype != torch.int32 or not cache_lens.is_contiguous():
        return False
    rows, row_blocks, _ = _plan(hq // hkv, sq, d)
    return row_blocks == 1 and group_mode(kv_format, n_groups, d, rows) != "dots"


#: The fields of ``kv_append.append_layout`` the step's append takes as ``A_*`` constexprs
#: (``NG``, ``GW`` and ``FMT`` are the kernel's own).
_APPEND_FIELDS = ("FLAT", "MASKED", "BLOCK_G", "BLOCK_W", "BLOCK_D")
#: Rows the fused step's arrival counters cover (one int32 each).
MAX_ARRIVAL_ROWS = 4096
_arrival_bufs: dict[tuple[str, int | None], torch.Tensor] = {}


def _arrivals(device: torch.device) -> torch.Tensor:
    # Zero between launches (the last program of each row re-arms its counter); cached per
    # device so that a decode step captured in a CUDA graph reuses one buffer.
    key = (device.type, device.index)
    buf = _arrival_bufs.get(key)
    if buf is None:
        buf = torch.zeros(MAX_ARRIVAL_ROWS, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return buf  # the graph's pool: zeroed by a memset captured in the graph
        _arrival_bufs[key] = buf
    return buf


@contextlib.contextmanager
def split_plan_scope(max_keys: int | None) -> Iterator[None]:
    """Within the block, this thread's :func:`decode_attention_fwd` launches that pick their
    own split count plan it for rows of at most ``max_keys`` keys instead of the cache's
    capacity ``L``: ``choose_num_splits(programs, min(L, max_keys), sms)``. ``None``
    restores the capacity.

    It never changes a result, only the work split: each program cuts its row's key
    range ``[lo, hi)`` into ``num_splits`` chunks from the row's length on the device, so
    any split count covers every key. A caller that knows its rows are short (the serving
    engine: the host knows every row's position) avoids the split-and-merge pass a
    long-capacity cache would otherwise plan for (below ``2 * MIN_SPLIT_KEYS`` keys one
    split is planned, and the kernel writes its output directly), and a CUDA graph
    captured inside the block keeps that plan.
    """
    if max_keys is not None and (
        isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1
    ):
        raise ValueError(
            f"split_plan_scope: max_keys must be a positive int or None, got {max_keys!r}"
        )
    old = getattr(_split_hint, "keys", None)
    _split_hint.keys = max_keys
    try:
        yield
    finally:
        _split_hint.keys = old


def choose_num_splits(programs: int, seq_len: int, sms: int) -> int:
    """Split count for ``programs`` (= B * Hkv * row blocks) programs over ``seq_len`` keys.

    Shapes only, never device values (CUDA-graph safe). A split covers at least
    ``MIN_SPLIT_KEYS`` keys and there are at most ``MAX_SPLITS``. Among those counts,
    with ``n = programs * s`` programs on ``sms`` SMs, ``waves = n / sms`` and the balance
    ``waves / ceil(waves)`` (the share of SM time the last, partial wave does not waste):
    take the smallest ``s`` giving at least two waves at balance >= 0.9 (the split
    kernel keeps two programs per SM, so two waves is where the GPU is full); when no count
    reaches two waves, the largest count with balance >= 0.9. The idea of scoring split
    counts by wave balance is FlashAttention-2's flash-decoding heuristic.
    """
    max_splits = max(1, min(MAX_SPLITS, seq_len // MIN_SPLIT_KEYS))
    if programs <= 0 or max_splits == 1:
        return 1

    def balance(s: int) -> float:
        waves = programs * s / sms
        return waves / math.ceil(waves)

    candidates = range(1, max_splits + 1)
    for s in candidates:
        if programs * s >= 2 * sms and balance(s) >= 0.9:
            return s
    good = [s for s in candidates if balance(s) >= 0.9]
    if good and programs * good[-1] < 2 * sms:
        return good[-1]
    return max(candidates, key=lambda s: (min(programs * s / sms, 2.0) * balance(s), -s))


def group_mode(
    kv_format: str,
    n_groups: int,
    d: int,
    rows: int,
    *,
    group_dots: bool = True,
    group_bcast: bool = True,
) -> str:
    """How the decode kernel applies the scales of a compressed store with ``n_groups`` groups.

    ``"one"``: dense, or one group (per-token scales folded into scores and
    probabilities). Several groups of ``GW = ceil(D / G)`` channels, and ``rows`` the
    padded query rows of a program (:func:`_plan`):

    * ``"dots"``: per-group dots. The raw codes of each group are dotted with the
      group's query slice and the scores scaled per key, ``s = sum_g (q_g . c_g) s_g``
      (int4 adds ``sum(q_g) (m_g + 8 s_g)``); the V scales are folded into the
      probabilities of each group's dot. Scale work is ``rows x BLOCK_N`` per group
      instead of ``BLOCK_N x D`` per tile, so this needs ``rows == 16`` (one decode
      token, GQA <= 16), the groups to tile D exactly (D a power of two), and ``GW >=
      32``: int4 scores dot a group's even and odd channels (``GW / 2`` deep; 16 is the
      least for 16-bit dots), and the value dots are ``GW`` channels wide (below 8 per
      warp, every warp would compute the whole tile).
    * ``"bcast"``: the tile is dequantized in registers (fp32) with the group scales
      loaded as ``[BLOCK_N, G]`` tiles and broadcast over the group's channels (a
      reshape, no per-element loads): the groups must tile D exactly, ``GW >= 2``.
    * ``"gather"``: any other layout (D not a power of two, uneven last group): the
      per-channel scale of every element is gathered from the token's scale row.

    ``group_dots=False`` / ``group_bcast=False`` rule out the first two (the next way down
    is taken), so that each way can be timed and tested on the same layouts.
    """
    if kv_format == "dense" or n_groups <= 1:
        return "one"
    gw = -(-d // n_groups)
    block_d = max(32 if kv_format == "int4" else 16, triton.next_power_of_2(d))
    if d != block_d or gw * n_groups != d:
        return "gather"
    if group_dots and gw >= 32 and rows == 16:
        return "dots"
    if group_bcast and gw >= 2:
        return "bcast"
    return "gather"


@functools.cache
def _plan(group: int, sq: int, d: int, min_block_d: int = 16) -> tuple[int, int, int]:
    """(ROWS, ROW_BLOCKS, BLOCK_D) for a KV group of ``group * sq`` query rows.

    ``min_block_d``: int4 dots half-width tiles (even / odd channels), so it needs 32.
    """
    block_d = max(min_block_d, triton.next_power_of_2(d))
    gs = group * sq
    max_rows = max(16, _MAX_TILE_ELEMS // block_d)
    rows = min(max(16, triton.next_power_of_2(gs)), max_rows)
    return rows, triton.cdiv(gs, rows), block_d


_KIVI_GPU_CONFIGS = (
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=4),
    triton.Config({}, num_warps=8, num_stages=3),
    # Register caps: uncapped, the kernel takes 231 registers a thread and one block per
    # SM (12.5% occupancy, Nsight Compute); a cap trades spills for blocks in flight.
    triton.Config({}, num_warps=4, num_stages=3, maxnreg=128),
    triton.Config({}, num_warps=4, num_stages=2, maxnreg=128),
    triton.Config({}, num_warps=4, num_stages=3, maxnreg=168),
)
_kivi_tuned = None
# The KIVI loop's variants (see _decode_kivi_kernel), all but V_AHEAD on by default;
# off, each falls back to the first loop (kept for the comparison and the tests):
# K_FULL  the key tile dequantized in channel order (the query a loop constant), instead
#         of the block's scales multiplying the query and a per-row constant; only for
#         D >= K_FULL_MIN_D: at D=64 it takes the loop from 663 to 851 instructions and
#         168 to 238 registers (sm_90 SASS of Triton 3.6, the GPU machine's), and on an
#         H100 SmolLM2's 9/3 D=64 shape from 320 to 536 us at B8 L131072 (MEASUREMENTS,
#         session 32);
# V_DEQ   the value tile dequantized in the model dtype (packed bf16/fp16 FMAs), not fp32;
# V_FULL  the value tile in channel order (one accumulator, vector shared-memory reads),
#         for key blocks of 32 and more: with 16-key blocks (a 16-deep PV dot) Triton 3.6
#         compiled it wrong on an H100 (relative error 0.4-1.1, 4 value groups);
# ASM     the nibbles converted by _nibbles_to's PTX;
# V_AHEAD the value scales loaded a tile ahead, as the key-block scales are (in the loop,
#         Triton leaves them a synchronous load that each tile waits on). Off: slower on
#         an H100 (53.1 -> 58.1 us at B1 L32768, session 31; not profiled).
# On sm_90 (scripts/decode_sass_probe.py, Triton 3.9) the loop issues 1208 instructions
# a 64-key tile with all four off, 792 with all four on (Triton 3.6, the GPU machine's:
# more, see MEASUREMENTS session 32); an H100 ran GQA 32/8 B1 L32768 D128 in 67.4 us with
# all off and 53.1 us with the defaults (SDPA 50.9 us; MEASUREMENTS, session 31).
# The INT8 split loop (one scale group) in a bf16 model: F16_CODES dots the codes in
# fp16, where the magic-exponent conversion is one integer add and one subtract per code
# pair (_codes_to); int8 -> bf16 has no exact trick (bf16 has 7 mantissa bits), and
# Triton's lowering of it took ~10 instructions per 4 codes (sm_90 SASS, 128-key tiles).
# The query is scaled to |q| <= 1 per row for fp16 and the probabilities renormalised
# (_pv_scaled), so the dots lose nothing against bf16 ones. Off: with it the 128-key
# loop issues 1358 instructions instead of 1462 (255 registers either way; sm_90 SASS of
# Triton 3.6), and an H100 ran GQA 32/8 B1 L32768 in 39.8 us tuned against 38.1 without
# (41.4 / 41.0 forced to 128-key tiles; MEASUREMENTS, session 32).
INT8_LOOP = {"F16_CODES": False}
_KIVI_VARIANTS = ("K_FULL", "V_DEQ", "V_FULL", "ASM", "V_AHEAD")  # the kernel's constexprs
KIVI_LOOP = {
    "K_FULL": True,
    "K_FULL_MIN_D": 128,
    "V_DEQ": True,
    "V_FULL": True,
    "ASM": True,
    "V_AHEAD": False,
}


def _launch_kivi(
    q,
    k,
    v,
    out,
    cache_lens,
    key_mask,
    head_active,
    ws,
    k_scale,
    v_scale,
    k_recent,
    v_recent,
    scale,
    window,
    num_splits,
    head_batch_stride,
    plan,
    key_block,
) -> None:
    # The KIVI split kernel (see _decode_kivi_kernel); same grid and workspace as the
    # per-token kernel, its own short autotune list (BLOCK_N is the key block).
    global _kivi_tuned
    bsz, hq, sq, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    group, rows, row_blocks, block_d = plan
    m_ws, l_ws, acc_ws = ws
    n_groups = v_scale.shape[3]
    gw = -(-d // n_groups)
    placeholder = cache_lens
    v_bcast = n_groups > 1 and d == block_d and gw * n_groups == d and gw >= 2
    args = (
        q,
        k,
        v,
        out,
        cache_lens,
        key_mask if key_mask is not None else placeholder,
        head_active if head_active is not None else placeholder,
        m_ws,
        l_ws,
        acc_ws,
        k_scale,
        v_scale,
        k_recent,
        v_recent,
        hq,
        hkv,
        seq,
        d,
        float(scale) * _LOG2E,
        int(window),
        num_splits,
        hq if head_batch_stride is None else int(head_batch_stride),
        *strides3(q, k, v, out, k_scale, v_scale),
        k_recent.shape[2],
        *strides3(k_recent, v_recent),
    )
    meta = dict(
        G=group,
        SQ=sq,
        ROWS=rows,
        ROW_BLOCKS=row_blocks,
        BLOCK_D=block_d,
        EVEN_D=d == block_d,
        HAS_KMASK=key_mask is not None,
        HAS_HEADS=head_active is not None,
        HAS_WINDOW=int(window) > 0,
        DIRECT=num_splits == 1,
        IN_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        T=key_block,
        NG=n_groups,
        GW=gw,
        V_BCAST=v_bcast,
        RENORM_V=q.dtype == torch.float16,
        EVEN_P=(d + 1) // 2 == block_d // 2,
        BLOCK_R=key_block,
        K_FULL=bool(KIVI_LOOP["K_FULL"]) and d == block_d and d >= KIVI_LOOP["K_FULL_MIN_D"],
        V_DEQ=KIVI_LOOP["V_DEQ"],
        V_FULL=KIVI_LOOP["V_FULL"] and v_bcast and gw >= 4 and key_block >= 32,
        ASM=KIVI_LOOP["ASM"] and not _INTERPRET and q.dtype != torch.float32,
        V_AHEAD=KIVI_LOOP["V_AHEAD"],
        **pdl_meta(q),
    )
    grid = (bsz * hkv * row_blocks, num_splits)
    forced = _FORCED["kivi"]
    if forced is not None or (not _AUTOTUNE and not _INTERPRET):
        c = forced or _KIVI_GPU_CONFIGS[0]
        cap = {} if c.maxnreg is None else {"maxnreg": c.maxnreg}
        _decode_kivi_kernel[grid](
            *args, **meta, num_warps=c.num_warps, num_stages=c.num_stages, **cap
        )
    elif _AUTOTUNE:
        if _kivi_tuned is None:
            _kivi_tuned = autotune(
                list(_KIVI_GPU_CONFIGS),
                key=["BLOCK_D", "ROWS", "num_splits", "T", "NG", *_KIVI_VARIANTS],
            )(_decode_kivi_kernel)
        _kivi_tuned[grid](*args, **meta)
    else:
        _decode_kivi_kernel[grid](*args, **meta, num_warps=1, num_stages=1)


# --------------------------------------------------------------------------- launcher


def decode_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float,
    window: int,
    key_mask: torch.Tensor | None,
    head_active: torch.Tensor | None,
    num_splits: int | None = None,
    head_batch_stride: int | None = None,
    kv_format: str = "dense",
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_recent: torch.Tensor | None = None,
    v_recent: torch.Tensor | None = None,
    wrap: bool = False,
    key_block: int = 0,
    scales_ahead: bool = True,
    group_dots: bool = True,
    group_bcast: bool = True,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Flash-decoding attention of ``Sq`` new queries against a KV cache, into ``out``.

    ``out[b, h, t] = softmax_j(scale * q[b, h, t] . k_j) @ v_j`` over the positions ``j``
    visible to query ``t`` (position ``p_t = cache_lens[b] - Sq + t``): ``j <
    cache_lens[b]``, ``j <= p_t``, readable (``j < L``, or with ``wrap`` ``j >=
    cache_lens[b] - L``), ``key_mask[b, slot(j)] != 0`` when given, ``p_t - j < window``
    when ``window > 0``. ``k_j`` / ``v_j`` are the (dequantized) vectors of KV head ``h //
    G`` at slot ``j`` (``j % L`` with ``wrap``), or ``k_recent[b, h // G, j % W]`` for the
    last ``W`` positions when a recent ring is given: the rule of
    ``reference.decode_attention``. Rows with no visible key and heads with
    ``head_active[b * Hq + h] == 0`` are written as exact zeros. fp32 softmax and
    accumulation, rounded once to ``out.dtype``.

    Args:
        q: ``[B, Hq, Sq, D]`` (Sq <= 64), fp16/bf16/fp32.
        k, v: the cache, ``Hq % Hkv == 0``: ``[B, Hkv, L, D]`` in q's dtype (dense),
            int8 codes ``[B, Hkv, L, D]`` or packed int4 codes uint8 ``[B, Hkv, L,
            ceil(D / 2)]`` (formats of ``reference.kv_formats``).
        out: ``[B, Hq, Sq, D]`` in ``q.dtype``; every element is written.
        cache_lens: int32 ``[B]`` on the device, values in ``[0, L]`` (any value >= 0
            with ``wrap``).
        scale: softmax scale. window: sliding window, 0 = none.
        key_mask: int8 ``[B, L]`` contiguous (nonzero = keep), indexed by slot, or ``None``.
        head_active: ``None`` (all active), or per-head flags, nonzero = active (any
            integer/float/uint8-viewed-bool dtype) read at ``b * head_batch_stride + h``:
            the caller's own ``[B, Hq]`` or ``[Hq]`` mask (stride 0) needs no table.
        head_batch_stride: batch stride of ``head_active`` (default ``Hq``, a flat table).
        num_splits: KV splits per row; ``None`` picks :func:`choose_num_splits` from the
            programs, the capacity ``L`` (or :func:`split_plan_scope`'s smaller ``max_keys``)
            and the SM count.
        kv_format: ``"dense"``, ``"int8"`` or ``"int4"``.
        k_scale, v_scale: float16 ``[B, Hkv, L, G]`` (int8) or ``[B, Hkv, L, G, 2]``
            (int4, trailing ``[G, 2]`` contiguous); ``None`` for dense.
        k_recent, v_recent: ``[B, Hkv, W, D]`` in q's dtype (both or neither), or ``None``.
        wrap: ring cache, position ``j`` in slot ``j % L``.
        key_block: ``T > 0``: a KIVI cache (int4 keys per channel per block of ``T`` slots,
            ``k_scale [B, Hkv, L / T, D, 2]``; positions ``>= floor(len / T) * T`` from the
            rings): :func:`_decode_kivi_kernel`. ``T`` a power of two in [16, 256].
        scales_ahead: load the scales of a compressed store a tile ahead of their use
            (the default); ``False`` loads them in the tile that uses them.
        group_dots, group_bcast: allow those ways of applying several scale groups
            (:func:`group_mode`); the defaults pick the fastest the layout allows.
        rope: ``(k_new, v_new, cos, sin)``: the step's own rotary embedding and append
            in the same launch, where :func:`rope_fold_fits` holds. ``q`` and ``k_new``
            ``[B, Hkv, Sq, D]`` (unit last stride) come unrotated, ``cos``/``sin`` are
            ``[B', Sq, D]`` (``B'`` 1 or ``B``) and ``cache_lens`` (int32, contiguous)
            holds the lengths *before* the step. Each program rotates its query rows;
            the program whose key range holds a new position rotates that key, writes it
            and the value into the cache and reads them back in its loop; the last program
            of a row to arrive (an arrival counter, re-armed) stores ``cache_lens[b] +
            Sq``. The result and the cache are those of ``rope_kv_append`` followed by
            this function: the same rotation rounding (exact products: no FMA
            contraction) and the same attention kernel, config for config; the config is
            the default candidate, never autotuned (a tuning run would append again).

    All tensors need unit stride in the last dimension (other strides are free). No host
    syncs and only ``torch.empty`` allocations: capturable in a CUDA graph. The op layer
    (``sentinel_kernels.ops``) validates the inputs.
    """
    bsz, hq, sq, d = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    groups = 1 if k_scale is None or kv_format == "dense" else k_scale.shape[3]
    if rope is not None and not rope_fold_fits(
        q, hkv, cache_lens, kv_format, groups, k_recent is not None, wrap, key_block
    ):
        raise ValueError("decode_attention_fwd: rope= needs rope_fold_fits (see its docstring)")
    if out.numel() == 0:
        return
    fmt = _FORMATS[kv_format]
    group = hq // hkv
    rows, row_blocks, block_d = _plan(group, sq, d, 32 if fmt == 2 else 16)
    programs = bsz * hkv * row_blocks
    if num_splits is None:
        # With a head mask, pruned groups' programs exit at once: split as if only half
        # the programs worked, so the active ones still fill the GPU (an H200 probe,
        # bench/results/*decode_split_probe.txt: 50% of groups pruned, 6 -> 8 splits, 48 -> 45 us;
        # dense with 8 instead of 6 splits costs about 2%).
        busy = programs if head_active is None else max(1, programs // 2)
        if key_block:
            # KIVI tiles are one key block (32-128 keys) and each waits on its query
            # scaling: twice the programs hide more of that latency (H200,
            # bench/results/*kivi_decode_probe.json: GQA 32/8 B8 L8192, T=64, 6 -> 12 splits,
            # 130 -> 104 us; 24 or 48 splits are slower again).
            busy = max(1, busy // 2)
        hint = getattr(_split_hint, "keys", None)
        plan_keys = seq if hint is None else min(seq, hint)
        num_splits = choose_num_splits(busy, plan_keys, _num_sms(q))
    num_splits = max(1, int(num_splits))
    direct = num_splits == 1
    gs = group * sq

    if direct:
        # Never touched with DIRECT: any fp32 tensor stands in for the workspace.
        m_ws = l_ws = acc_ws = torch.empty((1,), dtype=torch.float32, device=q.device)
    else:
        slots = bsz * hkv * num_splits * gs
        m_ws = torch.empty((slots,), dtype=torch.float32, device=q.device)
        l_ws = torch.empty((slots,), dtype=torch.float32, device=q.device)
        acc_ws = torch.empty((slots * d,), dtype=torch.float32, device=q.device)
        if _INTERPRET:
            # Poison, so that a program that forgets its slice fails the tests.
            for w in (m_ws, l_ws, acc_ws):
                w.fill_(float("nan"))

    # Compressed formats: scale groups (G == 1 folds the scales into scores and p).
    if fmt == 0:
        n_groups, ks_strides, vs_strides = 1, (0, 0, 0), (0, 0, 0)
    else:
        n_groups = k_scale.shape[3]
        ks_strides = strides3(k_scale)
        vs_strides = strides3(v_scale)
    ring = k_recent is not None
    if ring:
        w_ring = k_recent.shape[2]
        kr_strides = strides3(k_recent)
        vr_strides = strides3(v_recent)
    else:
        w_ring, kr_strides, vr_strides = 1, (0, 0, 0), (0, 0, 0)
    placeholder = cache_lens  # pointers of absent inputs are never read
    if rope is not None:
        k_new, v_new, cos, sin = rope
        rope_ptrs = (k_new, v_new, cos, sin, _arrivals(q.device))
        rope_strides = (
            *strides3(k_new, v_new),
            cos.stride(0) if cos.shape[0] > 1 else 0,
            *cos.stride()[1:],
            sin.stride(0) if sin.shape[0] > 1 else 0,
            *sin.stride()[1:],
        )
    else:
        rope_ptrs = (placeholder,) * 5
        rope_strides = (0,) * 12
    dp = (d + 1) // 2
    append = append_layout(kv_format, d, k_scale)
    mode = group_mode(kv_format, n_groups, d, rows, group_dots=group_dots, group_bcast=group_bcast)
    if key_block:
        _launch_kivi(
            q,
            k,
            v,
            out,
            cache_lens,
            key_mask,
            head_active,
            (m_ws, l_ws, acc_ws),
            k_scale,
            v_scale,
            k_recent,
            v_recent,
            scale,
            window,
            num_splits,
            head_batch_stride,
            (group, rows, row_blocks, block_d),
            key_block,
        )
    else:
        args = (
            q,
            k,
            v,
            out,
            cache_lens,
            key_mask if key_mask is not None else placeholder,
            head_active if head_active is not None else placeholder,
            m_ws,
            l_ws,
            acc_ws,
            k_scale if fmt else placeholder,
            v_scale if fmt else placeholder,
            k_recent if ring else placeholder,
            v_recent if ring else placeholder,
            *rope_ptrs,
            hq,
            hkv,
            seq,
            d,
            float(scale) * _LOG2E,
            int(window),
            num_splits,
            hq if head_batch_stride is None else int(head_batch_stride),
            *strides3(q, k, v, out),
            *ks_strides,
            *vs_strides,
            w_ring,
            *kr_strides,
            *vr_strides,
            *rope_strides,
            triton.next_power_of_2(max(seq, 1)),
            # One launch config does not suit one row and 64 rows alike (grid size).
            triton.next_power_of_2(programs),
        )
        meta = dict(
            G=group,
            SQ=sq,
            ROWS=rows,
            ROW_BLOCKS=row_blocks,
            BLOCK_D=block_d,
            EVEN_D=d == block_d,
            HAS_KMASK=key_mask is not None,
            HAS_HEADS=head_active is not None,
            HAS_WINDOW=int(window) > 0,
            DIRECT=direct,
            IN_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            FMT=fmt,
            GW=-(-d // n_groups),
            GROUPED=n_groups > 1,
            EVEN_P=dp == block_d // 2,
            NG=n_groups,
            GROUP_DOTS=mode == "dots",
            GROUP_BCAST=mode == "bcast",
            HAS_RING=ring,
            WRAP=bool(wrap),
            RENORM_V=q.dtype == torch.float16,
            SCALES_AHEAD=scales_ahead and fmt != 0 and mode != "gather",
            ROPE=rope is not None,
            F16_CODES=INT8_LOOP["F16_CODES"]
            and fmt == 1
            and mode == "one"
            and q.dtype == torch.bfloat16,
            SQ_P=triton.next_power_of_2(sq),
            **{f"A_{n}": getattr(append, n) for n in _APPEND_FIELDS},
            **pdl_meta(q),
        )
        grid = (programs, num_splits)
        # Shared memory per stage follows the streamed bytes: codes (int4 counted as a byte
        # per channel, conservatively), or q's dtype where a full-precision ring loop also runs.
        elem = q.element_size() if fmt == 0 or ring else 1
        # fp32 dequantized tiles are twice the registers: keep the dense candidates (64 keys).
        forced = _FORCED["split"]
        configs = (
            (forced,)
            if forced is not None
            else _configs(block_d, rows, elem, fmt != 0 and q.element_size() < 4)
        )
        if _AUTOTUNE and len(configs) > 1 and rope is None:
            _tuned(configs)[grid](*args, **meta)
        else:
            c = configs[0]
            # The step's append quantizes by kv_append's arithmetic, which is compiled
            # without FMA contraction (its codes, bit for bit).
            fusion = {} if rope is None else {"enable_fp_fusion": False}
            if c.maxnreg is not None:
                fusion["maxnreg"] = c.maxnreg
            _split_jit[grid](
                *args,
                **meta,
                **c.kwargs,
                num_warps=c.num_warps,
                num_stages=c.num_stages,
                **fusion,
            )

    if not direct:
        # Merge tile [BLOCK_S, BLOCK_D] of at most 4096 fp32 values per iteration.
        block_s = min(triton.next_power_of_2(num_splits), max(1, 4096 // block_d))
        _decode_combine_kernel[(bsz * hkv * gs,)](
            m_ws,
            l_ws,
            acc_ws,
            out,
            hkv,
            d,
            num_splits,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            G=group,
            SQ=sq,
            BLOCK_D=block_d,
            BLOCK_S=block_s,
            **pdl_meta(q),
            num_warps=1 if _INTERPRET else 4,
        )

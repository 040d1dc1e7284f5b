"""Reference compressed KV cache: quantize-on-append and decode attention over it.

The storage formats every backend (Triton, C++) reads and writes bit for bit. A cache
holds, per (batch row, KV head), ``L`` slots of one head vector (``D`` channels) each:

``"dense"``
    ``cache [B, H, L, D]`` in the model dtype; no scales.
``"int8"`` (symmetric, per group of channels)
    ``cache [B, H, L, D]`` int8 codes and ``scales [B, H, L, G]`` float16, where the
    ``D`` channels are cut into ``G`` groups of ``g = ceil(D / G)`` (the last may be
    shorter; ``ceil(D / g) == G`` is required). Per group, in fp32::

        a    = max |x_c|
        s    = float16(min(a / 127, 65504))         (the stored scale)
        code = 0 if s == 0 else clamp(rint(x_c / s), -127, 127)     (rint: half to even)
        x_c ~= code * s

``"int4"`` (asymmetric, per group, KIVI-style min/scale)
    ``cache [B, H, L, ceil(D / 2)]`` uint8, two codes per byte: channel ``c`` lives in
    byte ``c // 2``, in the low nibble when ``c`` is even (an odd ``D`` leaves the last
    high nibble 0). ``scales [B, H, L, G, 2]`` float16 holding ``(s, m)``::

        lo, hi = min x_c, max x_c
        s    = float16(min((hi - lo) / 15, 65504));  m = float16(clamp(lo, -65504, 65504))
        code = 0 if s == 0 else clamp(rint((x_c - m) / s), 0, 15)
        x_c ~= code * s + m

Every quantization step is one correctly rounded fp32 operation (division, subtraction,
no fused multiply-add), so backends agree exactly on codes and scales.

Slots and positions. Token position ``j`` of row ``b`` lives in slot ``j`` or, for a
*wrapping* (ring) cache, slot ``j % L``; a wrapping cache keeps only the last ``L``
positions, so position ``j`` is readable only while ``j >= len_b - L``. An optional
full-precision *recent ring* ``recent [B, H, W, D]`` (model dtype) holds the last ``W``
positions as well, in slot ``j % W``: readers take positions ``j >= len_b - W`` from it
instead of the compressed store (KIVI keeps such a residual window in full precision).

KIVI keys (``key_block = T > 0``, int4 only). Keys are quantized *per channel* over
blocks of ``T`` consecutive positions (KIVI, Liu et al. 2024: key outliers sit in fixed
channels, so a channel's range over a few tokens is tight while a token's range over its
channels is not). ``k_cache [B, H, L, ceil(D/2)]`` holds the packed codes of position
``j`` in slot ``j`` (``L`` a multiple of ``T``, no wrapping) and ``k_scale [B, H, L / T,
D, 2]`` float16 the ``(s, m)`` pair of each channel of each block; per channel ``c`` of
block ``i`` (positions ``iT .. iT + T - 1``), with the int4 rule above over the ``T``
values ``x_{j,c}`` instead of a group of channels. A block is quantized when its last
position is appended; until then its keys (and values) are read from the full-precision
ring ``k_recent / v_recent [B, H, W, D]`` (``W >= T``, a multiple of ``T``; slot ``j %
W``), which receives every appended key and value. Readers take positions ``j >=
floor(len_b / T) * T`` from the ring, the rest from the stores (values stay per token,
int4 groups as above). Keys are rounded to the ring's dtype before they are quantized, so
a block quantizes the same numbers whether its positions came from the ring or from the
chunk being appended.

Decode attention over such a cache is :func:`sentinel_kernels.reference.attention` over
the logical keys ``k_j`` (dequantized, or from the recent ring) of positions ``j <
len_b``, with query ``t`` of ``Sq`` at position ``len_b - Sq + t``, causal; a key padding
mask ``attn_mask [B, L]`` is indexed by slot.
"""

from __future__ import annotations

import math

import torch

from .attention import attention

__all__ = [
    "KV_FORMATS",
    "kv_append",
    "kv_append_key_blocks",
    "quantize_key_block",
    "dequantize_key_block",
    "kv_bytes_per_token",
    "kv_code_width",
    "kv_groups",
    "kv_scale_shape",
    "dequantize_kv",
    "quantize_kv",
    "decode_attention_kv",
]

KV_FORMATS = ("dense", "int8", "int4")
_F16_MAX = 65504.0


def kv_groups(d: int, n_groups: int) -> int:
    """Group width ``g = ceil(D / G)``; raises ``ValueError`` unless ``ceil(D / g) == G``."""
    if n_groups < 1 or n_groups > d:
        raise ValueError(f"KV scale groups must be in [1, head_dim={d}], got {n_groups}")
    g = -(-d // n_groups)
    if -(-d // g) != n_groups:
        raise ValueError(
            f"head_dim {d} cannot be cut into {n_groups} groups of ceil({d}/{n_groups}) = {g}"
        )
    return g


def kv_code_width(d: int, kv_format: str) -> int:
    """Last-dimension size of the code tensor: ``D`` (dense, int8) or ``ceil(D / 2)`` (int4)."""
    return (d + 1) // 2 if kv_format == "int4" else d


def kv_scale_shape(lead: tuple[int, ...], n_groups: int, kv_format: str) -> tuple[int, ...]:
    """Scale tensor shape for code tensor leading dims ``lead`` (``()`` for dense)."""
    if kv_format == "int8":
        return (*lead, n_groups)
    if kv_format == "int4":
        return (*lead, n_groups, 2)
    return ()


def kv_bytes_per_token(d: int, kv_format: str, n_groups: int = 1, elem_size: int = 2) -> int:
    """Bytes one head vector takes (codes plus scales) in ``kv_format``."""
    if kv_format == "dense":
        return d * elem_size
    if kv_format == "int8":
        return d + 2 * n_groups
    if kv_format == "int4":
        return (d + 1) // 2 + 4 * n_groups
    raise ValueError(f"unknown KV format {kv_format!r}; expected one of {KV_FORMATS}")


def _to_f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[..., D]`` fp32 -> ``[..., G, g]`` padded with NaN (ignored by nan-aware reductions)."""
    d = x.shape[-1]
    n = -(-d // g)
    pad = n * g - d
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-1], pad), float("nan"))], dim=-1)
    return x.view(*x.shape[:-1], n, g)


def quantize_kv(
    x: torch.Tensor, kv_format: str, n_groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize head vectors ``x [..., D]`` by the rule in the module docstring.

    Returns ``(codes, scales)``: int8 ``[..., D]`` and float16 ``[..., G]`` for int8;
    packed uint8 ``[..., ceil(D/2)]`` and float16 ``[..., G, 2]`` for int4.
    """
    if kv_format not in ("int8", "int4"):
        raise ValueError(f"quantize_kv: kv_format must be 'int8' or 'int4', got {kv_format!r}")
    d = x.shape[-1]
    g = kv_groups(d, n_groups)
    xf = _grouped(x.float(), g)  # [..., G, g], NaN padding
    valid = ~torch.isnan(xf)
    if kv_format == "int8":
        a = torch.where(valid, xf.abs(), torch.zeros_like(xf)).amax(dim=-1)
        s16 = _to_f16(torch.minimum(a / torch.full_like(a, 127.0), torch.full_like(a, _F16_MAX)))
        s = s16.float()[..., None]
        safe = torch.where(s == 0, torch.ones_like(s), s)
        code = torch.where(s == 0, torch.zeros_like(xf), torch.round(xf / safe))
        code = code.clamp(-127, 127)
        code = code.flatten(-2)[..., :d].to(torch.int8)
        return code, s16
    lo = torch.where(valid, xf, torch.full_like(xf, float("inf"))).amin(dim=-1)
    hi = torch.where(valid, xf, torch.full_like(xf, float("-inf"))).amax(dim=-1)
    s16 = _to_f16(
        torch.minimum((hi - lo) / torch.full_like(lo, 15.0), torch.full_like(lo, _F16_MAX))
    )
    m16 = _to_f16(lo)
    s, m = s16.float()[..., None], m16.float()[..., None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    code = torch.where(s == 0, torch.zeros_like(xf), torch.round((xf - m) / safe))
    code = code.clamp(0, 15).flatten(-2)[..., :d].to(torch.uint8)
    if d % 2:
        code = torch.cat([code, code.new_zeros((*code.shape[:-1], 1))], dim=-1)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, torch.stack([s16, m16], dim=-1)


def dequantize_kv(
    codes: torch.Tensor, scales: torch.Tensor, kv_format: str, d: int
) -> torch.Tensor:
    """fp32 ``[..., D]`` from :func:`quantize_kv`'s ``(codes, scales)``."""
    if kv_format == "int8":
        n = scales.shape[-1]
        g = kv_groups(d, n)
        s = scales.float().repeat_interleave(g, dim=-1)[..., :d]
        return codes.float() * s
    if kv_format == "int4":
        n = scales.shape[-2]
        g = kv_groups(d, n)
        lo = codes & 0xF
        hi = codes >> 4
        code = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :d].float()
        s = scales[..., 0].float().repeat_interleave(g, dim=-1)[..., :d]
        m = scales[..., 1].float().repeat_interleave(g, dim=-1)[..., :d]
        return code * s + m
    raise ValueError(f"dequantize_kv: kv_format must be 'int8' or 'int4', got {kv_format!r}")


def quantize_key_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI keys: int4 per channel over a block of tokens, ``x [..., T, D]``.

    Returns packed uint8 codes ``[..., T, ceil(D/2)]`` (the int4 layout) and float16
    ``(s, m)`` pairs ``[..., D, 2]``: the int4 rule with ``lo, hi`` the min / max of
    channel ``c`` over the ``T`` tokens.
    """
    xt = x.float().transpose(-1, -2)  # [..., D, T]: one "group" of T values per channel
    packed, sc = quantize_kv(xt, "int4", 1)  # codes of [..., D, T] packed along T: unpack
    d, t = xt.shape[-2], xt.shape[-1]
    lo = packed & 0xF
    hi = packed >> 4
    code = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :t]  # [..., D, T]
    code = code.transpose(-1, -2)  # [..., T, D]
    if d % 2:
        code = torch.cat([code, code.new_zeros((*code.shape[:-1], 1))], dim=-1)
    return code[..., 0::2] | (code[..., 1::2] << 4), sc[..., 0, :]


def dequantize_key_block(codes: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
    """fp32 ``[..., T, D]`` from :func:`quantize_key_block`'s ``(codes, scales [..., D, 2])``."""
    lo = codes & 0xF
    hi = codes >> 4
    code = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :d].float()
    return code * scales[..., 0].float().unsqueeze(-2) + scales[..., 1].float().unsqueeze(-2)


def kv_append_key_blocks(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    ring: torch.Tensor,
    start: torch.Tensor,
    block: int,
) -> None:
    """Append keys ``x [B, H, S, D]`` to a KIVI key cache (module docstring) in place.

    For each row ``b``, every block completed by positions ``start[b] .. start[b] + S - 1``
    is quantized per channel (its earlier positions read from ``ring``, slot ``j % W``)
    into ``codes [B, H, L, ceil(D/2)]`` and ``scales [B, H, L / T, D, 2]`` (blocks past
    ``L`` are skipped); then the new keys are written to ``ring [B, H, W, D]`` (only the
    last ``W`` when ``S > W``). The blocks are quantized before the ring is written: a
    long chunk would otherwise overwrite the ring slots of its first block's older keys.
    """
    b, h, s, d = x.shape
    cap = codes.shape[2]
    w = ring.shape[2]
    xr = x.to(ring.dtype)
    for bi in range(b):
        st = int(start[bi])
        end = st + s
        for blk in range(st // block, end // block):
            lo = blk * block
            if lo + block > cap:
                break
            rows = []
            for j in range(lo, lo + block):
                rows.append(ring[bi, :, j % w] if j < st else xr[bi, :, j - st])
            c, sc = quantize_key_block(torch.stack(rows, dim=1))
            codes[bi, :, lo : lo + block] = c
            scales[bi, :, blk] = sc
        for j in range(max(st, end - w), end):
            ring[bi, :, j % w] = xr[bi, :, j - st]


def kv_append(
    x: torch.Tensor,
    cache: torch.Tensor,
    start: torch.Tensor,
    kv_format: str = "dense",
    scales: torch.Tensor | None = None,
    wrap: bool = False,
) -> None:
    """Write ``x [B, H, S, D]`` into ``cache`` (and ``scales``) in place.

    Token ``i`` of row ``b`` goes to position ``start[b] + i``: slot ``start[b] + i`` (must
    be ``< L``; slots past the end are not written) or, with ``wrap``, slot
    ``(start[b] + i) % L``. When ``S > L`` with ``wrap`` only the last ``L`` tokens land.
    """
    b, h, s, d = x.shape
    cap = cache.shape[2]
    if kv_format == "dense":
        codes, sc = x.to(cache.dtype), None
    else:
        n = scales.shape[-1] if kv_format == "int8" else scales.shape[-2]
        codes, sc = quantize_kv(x, kv_format, n)
    for bi in range(b):
        st = int(start[bi])
        for i in range(s):
            pos = st + i
            if wrap:
                if s - i > cap:  # overwritten later in this same append
                    continue
                slot = pos % cap
            elif pos >= cap:
                continue
            else:
                slot = pos
            cache[bi, :, slot] = codes[bi, :, i]
            if sc is not None:
                scales[bi, :, slot] = sc[bi, :, i]


def _logical_keys(
    store: torch.Tensor,
    scales: torch.Tensor | None,
    recent: torch.Tensor | None,
    kv_format: str,
    d: int,
    lens: list[int],
    wrap: bool,
    npos: int,
    key_block: int = 0,
    per_channel: bool = False,
) -> torch.Tensor:
    """fp32 ``[B, H, npos, D]``: the vector each position reads (0 where unreadable).

    ``key_block > 0`` (a KIVI cache): the ring holds positions ``>= floor(len / T) * T``
    (keys and values alike); ``per_channel``: ``store``/``scales`` are KIVI keys
    (per-channel scales per block of ``T`` slots), else per-token as usual.
    """
    b, h, cap = store.shape[0], store.shape[1], store.shape[2]
    if kv_format == "dense":
        full = store.float()
    elif per_channel:
        nb = cap // key_block
        blocks = store.view(b, h, nb, key_block, store.shape[3])
        full = dequantize_key_block(blocks, scales, d).reshape(b, h, cap, d)
    else:
        full = dequantize_kv(store, scales, kv_format, d)
    out = torch.zeros(b, h, npos, d, dtype=torch.float32, device=store.device)
    w = recent.shape[2] if recent is not None else 0
    for bi in range(b):
        ring_from = (lens[bi] // key_block) * key_block if key_block else lens[bi] - w
        for j in range(min(lens[bi], npos)):
            if w and j >= ring_from:
                out[bi, :, j] = recent[bi, :, j % w].float()
            elif wrap:
                if j >= lens[bi] - cap:
                    out[bi, :, j] = full[bi, :, j % cap]
            elif j < cap:
                out[bi, :, j] = full[bi, :, j]
    return out


def decode_attention_kv(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    kv_format: str = "dense",
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int = 0,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_recent: torch.Tensor | None = None,
    v_recent: torch.Tensor | None = None,
    wrap: bool = False,
    key_block: int = 0,
) -> torch.Tensor:
    """Decode attention over a (compressed, possibly wrapping) cache; the module's rule.

    ``key_block = T > 0``: KIVI keys (``k_scale [B, Hkv, L / T, D, 2]``), values per
    token, positions ``>= floor(len / T) * T`` from the rings (module docstring).

    ``q [B, Hq, Sq, D]``; ``k_cache``/``v_cache`` and scales in ``kv_format`` (module
    docstring); ``cache_lens [B]`` positions written so far per row (may exceed ``L`` when
    ``wrap``); ``k_recent``/``v_recent [B, Hkv, W, D]`` or ``None``; ``attn_mask [B, L]``
    by slot. Returns ``[B, Hq, Sq, D]`` in q's dtype (fp32 math, fp64 for fp64 q).
    """
    b, hq, sq, d = q.shape
    cap = k_cache.shape[2]
    lens = [int(x) for x in cache_lens.tolist()]
    npos = max(max(lens, default=0), 1)
    if key_block:
        if kv_format != "int4" or wrap or k_recent is None or v_recent is None:
            raise ValueError(
                "decode_attention_kv: key_block (KIVI keys) needs kv_format "
                "'int4', rings k_recent/v_recent and no wrap"
            )
    kf = _logical_keys(
        k_cache,
        k_scale,
        k_recent,
        kv_format,
        d,
        lens,
        wrap,
        npos,
        key_block,
        per_channel=key_block > 0,
    )
    vf = _logical_keys(v_cache, v_scale, v_recent, kv_format, d, lens, wrap, npos, key_block)
    # Readable positions: j < len (by cache_lens), not overwritten (wrap), and the slot's
    # padding-mask bit.
    keep = torch.ones(b, npos, dtype=torch.bool, device=q.device)
    j = torch.arange(npos, device=q.device)
    for bi in range(b):
        if wrap:
            keep[bi] &= j >= lens[bi] - cap
        else:
            keep[bi] &= j < cap
        if attn_mask is not None:
            slot = (j % cap) if wrap else j.clamp(max=cap - 1)
            keep[bi] &= attn_mask[bi].to(q.device)[slot] != 0
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = attention(
        q.to(acc),
        kf.to(acc),
        vf.to(acc),
        causal=True,
        head_mask=head_mask,
        attn_mask=keep,
        scale=1.0 / math.sqrt(d) if scale is None else scale,
        window=window,
        cache_lens=cache_lens,
    )
    return out.to(q.dtype)

"""Reference KV-cache storage formats: code widths, group scales, quantize / dequantize.

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

Appending into such a cache is :mod:`sentinel_kernels.reference.kv_append`; attention over
it, :mod:`sentinel_kernels.reference.decode_attention`.
"""

from __future__ import annotations

import torch

__all__ = [
    "KV_FORMATS",
    "dequantize_key_block",
    "dequantize_kv",
    "kv_bytes_per_token",
    "kv_code_width",
    "kv_groups",
    "kv_scale_shape",
    "pack_int4",
    "quantize_key_block",
    "quantize_kv",
    "unpack_int4",
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


def pack_int4(code: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., D]`` in ``[0, 15]`` -> the int4 layout ``[..., ceil(D / 2)]``:
    channel ``c`` in byte ``c // 2``, low nibble when ``c`` is even (odd ``D``: last high
    nibble 0)."""
    if code.shape[-1] % 2:
        code = torch.cat([code, code.new_zeros((*code.shape[:-1], 1))], dim=-1)
    return code[..., 0::2] | (code[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The ``D`` uint8 codes of :func:`pack_int4`'s bytes ``[..., ceil(D / 2)]``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :d]


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
    return pack_int4(code), torch.stack([s16, m16], dim=-1)


def dequantize_kv(
    codes: torch.Tensor, scales: torch.Tensor, kv_format: str, d: int
) -> torch.Tensor:
    """fp32 ``[..., D]`` from :func:`quantize_kv`'s ``(codes, scales)``."""
    if kv_format == "int8":
        g = kv_groups(d, scales.shape[-1])
        s = scales.float().repeat_interleave(g, dim=-1)[..., :d]
        return codes.float() * s
    if kv_format == "int4":
        g = kv_groups(d, scales.shape[-2])
        s = scales[..., 0].float().repeat_interleave(g, dim=-1)[..., :d]
        m = scales[..., 1].float().repeat_interleave(g, dim=-1)[..., :d]
        return unpack_int4(codes, d).float() * s + m
    raise ValueError(f"dequantize_kv: kv_format must be 'int8' or 'int4', got {kv_format!r}")


def quantize_key_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI keys: int4 per channel over a block of tokens, ``x [..., T, D]``.

    Returns packed uint8 codes ``[..., T, ceil(D/2)]`` (the int4 layout) and float16
    ``(s, m)`` pairs ``[..., D, 2]``: the int4 rule with ``lo, hi`` the min / max of
    channel ``c`` over the ``T`` tokens.
    """
    xt = x.float().transpose(-1, -2)  # [..., D, T]: one "group" of T values per channel
    packed, sc = quantize_kv(xt, "int4", 1)  # codes of [..., D, T] packed along T: unpack
    code = unpack_int4(packed, xt.shape[-1]).transpose(-1, -2)  # [..., T, D]
    return pack_int4(code), sc[..., 0, :]


def dequantize_key_block(codes: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
    """fp32 ``[..., T, D]`` from :func:`quantize_key_block`'s ``(codes, scales [..., D, 2])``."""
    code = unpack_int4(codes, d).float()
    return code * scales[..., 0].float().unsqueeze(-2) + scales[..., 1].float().unsqueeze(-2)

"""Sizes of a :func:`~sentinel_kernels.cache.kv_cache`, computed without allocating.

Layout by length. The full-precision ring is a fixed cost (for KIVI, a K and a V ring of
``2 * 64`` slots of ``D`` model-dtype values per layer, head and batch row), so over a
short cache it would outweigh what the codes save. With the default ``key_block`` and
``recent``, :func:`~sentinel_kernels.cache.kv_cache` therefore decides on the host, from
sizes alone: an int4 cache uses KIVI keys when ``L`` is at least :func:`kv_cache_switch_len`
(the length from which a KIVI cache is never larger than a dense one of the same model,
batch and dtype: 157 slots for SmolLM2-135M in float32, 204 in bfloat16, at any batch
size), and per-token keys below; a per-token int4/int8 cache gets the largest ring up to
:data:`~sentinel_kernels.cache.spec.DEFAULT_RECENT` that keeps it within the dense bytes
(for SmolLM2 in float32: 32 slots from ``L = 38`` on, none at ``L = 1``). So a compressed
cache built with the defaults is never larger than the dense one, for any ``L >= 1``
(low-rank latents never are: ``r <= D``); explicit ``key_block``/``recent`` are used as
given. :func:`kv_cache_layout` says which layout ``kv_cache`` would build, and
:func:`kv_cache_bytes` / :func:`kv_cache_len_for_budget` follow the same choice.

Bytes per layer (``B`` rows, ``H`` KV heads, ``L`` slots, head dim ``D``, ``G`` scale groups,
``e`` bytes per model-dtype element, ring ``R``), exactly what
:class:`~sentinel_kernels.cache.SentinelKVLayer` allocates:

* dense: ``2 B H L D e``; low-rank ``r``: ``2 B H L r e``;
* int8: ``2 B H L (D + 2 G)``; int4 per-token keys: ``2 B H L (ceil(D/2) + 4 G)``;
* int4 KIVI keys (block ``T``, ``L`` rounded up to whole blocks): keys
  ``B H (L ceil(D/2) + (L/T) D 4)``, values ``B H L (ceil(D/2) + 4 G)``;
* plus the rings ``2 B H R D e`` and the lengths ``4 B``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..reference.kv_formats import kv_code_width
from . import spec as _spec
from .spec import (
    CacheSpec,
    parse_spec,
    resolve_groups,
    resolve_key_block,
    resolve_recent,
    resolve_ring,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "LayerGeometry",
    "Layout",
    "check_sizes",
    "describe",
    "kv_cache_bytes",
    "kv_cache_layout",
    "kv_cache_len_for_budget",
    "kv_cache_switch_len",
    "layer_geometry",
    "model_dtype_device",
    "resolve_layout",
    "Sizing",
    "shared_bytes",
    "sizing_for",
    "slots",
]


# The defaults (DEFAULT_GROUP_SIZE, DEFAULT_RECENT, DEFAULT_KEY_BLOCK) are read from
# the spec module at call time: measurement scripts sweep them (scripts/kv_cache_ppl.py).

# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def _text_config(model: nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} is not a transformers model (no .config)")
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:  # older signature
            return getter()
    return config


@dataclass(frozen=True)
class LayerGeometry:
    """What one decoder layer's cache is shaped by: KV heads, head dim, sliding window
    (0: full attention)."""

    num_heads: int  # KV heads
    head_dim: int
    sliding_window: int  # 0 = full attention


def layer_geometry(model: nn.Module) -> list[LayerGeometry]:
    """Per decoder layer of ``model``: KV heads, head dim, sliding window (from the config).

    Raises:
        TypeError: not a transformers model.
        NotImplementedError: the config lacks ``num_hidden_layers``/``num_attention_heads``.
    """
    cfg = _text_config(model)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if n_layers is None or heads is None:
        raise NotImplementedError(
            f"{type(model).__name__}: cannot size a KV cache from its config (needs "
            "num_hidden_layers and num_attention_heads)"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    out = []
    for i in range(n_layers):
        if layer_types is not None:
            sliding = layer_types[i] in ("sliding_attention", "chunked_attention")
        else:
            sliding = window is not None
        w = int(window) if sliding and window else 0
        out.append(LayerGeometry(int(kv_heads), int(head_dim), w))
    return out


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of ``model``'s first floating-point parameter (float32 on the
    CPU when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def check_sizes(max_cache_len: int, batch_size: int) -> None:
    """Raise ``ValueError`` unless both are ints ``>= 1``."""
    for name, v in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


# --------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------


def slots(max_cache_len: int, key_block: int) -> int:
    """Allocated slots: a KIVI cache rounds up to whole key blocks."""
    return -(-max_cache_len // key_block) * key_block if key_block else max_cache_len


def _slot_bytes(spec: CacheSpec, head_dim: int, groups: int, elem: int) -> int:
    """Bytes of one slot of one KV head, for K or V (codes + scales)."""
    if spec.kind == "dense":
        return head_dim * elem
    if spec.kind == "lowrank":
        return spec.rank * elem
    width = kv_code_width(head_dim, spec.kind)
    n_scales = groups * (1 if spec.kind == "int8" else 2)
    return width + 2 * n_scales


def _layer_bytes(
    spec: CacheSpec,
    geo: LayerGeometry,
    batch: int,
    length: int,
    groups: int,
    recent: int,
    elem: int,
    key_block: int = 0,
) -> int:
    """Bytes one :class:`~sentinel_kernels.cache.SentinelKVLayer` allocates (equal to its
    ``nbytes``)."""
    h, d = geo.num_heads, geo.head_dim
    if key_block:
        length = slots(length, key_block)
        # Keys: codes per slot plus one (s, m) pair per channel per block; values per token.
        total = batch * h * (length * kv_code_width(d, "int4") + (length // key_block) * d * 4)
        total += batch * h * length * _slot_bytes(spec, d, groups, elem)
    else:
        total = 2 * batch * h * length * _slot_bytes(spec, d, groups, elem)
    total += 2 * batch * h * recent * d * elem  # recent rings
    total += 4 * batch  # cache_lens
    # Low-rank bases are shared by the model's caches: not counted here (shared_bytes).
    return total


def shared_bytes(spec: CacheSpec, geos: list[LayerGeometry] | tuple[LayerGeometry, ...]) -> int:
    """Bytes of the shared low-rank bases a ``spec`` cache reads (0 unless low-rank): per
    layer ``2 (H D r + H D) 4`` (fp32 ``P[:, :, :r]`` and ``mu`` for K and V)."""
    if spec.kind != "lowrank":
        return 0
    return sum(
        2 * (g.num_heads * g.head_dim * spec.rank + g.num_heads * g.head_dim) * 4 for g in geos
    )


# --------------------------------------------------------------------------------------
# Layout: KIVI or per-token keys, ring size (decided on the host, from sizes alone)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a cache stores int8/int4 keys: ``key_block`` (0: per token) and ``ring``
    (full-precision ring slots, K and V)."""

    key_block: int = 0
    ring: int = 0


@dataclass(frozen=True)
class Sizing:
    """What every size of a cache depends on: spec, per-layer geometry, batch rows, bytes
    per model-dtype element, ``groups`` as given (``None``: the default)."""

    spec: CacheSpec
    geos: tuple[LayerGeometry, ...]
    batch: int
    elem: int
    groups: int | None

    def nbytes(self, length: int, layout: Layout) -> int:
        """Bytes a cache of ``length`` slots with ``layout`` allocates."""
        return sum(
            _layer_bytes(
                self.spec,
                g,
                self.batch,
                length,
                resolve_groups(self.spec, g.head_dim, self.groups),
                layout.ring,
                self.elem,
                layout.key_block,
            )
            for g in self.geos
        )

    def dense(self, length: int) -> int:
        """Bytes of a dense cache of the same model, batch, length and dtype."""
        return Sizing(CacheSpec("dense"), self.geos, self.batch, self.elem, None).nbytes(
            length, Layout()
        )

    def _ring_line(self) -> tuple[int, int, int]:
        """``(c, m, rs)``: ``dense(L) - nbytes(L, per-token, no ring) = c + m L`` exactly
        (both affine in ``L``) and ``rs`` the bytes of one ring slot."""
        base1, base2 = self.nbytes(1, Layout()), self.nbytes(2, Layout())
        d1, d2 = self.dense(1), self.dense(2)
        m = (d2 - base2) - (d1 - base1)
        return (d1 - base1) - m, m, self.nbytes(1, Layout(0, 1)) - base1

    def auto_ring(self, length: int) -> int:
        """The largest ring of at most :data:`DEFAULT_RECENT` slots that keeps a per-token
        cache of ``length`` slots within the dense bytes (0 when none does)."""
        cap = _spec.DEFAULT_RECENT[self.spec.kind]
        c, m, rs = self._ring_line()
        room = c + m * length
        return max(0, min(cap, room // rs)) if cap else 0

    def auto_ring_stable_from(self) -> int:
        """The smallest ``L`` from which :meth:`auto_ring` no longer changes."""
        cap = _spec.DEFAULT_RECENT[self.spec.kind]
        c, m, rs = self._ring_line()
        if not cap or m == 0:
            return 1
        if m > 0:  # grows to cap: c + m L >= cap * rs
            return max(1, -(-(cap * rs - c) // m))
        return max(1, (c - rs) // -m + 1)  # shrinks to 0: c + m L < rs

    def kivi_from(self, block: int) -> int | None:
        """:func:`_kivi_from` (cached: sizes are asked for often, e.g. by budgets)."""
        return _kivi_from(self, block, tuple(sorted(_spec.DEFAULT_GROUP_SIZE.items())))


@functools.lru_cache(maxsize=256)
def _kivi_from(
    sz: Sizing, block: int, _defaults: tuple[tuple[str, int | None], ...] = ()
) -> int | None:
    """The smallest ``L0`` such that a KIVI cache (``block``-token key blocks, a ring of
    two blocks) of every ``L >= L0`` slots is at most the dense one; ``None``: never.

    Within a block of lengths the KIVI bytes are constant and the dense bytes grow, so the
    lengths that fit are a suffix of the block; from one block to the next the KIVI excess
    over dense at the block's first length falls (KIVI grows by less per block). So ``L0``
    is the first fitting length of the last block whose first length does not fit.
    (``_defaults``: the default group sizes, part of the cache key.)"""
    kivi = Layout(block, 2 * block)
    if sz.nbytes(2 * block, kivi) - sz.nbytes(block, kivi) >= (
        sz.dense(2 * block) - sz.dense(block)
    ):
        return None  # KIVI grows as fast as dense or faster: the excess never falls
    k = 0
    while sz.nbytes(k * block + 1, kivi) > sz.dense(k * block + 1):
        k += 1
    if k == 0:
        return 1
    for length in range((k - 1) * block + 1, k * block + 1):
        if sz.nbytes(length, kivi) <= sz.dense(length):
            return length
    return k * block + 1


def sizing_for(
    model: nn.Module, spec: CacheSpec, batch: int, dtype: torch.dtype | None, groups: int | None
) -> Sizing:
    """The :class:`Sizing` of a ``spec`` cache of ``model`` (``dtype``: default the model's)."""
    elem = torch.empty((), dtype=dtype or model_dtype_device(model)[0]).element_size()
    return Sizing(spec, tuple(layer_geometry(model)), batch, elem, groups)


def _is_default_kivi(sz: Sizing, key_block: int | None, recent: int | None, wrap: bool) -> bool:
    """int4 with the defaults (no ``key_block``, ``recent`` or ``wrap``): the layout is
    chosen by length (:func:`resolve_layout`)."""
    return (
        sz.spec.kind == "int4"
        and key_block is None
        and recent is None
        and not wrap
        and bool(_spec.DEFAULT_KEY_BLOCK)
    )


def resolve_layout(
    sz: Sizing, length: int, key_block: int | None, recent: int | None, wrap: bool
) -> Layout:
    """The layout :func:`~sentinel_kernels.cache.kv_cache` allocates for ``length`` slots
    (see its ``recent`` and ``key_block``). Explicit ``key_block``/``recent`` are used as
    given; with neither, int4 takes KIVI keys from :meth:`Sizing.kivi_from` slots on and
    per-token keys below, and a per-token cache whose ``recent`` is not given gets
    :meth:`Sizing.auto_ring`: so a cache built with the defaults never allocates more
    than a dense one."""
    kb = resolve_key_block(sz.spec, key_block, wrap, recent)  # validates key_block
    if sz.spec.kind not in ("int8", "int4"):
        resolve_recent(sz.spec, recent)  # raises for a window on dense/lowrank
        return Layout()
    if kb:
        if not _is_default_kivi(sz, key_block, recent, wrap):
            return Layout(kb, resolve_ring(sz.spec, recent, kb))
        start = sz.kivi_from(kb)
        if start is not None and length >= start:
            return Layout(kb, 2 * kb)
    if recent is not None:
        return Layout(0, resolve_recent(sz.spec, recent))
    return Layout(0, sz.auto_ring(length))


def _layout_stable_from(sz: Sizing, key_block: int | None, recent: int | None, wrap: bool) -> int:
    """The smallest ``L`` from which :func:`resolve_layout` gives the same layout for
    every longer cache (1 when it never depends on the length)."""
    if sz.spec.kind not in ("int8", "int4"):
        return 1
    if _is_default_kivi(sz, key_block, recent, wrap):
        start = sz.kivi_from(_spec.DEFAULT_KEY_BLOCK)
        if start is not None:
            return start
    elif resolve_key_block(sz.spec, key_block, wrap, recent) or recent is not None:
        return 1
    return sz.auto_ring_stable_from()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(
    spec: CacheSpec,
    head_dim: int,
    groups: int,
    layout: Layout,
    dtype: torch.dtype,
    wrap: bool,
    brief: bool = False,
) -> str:
    """A layout in words (:attr:`~sentinel_kernels.cache.SentinelKVLayer.layout`);
    ``brief``: keys and ring only."""
    dt = _dtype_name(dtype)
    if spec.kind == "dense":
        text = f"dense {dt}"
    elif spec.kind == "lowrank":
        text = f"lowrank:{spec.rank}: {dt} latents"
        if not brief:
            text += ", fp32 bases shared by the model's caches"
    elif brief:
        text = (
            f"KIVI keys over {layout.key_block}-token blocks"
            if layout.key_block
            else f"per-token {spec.kind} keys"
        )
        text += f" + {layout.ring}-slot {dt} ring" if layout.ring else ", no ring"
    else:
        width = -(-head_dim // groups)
        scale = "fp16 scale" if spec.kind == "int8" else "fp16 (scale, min)"
        grouping = (
            f"one {scale} per head vector" if groups == 1 else f"an {scale} per {width} channels"
        )
        if layout.key_block:
            text = (
                f"{spec.kind} KIVI keys per channel over {layout.key_block}-token blocks, "
                f"values per token ({grouping})"
            )
        else:
            text = f"{spec.kind} per-token keys and values ({grouping})"
        text += f" + {layout.ring}-slot {dt} ring" if layout.ring else ", no full-precision ring"
    return text + (", wrapping" if wrap else "")


# --------------------------------------------------------------------------------------
# Public sizing functions
# --------------------------------------------------------------------------------------


def kv_cache_bytes(
    model: nn.Module,
    spec: str | CacheSpec,
    max_cache_len: int,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """Bytes :func:`~sentinel_kernels.cache.kv_cache` with these arguments allocates (its
    ``nbytes``), computed without allocating (the layout is chosen the same way; shared
    low-rank bases are not counted: :func:`shared_bytes`)."""
    parsed = parse_spec(spec)
    check_sizes(max_cache_len, batch_size)
    sz = sizing_for(model, parsed, batch_size, dtype, groups)
    return sz.nbytes(
        max_cache_len, resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    )


def kv_cache_layout(
    model: nn.Module,
    spec: str | CacheSpec,
    max_cache_len: int,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
    brief: bool = False,
) -> str:
    """The :attr:`~sentinel_kernels.cache.SentinelKVCache.layout` of
    :func:`~sentinel_kernels.cache.kv_cache` with these arguments, without allocating.
    ``brief``: only the keys and the ring (``"KIVI keys over 64-token blocks +
    128-slot float32 ring"``, ``"per-token int4 keys + 32-slot float32 ring"``)."""
    parsed = parse_spec(spec)
    check_sizes(max_cache_len, batch_size)
    sz = sizing_for(model, parsed, batch_size, dtype, groups)
    layout = resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    dt = dtype or model_dtype_device(model)[0]
    return "; ".join(
        dict.fromkeys(
            describe(
                parsed,
                g.head_dim,
                resolve_groups(parsed, g.head_dim, groups),
                layout,
                dt,
                bool(wrap),
                brief,
            )
            for g in sz.geos
        )
    )


def kv_cache_switch_len(
    model: nn.Module,
    spec: str | CacheSpec,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """The smallest ``max_cache_len`` from which :func:`~sentinel_kernels.cache.kv_cache`
    with these arguments uses one layout for every longer cache (its long-context one:
    KIVI keys for a default int4 cache, the full default ring for a per-token one); shorter
    caches use a smaller one that stays within the dense bytes. ``1`` when the layout does
    not depend on the length (dense, low-rank, int8, explicit ``key_block`` or ``recent``).

    For int4 with the defaults this is where KIVI keys start: 157 slots for SmolLM2-135M
    in float32 and 204 in bfloat16 (3 KV heads, head dim 64; the same for every batch size,
    since every byte is per row)."""
    parsed = parse_spec(spec)
    check_sizes(1, batch_size)
    sz = sizing_for(model, parsed, batch_size, dtype, groups)
    return _layout_stable_from(sz, key_block, recent, bool(wrap))


def kv_cache_len_for_budget(
    model: nn.Module,
    spec: str | CacheSpec,
    budget_bytes: int,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """The longest ``max_cache_len`` whose :func:`~sentinel_kernels.cache.kv_cache`
    allocation fits ``budget_bytes``.

    From :func:`kv_cache_switch_len` on the layout is fixed and the allocation is
    ``fixed + n * per_step`` for ``L`` in ``((n - 1) * step, n * step]`` (step 1, or the
    key block of a KIVI cache, which allocates whole blocks; per step: codes and scales of
    K and V for every layer, head and row; fixed: recent rings, length tensors), so the
    longest such ``L`` is ``n * step`` with ``n = floor((budget - fixed) / per_step)``.
    When that is shorter than the switch length, no longer cache fits either, and the
    lengths below it (whose layout, and so allocation, is not affine in ``L``) are checked
    one by one from the longest down.

    Raises:
        ValueError: not even one slot fits.
    """
    parsed = parse_spec(spec)
    check_sizes(1, batch_size)
    budget = int(budget_bytes)
    sz = sizing_for(model, parsed, batch_size, dtype, groups)
    stable = _layout_stable_from(sz, key_block, recent, bool(wrap))
    long = resolve_layout(sz, stable, key_block, recent, bool(wrap))
    step = long.key_block or 1
    first = -(-stable // step) * step  # a whole number of steps in the fixed layout
    one = sz.nbytes(first, long)
    per_step = sz.nbytes(first + step, long) - one
    fixed = one - (first // step) * per_step
    n = (budget - fixed) // per_step
    if n >= 1 and n * step >= stable:
        return int(n * step)
    for length in range(stable - 1, 0, -1):
        if sz.nbytes(length, resolve_layout(sz, length, key_block, recent, bool(wrap))) <= budget:
            return length
    least = sz.nbytes(1, resolve_layout(sz, 1, key_block, recent, bool(wrap)))
    raise ValueError(
        f"a {spec} KV cache needs at least {least} bytes (1 slot); budget {budget_bytes}"
    )

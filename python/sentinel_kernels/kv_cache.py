"""``sk.kv_cache``: a compressed, preallocated KV cache for transformers models.

``sk.kv_cache(model, spec, max_cache_len=...)`` returns a transformers ``Cache`` whose
layers hold, per KV head and token slot, the keys and values in one of four forms:

``"dense"``
    model dtype, ``[B, Hkv, L, D]`` (a static cache; the baseline).
``"int8"``
    int8 codes ``[B, Hkv, L, D]`` + float16 scales ``[B, Hkv, L, G]`` (symmetric, per
    token and group of channels).
``"int4"``
    packed uint8 codes ``[B, Hkv, L, ceil(D/2)]`` (asymmetric, KIVI, Liu et al. 2024).
    Two layouts. *KIVI keys* (``key_block = T``, default 64): keys have float16
    ``(scale, min)`` pairs per channel per block of ``T`` tokens ``[B, Hkv, L / T, D, 2]``,
    values per token in groups ``[B, Hkv, L, G, 2]``, and a full-precision ring of
    ``2 * T`` tokens holds the block still being filled (``L`` is rounded up to a multiple
    of the block). *Per-token keys* (``key_block=0``): keys per token like values,
    optionally with a ring of the last ``W`` tokens (``recent``). Wrapping caches always
    use per-token keys.
``"lowrank:r"``
    model dtype latents ``[B, Hkv, L, r]``: ``(k - mu_k) P_k[:, :r]`` and
    ``(v - mu_v) P_v[:, :r]`` with calibrated PCA bases
    (:func:`sentinel_kernels.quant.calibrate_lowrank`), whose fp32 device copies are made
    once per model, device and rank and shared by its caches (not in ``nbytes``; see
    ``shared_nbytes``).

Layout by length. The full-precision ring is a fixed cost (for KIVI, a K and a V ring of
``2 * 64`` slots of ``D`` model-dtype values per layer, head and batch row), so over a
short cache it would outweigh what the codes save. With the default ``key_block`` and
``recent``, :func:`kv_cache` therefore decides on the host, from sizes alone: an int4
cache uses KIVI keys when ``L`` is at least :func:`kv_cache_switch_len` (the length from
which a KIVI cache is never larger than a dense one of the same model, batch and dtype:
157 slots for SmolLM2-135M in float32, 204 in bfloat16, at any batch size), and per-token
keys below; a per-token int4/int8 cache gets the largest ring up to
:data:`DEFAULT_RECENT` that keeps it within the dense bytes (for SmolLM2 in float32: 32
slots from ``L = 38`` on, none at ``L = 1``). So a compressed cache built with the
defaults is never larger than the dense one, for any ``L >= 1`` (low-rank latents never
are: ``r <= D``); explicit ``key_block``/``recent`` are used as given.
:attr:`SentinelKVCache.layout` says which layout a cache has, :func:`kv_cache_layout`
which one :func:`kv_cache` would build, and :func:`kv_cache_bytes` /
:func:`kv_cache_len_for_budget` follow the same choice.

The exact storage formats and quantization rule are in
:mod:`sentinel_kernels.reference.kv_cache`. Everything is allocated up front; the number
of tokens written lives twice: as an int32 device tensor per layer (``cache_lens``, what
the kernels read, so a decode step needs no host sync and can be captured in a CUDA graph)
and as a host counter (from tensor shapes, never read back from the device), which gives
``get_seq_length`` and the capacity check. A decode step therefore has fixed tensor
addresses and no host sync, and can be captured in a CUDA graph as long as no padding mask
is passed (with one, the slot-indexed key mask is rebuilt from host positions each step).

How attention reads it. ``update`` appends the new keys/values with
:func:`sentinel_kernels.ops.kv_append` (one fused quantize-and-store per K and V) and
returns the *new chunk only* (its dense ``key_states``/``value_states``): no
full-precision copy of the cache ever exists. It also records, in a thread-local, that
the next attention call of this layer with exactly that key tensor must read the
compressed storage (:func:`sentinel_kernels.nn.attention.expect_cache_read`). The
``"sentinel"`` attention function checks the record by identity (layer index and key
tensor) and then runs :func:`sentinel_kernels.ops.decode_attention` over the cache (see
:mod:`sentinel_kernels.nn.attention`). The cache therefore only works with
``attn_implementation="sentinel"``; :func:`kv_cache` switches the model to it.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import ops as _ops
from .nn import attention as _nn_attention
from .quant.lowrank import LOWRANK_ATTR, LowRankBases, get_lowrank_bases
from .reference.kv_cache import kv_code_width, kv_groups, kv_scale_shape

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_KEY_BLOCK",
    "DEFAULT_RECENT",
    "KV_SPECS",
    "CacheSpec",
    "SentinelKVCache",
    "SentinelKVLayer",
    "kv_cache",
    "kv_cache_bytes",
    "kv_cache_layout",
    "kv_cache_len_for_budget",
    "kv_cache_switch_len",
    "parse_spec",
]

#: The cache kinds :func:`kv_cache` takes (``"lowrank:<r>"`` with a rank ``r``).
KV_SPECS = ("dense", "int8", "int4", "lowrank:<r>")

#: Channels per scale group when ``groups`` is not given (``None``: one group per head
#: vector). INT8 keeps one fp16 scale per token and head (2 bytes over ``D``), which costs
#: well under 0.1% perplexity; INT4 uses KIVI's grouping. The INT4 group size and the INT4
#: full-precision window (:data:`DEFAULT_RECENT`) are the ones chosen by the KV-cache
#: measurement script (perplexity of SmolLM2-135M on wikitext-2 against bytes per token).
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 32}
#: Tokens kept in full precision (the recent ring) when ``recent`` is not given, for caches
#: with per-token keys (``key_block=0``): at most this many, fewer where the ring would make
#: the cache larger than a dense one (very short caches).
DEFAULT_RECENT: dict[str, int] = {"int8": 0, "int4": 32}
#: INT4 keys per channel over blocks of this many tokens (KIVI) unless ``key_block`` is
#: given; the ring then holds two blocks. Chosen on SmolLM2's chunked perplexity (README).
#: With the defaults, caches shorter than :func:`kv_cache_switch_len` use per-token keys.
DEFAULT_KEY_BLOCK = 64

# This module imports transformers anyway (the Cache base classes): make
# attn_implementation="sentinel" available right away.
_nn_attention.register()

_SPEC_RE = re.compile(r"^(dense|int8|int4|lowrank:([1-9][0-9]*))$")
_warned_switch = False
_warn_lock = threading.Lock()


# --------------------------------------------------------------------------------------
# Spec and geometry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache kind: ``kind`` in dense/int8/int4/lowrank, ``rank`` for lowrank."""

    kind: str
    rank: int = 0

    @property
    def storage_format(self) -> str:
        """The :func:`sentinel_kernels.ops.kv_append` format of the stored vectors."""
        return "dense" if self.kind in ("dense", "lowrank") else self.kind

    def __str__(self) -> str:
        return f"lowrank:{self.rank}" if self.kind == "lowrank" else self.kind


def parse_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse ``"dense"``, ``"int8"``, ``"int4"`` or ``"lowrank:<r>"`` (``r >= 1``)."""
    if isinstance(spec, CacheSpec):
        return spec
    m = _SPEC_RE.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"unknown KV cache spec {spec!r}; expected one of {', '.join(KV_SPECS)}")
    if m.group(2):
        return CacheSpec("lowrank", int(m.group(2)))
    return CacheSpec(m.group(1))


def _text_config(model: nn.Module) -> Any:
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
class _LayerGeometry:
    num_heads: int  # KV heads
    head_dim: int
    sliding_window: int  # 0 = full attention


def _geometry(model: nn.Module) -> list[_LayerGeometry]:
    """Per decoder layer: KV heads, head dim, sliding window (from the config)."""
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
        out.append(_LayerGeometry(int(kv_heads), int(head_dim), w))
    return out


def _resolve_groups(spec: CacheSpec, head_dim: int, groups: int | None) -> int:
    """Scale groups per head vector for int8/int4 (0 for dense and lowrank)."""
    if spec.kind not in ("int8", "int4"):
        if groups not in (None, 0):
            raise ValueError(f"groups applies to int8/int4 caches, not {spec}")
        return 0
    if groups is None:
        size = DEFAULT_GROUP_SIZE[spec.kind]
        groups = 1 if size is None else max(1, -(-head_dim // size))
        # A default must always be valid: fall back to fewer groups until ceil(D/g) == G.
        while groups > 1:
            try:
                kv_groups(head_dim, groups)
                break
            except ValueError:
                groups -= 1
    kv_groups(head_dim, int(groups))  # raises with the reason for a bad explicit value
    return int(groups)


def _resolve_recent(spec: CacheSpec, recent: int | None) -> int:
    if spec.kind not in ("int8", "int4"):
        if recent not in (None, 0):
            raise ValueError(
                f"recent (a full-precision window) applies to int8/int4 caches, not {spec}"
            )
        return 0
    if recent is None:
        return DEFAULT_RECENT[spec.kind]
    if isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
        raise ValueError(f"recent must be an int >= 0, got {recent!r}")
    return recent


def _resolve_key_block(
    spec: CacheSpec, key_block: int | None, wrap: bool, recent: int | None = None
) -> int:
    """Tokens per KIVI key block (0: per-token keys). By default KIVI, unless ``wrap`` or
    an explicit ``recent`` that cannot be its ring (not a positive multiple of the block:
    e.g. ``recent=0``, the per-token cache without a ring)."""
    if key_block is not None and (
        isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 0
    ):
        raise ValueError(f"key_block must be an int >= 0, got {key_block!r}")
    if spec.kind != "int4":
        if key_block:
            raise ValueError(
                f"key_block (KIVI per-channel keys) applies to int4 caches, not {spec}"
            )
        return 0
    if wrap:
        if key_block:
            raise ValueError(
                "key_block (KIVI per-channel keys) does not support wrap=True: a "
                "ring overwrites blocks; use key_block=0"
            )
        return 0
    if key_block is None:
        if not DEFAULT_KEY_BLOCK:
            return 0
        if isinstance(recent, int) and (recent < DEFAULT_KEY_BLOCK or recent % DEFAULT_KEY_BLOCK):
            return 0
        return DEFAULT_KEY_BLOCK
    return key_block


def _resolve_ring(spec: CacheSpec, recent: int | None, key_block: int) -> int:
    """Full-precision ring slots: ``recent`` (per-token keys) or two key blocks (KIVI)."""
    if not key_block:
        return _resolve_recent(spec, recent)
    if recent is None:
        return 2 * key_block
    r = _resolve_recent(spec, recent)
    if r < key_block or r % key_block:
        raise ValueError(
            f"with key_block={key_block} the full-precision ring (recent) must be "
            f"a positive multiple of it, got recent={recent}"
        )
    return r


def _slots(max_cache_len: int, key_block: int) -> int:
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
    geo: _LayerGeometry,
    batch: int,
    length: int,
    groups: int,
    recent: int,
    elem: int,
    key_block: int = 0,
) -> int:
    """Bytes :class:`SentinelKVLayer` allocates (must match its ``nbytes`` exactly)."""
    h, d = geo.num_heads, geo.head_dim
    if key_block:
        length = _slots(length, key_block)
        # Keys: codes per slot plus one (s, m) pair per channel per block; values per token.
        total = batch * h * (length * kv_code_width(d, "int4") + (length // key_block) * d * 4)
        total += batch * h * length * _slot_bytes(spec, d, groups, elem)
    else:
        total = 2 * batch * h * length * _slot_bytes(spec, d, groups, elem)
    total += 2 * batch * h * recent * d * elem  # recent rings
    total += 4 * batch  # cache_lens
    # Low-rank bases are shared by the model's caches (_device_bases): not counted here.
    return total


# --------------------------------------------------------------------------------------
# Layout: KIVI or per-token keys, ring size (decided on the host, from sizes alone)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """How a cache stores int8/int4 keys: ``key_block`` (0: per token) and ``ring``
    (full-precision ring slots, K and V)."""

    key_block: int = 0
    ring: int = 0


@dataclass(frozen=True)
class _Sizing:
    """What every size depends on: spec, per-layer geometry, batch, elem size, groups."""

    spec: CacheSpec
    geos: tuple[_LayerGeometry, ...]
    batch: int
    elem: int
    groups: int | None

    def nbytes(self, length: int, layout: _Layout) -> int:
        """Bytes a cache of ``length`` slots with ``layout`` allocates."""
        return sum(
            _layer_bytes(
                self.spec,
                g,
                self.batch,
                length,
                _resolve_groups(self.spec, g.head_dim, self.groups),
                layout.ring,
                self.elem,
                layout.key_block,
            )
            for g in self.geos
        )

    def dense(self, length: int) -> int:
        """Bytes of a dense cache of the same model, batch, length and dtype."""
        return _Sizing(CacheSpec("dense"), self.geos, self.batch, self.elem, None).nbytes(
            length, _Layout()
        )

    def _ring_line(self) -> tuple[int, int, int]:
        """``(c, m, rs)``: ``dense(L) - nbytes(L, per-token, no ring) = c + m L`` exactly
        (both affine in ``L``) and ``rs`` the bytes of one ring slot."""
        base1, base2 = self.nbytes(1, _Layout()), self.nbytes(2, _Layout())
        d1, d2 = self.dense(1), self.dense(2)
        m = (d2 - base2) - (d1 - base1)
        return (d1 - base1) - m, m, self.nbytes(1, _Layout(0, 1)) - base1

    def auto_ring(self, length: int) -> int:
        """The largest ring of at most :data:`DEFAULT_RECENT` slots that keeps a per-token
        cache of ``length`` slots within the dense bytes (0 when none does)."""
        cap = DEFAULT_RECENT[self.spec.kind]
        c, m, rs = self._ring_line()
        room = c + m * length
        return max(0, min(cap, room // rs)) if cap else 0

    def auto_ring_stable_from(self) -> int:
        """The smallest ``L`` from which :meth:`auto_ring` no longer changes."""
        cap = DEFAULT_RECENT[self.spec.kind]
        c, m, rs = self._ring_line()
        if not cap or m == 0:
            return 1
        if m > 0:  # grows to cap: c + m L >= cap * rs
            return max(1, -(-(cap * rs - c) // m))
        return max(1, (c - rs) // -m + 1)  # shrinks to 0: c + m L < rs

    def kivi_from(self, block: int) -> int | None:
        """:func:`_kivi_from` (cached: sizes are asked for often, e.g. by budgets)."""
        return _kivi_from(self, block, tuple(sorted(DEFAULT_GROUP_SIZE.items())))


@functools.lru_cache(maxsize=256)
def _kivi_from(sz: _Sizing, block: int, _defaults: tuple[Any, ...] = ()) -> int | None:
    """The smallest ``L0`` such that a KIVI cache (``block``-token key blocks, a ring of
    two blocks) of every ``L >= L0`` slots is at most the dense one; ``None``: never.

    Within a block of lengths the KIVI bytes are constant and the dense bytes grow, so the
    lengths that fit are a suffix of the block; from one block to the next the KIVI excess
    over dense at the block's first length falls (KIVI grows by less per block). So ``L0``
    is the first fitting length of the last block whose first length does not fit.
    (``_defaults``: the default group sizes, part of the cache key.)"""
    kivi = _Layout(block, 2 * block)
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


def _sizing(
    model: nn.Module, spec: CacheSpec, batch: int, dtype: torch.dtype | None, groups: int | None
) -> _Sizing:
    elem = torch.empty((), dtype=dtype or _model_dtype_device(model)[0]).element_size()
    return _Sizing(spec, tuple(_geometry(model)), batch, elem, groups)


def _is_default_kivi(sz: _Sizing, key_block: int | None, recent: int | None, wrap: bool) -> bool:
    """int4 with the defaults (no ``key_block``, ``recent`` or ``wrap``): the layout is
    chosen by length (:func:`_resolve_layout`)."""
    return (
        sz.spec.kind == "int4"
        and key_block is None
        and recent is None
        and not wrap
        and bool(DEFAULT_KEY_BLOCK)
    )


def _resolve_layout(
    sz: _Sizing, length: int, key_block: int | None, recent: int | None, wrap: bool
) -> _Layout:
    """The layout :func:`kv_cache` allocates for ``length`` slots (see its ``recent`` and
    ``key_block``). Explicit ``key_block``/``recent`` are used as given; with neither, int4
    takes KIVI keys from :meth:`_Sizing.kivi_from` slots on and per-token keys below, and a
    per-token cache whose ``recent`` is not given gets :meth:`_Sizing.auto_ring`: so a
    cache built with the defaults never allocates more than a dense one."""
    kb = _resolve_key_block(sz.spec, key_block, wrap, recent)  # validates key_block
    if sz.spec.kind not in ("int8", "int4"):
        _resolve_recent(sz.spec, recent)  # raises for a window on dense/lowrank
        return _Layout()
    if kb:
        if not _is_default_kivi(sz, key_block, recent, wrap):
            return _Layout(kb, _resolve_ring(sz.spec, recent, kb))
        start = sz.kivi_from(kb)
        if start is not None and length >= start:
            return _Layout(kb, 2 * kb)
    if recent is not None:
        return _Layout(0, _resolve_recent(sz.spec, recent))
    return _Layout(0, sz.auto_ring(length))


def _layout_stable_from(sz: _Sizing, key_block: int | None, recent: int | None, wrap: bool) -> int:
    """The smallest ``L`` from which :func:`_resolve_layout` gives the same layout for
    every longer cache (1 when it never depends on the length)."""
    if sz.spec.kind not in ("int8", "int4"):
        return 1
    if _is_default_kivi(sz, key_block, recent, wrap):
        start = sz.kivi_from(DEFAULT_KEY_BLOCK)
        if start is not None:
            return start
    elif _resolve_key_block(sz.spec, key_block, wrap, recent) or recent is not None:
        return 1
    return sz.auto_ring_stable_from()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(
    spec: CacheSpec,
    head_dim: int,
    groups: int,
    layout: _Layout,
    dtype: torch.dtype,
    wrap: bool,
    brief: bool = False,
) -> str:
    """A layout in words (:attr:`SentinelKVLayer.layout`); ``brief``: keys and ring only."""
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
# Layer
# --------------------------------------------------------------------------------------


def _layer_base() -> type:
    # transformers >= 5.17 (the supported range) always has it: an ImportError here is a
    # broken install and must surface with its cause, not become a silent `object` base.
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class SentinelKVLayer(_layer_base()):  # type: ignore[misc]
    """One decoder layer's compressed KV storage (a transformers ``CacheLayerMixin``).

    Attributes read by the sentinel attention function (the protocol described in
    :func:`sentinel_kernels.nn.attention.expect_cache_read`): ``kv_format`` (storage format
    for the op: ``"dense"`` for dense and low-rank), ``k_store``/``v_store``,
    ``k_scale``/``v_scale`` (or ``None``), ``k_recent``/``v_recent`` (or ``None``),
    ``wrap``, ``capacity`` (``L``), ``cache_lens`` (int32 ``[B]`` device), ``seq_length``
    (host int), ``deferred`` (the current chunk still has to be appended by the reader),
    ``latent_rank`` (0 unless low-rank) with ``k_proj``/``v_proj`` ``[Hkv, D, r]`` and
    ``k_mean``/``v_mean`` ``[Hkv, D]`` (float32), ``sliding_window`` and
    ``key_mask_memo`` (a dict shared by the layers of one cache).
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        spec: CacheSpec,
        geo: _LayerGeometry,
        *,
        batch_size: int,
        max_cache_len: int,
        dtype: torch.dtype,
        device: torch.device,
        groups: int,
        recent: int,
        wrap: bool,
        memo: dict[Any, Any],
        basis: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        key_block: int = 0,
    ) -> None:
        super().__init__()
        # KIVI keys: slots rounded up to whole key blocks.
        max_cache_len = _slots(max_cache_len, key_block)
        self.key_block = key_block
        self.spec = spec
        self.kv_format = spec.storage_format
        self.batch_size = batch_size
        self.num_heads = geo.num_heads
        self.head_dim = geo.head_dim
        self.sliding_window = geo.sliding_window
        self.is_sliding = geo.sliding_window > 0
        self.capacity = max_cache_len
        self.max_cache_len = max_cache_len
        self.dtype = dtype
        self.device = device
        self.groups = groups
        self.recent = recent
        self.wrap = wrap
        self.key_mask_memo = memo
        self.latent_rank = spec.rank if spec.kind == "lowrank" else 0
        self.is_croppable = recent == 0 and not wrap
        b, h, d, cap = batch_size, geo.num_heads, geo.head_dim, max_cache_len
        if spec.kind == "dense":
            self.k_store = torch.zeros(b, h, cap, d, dtype=dtype, device=device)
        elif spec.kind == "lowrank":
            self.k_store = torch.zeros(b, h, cap, spec.rank, dtype=dtype, device=device)
        else:
            code_dtype = torch.int8 if spec.kind == "int8" else torch.uint8
            width = kv_code_width(d, spec.kind)
            self.k_store = torch.zeros(b, h, cap, width, dtype=code_dtype, device=device)
        self.v_store = torch.zeros_like(self.k_store)
        if spec.kind in ("int8", "int4"):
            shape = kv_scale_shape((b, h, cap), groups, spec.kind)
            self.v_scale: torch.Tensor | None = torch.zeros(
                shape, dtype=torch.float16, device=device
            )
            if key_block:
                self.k_scale: torch.Tensor | None = torch.zeros(
                    b, h, cap // key_block, d, 2, dtype=torch.float16, device=device
                )
            else:
                self.k_scale = torch.zeros_like(self.v_scale)
        else:
            self.k_scale = self.v_scale = None
        if recent:
            self.k_recent: torch.Tensor | None = torch.zeros(
                b, h, recent, d, dtype=dtype, device=device
            )
            self.v_recent: torch.Tensor | None = torch.zeros_like(self.k_recent)
        else:
            self.k_recent = self.v_recent = None
        self.cache_lens = torch.zeros(b, dtype=torch.int32, device=device)
        if basis is not None:
            kp, km, vp, vm = basis
            self.k_proj: torch.Tensor | None = kp.to(device=device, dtype=torch.float32)
            self.k_mean: torch.Tensor | None = km.to(device=device, dtype=torch.float32)
            self.v_proj: torch.Tensor | None = vp.to(device=device, dtype=torch.float32)
            self.v_mean: torch.Tensor | None = vm.to(device=device, dtype=torch.float32)
        else:
            self.k_proj = self.k_mean = self.v_proj = self.v_mean = None
        self.seq_length = 0
        self.deferred = False
        # int8 [B, L] key mask by slot, shared by the layers of a cache, used when the
        # forward brings no attention_mask (sk.generate's captured decode step); see
        # SentinelKVCache.set_static_key_mask.
        self.static_key_mask: torch.Tensor | None = None
        self.is_initialized = True
        # transformers' generic layer code looks for these; the compressed store is not a
        # [B, H, S, D] tensor of keys, so they stay None.
        self.keys = None
        self.values = None

    # -- storage ----------------------------------------------------------------------

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer allocated (not the low-rank bases it reads: those are
        shared by the model's caches, see :meth:`shared_tensors`)."""
        out = [
            self.k_store,
            self.v_store,
            self.k_scale,
            self.v_scale,
            self.k_recent,
            self.v_recent,
            self.cache_lens,
        ]
        return [t for t in out if t is not None]

    def shared_tensors(self) -> list[torch.Tensor]:
        """The low-rank bases and means this layer reads (fp32 device copies made once per
        model, device and rank and shared by its caches; empty unless low-rank)."""
        out = [self.k_proj, self.k_mean, self.v_proj, self.v_mean]
        return [t for t in out if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors this layer allocated."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def layout(self) -> str:
        """The storage layout in words, e.g. ``"int4 KIVI keys per channel over 64-token
        blocks, values per token (an fp16 (scale, min) per 32 channels) + 128-slot
        float32 ring"`` or ``"int4 per-token keys and values (...) + 32-slot float32
        ring"``."""
        return _describe(
            self.spec,
            self.head_dim,
            self.groups,
            _Layout(self.key_block, self.recent),
            self.dtype,
            self.wrap,
        )

    def _latent(self, x: torch.Tensor, proj: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        # (x - mu) P[:, :r] per KV head, in fp32: [B, H, S, D] x [H, D, r] -> [B, H, S, r].
        return torch.matmul(x.float() - mean[None, :, None, :], proj[None])

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``key``/``value`` ``[B, Hkv, S, D]`` at positions ``cache_lens[b] + i``
        (one fused :func:`~sentinel_kernels.ops.kv_append` per K and V, plus the recent
        ring), then advance ``cache_lens`` by ``S`` on the device."""
        s = key.shape[2]
        if s == 0:
            return
        if self.latent_rank:
            assert self.k_proj is not None and self.k_mean is not None
            assert self.v_proj is not None and self.v_mean is not None
            key = self._latent(key, self.k_proj, self.k_mean)
            value = self._latent(value, self.v_proj, self.v_mean)
        if self.key_block:
            # KIVI keys: completed blocks quantized per channel, then the key ring.
            _ops.kv_append_key_blocks(
                key, self.k_store, self.k_scale, self.k_recent, self.cache_lens, self.key_block
            )
        else:
            _ops.kv_append(
                key, self.k_store, self.cache_lens, self.kv_format, self.k_scale, self.wrap
            )
        _ops.kv_append(
            value, self.v_store, self.cache_lens, self.kv_format, self.v_scale, self.wrap
        )
        if self.k_recent is not None:
            if not self.key_block:
                _ops.kv_append(key, self.k_recent, self.cache_lens, "dense", None, True)
            _ops.kv_append(value, self.v_recent, self.cache_lens, "dense", None, True)
        self.cache_lens.add_(s)

    # -- transformers layer API --------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is allocated in ``__init__``; nothing to do."""

    def _check_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        want = (self.batch_size, self.num_heads, key_states.shape[2], self.head_dim)
        if tuple(key_states.shape) != want or tuple(value_states.shape) != want:
            raise ValueError(
                f"sk.kv_cache: layer got keys {tuple(key_states.shape)} / values "
                f"{tuple(value_states.shape)}, expected [batch={self.batch_size}, "
                f"kv_heads={self.num_heads}, seq, head_dim={self.head_dim}] (the cache was "
                "built for another batch size or model)"
            )
        if key_states.device != self.cache_lens.device:
            raise ValueError(
                f"sk.kv_cache: keys on {key_states.device}, cache on {self.cache_lens.device}"
            )
        if self.kv_format == "dense" or self.k_recent is not None:
            if key_states.dtype != self.dtype:
                raise TypeError(
                    f"sk.kv_cache: keys are {key_states.dtype} but the cache was built for "
                    f"{self.dtype}; pass dtype= to sk.kv_cache"
                )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk and return it unchanged (not the cache: see the module docstring).

        Chunks of up to ``MAX_CACHE_QUERIES`` (64) tokens, and any chunk into an empty
        cache, are appended here. A longer chunk into a non-empty cache is appended by the
        attention function, 64 tokens at a time, each piece just before its queries read the
        cache (``deferred``): a ring (``wrap``, recent window) then never holds a position
        its readers may not see yet.
        """
        self._check_chunk(key_states, value_states)
        s = key_states.shape[2]
        before = self.seq_length
        if not self.wrap and before + s > self.capacity:
            raise ValueError(
                f"sk.kv_cache: {before} + {s} tokens exceed max_cache_len={self.capacity}; "
                "allocate a longer cache (or wrap=True for a sliding-window ring)"
            )
        if self.wrap and self.sliding_window and before > 0:
            piece = min(s, _nn_attention.MAX_CACHE_QUERIES)
            if piece + self.sliding_window - 1 > self.capacity:
                raise ValueError(
                    f"sk.kv_cache: a {piece}-token step over a wrapping cache of "
                    f"{self.capacity} slots with sliding window {self.sliding_window} would "
                    f"overwrite keys its queries still see; need max_cache_len >= "
                    f"{piece + self.sliding_window - 1}"
                )
        self.deferred = before > 0 and s > _nn_attention.MAX_CACHE_QUERIES
        if not self.deferred:
            self.append(key_states, value_states)
        self.seq_length = before + s
        return key_states, value_states

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask builders: every position so
        far plus the query (the HF 2-D mask's columns), offset 0. (transformers 4.5x passes
        ``cache_position``; its length is the query length.)"""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seq_length + q, 0

    def get_seq_length(self) -> int:
        """Tokens written so far (host counter)."""
        return self.seq_length

    def get_max_length(self) -> int:
        """``max_cache_len``, or ``-1`` for a wrapping cache (no limit on tokens)."""
        return -1 if self.wrap else self.capacity

    def get_max_cache_shape(self) -> int:
        """transformers 4.5x name of :meth:`get_max_length`."""
        return self.get_max_length()

    def reset(self) -> None:
        """Forget every token (zero the storage and lengths; shapes and addresses kept)."""
        for t in self.tensors():
            t.zero_()
        self.seq_length = 0
        self.deferred = False

    def offload(self) -> None:
        """Not supported: the compressed cache stays on its device."""

    def prefetch(self) -> None:
        """Not supported: the compressed cache stays on its device."""

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (``<= 0``; a positive value is the
        legacy "keep this many" form). Only without a recent ring or wrap."""
        n = int(tokens_to_remove)
        keep = self.seq_length + n if n <= 0 else min(n, self.seq_length)
        if keep == self.seq_length:
            return
        if not self.is_croppable:
            raise NotImplementedError(
                "sk.kv_cache: crop is not supported with a recent window or wrap (the ring "
                "slots of the removed tokens held older tokens)"
            )
        keep = max(keep, 0)
        self.cache_lens.sub_(self.seq_length - keep)
        self.seq_length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Permute the batch rows (beam search), in place."""
        idx = beam_idx.to(self.cache_lens.device)
        for t in (
            self.k_store,
            self.v_store,
            self.k_scale,
            self.v_scale,
            self.k_recent,
            self.v_recent,
            self.cache_lens,
        ):
            if t is not None:
                t.copy_(t.index_select(0, idx))

    def _rebatch(self, fn: Any) -> None:
        for name in (
            "k_store",
            "v_store",
            "k_scale",
            "v_scale",
            "k_recent",
            "v_recent",
            "cache_lens",
        ):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t).contiguous())
        self.batch_size = self.cache_lens.shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (reallocates)."""
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (reallocates)."""
        self._rebatch(lambda t: t[indices.to(t.device)])

    def __repr__(self) -> str:
        return (
            f"SentinelKVLayer({self.spec}, L={self.capacity}, heads={self.num_heads}, "
            f"D={self.head_dim}, groups={self.groups}, recent={self.recent}, "
            f"key_block={self.key_block}, wrap={self.wrap}, tokens={self.seq_length}, "
            f"layout={self.layout!r})"
        )


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


class SentinelKVCache(_cache_base()):  # type: ignore[misc]
    """A transformers ``Cache`` of :class:`SentinelKVLayer` (build it with :func:`kv_cache`).

    Works only with ``attn_implementation="sentinel"``: ``update`` returns the new chunk,
    and the sentinel attention function reads the compressed storage itself.
    """

    def __init__(self, layers: list[SentinelKVLayer], spec: CacheSpec) -> None:
        try:
            super().__init__(layers=layers)
        except TypeError:
            # transformers < 4.56 builds its layers from classes and a config; every method
            # this cache needs is defined below, so only the attributes are set.
            self.layer_classes = None
            self.cache_processor = None
            self.num_hidden_layers = len(layers)
        self.layers = layers
        self.spec = spec
        self.layer_class_to_replicate = None
        self.offloading = False

    # -- transformers Cache API (also for 4.5x, whose base class lacks some) -----------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to layer ``layer_idx`` and return ``(key_states, value_states)``, the new
        chunk; mark the next sentinel attention call of that layer as a cache read."""
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(
                f"sk.kv_cache: layer {layer_idx} out of range ({len(self.layers)} layers)"
            )
        layer = self.layers[layer_idx]
        out = layer.update(key_states, value_states)
        _nn_attention.expect_cache_read(layer_idx, key_states, layer, owner=self)
        return out

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens written to layer ``layer_idx`` (host counter; 0 when out of range)."""
        idx = 0 if layer_idx is None else layer_idx
        if idx >= len(self.layers):
            return 0
        return self.layers[idx].seq_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Position of the first query token: the tokens written so far."""
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(
        self, query_length: int | torch.Tensor, layer_idx: int = 0
    ) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of layer ``layer_idx`` for the mask builders."""
        idx = min(layer_idx, len(self.layers) - 1)
        return self.layers[idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """``max_cache_len`` (``-1`` when wrapping)."""
        return self.layers[0].get_max_length()

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """transformers 4.5x name of :meth:`get_max_length`."""
        return self.get_max_length()

    def get_usable_length(self, new_seq_length: int, layer_idx: int | None = 0) -> int:
        """transformers 4.4x: tokens of the cache usable with a new chunk."""
        return self.get_seq_length(layer_idx)

    def reset(self) -> None:
        """Forget every token of every layer (storage kept)."""
        _nn_attention.clear_cache_read(owner=self)
        for layer in self.layers:
            layer.reset()

    def set_static_key_mask(self, mask: torch.Tensor | None) -> None:
        """Key padding by slot for forwards that pass no ``attention_mask``.

        ``mask``: bool/0-1 ``[B, n]`` over positions ``[0, n)`` (``n <= max_cache_len``;
        nonzero = attend); slots from ``n`` on count as attended. It is copied into one
        int8 ``[B, L]`` buffer shared by all layers, allocated on the first call and
        overwritten in place afterwards (also after ``None`` turned it off), so a CUDA graph
        captured over a decode step keeps reading the current mask. ``None`` turns it off.
        Not for wrapping caches (slot != position there).

        This is how :func:`sentinel_kernels.generate` decodes left-padded batches without
        rebuilding a mask from host positions every step: the padding is fixed after the
        prompt, and every later token is attended.
        """
        if mask is None:
            for layer in self.layers:
                layer.static_key_mask = None
            return
        first = self.layers[0]
        # One buffer for the cache's lifetime: a graph captured while it was set keeps
        # reading this address after the mask is turned off and on again.
        if first.wrap:
            raise ValueError("set_static_key_mask: a wrapping cache's slots are not positions")
        b, cap = first.batch_size, first.capacity
        if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] > cap:
            raise ValueError(
                f"set_static_key_mask: mask {tuple(mask.shape)} must be "
                f"[batch={b}, n <= max_cache_len={cap}]"
            )
        buf = getattr(self, "_static_key_mask_buf", None)
        if buf is None:
            buf = torch.ones(b, cap, dtype=torch.int8, device=first.cache_lens.device)
            self._static_key_mask_buf = buf
        else:
            buf.fill_(1)
        buf[:, : mask.shape[1]] = (mask != 0).to(torch.int8)
        for layer in self.layers:
            layer.static_key_mask = buf

    @property
    def is_compileable(self) -> bool:
        """False: the attention reads the cache through a Python-side record (the sentinel
        attention function), which ``torch.compile`` full graphs cannot follow. Eager
        CUDA-graph capture works (shapes and addresses are static)."""
        return False

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: sliding-window attention."""
        return [layer.is_sliding for layer in self.layers]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: linear attention (never)."""
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        """Per layer: a dummy (KV-sharing) layer (never)."""
        return [False] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        """Always: storage is allocated up front."""
        return True

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` works (no recent ring, no wrap)."""
        return all(layer.is_croppable for layer in self.layers)

    @property
    def batch_size(self) -> int:
        """Batch rows the cache holds."""
        return self.layers[0].batch_size

    @property
    def max_cache_len(self) -> int:
        """Slots per layer (``L``)."""
        return self.layers[0].capacity

    @property
    def max_batch_size(self) -> int:
        """transformers 4.5x name of :attr:`batch_size`."""
        return self.batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of all storage this cache allocated (codes, scales, recent rings, length
        tensors; :func:`kv_cache_bytes`). Low-rank bases are not in it: see
        :attr:`shared_nbytes`."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def shared_nbytes(self) -> int:
        """Bytes of the low-rank bases this cache reads (fp32 device copies, made once per
        model, device and rank and shared by all its caches; 0 unless low-rank)."""
        seen: dict[int, int] = {}  # by tensor object: the caches hold the same ones
        for layer in self.layers:
            for t in layer.shared_tensors():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    @property
    def layout(self) -> str:
        """The storage layout in words (:attr:`SentinelKVLayer.layout`; the distinct ones
        joined by ``"; "`` when layers differ, e.g. in head dim)."""
        return "; ".join(dict.fromkeys(layer.layout for layer in self.layers))

    def describe(self) -> str:
        """:attr:`layout` with the sizes: ``"int4, 52 slots x 16 rows, 30 layers: <layout>;
        <nbytes> bytes"``."""
        return (
            f"{self.spec}, {self.max_cache_len} slots x {self.batch_size} rows, "
            f"{len(self.layers)} layers: {self.layout}; {self.nbytes} bytes"
        )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every layer."""
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Permute the batch rows (beam search)."""
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices``."""
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        layer = self.layers[0]
        return (
            f"SentinelKVCache({self.spec}, layers={len(self.layers)}, "
            f"max_cache_len={layer.capacity}, batch_size={layer.batch_size}, "
            f"groups={layer.groups}, recent={layer.recent}, wrap={layer.wrap}, "
            f"nbytes={self.nbytes}, layout={self.layout!r})"
        )


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _ensure_sentinel(model: nn.Module) -> None:
    """Switch ``model`` to the sentinel attention (warn once per process) if needed."""
    global _warned_switch
    if getattr(model.config, "_attn_implementation", None) == _nn_attention.ATTN_IMPLEMENTATION:
        return
    ok, reason = _nn_attention.supports_sentinel_attention(model)
    if not ok:
        raise NotImplementedError(f"sk.kv_cache needs the sentinel attention: {reason}")
    _nn_attention.register()
    previous = getattr(model.config, "_attn_implementation", None)
    _nn_attention._set_implementation(model, _nn_attention.ATTN_IMPLEMENTATION)
    with _warn_lock:
        first, _warned_switch = not _warned_switch, True
    if first:
        warnings.warn(
            f"sk.kv_cache switched the model's attn_implementation from {previous!r} to "
            f"'{_nn_attention.ATTN_IMPLEMENTATION}': only the sentinel attention reads the "
            "compressed cache",
            RuntimeWarning,
            stacklevel=3,
        )


def _bases_for(model: nn.Module, spec: CacheSpec, geos: list[_LayerGeometry]) -> LowRankBases:
    bases = get_lowrank_bases(model)
    if bases is None:
        raise ValueError(
            f"kv_cache {spec}: the model has no low-rank KV bases; run "
            "sk.quant.calibrate_lowrank(model, tokenizer, calibration_text) first (or attach "
            f"saved ones: LowRankBases.load(path).attach(model); attribute {LOWRANK_ATTR!r})"
        )
    if bases.num_layers != len(geos):
        raise ValueError(f"low-rank bases have {bases.num_layers} layers, the model {len(geos)}")
    for i, g in enumerate(geos):
        if bases.head_shape(i) != (g.num_heads, g.head_dim):
            raise ValueError(
                f"low-rank bases of layer {i} are for {bases.head_shape(i)} (KV heads, head "
                f"dim), the model has ({g.num_heads}, {g.head_dim})"
            )
        if spec.rank > g.head_dim:
            raise ValueError(f"lowrank rank {spec.rank} exceeds head_dim {g.head_dim}")
    return bases


_shared_lock = threading.Lock()
# id(LowRankBases) -> {(layer, rank, device): (source tensors, device copies)}; an entry
# goes with its bases (weakref.finalize).
_shared_bases: dict[int, dict[tuple[int, int, str], tuple[tuple[Any, ...], Any]]] = {}


def _stamp(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    try:
        return t, t._version
    except RuntimeError:  # an inference tensor: no version counter (and no in-place edits)
        return t, None


def _device_bases(
    bases: LowRankBases, layer: int, rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s ``(P_k[:, :, :r], mu_k, P_v[:, :, :r], mu_v)`` as fp32 on
    ``device``: made once per bases object, layer, rank and device and shared by every
    cache built from them (a rebuilt copy when the bases' tensors were replaced or edited
    in place)."""
    src = (bases.k_basis[layer], bases.k_mean[layer], bases.v_basis[layer], bases.v_mean[layer])
    stamps = tuple(_stamp(t) for t in src)
    key = (layer, rank, str(device))
    with _shared_lock:
        memo = _shared_bases.get(id(bases))
        hit = memo.get(key) if memo is not None else None
    if (
        hit is not None
        and len(hit[0]) == len(stamps)
        and all(a is b and va == vb for (a, va), (b, vb) in zip(hit[0], stamps, strict=True))
    ):
        return hit[1]
    kb, km, vb, vm = src
    copies = (
        kb[:, :, :rank].to(device=device, dtype=torch.float32).contiguous(),
        km.to(device=device, dtype=torch.float32).contiguous(),
        vb[:, :, :rank].to(device=device, dtype=torch.float32).contiguous(),
        vm.to(device=device, dtype=torch.float32).contiguous(),
    )
    with _shared_lock:
        memo = _shared_bases.get(id(bases))
        if memo is None:
            memo = _shared_bases[id(bases)] = {}
            weakref.finalize(bases, _shared_bases.pop, id(bases), None)
        memo[key] = (stamps, copies)
    return copies


def _shared_bytes(spec: CacheSpec, geos: list[_LayerGeometry] | tuple[_LayerGeometry, ...]) -> int:
    """Bytes of the shared low-rank bases a ``spec`` cache reads (0 unless low-rank)."""
    if spec.kind != "lowrank":
        return 0
    return sum(
        2 * (g.num_heads * g.head_dim * spec.rank + g.num_heads * g.head_dim) * 4 for g in geos
    )


def _check_sizes(max_cache_len: int, batch_size: int) -> None:
    for name, v in (("max_cache_len", max_cache_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def kv_cache(
    model: nn.Module,
    spec: str,
    max_cache_len: int = 4096,
    batch_size: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    wrap: bool = False,
    key_block: int | None = None,
) -> SentinelKVCache:
    """A preallocated (compressed) KV cache for ``model``: pass it as ``past_key_values``.

    ``model.generate(ids, past_key_values=sk.kv_cache(model, "int8", max_cache_len=...))``
    or ``model(ids, past_key_values=cache, use_cache=True)`` chunk by chunk. Every chunk's
    keys/values are quantized on append (:func:`sentinel_kernels.ops.kv_append`) and every
    query chunk after the first reads the compressed storage directly
    (:func:`sentinel_kernels.ops.decode_attention`); a chunk into an empty cache (the
    prefill) attends over its own full-precision keys/values, as usual for KV quantization
    (KIVI, Liu et al. 2024).

    With the default ``recent`` and ``key_block`` a compressed cache never allocates more
    than a dense cache of the same model, batch, length and dtype: int4 uses KIVI keys
    (:data:`DEFAULT_KEY_BLOCK`-token blocks, a ring of two blocks) from
    :func:`kv_cache_switch_len` slots on and per-token keys below, and a per-token int4
    or int8 cache gets the largest full-precision ring up to :data:`DEFAULT_RECENT` that
    keeps it within the dense bytes (0 for very short caches). The result says which:
    :attr:`SentinelKVCache.layout`.

    Args:
        model: a transformers decoder whose attention dispatches through
            ``AttentionInterface`` (Llama, Mistral, Qwen2/3 ...). It is switched to
            ``attn_implementation="sentinel"`` if needed (warned once).
        spec: ``"dense"``, ``"int8"``, ``"int4"`` or ``"lowrank:<r>"`` (needs bases from
            :func:`sentinel_kernels.quant.calibrate_lowrank` on the model; their fp32
            device copies are shared by the model's caches and not counted in ``nbytes``,
            see :attr:`SentinelKVCache.shared_nbytes`).
        max_cache_len: slots per layer ``L``: the most tokens it holds (more raises
            ``ValueError``, unless ``wrap``).
        batch_size: batch rows.
        device, dtype: default the model's (dtype of the dense storage, the recent ring and
            low-rank latents; must be the dtype of the model's keys).
        groups: int8/int4 scale groups per head vector (``ceil(D / groups)`` channels each);
            default from :data:`DEFAULT_GROUP_SIZE`.
        recent: int8/int4: the last ``recent`` tokens are also kept in full precision and
            read from there; used as given. Default (``None``): with KIVI keys two key
            blocks; with per-token keys the largest ring of at most :data:`DEFAULT_RECENT`
            slots that keeps the cache within the dense bytes (32 for int4 once ``L`` is a
            few dozen tokens, fewer below).
        wrap: a ring of ``L`` slots: position ``j`` lives in slot ``j % L`` and only the
            last ``L`` tokens stay readable. Exact for sliding-window layers (a chunk of
            ``S`` tokens needs ``L >= min(S, 64) + window - 1``, checked); full-attention
            layers (all of a Llama, some of a hybrid) then attend over the last ``L``
            tokens only.
        key_block: int4 only: keys quantized per channel over blocks of this many tokens
            (KIVI), the block being filled kept in a full-precision ring of ``recent``
            slots (default ``2 * key_block``, a multiple of it); ``max_cache_len`` is
            rounded up to whole blocks. Used as given (even where it makes the cache larger
            than a dense one, e.g. a few tokens). ``0``: keys per token in groups, like the
            values (always so with ``wrap``, and when ``recent`` is given and is not a
            positive multiple of :data:`DEFAULT_KEY_BLOCK`, e.g. 0). Default (``None``,
            with ``recent`` not given either): :data:`DEFAULT_KEY_BLOCK` when ``L >=``
            :func:`kv_cache_switch_len` (the KIVI cache is then at most the dense one for
            every longer ``L``; 157 for SmolLM2-135M in fp32, 204 in bf16, any batch),
            else ``0``.

    Returns:
        A :class:`SentinelKVCache` (a ``transformers.cache_utils.Cache``); ``.nbytes`` is
        the bytes it allocated (:func:`kv_cache_bytes`), ``.layout`` the layout in words.
    """
    parsed = parse_spec(spec)
    _check_sizes(max_cache_len, batch_size)
    geos = _geometry(model)
    m_dtype, m_device = _model_dtype_device(model)
    dtype = m_dtype if dtype is None else dtype
    dev = m_device if device is None else torch.device(device)
    if wrap:
        for g in geos:
            if g.sliding_window and max_cache_len < g.sliding_window:
                raise ValueError(
                    f"a wrapping cache must hold the sliding window: max_cache_len "
                    f"{max_cache_len} < sliding_window {g.sliding_window}"
                )
    sz = _sizing(model, parsed, batch_size, dtype, groups)
    layout = _resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    bases = _bases_for(model, parsed, geos) if parsed.kind == "lowrank" else None
    _ensure_sentinel(model)
    memo: dict[Any, Any] = {}
    layers = []
    for i, g in enumerate(geos):
        basis = None
        if bases is not None:
            basis = _device_bases(bases, i, parsed.rank, dev)
        layers.append(
            SentinelKVLayer(
                parsed,
                g,
                batch_size=batch_size,
                max_cache_len=max_cache_len,
                dtype=dtype,
                device=dev,
                groups=_resolve_groups(parsed, g.head_dim, groups),
                recent=layout.ring,
                wrap=bool(wrap),
                memo=memo,
                basis=basis,
                key_block=layout.key_block,
            )
        )
    return SentinelKVCache(layers, parsed)


def kv_cache_bytes(
    model: nn.Module,
    spec: str,
    max_cache_len: int,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """Bytes :func:`kv_cache` with these arguments allocates (its ``nbytes``), computed
    without allocating (the layout is chosen the same way; shared low-rank bases are not
    counted)."""
    parsed = parse_spec(spec)
    _check_sizes(max_cache_len, batch_size)
    sz = _sizing(model, parsed, batch_size, dtype, groups)
    return sz.nbytes(
        max_cache_len, _resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    )


def kv_cache_layout(
    model: nn.Module,
    spec: str,
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
    """The :attr:`SentinelKVCache.layout` of :func:`kv_cache` with these arguments, without
    allocating. ``brief``: only the keys and the ring (``"KIVI keys over 64-token blocks +
    128-slot float32 ring"``, ``"per-token int4 keys + 32-slot float32 ring"``)."""
    parsed = parse_spec(spec)
    _check_sizes(max_cache_len, batch_size)
    sz = _sizing(model, parsed, batch_size, dtype, groups)
    layout = _resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    dt = dtype or _model_dtype_device(model)[0]
    return "; ".join(
        dict.fromkeys(
            _describe(
                parsed,
                g.head_dim,
                _resolve_groups(parsed, g.head_dim, groups),
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
    spec: str,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """The smallest ``max_cache_len`` from which :func:`kv_cache` with these arguments uses
    one layout for every longer cache (its long-context one: KIVI keys for a default int4
    cache, the full default ring for a per-token one); shorter caches use a smaller one
    that stays within the dense bytes. ``1`` when the layout does not depend on the length
    (dense, low-rank, int8, explicit ``key_block`` or ``recent``).

    For int4 with the defaults this is where KIVI keys start: 157 slots for SmolLM2-135M
    in float32 and 204 in bfloat16 (3 KV heads, head dim 64; the same for every batch size,
    since every byte is per row)."""
    parsed = parse_spec(spec)
    _check_sizes(1, batch_size)
    sz = _sizing(model, parsed, batch_size, dtype, groups)
    return _layout_stable_from(sz, key_block, recent, bool(wrap))


def kv_cache_len_for_budget(
    model: nn.Module,
    spec: str,
    budget_bytes: int,
    batch_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    groups: int | None = None,
    recent: int | None = None,
    key_block: int | None = None,
    wrap: bool = False,
) -> int:
    """The longest ``max_cache_len`` whose :func:`kv_cache` allocation fits ``budget_bytes``.

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
    _check_sizes(1, batch_size)
    budget = int(budget_bytes)
    sz = _sizing(model, parsed, batch_size, dtype, groups)
    stable = _layout_stable_from(sz, key_block, recent, bool(wrap))
    long = _resolve_layout(sz, stable, key_block, recent, bool(wrap))
    step = long.key_block or 1
    first = -(-stable // step) * step  # a whole number of steps in the fixed layout
    one = sz.nbytes(first, long)
    per_step = sz.nbytes(first + step, long) - one
    fixed = one - (first // step) * per_step
    n = (budget - fixed) // per_step
    if n >= 1 and n * step >= stable:
        return int(n * step)
    for length in range(stable - 1, 0, -1):
        if sz.nbytes(length, _resolve_layout(sz, length, key_block, recent, bool(wrap))) <= budget:
            return length
    least = sz.nbytes(1, _resolve_layout(sz, 1, key_block, recent, bool(wrap)))
    raise ValueError(
        f"a {spec} KV cache needs at least {least} bytes (1 slot); budget {budget_bytes}"
    )


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`kv_cache`.

    ``sk.kv_cache`` is the public *function*, but ``sentinel_kernels.kv_cache`` is also the
    name of this module, and importing the module (``from sentinel_kernels.kv_cache import
    ...``, done by ``sk.eval`` too) makes the package attribute the module, whatever the
    package bound before. Calling the module calls the function, so ``sk.kv_cache(model,
    "int8", ...)`` works in every import order.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> SentinelKVCache:
        return kv_cache(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

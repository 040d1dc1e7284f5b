"""Cache kinds and their knobs: :class:`CacheSpec`, :func:`parse_spec` and the defaults.

A spec names what a :func:`~sentinel_kernels.cache.kv_cache` stores per token and KV head:
``"dense"`` (model dtype), ``"int8"``, ``"int4"`` or ``"lowrank:<r>"`` (``r`` PCA latents in
the model dtype). The functions below turn the optional knobs of ``kv_cache`` (``groups``,
``recent``, ``key_block``) into the values one layer is built with, and reject the
combinations a kind does not support.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..reference.kv_formats import kv_groups

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_KEY_BLOCK",
    "DEFAULT_RECENT",
    "KV_SPECS",
    "CacheKind",
    "CacheSpec",
    "StorageFormat",
    "parse_spec",
    "resolve_groups",
    "resolve_key_block",
    "resolve_recent",
    "resolve_ring",
]

#: The cache kinds :func:`~sentinel_kernels.cache.kv_cache` takes (``"lowrank:<r>"`` with a
#: rank ``r``).
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
#: given; the ring then holds two blocks. Chosen on SmolLM2's chunked perplexity
#: (docs/MEASUREMENTS.md).
#: With the defaults, caches shorter than
#: :func:`~sentinel_kernels.cache.kv_cache_switch_len` use per-token keys.
DEFAULT_KEY_BLOCK = 64

CacheKind = Literal["dense", "int8", "int4", "lowrank"]
#: The :func:`sentinel_kernels.ops.kv_append` / ``decode_attention`` format of stored vectors.
StorageFormat = Literal["dense", "int8", "int4"]

_SPEC_RE = re.compile(r"^(dense|int8|int4|lowrank:([1-9][0-9]*))$")


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache kind: ``kind`` in dense/int8/int4/lowrank, ``rank`` for lowrank.

    ``str(spec)`` is the string form (``"int8"``, ``"lowrank:16"``), so a spec and its string
    are interchangeable wherever a spec is taken."""

    kind: CacheKind
    rank: int = 0

    @property
    def storage_format(self) -> StorageFormat:
        """The :func:`sentinel_kernels.ops.kv_append` format of the stored vectors
        (low-rank latents are stored dense)."""
        if self.kind == "int8" or self.kind == "int4":
            return self.kind
        return "dense"

    @property
    def quantized(self) -> bool:
        """Whether the vectors are stored as int8/int4 codes with scales."""
        return self.kind in ("int8", "int4")

    def __str__(self) -> str:
        return f"lowrank:{self.rank}" if self.kind == "lowrank" else self.kind


def parse_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse ``"dense"``, ``"int8"``, ``"int4"`` or ``"lowrank:<r>"`` (``r >= 1``; case and
    surrounding blanks ignored); a :class:`CacheSpec` is returned as is.

    Raises:
        ValueError: anything else.
    """
    if isinstance(spec, CacheSpec):
        return spec
    m = _SPEC_RE.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"unknown KV cache spec {spec!r}; expected one of {', '.join(KV_SPECS)}")
    if m.group(2):
        return CacheSpec("lowrank", int(m.group(2)))
    if m.group(1) == "int8":
        return CacheSpec("int8")
    if m.group(1) == "int4":
        return CacheSpec("int4")
    return CacheSpec("dense")


def resolve_groups(spec: CacheSpec, head_dim: int, groups: int | None) -> int:
    """Scale groups per head vector for int8/int4 (0 for dense and lowrank): ``groups``
    checked, or the default from :data:`DEFAULT_GROUP_SIZE` (reduced until ``D`` splits
    into that many groups of ``ceil(D / G)`` channels).

    Raises:
        ValueError: ``groups`` given for dense/lowrank, or ``D`` does not split into it.
    """
    if not spec.quantized:
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


def resolve_recent(spec: CacheSpec, recent: int | None) -> int:
    """Full-precision ring slots of a per-token cache: ``recent`` checked, or
    :data:`DEFAULT_RECENT` (the cap; :func:`~sentinel_kernels.cache.kv_cache` may choose
    fewer to stay within the dense bytes).

    Raises:
        ValueError: ``recent`` given for dense/lowrank, or not an int ``>= 0``.
    """
    if not spec.quantized:
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


def resolve_key_block(
    spec: CacheSpec, key_block: int | None, wrap: bool, recent: int | None = None
) -> int:
    """Tokens per KIVI key block (0: per-token keys). By default KIVI, unless ``wrap`` or
    an explicit ``recent`` that cannot be its ring (not a positive multiple of the block:
    e.g. ``recent=0``, the per-token cache without a ring).

    Raises:
        ValueError: a bad ``key_block``, one given for a non-int4 cache, or with ``wrap``.
    """
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


def resolve_ring(spec: CacheSpec, recent: int | None, key_block: int) -> int:
    """Full-precision ring slots: ``recent`` (per-token keys) or two key blocks (KIVI).

    Raises:
        ValueError: with KIVI keys, a ``recent`` that is not a positive multiple of the
            block.
    """
    if not key_block:
        return resolve_recent(spec, recent)
    if recent is None:
        return 2 * key_block
    r = resolve_recent(spec, recent)
    if r < key_block or r % key_block:
        raise ValueError(
            f"with key_block={key_block} the full-precision ring (recent) must be "
            f"a positive multiple of it, got recent={recent}"
        )
    return r

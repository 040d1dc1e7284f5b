"""``sk.kv_cache``: a compressed, preallocated KV cache for transformers models.

``kv_cache(model, spec, max_cache_len=...)`` returns a transformers ``Cache``
(:class:`SentinelKVCache`) whose layers hold, per KV head and token slot, the keys and
values in one of four forms (``B`` rows, ``Hkv`` KV heads, ``L`` slots, head dim ``D``,
``G`` scale groups):

``"dense"``
    model dtype, ``[B, Hkv, L, D]`` (a static cache; the baseline).
``"int8"``
    int8 codes ``[B, Hkv, L, D]`` + float16 scales ``[B, Hkv, L, G]`` (symmetric, per
    token and group of channels: ``x ~= s q``).
``"int4"``
    packed uint8 codes ``[B, Hkv, L, ceil(D/2)]`` (asymmetric: ``x ~= s q + m``; KIVI,
    Liu et al. 2024). Two layouts. *KIVI keys* (``key_block = T``, default 64): keys have
    float16 ``(s, m)`` pairs per channel per block of ``T`` tokens
    ``[B, Hkv, L / T, D, 2]``, values per token in groups ``[B, Hkv, L, G, 2]``, and a
    full-precision ring of ``2 T`` tokens holds the block still being filled (``L`` is
    rounded up to a multiple of the block). *Per-token keys* (``key_block=0``): keys per
    token like values, optionally with a ring of the last ``W`` tokens (``recent``).
    Wrapping caches always use per-token keys.
``"lowrank:r"``
    model dtype latents ``[B, Hkv, L, r]``: ``(k - mu_k) P_k[:, :r]`` and
    ``(v - mu_v) P_v[:, :r]`` with calibrated PCA bases
    (:func:`sentinel_kernels.quant.calibrate_lowrank`), whose fp32 device copies are made
    once per model, device and rank and shared by its caches (not in ``nbytes``; see
    ``shared_nbytes``).

The bit-exact storage formats and quantization rules are in
:mod:`sentinel_kernels.reference.kv_formats`; which layout a given length gets and the
byte counts, in :mod:`.sizing` (:func:`kv_cache_bytes`, :func:`kv_cache_layout`,
:func:`kv_cache_switch_len`, :func:`kv_cache_len_for_budget`).

Everything is allocated up front. The number of tokens written lives twice: as an int32
device tensor per layer (``[B]``, what the kernels read, so a decode step needs no host
sync and can be captured in a CUDA graph) and as a host counter (from tensor shapes, never
read back from the device), which gives ``get_seq_length`` and the capacity check. A
decode step therefore has fixed tensor addresses and no host sync, and can be captured in a
CUDA graph as long as no padding mask is passed (with one, the slot-indexed key mask is
rebuilt from host positions each step) or the mask is fixed with
:meth:`SentinelKVCache.set_static_key_mask`.

How attention reads it (:mod:`.contract`). ``update`` appends the new keys/values with
:func:`sentinel_kernels.ops.kv_append` (one fused quantize-and-store per K and V) and
returns the *new chunk only*: no full-precision copy of the cache ever exists. The keys it
returns carry a :class:`CacheRead` (the layer's :class:`CompressedKV`, positions written,
whether the chunk is still to be appended), which the ``"sentinel"`` attention function
(:mod:`sentinel_kernels.nn.attention`) claims and reads with
:func:`sentinel_kernels.ops.decode_attention`. The cache therefore only works with
``attn_implementation="sentinel"``; :func:`kv_cache` switches the model to it.

The ``kv_cache`` option of :func:`sentinel_kernels.patch_model` is :mod:`.option`.
"""

from .cache import SentinelKVCache, kv_cache
from .contract import CacheRead, CompressedKV, LatentBases
from .layer import SentinelKVLayer
from .sizing import kv_cache_bytes, kv_cache_layout, kv_cache_len_for_budget, kv_cache_switch_len
from .spec import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_KEY_BLOCK,
    DEFAULT_RECENT,
    KV_SPECS,
    CacheSpec,
    parse_spec,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_KEY_BLOCK",
    "DEFAULT_RECENT",
    "KV_SPECS",
    "CacheRead",
    "CacheSpec",
    "CompressedKV",
    "LatentBases",
    "SentinelKVCache",
    "SentinelKVLayer",
    "kv_cache",
    "kv_cache_bytes",
    "kv_cache_layout",
    "kv_cache_len_for_budget",
    "kv_cache_switch_len",
    "parse_spec",
]

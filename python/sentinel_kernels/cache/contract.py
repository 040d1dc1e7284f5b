"""The cache -> attention contract: what a compressed cache layer hands the attention.

A :class:`~sentinel_kernels.cache.SentinelKVCache` never materialises its past in full
precision: its ``update`` stores the new chunk and returns only that chunk, and the
``"sentinel"`` attention function (:mod:`sentinel_kernels.nn.attention`) reads the past
from the compressed storage itself. Two objects carry what it needs.

:class:`CompressedKV`, one per layer, describes the storage: codes, scales, the
full-precision rings, the per-row lengths and the geometry. Its tensors are allocated once
and updated in place, so a decode step reads fixed addresses and needs no host sync (it can
be captured in a CUDA graph). The lengths are per row (``lengths[b]`` positions written in
row ``b``), so rows at different positions, as in continuous batching, use the same
object; :func:`sentinel_kernels.nn.attention.attend_compressed` is its reader. Formats
(``x`` a key or value channel, ``s``/``m`` float16 scale/min, rules bit for bit in
:mod:`sentinel_kernels.reference.kv_formats`):

* ``"dense"``: ``x`` itself, model dtype;
* ``"int8"``: ``x ~= s q``, ``q`` int8 in ``[-127, 127]``, ``s = max|x| / 127`` per token
  and group of ``ceil(D / G)`` channels (symmetric);
* ``"int4"``: ``x ~= s q + m``, ``q`` in ``[0, 15]`` packed two per byte,
  ``s = (max x - min x) / 15``, ``m = min x``, per token and group (values, and keys with
  ``key_block = 0``) or, for keys with ``key_block = T``, per channel over each block of
  ``T`` positions (KIVI, Liu et al. 2024: key outliers sit in fixed channels);
* low rank ``r`` (``latent`` set, stored ``"dense"``): ``z = (x - mu) P[:, :r]`` with
  calibrated PCA bases; the reader scores ``(q P_k) . z_k`` (``q . mu_k`` is the same for
  every key, so softmax drops it) and returns ``o P_v^T + mu_v``.

A full-precision ring (``k_ring``/``v_ring``, ``R`` slots, position ``j`` in slot
``j % R``) holds the last ``R`` positions as well; the reader takes them from there (KIVI's
residual window; with KIVI keys the ring also holds the key block still being filled).

:class:`CacheRead`, one per attention call, is the handoff: the layer's
:class:`CompressedKV`, the host count of positions written (including the chunk), whether
the chunk still has to be appended by the reader (chunks longer than
``MAX_CACHE_QUERIES`` are appended piece by piece, each just before its queries read), and
the mask state. ``SentinelKVCache.update`` returns the chunk's keys as a view that carries
its ``CacheRead`` (:func:`sentinel_kernels.nn.attention.attach_cache_read`); the attention
function receives exactly that tensor and claims the read from it
(:meth:`CacheRead.claim`). Keys that carry no read (another cache, no cache, a model that
transformed the keys in between) are attended as given, like any attention call; the cache
raises on its next ``update`` when the previous read was never claimed, since its past
would have been silently ignored.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .spec import StorageFormat

__all__ = ["CacheRead", "CompressedKV", "LatentBases", "SlotMaskMemo"]

#: Slot-indexed key masks built from one transformers mask object, shared by the layers of
#: a cache: ``id(mask) -> (weakref to it, {(positions, capacity, wrap): int8 [B, L]})``.
SlotMaskMemo = dict[
    int, tuple[weakref.ref[torch.Tensor], dict[tuple[int, int, bool], torch.Tensor]]
]


@dataclass(frozen=True, eq=False)
class LatentBases:
    """The PCA bases of a low-rank layer (fp32, on the cache's device; shared by every cache
    of the model built for this rank and device).

    Fields (``Hkv`` KV heads, head dim ``D``, rank ``r``):
        k_proj, v_proj: float32 ``[Hkv, D, r]``, the first ``r`` principal directions.
        k_mean, v_mean: float32 ``[Hkv, D]``, the calibration means.
    """

    k_proj: torch.Tensor
    k_mean: torch.Tensor
    v_proj: torch.Tensor
    v_mean: torch.Tensor

    @property
    def rank(self) -> int:
        """Latent channels ``r``."""
        return int(self.k_proj.shape[2])


@dataclass(frozen=True, eq=False)
class CompressedKV:
    """One layer's compressed K/V storage, as attention reads it.

    Shapes: ``B`` rows, ``Hkv`` KV heads, ``L`` slots (``capacity``), head dim ``D``,
    stored channels ``C`` (``D``, or ``r`` for low rank), ``G`` scale groups, ring ``R``.

    Fields:
        format: ``"dense"``, ``"int8"`` or ``"int4"`` (the ``kv_format`` of
            :func:`sentinel_kernels.ops.decode_attention`; low-rank latents are ``"dense"``).
        k_codes, v_codes: dense: model dtype ``[B, Hkv, L, C]``; int8: int8
            ``[B, Hkv, L, D]``; int4: uint8 ``[B, Hkv, L, ceil(D/2)]``.
        k_scales: ``None`` (dense); int8: float16 ``[B, Hkv, L, G]``; int4 per-token
            keys: float16 ``[B, Hkv, L, G, 2]`` ``(s, m)``; KIVI keys: float16
            ``[B, Hkv, L / key_block, D, 2]``, one ``(s, m)`` per channel per block.
        v_scales: ``None`` (dense); int8: float16 ``[B, Hkv, L, G]``; int4: float16
            ``[B, Hkv, L, G, 2]``.
        k_ring, v_ring: ``None`` or model dtype ``[B, Hkv, R, D]``: the last ``R``
            positions in full precision (slot ``j % R``).
        lengths: int32 ``[B]`` on the storage device: positions written per row. Appends
            advance it on the device; readers never copy it to the host.
        key_block: ``T > 0``: int4 keys per channel over ``T``-position blocks (KIVI,
            ``L`` a multiple of ``T``, ring of ``R >= T`` slots); ``0``: keys per token.
        wrap: slot ``j % L`` holds position ``j`` (only the last ``L`` stay readable);
            else slot ``j``.
        num_kv_heads, head_dim: ``Hkv`` and the model's ``D`` (queries and outputs).
        latent: the bases of a low-rank layer, else ``None``.

    Raises:
        ValueError: at construction, when the tensors disagree with these shapes/dtypes.
    """

    format: StorageFormat
    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scales: torch.Tensor | None
    v_scales: torch.Tensor | None
    k_ring: torch.Tensor | None
    v_ring: torch.Tensor | None
    lengths: torch.Tensor
    key_block: int
    wrap: bool
    num_kv_heads: int
    head_dim: int
    latent: LatentBases | None = None

    def __post_init__(self) -> None:
        b, h, cap = self.batch_size, self.num_kv_heads, self.capacity
        problems = []
        if self.lengths.dtype != torch.int32 or tuple(self.lengths.shape) != (b,):
            problems.append(f"lengths {self.lengths.dtype} {tuple(self.lengths.shape)}")
        if tuple(self.k_codes.shape[:2]) != (b, h) or self.v_codes.shape != self.k_codes.shape:
            problems.append(
                f"codes {tuple(self.k_codes.shape)} / {tuple(self.v_codes.shape)} for {h} KV heads"
            )
        code_dtype = {"int8": torch.int8, "int4": torch.uint8}.get(self.format)
        if code_dtype is not None and self.k_codes.dtype != code_dtype:
            problems.append(f"{self.format} codes of dtype {self.k_codes.dtype}")
        if (self.k_scales is None) != (self.format == "dense") or (self.v_scales is None) != (
            self.format == "dense"
        ):
            problems.append(f"scales present/absent do not match format {self.format!r}")
        if (self.k_ring is None) != (self.v_ring is None):
            problems.append("only one of k_ring / v_ring")
        if self.key_block:
            if self.format != "int4" or self.wrap or cap % self.key_block or self.ring < 1:
                problems.append(
                    f"key_block {self.key_block} needs int4, no wrap, L % T == 0 and a ring "
                    f"(format {self.format!r}, wrap {self.wrap}, L {cap}, ring {self.ring})"
                )
        if self.latent is not None and self.format != "dense":
            problems.append("low-rank latents must be stored dense")
        if problems:
            raise ValueError("CompressedKV: " + "; ".join(problems))

    @property
    def batch_size(self) -> int:
        """Rows ``B``."""
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        """Slots ``L`` per row and head."""
        return int(self.k_codes.shape[2])

    @property
    def ring(self) -> int:
        """Full-precision ring slots ``R`` (0: none)."""
        return 0 if self.k_ring is None else int(self.k_ring.shape[2])


@dataclass(eq=False)
class CacheRead:
    """One attention call's read of one compressed layer (see the module docstring).

    Fields:
        kv: the layer's storage.
        layer_idx: the decoder layer (the attention module's ``layer_idx``).
        seq_length: host int, positions written per row including this chunk (every row
            at the same position, as transformers' forward assumes).
        deferred: the chunk is not in ``kv`` yet: the reader appends it with ``append``,
            at most ``MAX_CACHE_QUERIES`` positions at a time, each piece just before its
            queries read (a ring then never loses a position those queries still see).
        append: ``append(key, value)`` with ``[B, Hkv, S, D]`` model-dtype chunks: stores
            them at positions ``lengths[b] ..`` and advances ``kv.lengths`` by ``S``.
        slot_mask: int8 ``[B, L]`` key mask by slot (nonzero = attend) to use when the
            forward brings no attention mask, or ``None``
            (``SentinelKVCache.set_static_key_mask``); updated in place.
        mask_memo: slot masks built from transformers' masks, shared by a cache's layers.
        segment_starts: int ``[B, Sq]`` or ``None``: a prefill into empty rows of packed
            prompts; query ``i`` sees keys ``j >= segment_starts[b, i]`` only
            (``SentinelKVCache.set_segment_starts``).
        rope: ``(cos, sin)`` or ``None``: the chunk (at most ``MAX_DECODE_QUERIES``
            tokens, over a stored past, a per-token cache without a ring, wrap or latents)
            is neither rotated nor stored yet, and the query the reader gets is
            unrotated: the reader rotates, stores and attends in one
            ``ops.rope_decode_attention``, or runs ``ops.rope_kv_append`` first on any
            other route (``SentinelKVCache.update_rotary`` with
            ``SENTINEL_ROPE_ATTENTION=1``).
    """

    kv: CompressedKV
    layer_idx: int
    seq_length: int
    deferred: bool
    append: Callable[[torch.Tensor, torch.Tensor], None]
    slot_mask: torch.Tensor | None = None
    mask_memo: SlotMaskMemo = field(default_factory=dict)
    segment_starts: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    _claimed: bool = field(default=False, init=False, repr=False)

    def claim(self) -> bool:
        """Mark the read as taken by an attention call; ``False`` when one already took it
        (a second call with the same keys must not append or read it again)."""
        if self._claimed:
            return False
        self._claimed = True
        return True

    @property
    def claimed(self) -> bool:
        """Whether an attention call took this read."""
        return self._claimed

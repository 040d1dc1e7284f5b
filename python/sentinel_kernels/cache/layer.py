"""One decoder layer of a :func:`~sentinel_kernels.cache.kv_cache`: :class:`SentinelKVLayer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import settings
from ..nn.attention import attach_cache_read
from ..ops.decode_attention import MAX_CACHE_QUERIES, MAX_DECODE_QUERIES
from ..ops.kv_append import kv_append, kv_append_key_blocks, rope_kv_append
from ..reference.kv_formats import kv_code_width, kv_scale_shape
from .contract import CacheRead, CompressedKV, LatentBases, SlotMaskMemo
from .sizing import LayerGeometry, Layout, describe, slots
from .spec import CacheSpec

__all__ = ["SentinelKVLayer"]


class SentinelKVLayer(CacheLayerMixin):
    """One decoder layer's compressed KV storage (a transformers ``CacheLayerMixin``).

    Storage (shapes in :class:`~sentinel_kernels.cache.contract.CompressedKV`, which
    :attr:`compressed` presents to the attention): ``k_store``/``v_store`` (codes, or
    dense/latent vectors), ``k_scale``/``v_scale`` (``None`` unless int8/int4),
    ``k_recent``/``v_recent`` (the full-precision ring, or ``None``), ``cache_lens``
    (int32 ``[B]`` device: positions written per row), ``latent`` (low-rank bases, or
    ``None``). ``seq_length`` is the host count of positions written (never read back
    from the device); ``kv_format`` the storage format of the ops, ``capacity`` the slots
    ``L``.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        spec: CacheSpec,
        geo: LayerGeometry,
        *,
        layer_idx: int,
        batch_size: int,
        max_cache_len: int,
        dtype: torch.dtype,
        device: torch.device,
        groups: int,
        recent: int,
        wrap: bool,
        memo: SlotMaskMemo,
        latent: LatentBases | None = None,
        key_block: int = 0,
    ) -> None:
        super().__init__()
        # KIVI keys: slots rounded up to whole key blocks.
        max_cache_len = slots(max_cache_len, key_block)
        self.layer_idx = layer_idx
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
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if spec.quantized:
            shape = kv_scale_shape((b, h, cap), groups, spec.kind)
            self.v_scale = torch.zeros(shape, dtype=torch.float16, device=device)
            if key_block:
                self.k_scale = torch.zeros(
                    b, h, cap // key_block, d, 2, dtype=torch.float16, device=device
                )
            else:
                self.k_scale = torch.zeros_like(self.v_scale)
        self.k_recent: torch.Tensor | None = None
        self.v_recent: torch.Tensor | None = None
        if recent:
            self.k_recent = torch.zeros(b, h, recent, d, dtype=dtype, device=device)
            self.v_recent = torch.zeros_like(self.k_recent)
        self.cache_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.latent = latent
        self.seq_length = 0
        # update_rotary leaves a decode step's rotation and append to the attention
        # (CacheRead.rope): decided once, when the cache is made.
        self.rope_in_attention = (
            spec.kind in settings.rope_attention()
            and not key_block
            and not recent
            and not wrap
            and latent is None
        )
        # int8 [B, L] key mask by slot, shared by the layers of a cache, used when the
        # forward brings no attention_mask (sk.generate's captured decode step); see
        # SentinelKVCache.set_static_key_mask.
        self.static_key_mask: torch.Tensor | None = None
        # int [B, S] first visible key of each query of the next prefill into empty rows
        # (packed prompts); see SentinelKVCache.set_segment_starts.
        self.segment_starts: torch.Tensor | None = None
        # (layer, rows [S], positions [S]) where the next prefill stores its positions
        # instead of this layer's own rows; see SentinelKVCache.set_destinations.
        self.destinations: tuple[SentinelKVLayer, torch.Tensor, torch.Tensor] | None = None
        # The read handed to the attention by the last update (None before the first).
        self.last_read: CacheRead | None = None
        self.is_initialized = True
        # transformers' generic layer code looks for these; the compressed store is not a
        # [B, H, S, D] tensor of keys, so they stay None.
        self.keys = None
        self.values = None
        self.compressed = self._compressed()

    def _compressed(self) -> CompressedKV:
        return CompressedKV(
            format=self.kv_format,
            k_codes=self.k_store,
            v_codes=self.v_store,
            k_scales=self.k_scale,
            v_scales=self.v_scale,
            k_ring=self.k_recent,
            v_ring=self.v_recent,
            lengths=self.cache_lens,
            key_block=self.key_block,
            wrap=self.wrap,
            num_kv_heads=self.num_heads,
            head_dim=self.head_dim,
            latent=self.latent,
        )

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
        if self.latent is None:
            return []
        la = self.latent
        return [la.k_proj, la.k_mean, la.v_proj, la.v_mean]

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
        return describe(
            self.spec,
            self.head_dim,
            self.groups,
            Layout(self.key_block, self.recent),
            self.dtype,
            self.wrap,
        )

    @staticmethod
    def _to_latent(x: torch.Tensor, proj: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        # (x - mu) P[:, :r] per KV head, in fp32: [B, H, S, D] x [H, D, r] -> [B, H, S, r].
        return torch.matmul(x.float() - mean[None, :, None, :], proj[None])

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``key``/``value`` ``[B, Hkv, S, D]`` at positions ``cache_lens[b] + i``
        (one fused :func:`~sentinel_kernels.ops.kv_append` per K and V, plus the recent
        ring), then advance ``cache_lens`` by ``S`` on the device."""
        s = key.shape[2]
        if s == 0:
            return
        if self.latent is not None:
            key = self._to_latent(key, self.latent.k_proj, self.latent.k_mean)
            value = self._to_latent(value, self.latent.v_proj, self.latent.v_mean)
        if self.key_block:
            # KIVI keys: completed blocks quantized per channel, then the key ring.
            assert self.k_scale is not None and self.k_recent is not None
            kv_append_key_blocks(
                key, self.k_store, self.k_scale, self.k_recent, self.cache_lens, self.key_block
            )
        else:
            kv_append(key, self.k_store, self.cache_lens, self.kv_format, self.k_scale, self.wrap)
        kv_append(value, self.v_store, self.cache_lens, self.kv_format, self.v_scale, self.wrap)
        if self.k_recent is not None and self.v_recent is not None:
            if not self.key_block:
                kv_append(key, self.k_recent, self.cache_lens, "dense", None, True)
            kv_append(value, self.v_recent, self.cache_lens, "dense", None, True)
        self.cache_lens.add_(s)

    def store_positions(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Store position ``t`` of a one-row chunk ``key``/``value`` ``[1, Hkv, S, D]`` at
        slot ``positions[t]`` of row ``rows[t]`` (codes and scales as an append writes
        them); ``cache_lens`` is not touched. One :func:`~sentinel_kernels.ops.kv_append`
        per K and V over the chunk seen as ``[S, Hkv, 1, D]`` (a token per batch row, each
        with its own destination row): how prompts packed one after another in one row
        reach their slots without a staging copy.

        ``rows``, ``positions``: int ``[S]`` on the cache's device, read only there (a
        captured graph may hold them); a row outside the cache or a slot past ``L`` is not
        written, and a destination given twice holds garbage on a GPU (the packed prefill
        gives each real position its own).

        Raises:
            ValueError: a format whose positions are not stored one by one (KIVI key
                blocks, a full-precision ring, low-rank latents, a wrapping ring), or
                shapes that do not match.
        """
        if self.key_block or self.k_recent is not None or self.latent is not None or self.wrap:
            raise ValueError(
                "store_positions: only for formats that store each position alone (dense, "
                "int8, int4 without KIVI key blocks, a ring, latents or wrap)"
            )
        s = key.shape[2]
        want = (1, self.num_heads, s, self.head_dim)
        if tuple(key.shape) != want or tuple(value.shape) != want:
            raise ValueError(
                f"store_positions: keys {tuple(key.shape)} / values {tuple(value.shape)}, "
                f"expected {want}"
            )
        if tuple(rows.shape) != (s,) or tuple(positions.shape) != (s,):
            raise ValueError(
                f"store_positions: rows {tuple(rows.shape)} and positions "
                f"{tuple(positions.shape)} must both be [{s}] (one per position)"
            )
        fmt = self.kv_format
        kv_append(key.permute(2, 1, 0, 3), self.k_store, positions, fmt, self.k_scale, rows=rows)
        kv_append(value.permute(2, 1, 0, 3), self.v_store, positions, fmt, self.v_scale, rows=rows)

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

    def _begin(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[int, bool]:
        """Check a chunk against the storage: ``(positions before it, deferred)``."""
        self._check_chunk(key_states, value_states)
        s = key_states.shape[2]
        before = self.seq_length
        if not self.wrap and before + s > self.capacity:
            raise ValueError(
                f"sk.kv_cache: {before} + {s} tokens exceed max_cache_len={self.capacity}; "
                "allocate a longer cache (or wrap=True for a sliding-window ring)"
            )
        if self.wrap and self.sliding_window and before > 0:
            piece = min(s, MAX_CACHE_QUERIES)
            if piece + self.sliding_window - 1 > self.capacity:
                raise ValueError(
                    f"sk.kv_cache: a {piece}-token step over a wrapping cache of "
                    f"{self.capacity} slots with sliding window {self.sliding_window} would "
                    f"overwrite keys its queries still see; need max_cache_len >= "
                    f"{piece + self.sliding_window - 1}"
                )
        return before, before > 0 and s > MAX_CACHE_QUERIES

    def _hand_out(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        before: int,
        deferred: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seq_length = before + key_states.shape[2]
        append: Callable[[torch.Tensor, torch.Tensor], None] = self.append
        read = CacheRead(
            kv=self.compressed,
            layer_idx=self.layer_idx,
            seq_length=self.seq_length,
            deferred=deferred,
            append=append,
            slot_mask=self.static_key_mask,
            mask_memo=self.key_mask_memo,
            segment_starts=self.segment_starts,
            rope=rope,
        )
        self.last_read = read
        return attach_cache_read(key_states, read), value_states

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk ``[B, Hkv, S, D]`` and return it (not the cache): the keys as a
        view carrying the :class:`~sentinel_kernels.cache.contract.CacheRead` through
        which the sentinel attention reads the compressed past (also :attr:`last_read`).

        Chunks of up to ``MAX_CACHE_QUERIES`` (64) tokens, and any chunk into an empty
        cache, are appended here. A longer chunk into a non-empty cache is appended by the
        attention function, 64 tokens at a time, each piece just before its queries read the
        cache (``CacheRead.deferred``): a ring (``wrap``, recent window) then never holds a
        position its readers may not see yet.

        With destinations set (``SentinelKVCache.set_destinations``), a chunk into this
        empty one-row view goes position by position to the rows and slots named there
        (:meth:`store_positions`) instead, and this view's own storage and lengths stay as
        they are.
        """
        if self.destinations is not None:
            # packed prompts: each position straight to its slot (set_destinations)
            self._check_chunk(key_states, value_states)
            if self.seq_length:
                raise ValueError(
                    "SentinelKVCache.set_destinations: a prefill into an empty view only; "
                    f"this one already holds {self.seq_length} positions"
                )
            into, rows, positions = self.destinations
            into.store_positions(key_states, value_states, rows, positions)
            return self._hand_out(key_states, value_states, 0, False)
        before, deferred = self._begin(key_states, value_states)
        if not deferred:
            self.append(key_states, value_states)
        return self._hand_out(key_states, value_states, before, deferred)

    def rotary_applies(self, query_length: int) -> bool:
        """Whether :meth:`update_rotary` takes a chunk of ``query_length`` tokens now: a
        per-token format (dense, int8, int4; not KIVI key blocks, a recent ring or
        low-rank latents), no destinations set, a cache that already holds positions
        (the attention then reads the past from the cache, never the chunk's own keys)
        and a chunk it appends at once (``<= MAX_CACHE_QUERIES``)."""
        return (
            self.latent is None
            and not self.key_block
            and self.k_recent is None
            and self.destinations is None
            and self.seq_length > 0
            and 0 < query_length <= MAX_CACHE_QUERIES
        )

    def update_rotary(
        self,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`update` for keys before their rotary embedding: rotates ``query`` and
        ``key_states`` (``x cos + rotate_half(x) sin``), appends the rotated keys and the
        values and advances ``cache_lens``, in one :func:`~sentinel_kernels.ops.rope_kv_append`
        (one kernel launch on a GPU for decode-sized chunks instead of four).

        Returns ``(rotated query, keys carrying the CacheRead, values)``. The keys returned
        are the chunk's keys *before* rotation: the attention reads this chunk's rotated
        keys from the cache (:meth:`rotary_applies` holds), never from this tensor. With
        ``rope_in_attention`` (the cache's format is in ``settings.rope_attention()`` when
        it was made: int8 by default; no ring, wrap or latents) a chunk of at most
        ``MAX_DECODE_QUERIES`` tokens is neither rotated nor stored here: the query comes
        back unrotated and the read carries ``rope=(cos, sin)``, so that the attention
        does all three in one ``ops.rope_decode_attention``.

        Raises:
            ValueError: :meth:`rotary_applies` is false, or the chunk does not fit.
        """
        if not self.rotary_applies(key_states.shape[2]):
            raise ValueError(
                "sk.kv_cache: update_rotary takes chunks of 1..64 tokens into a non-empty "
                "per-token cache layer (not KIVI, a recent ring or low-rank); use update"
            )
        before, deferred = self._begin(key_states, value_states)
        if self.rope_in_attention and key_states.shape[2] <= MAX_DECODE_QUERIES:
            # The attention rotates, stores and attends in one launch (CacheRead.rope).
            k, v = self._hand_out(key_states, value_states, before, deferred, rope=(cos, sin))
            return query, k, v
        q = rope_kv_append(
            query,
            key_states,
            value_states,
            cos,
            sin,
            self.k_store,
            self.v_store,
            self.cache_lens,
            self.kv_format,
            self.k_scale,
            self.v_scale,
            self.wrap,
        )
        k, v = self._hand_out(key_states, value_states, before, deferred)
        return q, k, v

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
        self.last_read = None

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
        for t in self.tensors():
            t.copy_(t.index_select(0, idx))

    def _rebatch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.k_store = fn(self.k_store).contiguous()
        self.v_store = fn(self.v_store).contiguous()
        if self.k_scale is not None:
            self.k_scale = fn(self.k_scale).contiguous()
        if self.v_scale is not None:
            self.v_scale = fn(self.v_scale).contiguous()
        if self.k_recent is not None:
            self.k_recent = fn(self.k_recent).contiguous()
        if self.v_recent is not None:
            self.v_recent = fn(self.v_recent).contiguous()
        self.cache_lens = fn(self.cache_lens).contiguous()
        self.batch_size = self.cache_lens.shape[0]
        self.compressed = self._compressed()  # new tensors: a new view of them

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

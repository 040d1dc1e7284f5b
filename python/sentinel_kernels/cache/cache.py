"""The compressed transformers ``Cache`` (:class:`SentinelKVCache`) and :func:`kv_cache`."""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..nn import attention as sk_attention
from ..quant.lowrank import LOWRANK_ATTR, LowRankBases, get_lowrank_bases
from .contract import CacheRead, LatentBases, SlotMaskMemo
from .layer import SentinelKVLayer
from .sizing import (
    LayerGeometry,
    check_sizes,
    layer_geometry,
    model_dtype_device,
    resolve_layout,
    sizing_for,
)
from .spec import CacheSpec, parse_spec, resolve_groups

__all__ = ["SentinelKVCache", "kv_cache"]

_warned_switch = False
_warn_lock = threading.Lock()

# This module imports transformers anyway (the Cache base classes): make
# attn_implementation="sentinel" available right away, as the model loaders do.
sk_attention.register()


class SentinelKVCache(Cache):
    """A transformers ``Cache`` of :class:`SentinelKVLayer` (build it with :func:`kv_cache`).

    Works only with ``attn_implementation="sentinel"``: ``update`` returns the new chunk,
    whose keys carry the :class:`~sentinel_kernels.cache.contract.CacheRead` through which
    the sentinel attention function reads the compressed storage itself.
    """

    def __init__(self, layers: list[SentinelKVLayer], spec: CacheSpec) -> None:
        base_layers: list[Any] = layers  # transformers' `self.layers`: this very list
        super().__init__(layers=base_layers)
        self._layers = layers  # the same list, typed
        self.spec = spec
        # The read handed out by the last update, until reset: the next update checks
        # that an attention call claimed it.
        self._last_read: CacheRead | None = None

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
        """Store a chunk in layer ``layer_idx`` and return it, ``(key_states,
        value_states)``: the keys as a view carrying the layer's
        :class:`~sentinel_kernels.cache.contract.CacheRead`, which the sentinel attention
        claims when it reads the compressed past (:meth:`SentinelKVLayer.update`).

        Raises:
            RuntimeError: the read handed out by the previous update was never claimed: the
                model does not run the sentinel attention (or does not hand it the keys
                this returned), or a forward failed in between; the cache's past would have
                been silently ignored.
        """
        layer = self._layer_for_update(layer_idx)
        out = layer.update(key_states, value_states)
        self._last_read = layer.last_read
        return out

    def _layer_for_update(self, layer_idx: int) -> SentinelKVLayer:
        """Layer ``layer_idx``, after checking that the previous update's read was claimed."""
        if not 0 <= layer_idx < len(self._layers):
            raise IndexError(
                f"sk.kv_cache: layer {layer_idx} out of range ({len(self._layers)} layers)"
            )
        prev = self._last_read
        if prev is not None and not prev.claimed:
            self._last_read = None
            raise RuntimeError(
                f"the compressed KV cache's update of layer {prev.layer_idx} was not followed "
                "by the sentinel attention reading it: the model must run "
                f"attn_implementation={sk_attention.ATTN_IMPLEMENTATION!r} (sk.kv_cache "
                "switches it; was it switched back?) and its attention must receive the key "
                "tensor the cache returned. If a forward failed midway, call cache.reset() "
                "before reusing it"
            )
        return self._layers[layer_idx]

    def update_rotary(
        self,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_idx: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rotary embedding of ``query``/``key_states`` fused with :meth:`update`
        (:meth:`SentinelKVLayer.update_rotary`: one kernel launch on a GPU for a decode
        step's chunk), or ``None`` when layer ``layer_idx`` cannot take this chunk that way
        (:meth:`SentinelKVLayer.rotary_applies`; the caller then rotates and calls
        :meth:`update`). Returns ``(rotated query, keys carrying the CacheRead, values)``.

        Raises:
            IndexError, RuntimeError: as :meth:`update`.
        """
        layer = self._layer_for_update(layer_idx)
        if not layer.rotary_applies(key_states.shape[2]):
            return None
        out = layer.update_rotary(query, key_states, value_states, cos, sin)
        self._last_read = layer.last_read
        return out

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens written to layer ``layer_idx`` (host counter; 0 when out of range)."""
        idx = 0 if layer_idx is None else layer_idx
        if idx >= len(self._layers):
            return 0
        return self._layers[idx].seq_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Position of the first query token: the tokens written so far."""
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(
        self, query_length: int | torch.Tensor, layer_idx: int = 0
    ) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of layer ``layer_idx`` for the mask builders."""
        idx = min(layer_idx, len(self._layers) - 1)
        return self._layers[idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """``max_cache_len`` (``-1`` when wrapping)."""
        return self._layers[0].get_max_length()

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """transformers 4.5x name of :meth:`get_max_length`."""
        return self.get_max_length()

    def get_usable_length(self, new_seq_length: int, layer_idx: int | None = 0) -> int:
        """transformers 4.4x: tokens of the cache usable with a new chunk."""
        return self.get_seq_length(layer_idx)

    def reset(self) -> None:
        """Forget every token of every layer (storage kept)."""
        self._last_read = None
        for layer in self._layers:
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
            for layer in self._layers:
                layer.static_key_mask = None
            return
        first = self._layers[0]
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
        for layer in self._layers:
            layer.static_key_mask = buf

    def set_segment_starts(self, starts: torch.Tensor | None) -> None:
        """Pack several prompts into each row of the next prefill (into empty rows).

        ``starts``: integer ``[B, S]`` for a prefill of ``S`` tokens: token ``i`` of row
        ``b`` attends to keys ``j`` with ``starts[b, i] <= j <= i`` only, so a row holding
        prompts one after another (positions restarting at 0 for each, e.g. through
        ``position_ids``) computes each prompt as if it were alone (the varlen prefill of
        FlashAttention-2, expressed as a per-query lower bound on the keys). Kept by
        reference until reset with ``None``: a captured graph reads the tensor in place.
        Only a prefill into empty rows reads it; a forward over a stored past raises
        while it is set.

        Raises:
            ValueError: not a 2-D integer tensor of this cache's batch size.
        """
        if starts is not None:
            b = self._layers[0].batch_size
            if (
                starts.dim() != 2
                or starts.shape[0] != b
                or starts.dtype.is_floating_point
                or starts.dtype == torch.bool
            ):
                raise ValueError(
                    f"set_segment_starts: starts must be an integer [batch={b}, S] tensor, "
                    f"got {starts.dtype} {tuple(starts.shape)}"
                )
        for layer in self._layers:
            layer.segment_starts = starts

    def set_destinations(
        self,
        into: SentinelKVCache | None,
        rows: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Send the next prefill's positions to other rows: position ``t`` of the chunk is
        stored at slot ``positions[t]`` of row ``rows[t]`` of ``into`` (every layer, as
        :meth:`SentinelKVLayer.store_positions` writes it) instead of this cache's own
        row, whose storage and lengths stay untouched. With packed prompts
        (:meth:`set_segment_starts`) that puts each prompt straight into its slot.

        This cache must be a one-row view with nothing stored (its prefill attends over
        the chunk's own keys); ``into`` a cache of the same layers and format that stores
        each position alone (dense, int8, int4 without KIVI key blocks, a ring, latents or
        wrap). ``rows``, ``positions``: 1-D int tensors of one length on the cache's
        device, kept by reference until reset with ``into=None`` (a captured graph reads
        them in place); their values are the caller's to check (a row outside ``into`` or
        a slot past its capacity is not written). The device lengths of the destination
        rows are the caller's to set.

        Raises:
            ValueError: this cache has more than one row, ``into`` has other layers or
                another format, or the index tensors do not match.
        """
        if into is None:
            for layer in self._layers:
                layer.destinations = None
            return
        first = self._layers[0]
        if first.batch_size != 1:
            raise ValueError(
                f"set_destinations: a one-row view sends its positions, this cache has "
                f"{first.batch_size} rows"
            )
        if len(into._layers) != len(self._layers) or into.spec != self.spec:
            raise ValueError(
                "set_destinations: the destination cache has other layers or another format"
            )
        ok = (
            rows is not None
            and positions is not None
            and rows.dim() == 1
            and rows.shape == positions.shape
            and not rows.dtype.is_floating_point
            and not positions.dtype.is_floating_point
            and rows.dtype != torch.bool
            and positions.dtype != torch.bool
        )
        if not ok:
            raise ValueError(
                "set_destinations: rows and positions must be 1-D integer tensors of one "
                f"length, got {None if rows is None else (rows.dtype, tuple(rows.shape))} and "
                f"{None if positions is None else (positions.dtype, tuple(positions.shape))}"
            )
        assert rows is not None and positions is not None
        for layer, target in zip(self._layers, into._layers, strict=True):
            if (
                target.key_block
                or target.k_recent is not None
                or target.latent is not None
                or target.wrap
            ):
                raise ValueError(
                    "set_destinations: the destination format does not store each position "
                    "alone (KIVI key blocks, a full-precision ring, latents or wrap)"
                )
            layer.destinations = (target, rows, positions)

    @property
    def is_compileable(self) -> bool:
        """False: the attention reads the cache through a Python-side record (the
        :class:`~sentinel_kernels.cache.contract.CacheRead` on the returned keys), which
        ``torch.compile`` full graphs cannot follow. Eager CUDA-graph capture works (shapes
        and addresses are static)."""
        return False

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: sliding-window attention."""
        return [layer.is_sliding for layer in self._layers]

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: linear attention (never)."""
        return [False] * len(self._layers)

    @property
    def is_dummy(self) -> list[bool]:
        """Per layer: a dummy (KV-sharing) layer (never)."""
        return [False] * len(self._layers)

    @property
    def is_initialized(self) -> bool:
        """Always: storage is allocated up front."""
        return True

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` works (no recent ring, no wrap)."""
        return all(layer.is_croppable for layer in self._layers)

    @property
    def batch_size(self) -> int:
        """Batch rows the cache holds."""
        return self._layers[0].batch_size

    @property
    def max_cache_len(self) -> int:
        """Slots per layer (``L``)."""
        return self._layers[0].capacity

    @property
    def max_batch_size(self) -> int:
        """transformers 4.5x name of :attr:`batch_size`."""
        return self.batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of all storage this cache allocated (codes, scales, recent rings, length
        tensors; :func:`kv_cache_bytes`). Low-rank bases are not in it: see
        :attr:`shared_nbytes`."""
        return sum(layer.nbytes for layer in self._layers)

    @property
    def shared_nbytes(self) -> int:
        """Bytes of the low-rank bases this cache reads (fp32 device copies, made once per
        model, device and rank and shared by all its caches; 0 unless low-rank)."""
        seen: dict[int, int] = {}  # by tensor object: the caches hold the same ones
        for layer in self._layers:
            for t in layer.shared_tensors():
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    @property
    def layout(self) -> str:
        """The storage layout in words (:attr:`SentinelKVLayer.layout`; the distinct ones
        joined by ``"; "`` when layers differ, e.g. in head dim)."""
        return "; ".join(dict.fromkeys(layer.layout for layer in self._layers))

    def describe(self) -> str:
        """:attr:`layout` with the sizes: ``"int4, 52 slots x 16 rows, 30 layers: <layout>;
        <nbytes> bytes"``."""
        return (
            f"{self.spec}, {self.max_cache_len} slots x {self.batch_size} rows, "
            f"{len(self._layers)} layers: {self.layout}; {self.nbytes} bytes"
        )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every layer."""
        for layer in self._layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Permute the batch rows (beam search)."""
        for layer in self._layers:
            layer.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        for layer in self._layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices``."""
        for layer in self._layers:
            layer.batch_select_indices(indices)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        layer = self._layers[0]
        return (
            f"SentinelKVCache({self.spec}, layers={len(self._layers)}, "
            f"max_cache_len={layer.capacity}, batch_size={layer.batch_size}, "
            f"groups={layer.groups}, recent={layer.recent}, wrap={layer.wrap}, "
            f"nbytes={self.nbytes}, layout={self.layout!r})"
        )


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


def _ensure_sentinel(model: nn.Module) -> None:
    """Switch ``model`` to the sentinel attention (warn once per process) if needed."""
    global _warned_switch
    if getattr(model.config, "_attn_implementation", None) == sk_attention.ATTN_IMPLEMENTATION:
        return
    ok, reason = sk_attention.supports_sentinel_attention(model)
    if not ok:
        raise NotImplementedError(f"sk.kv_cache needs the sentinel attention: {reason}")
    sk_attention.register()
    previous = getattr(model.config, "_attn_implementation", None)
    sk_attention._set_implementation(model, sk_attention.ATTN_IMPLEMENTATION)
    with _warn_lock:
        first, _warned_switch = not _warned_switch, True
    if first:
        warnings.warn(
            f"sk.kv_cache switched the model's attn_implementation from {previous!r} to "
            f"'{sk_attention.ATTN_IMPLEMENTATION}': only the sentinel attention reads the "
            "compressed cache",
            RuntimeWarning,
            stacklevel=3,
        )


def _bases_for(model: nn.Module, spec: CacheSpec, geos: list[LayerGeometry]) -> LowRankBases:
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
_Stamp = tuple[torch.Tensor, int | None]
_shared_bases: dict[int, dict[tuple[int, int, str], tuple[tuple[_Stamp, ...], LatentBases]]] = {}


def _stamp(t: torch.Tensor) -> _Stamp:
    try:
        return t, t._version
    except RuntimeError:  # an inference tensor: no version counter (and no in-place edits)
        return t, None


def _device_bases(bases: LowRankBases, layer: int, rank: int, device: torch.device) -> LatentBases:
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
    copies = LatentBases(
        k_proj=kb[:, :, :rank].to(device=device, dtype=torch.float32).contiguous(),
        k_mean=km.to(device=device, dtype=torch.float32).contiguous(),
        v_proj=vb[:, :, :rank].to(device=device, dtype=torch.float32).contiguous(),
        v_mean=vm.to(device=device, dtype=torch.float32).contiguous(),
    )
    with _shared_lock:
        memo = _shared_bases.get(id(bases))
        if memo is None:
            memo = _shared_bases[id(bases)] = {}
            weakref.finalize(bases, _shared_bases.pop, id(bases), None)
        memo[key] = (stamps, copies)
    return copies


def kv_cache(
    model: nn.Module,
    spec: str | CacheSpec,
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
    """A preallocated (compressed) KV cache for ``model``: pass it as ``cache=``
    (transformers >= 5.25; ``past_key_values=`` before, which 5.25 still takes with a
    deprecation warning; ``sentinel_kernels.hf_compat.cache_kwargs(model, cache)``
    picks the name).

    ``model.generate(ids, cache=sk.kv_cache(model, "int8", max_cache_len=...))``
    or ``model(ids, cache=cache, use_cache=True)`` chunk by chunk. Every chunk's
    keys/values are quantized on append (:func:`sentinel_kernels.ops.kv_append`) and every
    query chunk after the first reads the compressed storage directly
    (:func:`sentinel_kernels.ops.decode_attention`); a chunk into an empty cache (the
    prefill) attends over its own full-precision keys/values, as usual for KV quantization
    (KIVI, Liu et al. 2024).

    With the default ``recent`` and ``key_block`` a compressed cache never allocates more
    than a dense cache of the same model, batch, length and dtype: int4 uses KIVI keys
    (:data:`~.spec.DEFAULT_KEY_BLOCK`-token blocks, a ring of two blocks) from
    :func:`~.sizing.kv_cache_switch_len` slots on and per-token keys below, and a per-token int4
    or int8 cache gets the largest full-precision ring up to :data:`~.spec.DEFAULT_RECENT` that
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
            default from :data:`~.spec.DEFAULT_GROUP_SIZE`.
        recent: int8/int4: the last ``recent`` tokens are also kept in full precision and
            read from there; used as given. Default (``None``): with KIVI keys two key
            blocks; with per-token keys the largest ring of at most :data:`~.spec.DEFAULT_RECENT`
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
            positive multiple of :data:`~.spec.DEFAULT_KEY_BLOCK`, e.g. 0). Default (``None``,
            with ``recent`` not given either): :data:`~.spec.DEFAULT_KEY_BLOCK` when ``L >=``
            :func:`~.sizing.kv_cache_switch_len` (the KIVI cache is then at most the dense one for
            every longer ``L``; 157 for SmolLM2-135M in fp32, 204 in bf16, any batch),
            else ``0``.

    Returns:
        A :class:`SentinelKVCache` (a ``transformers.cache_utils.Cache``); ``.nbytes`` is
        the bytes it allocated (:func:`~.sizing.kv_cache_bytes`), ``.layout`` the layout in words.
    """
    parsed = parse_spec(spec)
    check_sizes(max_cache_len, batch_size)
    geos = layer_geometry(model)
    m_dtype, m_device = model_dtype_device(model)
    dtype = m_dtype if dtype is None else dtype
    dev = m_device if device is None else torch.device(device)
    if wrap:
        for g in geos:
            if g.sliding_window and max_cache_len < g.sliding_window:
                raise ValueError(
                    f"a wrapping cache must hold the sliding window: max_cache_len "
                    f"{max_cache_len} < sliding_window {g.sliding_window}"
                )
    sz = sizing_for(model, parsed, batch_size, dtype, groups)
    layout = resolve_layout(sz, max_cache_len, key_block, recent, bool(wrap))
    bases = _bases_for(model, parsed, geos) if parsed.kind == "lowrank" else None
    _ensure_sentinel(model)
    memo: SlotMaskMemo = {}
    layers = []
    for i, g in enumerate(geos):
        latent = None
        if bases is not None:
            latent = _device_bases(bases, i, parsed.rank, dev)
        layers.append(
            SentinelKVLayer(
                parsed,
                g,
                layer_idx=i,
                batch_size=batch_size,
                max_cache_len=max_cache_len,
                dtype=dtype,
                device=dev,
                groups=resolve_groups(parsed, g.head_dim, groups),
                recent=layout.ring,
                wrap=bool(wrap),
                memo=memo,
                latent=latent,
                key_block=layout.key_block,
            )
        )
    return SentinelKVCache(layers, parsed)

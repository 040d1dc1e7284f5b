"""The model side of the engine: one slotted cache, prefill into a slot, a batched decode step.

:class:`ModelRunner` allocates the level's cache (:func:`sentinel_kernels.kv_cache`, the
format ``patch_model`` chose: dense, INT8, INT4/KIVI, low rank) once, for ``max_slots``
rows of ``max_seq_len`` positions. A request owns one row (a *slot*):

* **prefill** runs the model over rows of the cache
  (:func:`sentinel_kernels.cache.slots.row_view`): several whole prompts in one batched
  forward over staging rows past the slots (left-padded), each then copied to its slot
  (the pads stay masked by slot), or one prompt straight into its slot, a chunk at a
  time (the first chunk attends over its own keys, the usual prefill; later chunks read
  the stored past). An eager forward costs a fixed ~1.5 ms of host time per layer on a
  GPU (transformers' and the op layer's Python), far more than the GPU work of a few
  hundred tokens; so on a GPU whole prompts are prefilled by *prefill graphs*: one CUDA
  graph per (rows, width) bucket, captured at start-up, that runs the batched forward
  over the staging rows and copies each row to its slot (padding rows copy to a spare
  row). A prompt is left-padded to the bucket's width, which costs GPU time only. A
  later chunk of a long prompt (or a prompt's rest after a prefix hit) replays a *chunk
  graph*, one per width: the slot's row is copied to a staging row, the chunk
  (right-padded to the width) runs there at positions ``start ...`` reading the past by
  the device lengths (so one graph serves every ``start``), and the row is copied back
  with its length set past the real tokens only;
* **packed prefill** (``packed_tokens``, the engine's default on a GPU): whole prompts go
  one after another into one row of up to ``packed_tokens`` positions, positions
  restarting at 0 for each, and each query attends only within its prompt (a per-query
  first key, :meth:`~sentinel_kernels.cache.SentinelKVCache.set_segment_starts`); the
  logits of each prompt's last token are picked with ``logits_to_keep`` as an index
  tensor, and each layer stores every position straight into its slot
  (:meth:`~sentinel_kernels.cache.SentinelKVCache.set_destinations`: one KV append per
  K and V, no staging copy, so the row is not bounded by ``max_seq_len``). Left-padding a batch to
  its longest prompt computed 1.93x the real prompt tokens on ``bench_engine``'s
  workload; a packed row computes them once, plus the rounding to a graph width
  (:func:`packed_widths`, one graph per width);
* **decode** runs one token for the first ``n`` rows at once, ``n`` the smallest *bucket*
  (1, 2, 4, ..., ``max_slots``) covering every running slot (the engine hands out the
  lowest free slot, so running rows crowd the front). Rows may be at different
  positions: each row's position is its own, and the cache keeps a length per row on the
  device, which the attention reads (no host sync). On a GPU each bucket's step is a
  CUDA graph captured at start-up (after one eager step that also autotunes the Triton
  kernels) and only replayed while serving. Rows of the bucket that are not decoding
  (free, or still prefilling) run along on a dummy token; the one token they append is
  taken back right after the step (their length drops by one), so a free row stays empty
  and a prefilling row keeps what it had (its next chunk overwrites the dummy).
  When ``max_seq_len`` exceeds :data:`SHORT_ROW_KEYS`, each bucket has a second graph
  captured for short rows (:func:`sentinel_kernels.ops.decode_split_scope`): the decode
  attention plans its KV splits from the cache's capacity, and a long capacity makes it
  split and merge (one more kernel per layer) even for rows of a few hundred keys. A step
  whose rows are all at most that long replays the short graph. Both compute the same
  values; only the work split differs. With packed prefill no slot has pads, and the
  decode graphs are captured without the slot key mask (:meth:`ModelRunner.step_needs_mask`).

Everything a step needs on the host is decided by the engine before the step; the step
itself has one host sync, the read of the new tokens (with the log-probabilities of the
rows that asked for them, :meth:`ModelRunner.logprobs_device`, in the same buffer).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import ops, settings
from ..cache import SentinelKVCache
from ..cache import kv_cache as make_cache
from ..cache.slots import (
    copy_rows,
    copy_span,
    gather_row,
    move_rows,
    row_view,
    set_host_length,
    stack_lengths,
)
from ..decoding.sampling import filter_logits
from ..decoding.session import capture_stream
from ..hf_compat import accepts, cache_kwargs
from ..knn.lm import KnnScorer, capture_lm_head_input, lm_head_input
from ..nn.attention import past_by_device_lengths
from .request import TokenLogprobs

__all__ = [
    "MAX_PREFILL_BATCH",
    "ModelRunner",
    "RowSampling",
    "SHORT_ROW_KEYS",
    "buckets_for",
    "packed_widths",
    "unpack_step",
    "widths_for",
]

#: Prompts prefilled in one batched forward at most (the staging rows of the cache).
MAX_PREFILL_BATCH = 16
#: The narrowest prefill graph (shorter prompts are padded to it).
MIN_PREFILL_WIDTH = 32
#: Rows of at most this many keys (pads included) decode with the short graphs: below
#: 2 x 256 keys the decode attention's split heuristic plans one split on a GPU, so the
#: kernel writes its output without a merge pass (kernels.decode_attention.choose_num_splits).
SHORT_ROW_KEYS = 511


def buckets_for(max_slots: int) -> tuple[int, ...]:
    """Decode batch sizes with a step of their own: powers of two below ``max_slots``, and
    ``max_slots``."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 2
    out.append(max_slots)
    return tuple(out)


def widths_for(max_width: int) -> tuple[int, ...]:
    """Prefill graph widths: ``MIN_PREFILL_WIDTH`` doubling below ``max_width``, and
    ``max_width``."""
    out, w = [], MIN_PREFILL_WIDTH
    while w < max_width:
        out.append(w)
        w *= 2
    out.append(max_width)
    return tuple(out)


class _PrefillGraph:
    """A captured prefill of ``rows`` left-padded prompts of ``width`` tokens; its static
    input is one int64 device vector: token ids ``[rows, width]``, their 0/1 mask
    ``[rows, width]`` and the destination slot of each row ``[rows]``."""

    __slots__ = ("dst", "graph", "ids", "inputs", "logits", "mask", "rows", "width")

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width = rows, width
        n = rows * width
        self.inputs = torch.zeros(2 * n + rows, dtype=torch.int64, device=device)
        self.ids = self.inputs[:n].view(rows, width)
        self.mask = self.inputs[n : 2 * n].view(rows, width)
        self.dst = self.inputs[2 * n :]
        self.graph: Any = None
        self.logits: torch.Tensor | None = None


class _ChunkGraph:
    """A captured later chunk of one long prompt: ``width`` tokens (right-padded) over the
    stored past of one slot. Its static input is one int64 device vector: the token ids
    ``[1, width]``, then the slot, the chunk's first position and its real token count
    (each ``[1]``)."""

    __slots__ = ("graph", "ids", "inputs", "logits", "pick", "real", "slot", "start", "width")

    def __init__(self, width: int, device: torch.device) -> None:
        self.width = width
        self.inputs = torch.zeros(width + 4, dtype=torch.int64, device=device)
        self.ids = self.inputs[:width].view(1, width)
        self.slot = self.inputs[width : width + 1]
        self.start = self.inputs[width + 1 : width + 2]
        self.real = self.inputs[width + 2 : width + 3]
        #: the position whose logits are returned (``real - 1``)
        self.pick = self.inputs[width + 3 : width + 4]
        self.graph: Any = None
        self.logits: torch.Tensor | None = None


class _PackedGraph:
    """A captured packed prefill: up to ``rows`` whole prompts one after another in one
    staging row of ``width`` positions (:meth:`ModelRunner.prefill`). Its static input
    is one int64 device vector (:meth:`ModelRunner._pack_inputs` gives the layout)."""

    __slots__ = ("graph", "inputs", "logits", "rows", "width")

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width = rows, width
        self.inputs = torch.zeros(5 * width + 3 * rows, dtype=torch.int64, device=device)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None


def packed_widths(max_width: int) -> tuple[int, ...]:
    """Packed prefill graph widths: ``MIN_PREFILL_WIDTH`` doubling up to 128, every
    multiple of 128 up to 512, of 256 up to 2048, of 512 past it, below ``max_width``, and
    ``max_width``. A packed forward costs ~1.6 ms whatever its width and ~0.5 us more per
    position on an H100 (SmolLM2 shape, ``scripts/engine_prefill_probe.py``), so rounding
    a total up by < 256 (< 512 past 2048) positions costs little and keeps the graphs
    (each captured at start-up) few: 12 up to 2048, 24 up to 8192; doubling past 128
    would cost up to 2x."""
    out, w = [], MIN_PREFILL_WIDTH
    while w < min(max_width, 128):
        out.append(w)
        w *= 2
    w = 128
    while w < max_width:
        out.append(w)
        w += 128 if w < 512 else 256 if w < 2048 else 512
    out.append(max_width)
    return tuple(sorted(set(out)))


class RowSampling:
    """How one decoding row picks its token: greedy, or a sample with its own settings
    and random generator."""

    __slots__ = ("generator", "temperature", "top_k", "top_p")

    def __init__(
        self, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.generator = generator


class ModelRunner:
    """Owns the cache, its slot views, the static step inputs and the CUDA graphs.

    Args:
        model: a transformers causal LM already switched to the sentinel attention.
        spec: the cache format (``"dense"``, ``"int8"``, ``"int4"``, ``"lowrank:r"``).
        max_slots, max_seq_len: rows and positions of the cache.
        use_graph: capture one decode graph per bucket (CUDA only).
        prefill_graph_tokens: with ``use_graph``, also capture prefill graphs for every
            (rows, width) bucket of at most this many padded tokens (0: prefill eagerly).
        prefix_rows: rows after the others that hold cached prompt prefixes
            (:mod:`.prefix_cache`).
        chunk_graph_tokens: with prefill graphs, also capture chunk graphs (a later chunk
            of a long prompt, or a prompt's rest after a prefix hit, over the slot's stored
            past) of widths up to this many tokens (0: such chunks run eagerly).
        multi_step: greedy decode steps of row 0 alone that :meth:`decode_multi` runs per
            call (with ``use_graph``, as one CUDA graph; < 2: none are captured).
        packed_tokens: pack the whole prompts of a batched prefill one after another into
            one staging row of up to this many positions (at most ``max_seq_len``)
            instead of left-padding them to the longest (0: no packing; also off where
            :meth:`packing_applies` says no). With prefill graphs, one packed graph per
            width of :func:`packed_widths` replaces the (rows, width) prefill graphs.
        knn: kNN-LM (:class:`~sentinel_kernels.knn.lm.KnnScorer`): every step's and
            prefill's logits become the interpolated log-probabilities (inside the graphs).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        max_slots: int,
        max_seq_len: int,
        device: torch.device,
        use_graph: bool,
        prefill_graph_tokens: int = 0,
        prefix_rows: int = 0,
        knn: KnnScorer | None = None,
        chunk_graph_tokens: int = 0,
        multi_step: int = 1,
        packed_tokens: int = 0,
    ) -> None:
        self.model = model
        self.knn = knn
        # The LM head's input of each row's last position (kNN-LM queries).
        self._hidden: torch.Tensor | None = None
        if knn is not None:
            dim, dtype = lm_head_input(model)
            self._hidden = torch.zeros(max_slots, dim, dtype=dtype, device=device)
        self.device = device
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        prefill_graphs = use_graph and prefill_graph_tokens >= MIN_PREFILL_WIDTH
        #: Rows after the slots where batched prefills run before being copied to their slots.
        self.stage_rows = (
            min(max_slots, MAX_PREFILL_BATCH) if max_slots > 1 or prefill_graphs else 0
        )
        #: The row after the staging rows that prefill graphs copy their padding rows to.
        self.spare_row = max_slots + self.stage_rows
        #: The rows that hold cached prompt prefixes.
        self.prefix_rows = range(
            self.spare_row + int(prefill_graphs), self.spare_row + int(prefill_graphs) + prefix_rows
        )
        self.cache: SentinelKVCache = make_cache(
            model,
            spec,
            max_cache_len=max_seq_len,
            batch_size=self.prefix_rows.stop,
            device=device,
        )
        #: Pads before each slot's prompt (left padding of a batched prefill).
        self.row_offset = [0] * max_slots
        self.lengths = stack_lengths(self.cache)  # int32 [layers, slots]
        # int8 [slots, L] key mask by slot, shared by every view: 0 marks the pads of a
        # batched prefill's shorter prompts (1 everywhere else).
        self.cache.set_static_key_mask(torch.ones(self.cache.batch_size, 0, device=device))
        self.key_mask: torch.Tensor = self.cache._layers[0].static_key_mask  # type: ignore[assignment]
        self.buckets = buckets_for(max_slots)
        # views by (first row, rows): one row per slot, and the decode buckets [0, b)
        self._views: dict[tuple[int, int], SentinelKVCache] = {
            (s, 1): row_view(self.cache, s, s + 1) for s in range(max_slots)
        }
        self._views.update({(0, b): row_view(self.cache, 0, b) for b in self.buckets})
        # The decode buckets again without the slot key mask: a step whose decoding rows
        # have no pads reads no mask (see :meth:`step_needs_mask`).
        self._bare_views: dict[int, SentinelKVCache] = {}
        for b in self.buckets:
            self._bare_views[b] = row_view(self.cache, 0, b)
            self._bare_views[b].set_static_key_mask(None)
        # Static inputs of the decode step: token, position, and 1 for rows that decode.
        self._inputs = torch.zeros(3, max_slots, dtype=torch.int64, device=device)
        # The host's part of a step's inputs (tokens, positions, active, use-previous).
        self._step_host = torch.zeros(4, max_slots, dtype=torch.int64, device=device)
        # The tokens the last decode step picked, by row (the next step may feed them).
        self._prev_tok = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self._extra_prefill: dict[str, Any] = {"use_cache": True}
        if accepts(model.forward, "logits_to_keep"):
            self._extra_prefill["logits_to_keep"] = 1
        # decode graphs by (bucket, short rows)
        self._graphs: dict[tuple[int, bool], tuple[Any, torch.Tensor]] = {}
        #: Steps of a :meth:`decode_multi` call; its graphs by short rows, and its tokens.
        self.multi_step = max(1, multi_step)
        self._multi_graphs: dict[bool, tuple[Any, torch.Tensor]] = {}
        self._multi_out = torch.zeros(self.multi_step, dtype=torch.int64, device=device)
        # the multi-step run's write column and ops.greedy_advance's arrival counter
        self._multi_col = torch.zeros(1, dtype=torch.int64, device=device)
        self._multi_arrive = torch.zeros(1, dtype=torch.int32, device=device)
        #: Whether steps of short rows plan their attention for them (see SHORT_ROW_KEYS).
        self.short_rows = max_seq_len > SHORT_ROW_KEYS
        #: Decode steps that ran with the short-rows plan.
        self.short_steps = 0
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._pool: Any = None  # the graphs' shared memory pool
        #: Prefills served by a prefill graph (the rest ran eagerly).
        self.prefill_replays = 0
        #: Prompt positions the prefill forwards computed, pads included (a graph's whole
        #: rows x width; an eager batch's rows x longest prompt).
        self.prefill_computed_tokens = 0
        self._chunk_graphs: dict[int, _ChunkGraph] = {}
        #: Chunks over a stored past served by a chunk graph.
        self.chunk_replays = 0
        self.use_graph = use_graph
        #: Positions of a packed prefill (0: prompts are not packed). Not bounded by
        #: ``max_seq_len``: the positions go straight to their slots, each prompt fits one.
        self.pack_width = packed_tokens if self.packing_applies() else 0
        #: Prompts one packed prefill takes at most.
        self.pack_rows = self.stage_rows
        self._packed_graphs: dict[int, _PackedGraph] = {}
        if self.pack_width:
            self._pack_view = row_view(self.cache, max_slots, max_slots + 1)
        if prefill_graphs:
            if self.pack_width:
                self._capture_packed(self.pack_width)
            else:
                self._capture_prefill(prefill_graph_tokens)
            width = min(chunk_graph_tokens, max_seq_len - 1)
            if width >= MIN_PREFILL_WIDTH and self._chunk_graphs_apply():
                self._capture_chunks(width)
        #: Whether the decode graphs read the slot key mask. With packed prefill no slot
        #: ever has pads (see :meth:`step_needs_mask`), so the graphs are captured without
        #: it; a step that needs it (a left-padded :meth:`prefill` called directly) then
        #: runs eagerly.
        self.graphs_masked = not self.pack_width
        #: Decode steps that read the slot key mask (some decoding row has pads).
        self.masked_steps = 0
        if use_graph:
            self._capture_all()

    # -- prefill ------------------------------------------------------------------------

    def prefill(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        start: int = 0,
        max_width: int | None = None,
    ) -> torch.Tensor:
        """Run ``prompts[i]`` into slot ``slots[i]``.

        One prompt: straight into its row, tokens at positions ``start, start + 1, ...``
        (``start > 0``: a later chunk of a long prompt, which reads the stored past; it
        replays the narrowest chunk graph whose pads fit in the row, if there is one).
        Whole prompts that :meth:`packs` (packing on, their total within
        :attr:`pack_width`): one forward over them packed in the staging row (see the
        module docstring), no pads. Otherwise several (whole prompts, ``start == 0``, at
        most :attr:`stage_rows`): one batched
        forward over the staging rows, each left-padded to the longest prompt (positions
        count from a row's first real token, the pads are masked), then each row's
        positions are copied to its slot (:func:`~sentinel_kernels.cache.slots.copy_rows`)
        and its pads stay masked by slot in the key mask; so every row computes what it
        would alone, and the slots need not be adjacent. Whole prompts replay the
        smallest prefill graph that holds them (left-padded to its width; one prompt
        too) if its width is at most ``max_width`` (the room the prompts' slots have for
        pads), else run eagerly.

        Returns:
            The logits of each prompt's last token, ``[len(prompts), V]`` (on the device).
        """
        k = len(prompts)
        if k == 0 or len(slots) != k:
            raise ValueError(f"prefill: {len(slots)} slots for {k} prompts")
        if k > 1 and (start != 0 or k > self.stage_rows):
            raise ValueError(
                f"a batched prefill takes up to {self.stage_rows} whole prompts (start == 0)"
            )
        width = max(len(p) for p in prompts)
        if start == 0 and self.packs(prompts):
            return self._prefill_packed(slots, prompts)
        if start == 0:
            graph = self.prefill_graph_for(k, width, max_width)
            if graph is not None:
                self.prefill_computed_tokens += graph.rows * graph.width
                return self._replay_prefill(graph, slots, prompts)
        elif k == 1:
            # a row prefilled by a padded graph keeps its pads before position 0
            chunk = self.chunk_graph_for(start + self.row_offset[slots[0]], width)
            if chunk is not None:
                self.prefill_computed_tokens += chunk.width
                return self._replay_chunk(chunk, slots[0], prompts[0], start)
        self.prefill_computed_tokens += k * width
        first = slots[0] if k == 1 else self.max_slots
        rows = self._view(first, k)
        if start == 0:
            self.lengths[:, first : first + k] = 0
            if k == 1:
                self.key_mask[first] = 1
            for slot, p in zip(slots, prompts, strict=True):
                self.row_offset[slot] = width - len(p) if k > 1 else 0
        set_host_length(rows, start)
        x = self._upload(
            torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.int64)
        )
        kwargs: dict[str, Any] = {}
        mask = None
        if any(len(p) != width for p in prompts):
            mask = self._upload(
                torch.tensor(
                    [[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64
                )
            )
            pos = (mask.cumsum(-1) - 1).clamp_(min=0)
            kwargs["attention_mask"] = mask
        else:
            pos = torch.arange(start, start + width, dtype=torch.int64, device=self.device)
            pos = pos[None].expand(k, -1)
        try:
            last = self._forward(
                k,
                input_ids=x,
                position_ids=pos,
                **kwargs,
                **self._extra_prefill,
                **cache_kwargs(self.model, rows),
            )
        except BaseException:
            set_host_length(rows, 0)
            raise
        if k > 1:
            copy_rows(self.cache, first, list(slots), width)
            idx = self._upload(torch.tensor(list(slots), dtype=torch.int64))
            self.lengths.index_fill_(1, idx, width)
            self.lengths[:, first : first + k] = 0  # the staging rows are free again
            self.key_mask.index_fill_(0, idx, 1)
            if mask is not None:
                self.key_mask[:, :width].index_copy_(0, idx, mask.to(self.key_mask.dtype))
        return last

    # -- packed prompts -------------------------------------------------------------------

    def packing_applies(self) -> bool:
        """Whether whole prompts can be packed into one staging row: there is a staging
        row, no kNN-LM (its LM-head hook reads one position per row), the model takes
        ``logits_to_keep`` (each prompt's last position is picked by an index tensor) and
        the cache stores each position alone (dense, int8, int4: no KIVI key blocks,
        ring, latents or wrap), so that positions move to their slots one by one."""
        layers = self.cache._layers
        return (
            self.stage_rows > 0
            and self.knn is None
            and "logits_to_keep" in self._extra_prefill
            and all(
                not (layer.key_block or layer.wrap)
                and layer.k_recent is None
                and layer.latent is None
                for layer in layers
            )
        )

    def packs(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether :meth:`prefill` packs these whole prompts (their total fits
        :attr:`pack_width`, their count :attr:`pack_rows`)."""
        return (
            self.pack_width > 0
            and len(prompts) <= self.pack_rows
            and sum(len(p) for p in prompts) <= self.pack_width
        )

    def _pack_inputs(
        self,
        host: torch.Tensor,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        width: int,
        rows: int,
    ) -> None:
        """Fill ``host`` (int64 ``[5 * width + 3 * rows]``) with a packed prefill's inputs:
        per position the token id, its position in its prompt, the first position of its
        prompt in the row (its segment start), its destination row and position; per
        prompt the row position of its last token, its slot and its length. Positions
        past the prompts are pads: token 0 at position 0, each its own segment, stored in
        the spare row at their place in the packed row (nowhere past its capacity);
        prompt entries past ``len(prompts)`` point at the last position, the spare row and
        length 0."""
        # In numpy over host's own memory: torch.tensor over Python ints and torch's small
        # CPU ops took 4x the host time, and this runs before every packed prefill
        # (bench/bench_engine_host.py).
        k = len(prompts)
        lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=k)
        n = int(lens.sum())
        starts = np.cumsum(lens) - lens
        arr = host.numpy()
        ids, pos, seg, drow, dpos = arr[: 5 * width].reshape(5, width)
        last, slot, length = arr[5 * width :].reshape(3, rows)
        ar = np.arange(width, dtype=np.int64)
        ids[:] = 0
        ids[:n] = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=n)
        seg[:] = ar
        seg[:n] = np.repeat(starts, lens)
        pos[:] = ar - seg
        drow[:] = self.spare_row
        drow[:n] = np.repeat(np.asarray(slots, dtype=np.int64), lens)
        dpos[:] = pos
        dpos[n:] = ar[n:]
        last[:] = width - 1
        last[:k] = starts + lens - 1
        slot[:] = self.spare_row
        slot[:k] = slots
        length[:] = 0
        length[:k] = lens

    def _packed_body(self, inputs: torch.Tensor, width: int, rows: int) -> torch.Tensor:
        """The packed prefill (inputs as :meth:`_pack_inputs` lays them out, on the
        device): one forward through the staging row's view with each prompt's queries
        kept inside it (``set_segment_starts``) and each position stored straight into
        its slot (``set_destinations``), the logits of each prompt's last token; then the
        slots' lengths set and their key masks cleared."""
        view = self._pack_view
        ids, pos, seg, drow, dpos = inputs[: 5 * width].view(5, width)
        last, slot, length = inputs[5 * width :].view(3, rows)
        set_host_length(view, 0)
        view.set_segment_starts(seg.to(torch.int32)[None])
        # int32 once here: kv_append would convert int64 indices in every layer's call
        view.set_destinations(self.cache, drow.to(torch.int32), dpos.to(torch.int32))
        try:
            logits = self.model(
                input_ids=ids[None],
                position_ids=pos[None],
                use_cache=True,
                logits_to_keep=last,
                **cache_kwargs(self.model, view),
            ).logits[0]
        finally:
            view.set_segment_starts(None)
            view.set_destinations(None)
        layers = self.lengths.shape[0]
        self.lengths.index_copy_(1, slot, length.to(torch.int32)[None].expand(layers, rows))
        self.key_mask.index_fill_(0, slot, 1)
        return logits

    def _prefill_packed(
        self, slots: Sequence[int], prompts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Whole prompts one after another in the staging row (see :meth:`prefill`):
        replays the narrowest packed graph that holds them, else runs eagerly at their
        exact total (no pads)."""
        k, n = len(prompts), sum(len(p) for p in prompts)
        graph = self.packed_graph_for(n)
        width, rows = (graph.width, graph.rows) if graph is not None else (n, k)
        host = torch.empty(5 * width + 3 * rows, dtype=torch.int64)
        self._pack_inputs(host, slots, prompts, width, rows)
        for slot in slots:
            self.row_offset[slot] = 0
        self.prefill_computed_tokens += width
        if graph is not None:
            graph.inputs.copy_(self._pinned(host), non_blocking=True)
            graph.graph.replay()
            self.prefill_replays += 1
            assert graph.logits is not None
            return graph.logits[:k]
        return self._packed_body(self._upload(host), width, rows)

    def packed_graph_for(self, tokens: int) -> _PackedGraph | None:
        """The narrowest packed graph of at least ``tokens`` positions, or None."""
        fits = [w for w in self._packed_graphs if w >= tokens]
        return self._packed_graphs[min(fits)] if fits else None

    def _capture_packed(self, max_width: int) -> None:
        """Capture one packed prefill graph per width of :func:`packed_widths` (largest
        first, in the decode graphs' memory pool), warmed up on one prompt filling the
        row. A capture that fails turns packed graphs off with a warning; packed
        prefills then run eagerly."""
        try:
            for width in sorted(packed_widths(max_width), reverse=True):
                g = _PackedGraph(self.pack_rows, width, self.device)
                host = torch.empty_like(g.inputs, device="cpu")
                self._pack_inputs(host, [self.spare_row], [[1] * width], width, g.rows)
                g.inputs.copy_(host)

                def body(g: _PackedGraph = g) -> torch.Tensor:
                    return self._packed_body(g.inputs, g.width, g.rows)

                g.graph, g.logits = self._capture(body)
                self._packed_graphs[width] = g
        except Exception as exc:  # pragma: no cover - depends on the model and GPU
            self._capture_failed(
                "packed prefill", "packed prefills run eagerly", exc, self._packed_graphs
            )
        self.lengths.zero_()
        self.key_mask.fill_(1)

    @property
    def packed_buckets(self) -> tuple[int, ...]:
        """The widths with a captured packed prefill graph."""
        return tuple(sorted(self._packed_graphs))

    def _forward(self, rows: int, **kwargs: Any) -> torch.Tensor:
        """The model's last-position logits for ``rows`` rows, or with kNN-LM the
        interpolated log-probabilities (the LM head's input caught by a hook)."""
        if self.knn is None or self._hidden is None:
            return self.model(**kwargs).logits[:, -1]
        hidden = self._hidden[:rows]
        with capture_lm_head_input(self.model, hidden):
            logits = self.model(**kwargs).logits[:, -1]
        return self.knn(logits, hidden)

    def prefill_graph_for(
        self, rows: int, width: int, max_width: int | None = None
    ) -> _PrefillGraph | None:
        """The prefill graph for ``rows`` prompts of up to ``width`` tokens: the narrowest
        of width <= ``max_width``, then the one with fewest rows; None if none holds them."""
        best: _PrefillGraph | None = None
        for g in self._prefill_graphs.values():
            if g.rows < rows or g.width < width or (max_width is not None and g.width > max_width):
                continue
            if best is None or (g.width, g.rows) < (best.width, best.rows):
                best = g
        return best

    def _replay_prefill(
        self, g: _PrefillGraph, slots: Sequence[int], prompts: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        k, w, n = len(prompts), g.width, g.rows * g.width
        host = torch.zeros(2 * n + g.rows, dtype=torch.int64)
        ids, mask = host[:n].view(g.rows, w), host[n : 2 * n].view(g.rows, w)
        for i, p in enumerate(prompts):
            ids[i, w - len(p) :] = torch.as_tensor(p, dtype=torch.int64)
            mask[i, w - len(p) :] = 1
        host[2 * n : 2 * n + k] = torch.as_tensor(list(slots), dtype=torch.int64)
        for slot, p in zip(slots, prompts, strict=True):
            self.row_offset[slot] = w - len(p)
        host[2 * n + k :] = self.spare_row
        g.inputs.copy_(self._pinned(host), non_blocking=True)
        g.graph.replay()
        self.prefill_replays += 1
        assert g.logits is not None
        return g.logits[:k]

    def _prefill_body(self, g: _PrefillGraph) -> Callable[[], torch.Tensor]:
        """The work of a prefill graph: the staging rows' forward, then each row copied to
        its slot with its length (the padded width) and its pads masked by slot."""
        first, rows, width = self.max_slots, g.rows, g.width
        view = self._view(first, rows)
        extra = {"use_cache": True, **self._extra_prefill, **cache_kwargs(self.model, view)}

        def body() -> torch.Tensor:
            self.lengths[:, first : first + rows] = 0
            set_host_length(view, 0)
            pos = (g.mask.cumsum(-1) - 1).clamp_(min=0)
            last = self._forward(
                rows, input_ids=g.ids, position_ids=pos, attention_mask=g.mask, **extra
            )
            copy_rows(self.cache, first, g.dst, width)
            self.lengths.index_fill_(1, g.dst, width)
            self.lengths[:, first : first + rows] = 0
            self.key_mask[:, :width].index_copy_(0, g.dst, g.mask.to(self.key_mask.dtype))
            return last

        return body

    def _capture_prefill(self, max_tokens: int) -> None:
        """Capture the prefill graphs (largest first, before the decode graphs, in the
        decode graphs' memory pool). A capture that fails turns prefill graphs off with a
        warning; the eager prefill still serves every request."""
        widths = widths_for(min(self.max_seq_len, max(MIN_PREFILL_WIDTH, max_tokens)))
        sizes = [
            (r, w) for r in buckets_for(self.stage_rows) for w in widths if r * w <= max_tokens
        ]
        try:
            for r, w in sorted(sizes, key=lambda rw: (-rw[0] * rw[1], -rw[1])):
                g = _PrefillGraph(r, w, self.device)
                g.dst.fill_(self.spare_row)
                # A pad in every row: the warm-up runs the masked kernels the replays run
                # (an all-ones mask would let the mask builder drop it).
                g.mask.fill_(1)
                g.mask[:, 0] = 0
                g.graph, g.logits = self._capture(self._prefill_body(g))
                self._prefill_graphs[(r, w)] = g
        except Exception as exc:  # pragma: no cover - depends on the model and GPU
            self._capture_failed("prefill", "prefills run eagerly", exc, self._prefill_graphs)
        self.lengths.zero_()
        self.key_mask.fill_(1)

    # -- chunks over a stored past -------------------------------------------------------

    def _chunk_graphs_apply(self) -> bool:
        """Whether chunk graphs can serve this model and cache: the model takes
        ``logits_to_keep`` (the last real token of a right-padded chunk is picked on the
        device), and the cache stores each position alone in its slot (dense, int8, int4:
        no KIVI key blocks, full-precision ring, latents or wrap), so that the pads after
        a chunk's last token are overwritten by the row's next tokens."""
        if "logits_to_keep" not in self._extra_prefill:
            return False
        return all(
            not layer.key_block
            and layer.k_recent is None
            and layer.latent is None
            and not layer.wrap
            for layer in self.cache._layers
        )

    def chunk_graph_for(self, filled: int, tokens: int) -> _ChunkGraph | None:
        """The narrowest chunk graph holding ``tokens`` tokens after the ``filled`` slots
        a row holds (its pads must fit in the row: ``filled + width <= max_seq_len``); None
        if none does."""
        best: _ChunkGraph | None = None
        for g in self._chunk_graphs.values():
            if g.width < tokens or filled + g.width > self.max_seq_len:
                continue
            if best is None or g.width < best.width:
                best = g
        return best

    def _replay_chunk(
        self, g: _ChunkGraph, slot: int, prompt: Sequence[int], start: int
    ) -> torch.Tensor:
        n = len(prompt)
        host = torch.zeros(g.width + 4, dtype=torch.int64)
        host[:n] = torch.as_tensor(list(prompt), dtype=torch.int64)
        host[g.width :] = torch.tensor([slot, start, n, n - 1], dtype=torch.int64)
        g.inputs.copy_(self._pinned(host), non_blocking=True)
        g.graph.replay()
        self.chunk_replays += 1
        assert g.logits is not None
        return g.logits

    def _chunk_body(self, g: _ChunkGraph) -> Callable[[], torch.Tensor]:
        """The work of a chunk graph: the slot's row, lengths and key mask copied to the
        first staging row (:func:`~sentinel_kernels.cache.slots.gather_row`), the forward
        of the right-padded chunk at positions ``start ...`` reading the past by the device
        lengths (:func:`~sentinel_kernels.nn.attention.past_by_device_lengths`; a row that
        a padded prefill graph filled keeps its pads before position 0, masked by slot),
        the row copied back and the slot's length advanced by the ``real`` tokens only (the
        chunk's pads lie past it, unread, until the row's next tokens overwrite them).
        Copies move the whole row (``max_seq_len`` positions): a fixed size, whatever the
        past."""
        first, cap = self.max_slots, self.max_seq_len
        view = self._view(first, 1)
        steps = torch.arange(g.width, dtype=torch.int64, device=self.device)
        extra = {**self._extra_prefill, "logits_to_keep": g.pick}
        extra.update(cache_kwargs(self.model, view))

        def body() -> torch.Tensor:
            gather_row(self.cache, g.slot, first, cap)
            self.key_mask[first : first + 1].copy_(self.key_mask.index_select(0, g.slot))
            self.lengths[:, first : first + 1].copy_(self.lengths.index_select(1, g.slot))
            set_host_length(view, 1)  # > 0: the chunk reads the stored past
            pos = (g.start + steps)[None]
            with past_by_device_lengths():
                last = self._forward(
                    1,
                    input_ids=g.ids,
                    position_ids=pos,
                    **extra,
                )
            copy_rows(self.cache, first, g.slot, cap)
            pads = (g.width - g.real).to(torch.int32)
            self.lengths.index_copy_(1, g.slot, self.lengths[:, first : first + 1] - pads)
            self.lengths[:, first] = 0
            self.key_mask[first] = 1
            return last

        return body

    def _capture_chunks(self, max_width: int) -> None:
        """Capture the chunk graphs (widths ``widths_for(max_width)``, widest first, in the
        shared pool; the warm-up and capture write into the spare row). A capture that
        fails turns chunk graphs off with a warning; such chunks then run eagerly."""
        try:
            for w in sorted(widths_for(max_width), reverse=True):
                g = _ChunkGraph(w, self.device)
                g.slot.fill_(self.spare_row)
                g.real.fill_(w)
                g.pick.fill_(w - 1)
                g.graph, g.logits = self._capture(self._chunk_body(g))
                self._chunk_graphs[w] = g
        except Exception as exc:  # pragma: no cover - depends on the model and GPU
            msg = "chunks over a stored past run eagerly"
            self._capture_failed("chunk", msg, exc, self._chunk_graphs)
        self.lengths.zero_()
        self.key_mask.fill_(1)

    @property
    def chunk_widths(self) -> tuple[int, ...]:
        """The widths with a captured chunk graph."""
        return tuple(sorted(self._chunk_graphs))

    def _capture_failed(self, kind: str, fallback: str, exc: Exception, graphs: dict) -> None:
        """A capture of ``kind`` graphs failed: warn, drop that kind's graphs (the work
        they did runs eagerly), and start a new memory pool for later captures (a failed
        capture leaves its pool unusable)."""
        warnings.warn(
            f"{kind} CUDA graphs disabled, {fallback}: capture failed with "
            f"{type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )
        graphs.clear()
        self._pool = None

    def _capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """Run ``fn`` once eagerly (autotunes the Triton kernels, allocates workspaces),
        then capture it into a graph of the shared pool; returns the graph and its output."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        fn()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        side = capture_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.cuda.graph(graph, pool=self._pool, stream=side):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph, out

    def _pinned(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` in pinned memory when the runner is on a GPU (else as it is), for a
        non-blocking copy that does not wait for the stream: a copy from pageable memory
        stalls the host until the GPU has drained (an H100 profile at batch 64 showed the
        GPU idle ~90 us per step around such copies), and the scheduler keeps the GPU a
        step ahead only if nothing waits. The caching host allocator does not reuse the
        block before the copy has run."""
        return host.pin_memory() if self.device.type == "cuda" else host

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` copied to the runner's device without a host sync (:meth:`_pinned`)."""
        return self._pinned(host).to(self.device, non_blocking=True)

    def select_rows(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` of device tensor ``x`` (in that order) without a host sync: a
        slice when they are ``0, 1, ..., n - 1``, else an ``index_select`` with the index
        copied as :meth:`_upload` does (``x[list]`` copies its index from pageable memory,
        which waits for the stream)."""
        if list(rows) == list(range(len(rows))):
            return x[: len(rows)]
        return x.index_select(0, self._upload(torch.tensor(list(rows), dtype=torch.int64)))

    def _view(self, first: int, rows: int) -> SentinelKVCache:
        view = self._views.get((first, rows))
        if view is None:
            view = self._views[(first, rows)] = row_view(self.cache, first, first + rows)
        return view

    def load_prefix(self, row: int, slot: int, n: int) -> None:
        """Start ``slot`` with the first ``n`` positions of prefix row ``row`` (its length
        becomes ``n``; the rest of its prompt is prefilled with ``start = n``)."""
        copy_rows(self.cache, row, [slot], n)
        self.lengths[:, slot] = n
        self.key_mask[slot] = 1
        self.row_offset[slot] = 0

    def store_prefix(self, slot: int, row: int, n: int) -> None:
        """Copy the first ``n`` prompt positions of ``slot`` (after its pads) to prefix
        row ``row``."""
        copy_span(self.cache, slot, self.row_offset[slot], row, n)

    def release(self, slot: int) -> None:
        """Empty ``slot``'s row (its length becomes 0 in every layer, its key mask all 1)."""
        self.lengths[:, slot] = 0
        self.key_mask[slot] = 1

    def move(self, src: Sequence[int], dst: Sequence[int], n: int) -> None:
        """Move the rows of slots ``src`` to the free slots ``dst`` (``src[i]`` to
        ``dst[i]``): their first ``n`` cache positions, device lengths, key masks, pads and
        the token the last step picked for them (a step launched next may feed it), all
        in stream order after the steps already launched; the sources are released.
        Nothing is read back to the host. ``n`` must cover every moved row's stored
        positions (pads included)."""
        src, dst = list(src), list(dst)
        move_rows(self.cache, src, dst, n)
        s_idx = self._upload(torch.tensor(src, dtype=torch.int64))
        d_idx = self._upload(torch.tensor(dst, dtype=torch.int64))
        self.lengths.index_copy_(1, d_idx, self.lengths.index_select(1, s_idx))
        self.key_mask.index_copy_(0, d_idx, self.key_mask.index_select(0, s_idx))
        self._prev_tok.index_copy_(0, d_idx, self._prev_tok.index_select(0, s_idx))
        for s, d in zip(src, dst, strict=True):
            self.row_offset[d] = self.row_offset[s]
            self.row_offset[s] = 0
            self.release(s)

    # -- decode -------------------------------------------------------------------------

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding rows ``[0, rows)``."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows exceed max_slots={self.max_slots}")

    def step_needs_mask(self, rows: int, active: Sequence[int] | None = None) -> bool:
        """Whether a decode step over rows ``[0, rows)`` must read the slot key mask: some
        decoding row (``active[i]``, default all) has pads before its prompt (a row of a
        left-padded batched prefill; :attr:`row_offset`). Every other slot's mask row is
        all ones (prefill, prefix loads, moves and releases keep the two in step), so
        its attention is the same without the mask, which the step then does not load
        (one int8 read per key and a select in every layer's attention)."""
        offset = self.row_offset
        if active is None:
            return any(offset[i] for i in range(rows))
        return any(offset[i] for i in range(rows) if active[i])

    def _step_fn(self, bucket: int, masked: bool = True) -> Callable[[], torch.Tensor]:
        view = self._views[(0, bucket)] if masked else self._bare_views[bucket]
        tok = self._inputs[0, :bucket, None]
        pos = self._inputs[1, :bucket, None]
        extra = {"use_cache": True, **cache_kwargs(self.model, view)}

        def step() -> torch.Tensor:
            set_host_length(view, 1)  # > 0: the step reads the stored past
            return self._forward(bucket, input_ids=tok, position_ids=pos, **extra)

        return step

    def _rollback(self, bucket: int) -> None:
        # Rows that did not decode take back the dummy token they appended.
        idle = 1 - self._inputs[2, :bucket].to(torch.int32)
        self.lengths[:, :bucket].sub_(idle)

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        active: Sequence[int],
        use_prev: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One decode step over rows ``[0, len(tokens))`` (padded to a bucket): row ``i``
        feeds ``tokens[i]`` at ``positions[i]`` if ``active[i]``, else runs a dummy that
        is taken back. Where ``use_prev[i]`` is 1 the row feeds instead the token the last
        :meth:`pick_device` picked for it, still on the device (so a step can be launched
        before the previous one's tokens reach the host). Returns the logits
        ``[bucket, V]`` (rows past ``len(tokens)`` and inactive rows are junk)."""
        n = len(tokens)
        bucket = self.bucket_for(n)
        pad = bucket - n
        self._stage_inputs(bucket, tokens, positions, active, use_prev)
        short = self.short_rows and self._longest(positions, active) <= SHORT_ROW_KEYS
        self.short_steps += short
        masked = self.step_needs_mask(n, active)
        self.masked_steps += masked
        # a masked graph serves every step (the mask is all ones where there are no pads)
        graph = self._graphs.get((bucket, short)) if self.graphs_masked or not masked else None
        try:
            if graph is not None:
                graph[0].replay()
                logits = graph[1]
            else:
                with ops.decode_split_scope(SHORT_ROW_KEYS if short else None):
                    logits = self._step_fn(bucket, masked)()
        finally:
            if pad or not all(active):
                self._rollback(bucket)
        return logits

    def _stage_inputs(
        self,
        bucket: int,
        tokens: Sequence[int],
        positions: Sequence[int],
        active: Sequence[int],
        use_prev: Sequence[int] | None,
    ) -> None:
        """Write a step's inputs for rows ``[0, bucket)`` into the static buffers the
        graphs read (rows past ``len(tokens)``: token 0, inactive); one host-to-device
        copy, and the tokens of ``use_prev`` rows taken from :attr:`_prev_tok` on the
        device."""
        n = len(tokens)
        if len(positions) != n or len(active) != n or (use_prev is not None and len(use_prev) != n):
            raise ValueError("decode: tokens, positions, active and use_prev differ in length")
        # numpy, not torch.tensor over the lists: 2.4x less host time, every step
        # (bench/bench_engine_host.py)
        arr = np.zeros((4, bucket), dtype=np.int64)
        arr[0, :n] = tokens
        arr[1, :n] = positions
        arr[2, :n] = active
        prev = use_prev is not None and any(use_prev)
        if prev:
            assert use_prev is not None
            arr[3, :n] = use_prev
        host = torch.from_numpy(arr)
        self._step_host[:, :bucket].copy_(self._pinned(host), non_blocking=True)
        self._inputs[1:, :bucket].copy_(self._step_host[1:3, :bucket])
        if prev:
            torch.where(
                self._step_host[3, :bucket].bool(),
                self._prev_tok[:bucket],
                self._step_host[0, :bucket],
                out=self._inputs[0, :bucket],
            )
        else:
            self._inputs[0, :bucket].copy_(self._step_host[0, :bucket])

    def decode_multi(self, token: int, position: int, use_prev: bool) -> torch.Tensor:
        """:attr:`multi_step` greedy decode steps of row 0 alone (bucket 1): the first feeds
        ``token`` (or, with ``use_prev``, the token the last step picked for row 0, still on
        the device) at ``position``, each later one the argmax of the step before. On a GPU
        the whole run is one CUDA graph, so the host pays one launch and one token read
        per ``multi_step`` tokens instead of per token (as ``sk.generate``'s graphs of
        several greedy steps do; vLLM calls this multi-step scheduling). The row's length
        advances by ``multi_step``; tokens after an end of sequence are the caller's to
        drop (freeing the slot clears them).

        Returns:
            The picked tokens, int64 ``[multi_step]`` on the device (from a graph: its
            static buffer, to be copied before the next call, as :meth:`to_host` does in
            stream order); the last is also row 0's :attr:`_prev_tok`.
        """
        m = self.multi_step
        self._stage_inputs(1, [token], [position], [1], [int(use_prev)])
        short = self.short_rows and self._longest([position + m - 1], [1]) <= SHORT_ROW_KEYS
        self.short_steps += m * short
        masked = self.step_needs_mask(1)
        self.masked_steps += m * masked
        graph = self._multi_graphs.get(short) if self.graphs_masked or not masked else None
        if graph is not None:
            graph[0].replay()
            return graph[1]
        with ops.decode_split_scope(SHORT_ROW_KEYS if short else None):
            # a copy: on the CPU the caller's "host copy" is this tensor itself, and the
            # next call (launched before this one's tokens are read) rewrites the buffer
            return self._multi_fn(masked)().clone()

    def _multi_fn(self, masked: bool = True) -> Callable[[], torch.Tensor]:
        step = self._step_fn(1, masked)
        out, col = self._multi_out.view(1, -1), self._multi_col
        # [1, 1] views of row 0's input token and position
        tok, pos = self._inputs[0, :1].view(1, 1), self._inputs[1, :1].view(1, 1)

        fused = settings.fused_pick()

        def multi() -> torch.Tensor:
            if fused:
                col.zero_()
            for j in range(self.multi_step):
                if fused:  # the argmax and the token's bookkeeping: two launches on a GPU
                    ops.greedy_advance(step()[:1], out, col, tok, pos, arrive=self._multi_arrive)
                    continue
                picked = torch.argmax(step()[:1], dim=-1)
                out[0, j : j + 1].copy_(picked)
                tok[0].copy_(picked)
                pos.add_(1)
            self._prev_tok[:1].copy_(tok[0])
            return self._multi_out

        return multi

    def _longest(self, positions: Sequence[int], active: Sequence[int]) -> int:
        """Keys of the longest decoding row after this step's append (its pads included)."""
        offset = self.row_offset
        return max((p + 1 + offset[i] for i, p in enumerate(positions) if active[i]), default=0)

    def _capture_all(self) -> None:
        """Capture the decode graphs, per bucket (largest first, one memory pool): one
        planned for the cache's capacity and, with :attr:`short_rows`, one for short rows."""
        self._inputs.zero_()
        for bucket in sorted(self.buckets, reverse=True):
            for short in (False, True) if self.short_rows else (False,):
                self._warm_rows(bucket, self._warm_length(short, 1))
                # SENTINEL_PDL=batch1: the one-row bucket's step with PDL (it gains at batch 1)
                with (
                    ops.pdl_scope(bucket == 1),
                    ops.decode_split_scope(SHORT_ROW_KEYS if short else None),
                ):
                    self._graphs[(bucket, short)] = self._capture(
                        self._step_fn(bucket, self.graphs_masked)
                    )
                self.lengths.zero_()
                self._inputs.zero_()
        if self.multi_step > 1:
            self._capture_multi()
        torch.cuda.synchronize(self.device)

    def _warm_length(self, short: bool, steps: int) -> int:
        """The row length (keys before the step) that a decode graph's eager warm-up step
        runs at: the middle of the lengths the graph will serve (short rows: up to
        :data:`SHORT_ROW_KEYS`; else up to ``max_seq_len``), less the ``steps`` the graph
        appends. The warm-up is where the Triton decode attention autotunes, which it
        does once per launch shape: timed on rows of one key, as empty start-up rows
        are, its pick says nothing about the serving lengths (an H100 probe,
        ``scripts/engine_kernel_probe.py``: a 32-key block picked that way made the
        engine's lone decode attention 1.8x ``sk.generate``'s)."""
        lo = SHORT_ROW_KEYS + 1 if self.short_rows and not short else 1
        hi = SHORT_ROW_KEYS if short else self.max_seq_len
        return max(0, min((lo + hi) // 2, hi - steps))

    def _warm_rows(self, bucket: int, length: int) -> None:
        """Give rows ``[0, bucket)`` ``length`` stored keys (junk: the rows are empty at
        start-up, and the caller zeroes the lengths after the capture) and the matching
        positions, for a warm-up step."""
        self.lengths[:, :bucket] = length
        self._inputs[1, :bucket] = length

    def _capture_multi(self) -> None:
        """Capture :meth:`decode_multi`'s graphs (capacity plan and, with
        :attr:`short_rows`, the short-rows plan), with PDL as the one-row bucket. A capture
        that fails turns them off with a warning; the calls then run the steps eagerly."""
        try:
            for short in (False, True) if self.short_rows else (False,):
                self._inputs.zero_()
                self._warm_rows(1, self._warm_length(short, self.multi_step))
                with (
                    ops.pdl_scope(True),
                    ops.decode_split_scope(SHORT_ROW_KEYS if short else None),
                ):
                    self._multi_graphs[short] = self._capture(self._multi_fn(self.graphs_masked))
                self.lengths.zero_()
        except Exception as exc:  # pragma: no cover - depends on the model and GPU
            self._capture_failed("multi-step", "those steps run eagerly", exc, self._multi_graphs)
        self._inputs.zero_()
        self._prev_tok.zero_()
        self.lengths.zero_()

    @property
    def graph_buckets(self) -> tuple[int, ...]:
        """The buckets with a captured graph."""
        return tuple(sorted({bucket for bucket, _ in self._graphs}))

    @property
    def prefill_buckets(self) -> tuple[tuple[int, int], ...]:
        """The (rows, width) sizes with a captured prefill graph."""
        return tuple(sorted(self._prefill_graphs))

    # -- sampling -----------------------------------------------------------------------

    def pick(self, logits: torch.Tensor, rows: Sequence[RowSampling | None]) -> list[int]:
        """:meth:`pick_device` read back to the host: the one host sync of a step."""
        return [int(t) for t in self.pick_device(logits, rows, keep=False).tolist()]

    def pick_device(
        self, logits: torch.Tensor, rows: Sequence[RowSampling | None], keep: bool = True
    ) -> torch.Tensor:
        """Next token of each of the first ``len(rows)`` rows, int64 ``[len(rows)]`` on the
        device: argmax for ``None`` (greedy), else a sample of ``softmax(filter_logits(row
        / T))`` drawn with the row's generator (the exponential race of
        :func:`sentinel_kernels.decoding.sample_next`). ``keep``: also remember them by row
        for the next :meth:`decode` (``use_prev``)."""
        n = len(rows)
        picked = torch.argmax(logits[:n], dim=-1)
        sampled = [i for i, r in enumerate(rows) if r is not None]
        if sampled:
            draws = []
            for i in sampled:
                r = rows[i]
                assert r is not None
                x = filter_logits(logits[i : i + 1], r.temperature, r.top_k or None, r.top_p)
                probs = torch.softmax(x, dim=-1)
                race = torch.empty_like(probs).exponential_(generator=r.generator)
                draws.append(torch.argmax(probs / race, dim=-1))
            idx = self._upload(torch.tensor(sampled, dtype=torch.int64))
            picked = picked.index_copy(0, idx, torch.cat(draws))
        if keep:
            self._prev_tok[:n].copy_(picked)
        return picked

    def logprobs_device(
        self, logits: torch.Tensor, picked: torch.Tensor, rows: Sequence[int], k: int
    ) -> torch.Tensor:
        """The log-probabilities of rows ``rows`` of a step, float64 ``[len(rows), 1 + 2k]``
        on the device: per row ``[lp(picked), top-k values..., top-k ids...]`` of ``lp =
        log_softmax(logits[row].float())``, the top ``k`` most likely first (``topk``).

        ``logits`` ``[>= n, V]`` are what :meth:`pick_device` picked ``picked`` ``[n]``
        from, before temperature and the top-k / top-p filters: the model's raw logits, or
        with kNN-LM the mixture's log-probabilities (already normalized; the
        ``log_softmax`` only rounds). float64 holds the float32 values and the token ids
        (< 2**53) exactly, so the step's tokens and these share one host copy
        (:meth:`to_host`). No host sync: ``rows`` go to the device as a non-blocking copy.
        Runs outside a CUDA graph, on the decode graph's static output right after its
        replay (stream order keeps the next replay from overwriting it first).
        """
        x, chosen = self.select_rows(logits, rows), self.select_rows(picked, rows)
        lp = torch.log_softmax(x.float(), dim=-1)
        top_v, top_i = torch.topk(lp, k, dim=-1)
        return torch.cat(
            [lp.gather(1, chosen[:, None]).double(), top_v.double(), top_i.double()], dim=1
        )

    def to_host(
        self, picked: torch.Tensor, logprobs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Start copying ``picked`` (and the :meth:`logprobs_device` of the step, if any,
        packed after the tokens in one float64 vector: one copy, one event) to the host;
        returns the host tensor (:func:`unpack_step` reads it) and an event to wait on
        (None on the CPU, where the copy is done)."""
        if logprobs is not None:
            picked = torch.cat([picked.double(), logprobs.flatten()])
        if picked.device.type != "cuda":
            return picked, None
        host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        host.copy_(picked, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


def unpack_step(
    host: torch.Tensor, n: int, rows: Sequence[int], k: int
) -> tuple[list[int], dict[int, TokenLogprobs]]:
    """Read a step's host buffer from :meth:`ModelRunner.to_host` (after its event): the
    ``n`` tokens, and the log-probabilities of rows ``rows`` (``k`` alternatives each;
    nothing was packed when ``rows`` is empty) as ``{row: (lp, [(id, lp), ...])}``."""
    values = host.tolist()
    tokens = [int(t) for t in values[:n]]
    out: dict[int, TokenLogprobs] = {}
    width = 1 + 2 * k
    for j, row in enumerate(rows):
        rec = values[n + j * width : n + (j + 1) * width]
        out[row] = (
            float(rec[0]),
            [(int(i), float(v)) for v, i in zip(rec[1 : 1 + k], rec[1 + k :], strict=True)],
        )
    return tokens, out

"""The decode loop of ``sk.generate``: a preallocated cache and a CUDA-graph step.

Where the time of transformers' ``generate`` goes at batch 1 on a GPU: not the kernels (a
135M model's weights stream in ~0.1 ms) but Python and launches, ~1000 kernel launches
per token, each paid on the host. This loop removes that:

1. a preallocated cache (:func:`sentinel_kernels.kv_cache`, the format the patch level
   chose: dense at level 1, INT8 at 2, INT4 / low-rank at 3), so tensor addresses are
   fixed and a decode step makes no host decision that changes between steps;
2. a prompt shape's first prefill runs eagerly; with ``prefill_graph`` (``sk.generate``'s
   default with CUDA graphs on) a shape seen before (batch, length, padding, cache length)
   is prefilled by a CUDA graph captured on its second call and replayed afterwards: the
   eager forward of a small model is host-bound (34 ms of a 39 ms 2048-token SmolLM2
   prefill at level 1 on the H200's host, ``docs/MEASUREMENTS.md``), the graph's replay
   is only its kernels. A session keeps at most ``PREFILL_GRAPHS`` of them;
3. the one-token decode step (the model's own forward, so the same kernels as
   ``model.generate`` of the patched model) runs once eagerly, which also autotunes its
   Triton kernels, then is captured in a CUDA graph and replayed for every later token
   (PyTorch's ``torch.cuda.CUDAGraph``; the approach of gpt-fast and vLLM). The graph is
   kept per (model weights, cache format, batch size, cache length, padding) and reused
   by later calls with the same key;
4. the next token is chosen on the device (:mod:`.sampling`), end-of-sequence is tracked
   on the device, and the host looks at it only every ``STOP_CHECK_EVERY`` tokens;
5. greedy decoding (no streamer) replays whole chunks of ``STOP_CHECK_EVERY`` steps, each
   with its argmax and token bookkeeping, as one graph, captured on a session's second
   call (its capture costs ``STOP_CHECK_EVERY`` eager forwards of host time). The host
   loop of a batch-1 step of a small model (a handful of PyTorch calls, ~0.2 ms on the
   H200's host) otherwise costs as much as the step's kernels. Sampling keeps one graph
   per step: its random draws stay those of the eager loop with the caller's generator.

Left padding: the prompt's padding mask becomes a slot-indexed key mask inside the cache
(:meth:`SentinelKVCache.set_static_key_mask`), so the decode step needs no
``attention_mask`` and stays capturable; positions follow transformers' rule
(``cumsum(mask) - 1``). Right padding (pads after a row's tokens, what most tokenizers
do by default) is turned into left padding before the prefill: each row is rolled so
that its pads come first (:func:`.api._to_left_padding`, one gather, decided by the same host
read that sees whether the batch is padded), and the caller's ``input_ids`` are put back
in front of the new tokens in the output.

On the CPU the same loop runs without graphs.

kNN-LM (``knn=`` of ``sk.generate``, :mod:`sentinel_kernels.knn.lm`): a forward pre-hook on
the LM head copies its input (the last position's hidden state) into a static buffer of
the session; the step then searches the datastore with it and returns the interpolated
log-distribution instead of the logits. With the datastore's exact device search (the
``"torch"`` backend) the search and the interpolation are part of the captured graph.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops, settings
from ..cache import kv_cache as make_cache
from ..cache import parse_spec
from ..hf_compat import accepts, cache_kwargs
from ..knn.lm import KnnScorer, capture_lm_head_input, lm_head_input
from ..nn.rotary_table import rotary_table_scope
from ..patching.apply import patch_report
from .sampling import eos_hit, sample_next
from .session import DecodeRequest, capture_stream, fingerprint, get_session

__all__ = ["STOP_CHECK_EVERY", "run"]

#: With ``eos_token_id`` set, the host reads the "all rows finished" flag once per this
#: many tokens (one sync each): a finished batch decodes at most this many extra steps,
#: which are trimmed from the output.
STOP_CHECK_EVERY = 16
#: prompt shapes a session remembers for ``prefill_graph`` (the least recently used is
#: forgotten first), and how many of them may hold a captured graph: each graph keeps
#: its own memory pool (the prefill's activations), so a caller whose prompt lengths keep
#: changing does not accumulate them.
PREFILL_SHAPES = 64
PREFILL_GRAPHS = 2

log = logging.getLogger("sentinel_kernels")


@dataclass
class _Session:
    """A decode session of :func:`run`: the cache, the step's static inputs and its graph."""

    cache: Any
    tok: torch.Tensor  # [B, 1] int64, the step's input token
    pos: torch.Tensor  # [B, 1] int64, its position
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output [B, V]
    hidden: torch.Tensor | None = None  # [B, D] the LM head's input (kNN-LM only)
    keepalive: list[Any] = field(default_factory=list)
    #: the token bookkeeping's static tensors (:class:`_Tracker`): output tokens
    #: ``[B, max_new]``, its write column ``[1]``, finished rows ``[B]``, the pad id
    #: ``[1]`` and the end-of-sequence ids ``[E]``
    out: torch.Tensor | None = None
    col: torch.Tensor | None = None
    finished: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    eos: torch.Tensor | None = None
    #: ``ops.greedy_advance``'s arrival counter ``[1]`` int32
    arrive: torch.Tensor | None = None
    #: calls of :func:`run` on this session (chunk graphs are captured from the second)
    calls: int = 0
    #: graphs of STOP_CHECK_EVERY greedy steps by (number of EOS ids, pad id)
    chunks: dict[int, Any] = field(default_factory=dict)
    #: prefill graphs by (prompt length, padded), least recently used first: None after a
    #: shape's first call, its graph from its second (an entry without a graph: the
    #: capture failed, stay eager); bounded by PREFILL_SHAPES and PREFILL_GRAPHS
    prefill: OrderedDict[tuple[int, bool], _PrefillGraph | None] = field(
        default_factory=OrderedDict
    )


@dataclass
class _PrefillGraph:
    """A captured prefill forward: its static inputs and its output."""

    ids: torch.Tensor  # [B, S] int64
    pos: torch.Tensor  # [B, S] int64
    mask: torch.Tensor | None  # [B, S] (padded prompts only)
    graph: Any = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # [B, V], the last position's


def _new_session(
    model: nn.Module, spec: str, batch: int, capacity: int, device: torch.device
) -> _Session:
    cache = make_cache(model, spec, max_cache_len=capacity, batch_size=batch, device=device)
    tok = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    pos = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    return _Session(cache=cache, tok=tok, pos=pos)


def _set_host_lengths(cache: Any, n: int) -> None:
    # The layers' host counters are not advanced by graph replays (no Python runs).
    for layer in cache.layers:
        layer.seq_length = n


def run(
    req: DecodeRequest,
    use_graph: bool,
    device: torch.device,
    knn: KnnScorer | None = None,
    prefill_graph: bool = False,
    warn_prefill: bool = True,
) -> torch.Tensor:
    """The decode loop of ``req`` (a left-padded or unpadded batch); with ``knn`` every
    token is chosen from the kNN-LM mixture instead of the model's logits; with
    ``prefill_graph`` (CUDA, no ``knn``) a prompt shape's second and later prefills are a
    CUDA graph's replay (a failed capture is a ``RuntimeWarning`` with ``warn_prefill``,
    else a log record, and that shape stays eager)."""
    model = req.model
    batch, prompt = req.ids.shape
    capacity = prompt + req.max_new
    padded = req.is_padded()
    spec = str(parse_spec(req.spec))
    knn_key = None if knn is None else knn.key()
    key = (fingerprint(model), spec, batch, capacity, padded, use_graph, device, knn_key)
    sess = get_session(model, key, lambda: _new_session(model, spec, batch, capacity, device))
    sess.keepalive = [patch_report(model), knn]
    # every position of this call is below the cache's capacity: the rotary tables apply
    with rotary_table_scope(capacity):
        if knn is None:
            return _run(req, sess, use_graph, device, None, prefill_graph, warn_prefill)
        if sess.hidden is None:
            dim, dtype = lm_head_input(model)
            sess.hidden = torch.zeros(batch, dim, dtype=dtype, device=device)
        with capture_lm_head_input(model, sess.hidden):
            return _run(req, sess, use_graph, device, knn, False, warn_prefill)


def _run(
    req: DecodeRequest,
    sess: _Session,
    use_graph: bool,
    device: torch.device,
    knn: KnnScorer | None,
    prefill_graph: bool,
    warn_prefill: bool,
) -> torch.Tensor:
    model, ids, mask, max_new = req.model, req.ids, req.mask, req.max_new
    eos, pad_id, streamer = req.eos, req.pad_id, req.streamer
    sampling = req.sampling
    batch, prompt = ids.shape
    padded = req.is_padded()
    hidden = sess.hidden

    def scores(logits: torch.Tensor) -> torch.Tensor:
        if knn is None or hidden is None:
            return logits
        return knn(logits, hidden)

    cache = sess.cache
    cache.reset()
    cache.set_static_key_mask(None)
    extra: dict[str, Any] = {"use_cache": True, **cache_kwargs(model, cache)}
    if accepts(model.forward, "logits_to_keep"):
        extra["logits_to_keep"] = 1

    pos = req.positions(device)
    req.stream_prompt()
    shape = (prompt, padded)
    g = sess.prefill.get(shape) if prefill_graph else None
    if prefill_graph and shape in sess.prefill:
        sess.prefill.move_to_end(shape)
    if prefill_graph and g is None and shape in sess.prefill:  # seen once: capture now
        g = _capture_prefill(model, extra, ids, mask, pos, padded, warn_prefill)
        _remember_prefill(sess.prefill, shape, g)
        if g.graph is None:  # a failed capture may have run part of the host bookkeeping
            cache.reset()
            cache.set_static_key_mask(None)
    if g is not None and g.graph is not None and g.logits is not None:
        g.ids.copy_(ids)
        g.pos.copy_(pos)
        if g.mask is not None and mask is not None:
            g.mask.copy_(mask)
        g.graph.replay()
        _set_host_lengths(cache, prompt)
        last = g.logits
    else:
        if prefill_graph and shape not in sess.prefill:
            _remember_prefill(sess.prefill, shape, None)  # the eager forward warms it up
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
        last = out.logits[:, -1]
        del out
    if padded:
        cache.set_static_key_mask(mask)
    sess.pos.copy_(pos[:, -1:] + 1)
    track = _Tracker.start(sess, max_new, pad_id, eos)
    tok = track.first(sample_next(scores(last), **sampling))
    if streamer is not None:
        streamer.put(tok.cpu())

    def step() -> torch.Tensor:
        o = model(input_ids=sess.tok, position_ids=sess.pos, **extra)
        return scores(o.logits[:, -1])

    # Whole chunks of STOP_CHECK_EVERY greedy tokens (the step, the argmax and the token
    # bookkeeping) replay as one graph: the host then pays one launch per chunk instead
    # of one step's worth of small PyTorch calls per token, which on a batch-1 step of a
    # small model cost more host time than the step's kernels take on the GPU.
    # A chunk's capture records STOP_CHECK_EVERY eager forwards; it is paid from the
    # session's second call on, when the session has shown that it gets reused.
    sess.calls += 1
    chunked = (
        use_graph
        and sess.calls >= 2
        and streamer is None
        and not sampling.get("do_sample", False)
        and settings.chunk_graphs()
    )
    # the pad id is not part of the key: the graph reads it from ``sess.pad``
    chunk_key = track.eos_count()
    steps = 1
    i = 1
    # SENTINEL_PDL=batch1: the batch-1 decode steps (eager, captured, replayed) use PDL
    with ops.pdl_scope(batch == 1 and device.type == "cuda"):
        while i < max_new:
            if track.tracking and (i - 1) % STOP_CHECK_EVERY == 0 and i > 1 and track.all_done():
                break
            if chunked and sess.graph is not None and (i - 1) % STOP_CHECK_EVERY == 0:
                if i + STOP_CHECK_EVERY <= max_new:
                    chunk = sess.chunks.get(chunk_key)
                    if chunk is None:
                        chunk = sess.chunks[chunk_key] = _capture_chunk(
                            lambda: track.pick(step(), sampling),
                            cache,
                            prompt + i,
                        )
                    chunk.replay()
                    i += STOP_CHECK_EVERY
                    steps = i
                    continue
            if use_graph and sess.graph is None and i >= 2 and max_new >= 3:
                # step i - 1 ran eagerly (and autotuned); capture step i and replay it.
                _capture(sess, step, cache, prompt + i)
            if sess.graph is not None and sess.logits is not None:
                sess.graph.replay()
                logits = sess.logits
            else:
                logits = step()
            nxt = track.pick(logits, sampling)
            i += 1
            steps = i
            if streamer is not None:
                # a copy even on the CPU: nxt views the next step's input, which changes
                streamer.put(nxt.to("cpu", copy=True))
    _set_host_lengths(cache, prompt + steps)
    if streamer is not None:
        streamer.end()
    new = track.tokens(steps)
    if eos is not None:
        new = _trim_finished(new, eos)
    return torch.cat([ids, new], dim=1)


@dataclass
class _Tracker:
    """The token bookkeeping of one call on its session's static tensors: the output
    buffer and its write column, the next step's input token and position, and (with
    ``eos``) the rows already finished. Only in-place device ops, so that a graph can
    record :meth:`advance` together with the step."""

    sess: _Session
    tracking: bool
    fused: bool = True

    @classmethod
    def start(cls, sess: _Session, max_new: int, pad_id: int, eos: torch.Tensor | None) -> _Tracker:
        batch = sess.tok.shape[0]
        device = sess.tok.device
        if sess.out is None or sess.out.shape[1] < max_new:
            sess.out = torch.empty(batch, max_new, dtype=torch.int64, device=device)
            sess.col = torch.zeros(1, dtype=torch.int64, device=device)
            sess.finished = torch.zeros(batch, dtype=torch.bool, device=device)
            sess.pad = torch.zeros(1, dtype=torch.int64, device=device)
            sess.chunks.clear()  # they write into the old buffer
        assert sess.col is not None and sess.pad is not None and sess.finished is not None
        sess.out[:, :max_new].fill_(pad_id)
        sess.col.zero_()
        sess.pad.fill_(pad_id)
        sess.finished.zero_()
        if eos is not None and (sess.eos is None or sess.eos.shape != eos.shape):
            sess.eos = torch.empty_like(eos)
        if eos is not None and sess.eos is not None:
            sess.eos.copy_(eos)
        if sess.arrive is None:
            sess.arrive = torch.zeros(1, dtype=torch.int32, device=device)
        return cls(sess=sess, tracking=eos is not None, fused=settings.fused_pick())

    def eos_count(self) -> int:
        """How many end-of-sequence ids are tracked (0: none); a chunk graph is per count."""
        return 0 if not self.tracking or self.sess.eos is None else int(self.sess.eos.numel())

    def first(self, tok: torch.Tensor) -> torch.Tensor:
        """Record the prefill's token ``tok`` ``[B]`` (no row is finished before it)."""
        sess = self.sess
        assert sess.out is not None and sess.col is not None and sess.finished is not None
        if self.tracking:
            assert sess.eos is not None
            sess.finished.copy_(eos_hit(tok, sess.eos))
        sess.out.index_copy_(1, sess.col, tok[:, None])
        sess.col.add_(1)
        sess.tok.copy_(tok[:, None])
        return tok

    def advance(self, nxt: torch.Tensor) -> torch.Tensor:
        """Record a decode step's token ``nxt`` ``[B]``: finished rows get the pad id, the
        token is written to the output, and becomes the next step's input one position on."""
        sess = self.sess
        assert sess.out is not None and sess.col is not None and sess.finished is not None
        if self.tracking:
            assert sess.eos is not None and sess.pad is not None
            nxt = torch.where(sess.finished, sess.pad, nxt)
            sess.finished.logical_or_(eos_hit(nxt, sess.eos))
        sess.out.index_copy_(1, sess.col, nxt[:, None])
        sess.col.add_(1)
        sess.tok.copy_(nxt[:, None])
        sess.pos.add_(1)
        return nxt

    def pick(self, logits: torch.Tensor, sampling: dict[str, Any]) -> torch.Tensor:
        """:meth:`advance` with the step's token chosen from ``logits`` ``[B, V]``: greedy
        steps (with ``SENTINEL_FUSED_PICK=1``) through ``ops.greedy_advance``, which
        picks and records in two launches on a GPU; sampled ones through
        :func:`.sampling.sample_next`. Returns the token ``[B]`` (a view of the next
        step's input)."""
        sess = self.sess
        if sampling.get("do_sample", False) or not self.fused:
            return self.advance(sample_next(logits, **sampling))
        assert sess.out is not None and sess.col is not None and sess.arrive is not None
        track = self.tracking
        ops.greedy_advance(
            logits,
            sess.out,
            sess.col,
            sess.tok,
            sess.pos,
            arrive=sess.arrive,
            finished=sess.finished if track else None,
            eos=sess.eos if track else None,
            pad=sess.pad if track else None,
        )
        return sess.tok[:, 0]

    def tokens(self, steps: int) -> torch.Tensor:
        """A copy of the first ``steps`` output tokens, int64 ``[B, steps]``."""
        assert self.sess.out is not None
        return self.sess.out[:, :steps].clone()

    def all_done(self) -> bool:
        """Whether every row has finished (one host sync)."""
        assert self.sess.finished is not None
        return bool(self.sess.finished.all())


def _capture(sess: _Session, step: Callable[[], torch.Tensor], cache: Any, written: int) -> None:
    """Capture ``step`` (its kernels are recorded, not run) into ``sess.graph``."""
    graph = torch.cuda.CUDAGraph()
    side = capture_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            logits = step()
    torch.cuda.current_stream().wait_stream(side)
    # Capturing ran the cache's host bookkeeping (one token appended) without the GPU
    # work: put the host counters back to the tokens really written.
    _set_host_lengths(cache, written)
    sess.graph, sess.logits = graph, logits


def _capture_chunk(body: Callable[[], torch.Tensor], cache: Any, written: int) -> Any:
    """A graph of ``STOP_CHECK_EVERY`` calls of ``body`` (recorded, not run)."""

    def chunk() -> torch.Tensor:
        out = body()
        for _ in range(STOP_CHECK_EVERY - 1):
            out = body()
        return out

    graph, _ = _record(chunk)
    _set_host_lengths(cache, written)  # capturing ran the host bookkeeping of each step
    return graph


def _remember_prefill(
    store: OrderedDict[tuple[int, bool], _PrefillGraph | None],
    shape: tuple[int, bool],
    entry: _PrefillGraph | None,
) -> None:
    """Put ``entry`` under ``shape`` as the most recently used, then forget the least
    recently used graphs beyond :data:`PREFILL_GRAPHS` and shapes beyond
    :data:`PREFILL_SHAPES`."""
    store[shape] = entry
    store.move_to_end(shape)
    graphs = [k for k, v in store.items() if v is not None and v.graph is not None]
    for k in graphs[: max(0, len(graphs) - PREFILL_GRAPHS)]:
        del store[k]
    while len(store) > PREFILL_SHAPES:
        store.popitem(last=False)


def _capture_prefill(
    model: nn.Module,
    extra: dict[str, Any],
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    pos: torch.Tensor,
    padded: bool,
    warn: bool = True,
) -> _PrefillGraph:
    """Capture the prefill forward of a prompt shape (recorded, not run: the caller
    replays it). An unpadded prompt passes no mask (the eager call's mask is all ones).
    A capture that fails (a host sync somewhere in the model's forward) is reported once
    and the shape stays eager: its entry has no graph."""
    g = _PrefillGraph(
        ids=ids.clone(), pos=pos.clone(), mask=mask.clone() if padded and mask is not None else None
    )

    def body() -> torch.Tensor:
        out = model(input_ids=g.ids, attention_mask=g.mask, position_ids=g.pos, **extra)
        return out.logits[:, -1]

    try:
        g.graph, g.logits = _record(body)
    except Exception as exc:  # the eager prefill still serves this shape
        msg = (
            f"prefill CUDA graph disabled for this prompt shape ({type(exc).__name__}: "
            f"{exc}); it is prefilled eagerly"
        )
        if warn:  # asked for by the caller
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        else:  # on by default: say it without alarming
            log.info(msg)
        return _PrefillGraph(ids=g.ids, pos=g.pos, mask=None)  # no graph: stays eager
    return g


def _record(body: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """``body``'s kernels recorded into a new CUDA graph (not run), and its output."""
    graph = torch.cuda.CUDAGraph()
    side = capture_stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            out = body()
    finally:
        torch.cuda.current_stream().wait_stream(side)
    return graph, out


def _trim_finished(new: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Cut the columns after the step at which the last row emitted an EOS (what
    transformers' ``generate`` returns: it stops once every row has finished)."""
    hit = torch.isin(new, eos)  # outside any graph; eos_hit would be B x n x E
    n = new.shape[1]
    idx = torch.arange(n, device=new.device).expand_as(new)
    first = torch.where(hit, idx, torch.full_like(idx, n)).min(dim=1).values  # n = none
    last = int(first.max().item())  # one sync, after decoding
    return new if last >= n else new[:, : last + 1]

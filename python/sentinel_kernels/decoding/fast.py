"""The decode loop of ``sk.generate``: a preallocated cache and a CUDA-graph step.

Where the time of transformers' ``generate`` goes at batch 1 on a GPU: not the kernels (a
135M model's weights stream in ~0.1 ms) but Python and launches, ~1000 kernel launches
per token, each paid on the host. This loop removes that:

1. a preallocated cache (:func:`sentinel_kernels.kv_cache`, the format the patch level
   chose: dense at level 1, INT8 at 2, INT4 / low-rank at 3), so tensor addresses are
   fixed and a decode step makes no host decision that changes between steps;
2. the prompt's prefill runs eagerly (shapes vary per call); with ``prefill_graph=True``
   a prompt shape seen before (batch, length, padding, cache length) is prefilled by a
   CUDA graph captured on its second call and replayed afterwards: the eager forward of a
   small model is host-bound (~30 ms of Python for a 2048-token SmolLM2 prefill on the
   H200's host, ``docs/MEASUREMENTS.md``), the graph's replay is only its kernels;
3. the one-token decode step (the model's own forward, so the same kernels as
   ``model.generate`` of the patched model) runs once eagerly, which also autotunes its
   Triton kernels, then is captured in a CUDA graph and replayed for every later token
   (PyTorch's ``torch.cuda.CUDAGraph``; the approach of gpt-fast and vLLM). The graph is
   kept per (model weights, cache format, batch size, cache length, padding) and reused
   by later calls with the same key;
4. the next token is chosen on the device (:mod:`.sampling`), end-of-sequence is tracked
   on the device, and the host looks at it only every ``STOP_CHECK_EVERY`` tokens.

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

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache import kv_cache as make_cache
from ..cache import parse_spec
from ..hf_compat import accepts, cache_kwargs
from ..knn.lm import KnnScorer, capture_lm_head_input, lm_head_input
from ..patching.apply import patch_report
from .sampling import sample_next
from .session import DecodeRequest, fingerprint, get_session

__all__ = ["STOP_CHECK_EVERY", "run"]

#: With ``eos_token_id`` set, the host reads the "all rows finished" flag once per this
#: many tokens (one sync each): a finished batch decodes at most this many extra steps,
#: which are trimmed from the output.
STOP_CHECK_EVERY = 16


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
    #: prefill graphs by (prompt length, padded): None after a shape's first call, its
    #: graph from its second (an entry without a graph: the capture failed, stay eager)
    prefill: dict[tuple[int, bool], _PrefillGraph | None] = field(default_factory=dict)


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
) -> torch.Tensor:
    """The decode loop of ``req`` (a left-padded or unpadded batch); with ``knn`` every
    token is chosen from the kNN-LM mixture instead of the model's logits; with
    ``prefill_graph`` (CUDA, no ``knn``) a prompt shape's second and later prefills are a
    CUDA graph's replay."""
    model = req.model
    batch, prompt = req.ids.shape
    capacity = prompt + req.max_new
    padded = req.is_padded()
    spec = str(parse_spec(req.spec))
    knn_key = None if knn is None else knn.key()
    key = (fingerprint(model), spec, batch, capacity, padded, use_graph, device, knn_key)
    sess = get_session(model, key, lambda: _new_session(model, spec, batch, capacity, device))
    sess.keepalive = [patch_report(model), knn]
    if knn is None:
        return _run(req, sess, use_graph, device, None, prefill_graph)
    if sess.hidden is None:
        dim, dtype = lm_head_input(model)
        sess.hidden = torch.zeros(batch, dim, dtype=dtype, device=device)
    with capture_lm_head_input(model, sess.hidden):
        return _run(req, sess, use_graph, device, knn, False)


def _run(
    req: DecodeRequest,
    sess: _Session,
    use_graph: bool,
    device: torch.device,
    knn: KnnScorer | None,
    prefill_graph: bool,
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
    if prefill_graph and g is None and shape in sess.prefill:  # seen once: capture now
        g = sess.prefill[shape] = _capture_prefill(model, extra, ids, mask, pos, padded)
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
            sess.prefill[shape] = None  # seen once; the eager forward below warms it up
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
        last = out.logits[:, -1]
        del out
    tok = sample_next(scores(last), **sampling)
    if padded:
        cache.set_static_key_mask(mask)

    new = torch.full((batch, max_new), pad_id, dtype=torch.int64, device=device)
    new[:, 0] = tok
    finished = None
    if eos is not None:
        finished = torch.isin(tok, eos)
    if streamer is not None:
        streamer.put(tok.cpu())
    sess.pos.copy_(pos[:, -1:] + 1)

    def step() -> torch.Tensor:
        o = model(input_ids=sess.tok, position_ids=sess.pos, **extra)
        return scores(o.logits[:, -1])

    steps = 1
    for i in range(1, max_new):
        if finished is not None and i % STOP_CHECK_EVERY == 0 and bool(finished.all()):
            break
        sess.tok.copy_(tok[:, None])
        if i > 1:
            sess.pos.add_(1)
        if use_graph and sess.graph is None and i >= 2 and max_new >= 3:
            # step i - 1 ran eagerly (and autotuned); capture step i and replay it.
            _capture(sess, step, cache, prompt + i)
        if sess.graph is not None and sess.logits is not None:
            sess.graph.replay()
            logits = sess.logits
        else:
            logits = step()
        nxt = sample_next(logits, **sampling)
        if finished is not None and eos is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            finished = finished | torch.isin(nxt, eos)
        new[:, i] = nxt
        tok = nxt
        steps = i + 1
        if streamer is not None:
            streamer.put(nxt.cpu())
    _set_host_lengths(cache, prompt + steps)
    if streamer is not None:
        streamer.end()
    new = new[:, :steps]
    if eos is not None:
        new = _trim_finished(new, eos)
    return torch.cat([ids, new], dim=1)


def _capture(sess: _Session, step: Callable[[], torch.Tensor], cache: Any, written: int) -> None:
    """Capture ``step`` (its kernels are recorded, not run) into ``sess.graph``."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            logits = step()
    torch.cuda.current_stream().wait_stream(side)
    # Capturing ran the cache's host bookkeeping (one token appended) without the GPU
    # work: put the host counters back to the tokens really written.
    _set_host_lengths(cache, written)
    sess.graph, sess.logits = graph, logits


def _capture_prefill(
    model: nn.Module,
    extra: dict[str, Any],
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    pos: torch.Tensor,
    padded: bool,
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
        warnings.warn(
            f"prefill CUDA graph disabled for this prompt shape ({type(exc).__name__}: "
            f"{exc}); it is prefilled eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return _PrefillGraph(ids=g.ids, pos=g.pos, mask=None)  # no graph: stays eager
    return g


def _record(body: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """``body``'s kernels recorded into a new CUDA graph (not run), and its output."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
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
    hit = torch.isin(new, eos)
    n = new.shape[1]
    idx = torch.arange(n, device=new.device).expand_as(new)
    first = torch.where(hit, idx, torch.full_like(idx, n)).min(dim=1).values  # n = none
    last = int(first.max().item())  # one sync, after decoding
    return new if last >= n else new[:, : last + 1]

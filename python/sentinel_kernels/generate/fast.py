"""``sk.generate``: greedy/sampled decoding with a preallocated cache and a CUDA-graph step.

Where the time of transformers' ``generate`` goes at batch 1 on a GPU: not the kernels (a
135M model's weights stream in ~0.1 ms) but Python and launches, ~1000 kernel launches
per token, each paid on the host. This loop removes that:

1. a preallocated cache (:func:`sentinel_kernels.kv_cache`, the format the patch level
   chose: dense at level 1, INT8 at 2, INT4 / low-rank at 3), so tensor addresses are
   fixed and a decode step makes no host decision that changes between steps;
2. the prompt's prefill runs eagerly (shapes vary per call);
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
that its pads come first (:func:`_to_left_padding`, one gather, decided by the same host
read that sees whether the batch is padded), and the caller's ``input_ids`` are put back
in front of the new tokens in the output.

On the CPU the same loop runs without graphs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..hf_compat import accepts, cache_kwargs
from .sampling import check_sampling_args, sample_next

__all__ = ["MAX_SESSIONS", "STOP_CHECK_EVERY", "clear_sessions", "generate"]

#: Decode sessions (cache + captured graphs) kept per model, least recently used dropped
#: (each holds its cache and graph memory; ``clear_sessions(model)`` frees them).
MAX_SESSIONS = 8
#: With ``eos_token_id`` set, the host reads the "all rows finished" flag once per this
#: many tokens (one sync each): a finished batch decodes at most this many extra steps,
#: which are trimmed from the output.
STOP_CHECK_EVERY = 16

_SESSIONS_ATTR = "_sentinel_generate_sessions"
_lock = threading.Lock()


# --------------------------------------------------------------------------------------
# Session: cache, static inputs, graph
# --------------------------------------------------------------------------------------


@dataclass
class _Session:
    cache: Any
    tok: torch.Tensor  # [B, 1] int64, the step's input token
    pos: torch.Tensor  # [B, 1] int64, its position
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the graph's output [B, V]
    keepalive: list[Any] = field(default_factory=list)


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What a captured graph depends on: every parameter/buffer address, the attention
    implementation and the patch (a new ``patch_model`` state object per patch, kept alive
    by the session so its id is not reused)."""
    ptrs = tuple(t.data_ptr() for t in model.parameters())
    ptrs += tuple(t.data_ptr() for t in model.buffers())
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (impl, id(getattr(model, "_sentinel_patch_state", None)), ptrs)


def _sessions(model: nn.Module) -> OrderedDict[Any, _Session]:
    store = getattr(model, _SESSIONS_ATTR, None)
    if store is None:
        store = OrderedDict()
        # not a registered attribute of the module: keep it out of state_dict / modules
        object.__setattr__(model, _SESSIONS_ATTR, store)
    return store


def clear_sessions(model: nn.Module) -> None:
    """Drop ``model``'s cached decode sessions (their caches and CUDA graphs)."""
    with _lock:
        if hasattr(model, _SESSIONS_ATTR):
            getattr(model, _SESSIONS_ATTR).clear()


def _patched_spec(model: nn.Module) -> str:
    state = getattr(model, "_sentinel_patch_state", None)
    spec = None
    if state is not None:
        spec = state.report.options.get("kv_cache")
    return str(spec) if spec else "dense"


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_inputs(
    model: nn.Module, input_ids: Any, attention_mask: Any, max_new_tokens: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a transformers causal LM (nn.Module), got {type(model).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be [batch, seq] with batch, seq >= 1, got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device, _ = _model_device_dtype(model)
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device}, the model on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a tensor or None")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the "
                f"shape of input_ids {tuple(input_ids.shape)}"
            )
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the model on {device}")
    return input_ids.long(), attention_mask


def _to_left_padding(
    ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool, bool]:
    """Check the padding mask and make it left padding.

    Returns ``(ids, mask, padded, rolled)``: ``padded`` whether any position is masked,
    ``rolled`` whether some row had pads after its tokens, in which case every row of
    ``ids`` and ``mask`` is rotated so that its trailing pads come first (a row
    ``[a, b, c, 0, 0]`` becomes ``[0, 0, a, b, c]``; rows without trailing pads are left
    as they are). One host read (the call's only one before decoding).

    Raises:
        ValueError: a row of ``mask`` is all zeros, or has zeros between its ones.
    """
    if mask is None:
        return ids, None, False, False
    batch, seq = mask.shape
    on = mask != 0
    count = on.sum(-1)
    col = torch.arange(seq, device=mask.device)
    first = torch.where(on, col, seq).min(-1).values
    last = torch.where(on, col, -1).max(-1).values
    empty = count == 0
    hole = ~empty & (last - first + 1 != count)
    trailing = torch.where(empty, 0, seq - 1 - last)
    flags = torch.stack([(count == seq).all(), empty.any(), hole.any(), (trailing > 0).any()])
    full, any_empty, any_hole, any_trailing = flags.tolist()  # the one host sync
    if any_empty:
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask row(s) {rows} are all zeros: every row needs at least one prompt token"
        )
    if any_hole:
        rows = hole.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask row(s) {rows} have zeros between ones: sk.generate "
            f"takes left or right padding only (each row's ones contiguous)"
        )
    if full:
        return ids, mask, False, False
    if not any_trailing:
        return ids, mask, True, False
    idx = (col[None] - trailing[:, None]) % seq  # output slot j reads slot j - trailing
    return ids.gather(1, idx), mask.gather(1, idx), True, True


def _eos_ids(eos_token_id: Any) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(
            f"eos_token_id must be an int >= 0 or a list of them, got {eos_token_id!r}"
        )
    return ids


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def _new_session(
    model: nn.Module, spec: str, batch: int, capacity: int, device: torch.device
) -> _Session:
    from ..kv_cache import kv_cache as make_cache

    cache = make_cache(model, spec, max_cache_len=capacity, batch_size=batch, device=device)
    tok = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    pos = torch.zeros(batch, 1, dtype=torch.int64, device=device)
    return _Session(cache=cache, tok=tok, pos=pos)


def _get_session(model: nn.Module, key: tuple[Any, ...], build: Callable[[], _Session]) -> _Session:
    with _lock:
        store = _sessions(model)
        sess = store.get(key)
        if sess is not None:
            store.move_to_end(key)
            return sess
    sess = build()
    with _lock:
        store[key] = sess
        while len(store) > MAX_SESSIONS:
            store.popitem(last=False)
    return sess


def _set_host_lengths(cache: Any, n: int) -> None:
    # The layers' host counters are not advanced by graph replays (no Python runs).
    for layer in cache.layers:
        layer.seq_length = n
        layer.deferred = False


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    streamer: Any = None,
    *,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: str | None = None,
    cuda_graph: bool | None = None,
    draft: Any = None,
    num_draft_tokens: int = 4,
    return_stats: bool = False,
) -> Any:
    """Generate up to ``max_new_tokens`` tokens per row, fast (see the module docstring).

    Greedy output equals ``model.generate(input_ids, attention_mask=..., do_sample=False,
    max_new_tokens=...)`` of the same patched model: the decode step is the model's own
    forward over the same cache format and cache length that the patched
    ``model.generate`` allocates (prompt + ``max_new_tokens`` slots), hence the same
    kernels with the same shapes.

    Args:
        model: a transformers causal LM whose attention runs through
            ``AttentionInterface`` (Llama, Mistral, Qwen2/3, SmolLM ...), patched or not. It
            runs the sentinel attention for the call (switched back afterwards if it was
            not).
        input_ids: int64 ``[B, S]`` (or ``[S]``) on the model's device.
        attention_mask: ``[B, S]`` 0/1; None = no padding. Left padding (zeros before each
            row's tokens) and right padding (zeros after them, the default of most
            tokenizers; also both at once) give each row the tokens it gets alone: a
            right-padded batch is rolled to left padding internally (one gather). Each
            row's ones must be contiguous and non-empty.
        max_new_tokens: tokens to generate per row (fewer when every row hit an EOS).
        do_sample, temperature, top_k, top_p: greedy when ``do_sample`` is False, else a
            sample of the filtered softmax (:func:`.sampling.sample_next`).
        eos_token_id: an id or ids ending a row; after it the row gets ``pad_token_id``,
            and generation stops when all rows ended. None: the model's
            ``generation_config.eos_token_id`` (as ``model.generate``); ``[]``: never stop
            early (always ``max_new_tokens``).
        pad_token_id: filler after a row's EOS; default ``generation_config.pad_token_id``,
            else the first EOS id.
        streamer: a transformers streamer (``put``/``end``), batch 1 only; it receives the
            prompt, then each token (one host sync per token).
        generator: random source for sampling (on the model's device).
        kv_cache: cache format override (``"dense"``, ``"int8"``, ``"int4"``,
            ``"lowrank:r"``); default: the patch's ``kv_cache`` option, else dense.
        cuda_graph: capture the decode step (default: on CUDA devices).
        draft, num_draft_tokens: speculative decoding
            (:mod:`sentinel_kernels.generate.speculative`): ``"ngram"`` (prompt lookup),
            ``"early_exit:L"`` (the model's first ``L`` layers) or a draft model with the
            same vocabulary; up to ``num_draft_tokens`` drafts per step, adapted to the
            acceptance. The verification (one graph per ``k``) and the drafters' forwards
            are CUDA graphs on a GPU; greedy output equals the
            non-speculative greedy output up to float rounding of the ``k + 1``-token
            verification forward (bit-equal in float32 in the tests).
        return_stats: also return a dict of statistics (speculative decoding: steps,
            acceptance rate, mean accepted drafts per row and step, final ``k``).

    Returns:
        int64 ``[B, S + n]``: the caller's ``input_ids`` unchanged followed by the ``n <=
        max_new_tokens`` new tokens (and the statistics dict when ``return_stats``), so
        ``out[:, S:]`` are the new tokens whatever the padding side. With right padding a
        row's pads stay between its prompt and its new tokens (drop them with the mask, or
        decode ``out[:, S:]``). A streamer receives the caller's ``input_ids``, too.

    Raises:
        ValueError: bad shapes, devices or arguments (the message says which); an
            ``attention_mask`` row that is all zeros or has zeros between ones (e.g.
            ``[1, 0, 1]``).
        TypeError: ``input_ids`` not an integer tensor, ``model`` not a module.
        NotImplementedError: the model cannot run the sentinel attention.
    """
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    check_sampling_args(do_sample, temperature, top_k, top_p)
    caller_ids = input_ids
    input_ids, attention_mask, padded, rolled = _to_left_padding(input_ids, attention_mask)
    device, _ = _model_device_dtype(model)
    gen_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_config, "eos_token_id", None)
    eos_ids = _eos_ids(eos_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("a streamer takes batch 1 only (transformers' streamers do too)")
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")

    from ..nn import attention as sk_attention

    previous_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    spec = kv_cache if kv_cache is not None else _patched_spec(model)
    if previous_impl != sk_attention.ATTN_IMPLEMENTATION:
        ok, reason = sk_attention.supports_sentinel_attention(model)
        if not ok:
            raise NotImplementedError(f"sk.generate needs the sentinel attention: {reason}")
        sk_attention.register()
        sk_attention._set_implementation(model, sk_attention.ATTN_IMPLEMENTATION)
    try:
        with torch.inference_mode():
            if draft is not None:
                from .speculative import speculative_generate

                out, stats = speculative_generate(
                    model,
                    input_ids,
                    attention_mask,
                    max_new_tokens,
                    do_sample,
                    temperature,
                    top_k,
                    top_p,
                    eos,
                    pad_token_id,
                    streamer,
                    generator,
                    spec,
                    draft,
                    num_draft_tokens,
                    device,
                    graphs=use_graph,
                    session=lambda key, build: _get_session(
                        model, ("speculative", _fingerprint(model), *key), build
                    ),
                    padded=padded,
                    shown_prompt=caller_ids,
                )
            else:
                out = _run(
                    model,
                    input_ids,
                    attention_mask,
                    max_new_tokens,
                    do_sample,
                    temperature,
                    top_k,
                    top_p,
                    eos,
                    pad_token_id,
                    streamer,
                    generator,
                    spec,
                    use_graph,
                    device,
                    padded=padded,
                    shown_prompt=caller_ids,
                )
                stats = {}
            if rolled:  # the caller's (right-padded) prompt in front of the new tokens
                out[:, : caller_ids.shape[1]] = caller_ids
            return (out, stats) if return_stats else out
    finally:
        if previous_impl != sk_attention.ATTN_IMPLEMENTATION and previous_impl is not None:
            # kv_cache() switched an unpatched model to the sentinel attention: undo
            sk_attention._set_implementation(model, previous_impl)


def _run(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    max_new: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos: torch.Tensor | None,
    pad_id: int,
    streamer: Any,
    generator: Any,
    spec: str,
    use_graph: bool,
    device: torch.device,
    *,
    padded: bool | None = None,
    shown_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode loop over a left-padded (or unpadded) batch. ``padded``: whether ``mask``
    has zeros (computed here when None: one host sync); ``shown_prompt``: what the streamer
    gets as the prompt (default ``ids``)."""
    batch, prompt = ids.shape
    capacity = prompt + max_new
    if padded is None:
        # One host sync per call (before any decoding): padded batches need the key mask.
        padded = mask is not None and not bool((mask != 0).all())
    from ..kv_cache import parse_spec

    spec = str(parse_spec(spec))
    key = (_fingerprint(model), spec, batch, capacity, padded, use_graph, device)
    sess = _get_session(model, key, lambda: _new_session(model, spec, batch, capacity, device))
    sess.keepalive = [getattr(model, "_sentinel_patch_state", None)]
    cache = sess.cache
    cache.reset()
    cache.set_static_key_mask(None)
    extra: dict[str, Any] = {"use_cache": True, **cache_kwargs(model, cache)}
    if accepts(model.forward, "logits_to_keep"):
        extra["logits_to_keep"] = 1

    if mask is not None:
        pos = mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 0)
    else:
        pos = torch.arange(prompt, device=device)[None].expand(batch, -1)

    if streamer is not None:
        streamer.put((ids if shown_prompt is None else shown_prompt).cpu())
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
    tok = sample_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
    del out
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
        return o.logits[:, -1]

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
        if sess.graph is not None:
            sess.graph.replay()
            logits = sess.logits
        else:
            logits = step()
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if finished is not None:
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


def _trim_finished(new: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Cut the columns after the step at which the last row emitted an EOS (what
    transformers' ``generate`` returns: it stops once every row has finished)."""
    hit = torch.isin(new, eos)
    n = new.shape[1]
    idx = torch.arange(n, device=new.device).expand_as(new)
    first = torch.where(hit, idx, torch.full_like(idx, n)).min(dim=1).values  # n = none
    last = int(first.max().item())  # one sync, after decoding
    return new if last >= n else new[:, : last + 1]

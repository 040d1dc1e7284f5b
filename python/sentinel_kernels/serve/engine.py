"""The continuous-batching engine: many requests share one patched model, step by step.

Iteration-level scheduling (Yu et al. 2022, "Orca"; vLLM's continuous batching): a
background thread repeats one *step*:

1. take back the slots of cancelled requests; drop cancelled waiting requests;
2. admit waiting requests in arrival order (FCFS) while slots are free, each to the
   lowest free slot. A lone arrival on an idle engine may wait ``max_wait_ms`` for company
   (the batching window), so that a burst is prefilled together rather than one by one;
   with a backlog (more waiting than free slots) admission waits until a quarter of the
   slots (at most a prefill batch) are free, for the same reason;
3. prefill admitted requests within a budget of ``max_prefill_tokens`` prompt tokens per
   step, whole prompts packed one after another into one forward (on a GPU; each
   prompt attends only to itself) or of similar length batched into one left-padded
   forward; a longer
   prompt is prefilled in chunks of ``max_prefill_tokens`` over several
   steps (chunked prefill), so running requests keep decoding meanwhile. A prompt that
   does not fit in what is left of the step's budget waits for the next step (its chunks
   do not depend on what else was scheduled, so neither do its numerics);
4. decode one token for every running request at once (:class:`.runner.ModelRunner`: a
   CUDA graph per batch bucket on a GPU), pick each row's token (greedy or its own
   sampler), check each row's stop conditions, stream the tokens, free finished slots.
   Once nothing waits or prefills (a workload's tail), running requests in high slots
   move to free low ones whenever that lets the step use a smaller bucket
   (``compact_rows``: a copy of their cache rows on the device, no recomputation).

A step that raises fails only the requests it served (the prefill's request, or every
row of the decode step) with that error; the engine keeps serving.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..knn.lm import scorer_for
from ..nn import attention as sk_attention
from ..nn.rotary_table import rotary_table_scope
from ..patching.apply import patch_report
from .params import SamplingParams
from .prefix_cache import PrefixCache
from .request import (
    Completion,
    EngineShutdownError,
    QueueFullError,
    Request,
    RequestStream,
    batched_wakeups,
)
from .runner import ModelRunner, RowSampling, unpack_step

__all__ = ["Engine"]

Prompt = str | Sequence[int]


#: The default ``multi_step`` with CUDA graphs: decode steps a lone greedy request runs per
#: engine iteration (one graph replay, one token read), as ``sk.generate`` replays graphs
#: of 16 greedy steps; 8 bounds a new arrival's wait by the two runs already launched.
MULTI_STEP = 8


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return frozenset(ids)


def check_prompt_ids(prompt: Sequence[int], vocab_size: int) -> list[int]:
    """``prompt`` as a list of token ids, checked: ints (not bools), at least one, each in
    ``[0, vocab_size)``.

    Raises:
        TypeError: not a sequence of ints. ValueError: empty, or ids outside the
            vocabulary.
    """
    if not isinstance(prompt, Sequence) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        raise TypeError(f"a prompt must be text or a sequence of token ids, got {prompt!r:.80}")
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def check_fits(prompt_tokens: int, max_tokens: int, max_seq_len: int) -> None:
    """Raise ``ValueError`` when a prompt of ``prompt_tokens`` plus ``max_tokens`` new
    tokens does not fit ``max_seq_len`` (prompts are never truncated)."""
    if prompt_tokens + max_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds "
            f"max_seq_len {max_seq_len} (prompts are never truncated): shorten the prompt, "
            "lower max_tokens or start the engine with a larger max_seq_len"
        )


def _logprob_rows(reqs: Sequence[Request | None]) -> tuple[list[int], int]:
    """The rows of a step (``reqs``, None where no request) whose requests asked for
    logprobs, and the most alternatives any of them asked for (decided on the host from
    the step's requests, before the step)."""
    ns = [None if r is None else r.params.logprobs for r in reqs]
    rows = [i for i, v in enumerate(ns) if v is not None]
    return rows, max((ns[i] or 0 for i in rows), default=0)


@dataclass(slots=True)
class _Prefill:
    """A launched prefill: its group of requests and prompt pieces, the requests whose
    prompt it completes (``done``) and their first tokens on their way to the host
    (``event``: when they are there; None when already there or nothing was picked)."""

    group: list[Request]
    prompts: list[Any]
    done: list[Request]
    host: torch.Tensor | None
    event: Any
    lp_rows: list[int]
    k: int


@dataclass(slots=True)
class _Step:
    """A launched decode step: its rows' requests by slot, and its tokens (with the
    logprobs of rows ``lp_rows``, ``k`` alternatives) on their way to the host
    (``event``: when they are there; None when already there); ``n`` rows picked."""

    rows: dict[int, Request]
    host: torch.Tensor
    event: Any
    n: int
    lp_rows: list[int]
    k: int
    #: > 1: a :meth:`ModelRunner.decode_multi` run, ``steps`` tokens of its one row
    steps: int = 1


class _PhaseClock:
    """The GPU time of the engine loop's prefill and decode launches, from CUDA events
    recorded on the stream around them: per iteration, ``prefill`` is the stream time from
    before the prefills' launches to after them, ``decode`` from there to after the decode
    step's launch (its pick and token copy included). Each includes any wait of the GPU
    for the host inside that span; what is left of the busy wall time is the GPU waiting
    between iterations. Events are read with ``query`` only (never a sync), once the last
    of an iteration's three has been reached."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, Any, Any]] = deque()
        self._free: list[Any] = []  # events already read, recorded again by mark()
        self.prefill_s = 0.0
        self.decode_s = 0.0
        # host time inside the prefill launches (steps with prefills): set against
        # prefill_s, it tells the GPU's own prefill time from its waits for the host
        self.host_prefill_s = 0.0
        self.iterations = 0

    def mark(self) -> Any:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: Any, mid: Any, end: Any) -> None:
        self._pending.append((start, mid, end))
        while self._pending and self._pending[0][2].query():
            a, b, c = self._pending.popleft()
            self.prefill_s += a.elapsed_time(b) / 1e3
            self.decode_s += b.elapsed_time(c) / 1e3
            self.iterations += 1
            self._free += (a, b, c)


class Engine:
    """Continuous batching over one model (``from sentinel_kernels.serve import Engine``).

    ``Engine(model, tokenizer, max_slots=64, max_seq_len=4096, max_prefill_tokens=2048,
    max_wait_ms=2.0)`` allocates the cache of the model's patch level for ``max_slots``
    requests of up to ``max_seq_len`` tokens (prompt + output), captures the decode graphs
    (GPU), and starts the engine thread. :meth:`submit` returns a
    :class:`~.request.RequestStream` at once; :meth:`generate` runs a list of prompts to the
    end. Use it as a context manager or call :meth:`shutdown`.

    While the engine runs it owns the model: it switches it to the sentinel attention
    (switched back by :meth:`shutdown`), and other calls on the model (``sk.generate``,
    ``model.generate``) must wait until it is shut down.

    Args:
        model: a transformers causal LM, patched (``sk.patch_model``) or not; the cache
            format is the patch's ``kv_cache`` option (dense when unpatched), unless
            ``kv_cache`` is given.
        tokenizer: the model's tokenizer: needed for ``str`` prompts and for the text of
            the outputs (stop strings too); ``None`` serves token ids only.
        max_slots: requests decoded at once (the maximum batch size).
        max_seq_len: prompt + ``max_tokens`` limit of a request (cache positions per slot).
        max_prefill_tokens: prompt tokens prefilled per forward (the chunk size of long
            prompts, the width of a packed prefill); one step runs prefill forwards of up
            to ``max_prefill_forwards * max_prefill_tokens`` tokens in all.
        max_wait_ms: how long a request arriving at an idle engine waits for others
            before its prefill starts.
        max_queued: waiting requests at most; :meth:`submit` raises
            :class:`~.request.QueueFullError` beyond.
        kv_cache: cache format override (``"dense"``, ``"int8"``, ``"int4"``,
            ``"lowrank:r"``).
        cuda_graph: capture the decode steps (default: on CUDA devices).
        prefix_cache_tokens: cache prompt prefixes in ``prefix_cache_tokens //
            max_seq_len`` extra rows of the cache (at least one; 0: off), in blocks of
            ``prefix_block`` tokens (:mod:`.prefix_cache`): a prompt that starts with a
            stored prefix copies its KV and prefills only the rest. Needs the dense KV
            cache, where prefilling the rest over the stored past gives bit-for-bit the
            logits of a whole-prompt prefill; a quantized cache would make the rest read a
            quantized past and change outputs, so it is refused.
        knn, knn_k, knn_lambda, knn_temperature: kNN-LM decoding as in ``sk.generate``
            (a :class:`sentinel_kernels.knn.Datastore` of this model, searching on the
            model's device): every request's next-token distribution is ``lambda * p_kNN +
            (1 - lambda) * p_LM``, inside the prefill and decode graphs on a GPU.
        prefill_graphs: with ``cuda_graph``, also capture prefill graphs for batches of
            up to ``4 * max_prefill_tokens`` padded tokens (default: on); start-up then
            takes longer (one capture, and autotuning, per size).
        multi_step: decode steps per engine iteration while one greedy request without
            logprobs runs alone in slot 0 and nothing waits or prefills (multi-step
            scheduling: one graph replay and one token read per ``multi_step`` tokens,
            which reach its stream together; tokens after its end are dropped). Default
            :data:`MULTI_STEP` (8) with CUDA graphs, 1 (off) without.
        packed_prefill: prefill the whole prompts admitted in one step packed one after
            another in one row (positions restart per prompt, each prompt's queries
            see only its own keys, each position stored straight into its slot), up to
            ``max_prefill_tokens`` tokens and 16 prompts per forward, instead of
            left-padded to the longest prompt: the prefill computes the real tokens
            only (with prefill graphs, rounded up to a width of
            :func:`.runner.packed_widths`). Default on (``bench/bench_engine.py`` on a
            GPU; ``bench/bench_packed_prefill.py`` on the CPU: 1.58x the left-padded
            prefill on a burst of chat-length prompts). Ignored where the cache format or the
            model cannot take it (KIVI, a ring, low rank, kNN-LM, no
            ``logits_to_keep``: :meth:`.runner.ModelRunner.packing_applies`).
        max_prefill_forwards: one step prefills up to ``max_prefill_forwards *
            max_prefill_tokens`` prompt tokens, in forwards of up to
            ``max_prefill_tokens`` each (default 1). More lets a burst of arrivals reach
            its first tokens in fewer steps, each of which also decodes every running
            request (SGLang's split of ``chunked_prefill_size`` and
            ``max_prefill_tokens`` is the same idea); the running requests then wait
            longer between their tokens during the burst. A long prompt still prefills
            one chunk per step.
        compact_rows: once nothing waits or prefills (the tail of a workload), move
            running requests from high slots to free lower ones whenever that lets the
            decode steps run a smaller batch bucket (:meth:`.runner.ModelRunner.move`: a
            copy of their cache rows, on the device). Without it a request left in slot
            63 keeps every step at the 64-row bucket until it ends, and a last request
            outside slot 0 never gets ``multi_step``. Default on.

    Raises:
        TypeError, ValueError: bad arguments. NotImplementedError: the model cannot run the
        sentinel attention.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        max_slots: int = 64,
        max_seq_len: int = 4096,
        max_prefill_tokens: int = 2048,
        max_wait_ms: float = 2.0,
        max_queued: int = 1024,
        *,
        kv_cache: str | None = None,
        cuda_graph: bool | None = None,
        prefill_graphs: bool = True,
        prefix_cache_tokens: int = 0,
        prefix_block: int = 16,
        knn: Any = None,
        knn_k: int = 32,
        knn_lambda: float = 0.25,
        knn_temperature: float = 1.0,
        multi_step: int | None = None,
        packed_prefill: bool | None = None,
        max_prefill_forwards: int = 1,
        compact_rows: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        self.max_slots = _check_int("max_slots", max_slots, 1)
        self.max_seq_len = _check_int("max_seq_len", max_seq_len, 2)
        self.max_prefill_tokens = _check_int("max_prefill_tokens", max_prefill_tokens, 1)
        self.max_prefill_forwards = _check_int("max_prefill_forwards", max_prefill_forwards, 1)
        self.max_queued = _check_int("max_queued", max_queued, 1)
        if multi_step is not None:
            multi_step = _check_int("multi_step", multi_step, 1)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)):
            raise TypeError(f"max_wait_ms must be a number, got {max_wait_ms!r}")
        if not 0 <= max_wait_ms < float("inf"):
            raise ValueError(f"max_wait_ms must be >= 0 and finite, got {max_wait_ms}")
        self.max_wait_s = float(max_wait_ms) / 1000.0
        if not isinstance(compact_rows, bool):
            raise TypeError(f"compact_rows must be a bool, got {type(compact_rows).__name__}")
        self.compact_rows = compact_rows
        self.model = model
        self.tokenizer = tokenizer
        self.device = _model_device(model)
        use_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if use_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        packed = packed_prefill is None or bool(packed_prefill)
        #: Decode steps per iteration for a lone greedy request (1: one step per iteration).
        self.multi_step = multi_step if multi_step is not None else (MULTI_STEP if use_graph else 1)
        get_embed: Any = getattr(model, "get_input_embeddings", None)
        embed = get_embed() if callable(get_embed) else None
        self.vocab_size = int(getattr(embed, "num_embeddings", 0)) or int(
            getattr(model.config, "vocab_size", 0)
        )
        report = patch_report(model)
        spec = kv_cache or (report.options.get("kv_cache") if report is not None else None)
        self.kv_spec = str(spec) if spec else "dense"
        self._eos = _eos_ids(model, tokenizer)
        prefix_cache_tokens = _check_int("prefix_cache_tokens", prefix_cache_tokens, 0)
        prefix_block = _check_int("prefix_block", prefix_block, 1)
        if prefix_cache_tokens and self.kv_spec != "dense":
            raise ValueError(
                f"the prefix cache needs the dense KV cache, not {self.kv_spec!r}: a prompt "
                "prefilled over a quantized stored prefix reads quantized keys, which would "
                "change its outputs"
            )
        if prefix_cache_tokens and prefix_block >= self.max_seq_len:
            raise ValueError(f"prefix_block ({prefix_block}) must be < max_seq_len")
        prefix_rows = max(1, prefix_cache_tokens // self.max_seq_len) if prefix_cache_tokens else 0
        scorer = (
            scorer_for(model, self.device, knn, knn_k, knn_lambda, knn_temperature)
            if knn is not None
            else None
        )
        #: What besides the model and the cache format changes the outputs (the server's
        #: result-cache key).
        self.output_setting = self.kv_spec
        if scorer is not None:
            self.output_setting += (
                f"+knn({id(knn)},k={scorer.k},lambda={scorer.lam},T={scorer.temperature})"
            )

        self._previous_impl = getattr(model.config, "_attn_implementation", None)
        if self._previous_impl != sk_attention.ATTN_IMPLEMENTATION:
            ok, reason = sk_attention.supports_sentinel_attention(model)
            if not ok:
                raise NotImplementedError(f"the engine needs the sentinel attention: {reason}")
            sk_attention.register()
            sk_attention._set_implementation(model, sk_attention.ATTN_IMPLEMENTATION)
        try:
            # every position the engine runs is below max_seq_len: the rotary tables apply
            with torch.inference_mode(), rotary_table_scope(self.max_seq_len):
                self._runner = ModelRunner(
                    model,
                    self.kv_spec,
                    self.max_slots,
                    self.max_seq_len,
                    self.device,
                    use_graph,
                    # A batch of prompts within the budget pads to < 2x rows and 2x width.
                    4 * self.max_prefill_tokens if prefill_graphs else 0,
                    prefix_rows,
                    scorer,
                    self.max_prefill_tokens if prefill_graphs else 0,
                    self.multi_step,
                    packed_tokens=self.max_prefill_tokens if packed else 0,
                )
        except BaseException:
            self._restore_attention()
            raise

        self._prefix = (
            PrefixCache(self._runner.prefix_rows, prefix_block, self.max_seq_len - 1)
            if prefix_rows
            else None
        )
        self._cond = threading.Condition()
        self._inflight: _Step | None = None  # the decode step launched, not yet read
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._running: dict[int, Request] = {}
        self._free: list[int] = list(range(self.max_slots))
        heapq.heapify(self._free)
        self._closing = False
        #: With more requests waiting than free slots, admit once this many slots are free.
        #: 4: on an H200 (SmolLM2 shape, bench_engine's workload) 4 gave 24.3k tok/s, 16
        #: 22.8k and 64 16.5k (scripts/engine_step_probe.py --admit-rows): idle slots cost
        #: more than the extra prefill forwards.
        self._admit_batch = max(1, min(4, self._runner.stage_rows, self.max_slots // 4))
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
        self._counters = {
            "steps": 0,
            "decode_steps": 0,
            "prefill_chunks": 0,
            "multi_steps": 0,
            "compactions": 0,
            "moved_rows": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "generated_tokens": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "rejected": 0,
            "prefix_hit_tokens": 0,
        }
        self._started = time.perf_counter()
        self._clock = _PhaseClock() if self.device.type == "cuda" else None
        self._marks: list[Any] = []
        #: Called with the number of rows after every decode step (metrics), or None.
        self.step_observer: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="sentinel-engine", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        block: bool = False,
        observer: Callable[[Request], None] | None = None,
    ) -> RequestStream:
        """Queue a request and return its stream at once.

        Args:
            prompt: text (tokenized with the engine's tokenizer, special tokens added as it
                does) or token ids.
            params: :class:`~.params.SamplingParams` (default: 16 tokens, temperature 1).
            request_id: a name for logs and results (default ``"req-<n>"``).
            block: wait for room instead of raising when the queue is full.
            observer: called with the engine-side request after each change (admission,
                each token, the end), in the engine thread, within the step's
                :func:`~.request.batched_wakeups` block; the engine process uses it to
                forward its requests (:mod:`.remote`). It must be quick and not block.

        Raises:
            ValueError: an empty prompt, token ids outside the vocabulary, or a prompt longer
                than ``max_seq_len - max_tokens`` (never truncated).
            TypeError: a prompt that is neither text nor a sequence of ints, or text
                without a tokenizer.
            QueueFullError: ``max_queued`` requests are waiting (and ``block`` is False).
            EngineShutdownError: the engine was shut down.
        """
        params = SamplingParams(max_tokens=16) if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        check_fits(len(ids), params.max_tokens, self.max_seq_len)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self._eos
        )
        req = Request(rid, ids, params, self.tokenizer, stop_ids, self._wake)
        req.observer = observer
        if not params.greedy:
            seed = params.seed
            if seed is None:
                with self._cond:
                    seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._cond:
            while True:
                if self._closing:
                    raise EngineShutdownError("the engine is shut down")
                if len(self._waiting) < self.max_queued:
                    break
                if not block:
                    self._counters["rejected"] += 1
                    raise QueueFullError(
                        f"{len(self._waiting)} requests are waiting (max_queued="
                        f"{self.max_queued}); retry later"
                    )
                self._cond.wait()
            self._waiting.append(req)
            self._cond.notify_all()
        return RequestStream(req)

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[Completion]:
        """Run every prompt to the end; the :class:`~.request.Completion` s in input order.

        ``params`` is one :class:`~.params.SamplingParams` for all or one per prompt.
        ``progress`` shows a progress bar over finished requests (tqdm). Waits for room
        when the queue is full. Errors as :meth:`submit` (checked for every prompt before
        any is queued) and :class:`~.request.RequestFailedError` for a failed request.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of prompts (text or token id lists)")
        if params is None or isinstance(params, SamplingParams):
            plist = [params] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise ValueError(f"{len(plist)} params for {len(prompts)} prompts")
        for p, sp in zip(prompts, plist, strict=True):  # all checked before any is queued
            ids = self._prompt_ids(p)
            check_fits(len(ids), 16 if sp is None else sp.max_tokens, self.max_seq_len)
        streams = [self.submit(p, sp, block=True) for p, sp in zip(prompts, plist, strict=True)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(streams), desc="engine", unit="req")
        try:
            out = []
            for s in streams:
                out.append(s.result())
                if bar is not None:
                    bar.update(1)
            return out
        finally:
            if bar is not None:
                bar.close()

    def stats(self) -> dict[str, Any]:
        """A snapshot: ``running``, ``prefilling``, ``waiting``, ``free_slots``,
        ``max_slots``, ``max_prefill_tokens``, ``max_prefill_forwards``, ``steps`` (engine
        iterations that did work), ``decode_steps``,
        ``prefill_chunks`` (prefill forwards), ``multi_steps`` (iterations that ran
        ``multi_step`` steps of a lone request), ``compactions`` / ``moved_rows`` (times
        running requests moved down to free slots, and how many moved; ``compact_rows``),
        ``prefill_tokens``, ``decode_tokens`` (rows of
        decode steps), ``generated_tokens`` (new tokens, the first ones from prefills
        included), ``finished``,
        ``cancelled``, ``failed``, ``rejected`` (queue full), ``kv_cache`` (format),
        ``graph_buckets``, ``prefill_graphs`` (captured prefill sizes, packed or not),
        ``packed_width`` (positions of a packed prefill; 0: prompts are left-padded),
        ``prefill_graph_replays``, ``prefill_computed_tokens`` (prompt positions the prefill
        forwards computed, pads included; ``prefill_tokens`` counts the real ones),
        ``short_row_steps`` (decode steps whose rows were all
        short enough for the short-rows attention plan, :data:`.runner.SHORT_ROW_KEYS`),
        ``masked_steps`` (decode steps that read the slot key mask because a decoding row
        has pads; with packed prefill none do, :meth:`.runner.ModelRunner.step_needs_mask`),
        ``prefix_hit_tokens`` (prompt tokens taken from the
        prefix cache), ``prefix_cache`` (its :meth:`~.prefix_cache.PrefixCache.stats`, or
        None when off), ``gpu_prefill_s`` / ``gpu_decode_s`` (on a GPU: the stream time of
        the loop's prefill and decode launches so far, read from CUDA events once reached,
        see :class:`_PhaseClock`; None on the CPU), ``host_prefill_s`` (on a GPU: the host
        time of the steps' prefill launches, the share of ``gpu_prefill_s`` the GPU may have
        spent waiting for the host), ``uptime_s``."""
        with self._cond:
            return {
                "running": len(self._running),
                "prefilling": len(self._prefilling),
                "waiting": len(self._waiting),
                "free_slots": len(self._free),
                "max_slots": self.max_slots,
                "max_prefill_tokens": self.max_prefill_tokens,
                "max_prefill_forwards": self.max_prefill_forwards,
                **self._counters,
                "kv_cache": self.kv_spec,
                "graph_buckets": self._runner.graph_buckets,
                "prefill_graphs": len(self._runner.prefill_buckets)
                + len(self._runner.packed_buckets),
                "packed_width": self._runner.pack_width,
                "prefill_graph_replays": self._runner.prefill_replays,
                "prefill_computed_tokens": self._runner.prefill_computed_tokens,
                "chunk_graphs": len(self._runner.chunk_widths),
                "chunk_graph_replays": self._runner.chunk_replays,
                "short_row_steps": self._runner.short_steps,
                "masked_steps": self._runner.masked_steps,
                "prefix_cache": self._prefix.stats() if self._prefix is not None else None,
                "gpu_prefill_s": None if self._clock is None else self._clock.prefill_s,
                "gpu_decode_s": None if self._clock is None else self._clock.decode_s,
                "host_prefill_s": None if self._clock is None else self._clock.host_prefill_s,
                "uptime_s": time.perf_counter() - self._started,
            }

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The token ids that end a request (unless ``ignore_eos``): the model's
        ``generation_config`` / config EOS ids and the tokenizer's."""
        return self._eos

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._closing

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine: unfinished requests end as ``"cancelled"``, the thread stops,
        the model gets its attention implementation back. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._restore_attention()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- internals ----------------------------------------------------------------------

    def _restore_attention(self) -> None:
        prev = self._previous_impl
        if prev is not None and prev != sk_attention.ATTN_IMPLEMENTATION:
            sk_attention._set_implementation(self.model, prev)
            self._previous_impl = sk_attention.ATTN_IMPLEMENTATION

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("a text prompt needs a tokenizer: Engine(model, tokenizer)")
            return check_prompt_ids(self.tokenizer(prompt)["input_ids"], self.vocab_size)
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point():
                raise TypeError(
                    f"a tensor prompt must be 1-D token ids, got {prompt.dtype} "
                    f"{tuple(prompt.shape)}"
                )
            return check_prompt_ids(prompt.tolist(), self.vocab_size)
        return check_prompt_ids(prompt, self.vocab_size)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _free_slot(self, req: Request) -> None:
        """Give ``req``'s slot back (engine thread, lock held)."""
        if req.slot is not None:
            self._runner.release(req.slot)
            heapq.heappush(self._free, req.slot)
            self._running.pop(req.slot, None)
            req.slot = None
        if req in self._prefilling:
            self._prefilling.remove(req)
        self._cond.notify_all()

    def _emit(self, req: Request, token: int, now: float, logprobs: Any) -> None:
        """Hand ``token`` to ``req`` (engine thread, lock held); a request that finishes by
        it frees its slot, and one whose hand-over raises fails alone."""
        try:
            finished = req.emit(token, now, logprobs)
        except Exception as exc:  # one request's failure never stops the engine loop
            self._end(req, None, exc)
            return
        if finished:
            self._end(req, "stop")

    def _end(self, req: Request, reason: str | None, error: BaseException | None = None) -> None:
        """Finish, cancel or fail ``req`` and free its slot (engine thread, lock held)."""
        self._free_slot(req)
        if error is not None:
            req.fail(error)
            self._counters["failed"] += 1
        elif reason == "cancelled":
            req.finish("cancelled")
            self._counters["cancelled"] += 1
        else:
            self._counters["finished"] += 1

    def _schedule(self) -> bool:
        """Cancellations and admissions (lock held). Returns whether there is work."""
        for req in [r for r in self._waiting if r.cancel_requested]:
            self._waiting.remove(req)
            req.finish("cancelled")
            self._counters["cancelled"] += 1
        for req in [r for r in (*self._prefilling, *self._running.values()) if r.cancel_requested]:
            self._end(req, "cancelled")
        if self._waiting and self._free:
            idle = not self._running and not self._prefilling
            oldest = self._waiting[0].timings.arrival
            room = min(len(self._free), self.max_slots)
            if idle and len(self._waiting) < room:
                wait = oldest + self.max_wait_s - time.perf_counter()
                if wait > 0:  # the batching window: a lone arrival waits for company
                    self._cond.wait(wait)
                    return self._schedule()
            backlog = len(self._waiting) > len(self._free)
            if not idle and backlog and len(self._free) < self._admit_batch:
                # A backlog: let slots gather so that their prompts share one prefill
                # forward (each forward has a fixed host cost) instead of one each.
                return bool(self._prefilling or self._running)
            now = time.perf_counter()
            with batched_wakeups():
                while self._waiting and self._free:
                    req = self._waiting.popleft()
                    req.slot = heapq.heappop(self._free)
                    req.timings.admitted = now
                    self._prefilling.append(req)
                    if req.observer is not None:
                        req.observer(req)
            self._cond.notify_all()  # room in the queue for blocked submitters
        return bool(self._prefilling or self._running)

    def _compact(self) -> None:
        """Move running requests down to free slots when the decode bucket can shrink
        (engine thread, lock held; nothing waits or prefills, so no admission needs the
        low slots). The rows move on the device after the steps already launched; the
        in-flight step keeps its own rows by old slot, and its tokens go to their
        requests as before."""
        if not self._running:
            return
        runner = self._runner
        target = runner.bucket_for(len(self._running))
        if runner.bucket_for(max(self._running) + 1) <= target:
            return
        movers = sorted(s for s in self._running if s >= target)
        holes = sorted(f for f in self._free if f < target)[: len(movers)]
        if len(holes) < len(movers):  # cannot happen while slots and free agree
            return
        n = 0
        for s in movers:
            req = self._running[s]
            stored = len(req.prompt_ids) + len(req.token_ids) + req.pending - 1
            n = max(n, runner.row_offset[s] + stored)
        try:
            runner.move(movers, holes, n)
        except Exception as exc:  # the rows may be half moved: fail the movers only
            for s in movers:
                self._end(self._running[s], None, exc)
            for d in holes:  # and empty the free rows they may have been copied to
                runner.release(d)
            return
        for s, d in zip(movers, holes, strict=True):
            req = self._running.pop(s)
            req.slot = d
            self._running[d] = req
        self._free = sorted((set(self._free) - set(holes)) | set(movers))
        self._counters["compactions"] += 1
        self._counters["moved_rows"] += len(movers)

    def _loop(self) -> None:
        with torch.inference_mode(), rotary_table_scope(self.max_seq_len):
            while True:
                with self._cond:
                    if self._closing:
                        self._cancel_all()
                        return
                    if not self._schedule():
                        self._cond.wait(0.5)
                        continue
                    if self.compact_rows and not self._waiting and not self._prefilling:
                        self._compact()
                    prefill = list(self._prefilling)
                    running = dict(self._running)
                    alone = not prefill and not self._waiting
                clock = self._clock
                host_t0 = time.perf_counter()
                if clock is not None:
                    self._marks = [clock.mark()]
                launched = self._prefill_step(prefill)
                if clock is not None:
                    if prefill:
                        clock.host_prefill_s += time.perf_counter() - host_t0
                    self._marks.append(clock.mark())
                did = self._decode_step(running, alone)
                # The prefills' first tokens are read after the decode step is launched,
                # so the GPU runs that step while the host waits for them and emits them.
                for pre in launched:
                    did |= self._finish_prefill(pre)
                if did:
                    with self._cond:
                        self._counters["steps"] += 1

    def _cancel_all(self) -> None:
        self._inflight = None
        for req in list(self._waiting):
            req.finish("cancelled")
        self._waiting.clear()
        for req in [*self._prefilling, *self._running.values()]:
            self._end(req, "cancelled")

    def _prefill_groups(self, prefilling: list[Request]) -> list[list[Request]]:
        """This step's prefills within the token budget (``max_prefill_forwards *
        max_prefill_tokens``), taken in arrival order: a prompt
        longer than ``max_prefill_tokens`` alone (its next chunk); whole prompts, with
        packed prefill, packed in arrival order into forwards of up to
        ``runner.pack_width`` tokens and ``runner.pack_rows`` prompts; without it, batched
        by similar length into left-padded forwards of up to ``MAX_PREFILL_BATCH`` rows,
        a prompt joining a batch only if its pads leave it room in its slot (pads +
        prompt + ``max_tokens`` <= ``max_seq_len``), the batch stays at least half real
        tokens and its padded size within ``max_prefill_tokens``."""
        budget = self.max_prefill_tokens * self.max_prefill_forwards
        groups: list[list[Request]] = []
        whole: list[Request] = []
        for req in prefilling:
            if req.cancel_requested or req.done or req.slot is None:
                continue
            chunk = min(len(req.prompt_ids) - req.prefilled, self.max_prefill_tokens)
            if chunk > budget:
                break  # FCFS: later prompts do not jump ahead
            budget -= chunk
            if req.prefilled == 0 and len(req.prompt_ids) <= self.max_prefill_tokens:
                whole.append(req)
            else:
                groups.append([req])
        group: list[Request] = []
        # Packed prompts have no pads: take them in arrival order. Left-padded batches
        # group prompts of similar length.
        packed = self._runner.pack_width > 0
        for req in whole if packed else sorted(whole, key=lambda r: len(r.prompt_ids)):
            if group and self._fits(group, req):
                group.append(req)
            else:
                if group:
                    groups.append(group)
                group = [req]
        if group:
            groups.append(group)
        return groups

    def _fits(self, group: list[Request], req: Request) -> bool:
        rows = [*group, req]
        if self._runner.pack_width:
            return self._runner.packs([r.prompt_ids for r in rows])
        if len(rows) > self._runner.stage_rows:
            return False
        width = len(req.prompt_ids)  # the longest: whole prompts come sorted by length
        if len(rows) * width > self.max_prefill_tokens:
            return False
        if 2 * sum(len(r.prompt_ids) for r in rows) < len(rows) * width:
            return False
        return all(width + r.params.max_tokens <= self.max_seq_len for r in rows)

    def _reuse_prefixes(self, prefilling: list[Request]) -> None:
        """Start each newly admitted prompt from the longest stored prefix it begins with."""
        assert self._prefix is not None
        for req in prefilling:
            if req.prefix_checked or req.prefilled or req.slot is None or req.done:
                continue
            req.prefix_checked = True
            with self._cond:  # stats() reads the cache from other threads
                hit = self._prefix.lookup(req.prompt_ids)
            if hit is not None:
                row, n = hit
                self._runner.load_prefix(row, req.slot, n)
                with self._cond:
                    req.prefilled = n
                    self._counters["prefix_hit_tokens"] += n

    def _store_prefix(self, req: Request) -> None:
        """Keep the block-aligned prefix of a prompt just prefilled (lock held)."""
        assert self._prefix is not None and req.slot is not None
        fill = self._prefix.insert(req.prompt_ids)
        if fill is not None:
            self._runner.store_prefix(req.slot, *fill)

    def _prefill_step(self, prefilling: list[Request]) -> list[_Prefill]:
        """Launch this step's prefills (their first tokens are read by
        :meth:`_finish_prefill`)."""
        if self._prefix is not None:
            self._reuse_prefixes(prefilling)
        launched: list[_Prefill] = []
        for group in self._prefill_groups(prefilling):
            launched += self._prefill_group(group)
        return launched

    def _prefill_group(self, group: list[Request]) -> list[_Prefill]:
        """Launch one group's prefill and the sampling of its first tokens; if a batched
        forward raises, each request is retried alone, so that only a request that fails
        by itself fails."""
        slots = [r.slot for r in group]
        start = group[0].prefilled
        if len(group) == 1:
            req = group[0]
            chunk = min(len(req.prompt_ids) - start, self.max_prefill_tokens)
            prompts = [req.prompt_ids[start : start + chunk]]
        else:
            prompts = [r.prompt_ids for r in group]
        try:
            room = min(self.max_seq_len - r.params.max_tokens for r in group)
            logits = self._runner.prefill(slots, prompts, start, room)  # type: ignore[arg-type]
            done = [
                r
                for r, p in zip(group, prompts, strict=True)
                if r.prefilled + len(p) == len(r.prompt_ids)
            ]
            host: torch.Tensor | None = None
            event: Any = None
            lp_rows: list[int] = []
            k = 0
            if done:
                sub = self._runner.select_rows(logits, [group.index(r) for r in done])
                picked = self._runner.pick_device(
                    sub, [self._row_sampling(r) for r in done], keep=False
                )
                lp_rows, k = _logprob_rows(done)
                extra = self._runner.logprobs_device(sub, picked, lp_rows, k) if lp_rows else None
                host, event = self._runner.to_host(picked, extra)
        except Exception as exc:  # fail this request only; keep serving
            if len(group) > 1:
                return [pre for r in group for pre in self._prefill_group([r])]
            with self._cond:
                self._end(group[0], None, exc)
            return []
        return [_Prefill(group, prompts, done, host, event, lp_rows, k)]

    def _finish_prefill(self, pre: _Prefill) -> bool:
        """Read a launched prefill's first tokens; its requests start decoding."""
        tokens: list[int] = []
        lps: dict[int, Any] = {}
        try:
            if pre.event is not None:
                pre.event.synchronize()
            if pre.done:
                assert pre.host is not None
                tokens, lps = unpack_step(pre.host, len(pre.done), pre.lp_rows, pre.k)
        except Exception as exc:
            with self._cond:
                for req in pre.group:
                    self._end(req, None, exc)
            return False
        now = time.perf_counter()
        with self._cond:
            self._counters["prefill_chunks"] += 1
            for req, p in zip(pre.group, pre.prompts, strict=True):
                req.prefilled += len(p)
                self._counters["prefill_tokens"] += len(p)
            for j, (req, token) in enumerate(zip(pre.done, tokens, strict=True)):
                if self._prefix is not None:
                    self._store_prefix(req)
                if req.done:
                    continue
                self._prefilling.remove(req)
                assert req.slot is not None
                self._running[req.slot] = req
                self._counters["generated_tokens"] += 1
                self._emit(req, token, now, lps.get(j))
        return True

    @staticmethod
    def _row_sampling(req: Request) -> RowSampling | None:
        p = req.params
        if p.greedy:
            return None
        return RowSampling(p.temperature, p.top_k, p.top_p, req.generator)

    def _decode_step(self, running: dict[int, Request], alone: bool = False) -> bool:
        """Launch one decode step for the running requests, then read the tokens of the
        step launched before it (pipelined: the host's bookkeeping of step ``i`` overlaps
        the GPU's step ``i + 1``, which feeds step ``i``'s tokens from the device). A row
        whose request turns out finished by step ``i`` (EOS, a stop string) wastes one
        token of step ``i + 1``: it is dropped, and freeing the slot clears the row.

        ``alone`` (nothing waits or prefills) and one greedy request without logprobs in
        slot 0 with at least :attr:`multi_step` tokens to go: the launch is
        :meth:`ModelRunner.decode_multi` instead, ``multi_step`` steps at once, whose
        tokens reach the stream together (those after an end are dropped)."""
        rows = {
            s: r
            for s, r in running.items()
            if not r.done
            and not r.cancel_requested
            and len(r.token_ids) + r.pending < r.params.max_tokens
        }
        prev = self._inflight
        launched: _Step | None = None
        m = self.multi_step
        lone = rows.get(0) if alone and m > 1 and len(rows) == 1 else None
        if (
            lone is not None
            and lone.params.greedy
            and lone.params.logprobs is None
            and len(lone.token_ids) + lone.pending + m <= lone.params.max_tokens
        ):
            launched = self._launch_multi(lone)
        elif rows:
            n = max(rows) + 1
            tokens, positions, active, use_prev = [0] * n, [0] * n, [0] * n, [0] * n
            samplers: list[RowSampling | None] = [None] * n
            by_row: list[Request | None] = [None] * n
            for slot, req in rows.items():
                if req.pending:
                    use_prev[slot] = 1  # its last token is still on the device
                else:
                    tokens[slot] = req.token_ids[-1]
                positions[slot] = len(req.prompt_ids) + len(req.token_ids) + req.pending - 1
                active[slot] = 1
                samplers[slot] = self._row_sampling(req)
                by_row[slot] = req
            lp_rows, k = _logprob_rows(by_row)
            try:
                logits = self._runner.decode(tokens, positions, active, use_prev)
                picked = self._runner.pick_device(logits, samplers)
                extra = (
                    self._runner.logprobs_device(logits, picked, lp_rows, k) if lp_rows else None
                )
                host, event = self._runner.to_host(picked, extra)
            except Exception as exc:  # fail the rows of this step only; keep serving
                with self._cond:
                    for req in rows.values():
                        self._end(req, None, exc)
            else:
                for req in rows.values():
                    req.pending += 1
                launched = _Step(rows, host, event, n, lp_rows, k)
                observe = self.step_observer
                if observe is not None:
                    observe(len(rows))
                with self._cond:
                    self._counters["decode_steps"] += 1
                    self._counters["decode_tokens"] += len(rows)
        self._inflight = launched
        if self._clock is not None and len(self._marks) == 2:
            start, mid = self._marks
            self._clock.add(start, mid, self._clock.mark())
            self._marks = []
        if prev is not None:
            self._finish_step(prev)
        return bool(rows) or prev is not None

    def _launch_multi(self, req: Request) -> _Step | None:
        """Launch :attr:`multi_step` greedy steps of ``req`` (slot 0, alone)."""
        m = self.multi_step
        position = len(req.prompt_ids) + len(req.token_ids) + req.pending - 1
        token = 0 if req.pending else req.token_ids[-1]
        try:
            picked = self._runner.decode_multi(token, position, bool(req.pending))
            host, event = self._runner.to_host(picked)
        except Exception as exc:  # fail this request only; keep serving
            with self._cond:
                self._end(req, None, exc)
            return None
        req.pending += m
        observe = self.step_observer
        if observe is not None:
            for _ in range(m):
                observe(1)
        with self._cond:
            self._counters["decode_steps"] += m
            self._counters["decode_tokens"] += m
            self._counters["multi_steps"] += 1
        return _Step({0: req}, host, event, m, [], 0, steps=m)

    def _finish_step(self, step: _Step) -> None:
        """Read a launched step's tokens and hand them to their requests."""
        try:
            if step.event is not None:
                step.event.synchronize()
            picked, lps = unpack_step(step.host, step.n, step.lp_rows, step.k)
        except Exception as exc:
            with self._cond:
                for req in step.rows.values():
                    req.pending = 0
                    self._end(req, None, exc)
            return
        now = time.perf_counter()
        with self._cond, batched_wakeups():
            if step.steps > 1:  # one row's tokens, in order, up to its end
                req = step.rows[0]
                req.pending -= step.steps
                for token in picked:
                    if req.done:
                        break
                    self._counters["generated_tokens"] += 1
                    self._emit(req, token, now, None)
                return
            for slot, req in step.rows.items():
                req.pending -= 1
                if req.done:
                    continue
                self._counters["generated_tokens"] += 1
                self._emit(req, picked[slot], now, lps.get(slot))

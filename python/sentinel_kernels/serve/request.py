"""A request inside the engine, the stream its caller holds, and its finished result.

Thread model: the engine thread appends tokens and finishes requests; any other thread
(or an asyncio loop) iterates the stream, reads its text, cancels it or waits for it.
Shared state sits behind one lock per request; an asyncio consumer is woken through
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .detok import IncrementalDetokenizer, StopStrings
from .params import SamplingParams

__all__ = [
    "Completion",
    "EngineError",
    "EngineShutdownError",
    "FinishReason",
    "QueueFullError",
    "RequestFailedError",
    "RequestStream",
    "Timings",
    "TokenLogprobs",
    "after_batch",
    "batched_wakeups",
]

FinishReason = Literal["stop", "length", "cancelled"]
#: One new token's log-probabilities (``SamplingParams.logprobs``): the chosen token's,
#: and the ``n`` most likely ``(token_id, logprob)``, most likely first.
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class EngineError(RuntimeError):
    """Base class of the engine's own errors."""


class QueueFullError(EngineError):
    """The waiting queue holds ``max_queued`` requests: try again later (a server answers
    429)."""


class EngineShutdownError(EngineError):
    """The engine was shut down (or is shutting down) and takes no more work."""


class RequestFailedError(EngineError):
    """A step that served this request raised; ``__cause__`` is the original error. The
    other requests of the engine were not affected."""


@dataclass
class Timings:
    """Per-request times, ``time.perf_counter()`` seconds.

    Fields: ``arrival`` (submitted), ``admitted`` (got a slot, prefill began),
    ``first_token``, ``finished``, ``token_times`` (when each new token was emitted).
    """

    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_s(self) -> float | None:
        """Seconds from arrival to admission (waiting for a slot)."""
        return None if self.admitted is None else self.admitted - self.arrival

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to the first new token."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def total_s(self) -> float | None:
        """Arrival to finish."""
        return None if self.finished is None else self.finished - self.arrival

    @property
    def inter_token_s(self) -> list[float]:
        """Gaps between consecutive new tokens (decode latency per token)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass(frozen=True)
class Completion:
    """A finished request.

    Fields: ``request_id``; ``prompt_token_ids``; ``token_ids`` (the new tokens, a stop
    token included); ``text`` (their text, special tokens skipped, cut before a stop
    string); ``finish_reason`` (``"stop"``: EOS, a stop token or a stop string;
    ``"length"``: ``max_tokens`` reached; ``"cancelled"``); ``timings``; ``logprobs``
    (with ``SamplingParams.logprobs``: one :data:`TokenLogprobs` per new token, else None).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    timings: Timings
    logprobs: list[TokenLogprobs] | None = None

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        """New tokens."""
        return len(self.token_ids)


class Request:
    """Engine-side state of one request (the engine thread owns the scheduling fields)."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        stop_ids: frozenset[int],
        wake_engine: Any,
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = stop_ids
        self.timings = Timings(arrival=time.perf_counter())
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.prefix_checked = False  # looked up in the prefix cache
        self.pending = 0  # tokens of launched decode steps not read yet
        self.token_ids: list[int] = []
        #: One entry per token of ``token_ids`` when the request asked for logprobs.
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.generator: Any = None  # torch.Generator of a sampled request
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.cancel_requested = False
        self._wake_engine = wake_engine
        self._lock = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._detok = (
            IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        )
        self._detok_done = 0  # tokens fed to the detokenizer
        self._stops = StopStrings(params.stop)
        self._stop_at: int | None = None  # text length where a stop string starts
        #: Called with this request after each change the engine makes (a token, the
        #: finish, a failure, the admission), in the engine thread: how the engine
        #: process forwards its requests to the HTTP processes (``remote.py``).
        self.observer: Callable[[Request], None] | None = None

    # -- engine side --------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Finished, cancelled or failed."""
        return self.finish_reason is not None or self.error is not None

    def emit(self, token_id: int, now: float, logprobs: TokenLogprobs | None = None) -> bool:
        """Append a new token and, if the request asked for them, its log-probabilities
        (engine thread). Returns whether the request is finished by it (stop token, stop
        string or ``max_tokens``)."""
        if self.logprobs is not None and logprobs is None:
            # checked before anything is appended: the engine fails this request only
            raise EngineError(f"request {self.id}: a token came without its logprobs")
        with self._lock:
            self.token_ids.append(token_id)
            if self.logprobs is not None and logprobs is not None:
                n = self.params.logprobs or 0
                self.logprobs.append((logprobs[0], logprobs[1][:n]))
            t = self.timings
            if t.first_token is None:
                t.first_token = now
            t.token_times.append(now)
            reason: FinishReason | None = None
            if token_id in self.stop_ids:
                reason = "stop"
            elif self._stops and self._advance_text():
                reason = "stop"
            elif len(self.token_ids) >= self.params.max_tokens:
                reason = "length"
            self._lock.notify_all()
        self._wake_async()
        if reason is not None:
            self.finish(reason, now)
            return True
        return False

    def finish(self, reason: FinishReason, now: float | None = None) -> None:
        """Mark finished (idempotent; the first reason wins)."""
        with self._lock:
            if self.done:
                return
            self.finish_reason = reason
            self.timings.finished = time.perf_counter() if now is None else now
            self._lock.notify_all()
        self._wake_async()

    def fail(self, error: BaseException) -> None:
        """Mark failed with ``error`` (idempotent)."""
        with self._lock:
            if self.done:
                return
            self.error = error
            self.timings.finished = time.perf_counter()
            self._lock.notify_all()
        self._wake_async()

    def _advance_text(self) -> bool:
        """Feed new tokens to the detokenizer (caller holds the lock); True when a stop
        string appeared."""
        if self._detok is None:
            return False
        found = False
        while self._detok_done < len(self.token_ids):
            piece = self._detok.add(self.token_ids[self._detok_done])
            self._detok_done += 1
            if self._stop_at is None and self._stops:
                at = self._stops.find(self._detok.text, len(piece))
                if at >= 0:
                    self._stop_at = at
                    found = True
        return found

    def _wake_async(self) -> None:
        observer = self.observer
        if observer is not None:
            observer(self)
        with self._lock:
            waiters, self._async_waiters = self._async_waiters, []
        pending: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] | None = getattr(
            _batched, "pending", None
        )
        for loop, fut in waiters:
            if pending is not None:
                pending.setdefault(loop, []).append(fut)
            else:
                _call_soon(loop, _resolve, fut)

    # -- caller side --------------------------------------------------------------------

    def text(self, final: bool = False) -> str:
        """The text so far (cut before a stop string); ``final`` also flushes characters
        still incomplete. Decoded incrementally, in the calling thread."""
        if self._detok is None:
            raise EngineError("the engine has no tokenizer: only token ids are available")
        with self._lock:
            self._advance_text()
            if final and self.done:
                self._detok.flush()
            text = self._detok.text
            return text if self._stop_at is None else text[: self._stop_at]

    def stream_text_safe(self) -> str:
        """Text that can be shown while streaming: without the last characters that may
        still turn out to begin a stop string."""
        text = self.text(final=self.done)
        if self.done or not self._stops:
            return text
        return text[: max(0, len(text) - self._stops.holdback)]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve_all(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        _resolve(fut)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None], arg: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(fn, arg)


_batched = threading.local()


def after_batch(fn: Callable[[], None]) -> None:
    """Call ``fn()`` when the calling thread's :func:`batched_wakeups` block ends (once per
    block however often it is registered), or at once outside such a block: a consumer
    of many requests' changes (the engine process's forwarder) sends one message per
    engine step instead of one per request."""
    calls: list[Callable[[], None]] | None = getattr(_batched, "calls", None)
    if calls is None:
        fn()
    elif fn not in calls:
        calls.append(fn)


@contextlib.contextmanager
def batched_wakeups() -> Iterator[None]:
    """Within this block, async waiters woken from the calling thread are collected and
    resolved with one ``call_soon_threadsafe`` per event loop when the block ends.

    The engine wraps each step's token hand-out in it: a step that feeds 256 streams
    then costs the event loop one wake-up (one self-pipe write, one callback) instead of
    256, the difference between keeping up and falling behind under load. Nested blocks
    join the outermost one.
    """
    if getattr(_batched, "pending", None) is not None:
        yield
        return
    pending: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    calls: list[Callable[[], None]] = []
    _batched.pending = pending
    _batched.calls = calls
    try:
        yield
    finally:
        _batched.pending = None
        _batched.calls = None
        for loop, futs in pending.items():
            _call_soon(loop, _resolve_all, futs)
        for fn in calls:
            fn()


class RequestStream:
    """The caller's handle of a submitted request.

    Iterate it for the new token ids as they come (``for t in stream`` blocks between
    tokens; ``async for t in stream`` awaits), :meth:`cancel` it at any time, or wait for
    the :class:`Completion` with :meth:`result`. Iterating a failed request raises
    :class:`RequestFailedError` after the tokens it got. With ``SamplingParams.logprobs``,
    :attr:`logprobs` and :meth:`batches_with_logprobs` give each token's log-probabilities.
    """

    def __init__(self, request: Request) -> None:
        self._req = request

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self._req.id

    @property
    def done(self) -> bool:
        """Whether the request finished (any reason) or failed."""
        return self._req.done

    @property
    def token_ids(self) -> list[int]:
        """The new tokens so far (a copy)."""
        with self._req._lock:
            return list(self._req.token_ids)

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        """The log-probabilities of the new tokens so far (a copy; one per token of
        :attr:`token_ids`), or None when the request did not ask for them."""
        with self._req._lock:
            lp = self._req.logprobs
            return None if lp is None else list(lp)

    @property
    def text(self) -> str:
        """The text so far (incremental; cut before a stop string)."""
        return self._req.text(final=self._req.done)

    @property
    def safe_text(self) -> str:
        """The text that can be shown while streaming: as :attr:`text`, less the last
        characters that may still turn out to begin a stop string."""
        return self._req.stream_text_safe()

    @property
    def timings(self) -> Timings:
        """The request's :class:`Timings` (live)."""
        return self._req.timings

    def cancel(self) -> None:
        """Ask the engine to stop this request: it ends with ``finish_reason="cancelled"``
        and its slot is freed at the engine's next step. Thread-safe; no effect on a
        finished request."""
        self._req.cancel_requested = True
        self._req._wake_engine()

    def _raise_if_failed(self) -> None:
        if self._req.error is not None:
            raise RequestFailedError(
                f"request {self._req.id} failed: {self._req.error!r}"
            ) from self._req.error

    def __iter__(self) -> Iterator[int]:
        i = 0
        req = self._req
        while True:
            with req._lock:
                while i >= len(req.token_ids) and not req.done:
                    req._lock.wait()
                new = req.token_ids[i:]
                finished = req.done
            yield from new
            i += len(new)
            if finished and i >= len(req.token_ids):
                self._raise_if_failed()
                return

    async def _aiter(self) -> AsyncIterator[int]:
        async for batch in self.batches():
            for t in batch:
                yield t

    async def batches(self) -> AsyncIterator[list[int]]:
        """``async for new in stream.batches()``: the token ids that arrived since the last
        batch, as soon as there is at least one (a server sends each batch as one chunk,
        so a busy event loop sends fewer, larger chunks instead of falling behind)."""
        async for new, _ in self.batches_with_logprobs():
            yield new

    async def batches_with_logprobs(
        self,
    ) -> AsyncIterator[tuple[list[int], list[TokenLogprobs] | None]]:
        """As :meth:`batches`, each batch with its tokens' log-probabilities (one
        :data:`TokenLogprobs` per token id, read under the same lock), or None when the
        request did not ask for them."""
        i = 0
        req = self._req
        loop = asyncio.get_running_loop()
        while True:
            with req._lock:
                new = req.token_ids[i:]
                lps = None if req.logprobs is None else req.logprobs[i : i + len(new)]
                finished = req.done
                fut: asyncio.Future[None] | None = None
                if not new and not finished:
                    fut = loop.create_future()
                    req._async_waiters.append((loop, fut))
            if fut is not None:
                await fut
                continue
            if new:
                yield new, lps
            i += len(new)
            if finished and i >= len(req.token_ids):
                self._raise_if_failed()
                return

    def __aiter__(self) -> AsyncIterator[int]:
        return self._aiter()

    def ready(self, seen: int) -> bool:
        """Whether a consumer that has taken ``seen`` tokens would get more (or the end)
        without waiting: more than ``seen`` tokens have come, or the request is done.
        Non-blocking and thread-safe; tokens only grow and a request stays done, so a True
        answer stays true (the next step of :meth:`batches` will not wait)."""
        req = self._req
        with req._lock:
            return req.done or len(req.token_ids) > seen

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is done (or ``timeout`` seconds); returns ``done``."""
        req = self._req
        with req._lock:
            return req._lock.wait_for(lambda: req.done, timeout)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request and return its :class:`Completion`.

        Raises:
            RequestFailedError: a step serving it raised.
            TimeoutError: not done within ``timeout`` seconds.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"request {self._req.id} not done after {timeout} s")
        self._raise_if_failed()
        req = self._req
        text = req.text(final=True) if req._detok is not None else ""
        assert req.finish_reason is not None
        return Completion(
            request_id=req.id,
            prompt_token_ids=list(req.prompt_ids),
            token_ids=list(req.token_ids),
            text=text,
            finish_reason=req.finish_reason,
            timings=req.timings,
            logprobs=None if req.logprobs is None else list(req.logprobs),
        )

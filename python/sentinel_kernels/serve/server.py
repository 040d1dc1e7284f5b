"""The OpenAI-compatible HTTP service over an :class:`~.engine.Engine` (FastAPI).

:func:`create_app` builds the app; ``sentinel-kernels serve`` runs it with uvicorn. The
model loads in a background thread at start-up: ``GET /health`` answers 503 until the
engine is ready (graphs captured), then 200. Endpoints: ``POST /v1/completions``,
``POST /v1/chat/completions`` (the tokenizer's chat template), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /stats`` (the engine's counters as
JSON) and ``GET /`` (a chat playground with a live panel, ``static/index.html``).

Bodies are read and parsed here (not by FastAPI's automatic validation), so that every
malformed body (bad JSON, bad UTF-8, deep nesting, wrong types, NaN, huge numbers,
unknown fields) gets a 400 in OpenAI's error shape (:func:`.protocol.error_body`) and never
a 422 or a 500. Errors: 400 invalid parameters or a prompt longer than the context, 401 a
missing or wrong API key (``/health`` and ``/metrics`` stay open), 404 an unknown model,
408 a request past ``request_timeout_s``, 413 a body over the size limit, 429 with
``Retry-After`` when the engine's queue is full, 503 while loading or after shutdown.

Streaming (``stream: true``) is server-sent events: ``data: {chunk}`` lines, a last chunk
with the ``finish_reason``, a usage chunk when ``stream_options.include_usage``, then
``data: [DONE]``. Each wake-up sends the tokens a stream got since the last one as one
content chunk, and events that are due at the same time (the role chunk and the first text
when that token is already there, the last text with the finish and usage chunks and
``[DONE]``, a whole result-cache replay) go out as one HTTP body chunk, their
concatenation: the event loop pays the send path once per wake-up, not once per event;
nothing waits for tokens to come. A client that disconnects cancels its request; the
engine frees the slot at its next step.

Caches (:mod:`.result_cache`): a result cache of final completions for deterministic requests
(temperature 0, or a seed), keyed by every field that changes the output. The
detokenizer is incremental per stream (:mod:`.detok`).

Log-probabilities (``SamplingParams.logprobs``: the model's raw next-token distribution,
before temperature and the filters): ``/v1/completions`` ``logprobs: n`` (0..5) answers
``choices[0].logprobs = {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
"text_offset"}``; ``/v1/chat/completions`` ``logprobs: true`` with ``top_logprobs: n``
(0..20) answers ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
There is one entry per generated token (``usage.completion_tokens``; a stop token and the
tokens of a stop string included). A token's string is the tokenizer's decode of its id
alone (``token_id:N`` without a tokenizer): a character split over several tokens shows
as replacement characters (U+FFFD) in each; ``bytes`` is the UTF-8 of that string (the
tokenizers served here expose no per-token bytes), so it is exact only for tokens that
decode to whole characters. ``text_offset`` counts those strings' lengths from 0 (the
completion's start). Logprobs of ``-inf`` are sent as ``-9999.0`` (JSON has no
infinity; vLLM does the same). In a stream each chunk carries the logprobs of the tokens
that arrived since the previous chunk (a token whose text is still held back, an
incomplete character or a possible stop string, goes with the chunk that sends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from .detok import IncrementalDetokenizer, rust_backend
from .engine import Engine
from .heap import freeze_heap
from .metrics import ServerMetrics
from .params import SamplingParams
from .protocol import (
    ChatRequest,
    CompletionRequest,
    UnsupportedField,
    error_body,
)
from .remote import RemoteEngine
from .request import (
    Completion,
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
    TokenLogprobs,
)
from .result_cache import ResultCache, cache_key

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger("sentinel_kernels.serve")

#: The web page at ``/``: a chat playground and a live panel (plain HTML/JS/CSS, nothing
#: loaded from elsewhere).
_PAGE = Path(__file__).with_name("static") / "index.html"
#: Largest request body read (bytes); larger ones get a 413.
MAX_BODY_BYTES = 4 << 20
#: Nesting depth of JSON bodies accepted (a deeper one gets a 400 before it is parsed).
MAX_JSON_DEPTH = 64
#: What the server serves: an engine in this process, or one in its own process.
AnyEngine = Engine | RemoteEngine

#: What a logprob of ``-inf`` is sent as (JSON has no infinities; vLLM's value).
MIN_LOGPROB = -9999.0


@dataclass
class ServerConfig:
    """What the server announces and enforces (see ``sentinel-kernels serve --help``)."""

    model_name: str
    level: int
    api_key: str | None = None
    result_cache_size: int = 1024
    request_timeout_s: float = 600.0
    default_chat_max_tokens: int | None = None  # None: the rest of the context
    # freeze the process's heap once the engine is ready (serve/heap.py): for a process
    # that only serves (the CLI), never for one that embeds the app
    freeze_heap: bool = False


@dataclass
class _State:
    config: ServerConfig
    metrics: ServerMetrics
    results: ResultCache
    engine: AnyEngine | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers or {}


class _LogprobFormat:
    """One response's logprobs in OpenAI's shapes (module docstring): chat's ``content``
    entries or the completions' four lists, the ``text_offset`` running on across the
    chunks of a stream."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # text_offset of the next token
        self._strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        """The tokenizer's decode of ``token_id`` alone (``token_id:N`` without one)."""
        text = self._strings.get(token_id)
        if text is None:
            tok = self.tokenizer
            text = str(tok.decode([token_id])) if tok is not None else f"token_id:{token_id}"
            self._strings[token_id] = text
        return text

    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {
            "token": text,
            "logprob": max(logprob, MIN_LOGPROB),
            "bytes": list(text.encode("utf-8", "replace")),
        }

    def payload(self, ids: Sequence[int], lps: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """The ``logprobs`` object of tokens ``ids`` with their :data:`TokenLogprobs`."""
        if self.chat:
            content = []
            for tid, (lp, top) in zip(ids, lps, strict=True):
                entry = self._chat_entry(tid, lp)
                entry["top_logprobs"] = [self._chat_entry(t, v) for t, v in top]
                content.append(entry)
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, (lp, top) in zip(ids, lps, strict=True):
            text = self.token(tid)
            tokens.append(text)
            token_lps.append(max(lp, MIN_LOGPROB))
            alts: dict[str, float] = {}
            for t, v in top:  # two ids decoding alike: the likelier one's value stays
                alts.setdefault(self.token(t), max(v, MIN_LOGPROB))
            tops.append(alts)
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def _bad(message: str, param: str | None = None, code: Any = None) -> _HTTPError:
    return _HTTPError(400, message, "invalid_request_error", param, code)


def _json_depth_ok(raw: bytes) -> bool:
    """Whether ``raw`` (UTF-8, else ``UnicodeDecodeError``) nests at most
    :data:`MAX_JSON_DEPTH` arrays and objects."""
    text = raw.decode("utf-8")
    # A body with that few brackets in all cannot nest deeper; the character loop below
    # (~60 us for a chat request of 200 words, on the event loop) is for the rest.
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return True
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _parse(raw: bytes, model: type[BaseModel]) -> Any:
    """``raw`` as ``model``, or a 400 naming what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise _HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    try:
        if not _json_depth_ok(raw):
            raise _bad(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise _bad("the body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        raise _bad(f"{loc}: {msg}" if loc else msg, param=loc or None) from None


#: The transformers methods whose plain versions :func:`_rust_encoder` relies on.
_ENCODE_METHODS = ("__call__", "_encode_plus", "_batch_encode_plus", "encode_plus")


def _rust_encoder(tok: Any, methods: Sequence[str] = _ENCODE_METHODS) -> Any:
    """The Rust tokenizer inside ``tok`` when encoding with it directly gives the ids of
    ``tok(text, add_special_tokens=...)["input_ids"]``, else None.

    transformers' call sets the Rust tokenizer's ``encode_special_tokens`` from
    ``split_special_tokens``, switches padding and truncation off (as they are here), then
    encodes with offsets and wraps the result; encoding alone without offsets
    (``encode_batch_fast``) takes two thirds of the time (~0.20 instead of ~0.30 ms for a
    230-token chat prompt on the 2-core CPU), on the event loop that serves every request.
    """
    backend = rust_backend(tok, methods)
    if (
        backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tok, "split_special_tokens", False))
    ):
        return None
    return backend


def text_prompt_ids(tok: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tok(text, add_special_tokens=...)["input_ids"]`` as a list of ints; the Rust
    tokenizer's encoding when that is the same (:func:`_rust_encoder`)."""
    backend = _rust_encoder(tok)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return list(encode([text], add_special_tokens=add_special_tokens)[0].ids)
    return [int(t) for t in tok(text, add_special_tokens=add_special_tokens)["input_ids"]]


def chat_prompt_ids(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The ids of ``tok.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True)``: the template rendered to text by transformers, the text encoded
    without special tokens added (what ``apply_chat_template`` itself does), through
    :func:`text_prompt_ids`. Template errors propagate."""
    if _rust_encoder(tok, ("apply_chat_template", *_ENCODE_METHODS)) is None:
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(t) for t in ids]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text_prompt_ids(tok, text, add_special_tokens=False)


def _chunk_event(
    model: str,
    rid: str,
    chat: bool,
    text: str | None,
    finish: str | None,
    first: bool,
    logprobs: dict[str, Any] | None = None,
) -> str:
    """One SSE event of a stream: a ``chat.completion.chunk`` (``first``: with the role)
    or a ``text_completion`` chunk."""
    if chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        obj = "chat.completion.chunk"
    else:
        choice = {
            "index": 0,
            "text": text or "",
            "finish_reason": finish,
            "logprobs": logprobs,
        }
        obj = "text_completion"
    body = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


#: JSON of one value as ``json.dumps(..., ensure_ascii=False)`` writes it, without
#: building an encoder per call.
_json_text = json.JSONEncoder(ensure_ascii=False).encode


class _TextChunks:
    """The SSE events of one stream's plain text chunks (no role, no finish reason, no
    logprobs), byte for byte what :func:`_chunk_event` writes for them
    (tests/serve/test_loop_fast_paths.py): the JSON around the text is written once per
    stream, and per chunk only ``created`` and the text are encoded. Most events of a
    stream are such chunks, and all of them go through the one event loop."""

    def __init__(self, rid: str, chat: bool, model: str) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = f'data: {{"id": {_json_text(rid)}, "object": "{obj}", "created": '
        if chat:
            choice, tail = '{"index": 0, "delta": {"content": ', '}, "finish_reason": null}'
        else:
            choice, tail = '{"index": 0, "text": ', ', "finish_reason": null, "logprobs": null}'
        self._mid = f', "model": {_json_text(model)}, "choices": [{choice}'
        self._tail = f"{tail}]}}\n\n"

    def __call__(self, text: str) -> str:
        return f"{self._head}{int(time.time())}{self._mid}{_json_text(text)}{self._tail}"


#: ``scope["state"]`` key of the time (``time.perf_counter``) a request reached StatusGuard.
RECEIVED_KEY = "sentinel_received"


class StatusGuard:
    """Pure ASGI middleware: counts every HTTP response by status and turns an exception
    that escapes a route into an OpenAI-style 500 body (never a bare error page).

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    pipes a streamed body through an extra task and memory stream, a cost paid on every
    SSE chunk of every stream by the event loop that also feeds the engine.
    """

    def __init__(self, app: Any, count: Callable[[int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # when the request reached our code (after uvicorn parsed its head): the log's
        # `http_in` and `first_out` count from here (see _finish)
        scope.setdefault("state", {})[RECEIVED_KEY] = time.perf_counter()
        started = False

        def send_counted(message: Any) -> Any:
            # a plain function handing back send's awaitable: no coroutine of its own
            # for each of the many body messages of a stream
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.count(int(message["status"]))
            return send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as exc:  # the last guard
            log.exception("unhandled error")
            if started:  # the status line is out: nothing left to answer with
                return
            body = json.dumps(
                error_body(f"internal error: {type(exc).__name__}", "server_error")
            ).encode()
            await send_counted(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


def create_app(
    load: Callable[[], AnyEngine], config: ServerConfig, *, multiprocess_metrics: bool = False
) -> FastAPI:
    """The FastAPI app serving the engine that ``load()`` returns.

    ``load`` runs in a background thread when the app starts (uvicorn's lifespan), so
    ``/health`` can answer 503 while the model loads and warms up; its exception, if any,
    is reported by ``/health`` (503) and logged. The engine is shut down with the app.

    Args:
        load: builds the (patched, warmed-up) :class:`~.engine.Engine`, or connects to
            one in its own process (:meth:`~.remote.EngineProcess.connect`).
        config: name, level, API key, cache size, timeout.
        multiprocess_metrics: one of several HTTP worker processes in front of an engine
            process that records the engine-side metrics itself
            (:class:`~.metrics.ServerMetrics` ``multiprocess``; ``serve --http-workers``).

    Returns:
        a ``fastapi.FastAPI``.
    """
    state = _State(
        config=config,
        metrics=ServerMetrics(multiprocess=multiprocess_metrics),
        results=ResultCache(config.result_cache_size),
    )

    def _load() -> None:
        t0 = time.perf_counter()
        try:
            engine = load()
        except Exception as exc:  # reported by /health
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the model failed to load")
            return
        if not multiprocess_metrics:  # else the engine process observes its steps
            engine.step_observer = state.metrics.observe_step
        if config.freeze_heap:
            freeze_heap()
        state.engine = engine
        log.info(
            "ready: model %s, level %s (loaded, patched and warmed up in %.1f s)",
            config.model_name,
            config.level,
            time.perf_counter() - t0,
        )

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loader = threading.Thread(target=_load, name="sentinel-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            loader.join(timeout=0)
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="sentinel-kernels", lifespan=lifespan, openapi_url=None, docs_url=None)
    app.state.sentinel = state

    def _error_response(err: _HTTPError) -> JSONResponse:
        return JSONResponse(
            error_body(err.message, err.type, err.param, err.code),
            status_code=err.status,
            headers=err.headers,
        )

    app.add_middleware(
        StatusGuard,
        count=lambda status: state.metrics.http_responses.labels(status=str(status)).inc(),
    )

    def _check_key(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise _HTTPError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                "invalid_request_error",
                code="invalid_api_key",
            )

    def _engine() -> AnyEngine:
        engine = state.engine
        if engine is None:
            why = state.load_error or "the model is loading"
            raise _HTTPError(503, why, "server_error", code="not_ready")
        if engine.closed:
            raise _HTTPError(503, "the server is shutting down", "server_error")
        return engine

    def _check_model(name: str) -> None:
        if name != config.model_name:
            raise _HTTPError(
                404,
                f"model {name!r} does not exist; this server serves {config.model_name!r}",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> Any:
        if state.engine is None:
            status = "error" if state.load_error else "loading"
            body = {"status": status, "model": config.model_name}
            if state.load_error:
                body["error"] = state.load_error
            return JSONResponse(body, status_code=503)
        if state.engine.closed:  # shutting down, or the engine process is gone
            return JSONResponse({"status": "stopped", "model": config.model_name}, status_code=503)
        return {"status": "ok", "model": config.model_name, "level": config.level}

    @app.get("/metrics")
    async def metrics() -> Any:
        engine = state.engine
        return Response(
            state.metrics.render(engine.stats() if engine is not None else None, state.results),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @app.get("/stats")
    async def stats() -> Any:
        engine = state.engine
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        st = dict(engine.stats())
        st["graph_buckets"] = list(st["graph_buckets"])
        st["slots_used"] = st["max_slots"] - st["free_slots"]
        st["result_cache_hits"] = state.results.hits
        st["result_cache_misses"] = state.results.misses
        st["result_cache_size"] = len(state.results)
        return st

    @app.get("/")
    async def page() -> Any:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            _check_key(request)
        except _HTTPError as err:
            return _error_response(err)
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "sentinel-kernels",
                }
            ],
        }

    async def _handle(request: Request, chat: bool) -> Any:
        try:
            _check_key(request)
            raw = await request.body()
            req = _parse(raw, ChatRequest if chat else CompletionRequest)
            try:
                req.check_supported()
            except UnsupportedField as exc:
                raise _bad(str(exc), param=exc.param) from None
            _check_model(req.model)
            engine = _engine()
            ids = _prompt_ids(engine, req, chat)
            params = _sampling(engine, req, chat, len(ids))
            return await _run(request, engine, req, chat, ids, params)
        except _HTTPError as err:
            return _error_response(err)

    def _prompt_ids(engine: AnyEngine, req: Any, chat: bool) -> list[int]:
        tok = engine.tokenizer
        if chat:
            if tok is None or not getattr(tok, "chat_template", None):
                raise _bad("this model has no chat template: use /v1/completions", "messages")
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            try:
                return chat_prompt_ids(tok, messages)
            except Exception as exc:
                raise _bad(f"the chat template failed: {exc}", "messages") from None
        if isinstance(req.prompt, str):
            if tok is None:
                raise _bad("this server has no tokenizer: send token ids", "prompt")
            if not req.prompt:
                raise _bad("the prompt is empty", "prompt")
            return text_prompt_ids(tok, req.prompt)
        bad = [t for t in req.prompt if t >= engine.vocab_size]
        if bad:
            raise _bad(f"token ids {bad[:5]} are outside the vocabulary", "prompt")
        return list(req.prompt)

    def _sampling(engine: AnyEngine, req: Any, chat: bool, n_prompt: int) -> SamplingParams:
        room = engine.max_seq_len - n_prompt
        if room < 1:
            raise _bad(
                f"the prompt has {n_prompt} tokens; this server's context is "
                f"{engine.max_seq_len} tokens",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        limit = req.token_limit() if chat else req.max_tokens
        if limit is None:
            limit = config.default_chat_max_tokens or room if chat else 16
            limit = min(limit, room)
        if n_prompt + limit > engine.max_seq_len:
            raise _bad(
                f"prompt ({n_prompt} tokens) + max_tokens ({limit}) exceeds the context of "
                f"{engine.max_seq_len} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_tokens=limit,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=req.seed,
                stop=req.stops(),
                ignore_eos=req.ignore_eos,
                logprobs=req.logprobs_count(),
            )
        except (TypeError, ValueError) as exc:
            raise _bad(str(exc)) from None

    async def _run(
        request: Request,
        engine: AnyEngine,
        req: Any,
        chat: bool,
        ids: list[int],
        params: SamplingParams,
    ) -> Any:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        deterministic = params.greedy or params.seed is not None
        key = None
        if deterministic and state.results.enabled:
            key = cache_key(config.model_name, config.level, engine.output_setting, ids, params)
            hit = state.results.get(key)
            if hit is not None:
                state.metrics.cache_event("result", True)
                log.info("%s prompt=%d out=%d cache=hit", rid, len(ids), len(hit.token_ids))
                if req.stream:
                    return _sse(_replay(engine, rid, chat, req, hit))
                return _body(rid, chat, hit, req, engine)
            state.metrics.cache_event("result", False)
        try:
            stream = engine.submit(ids, params, request_id=rid)
        except QueueFullError as exc:
            raise _HTTPError(
                429, str(exc), "rate_limit_error", headers={"Retry-After": "1"}
            ) from None
        except EngineShutdownError:
            raise _HTTPError(503, "the server is shutting down", "server_error") from None
        except (TypeError, ValueError) as exc:
            raise _bad(str(exc), "prompt") from None
        deadline = time.monotonic() + config.request_timeout_s
        if req.stream:
            return _sse(_stream(request, engine, stream, rid, chat, req, key, deadline))
        try:
            done = await _wait(request, stream, deadline)
        except RequestFailedError as exc:
            raise _HTTPError(
                500, f"the request failed: {exc.__cause__!r}", "server_error"
            ) from None
        if done is None:  # disconnected: nobody to answer
            _record_later(stream)
            return Response(status_code=499)
        _finish(done, key, cache_hit=False, received=_received(request))
        return _body(rid, chat, done, req, engine)

    def _received(request: Request) -> float | None:
        return request.scope.get("state", {}).get(RECEIVED_KEY)

    async def _wait(request: Request, stream: RequestStream, deadline: float) -> Completion | None:
        try:
            n = 0
            async for _ in stream:
                n += 1
                if n % 16 == 0 and await request.is_disconnected():
                    stream.cancel()
                    return None
                if time.monotonic() > deadline:
                    stream.cancel()
                    raise _HTTPError(408, "request timed out", "timeout_error", code="timeout")
            return stream.result()
        except asyncio.CancelledError:
            stream.cancel()
            _record_later(stream)
            raise

    def _finish(
        done: Completion,
        key: Any,
        cache_hit: bool,
        received: float | None = None,
        first_out: float | None = None,
    ) -> None:
        """Count a finished request, cache its result, log its line. ``queue``, ``ttft``
        and ``total`` count from the engine's submit; with ``received`` (when the request
        reached the server's code), ``http_in`` is received -> submit (body, parsing,
        template, tokens) and, with ``first_out``, ``first_out`` is received -> the first
        text chunk handed to the response (a streamed request's server-side TTFT; what
        the client sees later is the send path and the client's own lag)."""
        state.metrics.observe_request(done)
        if key is not None and done.finish_reason != "cancelled":
            state.results.put(key, done)
        t = done.timings
        extra = ""
        if received is not None:
            extra = f" http_in={1e3 * (t.arrival - received):.1f}ms"
            if first_out is not None:
                extra += f" first_out={1e3 * (first_out - received):.1f}ms"
        log.info(
            "%s prompt=%d out=%d finish=%s queue=%.1fms ttft=%.1fms total=%.1fms cache=%s%s",
            done.request_id,
            done.prompt_tokens,
            done.completion_tokens,
            done.finish_reason,
            1e3 * (t.queue_s or 0.0),
            1e3 * (t.ttft_s or 0.0),
            1e3 * (t.total_s or 0.0),
            "hit" if cache_hit else "miss",
            extra,
        )

    def _usage(done: Completion) -> dict[str, int]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    def _body(
        rid: str, chat: bool, done: Completion, req: Any, engine: AnyEngine
    ) -> dict[str, Any]:
        created = int(time.time())
        logprobs = (
            None
            if done.logprobs is None
            else _LogprobFormat(engine.tokenizer, chat).payload(done.token_ids, done.logprobs)
        )
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "finish_reason": done.finish_reason,
                "logprobs": logprobs,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": done.text,
                "finish_reason": done.finish_reason,
                "logprobs": logprobs,
            }
            obj = "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": config.model_name,
            "choices": [choice],
            "usage": _usage(done),
        }

    def _chunk(
        rid: str,
        chat: bool,
        text: str | None,
        finish: str | None,
        first: bool,
        logprobs: dict[str, Any] | None = None,
    ) -> str:
        return _chunk_event(config.model_name, rid, chat, text, finish, first, logprobs)

    def _usage_chunk(rid: str, chat: bool, done: Completion) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [],
            "usage": _usage(done),
        }
        return f"data: {json.dumps(body)}\n\n"

    def _ending(rid: str, chat: bool, req: Any, done: Completion) -> list[str]:
        """The last events of a stream: the finish chunk, the usage chunk if asked, DONE."""
        events = [_chunk(rid, chat, None if chat else "", done.finish_reason, False)]
        if req.include_usage():
            events.append(_usage_chunk(rid, chat, done))
        return [*events, "data: [DONE]\n\n"]

    def _error_events(message: str, type_: str, code: Any = None) -> list[str]:
        """An error inside a started stream (the status line is already sent): an error
        event in OpenAI's shape, then DONE."""
        return [
            f"data: {json.dumps(error_body(message, type_, code=code))}\n\n",
            "data: [DONE]\n\n",
        ]

    def _sse(gen: AsyncIterator[str]) -> Any:
        return StreamingResponse(
            gen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        request: Request,
        engine: AnyEngine,
        stream: RequestStream,
        rid: str,
        chat: bool,
        req: Any,
        key: Any,
        deadline: float,
    ) -> AsyncIterator[str]:
        """The SSE events of a live stream. Events already due are held in ``out`` and
        sent as one body chunk (their concatenation, in order) just before the generator
        would wait for the engine (:meth:`RequestStream.ready` says it would), or at the
        end: each body chunk costs the event loop one pass through Starlette, uvicorn and
        h11, so a wake-up that finds the role chunk and the first text, or the last text,
        finish and usage chunks and ``[DONE]``, pays it once. Nothing waits for more
        tokens; the bytes of the stream are the same, only the chunk boundaries move."""
        sent = 0
        first = True
        first_out: float | None = None  # when the first text chunk went to the response
        recorded = False
        fmt = _LogprobFormat(engine.tokenizer, chat)
        plain = _TextChunks(rid, chat, config.model_name)
        # tokens (with their logprobs) not yet sent in a chunk
        ids: list[int] = []
        lps: list[TokenLogprobs] | None = None
        out: list[str] = []  # events due, not yet handed to the response
        seen = 0  # tokens taken from the stream
        try:
            if chat:
                out.append(_chunk(rid, chat, "", None, True))
                first = False
            if out and not stream.ready(seen):
                yield "".join(out)
                out.clear()
            async for new, new_lps in stream.batches_with_logprobs():  # one chunk per batch
                seen += len(new)
                if new_lps is not None:
                    ids += new
                    lps = (lps or []) + new_lps
                text = stream.safe_text
                if len(text) > sent:
                    if lps is None and not (chat and first):
                        out.append(plain(text[sent:]))
                    else:
                        payload = fmt.payload(ids, lps) if lps is not None else None
                        out.append(_chunk(rid, chat, text[sent:], None, first, payload))
                    sent, first = len(text), False
                    ids, lps = [], None
                if time.monotonic() > deadline:
                    stream.cancel()
                    out += _error_events("request timed out", "timeout_error", "timeout")
                    yield "".join(out)
                    return
                if out and not stream.ready(seen):
                    if first_out is None and sent:
                        first_out = time.perf_counter()
                    yield "".join(out)
                    out.clear()
            done = stream.result()
            if len(done.text) > sent or lps:
                payload = fmt.payload(ids, lps) if lps else None
                out.append(_chunk(rid, chat, done.text[sent:], None, first, payload))
            recorded = True  # counted once, here, even if the client leaves during the end
            if first_out is None and done.text:
                first_out = time.perf_counter()
            _finish(done, key, False, _received(request), first_out)
            out += _ending(rid, chat, req, done)
            yield "".join(out)
        except RequestFailedError as exc:
            recorded = True
            out += _error_events(f"the request failed: {exc.__cause__!r}", "server_error")
            yield "".join(out)
        finally:
            if not recorded:  # the client went away (or an error): free the slot, count it
                if not stream.done:
                    stream.cancel()
                _record_later(stream)

    def _record_later(stream: RequestStream) -> None:
        """Count a cancelled request once the engine has ended it (its next step)."""

        def wait() -> None:
            if stream.wait(60):
                with contextlib.suppress(RequestFailedError):
                    _finish(stream.result(), None, cache_hit=False)

        threading.Thread(target=wait, name="sentinel-cancelled", daemon=True).start()

    async def _replay(
        engine: AnyEngine, rid: str, chat: bool, req: Any, hit: Completion
    ) -> AsyncIterator[str]:
        """A result-cache hit as a stream: the events a live stream of ``hit`` would send
        one token at a time, all due at once and so sent as one body chunk."""
        out: list[str] = []
        if chat:
            out.append(_chunk(rid, chat, "", None, True))
        fmt = _LogprobFormat(engine.tokenizer, chat)
        lps = hit.logprobs
        done = 0  # tokens whose logprobs were sent
        sent = 0
        if engine.tokenizer is not None:
            detok = IncrementalDetokenizer(engine.tokenizer, hit.prompt_token_ids)
            for i, t in enumerate(hit.token_ids):
                detok.add(t)
                piece = detok.text[sent : len(hit.text)]
                if piece:
                    payload = None
                    if lps is not None:
                        payload = fmt.payload(hit.token_ids[done : i + 1], lps[done : i + 1])
                        done = i + 1
                    out.append(_chunk(rid, chat, piece, None, False, payload))
                    sent += len(piece)
        if len(hit.text) > sent or (lps is not None and done < len(lps)):
            payload = (
                fmt.payload(hit.token_ids[done:], lps[done:])
                if lps is not None and done < len(lps)
                else None
            )
            out.append(_chunk(rid, chat, hit.text[sent:], None, False, payload))
        out += _ending(rid, chat, req, hit)
        yield "".join(out)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _handle(request, chat=True)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Any:
        return JSONResponse(
            error_body(f"no route {request.url.path}", "invalid_request_error", code="not_found"),
            status_code=404,
        )

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> Any:
        return JSONResponse(
            error_body(
                f"{request.method} is not allowed on {request.url.path}", "invalid_request_error"
            ),
            status_code=405,
        )

    return app

"""SSE events that are due at the same time go out as one HTTP body chunk: the bytes of a
stream are those of one event per body chunk, only the chunk boundaries move, and a
backlog (every token ready before the stream's generator runs) costs fewer body sends
than events. The real server under uvicorn over a tiny model; an ASGI wrapper records
every body message of every response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import sentinel_kernels as sk  # noqa: E402
from sentinel_kernels.serve import Engine, RequestStream, SamplingParams  # noqa: E402
from sentinel_kernels.serve.request import Request  # noqa: E402
from sentinel_kernels.serve.server import ServerConfig, _chunk_event, create_app  # noqa: E402

MODEL = "tiny:llama"


def _tiny_engine(backlog: bool) -> Engine:
    """A tiny engine; with ``backlog`` its ``submit`` returns only once the request is
    done, so every token (and the end) is ready before the stream's generator runs."""
    model, tok = sk.models.load_model(MODEL)
    sk.patch_model(model, level=1)
    engine = Engine(model, tok, max_slots=4, max_seq_len=256, max_wait_ms=1.0)
    if backlog:
        submit = engine.submit

        def submit_and_finish(*args: Any, **kwargs: Any) -> Any:
            stream = submit(*args, **kwargs)
            assert stream.wait(60), "the tiny engine did not finish in 60 s"
            return stream

        engine.submit = submit_and_finish  # type: ignore[method-assign]
    return engine


class BodyRecorder:
    """ASGI wrapper: the non-empty ``http.response.body`` messages of each response, in
    order (one list per response, by arrival)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[list[bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mine: list[bytes] = []
        self.bodies.append(mine)

        async def record(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                mine.append(bytes(message["body"]))
            await send(message)

        await self.app(scope, receive, record)


@contextlib.contextmanager
def serving(load: Callable[[], Engine], **config: Any) -> Iterator[tuple[str, BodyRecorder]]:
    """The app (wrapped in a :class:`BodyRecorder`) under uvicorn on 127.0.0.1, a free
    port; yields its URL and the recorder once ``/health`` says ready."""
    app = BodyRecorder(create_app(load, ServerConfig(model_name=MODEL, level=1, **config)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 180
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "engine did not get ready"
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def _post_stream(url: str, app: BodyRecorder, path: str, body: dict[str, Any]) -> list[bytes]:
    """Post a streamed request; the body chunks the server sent for it (their
    concatenation checked against what the client read)."""
    before = len(app.bodies)
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    mine = app.bodies[before:]
    assert len(mine) == 1
    assert b"".join(mine[0]) == r.content
    return mine[0]


def _events(raw: bytes) -> list[str]:
    """The SSE events of a stream, each ``data: ...\\n\\n``, ``created`` set to 0 (whole
    seconds of the wall clock: two runs may straddle a second)."""
    text = raw.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n")
    events = [e + "\n\n" for e in text.split("\n\n")[:-1]]
    assert "".join(events) == text
    return [re.sub(r'"created": \d+', '"created": 0', e) for e in events]


def _plain(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as a request without streaming."""
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def _body(chat: bool, rng: random.Random) -> dict[str, Any]:
    words = " ".join(rng.choice(["cat", "sky", "blue", "run", "é", "東京", "🙂"]) for _ in range(6))
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": rng.randint(6, 14),
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    return body


def _parsed(events: list[str]) -> list[dict[str, Any]]:
    """The JSON of each event but the final ``[DONE]``."""
    assert events[-1] == "data: [DONE]\n\n" and "data: [DONE]\n\n" not in events[:-1]
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def _text(chunks: list[dict[str, Any]], chat: bool) -> str:
    if chat:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def _answer(plain: dict[str, Any], chat: bool) -> str:
    return str(plain["choices"][0]["message"]["content"] if chat else plain["choices"][0]["text"])


@pytest.mark.parametrize("chat", [True, False])
def test_a_backlog_is_one_body_chunk_of_the_per_event_bytes(chat):
    """(b) every token ready before the generator runs: role, text, finish, usage and
    [DONE] (four or five events) go out in one body chunk, which is byte for byte the
    events the per-event path writes for that one batch (``_chunk_event``, the usage
    chunk's ``json.dumps``), the text and usage of the plain answer."""
    rng = random.Random()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _body(chat, rng)
    with serving(lambda: _tiny_engine(backlog=True), result_cache_size=0) as (url, app):
        sent = _post_stream(url, app, path, body)
        plain = httpx.post(url + path, json=_plain(body), timeout=60).json()
    events = _events(b"".join(sent))
    assert len(sent) == 1, f"{len(events)} events in {len(sent)} body chunks"
    assert len(events) == 4 + chat
    (rid,) = {c["id"] for c in _parsed(events)}
    text, finish = _answer(plain, chat), plain["choices"][0]["finish_reason"]
    usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion"}
    usage |= {"created": 0, "model": MODEL, "choices": [], "usage": plain["usage"]}
    want = [_chunk_event(MODEL, rid, chat, "", None, True)] if chat else []
    want += [
        _chunk_event(MODEL, rid, chat, text, None, False),
        _chunk_event(MODEL, rid, chat, None if chat else "", finish, False),
        f"data: {json.dumps(usage)}\n\n",
        "data: [DONE]\n\n",
    ]
    assert events == [re.sub(r'"created": \d+', '"created": 0', e) for e in want]
    assert plain["usage"]["completion_tokens"] == body["max_tokens"]


@pytest.mark.parametrize("chat", [True, False])
def test_a_live_stream_is_whole_events_with_the_plain_answer(chat):
    """(a) tokens coming one step at a time: each body chunk is a run of whole events,
    and the events give the role first, then the plain (greedy) answer's text, one
    finish reason, its usage and [DONE]."""
    rng = random.Random()
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _body(chat, rng)
    with serving(lambda: _tiny_engine(backlog=False), result_cache_size=0) as (url, app):
        sent = _post_stream(url, app, path, body)
        plain = httpx.post(url + path, json=_plain(body), timeout=60).json()
    for piece in sent:
        assert piece.startswith(b"data: ") and piece.endswith(b"\n\n")
        assert "".join(_events_of(piece)) == piece.decode("utf-8")
    chunks = _parsed(_events(b"".join(sent)))
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _text(chunks, chat) == _answer(plain, chat)
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finals if f] == [plain["choices"][0]["finish_reason"]] and finals[-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def _events_of(piece: bytes) -> list[str]:
    return [e + "\n\n" for e in piece.decode("utf-8").split("\n\n")[:-1]]


def test_a_result_cache_replay_is_one_body_chunk_with_the_same_answer():
    """A streamed result-cache hit: all its events in one body chunk, with the text,
    finish reason and usage of the live stream that filled the cache."""
    body = _body(True, random.Random())
    with serving(lambda: _tiny_engine(backlog=False)) as (url, app):
        live = _parsed(_events(b"".join(_post_stream(url, app, "/v1/chat/completions", body))))
        sent = _post_stream(url, app, "/v1/chat/completions", body)
        metrics = httpx.get(url + "/metrics").text
    assert re.search(r'cache_hits_total\{cache="result"\} 1\.0', metrics), metrics
    assert len(sent) == 1
    hit = _parsed(_events(sent[0]))
    assert hit[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _text(hit, True) == _text(live, True)
    assert hit[-2]["choices"][0]["finish_reason"] == live[-2]["choices"][0]["finish_reason"]
    assert hit[-1]["usage"] == live[-1]["usage"]


def test_a_live_stream_sends_before_its_tokens_come():
    """No waiting for tokens: the role chunk of a chat stream is sent while the engine
    has not produced the first token yet (the engine's steps are held back here)."""
    release = threading.Event()
    engine = _tiny_engine(backlog=False)
    submit = engine.submit

    def submit_later(*args: Any, **kwargs: Any) -> Any:
        stream = submit(*args, **kwargs)
        # the stream must not be ready when the generator starts: hold the request's
        # first token until the role chunk was seen by the client
        real = stream._req.emit

        def emit(*a: Any, **k: Any) -> bool:
            release.wait(30)
            return real(*a, **k)

        stream._req.emit = emit  # type: ignore[method-assign]
        return stream

    engine.submit = submit_later  # type: ignore[method-assign]
    body = _body(True, random.Random())
    with serving(lambda: engine, result_cache_size=0) as (url, app):
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                raw = r.iter_raw()
                first = next(raw)
                assert first.startswith(b"data: ") and b'"role": "assistant"' in first
                assert b"[DONE]" not in first
                release.set()
                rest = b"".join(raw)
        finally:
            release.set()  # never leave the engine thread held
    assert rest.endswith(b"data: [DONE]\n\n")


def test_ready_says_whether_the_next_batch_would_wait():
    """:meth:`RequestStream.ready`: False while no token beyond ``seen`` came, True once
    one did or the request is done; an async consumer's batches get every token."""
    rng = random.Random()
    req = Request("r", [rng.randint(1, 50)], SamplingParams(max_tokens=8), None, frozenset(), None)
    stream = RequestStream(req)
    assert not stream.ready(0)
    tokens = [rng.randint(1, 50) for _ in range(rng.randint(2, 5))]
    for i, t in enumerate(tokens):
        assert not req.emit(t, time.perf_counter())
        assert stream.ready(i) and not stream.ready(i + 1)
    req.finish("length")
    assert stream.ready(len(tokens)) and stream.ready(0)

    async def consume() -> list[int]:
        return [t async for b in stream.batches() for t in b]

    assert asyncio.run(consume()) == tokens

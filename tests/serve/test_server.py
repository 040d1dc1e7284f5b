"""The OpenAI-compatible server, started for real (uvicorn on 127.0.0.1, a free port) over a
tiny model and driven with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import sentinel_kernels as sk  # noqa: E402
from sentinel_kernels.serve import Engine  # noqa: E402
from sentinel_kernels.serve.remote import RemoteEngine  # noqa: E402
from sentinel_kernels.serve.server import ServerConfig, create_app  # noqa: E402
from tests.helpers import needs_smollm2, wait_for_stderr  # noqa: E402
from tests.serve.test_remote import engine_process, wait_gone  # noqa: E402

MODEL = "tiny:llama"


def _tiny_engine(**kw) -> Engine:
    model, tok = sk.models.load_model(MODEL)
    sk.patch_model(model, level=1)
    kw = {"max_slots": 4, "max_seq_len": 256, "max_wait_ms": 1.0, **kw}
    return Engine(model, tok, **kw)


@contextlib.contextmanager
def serving(
    load: Callable[[], Engine],
    wait_ready: bool = True,
    name: str = MODEL,
    ready_s: float = 180.0,
    **config,
) -> Iterator[str]:
    """Run the app on 127.0.0.1 (a free port, the socket bound here) in a thread; yield
    its base URL; stop it (bounded waits)."""
    cfg = ServerConfig(model_name=name, level=1, **config)
    app = create_app(load, cfg)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if wait_ready:
            while httpx.get(url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "engine did not get ready"
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def server_url(request) -> Iterator[str]:
    """The server over the tiny engine in its own thread, or in its own process
    (``--engine-process``, ``serve/remote.py``): every test using it runs on both."""
    if request.param == "in-process":
        with serving(_tiny_engine) as url:
            yield url
    else:
        with engine_process() as ep, serving(ep.connect) as url:
            yield url


def _client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def slow() -> Engine:
        assert release.wait(60)
        return _tiny_engine()

    with serving(slow, wait_ready=False) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_failed_load_is_reported_by_health():
    def broken() -> Engine:
        raise RuntimeError("no weights here")

    with serving(broken, wait_ready=False) as url:
        deadline = time.monotonic() + 30
        while (body := httpx.get(url + "/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert body["status"] == "error" and "no weights here" in body["error"]


def test_models_and_completion_match_the_engine(server_url):
    client = _client(server_url)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    model, tok = sk.models.load_model(MODEL)
    sk.patch_model(model, level=1)
    import torch

    ref = sk.generate(model, torch.tensor([tok("Hello")["input_ids"]]), max_new_tokens=12)
    new = ref[0, 5:].tolist()
    assert out.choices[0].text == tok.decode(new)
    assert out.choices[0].finish_reason == ("stop" if 2 in new else "length")


def test_chat_streaming_with_usage_equals_the_plain_answer(server_url):
    client = _client(server_url)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == plain.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert plain.usage.completion_tokens == 20


def test_stop_strings_and_seeds(server_url):
    client = _client(server_url)
    free = (
        client.completions.create(
            model=MODEL, prompt="abc", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = free[10:12]
    cut = client.completions.create(
        model=MODEL,
        prompt="abc",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.find(stop)]
    kw = {"model": MODEL, "prompt": "seed", "max_tokens": 16, "temperature": 0.9}
    a = client.completions.create(seed=11, **kw).choices[0].text
    b = client.completions.create(seed=11, **kw, extra_body={"top_k": 0}).choices[0].text
    assert a == b


def test_result_cache_hit_is_identical_and_counted(server_url):
    client = _client(server_url)
    kw = {"model": MODEL, "prompt": "cache me", "max_tokens": 10, "temperature": 0}
    before = _metrics(server_url).get("sentinel:cache_hits_total{cache=result}", 0.0)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage == first.usage
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == first.choices[0].text
    after = _metrics(server_url)["sentinel:cache_hits_total{cache=result}"]
    assert after == before + 2


def test_prefix_cache_hit_gives_identical_text_with_fewer_prefill_tokens():
    system = "You are a terse assistant. Answer in one short line, never more. " * 2
    questions = ["What is 2+2?", "Name a color.", "Say hi."]
    texts: dict[int, list[str | None]] = {}
    prompt_tokens: dict[int, float] = {}
    for tokens in (0, 4096):
        with serving(
            lambda tokens=tokens: _tiny_engine(prefix_cache_tokens=tokens), result_cache_size=0
        ) as url:
            client = _client(url)
            out = []
            for q in questions:
                r = client.chat.completions.create(
                    model=MODEL,
                    messages=[
                        {"role": "system", "content": system},
                        {"role": "user", "content": q},
                    ],
                    max_tokens=8,
                    temperature=0,
                )
                out.append(r.choices[0].message.content)
            texts[tokens] = out
            m = _metrics(url)
            prompt_tokens[tokens] = m["sentinel:prompt_tokens_total"]
    assert texts[4096] == texts[0]
    # the first request stores the shared system prompt; the others reuse it
    assert m["sentinel:cache_hits_total{cache=prefix}"] == 2
    assert m["sentinel:cache_misses_total{cache=prefix}"] == 1
    hit = m["sentinel:prefix_cache_hit_tokens_total"]
    assert hit >= 2 * 64
    assert prompt_tokens[4096] == prompt_tokens[0] - hit


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "logprobs": -1}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "logprobs": True}, 400, "logprobs"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 300}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x" * 300}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 999]}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ],
)
def test_errors_look_like_openai(server_url, body, status, param):
    r = httpx.post(server_url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_api_key_is_required_when_set():
    with serving(_tiny_engine, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # stays open
        ok = _client(url, "s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert ok.usage.completion_tokens >= 1


def test_a_flood_gets_429_with_retry_after():
    def small() -> Engine:
        return _tiny_engine(max_slots=1, max_queued=1)

    with serving(small, result_cache_size=0) as url:
        body = {"model": MODEL, "prompt": "flood", "max_tokens": 200, "ignore_eos": True}
        statuses: list[int] = []
        retry: list[str | None] = []

        def post(_: int) -> None:
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            statuses.append(r.status_code)
            retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert set(statuses) <= {200, 429}
        assert all(r == "1" for s, r in zip(statuses, retry, strict=True) if s == 429)
        m = _metrics(url)
        assert m["sentinel:http_responses_total{status=429}"] == statuses.count(429)


def test_a_disconnect_mid_stream_frees_the_slot(server_url):
    body = {
        "model": MODEL,
        "prompt": "long",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.7,
    }
    with httpx.stream("POST", server_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(x.startswith("data: ") or x == "" for x in got)
        assert _metrics(server_url)["sentinel:slots_used"] >= 1
    deadline = time.monotonic() + 30
    while _metrics(server_url)["sentinel:slots_used"] != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    while _metrics(server_url).get("sentinel:requests_total{finish_reason=cancelled}", 0) < 1:
        assert time.monotonic() < deadline, "the cancelled request was not counted"
        time.sleep(0.05)


def _hostile_bodies(n: int) -> list[bytes]:
    rng = random.Random(0)
    fields = [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "stream",
        "messages",
        "stream_options",
        "logprobs",
        "top_k",
        "ignore_eos",
    ]
    values = [
        None,
        True,
        -1,
        0,
        1,
        2**70,
        -(2**70),
        1e308,
        -0.0,
        "NaN",
        "",
        "x" * 5000,
        [],
        {},
        [1, "a"],
        {"a": {"b": []}},
        [[-1]],
        "\ud800",
        3.5,
        [0] * 3,
    ]
    out = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"\xff\xfe\x00",
        b'{"model": NaN}',
        b'{"a":' * 500,
        b"[" * 10000,
        b'{"model": "tiny:llama", "prompt": "\\ud800"}',
        b'{"model": "tiny:llama", "prompt": "x", "temperature": Infinity}',
        b'{"model": "tiny:llama", "prompt": "x", "max_tokens": 1e999}',
        b'{"model": "tiny:llama", "messages": [{"role": "user"}]}',
        b'{"model": "tiny:llama", "messages": [{"role": "wizard", "content": "x"}]}',
    ]
    while len(out) < n:
        body: dict = {}
        for f in rng.sample(fields, rng.randint(0, len(fields))):
            body[f] = rng.choice(values) if rng.random() < 0.8 else MODEL
        raw = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]
        out.append(raw)
    return out


def test_fuzzed_bodies_never_give_5xx(server_url):
    bodies = _hostile_bodies(520)
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + 240
    with httpx.Client(timeout=30) as c:
        for i, raw in enumerate(bodies):
            assert time.monotonic() < deadline, f"fuzz loop too slow at {i}"
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            r = c.post(server_url + path, content=raw, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (raw[:200], r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert "error" in r.json()
    assert httpx.get(server_url + "/health").status_code == 200
    assert statuses.get(400, 0) > 400, statuses


def test_a_request_past_its_timeout_gets_408():
    with serving(_tiny_engine, request_timeout_s=0.05, result_cache_size=0) as url:
        body = {"model": MODEL, "prompt": "slow", "max_tokens": 200, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 30
        while _metrics(url)["sentinel:slots_used"] != 0:  # cancelled, slot freed
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("mode", [[], ["--engine-process"]], ids=["in-process", "engine-process"])
def test_the_serve_command_starts_and_answers(mode):
    """``sentinel-kernels serve`` in a subprocess: port 0 (uvicorn picks a free one, read
    from its log), health, one completion, then SIGTERM stops it (and its engine process)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sentinel_kernels.app.cli", "serve", "--model", MODEL,
           "--level", "1", "--port", "0", "--max-seq-len", "128", "--device", "cpu"]  # fmt: skip
    cmd += mode
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_for_stderr(proc, r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        out = _client(url).completions.create(model=MODEL, prompt="hi", max_tokens=3)
        assert out.usage.completion_tokens >= 1
        engine_pid = httpx.get(url + "/stats").json().get("engine_pid")
        assert (engine_pid is not None) == bool(mode)
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit status -15)
    assert "Finished server process" in rest and proc.returncode in (0, -15), rest[-500:]
    if engine_pid is not None:
        wait_gone(engine_pid)  # stopped with the server


@pytest.mark.model
@needs_smollm2
def test_smollm2_chat_through_the_server():
    def load() -> Engine:
        model, tok = sk.models.load_smollm2()
        sk.patch_model(model, level=2)
        return Engine(model, tok, max_slots=4, max_seq_len=512)

    with serving(load, name="smollm2", ready_s=900.0) as url:
        out = _client(url).chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
    text = out.choices[0].message.content
    assert isinstance(text, str) and text.strip(), out
    assert out.usage.prompt_tokens > 10


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in-process", "engine-process"])
def test_soak_1000_requests_with_cancels_all_accounted_for(mode):
    """1,000 requests from 8 clients (plain and streamed, a fifth of the streams dropped
    midway), bounded to 10 minutes: every request ends with a 200 or a cancel, the engine's
    counters add up, no slot is left in use, memory stays flat, and (engine process) the
    HTTP side's handle holds no request any more."""
    if not __import__("os").path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read memory")
    with contextlib.ExitStack() as stack:
        remote: list[RemoteEngine] = []
        if mode == "in-process":
            load: Callable[[], Any] = lambda: _tiny_engine(max_slots=8)  # noqa: E731
        else:
            ep = stack.enter_context(engine_process("--max-batch-size", "8"))

            def load() -> RemoteEngine:
                remote.append(ep.connect())
                return remote[-1]

        url = stack.enter_context(serving(load, result_cache_size=0))
        outcomes: dict[str, int] = {"ok": 0, "dropped": 0, "other": 0}
        lock = threading.Lock()
        rss: list[float] = []
        deadline = time.monotonic() + 600

        def client(c: int) -> None:
            rng = random.Random(c)
            with httpx.Client(timeout=60) as h:
                for i in range(125):
                    assert time.monotonic() < deadline, "soak test too slow"
                    body = {
                        "model": MODEL,
                        "prompt": "".join(
                            rng.choice("abcdefgh ") for _ in range(rng.randint(1, 40))
                        ),
                        "max_tokens": rng.randint(1, 12),
                        "temperature": rng.choice([0, 0.8]),
                        "ignore_eos": True,
                    }
                    if rng.random() < 0.5:
                        r = h.post(url + "/v1/completions", json=body)
                        kind = "ok" if r.status_code == 200 else "other"
                    else:
                        body["stream"] = True
                        body["max_tokens"] += 10
                        drop = rng.random() < 0.2
                        with h.stream("POST", url + "/v1/completions", json=body) as r:
                            kind = "ok" if r.status_code == 200 else "other"
                            for n, line in enumerate(r.iter_lines()):
                                if drop and n >= 2:
                                    kind = "dropped"
                                    break
                                if line == "data: [DONE]":
                                    break
                    with lock:
                        outcomes[kind] += 1
                    if c == 0 and i in (25, 124):
                        rss.append(_rss_mb())

        from tests.helpers import run_threads

        run_threads(client, 8, timeout=600)
        assert sum(outcomes.values()) == 1000 and outcomes["other"] == 0, outcomes
        end = time.monotonic() + 60
        while True:
            m = _metrics(url)
            finished = sum(v for k, v in m.items() if k.startswith("sentinel:requests_total"))
            if finished == 1000 or time.monotonic() > end:
                break
            time.sleep(0.1)
        assert finished == 1000, (finished, outcomes)
        assert m["sentinel:slots_used"] == 0 and m["sentinel:requests_waiting"] == 0
        assert m["sentinel:requests_running"] == 0
        assert rss[1] - rss[0] < 100, f"memory grew {rss[1] - rss[0]:.0f} MB"
        for eng in remote:
            assert not eng._requests and not eng._unadmitted
            assert eng.stats()["remote_requests"] == 0


@pytest.mark.parametrize("procs", [1, 2])
def test_bench_serve_against_this_server(server_url, tmp_path, procs):
    from sentinel_kernels.app import cli

    argv = ["bench-serve", "--base-url", server_url, "--num-prompts", "24", "--input-len", "8",
            "--output-len", "6", "--request-rate", "200", "--max-concurrency", "6",
            "--client-processes", str(procs), "--out", str(tmp_path), "--disable-tqdm"]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    s = result["summary"]
    assert s["completed"] == 24 and s["failed"] == 0, s
    assert result["config"]["client_processes"] == procs
    assert s["total_output_tokens"] == 24 * 6
    # our streams send the status line and headers before the first token
    assert all(0 < r["headers_s"] <= r["ttft_s"] for r in result["requests"])
    assert (tmp_path / "summary.md").exists() and (tmp_path / "latency.png").exists()


def test_request_log_line_splits_the_server_side_time(server_url):
    """One log line per request: besides the engine's queue / ttft / total, `http_in`
    (reached the server -> submitted to the engine) and, for a stream, `first_out`
    (reached the server -> first text chunk handed to the response)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("sentinel_kernels.serve")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        client = _client(server_url)
        msgs = [{"role": "user", "content": "Hi!"}]
        extra = {"ignore_eos": True, "seed": 11}  # a seed: not served from the result cache
        plain = client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=5, temperature=0.7, extra_body=extra
        )
        list(
            client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=6, temperature=0.7, stream=True,
                extra_body={**extra, "seed": 12},
            )
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while len([x for x in lines if "out=6 " in x]) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (one,) = [x for x in lines if x.startswith(plain.id)]
    (streamed,) = [x for x in lines if "out=6 " in x]
    vals = {}
    for name, line in (("plain", one), ("stream", streamed)):
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        vals[name] = {k: float(v[:-2]) for k, v in fields.items() if v.endswith("ms")}
    assert "first_out" not in vals["plain"] and vals["plain"]["http_in"] >= 0
    s = vals["stream"]
    assert 0 <= s["http_in"] < s["first_out"]
    # the first chunk leaves after the engine's first token (ttft counts from submit)
    assert s["first_out"] >= s["http_in"] + s["ttft"] - 1.0

"""Tests of ``sentinel-kernels bench-serve`` (:mod:`sentinel_kernels.app.bench_serve`).

``summarize`` is checked on synthetic records whose numbers are worked out by hand; the
command runs for real against a fake OpenAI-compatible server (FastAPI + uvicorn on
127.0.0.1, a free port, in a thread) that streams ``K`` content chunks ``DELAY`` seconds
apart, then a usage chunk and ``data: [DONE]``, and records the peak of concurrent requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from sentinel_kernels.app import bench_serve  # noqa: E402
from sentinel_kernels.app.args import UsageError  # noqa: E402
from sentinel_kernels.app.bench_serve import RequestRecord, summarize  # noqa: E402

K = 5  # content chunks per answer
DELAY = 0.02  # seconds before each content chunk
PROMPT_TOKENS = 7  # what the fake server reports as usage.prompt_tokens


# --------------------------------------------------------------------------------------
# The fake server
# --------------------------------------------------------------------------------------


class FakeState:
    """What the fake server saw; its handlers all run on uvicorn's one event loop."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "ok", "429" (every 3rd request), "no_usage", "hang"
        self.arrived = 0
        self.in_flight = 0
        self.peak = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []


def _fake_app(state: FakeState) -> Any:
    app = fastapi.FastAPI()

    def chunk(endpoint: str, text: str | None, role: bool = False) -> str:
        if endpoint == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": None}
        return "data: " + json.dumps({"id": "x", "choices": [choice]}) + "\n\n"

    async def handle(request: Any, endpoint: str) -> Any:
        body = await request.json()
        state.bodies.append(body)
        state.headers.append(dict(request.headers))
        state.arrived += 1
        if state.mode == "429" and state.arrived % 3 == 0:
            return JSONResponse({"error": {"message": "queue full"}}, status_code=429)
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)

        async def gen() -> Any:
            try:
                if endpoint == "chat":  # a role chunk at once: not a content chunk
                    yield chunk(endpoint, None, role=True)
                for i in range(K):
                    await asyncio.sleep(5.0 if state.mode == "hang" else DELAY)
                    yield chunk(endpoint, f" tok{i}")
                if state.mode != "no_usage":
                    usage = {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": K,
                        "total_tokens": PROMPT_TOKENS + K,
                    }
                    yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage})
                    yield "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request) -> Any:
        return await handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request) -> Any:
        return await handle(request, "chat")

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    return app


@contextlib.contextmanager
def fake_server(mode: str = "ok") -> Iterator[tuple[str, FakeState]]:
    """Run the fake server in a thread on a free port; yield ``(base_url, state)``; stop it
    (bounded waits)."""
    state = FakeState(mode)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _fake_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "server thread died"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinel-kernels")
    sub = parser.add_subparsers(dest="command")
    bench_serve.add_parser(sub)
    return parser


def _args(url: str, out: Path, *extra: str) -> argparse.Namespace:
    argv = ["bench-serve", "--base-url", url, "--out", str(out), "--disable-tqdm"]
    argv += ["--model", "m", "--input-len", "16", "--output-len", str(K), "--timeout", "20"]
    return _parser().parse_args([*argv, *extra])


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------------------
# summarize: synthetic records, numbers by hand
# --------------------------------------------------------------------------------------


def _ok(i: int, ttft: float, e2el: float, out: int, inp: int, sent: float) -> RequestRecord:
    """A completed request whose ``out - 1`` inter-token gaps share ``e2el - ttft`` evenly."""
    gaps = [(e2el - ttft) / (out - 1)] * (out - 1) if out > 1 else []
    return RequestRecord(
        i, 0.0, success=True, status=200, ttft_s=ttft, e2el_s=e2el, itl_s=gaps,
        output_tokens=out, input_tokens=inp, sent_at_s=sent, ended_at_s=sent + e2el,
    )  # fmt: skip


def _synthetic() -> list[RequestRecord]:
    return [
        _ok(0, 0.1, 0.5, 5, 10, 0.0),  # TPOT (0.5 - 0.1) / 4 = 0.1 s
        _ok(1, 0.2, 2.2, 11, 20, 0.1),  # TPOT (2.2 - 0.2) / 10 = 0.2 s
        _ok(2, 0.3, 0.3, 1, 30, 0.2),  # one output token: no TPOT, no ITL
        RequestRecord(3, 0.0, status=429, kind="http", sent_at_s=0.6, ended_at_s=0.7),
        RequestRecord(4, 0.0, kind="timeout", sent_at_s=0.6, ended_at_s=0.9),
        RequestRecord(5, 0.0, status=429, kind="http", sent_at_s=1.0, ended_at_s=1.1),
    ]


def test_summarize_by_hand():
    s = summarize(_synthetic(), duration_s=2.0)
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert s["failures"] == {"429": 2, "timeout": 1}
    assert s["total_output_tokens"] == 17 and s["total_input_tokens"] == 60
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.5)
    assert s["total_token_throughput"] == pytest.approx(38.5)
    # TTFT 100, 200, 300 ms: p99 = 200 + 0.98 * 100 (linear between ranks 1 and 2)
    assert s["ttft"]["mean"] == pytest.approx(200.0)
    assert s["ttft"]["median"] == pytest.approx(200.0)
    assert s["ttft"]["p99"] == pytest.approx(298.0)
    assert s["ttft"]["p90"] == pytest.approx(280.0)
    assert s["ttft"]["std"] == pytest.approx(math.sqrt(20000 / 3))
    # TPOT: 100 and 200 ms (the one-token request has none)
    assert s["tpot_samples"] == 2
    assert s["tpot"]["mean"] == pytest.approx(150.0)
    assert s["tpot"]["median"] == pytest.approx(150.0)
    assert s["tpot"]["p99"] == pytest.approx(199.0)
    # ITL pools 4 x 100 ms and 10 x 200 ms
    assert s["itl_samples"] == 14
    assert s["itl"]["mean"] == pytest.approx((400 + 2000) / 14)
    assert s["itl"]["median"] == pytest.approx(200.0)
    assert s["e2el"]["mean"] == pytest.approx(1000.0)
    assert s["e2el"]["median"] == pytest.approx(500.0)
    # intervals [0, .5], [.1, 2.3], [.2, .5], [.6, .7], [.6, .9], [1.0, 1.1]: peak 3
    assert s["max_in_flight"] == 3
    assert s["goodput"] is None


def test_summarize_goodput():
    recs = _synthetic()
    # request 0: ttft 100 tpot 100 good; 1: tpot 200 bad; 2: ttft 300 bad
    s = summarize(recs, 2.0, {"ttft": 250, "tpot": 150})
    assert s["goodput"]["good_requests"] == 1
    assert s["goodput"]["request_goodput"] == pytest.approx(0.5)
    # a request without TPOT passes a TPOT limit (vLLM): requests 0 and 2
    assert summarize(recs, 2.0, {"tpot": 150})["goodput"]["good_requests"] == 2
    # e2el limit 500 ms: requests 0 (500) and 2 (300)
    assert summarize(recs, 4.0, {"e2el": 500})["goodput"]["request_goodput"] == 0.5
    # records as dicts (results.json) give the same summary
    dicts = [json.loads(json.dumps(r.__dict__)) for r in recs]
    assert summarize(dicts, 2.0, {"ttft": 250, "tpot": 150}) == s


def test_summarize_no_success_and_errors():
    s = summarize([RequestRecord(0, 0.0, kind="ConnectError")], 1.0)
    assert s["completed"] == 0 and s["failures"] == {"ConnectError": 1}
    assert s["ttft"] == {"mean": None, "median": None, "p90": None, "p99": None, "std": None}
    assert s["request_throughput"] == 0.0
    md = bench_serve.render_markdown(
        s,
        {
            "endpoint_url": "http://x/v1/completions",
            "model": "m",
            "num_prompts": 1,
            "request_rate": "inf",
            "burstiness": 1.0,
            "max_concurrency": None,
            "prompts": "synthetic",
            "output_len": 4,
            "seed": 0,
        },
    )
    assert "| TTFT | - | - | - | - | - |" in md and "ConnectError: 1" in md
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], 0.0)
    with pytest.raises(ValueError, match="goodput"):
        summarize([], 1.0, {"ttfb": 1.0})
    with pytest.raises(ValueError, match="without ttft"):
        summarize([RequestRecord(0, 0.0, success=True)], 1.0)


def test_percentile_matches_linear_interpolation():
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]  # sorted: 1 1 2 3 4 5 6 9
    assert bench_serve.percentile(xs, 0) == 1.0
    assert bench_serve.percentile(xs, 100) == 9.0
    assert bench_serve.percentile(xs, 50) == pytest.approx(3.5)
    assert bench_serve.percentile(xs, 90) == pytest.approx(6.0 + 0.3 * 3.0)  # pos 6.3
    assert bench_serve.percentile([7.0], 99) == 7.0


# --------------------------------------------------------------------------------------
# Workload: arrivals, prompts, argument checks
# --------------------------------------------------------------------------------------


def test_arrival_times():
    assert bench_serve.arrival_times(4, math.inf) == [0.0] * 4
    a = bench_serve.arrival_times(2000, 50.0, 1.0, seed=3)
    assert a == bench_serve.arrival_times(2000, 50.0, 1.0, seed=3)  # seeded
    assert a != bench_serve.arrival_times(2000, 50.0, 1.0, seed=4)
    assert a[0] == 0.0 and all(y > x for x, y in zip(a, a[1:], strict=False))
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / 50, rel=0.1)

    def cv2(burstiness: float) -> float:
        t = bench_serve.arrival_times(2000, 50.0, burstiness, seed=1)
        g = [y - x for x, y in zip(t, t[1:], strict=False)]
        m = sum(g) / len(g)
        return sum((x - m) ** 2 for x in g) / len(g) / m**2

    # gamma of shape k: squared coefficient of variation 1 / k
    assert cv2(1.0) == pytest.approx(1.0, rel=0.2)
    assert cv2(4.0) == pytest.approx(0.25, rel=0.2)
    assert cv2(0.25) == pytest.approx(4.0, rel=0.35)
    with pytest.raises(ValueError):
        bench_serve.arrival_times(3, 0.0)
    with pytest.raises(ValueError):
        bench_serve.arrival_times(3, 1.0, burstiness=0.0)


def test_synthetic_prompts():
    p = bench_serve.synthetic_prompts(3, 50, seed=0)
    assert p == bench_serve.synthetic_prompts(3, 50, seed=0)
    assert p != bench_serve.synthetic_prompts(3, 50, seed=1)
    assert len(set(p)) == 3
    assert all(len(x.split()) == 50 and set(x.split()) <= set(bench_serve.WORDS) for x in p)


@pytest.mark.parametrize(
    "extra",
    [
        ["--num-prompts", "0"],
        ["--num-prompts", "-3"],
        ["--max-concurrency", "0"],
        ["--client-processes", "0"],
        ["--output-len", "0"],
        ["--input-len", "0"],
        ["--request-rate", "0"],
        ["--request-rate", "-1"],
        ["--request-rate", "fast"],
        ["--request-rate", "nan"],
        ["--burstiness", "0"],
        ["--timeout", "0"],
        ["--goodput", "ttfb:100"],
        ["--goodput", "ttft:-1"],
        ["--goodput", "ttft"],
        ["--endpoint", "embeddings"],
        ["--input-len", "8", "--prompts-file", __file__],
    ],
)
def test_bad_arguments_exit_2(tmp_path, extra, capsys):
    argv = ["bench-serve", "--base-url", "http://127.0.0.1:1", "--out", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["ftp://host:21", "127.0.0.1:8000", "http://", "http://h:x"])
def test_bad_base_url_exit_2(tmp_path, url, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["bench-serve", "--base-url", url, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--base-url" in capsys.readouterr().err


def test_unwritable_out_and_missing_prompts_file_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["bench-serve", "--base-url", "http://127.0.0.1:1"]
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([*base, "--out", str(blocker / "sub")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([*base, "--out", str(tmp_path), "--prompts-file", "/no/such"])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err


def test_parsed_values(tmp_path):
    a = _parser().parse_args(
        ["bench-serve", "--base-url", "http://h:8000/v1/", "--out", str(tmp_path)]
        + ["--request-rate", "inf", "--goodput", "ttft:500, tpot:50 e2e:3000"]
    )
    assert a.base_url == "http://h:8000"
    assert math.isinf(a.request_rate)
    assert a.goodput == {"ttft": 500.0, "tpot": 50.0, "e2el": 3000.0}
    assert a.func is bench_serve.run


# --------------------------------------------------------------------------------------
# The command against the fake server
# --------------------------------------------------------------------------------------


def test_no_ignore_eos_leaves_the_extension_out(tmp_path):
    with fake_server() as (url, state):
        args = _args(url, tmp_path / "run", "--num-prompts", "2", "--no-ignore-eos")
        assert bench_serve.run(args) == 0
    assert len(state.bodies) == 2 and all("ignore_eos" not in b for b in state.bodies)


def test_run_inf_rate_completions(tmp_path, capsys):
    out = tmp_path / "run"
    with fake_server() as (url, state):
        args = _args(url, out, "--num-prompts", "6", "--goodput", "ttft:10000,tpot:10000")
        assert bench_serve.run(args) == 0
    for name in ("results.json", "summary.md", "latency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| TTFT |" in printed and "successful requests | 6" in printed
    assert (out / "summary.md").read_text() in printed

    res = _results(out)
    s = res["summary"]
    assert (s["completed"], s["failed"], s["failures"]) == (6, 0, {})
    assert s["total_output_tokens"] == 6 * K and s["total_input_tokens"] == 6 * PROMPT_TOKENS
    assert s["goodput"]["good_requests"] == 6
    assert res["config"]["request_rate"] == "inf"
    # the requests sent: streaming with usage, max_tokens, ignore_eos
    assert len(state.bodies) == 6
    for body in state.bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == K and body["ignore_eos"] is True and body["model"] == "m"
        assert len(body["prompt"].split()) == 16
    assert len({b["prompt"] for b in state.bodies}) == 6
    for r in res["requests"]:
        assert r["success"] and r["status"] == 200 and r["scheduled_at_s"] == 0.0
        assert r["output_tokens"] == K and r["output_tokens_source"] == "usage"
        assert 0 < r["ttft_s"] < r["e2el_s"]
        assert r["ttft_s"] >= DELAY * 0.9  # the first chunk comes after one sleep
        # the headers come before the first content chunk (they leave before its sleep,
        # but a busy client loop may read both at once, so no stricter bound)
        assert 0 < r["headers_s"] <= r["ttft_s"]
        assert len(r["itl_s"]) == K - 1
        assert sum(r["itl_s"]) == pytest.approx(r["e2el_s"] - r["ttft_s"], abs=1e-6)
    # TPOT by definition from the recorded timings
    tpots = sorted(
        (r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) * 1000 for r in res["requests"]
    )
    assert s["tpot"]["mean"] == pytest.approx(sum(tpots) / len(tpots))
    assert s["tpot"]["median"] == pytest.approx((tpots[2] + tpots[3]) / 2)
    assert s["tpot"]["mean"] >= DELAY * 1000 * 0.9
    headers = sorted(r["headers_s"] * 1000 for r in res["requests"])
    assert s["headers"]["median"] == pytest.approx((headers[2] + headers[3]) / 2)
    assert "| to headers |" in (out / "summary.md").read_text()
    # rate inf and no limit: several requests overlap at the server
    assert state.peak >= 2


def test_run_finite_rate_chat_and_concurrency(tmp_path):
    out = tmp_path / "run"
    with fake_server() as (url, state):
        args = _args(
            url, out, "--endpoint", "chat", "--num-prompts", "8", "--request-rate", "200",
            "--burstiness", "0.5", "--max-concurrency", "2", "--seed", "5",
        )  # fmt: skip
        assert bench_serve.run(args) == 0
    res = _results(out)
    assert res["summary"]["completed"] == 8
    assert state.peak == 2  # the semaphore caps in-flight requests at the server
    assert res["summary"]["max_in_flight"] <= 2
    sched = [r["scheduled_at_s"] for r in res["requests"]]
    assert sched == bench_serve.arrival_times(8, 200.0, 0.5, seed=5)
    for body in state.bodies:
        assert body["messages"][0]["role"] == "user" and "prompt" not in body
    for r in res["requests"]:
        # the role chunk (sent at once) is not the first token
        assert r["ttft_s"] >= DELAY * 0.9 and r["ttft_s"] < r["e2el_s"]
        assert r["sent_at_s"] >= r["scheduled_at_s"]


def test_run_client_processes_share_the_requests(tmp_path):
    """Three client processes: every request sent once, records in index order with the
    same schedule and measurements as one process gives, concurrency split."""
    out = tmp_path / "run"
    with fake_server() as (url, state):
        args = _args(
            url, out, "--endpoint", "chat", "--num-prompts", "7", "--request-rate", "100",
            "--client-processes", "3", "--max-concurrency", "4", "--seed", "3",
        )  # fmt: skip
        assert bench_serve.run(args) == 0
    res = _results(out)
    s = res["summary"]
    assert (s["completed"], s["failed"]) == (7, 0)
    assert s["total_output_tokens"] == 7 * K
    assert res["config"]["client_processes"] == 3
    assert [r["index"] for r in res["requests"]] == list(range(7))
    assert [r["scheduled_at_s"] for r in res["requests"]] == bench_serve.arrival_times(
        7, 100.0, 1.0, seed=3
    )
    # each prompt reached the server exactly once
    sent = sorted(b["messages"][0]["content"] for b in state.bodies)
    assert sent == sorted(bench_serve.synthetic_prompts(7, 16, 3))
    # caps 2 + 1 + 1: never more than 4 in flight at the server
    assert 1 <= state.peak <= 4
    for r in res["requests"]:
        assert r["success"] and r["output_tokens"] == K and len(r["itl_s"]) == K - 1
        assert DELAY * 0.9 <= r["ttft_s"] < r["e2el_s"]
        # one clock for all processes: sent after its own schedule, within the run
        assert r["scheduled_at_s"] <= r["sent_at_s"] <= r["ended_at_s"] <= s["duration_s"]


def test_split_concurrency_keeps_the_limit(tmp_path):
    assert bench_serve._split_concurrency(None, 3) == [None, None, None]
    assert bench_serve._split_concurrency(4, 3) == [2, 1, 1]
    assert sum(bench_serve._split_concurrency(64, 5)) == 64
    with pytest.raises(ValueError):
        bench_serve._split_concurrency(2, 3)
    # fewer processes than asked where requests or the concurrency limit are fewer
    args = _args("http://127.0.0.1:1", tmp_path, "--client-processes", "4")
    assert bench_serve._client_processes(args, 10) == 4
    assert bench_serve._client_processes(args, 3) == 3
    args = _args(
        "http://127.0.0.1:1", tmp_path, "--client-processes", "4", "--max-concurrency", "2"
    )
    assert bench_serve._client_processes(args, 10) == 2


def test_run_counts_429_failures(tmp_path):
    out = tmp_path / "run"
    with fake_server("429") as (url, state):
        assert bench_serve.run(_args(url, out, "--num-prompts", "6")) == 0
    s = _results(out)["summary"]
    # the server refuses its 3rd and 6th request
    assert (s["completed"], s["failed"], s["failures"]) == (4, 2, {"429": 2})
    failed = [r for r in _results(out)["requests"] if not r["success"]]
    assert all(r["status"] == 429 and "queue full" in r["error"] for r in failed)
    assert all(r["ttft_s"] is None for r in failed)
    assert s["total_output_tokens"] == 4 * K
    assert "429: 2" in (out / "summary.md").read_text()


def test_run_without_usage_counts_chunks_and_finds_model(tmp_path):
    out = tmp_path / "run"
    with fake_server("no_usage") as (url, state):
        argv = ["bench-serve", "--base-url", url + "/v1", "--out", str(out), "--disable-tqdm"]
        argv += ["--num-prompts", "2", "--output-len", "9", "--api-key", "sekrit"]
        argv += ["--input-len", "4"]
        assert bench_serve.run(_parser().parse_args(argv)) == 0
    res = _results(out)
    assert res["config"]["model"] == "fake-model"  # from GET /v1/models
    assert all(b["model"] == "fake-model" for b in state.bodies)
    assert all(h.get("authorization") == "Bearer sekrit" for h in state.headers)
    for r in res["requests"]:
        assert r["output_tokens"] == K and r["output_tokens_source"] == "chunks"
        assert r["input_tokens"] == 4 and r["input_tokens_source"] == "estimate"


def test_run_timeout_is_a_failure(tmp_path):
    out = tmp_path / "run"
    with fake_server("hang") as (url, _):
        args = _args(url, out, "--num-prompts", "2")
        args.timeout = 0.3
        t = time.monotonic()
        assert bench_serve.run(args) == 1  # nothing completed
        assert time.monotonic() - t < 5
    s = _results(out)["summary"]
    assert (s["completed"], s["failures"]) == (0, {"timeout": 2})


def test_run_connection_refused_does_not_crash(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    out = tmp_path / "run"
    assert bench_serve.run(_args(f"http://127.0.0.1:{port}", out, "--num-prompts", "3")) == 1
    s = _results(out)["summary"]
    assert s["completed"] == 0 and s["failures"] == {"ConnectError": 3}
    assert (out / "latency.png").is_file()
    # without --model the lookup fails: a message and exit status 1, no traceback
    args = _parser().parse_args(
        ["bench-serve", "--base-url", f"http://127.0.0.1:{port}", "--out", str(out)]
    )
    assert bench_serve.run(args) == 1
    assert "GET /v1/models" in capsys.readouterr().err


def test_run_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\n  second one here \n")
    out = tmp_path / "run"
    with fake_server() as (url, state):
        argv = ["bench-serve", "--base-url", url, "--out", str(out), "--disable-tqdm"]
        argv += ["--model", "m", "--prompts-file", str(prompts), "--num-prompts", "3"]
        assert bench_serve.run(_parser().parse_args(argv)) == 0
    assert sorted(b["prompt"] for b in state.bodies) == sorted(
        ["first prompt", "second one here", "first prompt"]
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = ["bench-serve", "--base-url", "http://127.0.0.1:1", "--out", str(out)]
    with pytest.raises(UsageError, match="no prompts"):
        bench_serve.run(_parser().parse_args([*argv, "--prompts-file", str(empty)]))

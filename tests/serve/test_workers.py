"""``sentinel-kernels serve --http-workers N``: N uvicorn workers on one port in front of
one engine process (``serve/workers.py``), started for real in a subprocess."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import sentinel_kernels as sk  # noqa: E402
from sentinel_kernels.serve.workers import queue_share  # noqa: E402
from tests.helpers import wait_for_stderr  # noqa: E402
from tests.serve.test_remote import wait_gone  # noqa: E402
from tests.serve.test_server import _metrics  # noqa: E402

MODEL = "tiny:llama"


@contextlib.contextmanager
def serve(*flags: str, workers: int = 2) -> Iterator[tuple[str, subprocess.Popen, list[str]]]:
    """The command with ``flags`` on a free port, once each of its ``workers`` has logged
    that it is ready: ``(url, process, stderr lines so far)``; SIGTERM after (bounded
    waits), its stderr drained meanwhile."""
    cmd = [sys.executable, "-m", "sentinel_kernels.app.cli", "serve", "--model", MODEL,
           "--level", "1", "--port", "0", "--max-seq-len", "256", "--device", "cpu",
           *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        url = wait_for_stderr(proc, r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1)
        assert proc.stderr is not None
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        drain.start()
        deadline = time.monotonic() + 180
        while sum("ready: model" in line for line in list(lines)) < workers:
            assert time.monotonic() < deadline and proc.poll() is None, "not ready"
            time.sleep(0.1)
        assert httpx.get(url + "/health").status_code == 200
        # each worker says how long it took to become ready (start-up time in the log)
        ready = [line for line in list(lines) if "ready: model" in line]
        assert all(re.search(r"warmed up in \d+\.\d s", line) for line in ready), ready
        yield url, proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise


def test_queue_share():
    assert [queue_share(256, n) for n in (1, 2, 3, 4)] == [256, 128, 86, 64]
    assert queue_share(1, 4) == 1


def test_two_workers_serve_one_engine_and_sum_their_metrics():
    with serve("--http-workers", "2", "--result-cache-size", "64") as (url, proc, lines):
        engine_pid = httpx.get(url + "/stats").json()["engine_pid"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        n = 12
        outs: list[str] = [""] * n

        def ask(i: int) -> None:  # concurrent: connections land on both workers
            if i % 2:
                out = client.completions.create(
                    model=MODEL, prompt="Hello", max_tokens=10, temperature=0
                )
                outs[i] = out.choices[0].text
            else:
                chunks = client.completions.create(
                    model=MODEL, prompt="Hello", max_tokens=10, temperature=0, stream=True
                )
                outs[i] = "".join(c.choices[0].text for c in chunks)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # greedy: every answer is the level-1 model's own, whichever worker served it
        model, tok = sk.models.load_model(MODEL)
        sk.patch_model(model, level=1)
        import torch

        ids = tok("Hello")["input_ids"]
        ref = sk.generate(model, torch.tensor([ids]), max_new_tokens=10)
        want = tok.decode(ref[0, len(ids) :].tolist())
        assert outs == [want] * n
        m = _metrics(url)
        # the n completions, the /health and /stats calls above
        assert m["sentinel:http_responses_total{status=200}"] == n + 2
        served = sum(v for k, v in m.items() if k.startswith("sentinel:requests_total{"))
        hits = m.get("sentinel:cache_hits_total{cache=result}", 0.0)
        misses = m.get("sentinel:cache_misses_total{cache=result}", 0.0)
        assert hits + misses == n and served == misses  # a hit is not an engine request
        assert m["sentinel:decode_batch_size_count"] >= 1  # from the engine process
        assert m["sentinel:slots_total"] == 64
    assert proc.returncode in (0, -15), "".join(lines)[-1500:]
    log = "".join(lines)
    assert log.count("Started server process") == 2, log[-1500:]
    wait_gone(engine_pid)


def test_each_worker_refuses_past_its_queue_share():
    flags = ("--http-workers", "2", "--max-batch-size", "1", "--max-queued", "2",
             "--result-cache-size", "0")  # fmt: skip
    with serve(*flags) as (url, _, lines):
        body = {"model": MODEL, "prompt": "flood", "max_tokens": 120, "ignore_eos": True}
        statuses: list[int] = []
        retry: list[str | None] = []

        def post() -> None:
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            statuses.append(r.status_code)
            retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=post) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert len(statuses) == 10
        assert set(statuses) <= {200, 429}, (statuses, "".join(lines)[-1500:])
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert all(r == "1" for s, r in zip(statuses, retry, strict=True) if s == 429)
        m = _metrics(url)
        assert m["sentinel:http_responses_total{status=429}"] == statuses.count(429)
        assert m["sentinel:requests_total{finish_reason=length}"] == statuses.count(200)


def test_a_killed_worker_frees_its_slots_and_is_replaced():
    """SIGKILL one worker while streams run: its engine connection closes, the engine
    cancels its requests (slots freed), the other worker keeps serving, and uvicorn's
    supervisor starts a replacement that connects to the same engine."""
    import os
    import re
    import signal

    with serve("--http-workers", "2", "--result-cache-size", "0") as (url, _, lines):
        pids = [int(p) for p in re.findall(r"Started server process \[(\d+)\]", "".join(lines))]
        assert len(pids) == 2
        body = {"model": MODEL, "prompt": "long", "max_tokens": 200, "stream": True,
                "ignore_eos": True}  # fmt: skip
        ends: list[str] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            ends.append("done")
                            return
                ends.append("cut")
            except httpx.HTTPError:
                ends.append("cut")

        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/stats").json()["running"] < 3:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert len(ends) == 6
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                st = httpx.get(url + "/stats").json()
                if st["free_slots"] == st["max_slots"] and st["remote_requests"] == 0:
                    break
            assert time.monotonic() < deadline, "slots of the dead worker's requests not freed"
            time.sleep(0.1)
        while sum("ready: model" in line for line in list(lines)) < 3:
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for _ in range(4):  # both workers answer
            out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
            assert out.usage.completion_tokens >= 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_server_stops_when_its_engine_process_dies(workers):
    """A crashed engine process (SIGKILL) takes the server down with a non-zero status
    and a log line saying why, instead of leaving it answering 503 forever."""
    import os
    import signal

    flags = ("--engine-process", "--http-workers", workers)
    with serve(*flags, workers=int(workers)) as (url, proc, lines):
        engine_pid = httpx.get(url + "/stats").json()["engine_pid"]
        os.kill(engine_pid, signal.SIGKILL)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the server kept running without its engine")
    assert proc.returncode != 0
    assert any("the engine process exited" in line for line in lines), "".join(lines)[-1500:]

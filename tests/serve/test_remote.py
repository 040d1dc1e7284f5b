"""The engine in its own process (``serve/remote.py``): the same requests give the same
answers as the engine in process, and every way the engine process can fail or go away
ends the affected requests with an error instead of leaving them waiting."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.app import cli
from sentinel_kernels.app.args import resolve_device_dtype
from sentinel_kernels.serve import Engine, SamplingParams
from sentinel_kernels.serve.remote import EngineProcess, RemoteEngine
from sentinel_kernels.serve.request import (
    EngineShutdownError,
    QueueFullError,
    RequestFailedError,
)

MODEL = "tiny:llama"
BASE_FLAGS = ["--model", MODEL, "--level", "1", "--max-batch-size", "4", "--max-seq-len", "256",
              "--max-wait-ms", "1", "--prefix-cache-tokens", "0", "--device", "cpu"]  # fmt: skip


def engine_builder(*flags: str) -> functools.partial:
    """What ``sentinel-kernels serve --engine-process FLAGS`` runs in the engine process."""
    args = cli.build_parser().parse_args(["serve", *BASE_FLAGS, *flags])
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    return functools.partial(cli._serve_engine, args, device, dtype)


@contextlib.contextmanager
def engine_process(*flags: str) -> Iterator[EngineProcess]:
    """An engine process with the tiny model (stopped after, bounded waits)."""
    ep = EngineProcess(engine_builder(*flags), log_level=logging.WARNING)
    try:
        yield ep
    finally:
        ep.stop(timeout=30)
        assert not ep.process.is_alive()


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteEngine]:
    with engine_process() as ep:
        eng = ep.connect(timeout=180)
        yield eng
        eng.shutdown()


def _local_engine() -> Engine:
    model, tok = sk.models.load_model(MODEL)
    sk.patch_model(model, level=1)
    return Engine(model, tok, max_slots=4, max_seq_len=256, max_wait_ms=1.0)


def _requests() -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(10):
        n = int(torch.randint(1, 40, (1,), generator=g))
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        if i % 3 == 0:
            sp = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)
        elif i % 3 == 1:
            sp = SamplingParams(max_tokens=15, temperature=0.8, top_k=20, seed=100 + i)
        else:
            sp = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True, stop=["\x00never"])
        out.append((ids, sp))
    return out


def test_same_answers_as_the_engine_in_process(remote: RemoteEngine):
    """Greedy, seeded sampling with top-k, stop strings and logprobs: token ids, text,
    finish reasons equal the in-process engine's and logprobs agree to float32 rounding
    (10 requests at once)."""
    reqs = _requests()
    with _local_engine() as local:
        # stop strings that occur: two characters from the middle of each free answer
        free = local.generate([ids for ids, _ in reqs], [sp for _, sp in reqs])
        for i, ((ids, sp), f) in enumerate(zip(reqs, free, strict=True)):
            if sp.stop:
                reqs[i] = (ids, dataclasses.replace(sp, stop=[f.text[8:10]]))
        want = local.generate([ids for ids, _ in reqs], [sp for _, sp in reqs])
    streams = [remote.submit(ids, sp) for ids, sp in reqs]
    got = [s.result(timeout=120) for s in streams]
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.text == w.text and g.finish_reason == w.finish_reason
        assert g.prompt_token_ids == w.prompt_token_ids
        if w.logprobs is None:
            assert g.logprobs is None
        else:
            # Equal up to float32 rounding, not bit for bit: requests reach the engine
            # process one message at a time, so its steps may batch them differently
            # from the in-process run, and a CPU GEMM's summation order depends on the
            # number of rows (a CI run saw 5e-7 apart on a logprob of -5.12).
            assert len(g.logprobs) == len(w.logprobs)
            for (gl, gtop), (wl, wtop) in zip(g.logprobs, w.logprobs, strict=True):
                assert gl == pytest.approx(wl, rel=1e-5, abs=1e-5)
                assert [t for t, _ in gtop] == [t for t, _ in wtop]
                want_top = [v for _, v in wtop]
                assert [v for _, v in gtop] == pytest.approx(want_top, rel=1e-5, abs=1e-5)
    assert {c.finish_reason for c in got} >= {"length", "stop"}
    t = got[0].timings
    assert t.arrival <= t.admitted <= t.first_token <= t.finished  # one clock
    assert len(t.token_times) == len(got[0].token_ids)


def test_the_engine_process_froze_its_start_up_heap(remote: RemoteEngine):
    # the child only serves: its model, tokenizer and engine leave the full collections
    assert remote.engine_heap_frozen > 1000


def test_streaming_cancel_and_stats(remote: RemoteEngine):
    base = remote.stats()
    sp = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stream = remote.submit([5, 6, 7], sp)
    seen = []
    for t in stream:
        seen.append(t)
        if len(seen) == 3:
            stream.cancel()
    done = stream.result(timeout=60)
    assert done.finish_reason == "cancelled" and 3 <= len(done.token_ids) < 200
    assert done.token_ids[:3] == seen[:3]
    deadline = time.monotonic() + 30
    while (st := remote.stats())["cancelled"] < base["cancelled"] + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert st["free_slots"] == st["max_slots"]


def test_step_sizes_reach_the_observer(remote: RemoteEngine):
    rows: list[int] = []
    remote.step_observer = rows.append
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    streams = [remote.submit([9, 8, 7 + i], sp) for i in range(3)]
    for s in streams:
        s.result(timeout=60)
    deadline = time.monotonic() + 10
    while sum(rows) < 3 * 5:  # the first token of each comes from its prefill
        assert time.monotonic() < deadline, rows
        time.sleep(0.02)
    assert max(rows) <= 4


def test_bad_submissions(remote: RemoteEngine):
    with pytest.raises(ValueError, match="empty"):
        remote.submit([], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        remote.submit([1, 10**6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        remote.submit([1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(TypeError):
        remote.submit([1, 2], {"max_tokens": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        remote.submit([1, "2"], SamplingParams(max_tokens=2))  # type: ignore[list-item]
    s = remote.submit([1, 2], SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="in use"):
        remote.submit([1, 2], SamplingParams(max_tokens=2), request_id="dup")
    s.result(timeout=60)


def test_queue_full_is_refused_at_once():
    with engine_process("--max-batch-size", "1", "--max-queued", "2") as ep:
        eng = ep.connect(timeout=180)
        sp = SamplingParams(max_tokens=150, ignore_eos=True)
        first = eng.submit([1, 2], sp)
        for _ in first:  # it has the only slot
            break
        waiting = [eng.submit([3, 4], sp), eng.submit([5, 6], sp)]
        with pytest.raises(QueueFullError, match="max_queued=2"):
            eng.submit([7, 8], sp)
        for s in [first, *waiting]:
            s.cancel()
        for s in [first, *waiting]:
            assert s.result(timeout=60).finish_reason == "cancelled"
        eng.shutdown()
        assert eng.closed
        with pytest.raises(EngineShutdownError):
            eng.submit([1], sp)


def test_a_failed_build_is_reported():
    with engine_process("--model", "/nonexistent/model/folder") as ep:
        with pytest.raises(RuntimeError, match="could not build the engine"):
            ep.connect(timeout=180)
        # the process waits for stop() (and would exit with this one)
        assert ep.process.is_alive()


def test_a_killed_engine_process_fails_its_requests():
    with engine_process() as ep:
        eng = ep.connect(timeout=180)
        stream = eng.submit([1, 2, 3], SamplingParams(max_tokens=250 - 3, ignore_eos=True))
        for _ in stream:
            break
        os.kill(ep.process.pid, signal.SIGKILL)
        with pytest.raises(RequestFailedError, match="engine process is gone"):
            stream.result(timeout=60)
        deadline = time.monotonic() + 30
        while not eng.closed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(EngineShutdownError):
            eng.submit([1], SamplingParams(max_tokens=2))
        with pytest.raises(EngineShutdownError):
            eng.stats()


def test_the_engine_process_exits_with_its_parent(tmp_path):
    """A server killed without a chance to stop its engine process (SIGKILL) does not
    leave the engine (and its GPU memory) behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import functools
            import os
            from sentinel_kernels.app import cli
            from sentinel_kernels.serve.remote import EngineProcess
            if __name__ == "__main__":
                from sentinel_kernels.app.args import resolve_device_dtype
                args = cli.build_parser().parse_args(["serve", *{BASE_FLAGS!r}])
                device, dtype = resolve_device_dtype(args.device, args.dtype)
                build = functools.partial(cli._serve_engine, args, device, dtype)
                ep = EngineProcess(build)
                ep.connect(timeout=180)
                print(ep.process.pid, flush=True)
                os.kill(os.getpid(), 9)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    wait_gone(int(proc.stdout.split()[0]))


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` has exited (a zombie not yet reaped counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(FileNotFoundError, IndexError):
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.1)


def test_an_http_process_that_stops_reading_is_dropped(monkeypatch):
    """The engine side queues its messages (the engine thread never waits on a socket);
    a connection whose reader stops for ``MAX_BACKLOG`` messages is closed, so its
    requests are cancelled instead of the queue growing without bound."""
    from multiprocessing import Pipe

    from sentinel_kernels.serve import remote as remote_mod

    monkeypatch.setattr(remote_mod, "MAX_BACKLOG", 5)
    ours, theirs = Pipe()
    fwd = remote_mod._Forwarder(ours, engine=None, stats=dict)
    fwd.send(("big", b"x" * (8 << 20)))  # fills the socket: the sender blocks in send
    deadline = time.monotonic() + 10
    while fwd._outbox.qsize():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i in range(5):
        fwd.send(("out", [], [i]))
    assert fwd.alive
    fwd.send(("out", [], [5]))  # the sixth waiting message: dropped
    assert not fwd.alive
    fwd._sender.join(10)
    assert not fwd._sender.is_alive()
    theirs.close()

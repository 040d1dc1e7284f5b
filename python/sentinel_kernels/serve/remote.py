"""The engine in its own process, and the HTTP side's handle of it.

In one process the server's event loop (HTTP parsing, chat templates, tokenization, SSE
writes) and the engine's thread (scheduling, launching the steps) take turns on one
interpreter lock: under a burst each slows the other (``docs/MEASUREMENTS.md``, "Serving:
our server vs transformers serve"). :class:`EngineProcess` runs the engine in a child
process instead (``multiprocessing`` spawn: the child owns the model and the GPU), and
:class:`RemoteEngine` is what the server holds in its place: the same ``submit`` /
``stats`` / ``shutdown`` and the same :class:`~.request.RequestStream` objects, fed over a
local socket. This is the split of vLLM's API server and engine core processes.

Protocol (``multiprocessing.connection`` over a Unix socket in a private temporary
directory, authenticated with a random key; each message is one pickled tuple):

- to the engine: ``("submit", rid, prompt_ids, params)``, ``("cancel", rid)``,
  ``("stats", token)``, ``("steps",)`` (send me the decode batch sizes), ``("bye",)``,
  ``("shutdown",)`` (stop the process; :meth:`EngineProcess.stop`);
- from the engine: ``("hello", info)`` or ``("error", message)`` once, when the engine is
  built or failed to build; ``("out", entries, steps)`` once per engine step that changed
  any of this connection's requests, each entry ``(rid, new_token_ids, new_logprobs,
  finish_reason, error, admitted)``; ``("rejected", rid, kind, message)`` for a submit the
  engine refused; ``("stats", token, dict)``.

The HTTP side keeps a mirror :class:`~.request.Request` per request, fed the engine's
tokens in order: it applies the same stop rules with the same tokenizer, so its text,
finish reason and stream equal the engine-side request's; its times are taken when the
tokens arrive (what a client sees). Only the engine's admission time comes from the
engine process (``time.perf_counter`` is the system-wide monotonic clock on Linux).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from .engine import check_fits, check_prompt_ids
from .heap import freeze_heap
from .metrics import ServerMetrics
from .params import SamplingParams
from .request import (
    EngineError,
    EngineShutdownError,
    QueueFullError,
    Request,
    RequestStream,
    after_batch,
    batched_wakeups,
)

__all__ = ["EngineProcess", "RemoteEngine", "RemoteEngineError", "connect"]

log = logging.getLogger("sentinel_kernels.serve")

#: How long :meth:`RemoteEngine.stats` waits for the engine process's answer.
STATS_TIMEOUT_S = 10.0
#: Messages queued for one HTTP process before the engine process gives up on it (one
#: per engine step: at ~1,000 steps per second, ~20 s of not reading).
MAX_BACKLOG = 20_000


class RemoteEngineError(EngineError):
    """An error raised in the engine process (its type and message, as text)."""


_REJECTIONS: dict[str, type[Exception]] = {
    "QueueFullError": QueueFullError,
    "EngineShutdownError": EngineShutdownError,
    "ValueError": ValueError,
    "TypeError": TypeError,
}


# ------------------------------------------------------------------ engine process side


class _Forwarder:
    """One HTTP process's connection, engine side: its requests' changes go out as one
    ``"out"`` message per engine step.

    Messages are pickled and written by a sender thread of their own, so the engine
    thread only queues them: it never waits on a socket, and one HTTP process that reads
    slowly does not slow the engine for the others. One that stops reading for
    ``MAX_BACKLOG`` messages (tens of seconds of steps) is dropped: its connection is
    closed and its requests cancelled.
    """

    def __init__(self, conn: Connection, engine: Any, stats: Callable[[], dict[str, Any]]) -> None:
        self.conn = conn
        self.engine = engine
        self._stats = stats
        self._lock = threading.Lock()
        self._dirty: dict[str, Request] = {}
        self._sent: dict[str, int] = {}  # tokens already forwarded, per live request
        self._streams: dict[str, RequestStream] = {}
        self._steps: list[int] | None = None  # decode batch sizes, when subscribed
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self.alive = True
        self._sender = threading.Thread(
            target=self._send_loop, name="sentinel-engine-send", daemon=True
        )
        self._sender.start()

    def send(self, msg: tuple[Any, ...]) -> None:
        """Queue ``msg`` for the sender thread."""
        if not self.alive:
            return
        if self._outbox.qsize() >= MAX_BACKLOG:
            log.error("an HTTP process stopped reading its engine messages: dropping it")
            self.alive = False
            self._abort()
            return
        self._outbox.put(msg)

    def _abort(self) -> None:
        """Shut the socket down both ways: the sender blocked in ``send`` and the reader
        blocked in ``recv`` both return (a plain ``close`` wakes neither), and the reader
        cancels this connection's requests."""
        with contextlib.suppress(OSError, ValueError):
            sock = socket.socket(fileno=os.dup(self.conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (OSError, EOFError, ValueError):
                self.alive = False
                return

    def _send_locked(self, msg: tuple[Any, ...]) -> None:
        self.send(msg)  # queued in the order the lock gives

    def changed(self, req: Request) -> None:
        """A request's observer (engine thread)."""
        with self._lock:
            self._dirty[req.id] = req
        after_batch(self.flush)

    def held(self) -> int:
        """Requests of this connection not yet ended and forwarded."""
        with self._lock:
            return len(self._streams)

    def on_step(self, rows: int) -> None:
        with self._lock:
            if self._steps is not None:
                self._steps.append(rows)

    def flush(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            entries = []
            for rid, req in dirty.items():
                with req._lock:
                    n0 = self._sent.get(rid, 0)
                    tokens = req.token_ids[n0:]
                    lps = None if req.logprobs is None else req.logprobs[n0 : n0 + len(tokens)]
                    reason = req.finish_reason
                    error = req.error
                    admitted = req.timings.admitted
                err = None if error is None else f"{type(error).__name__}: {error}"
                entries.append((rid, tokens, lps, reason, err, admitted))
                if reason is not None or error is not None:
                    self._sent.pop(rid, None)
                    self._streams.pop(rid, None)
                else:
                    self._sent[rid] = n0 + len(tokens)
            steps: list[int] = []
            if self._steps:
                steps, self._steps = self._steps, []
            if entries or steps:
                self._send_locked(("out", entries, steps))

    def serve(self) -> bool:
        """Answer this connection until it closes; True when it asked for a shutdown."""
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    return False
                kind = msg[0]
                if kind == "submit":
                    self._submit(*msg[1:])
                elif kind == "cancel":
                    with self._lock:
                        stream = self._streams.get(msg[1])
                    if stream is not None:
                        stream.cancel()
                elif kind == "stats":
                    try:
                        self.send(("stats", msg[1], self._stats()))
                    except Exception as exc:  # answered, never left waiting
                        self.send(("stats", msg[1], {"error": repr(exc)}))
                elif kind == "steps":
                    with self._lock:
                        self._steps = []
                elif kind == "bye":
                    return False
                elif kind == "shutdown":
                    return True
        finally:
            self.alive = False
            self._outbox.put(None)
            self._sender.join(5)
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:  # nobody is left to read them
                stream.cancel()
            with contextlib.suppress(OSError):
                self.conn.close()

    def _submit(self, rid: str, ids: list[int], params: SamplingParams) -> None:
        try:
            stream = self.engine.submit(ids, params, request_id=rid, observer=self.changed)
        except Exception as exc:
            self.send(("rejected", rid, type(exc).__name__, str(exc)))
            return
        with self._lock:
            # Changes before this point are in _dirty already (keyed by rid), so nothing
            # is lost. A request already ended and flushed is not kept.
            if not (stream.done and rid not in self._dirty):
                self._streams[rid] = stream


class _EngineHost:
    """The engine process: a listener, one :class:`_Forwarder` per connection."""

    def __init__(self, address: str, authkey: bytes, metrics: ServerMetrics | None = None) -> None:
        self.listener = Listener(address, family="AF_UNIX", authkey=authkey)
        self.engine: Any = None
        self.metrics = metrics  # multiprocess mode (several HTTP workers), or None
        self.error: str | None = None
        self.heap_frozen = 0  # objects frozen after the build (freeze_heap)
        self.ready = threading.Event()
        self.stop = threading.Event()
        self._forwarders: list[_Forwarder] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="sentinel-engine-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self.listener.accept()
            except (OSError, EOFError):
                if self.stop.is_set():
                    return
                continue
            except Exception:  # a client that failed authentication
                continue
            threading.Thread(
                target=self._connection, args=(conn,), name="sentinel-engine-conn", daemon=True
            ).start()

    def _connection(self, conn: Connection) -> None:
        self.ready.wait()
        try:
            if self.error is not None:
                conn.send(("error", self.error))
                # stay until the client goes: a closed socket would read as a crash
                with contextlib.suppress(EOFError, OSError):
                    while conn.recv()[0] != "shutdown":
                        pass
                    self.stop.set()
                return
            fwd = _Forwarder(conn, self.engine, self.stats)
            with self._lock:
                self._forwarders.append(fwd)
            fwd.send(("hello", {**_hello(self.engine), "heap_frozen": self.heap_frozen}))
            if fwd.serve():
                self.stop.set()
        except (EOFError, OSError):
            return
        finally:
            with self._lock:
                self._forwarders = [f for f in self._forwarders if f.alive]

    def on_step(self, rows: int) -> None:
        for fwd in self._forwarders:
            fwd.on_step(rows)
        if self.metrics is not None:
            self.metrics.observe_step(rows)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            held = sum(f.held() for f in self._forwarders)
        st = {**self.engine.stats(), "engine_pid": os.getpid(), "remote_requests": held}
        if self.metrics is not None and st.get("prefix_cache"):
            self.metrics.sync_prefix(st["prefix_cache"])  # at each scrape of any worker
        return st

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()


def _hello(engine: Any) -> dict[str, Any]:
    return {
        "tokenizer": engine.tokenizer,
        "vocab_size": engine.vocab_size,
        "max_seq_len": engine.max_seq_len,
        "max_slots": engine.max_slots,
        "max_queued": engine.max_queued,
        "output_setting": engine.output_setting,
        "kv_spec": engine.kv_spec,
        "eos_token_ids": sorted(engine.eos_token_ids),
        "pid": os.getpid(),
    }


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)  # the server is gone: nobody to serve; the OS frees the device


def _engine_main(
    build: Callable[[], Any],
    address: str,
    authkey: bytes,
    log_level: int,
    switch_interval_s: float,
    record_metrics: bool,
) -> None:
    """The engine process: build the engine, serve connections until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s [engine] %(message)s")
    sys.setswitchinterval(switch_interval_s)
    threading.Thread(target=_exit_with_parent, name="sentinel-parent-watch", daemon=True).start()
    metrics = None
    if record_metrics:
        metrics = ServerMetrics(multiprocess=True)
    host = _EngineHost(address, authkey, metrics)
    try:
        engine = build()
    except BaseException as exc:
        log.exception("the engine process failed to build the engine")
        host.error = f"{type(exc).__name__}: {exc}"
        host.ready.set()
        host.stop.wait()
        host.close()
        return
    engine.step_observer = host.on_step
    host.engine = engine
    # this process only serves: its start-up heap stays to the end
    host.heap_frozen = freeze_heap()
    host.ready.set()
    try:
        host.stop.wait()
    finally:
        host.close()
        engine.shutdown()


class EngineProcess:
    """Start ``build()`` (a picklable callable returning a started
    :class:`~.engine.Engine`) in a child process and hand out connections to it.

    The child binds a Unix socket in a fresh private directory at once, then builds the
    engine (loading, patching, CUDA-graph capture); :meth:`connect` waits for that and
    returns a :class:`RemoteEngine`, or raises with the build's error. The child exits
    when :meth:`stop` is called, or by itself when this process dies.

    Args:
        build: called in the child; must be picklable (a module-level function or a
            ``functools.partial`` of one), since the child is spawned, not forked.
        log_level: the child's logging level.
        switch_interval_s: the child's ``sys.setswitchinterval``.
        record_metrics: the child records the engine-side server metrics (decode batch
            sizes, prefix cache) into prometheus-client's multiprocess directory, which
            must be set in the environment (``serve --http-workers``).
    """

    def __init__(
        self,
        build: Callable[[], Any],
        *,
        log_level: int = logging.INFO,
        switch_interval_s: float = 0.0005,
        record_metrics: bool = False,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="sentinel-engine-")  # mode 0700
        self.address = os.path.join(self._dir, "engine.sock")
        self._authkey = os.urandom(32)
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(
            target=_engine_main,
            args=(
                build,
                self.address,
                self._authkey,
                log_level,
                switch_interval_s,
                record_metrics,
            ),
            name="sentinel-engine",
            daemon=True,
        )
        self._stopping = False
        self.process.start()

    def watch(self, on_exit: Callable[[int | None], None]) -> None:
        """Call ``on_exit(exit code)`` from a daemon thread if the engine process ends
        without :meth:`stop` (a crash, the OOM killer): a server should not live on
        answering 503 with no engine behind it."""

        def wait() -> None:
            multiprocessing.connection.wait([self.process.sentinel])
            if not self._stopping:
                on_exit(self.process.exitcode)

        threading.Thread(target=wait, name="sentinel-engine-watch", daemon=True).start()

    @property
    def endpoint(self) -> tuple[str, bytes]:
        """``(socket path, authentication key)``: what :func:`connect` needs (another
        process, e.g. an HTTP worker, connects with these)."""
        return self.address, self._authkey

    def connect(
        self,
        timeout: float | None = None,
        *,
        stop_on_shutdown: bool = False,
        queue_limit: int | None = None,
    ) -> RemoteEngine:
        """Wait for the engine (``timeout`` seconds, None: as long as the child lives)
        and return a :class:`RemoteEngine` on a new connection (:func:`connect`). With
        ``stop_on_shutdown`` its :meth:`~RemoteEngine.shutdown` also stops this process
        (a server whose only engine it is: the app's shutdown stops it).

        Raises:
            RuntimeError: the engine failed to build (its error) or the child exited.
            TimeoutError: not ready within ``timeout``.
        """
        proc = self.process
        eng = connect(
            self.address,
            self._authkey,
            timeout=timeout,
            alive=lambda: (proc.is_alive(), proc.exitcode),
            queue_limit=queue_limit,
        )
        if stop_on_shutdown:
            eng._owner = self
        return eng

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine process (its engine cancels what is left) and wait for it;
        killed after ``timeout`` seconds. Idempotent."""
        self._stopping = True
        if self.process.is_alive():
            try:
                conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
            except OSError:
                conn = None
            if conn is not None:
                with contextlib.suppress(OSError, EOFError):
                    if conn.poll(timeout):
                        conn.recv()  # hello or error: the engine is built (or failed)
                        conn.send(("shutdown",))
                conn.close()
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ HTTP process side


def connect(
    address: str,
    authkey: bytes,
    *,
    timeout: float | None = None,
    alive: Callable[[], tuple[bool, int | None]] | None = None,
    queue_limit: int | None = None,
) -> RemoteEngine:
    """Connect to the engine process listening at ``address``, wait until its engine is
    built (``timeout`` seconds; None: no limit) and return a :class:`RemoteEngine`.

    ``alive`` (optional) reports whether the engine process still runs and its exit code,
    to fail fast when it dies while building. ``queue_limit``: this connection's share of
    the waiting queue (default: the engine's ``max_queued``); several HTTP workers split
    the queue so that the engine never refuses what a worker accepted.

    Raises:
        RuntimeError: the engine failed to build (its error), or the process exited.
        TimeoutError: not ready within ``timeout``.
    """
    deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))

    def check_alive(when: str) -> None:
        if alive is not None:
            running, code = alive()
            if not running:
                raise RuntimeError(
                    f"the engine process exited (code {code}) {when}; its log says why"
                )

    while True:
        check_alive("before it was ready")
        try:
            conn = Client(address, family="AF_UNIX", authkey=authkey)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError("the engine process did not open its socket") from None
            time.sleep(0.02)
    try:
        while not conn.poll(0.1):
            check_alive("while building the engine")
            if time.monotonic() > deadline:
                raise TimeoutError("the engine process is not ready yet")
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("the engine process closed the connection") from None
    except BaseException:
        conn.close()
        raise
    if msg[0] == "error":
        with contextlib.suppress(OSError):
            conn.send(("bye",))
        conn.close()
        raise RuntimeError(f"the engine process could not build the engine: {msg[1]}")
    info = dict(msg[1])
    if queue_limit is not None:
        info["max_queued"] = min(info["max_queued"], queue_limit)
    return RemoteEngine(conn, info)


class RemoteEngine:
    """An :class:`~.engine.Engine` in another process, as the server uses it.

    ``submit`` returns a :class:`~.request.RequestStream` at once; ``stats`` asks the
    engine process; ``tokenizer``, ``vocab_size``, ``max_seq_len``, ``max_slots``,
    ``output_setting``, ``eos_token_ids`` are the engine's. Setting ``step_observer``
    subscribes to the decode batch sizes. Thread-safe. Built by
    :meth:`EngineProcess.connect`.
    """

    def __init__(self, conn: Connection, info: dict[str, Any]) -> None:
        self._conn = conn
        self._owner: EngineProcess | None = None  # stopped by shutdown() when set
        self.tokenizer: Any = info["tokenizer"]
        self.vocab_size: int = info["vocab_size"]
        self.max_seq_len: int = info["max_seq_len"]
        self.max_slots: int = info["max_slots"]
        self.max_queued: int = info["max_queued"]
        self.output_setting: str = info["output_setting"]
        self.kv_spec: str = info["kv_spec"]
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        self.engine_pid: int = info["pid"]
        #: Objects the engine process froze out of its collections after start-up.
        self.engine_heap_frozen: int = info.get("heap_frozen", 0)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._unadmitted: set[str] = set()  # submitted, not yet known to have a slot
        self._stats: dict[int, Any] = {}
        self._stats_cond = threading.Condition(self._lock)
        self._tokens = itertools.count()
        self._ids = itertools.count()
        self._closed = False
        self._step_observer: Callable[[int], None] | None = None
        self._reader = threading.Thread(target=self._read, name="sentinel-remote", daemon=True)
        self._reader.start()

    # -- the Engine API the server uses -------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called or the engine process went away."""
        return self._closed

    @property
    def step_observer(self) -> Callable[[int], None] | None:
        """Called with the rows of every decode step of the engine (metrics)."""
        return self._step_observer

    @step_observer.setter
    def step_observer(self, fn: Callable[[int], None] | None) -> None:
        self._step_observer = fn
        if fn is not None:
            self._send(("steps",))

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue token ids ``prompt_ids`` with ``params`` on the engine; the stream at once.

        Raises:
            ValueError: an empty prompt, ids outside the vocabulary, or prompt +
                ``max_tokens`` > ``max_seq_len``.
            TypeError: ``params`` is not :class:`~.params.SamplingParams`.
            QueueFullError: ``max_queued`` of this connection's requests wait for a slot
                (counted here, so never fewer than the engine's own count).
            EngineShutdownError: shut down, or the engine process is gone.
        """
        params = SamplingParams(max_tokens=16) if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = check_prompt_ids(prompt_ids, self.vocab_size)
        check_fits(len(ids), params.max_tokens, self.max_seq_len)
        rid = request_id if request_id is not None else f"remote-{next(self._ids)}"
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        req = Request(rid, ids, params, self.tokenizer, stop_ids, lambda: self._cancel(rid))
        with self._lock:
            if self._closed:
                raise EngineShutdownError("the engine is shut down")
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is in use")
            waiting = len(self._unadmitted)
            if waiting >= self.max_queued:
                raise QueueFullError(
                    f"{waiting} requests are waiting (max_queued={self.max_queued}); retry later"
                )
            self._requests[rid] = req
            self._unadmitted.add(rid)
        if not self._send(("submit", rid, ids, params)):
            with self._lock:
                self._requests.pop(rid, None)
                self._unadmitted.discard(rid)
            raise EngineShutdownError("the engine process is gone")
        return RequestStream(req)

    def stats(self) -> dict[str, Any]:
        """The engine's :meth:`~.engine.Engine.stats`, asked of the engine process, with
        ``engine_pid`` and ``remote_requests`` (requests of all connections whose end has
        not been forwarded yet).

        Raises:
            EngineShutdownError: the engine process is gone or did not answer within
                ``STATS_TIMEOUT_S``.
        """
        token = next(self._tokens)
        if not self._send(("stats", token)):
            raise EngineShutdownError("the engine process is gone")
        deadline = time.monotonic() + STATS_TIMEOUT_S
        with self._stats_cond:
            while token not in self._stats:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise EngineShutdownError("the engine process did not answer")
                self._stats_cond.wait(left)
            st = self._stats.pop(token)
        if "error" in st:
            raise RemoteEngineError(st["error"])
        return dict(st)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Cancel this connection's requests and close it. The engine process keeps
        running for other connections (:meth:`EngineProcess.stop` ends it), unless this
        engine came from ``connect(stop_on_shutdown=True)``. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reqs = list(self._requests.values())
        if self._owner is not None:
            self._owner.stop(timeout if timeout is not None else 30.0)
        for req in reqs:
            req.cancel_requested = True
        self._send(("bye",), force=True)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._reader.join(timeout)
        self._fail_all(EngineShutdownError("the engine was shut down"), cancelled=True)

    # -- internals ----------------------------------------------------------------------

    def _send(self, msg: tuple[Any, ...], force: bool = False) -> bool:
        if self._closed and not force:
            return False
        with self._send_lock:
            try:
                self._conn.send(msg)
            except (OSError, EOFError, ValueError):
                return False
        return True

    def _cancel(self, rid: str) -> None:
        self._send(("cancel", rid))

    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    break
                kind = msg[0]
                if kind == "out":
                    self._deliver(msg[1], msg[2])
                elif kind == "rejected":
                    self._rejected(*msg[1:])
                elif kind == "stats":
                    with self._stats_cond:
                        self._stats[msg[1]] = msg[2]
                        self._stats_cond.notify_all()
        finally:
            ours = self._closed  # shut down here: what is left ends as cancelled
            if not ours:
                log.error("the engine process closed its connection: failing what is left")
            with self._lock:
                self._closed = True
                self._stats_cond.notify_all()
            self._fail_all(EngineShutdownError("the engine process is gone"), cancelled=ours)

    def _deliver(self, entries: list[Any], steps: list[int]) -> None:
        now = time.perf_counter()
        with batched_wakeups():
            for rid, tokens, lps, reason, err, admitted in entries:
                with self._lock:
                    req = self._requests.get(rid)
                    if admitted is not None or reason is not None or err is not None:
                        self._unadmitted.discard(rid)
                if req is None:
                    continue
                if admitted is not None and req.timings.admitted is None:
                    req.timings.admitted = admitted
                try:
                    for i, token in enumerate(tokens):
                        req.emit(token, now, lps[i] if lps is not None else None)
                except Exception as exc:  # this request only
                    req.fail(exc)
                if err is not None:
                    req.fail(RemoteEngineError(err))
                elif reason is not None:
                    req.finish(reason, now)
                if req.done and (reason is not None or err is not None):
                    with self._lock:
                        self._requests.pop(rid, None)
        observe = self._step_observer
        if observe is not None:
            for rows in steps:
                observe(rows)

    def _rejected(self, rid: str, kind: str, message: str) -> None:
        with self._lock:
            req = self._requests.pop(rid, None)
            self._unadmitted.discard(rid)
        if req is not None:
            req.fail(_REJECTIONS.get(kind, RemoteEngineError)(message))

    def _fail_all(self, error: BaseException, cancelled: bool) -> None:
        with self._lock:
            reqs = list(self._requests.values())
            self._requests.clear()
            self._unadmitted.clear()
        with batched_wakeups():
            for req in reqs:
                if cancelled:
                    req.finish("cancelled")
                else:
                    req.fail(error)

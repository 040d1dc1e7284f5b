"""Several HTTP worker processes in front of one engine process (``serve --http-workers N``).

With the engine in its own process (:mod:`.remote`), one HTTP process still parses every
request, renders every chat template, tokenizes every prompt and writes every SSE chunk on
one event loop; under a burst that loop is the queue in front of the first token
(``docs/MEASUREMENTS.md``). Here uvicorn's own multiprocess supervisor runs ``N`` copies of
the app on one listening socket (the kernel spreads the connections over them), each
connected to the same engine process: the split of vLLM's ``--api-server-count``.

What each worker has of its own: the result cache (a hit needs the same worker: ``N``
smaller caches, each bounded by ``--result-cache-size``), the request log lines, and a
share ``ceil(max_queued / N)`` of the waiting queue (it refuses with 429 past its share;
the engine's own limit is ``N`` shares, so it never refuses what a worker accepted). The
metrics are summed over the processes through prometheus-client's multiprocess directory
(:class:`~.metrics.ServerMetrics`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from .. import settings
from .remote import EngineProcess, connect
from .server import ServerConfig, create_app

__all__ = ["app_from_env", "queue_share", "run_workers"]


def queue_share(max_queued: int, workers: int) -> int:
    """One worker's share of a waiting queue of ``max_queued``: ``ceil(max_queued / N)``."""
    return -(-max_queued // workers)


def run_workers(
    config: ServerConfig,
    engine: EngineProcess,
    *,
    workers: int,
    host: str,
    port: int,
    queue_limit: int,
    log_level: str = "info",
    switch_interval_s: float = 0.0005,
) -> None:
    """Serve ``config`` with ``workers`` uvicorn worker processes connected to ``engine``
    until the supervisor is stopped (SIGINT / SIGTERM). ``queue_limit``: each worker's
    share of the waiting queue. ``PROMETHEUS_MULTIPROC_DIR`` must be set (and was, before
    the engine process started)."""
    if workers < 2:
        raise ValueError(f"workers must be >= 2, got {workers} (one worker: create_app)")
    address, authkey = engine.endpoint
    spec = {
        "config": dataclasses.asdict(config),
        "address": address,
        "authkey": authkey.hex(),
        "queue_limit": queue_limit,
        "engine_pid": engine.process.pid,
        "log_level": log_level,
        "switch_interval_s": switch_interval_s,
    }
    with settings.override(settings.SERVE_WORKER_ENV, json.dumps(spec)):
        uvicorn.run(
            f"{__name__}:app_from_env",
            factory=True,
            workers=workers,
            host=host,
            port=port,
            log_level=log_level,
        )


def app_from_env() -> FastAPI:
    """The app of one HTTP worker (uvicorn's factory, called in the worker process):
    what :func:`run_workers` wrote to ``SENTINEL_SERVE_WORKER``."""
    spec: dict[str, Any] = settings.serve_worker()
    logging.basicConfig(
        level=str(spec["log_level"]).upper(), format="%(asctime)s %(name)s %(message)s"
    )
    sys.setswitchinterval(float(spec["switch_interval_s"]))
    config = ServerConfig(**spec["config"])
    authkey = bytes.fromhex(spec["authkey"])
    address = str(spec["address"])
    limit = int(spec["queue_limit"])
    pid = int(spec["engine_pid"])

    def load() -> Any:
        return connect(address, authkey, alive=lambda: (_running(pid), None), queue_limit=limit)

    return create_app(load, config, multiprocess_metrics=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Prometheus metrics of the server (``GET /metrics``), names prefixed ``sentinel:``.

One ``prometheus_client.CollectorRegistry`` per app (tests start several). Engine gauges
(running, waiting, slots used) and counters (prompt and generated tokens) are read from
:meth:`~.engine.Engine.stats` at scrape time; per-request histograms (queue time, time to
first token, inter-token latency, end-to-end latency) are observed when a request finishes;
the decode batch size per step is observed by the engine's ``step_observer``. Cache hits
and misses by cache level, requests by finish reason, HTTP responses by status.

With several HTTP worker processes (``serve --http-workers N``) every process records into
prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set by the
command before any of them starts) and a scrape of any worker sums them: each worker
counts its own requests and responses, the engine process counts the decode batch sizes
and the prefix cache, and the engine gauges are the values of the latest scrape.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from .request import Completion

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's metrics and their registry.

    Args:
        multiprocess: record into prometheus-client's multiprocess directory and render
            the sum over every process that records there (several HTTP workers and the
            engine process). Needs ``PROMETHEUS_MULTIPROC_DIR`` set before
            ``prometheus_client`` was first imported in this process.

    Raises:
        RuntimeError: ``multiprocess`` without prometheus-client in multiprocess mode.
    """

    def __init__(self, multiprocess: bool = False) -> None:
        if multiprocess and values.ValueClass is values.MutexValue:
            raise RuntimeError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                "prometheus_client is imported"
            )
        self.multiprocess = multiprocess
        r = self.registry = CollectorRegistry()
        p = "sentinel:"

        def gauge(name: str, doc: str) -> Gauge:
            # the engine's values, set at each scrape: with several processes, the latest
            return Gauge(p + name, doc, registry=r, multiprocess_mode="mostrecent")

        self.running = gauge("requests_running", "requests decoding")
        self.waiting = gauge("requests_waiting", "requests waiting for a slot")
        self.prefilling = gauge("requests_prefilling", "requests being prefilled")
        self.slots_used = gauge("slots_used", "cache slots in use")
        self.slots_total = gauge("slots_total", "cache slots")
        self.prompt_tokens = gauge(
            "prompt_tokens_total", "prompt tokens prefilled (engine counter)"
        )
        self.generation_tokens = gauge(
            "generation_tokens_total", "tokens generated (engine counter)"
        )

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(p + name, doc, buckets=_LATENCY_BUCKETS, registry=r)

        self.queue_time = latency("queue_time_seconds", "arrival to admission")
        self.ttft = latency("time_to_first_token_seconds", "arrival to the first new token")
        self.itl = latency("inter_token_latency_seconds", "gap between consecutive new tokens")
        self.e2e = latency("e2e_request_latency_seconds", "arrival to finish")
        self.batch = Histogram(
            p + "decode_batch_size", "rows per decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.requests = Counter(
            p + "requests", "finished requests by finish reason", ["finish_reason"], registry=r
        )
        self.cache_hits = Counter(p + "cache_hits", "cache hits by level", ["cache"], registry=r)
        self.cache_misses = Counter(
            p + "cache_misses", "cache misses by level", ["cache"], registry=r
        )
        self.http_responses = Counter(
            p + "http_responses", "HTTP responses by status", ["status"], registry=r
        )
        self.prefix_hit_tokens = Counter(
            p + "prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache", registry=r
        )
        self._prefix_seen: dict[str, int] = {}
        self._prefix_lock = threading.Lock()

    def observe_step(self, rows: int) -> None:
        """One decode step of ``rows`` rows (the engine's ``step_observer``)."""
        self.batch.observe(rows)

    def observe_request(self, done: Completion) -> None:
        """A finished request's latencies and outcome."""
        t = done.timings
        if t.queue_s is not None:
            self.queue_time.observe(t.queue_s)
        if t.ttft_s is not None:
            self.ttft.observe(t.ttft_s)
        for gap in t.inter_token_s:
            self.itl.observe(gap)
        if t.total_s is not None:
            self.e2e.observe(t.total_s)
        self.requests.labels(finish_reason=done.finish_reason).inc()

    def sync_prefix(self, prefix: dict[str, int]) -> None:
        """Catch the prefix-cache counters up with the engine's own counts
        (``stats()["prefix_cache"]``): at each scrape, in the process that owns them."""
        with self._prefix_lock:
            self._sync_prefix_locked(prefix)

    def _sync_prefix_locked(self, prefix: dict[str, int]) -> None:
        for key, counter in (("hits", self.cache_hits), ("misses", self.cache_misses)):
            delta = prefix[key] - self._prefix_seen.get(key, 0)
            if delta > 0:
                counter.labels(cache="prefix").inc(delta)
                self._prefix_seen[key] = prefix[key]
        delta = prefix["hit_tokens"] - self._prefix_seen.get("hit_tokens", 0)
        if delta > 0:
            self.prefix_hit_tokens.inc(delta)
            self._prefix_seen["hit_tokens"] = prefix["hit_tokens"]

    def cache_event(self, cache: str, hit: bool) -> None:
        """Count a hit or a miss of cache level ``cache``."""
        (self.cache_hits if hit else self.cache_misses).labels(cache=cache).inc()

    def render(self, stats: dict[str, Any] | None, results: Any) -> bytes:
        """The Prometheus text exposition, with the engine gauges refreshed from ``stats``
        (and, in multiprocess mode, every process's metrics summed)."""
        if stats is not None:
            self.running.set(stats["running"])
            self.waiting.set(stats["waiting"])
            self.prefilling.set(stats["prefilling"])
            self.slots_total.set(stats["max_slots"])
            self.slots_used.set(stats["max_slots"] - stats["free_slots"])
            self.prompt_tokens.set(stats["prefill_tokens"])
            self.generation_tokens.set(stats["generated_tokens"])
            if stats.get("prefix_cache") and not self.multiprocess:
                self.sync_prefix(stats["prefix_cache"])  # else the engine process does
        if self.multiprocess:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return bytes(generate_latest(merged))
        return bytes(generate_latest(self.registry))

"""``sentinel-kernels bench-serve``: load-test an OpenAI-compatible server.

Usage::

    sentinel-kernels bench-serve --base-url http://127.0.0.1:8000 --num-prompts 200 \\
        --request-rate 8 [--burstiness 1.0] [--input-len 512 | --prompts-file FILE] \\
        [--output-len 128] [--max-concurrency 32] --out DIR [--model NAME] [--api-key KEY] \\
        [--endpoint completions|chat] [--seed 0] [--goodput ttft:500,tpot:50] \\
        [--timeout 300] [--client-processes 1] [--disable-tqdm]

Every request streams (``stream: true``, ``stream_options: {"include_usage": true}``,
``max_tokens = --output-len``, ``temperature: 0``, and ``"ignore_eos": true``, an extension
of vLLM and TGI that other servers may ignore, so the output can stop early there). The
metrics have the definitions of vLLM's ``vllm bench serve`` (``benchmarks/serve.py`` and
``benchmarks/lib/endpoint_request_func.py`` in the vLLM repository):

* a *content chunk* is a streamed event whose first choice carries non-empty text
  (``choices[0].text`` on ``/v1/completions``, ``choices[0].delta.content`` on
  ``/v1/chat/completions``); a chat "role" chunk with empty content is not one (vLLM counts
  any chunk with choices: a server that sends the role before the first token would look
  faster than it is);
* TTFT: time from sending the request to the first content chunk;
* E2E latency: time from sending the request to the last content chunk;
* time to headers (ours, not vLLM's): time from sending the request to the response's
  status line and headers, which a streaming server sends once it has taken the request;
  TTFT minus it is the server making and delivering the first token;
* TPOT (per request): ``(E2E - TTFT) / (output_tokens - 1)``; requests with one output token
  have none;
* ITL: every gap between successive content chunks, all requests pooled;
* output tokens of a request: ``usage.completion_tokens`` of the final usage chunk, else
  (server without usage) the number of content chunks;
* request throughput: completed requests / benchmark duration; output-token throughput:
  output tokens of the completed requests / duration; the duration runs from the first
  arrival to the end of the last request;
* goodput (``--goodput ttft:MS,tpot:MS,e2el:MS``, any subset): completed requests whose
  TTFT, TPOT and E2E are all within the given limits (a request without TPOT passes the
  TPOT limit, as in vLLM), per second of duration.

Latency statistics are reported in milliseconds: mean, median (p50), p90, p99 and std;
percentiles interpolate linearly between the closest ranks (NumPy's default).

Arrivals: the first request is sent at once, then inter-arrival gaps are drawn from a gamma
distribution of shape ``--burstiness`` and mean ``1 / --request-rate`` (burstiness 1 is a
Poisson process; below 1 burstier, above 1 more regular), seeded by ``--seed``; with
``--request-rate inf`` every request arrives at time 0. ``--max-concurrency`` caps the
requests in flight with a semaphore (an arrived request waits for a free slot; its TTFT
counts from when it is sent).

Client processes: at tens of thousands of streamed chunks a second one Python client
process spends more CPU on reading and parsing them than it has, and its own lag then
shows up as TTFT and ITL. ``--client-processes N`` spreads the requests round robin over
N spawned processes, each with its own event loop and connections (and
``--max-concurrency`` split between them); they start together on one clock
(``time.perf_counter``, system-wide), so the records are as from one process.

Prompts: ``--prompts-file`` (one prompt per line, blank lines skipped, used in order and
cycled when there are fewer than ``--num-prompts``), else synthetic prompts of
``--input-len`` words drawn (seeded) from :data:`WORDS`, common short English words that are
single tokens, with their leading space, in GPT-2-style BPE vocabularies: a prompt of N
words is about N tokens (exactly N with SmolLM2-135M's tokenizer, checked), plus what the
server adds (BOS, chat template); other tokenizers may split a few words. Input tokens
are taken from the server's ``usage.prompt_tokens`` when it reports them, else estimated
as the prompt's whitespace-separated word count.

Failed requests (an HTTP status other than 200, connection errors, timeouts, an error event
in the stream, a stream without any content chunk) never stop the run: they are counted by
status code or error kind (``{"429": 3, "timeout": 1}``) and left out of the latency
statistics. ``--timeout`` bounds each request (default 300 s).

Outputs in ``--out``: ``results.json`` (config, per-request records, summary),
``summary.md`` (the tables, also printed) and ``latency.png`` (TTFT and ITL histograms and
the latency percentiles). Exit status 0 when at least one request completed, 1 when none
did (the files are written either way), 2 on a usage error.

This module imports neither torch nor the package's torch modules; httpx, matplotlib and
tqdm are imported when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import __version__
from .args import UsageError, check_input_path, check_output_dir, positive_int

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ENDPOINTS",
    "GOODPUT_KEYS",
    "WORDS",
    "RequestRecord",
    "add_parser",
    "arrival_times",
    "parse_goodput",
    "percentile",
    "render_markdown",
    "run",
    "summarize",
    "synthetic_prompts",
    "write_png",
]

#: ``--endpoint`` choices and the path each one posts to (below the base URL).
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
#: ``--goodput`` keys (limits in milliseconds).
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
_GOODPUT_ALIASES = {"e2e": "e2el"}
#: Latency metrics of the summary: key prefix and table label.
_METRICS = (
    ("ttft", "TTFT"),
    ("tpot", "TPOT"),
    ("itl", "ITL"),
    ("e2el", "E2E"),
    ("headers", "to headers"),
)
_STATS = ("mean", "median", "p90", "p99", "std")

#: Words of the synthetic prompts: common short English words, each one token with its
#: leading space in GPT-2-style BPE vocabularies, so N words make about N tokens.
WORDS = tuple(
    """
    the of and to in is that it was for on are as with his they at be this have from or
    one had by word but not what all were we when your can said there use an each which
    she do how their if will up other about out many then them these so some her would
    make like him into time has look two more write go see number no way could people my
    than first water been call who oil its now find long down day did get come made may
    part over new sound take only little work know place year live me back give most very
    after thing our just name good man think say great where help through much before line
    right too mean old any same tell boy follow came want show also around form three
    small set put end does another well large must big even such because turn here why ask
    went men read need land different home us move try kind hand picture again change off
    play spell air away animal house point page letter mother answer found study still
    learn should world high every near add food between own below country plant last school
    father keep tree never start city earth eye light thought head under story saw left few
    while along might close something seem next hard open example begin life always those
    both paper together got group often run important until children side feet car mile
    night walk white sea began grow took river four carry state once book hear stop without
    second later miss idea enough eat face watch far really almost let above girl sometimes
    mountain cut young talk soon list song being leave family
    """.split()
)


# --------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------


def _request_rate(value: str) -> float:
    """argparse ``type``: a request rate, ``> 0`` requests/s, or ``inf``."""
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of requests/s or 'inf', got {value!r}"
        ) from None
    if math.isnan(rate) or rate <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'inf'), got {value!r}")
    return rate


def _positive_float(value: str) -> float:
    """argparse ``type``: a finite number ``> 0``."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return x


def _base_url(value: str) -> str:
    """argparse ``type``: an ``http://`` or ``https://`` URL with a host; returned without a
    trailing ``/`` or ``/v1`` (the endpoint paths add ``/v1/...``)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: the scheme must be http:// or https:// (e.g. http://127.0.0.1:8000)"
        )
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r}: no host")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None
    url = value.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _strip_option(message: str, option: str, value: str) -> str:
    prefix = f"{option} {value}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _out_dir(value: str) -> Path:
    """argparse ``type``: a folder that exists or can be created, and is writable."""
    try:
        return check_output_dir("--out", value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(_strip_option(str(exc), "--out", value)) from None


def _prompts_file(value: str) -> Path:
    """argparse ``type``: an existing file (its content is checked when the command runs)."""
    try:
        path = check_input_path("--prompts-file", value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(_strip_option(str(exc), "--prompts-file", value)) from None
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a folder; give a text file")
    return path


def parse_goodput(value: str) -> dict[str, float]:
    """Parse ``--goodput``: ``KEY:MS`` pairs separated by commas or spaces, keys from
    :data:`GOODPUT_KEYS` (``e2e`` is accepted for ``e2el``), limits in milliseconds ``> 0``.

    Returns ``{key: ms}``. Raises :class:`argparse.ArgumentTypeError` (argparse reports it
    as a usage error) on an empty value, an unknown or repeated key, or a bad number.
    """
    out: dict[str, float] = {}
    items = [s for s in value.replace(",", " ").split() if s]
    if not items:
        raise argparse.ArgumentTypeError("expected KEY:MS pairs such as ttft:500,tpot:50")
    for item in items:
        key, sep, ms = item.partition(":")
        key = _GOODPUT_ALIASES.get(key.strip().lower(), key.strip().lower())
        if not sep or key not in GOODPUT_KEYS:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}"
            )
        if key in out:
            raise argparse.ArgumentTypeError(f"{key} given twice")
        try:
            out[key] = _positive_float(ms)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{item!r}: {exc}") from None
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench-serve`` subcommand on ``subparsers`` (the object returned by
    ``ArgumentParser.add_subparsers``); its handler is :func:`run`
    (``set_defaults(func=run)``). Returns the subparser.

    Per-value checks are argparse types (a usage error and exit status 2 at parse time):
    counts ``>= 1``, a rate ``> 0`` or ``inf``, an ``http(s)://`` base URL, an ``--out``
    folder that can be created and written, an existing ``--prompts-file``, a well-formed
    ``--goodput``.
    """
    p = subparsers.add_parser(
        "bench-serve",
        help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput, goodput)",
        description=(
            "Send --num-prompts streaming requests to an OpenAI-compatible server at "
            "--request-rate (gamma arrivals of shape --burstiness; inf: all at once), at most "
            "--max-concurrency in flight; report TTFT, TPOT, ITL and end-to-end latency "
            "(mean, median, p90, p99), request and output-token throughput and goodput, with "
            "the definitions of vLLM's `bench serve`. Writes results.json, summary.md and "
            "latency.png into --out."
        ),
    )
    p.add_argument(
        "--base-url",
        type=_base_url,
        required=True,
        help="server URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)",
    )
    p.add_argument(
        "--endpoint",
        choices=tuple(ENDPOINTS),
        default="completions",
        help="completions (/v1/completions, default) or chat (/v1/chat/completions)",
    )
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=positive_int, default=100, help="requests to send (100)")
    p.add_argument(
        "--request-rate",
        type=_request_rate,
        default=float("inf"),
        help="mean arrival rate in requests/s, or inf (default): all requests at time 0",
    )
    p.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="shape of the gamma inter-arrival distribution (1.0 = Poisson; <1 burstier)",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=None,
        help="most requests in flight at once (default: no limit)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--input-len",
        type=positive_int,
        default=None,
        help="synthetic prompt length in words, about one token each (default 1024)",
    )
    src.add_argument(
        "--prompts-file",
        type=_prompts_file,
        help="a UTF-8 text file of prompts, one per line (used in order, cycled)",
    )
    p.add_argument(
        "--output-len", type=positive_int, default=128, help="max_tokens per request (128)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (0)")
    p.add_argument(
        "--goodput",
        type=parse_goodput,
        default=None,
        metavar="KEY:MS[,KEY:MS]",
        help="service-level limits in ms for goodput: ttft, tpot, e2el (e.g. ttft:500,tpot:50)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="seconds one request may take, connection to end of stream (300)",
    )
    p.add_argument(
        "--out",
        type=_out_dir,
        required=True,
        help="folder for results.json, summary.md and latency.png (created if needed)",
    )
    p.add_argument(
        "--client-processes",
        type=positive_int,
        default=1,
        help="client processes sharing the requests (round robin), each with its own event "
        "loop and connections (1). One Python process reading tens of thousands of "
        "streamed chunks a second falls behind the server and adds its own lag to TTFT "
        "and ITL; --max-concurrency is then split between the processes (at most one "
        "process per request in flight)",
    )
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send the 'ignore_eos' extension (servers that refuse unknown fields, "
        "e.g. transformers serve, answer 422 to it)",
    )
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------


def synthetic_prompts(n: int, input_len: int, seed: int) -> list[str]:
    """``n`` prompts of ``input_len`` words each, drawn uniformly (with replacement) from
    :data:`WORDS` with ``random.Random(f"{seed}:prompts")``; about ``input_len`` tokens each
    (see the module docstring). Deterministic for a given ``seed``."""
    rng = random.Random(f"{seed}:prompts")
    return [" ".join(rng.choices(WORDS, k=input_len)) for _ in range(n)]


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds (from the start of the run) of ``n`` requests.

    The first request arrives at 0; each gap after it is drawn from a gamma distribution of
    shape ``burstiness`` and scale ``1 / (rate * burstiness)`` (mean ``1 / rate``,
    coefficient of variation ``1 / sqrt(burstiness)``), with
    ``random.Random(f"{seed}:arrivals")``: burstiness 1 is a Poisson process. ``rate = inf``
    gives ``n`` zeros. As vLLM's ``benchmarks/serve.py`` (``get_request``).

    Raises:
        ValueError: ``n < 0``, ``rate <= 0`` or NaN, ``burstiness <= 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a finite number > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"{seed}:arrivals")
    theta = 1.0 / (rate * burstiness)
    out: list[float] = []
    t = 0.0
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, theta)
        out.append(t)
    return out


def _load_prompts(path: Path, n: int) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"--prompts-file {path}: cannot read it ({type(exc).__name__}: {exc})"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--prompts-file {path}: no prompts (every line is blank)")
    return [lines[i % len(lines)] for i in range(n)]


# --------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request measured. Times in seconds; ``*_at_s`` fields are offsets from the
    start of the run (``time.perf_counter`` clock).

    ``kind`` is ``""`` on success, else ``"http"`` (status other than 200, in ``status``),
    ``"timeout"``, ``"stream"`` (an error event, or no content chunk) or the name of the
    exception (``"ConnectError"``, ...). ``ttft_s`` and ``e2el_s`` are ``None`` unless a
    content chunk arrived; ``itl_s`` holds the gaps between successive content chunks.
    ``headers_s`` is the time from sending the request to its response's status line and
    headers (``None`` if they never came): a streaming server sends them once it has taken
    the request, so TTFT splits into getting the request in (``headers_s``) and making and
    delivering the first token (``ttft_s - headers_s``).
    """

    index: int
    scheduled_at_s: float
    success: bool = False
    status: int | None = None
    kind: str = ""
    error: str = ""
    sent_at_s: float | None = None
    ended_at_s: float | None = None
    ttft_s: float | None = None
    e2el_s: float | None = None
    headers_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = "chunks"
    input_tokens: int = 0
    input_tokens_source: str = "estimate"


def _content(endpoint: str, data: Mapping[str, Any]) -> str | None:
    """The text of the first choice of a streamed event, ``None`` without choices."""
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], Mapping):
        return None
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return ""
        text = delta.get("content") or delta.get("reasoning_content") or ""
    else:
        text = choice.get("text") or ""
    return text if isinstance(text, str) else ""


def _body(
    endpoint: str, model: str, prompt: str, output_len: int, ignore_eos: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(
        max_tokens=output_len,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def _stream_one(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    endpoint: str,
    rec: RequestRecord,
    t0: float,
) -> None:
    """Send one streaming request and fill ``rec`` as the events arrive (so a timeout
    leaves what was measured so far)."""
    st = time.perf_counter()
    rec.sent_at_s = st - t0
    last = st
    chunks = 0
    async with client.stream("POST", url, json=body) as resp:
        rec.headers_s = time.perf_counter() - st
        rec.status = resp.status_code
        if resp.status_code != 200:
            raw = await resp.aread()
            rec.kind = "http"
            rec.error = f"HTTP {resp.status_code}: {raw[:300].decode('utf-8', 'replace')}"
            return
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments (":ping"), event:/id: fields
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                break
            now = time.perf_counter()
            try:
                data = json.loads(payload)
            except json.JSONDecodeError:
                rec.kind, rec.error = "stream", f"not JSON: {payload[:200]!r}"
                return
            if not isinstance(data, Mapping):
                continue
            if data.get("error") is not None:
                rec.kind, rec.error = "stream", f"error event: {str(data['error'])[:300]}"
                return
            usage = data.get("usage")
            if isinstance(usage, Mapping):
                if isinstance(usage.get("completion_tokens"), int):
                    rec.output_tokens = usage["completion_tokens"]
                    rec.output_tokens_source = "usage"
                if isinstance(usage.get("prompt_tokens"), int):
                    rec.input_tokens = usage["prompt_tokens"]
                    rec.input_tokens_source = "usage"
            text = _content(endpoint, data)
            if not text:
                continue
            if chunks == 0:
                rec.ttft_s = now - st
            else:
                rec.itl_s.append(now - last)
            last = now
            chunks += 1
            rec.e2el_s = now - st
    if chunks == 0:
        rec.kind, rec.error = "stream", "the stream carried no content chunk"
        return
    if rec.output_tokens_source != "usage":
        rec.output_tokens = chunks
    rec.success = True


async def _bounded(
    work: Coroutine[Any, Any, None], rec: RequestRecord, t0: float, timeout: float
) -> RequestRecord:
    """Run ``work`` (a :func:`_stream_one` filling ``rec``) bounded by ``timeout`` seconds;
    every exception becomes a failed record (cancellation excepted)."""
    import httpx

    try:
        await asyncio.wait_for(work, timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        rec.success, rec.kind = False, "timeout"
        rec.error = f"no complete answer within {timeout:g} s ({type(exc).__name__})"
    except Exception as exc:
        rec.success, rec.kind = False, type(exc).__name__
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.ended_at_s = time.perf_counter() - t0
    if not rec.success:
        rec.output_tokens = 0
    return rec


class _NoModel(RuntimeError):
    """``--model`` not given and ``GET /v1/models`` did not name one."""


async def _fetch_model(client: httpx.AsyncClient, base_url: str, timeout: float) -> str:
    """The first model id of ``GET /v1/models``; :class:`_NoModel` when there is none."""
    try:
        resp = await asyncio.wait_for(client.get(base_url + "/v1/models"), timeout)
        if resp.status_code != 200:
            raise _NoModel(f"GET /v1/models answered HTTP {resp.status_code}")
        data = resp.json().get("data") or []
    except _NoModel:
        raise
    except Exception as exc:  # connection refused, timeout, not JSON, ...
        raise _NoModel(f"GET /v1/models failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        raise _NoModel("GET /v1/models listed no model")
    if not data[0].get("id"):
        raise _NoModel("GET /v1/models listed no model")
    return str(data[0]["id"])


def _client(args: argparse.Namespace, max_concurrency: int | None) -> httpx.AsyncClient:
    """The HTTP client of one process: ``--api-key`` header, at most ``max_concurrency``
    connections (no limit: ``None``), ``--timeout``."""
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=max_concurrency, max_keepalive_connections=max_concurrency
    )
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(args.timeout))


async def _drive(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    model: str,
    share: Sequence[int],
    prompts: Sequence[str],
    offsets: Sequence[float],
    t0: float,
    max_concurrency: int | None,
    done: Any,
) -> list[RequestRecord]:
    """Send requests ``share`` (indices into ``prompts`` / ``offsets``), each at ``t0`` +
    its offset (``time.perf_counter`` clock); ``done()`` after each one ends."""
    url = args.base_url + ENDPOINTS[args.endpoint]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int) -> RequestRecord:
        rec = RequestRecord(index=i, scheduled_at_s=offsets[i])
        rec.input_tokens = len(prompts[i].split())
        body = _body(args.endpoint, model, prompts[i], args.output_len, args.ignore_eos)
        try:
            async with sem if sem is not None else contextlib.nullcontext():
                work = _stream_one(client, url, body, args.endpoint, rec, t0)
                return await _bounded(work, rec, t0, args.timeout)
        finally:
            done()

    tasks: list[asyncio.Task[RequestRecord]] = []
    try:
        for i in share:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _client_processes(args: argparse.Namespace, n: int) -> int:
    """The client processes a run uses: ``--client-processes``, at most one per request
    and, with ``--max-concurrency``, one per allowed request in flight (each process
    needs at least one)."""
    return min(args.client_processes, n, args.max_concurrency or n)


def _split_concurrency(total: int | None, parts: int) -> list[int | None]:
    """``--max-concurrency`` split between ``parts <= total`` client processes, as evenly
    as it goes (the parts sum to ``total``)."""
    if total is None:
        return [None] * parts
    if parts > total:
        raise ValueError(f"{parts} client processes cannot share {total} requests in flight")
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


async def _bench(
    args: argparse.Namespace, prompts: Sequence[str], offsets: Sequence[float]
) -> tuple[str, list[RequestRecord], float]:
    """Run the benchmark: ``(model, records, duration_s)``."""
    from tqdm import tqdm

    async with _client(args, args.max_concurrency) as client:
        model = args.model or await _fetch_model(client, args.base_url, args.timeout)
        procs = _client_processes(args, len(prompts))
        if procs > 1:
            records, duration = await asyncio.to_thread(
                _bench_processes, args, model, prompts, offsets, procs
            )
            return model, records, duration
        bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=args.disable_tqdm)
        t0 = time.perf_counter()
        try:
            records = await _drive(
                args,
                client,
                model,
                range(len(prompts)),
                prompts,
                offsets,
                t0,
                args.max_concurrency,
                lambda: bar.update(1),
            )
        finally:
            bar.close()
        duration = time.perf_counter() - t0
    return model, records, duration


#: Seconds between the last client process reporting ready and the common start time.
_START_DELAY_S = 0.2


def _bench_processes(
    args: argparse.Namespace,
    model: str,
    prompts: Sequence[str],
    offsets: Sequence[float],
    procs: int,
) -> tuple[list[RequestRecord], float]:
    """The requests spread round robin over ``procs`` spawned client processes
    (:func:`_client_process`). Once all have started (imports, event loop), they get one
    start time on the ``time.perf_counter`` clock, which on Linux, macOS and Windows is
    one system-wide monotonic clock, so every record's offsets share one origin. The
    duration runs from that start to the end of the last request."""
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    start = ctx.Value("d", 0.0)
    go = ctx.Event()
    caps = _split_concurrency(args.max_concurrency, procs)
    opts = {k: v for k, v in vars(args).items() if k != "func"}
    workers = [
        ctx.Process(
            target=_client_process,
            args=(opts, model, list(range(k, len(prompts), procs)), prompts, offsets, caps[k]),
            kwargs={"events": events, "start": start, "go": go},
            daemon=True,
        )
        for k in range(procs)
    ]
    for w in workers:
        w.start()
    bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=args.disable_tqdm)
    records: list[RequestRecord] = []
    ready = finished = 0
    duration = 0.0
    try:
        while finished < procs:
            try:
                kind, value = events.get(timeout=1.0)
            except Exception:  # queue.Empty: check that no process died silently
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    hint = (
                        ""
                        if ready == procs
                        else " before it started (a script that calls bench-serve itself "
                        "must do so under `if __name__ == '__main__':`, since each client "
                        "process imports the main module again)"
                    )
                    raise RuntimeError(
                        f"a bench-serve client process exited with status {dead[0].exitcode}{hint}"
                    ) from None
                continue
            if kind == "ready":
                ready += 1
                if ready == procs:
                    start.value = time.perf_counter() + _START_DELAY_S
                    go.set()
            elif kind == "done":
                bar.update(1)
            elif kind == "records":
                records.extend(RequestRecord(**r) for r in value["records"])
                duration = max(duration, value["duration_s"])
                finished += 1
            elif kind == "error":
                raise RuntimeError(f"a bench-serve client process failed: {value}")
    finally:
        bar.close()
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
    records.sort(key=lambda r: r.index)
    return records, duration


def _client_process(
    opts: dict[str, Any],
    model: str,
    share: list[int],
    prompts: Sequence[str],
    offsets: Sequence[float],
    max_concurrency: int | None,
    *,
    events: Any,
    start: Any,
    go: Any,
) -> None:
    """One client process of :func:`_bench_processes`: report ready, wait for the start
    time, send ``share``, report each end and then every record (as dicts)."""
    args = argparse.Namespace(**opts)

    async def main() -> tuple[list[RequestRecord], float]:
        async with _client(args, max_concurrency) as client:
            events.put(("ready", None))
            await asyncio.to_thread(go.wait)
            t0 = start.value
            records = await _drive(
                args,
                client,
                model,
                share,
                prompts,
                offsets,
                t0,
                max_concurrency,
                lambda: events.put(("done", None)),
            )
            return records, time.perf_counter() - t0

    try:
        records, duration = asyncio.run(main())
    except BaseException as exc:
        events.put(("error", f"{type(exc).__name__}: {exc}"))
        raise
    events.put(("records", {"records": [asdict(r) for r in records], "duration_s": duration}))


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 <= q <= 100``) of non-empty ``values``, interpolating
    linearly between the closest ranks (as ``numpy.percentile``'s default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {s: None for s in _STATS}
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    return {
        "mean": mean,
        "median": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "std": math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)),  # population, as np.std
    }


def _field(rec: RequestRecord | Mapping[str, Any], name: str, default: Any = None) -> Any:
    if isinstance(rec, Mapping):
        return rec.get(name, default)
    return getattr(rec, name, default)


def _failure_key(rec: RequestRecord | Mapping[str, Any]) -> str:
    kind = _field(rec, "kind") or "error"
    status = _field(rec, "status")
    return str(status) if kind == "http" and status is not None else str(kind)


def _peak_in_flight(intervals: Iterable[tuple[float, float]]) -> int:
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = cur = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def summarize(
    records: Sequence[RequestRecord | Mapping[str, Any]],
    duration_s: float,
    goodput: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The summary of a run: counts, throughputs, goodput and latency statistics.

    Args:
        records: :class:`RequestRecord` objects, or mappings with the same fields (as in
            ``results.json``); fields read: ``success``, ``status``, ``kind``, ``ttft_s``,
            ``e2el_s``, ``itl_s``, ``output_tokens``, ``input_tokens`` (and ``sent_at_s``,
            ``ended_at_s`` for the observed concurrency).
        duration_s: the run's wall time in seconds (``> 0``).
        goodput: limits in ms, keys among :data:`GOODPUT_KEYS`, or ``None``.

    Returns:
        A JSON-ready dict: ``num_requests``, ``completed``, ``failed``, ``failures``
        (``{status or error kind: count}``), ``duration_s``, ``total_input_tokens``,
        ``total_output_tokens`` (completed requests), ``request_throughput`` (req/s),
        ``output_throughput`` and ``total_token_throughput`` (tokens/s), ``goodput``
        (``None``, or ``{"slo_ms", "good_requests", "request_goodput"}``),
        ``max_in_flight`` (peak of overlapping sent-to-ended intervals), and for each of
        ``ttft``, ``tpot``, ``itl``, ``e2el`` and ``headers`` (time to the response
        headers of the completed requests; no samples in records without ``headers_s``):
        ``{"mean", "median", "p90", "p99", "std"}``
        in milliseconds (``None`` values when there is no sample), plus ``tpot_samples``
        and ``itl_samples``. Definitions: the module docstring (vLLM's ``bench serve``):
        TPOT per request is ``(e2el - ttft) / (output_tokens - 1)`` for requests with more
        than one output token; ITL pools every request's chunk gaps.

    Raises:
        ValueError: ``duration_s <= 0``, an unknown goodput key, a completed record
            without ``ttft_s`` / ``e2el_s``.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    slo = dict(goodput or {})
    unknown = set(slo) - set(GOODPUT_KEYS)
    if unknown:
        raise ValueError(f"unknown goodput keys {sorted(unknown)}; use {GOODPUT_KEYS}")

    ttfts: list[float] = []
    headers: list[float] = []
    e2els: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    failures: dict[str, int] = {}
    total_in = total_out = good = 0
    intervals: list[tuple[float, float]] = []
    for rec in records:
        sent, ended = _field(rec, "sent_at_s"), _field(rec, "ended_at_s")
        if sent is not None and ended is not None:
            intervals.append((float(sent), float(ended)))
        if not _field(rec, "success", False):
            key = _failure_key(rec)
            failures[key] = failures.get(key, 0) + 1
            continue
        ttft, e2el = _field(rec, "ttft_s"), _field(rec, "e2el_s")
        if ttft is None or e2el is None:
            raise ValueError(f"completed request {_field(rec, 'index')} without ttft/e2el")
        n_out = int(_field(rec, "output_tokens", 0) or 0)
        total_out += n_out
        total_in += int(_field(rec, "input_tokens", 0) or 0)
        ttfts.append(float(ttft))
        if _field(rec, "headers_s") is not None:
            headers.append(float(_field(rec, "headers_s")))
        e2els.append(float(e2el))
        itls.extend(float(x) for x in (_field(rec, "itl_s") or ()))
        tpot = (float(e2el) - float(ttft)) / (n_out - 1) if n_out > 1 else None
        if tpot is not None:
            tpots.append(tpot)
        if slo:
            # a request without a TPOT passes the TPOT limit (vLLM counts its TPOT as 0)
            measured = {"ttft": float(ttft), "tpot": tpot or 0.0, "e2el": float(e2el)}
            if all(measured[k] * 1000.0 <= limit for k, limit in slo.items()):
                good += 1

    completed = len(ttfts)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": completed,
        "failed": len(records) - completed,
        "failures": dict(sorted(failures.items())),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "goodput": (
            {"slo_ms": slo, "good_requests": good, "request_goodput": good / duration_s}
            if slo
            else None
        ),
        "max_in_flight": _peak_in_flight(intervals),
        "tpot_samples": len(tpots),
        "itl_samples": len(itls),
    }
    for key, values in (
        ("ttft", ttfts),
        ("tpot", tpots),
        ("itl", itls),
        ("e2el", e2els),
        ("headers", headers),
    ):
        summary[key] = _stats_ms(values)
    return summary


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def render_markdown(summary: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """``summary.md``: a header line with the run's settings, the throughput table and the
    latency table (ms)."""
    failures = summary["failures"]
    failed = str(summary["failed"])
    if failures:
        failed += " (" + ", ".join(f"{k}: {v}" for k, v in failures.items()) + ")"
    conc = config.get("max_concurrency")
    lines = [
        f"# bench-serve: {config['endpoint_url']} ({config['model']})",
        "",
        f"{config['num_prompts']} requests, rate {config['request_rate']} req/s, burstiness "
        f"{config['burstiness']}, max concurrency {conc if conc else 'unlimited'}, "
        f"prompts: {config['prompts']}, max_tokens {config['output_len']}, seed "
        f"{config['seed']}.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| successful requests | {summary['completed']} |",
        f"| failed requests | {failed} |",
        f"| duration (s) | {_fmt(summary['duration_s'])} |",
        f"| total input tokens | {summary['total_input_tokens']} |",
        f"| total output tokens | {summary['total_output_tokens']} |",
        f"| request throughput (req/s) | {_fmt(summary['request_throughput'])} |",
        f"| output token throughput (tok/s) | {_fmt(summary['output_throughput'])} |",
        f"| total token throughput (tok/s) | {_fmt(summary['total_token_throughput'])} |",
    ]
    gp = summary.get("goodput")
    if gp:
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in gp["slo_ms"].items())
        lines.append(
            f"| request goodput (req/s; {slo}) | {_fmt(gp['request_goodput'])} "
            f"({gp['good_requests']} good) |"
        )
    lines.append(f"| peak requests in flight | {summary['max_in_flight']} |")
    lines += [
        "",
        "| latency (ms) | mean | median | p90 | p99 | std |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in _METRICS:
        st = summary.get(key)
        if st is None:  # a summary written before the metric existed
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(st[s]) for s in _STATS) + " |")
    return "\n".join(lines) + "\n"


def write_png(path: Path, records: Sequence[RequestRecord], summary: Mapping[str, Any]) -> None:
    """``latency.png``: histograms of TTFT and ITL (ms) of the completed requests, and the
    median / p90 / p99 of TTFT, TPOT, ITL and E2E as grouped bars (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    ttft = [r.ttft_s * 1000.0 for r in ok if r.ttft_s is not None]
    itl = [x * 1000.0 for r in ok for x in r.itl_s]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        if ttft or itl:
            if ttft:
                ax1.hist(ttft, bins=min(40, max(5, len(ttft))), alpha=0.6, label="TTFT")
            if itl:
                ax1.hist(itl, bins=min(40, max(5, len(itl))), alpha=0.6, label="ITL")
            ax1.legend()
        else:
            ax1.text(0.5, 0.5, "no completed request", ha="center", va="center")
        ax1.set_xlabel("ms")
        ax1.set_ylabel("count")
        ax1.set_title("TTFT and ITL distribution")

        shown = [(key, label) for key, label in _METRICS if summary.get(key) is not None]
        labels = [label for _, label in shown]
        width = 0.27
        for j, stat in enumerate(("median", "p90", "p99")):
            vals = [summary[key][stat] or 0.0 for key, _ in shown]
            ax2.bar([i + (j - 1) * width for i in range(len(labels))], vals, width, label=stat)
        ax2.set_xticks(range(len(labels)))
        ax2.set_xticklabels(labels)
        ax2.set_ylabel("ms")
        ax2.set_title("latency percentiles")
        ax2.legend()
        fig.suptitle(
            f"{summary['completed']} completed, {summary['failed']} failed, "
            f"{summary['request_throughput']:.2f} req/s, "
            f"{summary['output_throughput']:.1f} output tok/s"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``bench-serve`` with parsed ``args`` (from the parser of :func:`add_parser`):
    send the requests, print the summary table, write ``results.json``, ``summary.md`` and
    ``latency.png`` into ``args.out``.

    Returns 0 when at least one request completed, 1 when none did or ``--model`` was not
    given and ``GET /v1/models`` failed. Raises :class:`UsageError` for a
    ``--prompts-file`` without prompts or that cannot be read (``sentinel-kernels`` prints
    it as a usage error, exit status 2).
    """
    n = args.num_prompts
    if args.prompts_file is not None:
        prompts = _load_prompts(Path(args.prompts_file), n)
        prompt_desc = f"file {args.prompts_file}"
    else:
        input_len = args.input_len if args.input_len is not None else 1024
        prompts = synthetic_prompts(n, input_len, args.seed)
        prompt_desc = f"synthetic, {input_len} words (about 1 token each)"
    offsets = arrival_times(n, args.request_rate, args.burstiness, args.seed)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot create it ({exc})") from None

    try:
        model, records, duration = asyncio.run(_bench(args, prompts, offsets))
    except _NoModel as exc:  # failed requests are records, never exceptions
        print(f"bench-serve: error: {exc}; pass --model", file=sys.stderr)
        return 1
    except ImportError as exc:  # httpx is not a dependency of the library itself
        print(f"bench-serve: error: needs httpx (pip install httpx): {exc}", file=sys.stderr)
        return 1

    summary = summarize(records, duration, args.goodput)
    rate = args.request_rate
    config = {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "endpoint_url": args.base_url + ENDPOINTS[args.endpoint],
        "model": model,
        "num_prompts": n,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "client_processes": _client_processes(args, n),
        "input_len": None if args.prompts_file is not None else len(prompts[0].split()),
        "prompts_file": None if args.prompts_file is None else str(args.prompts_file),
        "prompts": prompt_desc,
        "output_len": args.output_len,
        "seed": args.seed,
        "goodput_slo_ms": args.goodput,
        "timeout_s": args.timeout,
        "api_key_given": bool(args.api_key),
        "sentinel_kernels": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    table = render_markdown(summary, config)
    results = {
        "config": config,
        "summary": summary,
        "requests": [asdict(r) for r in records],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(table, encoding="utf-8")
    written = [out / "results.json", out / "summary.md"]
    try:
        write_png(out / "latency.png", records, summary)
        written.append(out / "latency.png")
    except ImportError as exc:  # matplotlib is a dependency, but a bare machine may lack it
        print(f"no latency.png: {exc}")
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if summary["completed"] else 1

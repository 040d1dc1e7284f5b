"""The ``sentinel-kernels`` command (also ``python -m sentinel_kernels.app.cli``).

Subcommands:

* ``info``: versions, available backends, GPU, CPU SIMD level, torch threads;
* ``demo``: load SmolLM2-135M-Instruct and measure patch levels 0-3 (perplexity, tokens/s
  at batch 1 and 16, memory, a sample; :mod:`sentinel_kernels.app.demo` does the work);
  prints a table, writes a PNG chart and optionally JSON;
* ``profile``: :mod:`sentinel_kernels.app.profile.command`;
* ``serve``: the OpenAI-compatible server (:mod:`sentinel_kernels.serve.server`) over the
  continuous-batching engine;
* ``bench-serve``: the load tool of any OpenAI-compatible server (:mod:`.bench_serve`).

This module imports no torch (nor transformers, nor the package's torch modules) at import
time: building the parser and ``--help`` of every subcommand stay fast; each subcommand
imports torch and what needs it when it runs (the only function-local imports here).

Arguments are checked before any model is loaded, with the helpers of :mod:`.args`
(re-exported here); a :class:`UsageError` is printed by :func:`main` argparse-style
(``sentinel-kernels COMMAND: error: ...``, exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, settings
from .args import (
    DTYPE_CHOICES,
    UsageError,
    add_device_arguments,
    add_knn_arguments,
    check_input_path,
    check_output_dir,
    check_output_file,
    dist_version,
    int_at_least,
    knn_options,
    positive_int,
    resolve_device_dtype,
)
from .bench_serve import add_parser as add_bench_serve_parser
from .profile.command import add_parser as add_profile_parser

if TYPE_CHECKING:
    from .demo import DEMO_PROMPT, EXCERPT  # at run time: __getattr__

__all__ = [
    "DEMO_PROMPT",
    "DTYPE_CHOICES",
    "EXCERPT",
    "SERVE_SWITCH_INTERVAL_MS",
    "UsageError",
    "add_device_arguments",
    "build_parser",
    "check_input_path",
    "check_output_dir",
    "check_output_file",
    "collect_info",
    "int_at_least",
    "main",
    "positive_int",
    "resolve_device_dtype",
]

#: ``sentinel-kernels serve``'s thread switch interval in ms (``--switch-interval-ms``): with
#: Python's 5 ms a thread that blocks for 1 ms while another runs Python takes ~6.3 ms per
#: wait, with 0.5 ms ~1.7 ms (``bench/bench_gil_handoff.py``, CPU).
SERVE_SWITCH_INTERVAL_MS = 0.5

# Re-exported from .demo (tests, users), imported on first use (it imports torch).
_FROM_DEMO = {"DEMO_PROMPT", "EXCERPT"}


def __getattr__(name: str) -> Any:
    if name in _FROM_DEMO:
        from . import demo

        value = getattr(demo, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> Any:
    """The subparser of ``command`` (for its ``error``), else ``parser`` itself."""
    for action in parser._actions:
        if command is not None and isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command, parser)
    return parser


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------


def _native() -> tuple[Any | None, str]:
    """``(module, "")`` when ``sentinel_kernels._C`` imports, else ``(None, reason)``."""
    try:
        from .. import _C
    except Exception as exc:  # not built, or built for another Python: report, don't fail
        return None, f"{type(exc).__name__}: {exc}"
    return _C, ""


def collect_info() -> dict[str, str]:
    """What ``sentinel-kernels info`` prints, as an ordered ``{label: value}`` dict."""
    import torch

    info: dict[str, str] = {
        "sentinel-kernels": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "transformers": dist_version("transformers"),
    }

    cuda = torch.cuda.is_available()
    native, why = _native()
    backends = ["reference: yes"]
    backends.append("native (_C): yes" if native is not None else f"native (_C): no ({why})")
    try:
        import triton  # noqa: F401

        if cuda:
            backends.append("triton: yes, on the GPU")
        else:
            interp = settings.triton_interpret()
            state = "on" if interp else "off"
            backends.append(
                f"triton: interpreter only (no GPU; needs TRITON_INTERPRET=1, now {state})"
            )
    except Exception as exc:
        backends.append(f"triton: no ({type(exc).__name__})")
    info["backends"] = "; ".join(backends)

    if cuda:
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = (
            f"{props.name} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))"
        )
    else:
        info["gpu"] = "none"

    simd = "unknown (sentinel_kernels._C not available)"
    if native is not None:
        try:
            simd = str(native.simd_level())
        except Exception as exc:
            simd = f"unknown (_C.simd_level() failed: {type(exc).__name__}: {exc})"
    info["cpu simd"] = simd
    info["cpu"] = f"{platform.machine()}, {os.cpu_count()} logical core(s)"
    info["torch threads"] = str(torch.get_num_threads())
    return info


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _demo_text(path: str | None) -> tuple[Path, str]:
    """``(path, text)`` of the demo's text (``--text`` or the bundled excerpt), checked
    to be a readable UTF-8 file of at least two lines (calibration / evaluation split)."""
    from . import demo

    text_path = check_input_path("--text", path) if path else demo.EXCERPT
    if text_path.is_dir():
        raise UsageError(f"--text {path}: is a folder; give a text file")
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        demo.split_text(text)
    except ValueError as exc:
        raise UsageError(f"--text {path}: {exc}") from None
    return text_path, text


def _cmd_demo(args: argparse.Namespace) -> int:
    # Everything is checked before the model loads (and before torch is imported, where
    # possible): a usage error costs no waiting.
    if args.model_path:
        check_input_path("--model-path", args.model_path)
    if args.json:
        check_output_file("--json", args.json)
    if not args.no_png:
        check_output_file("--png", args.png)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    text_path, text = _demo_text(args.text)

    import torch

    from .. import models
    from . import demo

    cpu = device.type == "cpu"
    max_new = args.max_new_tokens or (32 if cpu else 64)

    split = None
    if cpu and args.split_threads is not None:
        split = args.split_threads or torch.get_num_threads()

    print("loading SmolLM2-135M-Instruct ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        model, tokenizer = models.load_smollm2(device=device, dtype=dtype, path=args.model_path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    result = demo.run_demo(
        model,
        tokenizer,
        levels=args.levels,
        text=text,
        text_name=text_path.name,
        window=args.window,
        max_windows=args.windows,
        chunk=args.chunk,
        max_new_tokens=max_new,
        batch_size=args.batch_size,
        repeats=args.repeats,
        split_threads=split,
        progress=not args.no_progress,
        model_name="SmolLM2-135M-Instruct",
    )
    print(demo.format_report(result), flush=True)

    if args.json:
        print(f"\nwrote {demo.write_json(result, args.json)}")
    if not args.no_png:
        if not demo.matplotlib_available():
            print("\nno PNG: matplotlib is not installed (pip install matplotlib)")
        else:
            try:
                print(f"\nwrote {demo.write_png(result, args.png)}")
            except Exception as exc:  # a chart must never cost the measured results
                print(f"\nno PNG: {type(exc).__name__}: {exc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sentinel-kernels``."""
    parser = argparse.ArgumentParser(
        prog="sentinel-kernels",
        description="Inference kernels for Hugging Face causal LMs: info, demo, profile, serve, "
        "bench-serve.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, backends, GPU and CPU features")
    p_info.set_defaults(func=_cmd_info)

    p_demo = sub.add_parser(
        "demo",
        help="SmolLM2 per patch level: perplexity, tokens/s at batch 1 and 16, memory, a sample",
        description="Load SmolLM2-135M-Instruct and measure each patch level: perplexity on "
        "the bundled WikiText-2 excerpt (the first 40% of its lines calibrate level 3, the "
        "rest is scored), also through the level's KV cache; greedy tokens/s at batch 1 "
        "and 16; weight, KV-cache and (CUDA) peak memory; one sample. Prints a table and "
        "writes a PNG chart.",
    )
    add_device_arguments(p_demo)
    p_demo.add_argument(
        "--levels",
        type=int,
        nargs="+",
        choices=[0, 1, 2, 3],
        default=[0, 1, 2, 3],
        help="patch levels to run (default: 0 1 2 3)",
    )
    p_demo.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="new tokens per row of the speed runs and the sample (default 64 on CUDA, 32 on "
        "the CPU)",
    )
    p_demo.add_argument(
        "--batch-size", type=positive_int, default=16, help="rows of the batched speed run (16)"
    )
    p_demo.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed calls per speed run, the fastest counts (default 3: on a shared CPU single "
        "calls of the same generation varied 5x)",
    )
    p_demo.add_argument(
        "--split-threads",
        type=positive_int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="CPU: levels >= 1 generate with torch on 1 thread and the sentinel C++ kernels on N "
        "(default: torch's thread count), the measured CPU decoding setting; level 0 keeps "
        "torch's setting",
    )
    p_demo.add_argument(
        "--window", type=int_at_least(2), default=512, help="tokens per perplexity window (512)"
    )
    p_demo.add_argument(
        "--windows",
        type=positive_int,
        default=None,
        help="score only the first N windows (default: all of the evaluation part)",
    )
    p_demo.add_argument(
        "--chunk", type=positive_int, default=32, help="tokens per step of the KV-cache ppl (32)"
    )
    p_demo.add_argument(
        "--text", help="split and evaluate this text file instead of the bundled excerpt"
    )
    p_demo.add_argument("--model-path", help="folder or .gguf file of SmolLM2")
    p_demo.add_argument(
        "--png", default="sentinel_demo.png", help="chart path (default sentinel_demo.png)"
    )
    p_demo.add_argument("--no-png", action="store_true", help="do not write the chart")
    p_demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_demo.set_defaults(func=_cmd_demo)

    add_profile_parser(sub)
    _add_serve_parser(sub)
    add_bench_serve_parser(sub)
    return parser


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server over the continuous-batching engine",
        description="Load a model, patch it at --level, start the engine (CUDA graphs on a GPU) "
        "and serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics "
        "with uvicorn. /health answers 503 until the model is loaded and warmed up.",
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), tiny:ARCH (a small random model with a byte tokenizer), a "
        ".gguf file or a local transformers model folder",
    )
    p.add_argument("--served-model-name", help="the name clients send (default: --model)")
    p.add_argument("--level", type=int, choices=[0, 1, 2, 3], default=2, help="patch level (2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (8000)")
    p.add_argument(
        "--max-batch-size", type=positive_int, default=64, help="requests decoded at once (64)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=2.0,
        help="how long a lone request waits for others before its prefill (2 ms)",
    )
    p.add_argument(
        "--max-queued", type=positive_int, default=256, help="waiting requests before 429 (256)"
    )
    p.add_argument(
        "--max-seq-len", type=int_at_least(2), default=4096, help="prompt + output limit (4096)"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        default=2048,
        help="prompt tokens per prefill forward (2048; the chunk size of long prompts)",
    )
    p.add_argument(
        "--max-prefill-forwards",
        type=positive_int,
        default=None,
        help="prefill forwards per engine step while prompts wait for their prefill (4 on a "
        "GPU, 1 on the CPU); more: a burst gets its first tokens sooner, running requests "
        "wait longer meanwhile",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument(
        "--result-cache-size",
        type=int_at_least(0),
        default=1024,
        help="final completions of deterministic requests kept (1024; 0 turns it off)",
    )
    p.add_argument(
        "--prefix-cache-tokens",
        type=int_at_least(0),
        default=None,
        help="prompt-prefix KV kept for reuse, in tokens (0 turns it off; levels with a dense "
        "KV cache only, i.e. 0 and 1). Default: 65536 on the CPU, 0 on a GPU, where a hit "
        "prefills the rest of the prompt eagerly instead of by a CUDA graph and costs more "
        "host time than it saves (measured on an H200)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (600)")
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=SERVE_SWITCH_INTERVAL_MS,
        help="Python's thread switch interval in this process (sys.setswitchinterval; "
        f"default {SERVE_SWITCH_INTERVAL_MS} ms, Python's own is 5 ms). The engine thread "
        "releases the interpreter lock whenever it waits for the GPU and then waits for "
        "the event loop's thread to hand it back, up to one interval per wait",
    )
    p.add_argument(
        "--engine-process",
        action="store_true",
        help="run the engine (model, scheduler, CUDA graphs) in its own process, so that HTTP "
        "parsing, chat templates, tokenization and streaming in this one do not take turns "
        "with it on one interpreter lock",
    )
    p.add_argument(
        "--http-workers",
        type=positive_int,
        default=1,
        help="HTTP worker processes on one port in front of the engine process (1; >= 2 "
        "implies --engine-process). Each keeps its own result cache and a 1/N share of "
        "--max-queued; /metrics of any worker sums them all",
    )
    add_knn_arguments(p, "every request decodes with it")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_device_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be in 0..65535")
    if not (args.max_wait_ms >= 0 and args.max_wait_ms < float("inf")):
        raise UsageError(f"--max-wait-ms {args.max_wait_ms}: must be >= 0")
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout {args.request_timeout}: must be > 0")
    if not 0 < args.switch_interval_ms <= 1000:
        raise UsageError(f"--switch-interval-ms {args.switch_interval_ms}: must be in (0, 1000]")
    spec = args.model
    if spec != "smollm2" and not spec.startswith("tiny:"):
        check_input_path("--model", spec)
    if args.knn_datastore:
        check_input_path("--knn-datastore", args.knn_datastore)
    device, dtype = resolve_device_dtype(args.device, args.dtype)

    import uvicorn

    from ..serve.server import ServerConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    config = ServerConfig(
        model_name=args.served_model_name or spec,
        level=args.level,
        api_key=args.api_key,
        result_cache_size=args.result_cache_size,
        request_timeout_s=args.request_timeout,
        freeze_heap=True,  # this process only serves
    )
    sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if args.http_workers > 1 or args.engine_process:
        return _serve_split(args, device, dtype, config)
    app = create_app(lambda: _serve_engine(args, device, dtype), config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_split(args: argparse.Namespace, device: Any, dtype: Any, config: Any) -> int:
    """``serve --engine-process`` / ``--http-workers N``: the engine in its own process
    and one HTTP process (this one) or N uvicorn workers in front of it, whose metrics are
    summed through a private prometheus-client multiprocess directory. Returns the exit
    status: 1 when the engine process died (the server stops then)."""
    import uvicorn

    from ..serve.remote import EngineProcess
    from ..serve.server import create_app
    from ..serve.workers import queue_share, run_workers

    workers = args.http_workers
    share = queue_share(args.max_queued, workers)
    # the engine's own limit: every worker's share, so it never refuses what one accepted
    engine_args = argparse.Namespace(**{**vars(args), "max_queued": share * workers})
    with contextlib.ExitStack() as stack:
        if workers > 1:  # set before the engine process and the workers start
            metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sentinel-"))
            stack.enter_context(settings.override(settings.PROMETHEUS_MULTIPROC_ENV, metrics_dir))
        engine_process = EngineProcess(
            functools.partial(_serve_engine, engine_args, device, dtype),
            log_level=logging.getLevelName(args.log_level.upper()),
            switch_interval_s=args.switch_interval_ms / 1000.0,
            record_metrics=workers > 1,
        )
        died = _stop_when_engine_dies(engine_process)
        try:
            if workers > 1:
                run_workers(
                    config,
                    engine_process,
                    workers=workers,
                    host=args.host,
                    port=args.port,
                    queue_limit=share,
                    log_level=args.log_level,
                    switch_interval_s=args.switch_interval_ms / 1000.0,
                )
            else:
                # the app's shutdown stops the engine process: uvicorn re-raises SIGTERM
                # after its own shutdown, so the `finally` below may not run
                app = create_app(lambda: engine_process.connect(stop_on_shutdown=True), config)
                uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        finally:
            engine_process.stop()
    return 1 if died else 0


def _stop_when_engine_dies(engine_process: Any) -> list[int | None]:
    """Stop this server (SIGTERM to itself: uvicorn's graceful shutdown) when its engine
    process dies, so that whatever supervises the service restarts it instead of it
    answering 503 forever; the returned list gets the engine's exit code."""
    died: list[int | None] = []

    def on_exit(code: int | None) -> None:
        died.append(code)
        logging.getLogger("sentinel_kernels.serve").error(
            "the engine process exited (code %s): stopping the server", code
        )
        os.kill(os.getpid(), signal.SIGTERM)

    engine_process.watch(on_exit)
    return died


def prefill_forwards(given: int | None, device: Any) -> int:
    """``serve``'s ``Engine(max_prefill_forwards=...)``: ``given``, else 4 on a CUDA device
    and 1 elsewhere.

    On a GPU 4 x 2048 = 8192 prompt tokens a step is vLLM's default step budget for its API
    server on GPUs of 70 GiB and more (2048 below); on an H200 at request rate inf it took
    the p50 TTFT from 630 to 269 ms against 1 (docs/MEASUREMENTS.md, "Several prefill
    forwards a step"). On the CPU a forward of 2048 tokens takes seconds, and the running
    requests would wait for four of them."""
    if given is not None:
        return given
    return 4 if getattr(device, "type", str(device)) == "cuda" else 1


def _serve_engine(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    """Load, patch and start the engine of ``sentinel-kernels serve`` (in the loader
    thread; the server answers 503 meanwhile)."""
    from .. import models
    from ..patching.apply import patch_model, patch_report
    from ..serve import Engine
    from . import demo

    model, tok = models.load_model(args.model, device=device, dtype=dtype)
    extra: dict[str, Any] = {}
    if args.level >= 3:
        # level 3 calibrates SmoothQuant and head pruning: on the bundled WikiText-2
        # excerpt's first part (the demo's calibration split)
        calibration, _ = demo.split_text(demo.EXCERPT.read_text(encoding="utf-8"))
        extra = {"calibration_text": calibration, "tokenizer": tok}
    patch_model(model, level=args.level, **extra)
    report = patch_report(model)
    kv = (report.options.get("kv_cache") if report is not None else None) or "dense"
    prefix_tokens = args.prefix_cache_tokens
    if prefix_tokens is None:
        prefix_tokens = 65536 if device.type == "cpu" else 0
    if prefix_tokens and kv != "dense":
        logging.getLogger("sentinel_kernels.serve").warning(
            "prefix cache off: level %d keeps a %s KV cache, and a prompt prefilled over a "
            "quantized stored prefix would not give the same outputs",
            args.level,
            kv,
        )
        prefix_tokens = 0
    return Engine(
        model,
        tok,
        **knn_options(args, device),
        max_slots=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_prefill_tokens=args.max_prefill_tokens,
        max_prefill_forwards=prefill_forwards(args.max_prefill_forwards, device),
        max_wait_ms=args.max_wait_ms,
        max_queued=args.max_queued,
        prefix_cache_tokens=prefix_tokens,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sentinel-kernels`` with ``argv`` (default ``sys.argv[1:]``); return the exit
    status (0 on success, 2 on a missing model). A usage error (argparse's, or a
    :class:`UsageError` of a subcommand) prints ``sentinel-kernels COMMAND: error: ...``
    to stderr and raises ``SystemExit(2)``, as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except UsageError as exc:
        _command_parser(parser, getattr(args, "command", None)).error(str(exc))
        raise  # not reached: error() exits
    except BrokenPipeError:
        # The reader went away (`sentinel-kernels info | head -1`): stop quietly, as Unix
        # tools do; point stdout at devnull so the interpreter's final flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer


if __name__ == "__main__":
    sys.exit(main())

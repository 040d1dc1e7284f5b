"""The ``sentinel-kernels`` command (also ``python -m sentinel_kernels.cli``).

Subcommands:

* ``info``: versions, available backends, GPU, CPU SIMD level, torch threads;
* ``demo``: load SmolLM2-135M-Instruct and measure patch levels 0-3 (perplexity, tokens/s
  at batch 1 and 16, memory, a sample; :mod:`sentinel_kernels.demo` does the work); prints
  a table, writes a PNG chart and optionally JSON;
* ``profile``: added by :mod:`sentinel_kernels.profile.command` when that package imports.

This module imports no torch (nor transformers, nor the package's torch modules) at import
time: building the parser and ``--help`` of every subcommand stay fast; each subcommand
imports what it needs when it runs.

Arguments are checked before any model is loaded. Per-value checks are argparse types
(:func:`positive_int`, :func:`int_at_least`); checks that need torch or several arguments
(:func:`resolve_device_dtype`, :func:`check_output_file`, :func:`check_output_dir`,
:func:`check_input_path`) raise :class:`UsageError`, which :func:`main` prints argparse-style
(``sentinel-kernels COMMAND: error: ...``, exit status 2). Every subcommand uses these.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sentinel_kernels.demo import DEMO_PROMPT, EXCERPT  # at run time: __getattr__

__all__ = [
    "DEMO_PROMPT",
    "DTYPE_CHOICES",
    "EXCERPT",
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

# Re-exported from sentinel_kernels.demo (tests, users), imported on first use (torch).
_FROM_DEMO = {"DEMO_PROMPT", "EXCERPT"}


def __getattr__(name: str) -> Any:
    if name in _FROM_DEMO:
        from sentinel_kernels import demo

        value = getattr(demo, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# Argument checks shared by the subcommands
# --------------------------------------------------------------------------------------


class UsageError(ValueError):
    """An argument that cannot work (unknown device, no GPU, missing input, ...).

    The subcommands raise it before loading anything; :func:`main` prints it as
    ``sentinel-kernels COMMAND: error: MESSAGE`` (with the usage line) and exits with 2.
    """


#: ``--dtype`` choices of the subcommands that load a model.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers ``>= minimum`` (argparse reports anything
    else as ``argument --x: expected an integer >= N, got ...``)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {value!r}"
            ) from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def positive_int(value: str) -> int:
    """argparse ``type``: an integer ``>= 1`` (sizes, counts, lengths)."""
    return int_at_least(1)(value)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` and ``--dtype`` (checked by :func:`resolve_device_dtype` when the
    command runs) to a subcommand's parser."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto: bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 on CPU",
    )


def resolve_device_dtype(device: str, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Check ``--device`` and ``--dtype`` and turn them into ``(torch.device, torch.dtype)``.

    ``device``: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; ``dtype``: one of :data:`DTYPE_CHOICES` (``auto``: bfloat16 on CUDA, or
    float16 on a GPU older than compute capability 8.0, which has no bfloat16 kernels;
    float32 on the CPU).

    Raises:
        UsageError: an unknown device or dtype, CUDA without a visible GPU, a GPU index
            torch does not see, or bfloat16 on a GPU that cannot run it. The message
            starts with the option and its value and says what is available.
    """
    import torch

    spec = str(device).strip().lower()
    match = _DEVICE_RE.fullmatch(spec)
    if match is None:
        raise UsageError(f"--device {device}: unknown device; choose auto, cpu, cuda or cuda:N")
    cuda = torch.cuda.is_available()
    if spec == "auto":
        dev = torch.device("cuda" if cuda else "cpu")
    elif spec == "cpu":
        dev = torch.device("cpu")
    else:
        if not cuda:
            raise UsageError(
                f"--device {device}: no CUDA GPU is visible to torch "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        count = torch.cuda.device_count()
        index = match.group(1)
        if index is not None and int(index) >= count:
            visible = (
                "1 CUDA device (cuda:0)"
                if count == 1
                else (f"{count} CUDA devices (cuda:0 to cuda:{count - 1})")
            )
            raise UsageError(f"--device {device}: torch sees only {visible}; use one of those")
        dev = torch.device(spec)

    name = _DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if name not in DTYPE_CHOICES:
        raise UsageError(
            f"--dtype {dtype}: unknown dtype; choose auto, float32, bfloat16 or float16"
        )
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        bf16 = major >= 8  # the Triton kernels need sm_80 for bfloat16
        if name == "auto":
            name = "bfloat16" if bf16 else "float16"
        elif name == "bfloat16" and not bf16:
            raise UsageError(
                f"--dtype {dtype}: {torch.cuda.get_device_name(dev)} (compute capability "
                f"{major}.{minor}) cannot run bfloat16, which needs 8.0 or newer; use "
                "--dtype float16 or float32"
            )
    elif name == "auto":
        name = "float32"
    return dev, getattr(torch, name)


def check_input_path(option: str, path: str | os.PathLike[str]) -> Path:
    """``Path(path)`` if it exists, else :class:`UsageError` (``option`` names the
    argument in the message)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file or folder")
    return p


def check_output_file(option: str, path: str | os.PathLike[str]) -> Path:
    """``Path(path)`` if a file can be written there (not a folder, in an existing,
    writable folder), else :class:`UsageError`; checked before a long run, not after it."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")
    return p


def check_output_dir(option: str, path: str | os.PathLike[str]) -> Path:
    """``Path(path)`` if it is a folder, or can be created as one (its nearest existing
    ancestor is a writable folder), else :class:`UsageError`."""
    p = Path(path)
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        what = "exists and is not a folder" if ancestor == p else f"{ancestor} is not a folder"
        raise UsageError(f"{option} {path}: {what}")
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK):
        raise UsageError(f"{option} {path}: {ancestor} is not writable")
    return p


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> Any:
    """The subparser of ``command`` (for its ``error``), else ``parser`` itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command, parser)
    return parser


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _native() -> tuple[Any | None, str]:
    """``(module, "")`` when ``sentinel_kernels._C`` imports, else ``(None, reason)``."""
    try:
        from sentinel_kernels import _C
    except Exception as exc:  # not built, or built for another Python: report, don't fail
        return None, f"{type(exc).__name__}: {exc}"
    return _C, ""


def collect_info() -> dict[str, str]:
    """What ``sentinel-kernels info`` prints, as an ordered ``{label: value}`` dict."""
    import torch

    from sentinel_kernels import __version__

    info: dict[str, str] = {
        "sentinel-kernels": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
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
            from . import settings

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
    from sentinel_kernels import demo

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

    from sentinel_kernels import demo, models

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


def _add_profile_parser(sub: Any) -> None:
    """Add the ``profile`` subcommand from :mod:`sentinel_kernels.profile.command`.

    Guarded: a missing profile package (ImportError) is skipped silently, and one that
    fails in another way is skipped with a warning, so ``info`` and ``demo`` keep working.
    """
    try:
        from sentinel_kernels.profile.command import add_parser
    except ImportError:
        return
    except Exception as exc:  # a broken module must not take the other commands down
        warnings.warn(
            f"sentinel-kernels profile unavailable: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    try:
        add_parser(sub)
    except Exception as exc:
        warnings.warn(
            f"sentinel-kernels profile unavailable: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sentinel-kernels``."""
    from sentinel_kernels import __version__

    parser = argparse.ArgumentParser(
        prog="sentinel-kernels",
        description="Inference kernels for Hugging Face causal LMs: info, demo, profile.",
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
        "(default: torch's thread count), the README's CPU decoding setting; level 0 keeps "
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

    _add_profile_parser(sub)
    return parser


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
    # Run the importable module's main, not this __main__ copy's: the subcommands raise
    # sentinel_kernels.cli.UsageError, which only that module's main catches.
    from sentinel_kernels.cli import main as _main

    sys.exit(_main())

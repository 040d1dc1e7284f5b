"""The ``sentinel-kernels`` command (also ``python -m sentinel_kernels.cli``).

Subcommands:

* ``info``: versions, available backends, GPU, CPU SIMD level, torch threads;
* ``demo``: load SmolLM2-135M-Instruct, then per patch level print the perplexity on the
  bundled WikiText-2 excerpt and greedy-generation speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_PROMPT", "EXCERPT", "build_parser", "collect_info", "main"]

#: The WikiText-2 validation excerpt shipped with the package (see data/NOTICE.md).
EXCERPT = Path(__file__).resolve().parent / "data" / "excerpt.txt"
#: Prompt of the demo's generation benchmark.
DEMO_PROMPT = "The European lobster is a species of"


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
            interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_speed(
    model: Any, tokenizer: Any, prompt: str, new_tokens: int, device: torch.device
) -> tuple[float, str]:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after a short warm-up.

    Returns ``(tokens per second, generated text)``; the time covers the prefill of the
    prompt and all decode steps, with CUDA synchronised before and after.
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        _sync(device)
        elapsed = time.perf_counter() - start
    generated = out[0, ids.shape[1] :]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return generated.numel() / elapsed, text


def _fmt_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(f"{str(c):>{w}}" for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _cmd_demo(args: argparse.Namespace) -> int:
    from sentinel_kernels import eval as sk_eval
    from sentinel_kernels import models
    from sentinel_kernels.patch import patch_model, unpatch_model

    device = models.resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = models.resolve_dtype(args.dtype)
    text_path = Path(args.text) if args.text else EXCERPT
    text = text_path.read_text(encoding="utf-8")
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device {device}, dtype {dtype_name}, torch threads {torch.get_num_threads()}")

    print("loading SmolLM2-135M-Instruct ...", flush=True)
    start = time.perf_counter()
    try:
        model, tokenizer = models.load_smollm2(device=device, dtype=dtype, path=args.model_path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded in {time.perf_counter() - start:.1f} s")

    header = ["level", "ppl", "vs level 0", "gen tok/s", "weights MiB", "budget"]
    rows: list[list[str]] = []
    base_ppl: float | None = None
    sample = ""
    for level in args.levels:
        try:
            report = patch_model(model, level=level)
        except NotImplementedError as exc:
            print(f"level {level}: not available yet ({exc})")
            rows.append([str(level), "n/a", "", "", "", "not implemented"])
            continue
        except ValueError as exc:  # e.g. level 3's pruning needs calibration text
            print(f"level {level}: needs more input ({exc})")
            rows.append([str(level), "n/a", "", "", "", "needs input"])
            continue
        try:
            ppl = sk_eval.perplexity(
                model, tokenizer, text, window=args.window, max_windows=args.windows
            )
            print(f"level {level}: generating {args.max_new_tokens} tokens ...", flush=True)
            tps, generated = _generate_speed(
                model, tokenizer, DEMO_PROMPT, args.max_new_tokens, device
            )
        finally:
            unpatch_model(model)
        if base_ppl is None and level == 0:
            base_ppl = ppl
        rel = f"{(ppl / base_ppl - 1):+.2%}" if base_ppl is not None else ""
        sample = sample or generated
        rows.append(
            [
                str(level),
                f"{ppl:.3f}",
                rel,
                f"{tps:.1f}",
                f"{report.weight_bytes_after / 2**20:.1f}",
                f"<= {report.accuracy_budget:.1%}",
            ]
        )

    n_windows = "all" if args.windows is None else str(args.windows)
    print()
    print(
        f"perplexity: {text_path.name}, windows of {args.window} tokens (first {n_windows}); "
        f"generation: greedy, {args.max_new_tokens} new tokens, batch 1"
    )
    print(_fmt_table(header, rows))
    if sample:
        print(f"\nprompt: {DEMO_PROMPT!r}\noutput: {sample!r}")
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sentinel-kernels``."""
    from sentinel_kernels import __version__

    parser = argparse.ArgumentParser(
        prog="sentinel-kernels",
        description="Inference kernels for Hugging Face causal LMs: info and demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser("info", help="versions, backends, GPU and CPU features")
    p_info.set_defaults(func=_cmd_info)

    p_demo = sub.add_parser("demo", help="SmolLM2 perplexity and generation speed per patch level")
    p_demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p_demo.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    p_demo.add_argument("--max-new-tokens", type=_positive, default=32, help="default 32")
    p_demo.add_argument(
        "--windows", type=_positive, default=2, help="perplexity windows to run (default 2)"
    )
    p_demo.add_argument("--window", type=_positive, default=1024, help="tokens per window")
    p_demo.add_argument(
        "--levels",
        type=int,
        nargs="+",
        choices=[0, 1, 2, 3],
        default=[0],
        help="patch levels to run (default: 0)",
    )
    p_demo.add_argument("--text", help="evaluate on this text file instead of the excerpt")
    p_demo.add_argument("--model-path", help="folder or .gguf file of SmolLM2")
    p_demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sentinel-kernels`` with ``argv`` (default ``sys.argv[1:]``); return the exit
    status (0 on success, 2 on a usage error or a missing model)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""``sentinel-kernels profile``: where prefill and decode time goes, before and after patching.

``sentinel-kernels profile --model smollm2 --level 2`` loads the model, profiles level 0
(before) and level 2 (after) with :func:`~.breakdown.profile_model`,
prints the breakdown (attention / linear / kv_cache / sampling / knn / other, per phase) and
writes ``profile.json``, ``profile.csv``, ``trace_level{N}.json`` and ``profile.png`` into
``--out`` (see :mod:`.export`).

:mod:`sentinel_kernels.app.cli` wires it with ``add_parser(subparsers)``. This module
imports torch (and the modules that need it) only when the command runs, so that building
the parser and ``--help`` stay torch-free; its arguments are checked with the helpers of
:mod:`sentinel_kernels.app.args` (argparse types, and
:func:`~sentinel_kernels.app.args.resolve_device_dtype` & co. at the start of :func:`run`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import __version__
from ..args import (
    UsageError,
    add_device_arguments,
    add_knn_arguments,
    check_input_path,
    check_output_dir,
    dist_version,
    positive_int,
    resolve_device_dtype,
)
from ..args import knn_options as knn_options_of

if TYPE_CHECKING:
    import torch

__all__ = ["MODELS", "add_parser", "build_input_ids", "check_args", "load_model", "run"]

#: ``--model`` choices: SmolLM2-135M-Instruct (needs the GGUF, see the README) and a tiny
#: random Llama (no tokenizer, random token ids) for quick runs and tests.
MODELS = ("smollm2", "tiny-llama")
_EXCERPT = Path(__file__).resolve().parents[2] / "data" / "excerpt.txt"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``profile`` subcommand on ``subparsers`` (the object returned by
    ``ArgumentParser.add_subparsers``); its handler is :func:`run` (``set_defaults(func=run)``).
    Returns the subparser."""
    p = subparsers.add_parser(
        "profile",
        help="torch.profiler breakdown of prefill/decode time before and after patching",
        description=(
            "Profile prefill and greedy decode with torch.profiler at level 0 (before) and "
            "--level N (after); group the time into attention / linear / kv_cache / "
            "sampling / knn / other; write profile.json, profile.csv, trace_level{N}.json "
            "(Chrome trace) and profile.png into --out."
        ),
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="smollm2",
        help="smollm2 (default) or tiny-llama (random weights, random token ids)",
    )
    p.add_argument(
        "--level",
        type=int,
        choices=[0, 1, 2, 3],
        default=2,
        help="patch level profiled as 'after' (default 2); level 0 is 'before'",
    )
    add_device_arguments(p)
    p.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=128,
        help="prompt length per row (default 128)",
    )
    p.add_argument(
        "--decode-tokens", type=positive_int, default=32, help="decode steps (default 32)"
    )
    p.add_argument("--batch", type=positive_int, default=1, help="batch rows (default 1)")
    p.add_argument(
        "--out", default="sentinel_profile", help="output folder (default ./sentinel_profile)"
    )
    p.add_argument("--model-path", help="folder or .gguf file of SmolLM2")
    p.add_argument(
        "--no-baseline", action="store_true", help="profile only --level, not level 0 as well"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of tiny-llama's token ids")
    add_knn_arguments(p, "the search is profiled as the knn category")
    p.set_defaults(func=run)
    return p


def load_model(
    name: str, device: torch.device, dtype: torch.dtype, path: str | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model name`` on ``device`` in ``dtype``; the
    tokenizer is ``None`` for ``tiny-llama``.

    Raises:
        FileNotFoundError: SmolLM2's GGUF file is missing.
    """
    from ... import models

    if name == "smollm2":
        return models.load_smollm2(device=device, dtype=dtype, path=path)
    if name == "tiny-llama":
        return models.tiny("llama", dtype=dtype).to(device), None
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def build_input_ids(
    model: Any, tokenizer: Any, batch: int, prompt: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """The ``[batch, prompt]`` prompt: consecutive slices of the bundled WikiText-2
    excerpt (repeated when it is too short) when there is a tokenizer, else random ids in
    ``[3, vocab)`` from ``seed`` (ids 0-2 are usually special tokens)."""
    import torch

    need = batch * prompt
    if tokenizer is not None:
        ids = tokenizer(_EXCERPT.read_text(encoding="utf-8"))["input_ids"]
        ids = list(ids) * (need // max(len(ids), 1) + 1)
        return torch.tensor(ids[:need], dtype=torch.long).view(batch, prompt).to(device)
    vocab = int(getattr(model.config, "vocab_size", 256))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(vocab, 4), (batch, prompt), generator=gen).to(device)


def _progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # disable=None: no bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc="profile", unit="stage", disable=None, leave=False)


def check_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Check the arguments of ``profile`` before anything loads; return the resolved
    ``(device, dtype)``.

    Raises:
        UsageError: a bad ``--device``/``--dtype`` (see
            :func:`~sentinel_kernels.app.args.resolve_device_dtype`), an ``--out`` that cannot
            be a folder, a missing ``--model-path``, or level 3 with ``tiny-llama``.
    """
    if args.level >= 3 and args.model == "tiny-llama":
        raise UsageError(
            "--level 3 --model tiny-llama: level 3 needs calibration text and a tokenizer "
            "(SmoothQuant W8A8 and head pruning are calibrated on the bundled WikiText-2 "
            "excerpt) and tiny-llama has no tokenizer; use --model smollm2, or a level <= 2"
        )
    check_output_dir("--out", args.out)
    if args.model_path and args.model == "smollm2":
        check_input_path("--model-path", args.model_path)
    if getattr(args, "knn_datastore", None):
        check_input_path("--knn-datastore", args.knn_datastore)
    return resolve_device_dtype(args.device, args.dtype)


def run(args: argparse.Namespace) -> int:
    """Run ``sentinel-kernels profile``; returns the exit status (0 ok, 2 for a missing
    model or a level that cannot run with this model).

    Raises:
        UsageError: from :func:`check_args`, before anything is loaded (``main`` of
            :mod:`sentinel_kernels.app.cli` prints it as a usage error).
    """
    device, dtype = check_args(args)

    import torch

    from .breakdown import STAGES_PER_LEVEL, profile_levels
    from .export import export_all, format_table

    levels = [args.level] if args.no_baseline or args.level == 0 else [0, args.level]
    dtype_name = str(dtype).removeprefix("torch.")

    print(f"loading {args.model} on {device} ({dtype_name}) ...", flush=True)
    try:
        model, tokenizer = load_model(args.model, device, dtype, args.model_path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    input_ids = build_input_ids(
        model, tokenizer, args.batch, args.prompt_tokens, device, seed=args.seed
    )
    calibration = _EXCERPT.read_text(encoding="utf-8") if tokenizer is not None else None
    knn_options = knn_options_of(args, device)
    if args.level >= 3:
        print(
            "level 3 calibrates on the bundled excerpt first (SmoothQuant, head "
            "importance): this takes a while",
            flush=True,
        )

    bar = _progress_bar(len(levels) * STAGES_PER_LEVEL)
    try:
        results = profile_levels(
            model,
            input_ids,
            levels,
            max_new_tokens=args.decode_tokens,
            tokenizer=tokenizer,
            calibration_text=calibration,
            progress=bar,
            **knn_options,
        )
    except (ValueError, NotImplementedError) as exc:
        print(f"error: cannot profile this level: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()

    meta = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "levels": levels,
        "torch_threads": torch.get_num_threads(),
        "sentinel_kernels": __version__,
        "torch": torch.__version__,
        "transformers": dist_version("transformers"),
        "triton": dist_version("triton"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    title = (
        f"{args.model}, {device.type} {dtype_name}, batch {args.batch}, "
        f"prompt {args.prompt_tokens}, {args.decode_tokens} decode steps"
    )
    written = export_all(results, args.out, meta=meta, title=title)

    basis = results[0].time_basis
    what = "device (kernel) time" if basis == "device" else "CPU self time"
    print()
    print(f"{title}; times are {what} under the profiler, tok/s from an un-profiled run")
    print(format_table(results))
    for r in results:
        for note in r.notes:
            print(f"note (level {r.level}): {note}")
    print()
    print(f"wrote {written['json']}")
    print(f"wrote {written['csv']}")
    for path in written["traces"]:
        print(f"wrote {path}")
    if written["png"] is not None:
        print(f"wrote {written['png']}")
    else:
        print(written["png_skipped"])
    return 0

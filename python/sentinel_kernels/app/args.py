"""Argument checks shared by the ``sentinel-kernels`` subcommands (:mod:`.cli`,
:mod:`.profile.command`).

Per-value checks are argparse types (:func:`positive_int`, :func:`int_at_least`); checks
that need torch or several arguments (:func:`resolve_device_dtype`,
:func:`check_output_file`, :func:`check_output_dir`, :func:`check_input_path`) raise
:class:`UsageError`, which :func:`sentinel_kernels.app.cli.main` prints argparse-style
(``sentinel-kernels COMMAND: error: ...``, exit status 2). No torch at import time (the
parsers and ``--help`` stay fast): :func:`resolve_device_dtype` imports it when called.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_CHOICES",
    "UsageError",
    "add_device_arguments",
    "check_input_path",
    "check_output_dir",
    "check_output_file",
    "dist_version",
    "int_at_least",
    "positive_int",
    "resolve_device_dtype",
]


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


def add_knn_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--knn-datastore PATH``, ``--knn-k``, ``--knn-lambda``, ``--knn-temperature``
    (kNN-LM decoding; ``what`` ends the datastore option's help)."""
    parser.add_argument(
        "--knn-datastore",
        metavar="PATH",
        help=f"decode with kNN-LM over this datastore (sk.knn.Datastore.save); {what}",
    )
    parser.add_argument("--knn-k", type=positive_int, default=32, help="neighbours (default 32)")
    parser.add_argument(
        "--knn-lambda", type=float, default=0.25, help="kNN-LM lambda (default 0.25)"
    )
    parser.add_argument(
        "--knn-temperature",
        type=float,
        default=1.0,
        help="temperature T of p_kNN = softmax(-d / T) (default 1.0)",
    )
    parser.add_argument(
        "--knn-nprobe",
        type=positive_int,
        default=None,
        metavar="N",
        help="search an IVF index built on the model's device, N lists per query "
        "(default: exact search on a GPU, the datastore's FAISS index on the CPU)",
    )


def knn_options(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The ``knn=...`` keyword arguments of ``sk.generate`` / ``Engine`` from
    :func:`add_knn_arguments`'s options (empty without ``--knn-datastore``); the datastore
    is loaded onto ``device``."""
    if not getattr(args, "knn_datastore", None):
        return {}
    check_input_path("--knn-datastore", args.knn_datastore)
    from ..knn.datastore import Datastore

    nprobe = getattr(args, "knn_nprobe", None)
    if nprobe is None:
        store = Datastore.load(args.knn_datastore, device=device)
    else:
        store = Datastore.load(args.knn_datastore).to(
            device, backend="ivf", progress=True, nprobe=nprobe
        )
    return {
        "knn": store,
        "knn_k": args.knn_k,
        "knn_lambda": args.knn_lambda,
        "knn_temperature": args.knn_temperature,
    }


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


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"

"""Calling a ``sentinel::*`` custom op: through torch's dispatcher only when it is needed.

Each op is a ``torch.library.custom_op`` so that ``torch.compile``, ``torch.export``, fake
tensors and the profiler see one named op with a fake (meta) implementation. In a plain
eager call none of that is in play, and the dispatcher's round trip (C++ dispatch, then back
into Python through the op's registered kernel, plus its alias checks) costs ~20 us per
call on a fast CPU and ~35 us on the H200 machine's host, against ~110 us for the whole
call there (`scripts/overhead_probe.py`); an eager prefill makes 150-270 of these calls.
:func:`call_op` calls the op's Python function directly when nothing needs the dispatcher:
not compiling or tracing, no torch-function or dispatch mode active (fake tensors,
functionalization, ``FlopCounterMode``...), the profiler off (it names the ops from the
dispatcher's records), no tensor subclass among the arguments and nothing that requires
grad. The function is the same one the dispatcher would call, so the result is the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import profiler as _profiler

from .. import _backend, settings

__all__ = ["call_op", "fused_kernel_failures", "pdl_scope", "try_fused_launch"]

log = logging.getLogger("sentinel_kernels")


def pdl_scope(batch1: bool) -> contextlib.AbstractContextManager[None]:
    """The block's launches of the decode path's Triton kernels use programmatic dependent
    launch when ``batch1`` (the caller runs the decode steps of a batch of one) and
    ``SENTINEL_PDL=batch1`` (``kernels/_pdl.py``); otherwise nothing changes. A caller enters
    it around its eager decode steps and their CUDA-graph captures alike, so that the PDL
    variants are compiled before a capture records them."""
    if not batch1 or settings.pdl_mode() != "batch1" or not _backend.triton_available():
        return contextlib.nullcontext()
    from ..kernels import _pdl

    return _pdl.batch1_scope(True)


def _direct_ok(args: tuple[Any, ...]) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _profiler._is_profiler_enabled:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter:
                return False
            if grad and a.requires_grad:
                return False
    return True


def call_op(op: Any, *args: Any) -> Any:
    """``op(*args)`` for a ``torch.library.custom_op`` ``op``: its function called
    directly when the dispatcher adds nothing (see the module docstring), else through
    the dispatcher."""
    fn = getattr(op, "_init_fn", None)
    if fn is not None and _direct_ok(args):
        return fn(*args)
    return op(*args)


_fused_failed: dict[str, str] = {}
_fused_lock = threading.Lock()


def try_fused_launch(name: str, launch: Callable[[], None]) -> bool:
    """Run ``launch()``, the launch of fused kernel ``name``; False when it cannot run.

    A fused kernel replaces a composition of unfused ops that computes the same thing
    (e.g. ``int8_linear_fused`` for RMSNorm + W8A16 GEMV + residual add). If its launch
    raises outside CUDA-graph capture (a Triton version that cannot compile it, a
    resource limit of the device), the failure is logged once, the kernel is not tried
    again in this process, and the caller runs the composition: a slower step, never a
    failed or wrong one. The fused kernels compile before they write anything, so a
    compilation failure leaves no partial result. ``SENTINEL_STRICT_KERNELS=1`` (the test
    suite) re-raises instead; inside graph capture the error always propagates (the eager
    step before capture has compiled the kernel already).
    """
    if name in _fused_failed:
        return False
    try:
        launch()
    except Exception as exc:
        if settings.strict_kernels() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        ):
            raise
        with _fused_lock:
            first = name not in _fused_failed
            _fused_failed[name] = f"{type(exc).__name__}: {exc}"
        if first:
            log.warning(
                "fused kernel %s failed (%s: %s); using the unfused ops for it from now on",
                name,
                type(exc).__name__,
                exc,
            )
        return False
    return True


def fused_kernel_failures() -> dict[str, str]:
    """The fused kernels that failed in this process and fell back: name -> error."""
    with _fused_lock:
        return dict(_fused_failed)

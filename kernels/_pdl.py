"""Programmatic dependent launch (PDL) for the decode path's Triton kernels.

A batch-1 decode step is a chain of small kernels, each paying a launch latency of a
microsecond or two even inside a CUDA graph. With PDL (Hopper, sm_90+; CUDA's
``cudaLaunchAttributeProgrammaticStreamSerialization``, reached through Triton's
``launch_pdl`` launch option and ``tl.extra.cuda.gdc_*``) a kernel may start while the one
before it is still running: its programs become resident early, do the work that does
not depend on the previous kernel (address arithmetic; a GEMV's first weight tile, since
weights never change during a step), then wait in :func:`pdl_wait` until the previous
kernel has completed and its writes are visible. :func:`pdl_release`, called by every
program once its main loop is done, lets the next kernel launch during this one's tail.

The rules every kernel taking ``PDL`` keeps, so that the chain stays correct whatever the
kernels around it are:

* before :func:`pdl_wait`: no stores, no atomics, and loads only of data no kernel of the
  step writes (weights, scales);
* :func:`pdl_wait` runs in every program, before :func:`pdl_release` (so a kernel that
  launches early has every kernel before the previous one complete already).

A kernel launched without the attribute (torch's, cuBLAS's) waits for the complete
previous kernel as usual, and one that follows it starts only when it completes. By
default (``SENTINEL_PDL`` unset or ``batch1``) only inside :func:`batch1_scope`, which
``sk.generate`` enters for the decode steps of a batch-1 call and the engine for its
one-row bucket: it measured a gain there and a loss at batch 16. ``SENTINEL_PDL=1`` turns
it on for every launch of these kernels, ``0`` off; off under the Triton interpreter
(which has no grid dependency control) and before sm_90.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from sentinel_kernels import settings

__all__ = ["ENABLED", "MODE", "batch1_scope", "pdl_meta", "pdl_release", "pdl_wait"]

#: ``SENTINEL_PDL``'s mode ("off", "on", "batch1"; "off" under the interpreter); read once.
MODE = "off" if settings.triton_interpret() else settings.pdl_mode()
#: Whether every launch of the PDL kernels asks for it (``SENTINEL_PDL=1``).
ENABLED = MODE == "on"

_local = threading.local()


@contextlib.contextmanager
def batch1_scope(on: bool) -> Iterator[None]:
    """Within the block, this thread's launches of the PDL kernels use PDL when ``on`` and
    ``SENTINEL_PDL=batch1`` (eager launches and CUDA-graph captures alike, so a captured
    kernel was compiled by an eager launch before); outside it, as :data:`ENABLED` says."""
    old = getattr(_local, "on", False)
    _local.on = on and MODE == "batch1"
    try:
        yield
    finally:
        _local.on = old


_OFF: dict[str, bool] = {"PDL": False}
_ON: dict[str, bool] = {"PDL": True, "launch_pdl": True}


@functools.cache
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_meta(t: torch.Tensor) -> dict[str, bool]:
    """The launch arguments for a kernel taking ``PDL``, for tensors on ``t``'s device:
    ``PDL=True`` and Triton's ``launch_pdl=True`` where it applies, else ``PDL=False``."""
    if not (ENABLED or getattr(_local, "on", False)) or t.device.type != "cuda":
        return _OFF
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _ON if _hopper_or_newer(index) else _OFF


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel has completed and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch (it still waits for this one in its own ``pdl_wait``)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()

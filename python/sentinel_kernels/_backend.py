"""Backend selection for the op layer.

``SENTINEL_BACKEND`` picks who computes an op:

* ``auto`` (default): CUDA tensors go to Triton, CPU tensors to the C++ extension ``_C``;
* ``triton``: Triton everywhere. On CPU tensors this only works with ``TRITON_INTERPRET=1``
  set before triton is imported (that is how CPU-only CI runs the Triton kernels);
* ``native``: the C++ extension (CPU tensors only);
* ``reference``: the plain-PyTorch reference implementation.

The choice is read on every call (a dictionary lookup, no device sync), and can also be set
for a block of code with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Iterator

import torch

from . import settings

BACKENDS = ("auto", "triton", "native", "reference")

_local = threading.local()


@contextlib.contextmanager
def _thread_local(attr: str, value: object, default: object) -> Iterator[None]:
    # Set ``_local.<attr>`` for the block, then restore what it was (``default`` if unset).
    old = getattr(_local, attr, default)
    setattr(_local, attr, value)
    try:
        yield
    finally:
        setattr(_local, attr, old)


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend cannot run the given tensors."""


def requested_backend() -> str:
    """The backend asked for: a :func:`use_backend` block, else ``SENTINEL_BACKEND``."""
    name = getattr(_local, "override", None) or settings.backend()
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"SENTINEL_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (thread-local)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    with _thread_local("override", name, None):
        yield


def triton_interpreter() -> bool:
    """True when Triton runs in interpreter mode (kernels execute on CPU tensors)."""
    return settings.triton_interpret()


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the package
        return False
    return True


@functools.cache
def native_available() -> bool:
    """True when the C++ extension ``sentinel_kernels._C`` imports."""
    try:
        from sentinel_kernels import _C  # noqa: F401
    except ImportError:
        return False
    return True


def native_module():
    """The C++ extension module, or a clear error if it was not built."""
    try:
        from sentinel_kernels import _C
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            f"sentinel_kernels._C does not import ({type(exc).__name__}: {exc}); if it "
            "was not built, reinstall with `pip install .` (it needs a C++17 compiler and "
            "CMake)"
        ) from exc
    return _C


def resolve(device: torch.device) -> str:
    """The concrete backend (``triton``, ``native`` or ``reference``) for tensors on ``device``.

    Raises :class:`BackendUnavailableError` when the requested backend cannot run there.
    """
    name = requested_backend()
    if name == "reference":
        return "reference"
    if device.type == "cuda":
        if name == "native":
            raise BackendUnavailableError(
                "SENTINEL_BACKEND=native runs CPU tensors only; got CUDA tensors"
            )
        if not triton_available():
            raise BackendUnavailableError("CUDA tensors need Triton, which is not installed")
        return "triton"
    if device.type == "cpu":
        if name == "triton":
            if not triton_available():
                raise BackendUnavailableError("SENTINEL_BACKEND=triton but Triton is missing")
            if not triton_interpreter():
                raise BackendUnavailableError(
                    "SENTINEL_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set "
                    "before triton is imported"
                )
            return "triton"
        if native_available():
            return "native"
        if name == "native":
            native_module()  # raises with the build hint
        return "reference"
    if name in ("auto", "reference"):
        return "reference"
    raise BackendUnavailableError(f"no {name} backend for device type {device.type!r}")


def native_threads() -> int:
    """Threads the C++ kernels use: ``SENTINEL_NUM_THREADS`` if set, else torch's count.

    Separate from torch's setting because torch's OpenMP workers keep spinning on the
    cores for milliseconds after each parallel region: in small-batch CPU decoding it pays
    to run torch with one thread (``torch.set_num_threads(1)``) and give the cores to the
    INT8 kernels (``SENTINEL_NUM_THREADS=2``).
    """
    n = settings.num_threads()
    return torch.get_num_threads() if n is None else n


def poison_outputs() -> bool:
    """True while tests ask for freshly allocated op outputs to be filled with garbage."""
    return bool(getattr(_local, "poison", False)) or settings.poison()


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside the block, op outputs are NaN-filled (floats) or -128-filled (int8) when made."""
    with _thread_local("poison", enabled, False):
        yield


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an op output; poisoned when :func:`poisoned_outputs` is active.

    Poison makes a kernel that forgets to write an element fail the test: floats get NaN,
    integer outputs get their minimum value (``-128`` for int8, a value quantization
    never produces because it clamps to ``[-127, 127]``).
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out

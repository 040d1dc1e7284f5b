"""Test harness: backends x devices, poisoned outputs, SIMD levels of the C++ kernels, markers.

Triton kernels are tested on machines without a GPU through Triton's interpreter, which
must be switched on before triton is first imported: that happens here, at collection.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `import helpers`

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check correctness over many shapes; autotuning each one is bench/'s job.
os.environ.setdefault("SENTINEL_AUTOTUNE", "0")
# A fused kernel that fails must fail its test, not fall back to the unfused ops.
os.environ.setdefault("SENTINEL_STRICT_KERNELS", "1")

from helpers import forced_simd_level  # noqa: E402

from sentinel_kernels import _backend  # noqa: E402


@dataclass(frozen=True)
class Backend:
    """One place an op can run: a device and a backend name."""

    device: str
    name: str

    @property
    def interpreted(self) -> bool:
        return self.device == "cpu" and self.name == "triton"

    def __str__(self) -> str:
        return f"{self.device}-{self.name}"


_CPU_REFERENCE = pytest.param(Backend("cpu", "reference"), id="cpu-reference")
_CPU_NATIVE = pytest.param(Backend("cpu", "native"), id="cpu-native")
_CPU_TRITON = pytest.param(Backend("cpu", "triton"), id="cpu-triton-interpreter")
_CUDA_TRITON = pytest.param(Backend("cuda", "triton"), id="cuda-triton", marks=pytest.mark.gpu)
_CUDA_REFERENCE = pytest.param(
    Backend("cuda", "reference"), id="cuda-reference", marks=pytest.mark.gpu
)


def skip_unless_available(b: Backend) -> None:
    """Skip the running test (with the reason) when ``b`` cannot run here."""
    if b.device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA GPU")
    if b.name == "native" and not _backend.native_available():
        pytest.skip("sentinel_kernels._C not built")
    if b.name == "triton":
        if not _backend.triton_available():
            pytest.skip("triton not installed")
        if b.device == "cpu" and not _backend.triton_interpreter():
            pytest.skip("Triton interpreter is off (a GPU is present; Triton runs on it)")


@contextlib.contextmanager
def selected(b: Backend) -> Iterator[Backend]:
    """Run on ``b`` (skipping when it cannot run here) with op outputs NaN/-128-poisoned."""
    skip_unless_available(b)
    with _backend.use_backend(b.name), _backend.poisoned_outputs():
        yield b


@pytest.fixture(params=[_CPU_REFERENCE, _CPU_NATIVE, _CPU_TRITON, _CUDA_TRITON, _CUDA_REFERENCE])
def backend(request) -> Iterator[Backend]:
    """Each backend in turn, selected and with op outputs NaN/-128-poisoned."""
    with selected(request.param) as b:
        yield b


@pytest.fixture(params=[_CPU_REFERENCE, _CPU_TRITON, _CUDA_TRITON])
def ref_triton_backend(request) -> Iterator[Backend]:
    """The reference and Triton backends, NaN-poisoned (for ops whose C++ side is tested per
    SIMD level in a ``*_native`` file)."""
    with selected(request.param) as b:
        yield b


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["reference", "native"], ids=lambda n: f"cpu-{n}")
def cpu_backend(request):
    """The C++ and reference CPU backends of the ops, with NaN-poisoned op outputs (the
    model-level tests: a whole forward pass per backend)."""
    with selected(Backend("cpu", request.param)):
        yield request.param


@pytest.fixture(params=["reference", "native", "triton"], ids=lambda n: f"cpu-{n}")
def any_backend(request):
    """As ``cpu_backend``, plus the Triton kernels under the interpreter (slow: used by a
    few representative tests only)."""
    with selected(Backend("cpu", request.param)):
        yield request.param


@pytest.fixture
def native() -> Iterator[Backend]:
    """The C++ backend alone, with op outputs NaN-poisoned."""
    with selected(Backend("cpu", "native")) as b:
        yield b


@pytest.fixture
def triton_backend() -> Iterator[Backend]:
    """The Triton backend (on the GPU when there is one, else interpreted), NaN-poisoned."""
    with selected(Backend("cuda" if HAS_CUDA else "cpu", "triton")) as b:
        yield b


def _simd_levels(float_kernels: bool) -> list[str]:
    if not _backend.native_available():
        return []
    levels = _backend.native_module().supported_simd_levels()
    # avx512_vnni differs from avx512 only in the int8 dot products.
    return [lv for lv in levels if lv != "avx512_vnni"] if float_kernels else list(levels)


@pytest.fixture(params=_simd_levels(float_kernels=False))
def simd_level(request) -> Iterator[str]:
    """Each SIMD level of the C++ kernels this CPU supports, forced in turn (restored after)."""
    with forced_simd_level(request.param) as name:
        yield name


@pytest.fixture(params=_simd_levels(float_kernels=True))
def float_simd_level(request) -> Iterator[str]:
    """As ``simd_level`` without ``avx512_vnni``, which runs avx512's float kernels."""
    with forced_simd_level(request.param) as name:
        yield name

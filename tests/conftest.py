"""Test harness: backends x devices, poisoned outputs, markers.

Triton kernels are tested on machines without a GPU through Triton's interpreter, which
must be switched on before triton is first imported: that happens here, at collection.
"""

from __future__ import annotations

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


def _backend_params() -> list:
    gpu = pytest.mark.gpu
    return [
        pytest.param(Backend("cpu", "reference"), id="cpu-reference"),
        pytest.param(Backend("cpu", "native"), id="cpu-native"),
        pytest.param(Backend("cpu", "triton"), id="cpu-triton-interpreter"),
        pytest.param(Backend("cuda", "triton"), id="cuda-triton", marks=gpu),
        pytest.param(Backend("cuda", "reference"), id="cuda-reference", marks=gpu),
    ]


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


@pytest.fixture(params=_backend_params())
def backend(request) -> Iterator[Backend]:
    """Each backend in turn, selected and with op outputs NaN/-128-poisoned."""
    b: Backend = request.param
    skip_unless_available(b)
    with _backend.use_backend(b.name), _backend.poisoned_outputs():
        yield b


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _select_cpu(name: str):
    skip_unless_available(Backend("cpu", name))
    return _backend.use_backend(name), _backend.poisoned_outputs()


@pytest.fixture(params=["reference", "native"], ids=lambda n: f"cpu-{n}")
def cpu_backend(request):
    """The C++ and reference CPU backends of the ops, with NaN-poisoned op outputs (the
    model-level tests: a whole forward pass per backend)."""
    use, poison = _select_cpu(request.param)
    with use, poison:
        yield request.param


@pytest.fixture(params=["reference", "native", "triton"], ids=lambda n: f"cpu-{n}")
def any_backend(request):
    """As ``cpu_backend``, plus the Triton kernels under the interpreter (slow: used by a
    few representative tests only)."""
    use, poison = _select_cpu(request.param)
    with use, poison:
        yield request.param

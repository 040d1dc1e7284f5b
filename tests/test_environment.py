"""The test environment itself: transformers imports cleanly next to this checkout.

transformers >= 5.25 imports Hugging Face's ``kernels`` package (a dependency of it). The
checkout's top-level ``kernels/`` folder (our Triton kernels) must never stand in for it:
it has no ``__init__.py`` (a namespace portion loses to any regular package), and pytest
runs with ``--import-mode=importlib`` so that it does not put the checkout on ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import pytest
from helpers import run_python

CHECKOUT = Path(__file__).resolve().parents[1]
OUR_KERNELS = CHECKOUT / "kernels"


def _inside(path: str | os.PathLike[str] | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def test_transformers_activations_import() -> None:
    """The import that failed on a fresh machine (hub_kernels -> ``from kernels import``)."""
    activations = importlib.import_module("transformers.activations")
    silu = activations.ACT2FN["silu"]
    import torch

    x = torch.linspace(-3.0, 3.0, 7)
    torch.testing.assert_close(silu(x), x * torch.sigmoid(x))


def test_kernels_name_is_not_our_folder() -> None:
    """Whatever ``import kernels`` finds, it is not the checkout's Triton folder."""
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("no module named kernels on this path (transformers < 5.25 needs none)")
    assert not _inside(spec.origin, OUR_KERNELS), spec
    for location in spec.submodule_search_locations or []:
        if spec.origin is None:  # a namespace package made of folders
            assert not _inside(location, OUR_KERNELS), spec


def test_our_kernels_have_no_init() -> None:
    """A regular package here would shadow Hugging Face's ``kernels`` (see kernels/README)."""
    if not OUR_KERNELS.is_dir():
        pytest.skip("not run from a checkout")
    assert not (OUR_KERNELS / "__init__.py").exists()


def test_our_kernels_import_as_subpackage() -> None:
    """The Triton kernels are reachable where the op layer imports them from."""
    pytest.importorskip("triton")
    mod = importlib.import_module("sentinel_kernels.kernels.attention")
    assert mod.__name__ == "sentinel_kernels.kernels.attention"


@pytest.mark.skipif(not OUR_KERNELS.is_dir(), reason="not run from a checkout")
def test_transformers_imports_from_the_checkout_root() -> None:
    """A user working in the checkout (``python`` started there puts it first on
    ``sys.path``) can import transformers' modules that import ``kernels``."""
    code = (
        "import sys; assert sys.path[0] == '', sys.path[:2]\n"
        "import transformers.activations\n"
        "import importlib.util as u\n"
        "s = u.find_spec('kernels')\n"
        "print('kernels:', None if s is None else s.origin)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = run_python("-c", code, cwd=CHECKOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip().rpartition("kernels: ")[2]
    assert origin == "None" or not _inside(origin, OUR_KERNELS), proc.stdout


def test_import_failure_message_gives_the_real_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing import of a name transformers has is not reported as "too old"."""
    from sentinel_kernels.hf_compat import import_from_transformers

    real = importlib.import_module

    def broken(name: str, package: str | None = None):
        if name == "transformers.masking_utils":
            raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(RuntimeError) as info:
        import_from_transformers("AttentionMaskInterface", "4.53", "transformers.masking_utils")
    text = str(info.value)
    assert "CUDAProperties" in text and "shadowing" in text
    assert "needs transformers >=" not in text


def test_import_failure_message_old_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from sentinel_kernels.hf_compat import import_from_transformers

    with pytest.raises(RuntimeError, match=r"needs transformers >= 99\.0; installed: "):
        import_from_transformers("NoSuchThingAnywhere", "99.0")


def test_cpu_install_works_without_triton() -> None:
    """Triton is an extra: a CPU user without it patches and generates (C++ backend)."""
    code = (
        "import sys, warnings\n"
        "sys.modules['triton'] = None  # `import triton` now raises ImportError\n"
        "warnings.simplefilter('ignore')\n"
        "import torch, sentinel_kernels as sk\n"
        "assert not sk._backend.triton_available()\n"
        "m = sk.models.tiny('llama').eval()\n"
        "sk.patch_model(m, level=2)\n"
        "out = sk.generate(m, torch.randint(3, 200, (2, 5)), max_new_tokens=4)\n"
        "assert out.shape == (2, 9), out.shape\n"
        "print('ok')\n"
    )
    proc = run_python("-c", code, env={**os.environ, "SENTINEL_BACKEND": "auto"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_pyproject_floor_is_the_tested_minimum() -> None:
    """pyproject's transformers floor is the version CI tests (hf_compat.MIN_TRANSFORMERS)."""
    pyproject = CHECKOUT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not run from a checkout")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from sentinel_kernels.hf_compat import MIN_TRANSFORMERS

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert f"transformers>={MIN_TRANSFORMERS}" in deps, deps
    assert not any(d.startswith("triton") for d in deps), "triton must stay an extra"

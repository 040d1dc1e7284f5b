"""Autotune timings kept on disk (``kernels/_autotune.py``, ``SENTINEL_AUTOTUNE_CACHE``).

The kernel modules make every autotuner through ``_autotune.autotune``, which asks Triton
(>= 3.4) to store each key's timings in its cache directory so that a later process skips
the benchmarks. These tests check the switch and the forwarding on any machine, and on a
GPU that a second autotuner of the same kernel and key reads the first one's file.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import triton
import triton.language as tl

from sentinel_kernels import settings
from sentinel_kernels.kernels import _autotune


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(_autotune, "_supports_cache_results", lambda: True)


def test_cache_is_asked_for_by_default(monkeypatch, supported):
    monkeypatch.delenv(settings.AUTOTUNE_CACHE_ENV, raising=False)
    assert _autotune.cache_kwargs() == {"cache_results": True}


def test_switch_turns_the_cache_off(monkeypatch, supported):
    monkeypatch.setenv(settings.AUTOTUNE_CACHE_ENV, "0")
    assert _autotune.cache_kwargs() == {}


def test_older_triton_gets_no_unknown_argument(monkeypatch):
    monkeypatch.delenv(settings.AUTOTUNE_CACHE_ENV, raising=False)
    monkeypatch.setattr(_autotune, "_supports_cache_results", lambda: False)
    assert _autotune.cache_kwargs() == {}


def test_support_matches_the_installed_triton():
    # cache_results arrived in Triton 3.4 (PR #6261)
    major, minor = (int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    has = "cache_results" in inspect.signature(triton.autotune).parameters
    assert _autotune._supports_cache_results() == has
    if (major, minor) >= (3, 4):
        assert has


def test_autotune_forwards_everything(monkeypatch, supported):
    monkeypatch.delenv(settings.AUTOTUNE_CACHE_ENV, raising=False)
    monkeypatch.setattr(_autotune, "_supports_do_bench", lambda: True)
    seen = {}

    def fake(configs, **kwargs):
        seen.update(configs=configs, **kwargs)
        return "decorator"

    monkeypatch.setattr(_autotune.triton, "autotune", fake)
    configs = [object(), object()]
    prune = {"early_config_prune": lambda c, n, **kw: c}
    out = _autotune.autotune(configs, key=["N"], prune_configs_by=prune)
    assert out == "decorator"
    assert callable(seen.pop("do_bench"))
    assert seen == {
        "configs": configs,
        "key": ["N"],
        "prune_configs_by": prune,
        "cache_results": True,
    }
    mine = object()
    _autotune.autotune(configs, key=["N"], do_bench=mine)
    assert seen["do_bench"] is mine  # a caller's own do_bench wins


def test_candidates_are_timed_with_the_configured_lengths(monkeypatch):
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        calls.append((warmup, rep, quantiles))
        fn()
        return [1.0, 0.9, 1.1]

    monkeypatch.setattr(_autotune.triton.testing, "do_bench", fake_do_bench)
    ran = []
    monkeypatch.delenv(settings.AUTOTUNE_BENCH_ENV, raising=False)
    assert _autotune.bench_fn()(lambda: ran.append(1), quantiles=(0.5,)) == [1.0, 0.9, 1.1]
    monkeypatch.setenv(settings.AUTOTUNE_BENCH_ENV, "2, 8.5")
    _autotune.bench_fn()(lambda: ran.append(1), quantiles=None)
    assert calls == [(5.0, 20.0, (0.5,)), (2.0, 8.5, None)]
    assert ran == [1, 1]


def test_timed_candidates_are_counted(monkeypatch):
    monkeypatch.setattr(_autotune.triton.testing, "do_bench", lambda fn, **kw: [1.0])
    before = _autotune.candidates_timed()
    bench = _autotune.bench_fn()
    assert _autotune.candidates_timed() == before  # making it times nothing
    bench(lambda: None)
    bench(lambda: None, quantiles=(0.5,))
    assert _autotune.candidates_timed() == before + 2


def test_a_triton_without_do_bench_gets_no_unknown_argument(monkeypatch):
    monkeypatch.setattr(_autotune, "_supports_do_bench", lambda: False)
    seen = {}
    monkeypatch.setattr(_autotune.triton, "autotune", lambda configs, **kw: seen.update(kw))
    _autotune.autotune([object()], key=["N"])
    assert "do_bench" not in seen


def test_the_installed_triton_takes_do_bench():
    # triton.autotune has taken do_bench= since 3.1; the GPU machine has 3.6
    major, minor = (int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    if (major, minor) >= (3, 1):
        assert _autotune._supports_do_bench()


@pytest.mark.parametrize("bad", ["5", "5,", "a,b", "0,20", "5,-1", "5,20,1", "5,1e9"])
def test_bad_bench_lengths_are_refused(monkeypatch, bad):
    monkeypatch.setenv(settings.AUTOTUNE_BENCH_ENV, bad)
    with pytest.raises(ValueError, match=settings.AUTOTUNE_BENCH_ENV):
        settings.autotune_bench_ms()


def test_every_kernel_module_uses_the_helper():
    # One home for autotuner construction: a direct triton.autotune call would bypass
    # the disk cache and its switch.
    import pathlib

    root = pathlib.Path(_autotune.__file__).parent
    offenders = [
        p.name
        for p in root.glob("*.py")
        if p.name != "_autotune.py" and re.search(r"triton\.autotune\(", p.read_text())
    ]
    assert offenders == []


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton benchmarks)")
def test_second_autotuner_reads_the_first_ones_timings(monkeypatch, tmp_path):
    if not _autotune._supports_cache_results():
        pytest.skip(f"Triton {triton.__version__} has no cache_results")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(settings.AUTOTUNE_CACHE_ENV, raising=False)
    configs = [triton.Config({"BLOCK": b}) for b in (128, 256, 512)]
    x = torch.randn(3001, device="cuda")
    out = torch.full_like(x, float("nan"))

    def run() -> object:
        tuned = _autotune.autotune(configs, key=["n"])(_scale_kernel)
        tuned[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, out, x.numel())
        return tuned

    first = run()
    files = list(tmp_path.rglob("*.autotune.json"))
    assert len(files) == 1, files
    benchmarked: list[bool] = []
    orig = type(first)._bench
    monkeypatch.setattr(
        type(first), "_bench", lambda self, *a, **k: benchmarked.append(True) or orig(self, *a, **k)
    )
    second = run()
    assert benchmarked == []  # read from the file, not tuned again
    assert second.cache == first.cache
    torch.testing.assert_close(out, x * 2)

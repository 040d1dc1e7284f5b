"""Shared machinery of the pytest-benchmark suites in ``bench/``.

* Collection: suites are named ``bench_*.py``. The hook below makes ``pytest bench/`` collect
  them without any ``-o python_files=...`` option, while the main run (``pytest``, whose
  ``testpaths`` is ``tests``) never loads this file and so never sees them.
* Metadata: :func:`pytest_benchmark_update_machine_info` adds library versions, the CUDA
  device, the SIMD level of ``sentinel_kernels._C``, torch threads and the date to the
  ``machine_info`` block of ``--benchmark-json``; :func:`pytest_benchmark_update_commit_info`
  fills in the commit from ``SENTINEL_GIT_COMMIT`` when the tree is not a git checkout (the
  lent GPU machine gets a copy of the working tree without ``.git``).
* Timing: the ``measure`` fixture runs one benchmark the same way for every suite: it rotates
  over a list of input sets whose total size exceeds the last-level cache, synchronises the
  device inside the timed function, and stores bytes moved, GB/s, shape, dtype, device and
  backend in ``extra_info`` (see :class:`Measure`); ``cuda_graph=True`` times replays of
  CUDA graphs captured from the calls instead of eager calls.

The suites reach this module's helpers only through the fixtures: pytest loads a conftest
under its own module name (``--import-mode=importlib``), so ``from conftest import ...``
does not work in a suite. Plain helpers that suites (and ``scripts/``) share live in
``benchlib.py``, importable because this file puts ``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import importlib.metadata
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

# A benchmark of a fused kernel must not time its fallback (ops._dispatch.try_fused_launch).
os.environ.setdefault("SENTINEL_STRICT_KERNELS", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for `import benchlib` in the suites

# --------------------------------------------------------------------------- collection

BENCH_FILE_PATTERN = "bench_*.py"


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` files as test modules.

    Files the python plugin collects anyway (paths named on the command line, or names
    matching ``python_files``, e.g. with ``-o python_files=bench_*.py``) are left to it so
    that nothing is collected twice.
    """
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, BENCH_FILE_PATTERN):
        return None
    if parent.session.isinitpath(file_path):
        return None
    for pattern in parent.config.getini("python_files"):
        if fnmatch.fnmatch(file_path.name, pattern) or fnmatch.fnmatch(str(file_path), pattern):
            return None
    return pytest.Module.from_parent(parent, path=file_path)


# --------------------------------------------------------------------------- partial results


def partial_path(config: pytest.Config) -> Path | None:
    """Where each finished benchmark is also written as it ends: ``<--benchmark-json>``
    with ``.partial.jsonl`` appended, or None without ``--benchmark-json``.

    pytest-benchmark writes its JSON only when the whole session ends, so a run cut off by
    a time limit (the lent GPU machine's calls are bounded) lost every entry it had
    finished. This file keeps them, one JSON object per line (name, group, the timing
    statistics, ``extra_info``), in the order they finished.
    """
    target = config.getoption("benchmark_json", None)
    if target is None:
        return None
    if isinstance(target, (str, os.PathLike)):
        return Path(f"{os.fspath(target)}.partial.jsonl")
    name = getattr(target, "name", None)  # older pytest-benchmark: an open file
    return Path(f"{name}.partial.jsonl") if isinstance(name, str) else None


@pytest.fixture(autouse=True)
def _write_partial(request: pytest.FixtureRequest) -> Any:
    yield
    bench = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    stats = getattr(bench, "stats", None)
    path = partial_path(request.config)
    if bench is None or stats is None or path is None:
        return
    import json

    record = {
        "name": request.node.name,
        "group": getattr(bench, "group", None),
        "stats": stats.stats.as_dict() if hasattr(stats, "stats") else None,
        "extra_info": dict(getattr(bench, "extra_info", {})),
    }
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")


# --------------------------------------------------------------------------- metadata


def _version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` (without importing it), or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else :mod:`platform`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU name for CUDA, CPU model otherwise)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def simd_level() -> str | None:
    """SIMD path the C++ extension chose at run time, or None if it is not available."""
    try:
        from sentinel_kernels import _C

        return str(_C.simd_level())
    except Exception:  # not built, or built without simd_level()
        return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the software and hardware facts a kernel benchmark needs to be read later."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sentinel_kernels": _version("sentinel-kernels"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model_name(),
        "simd_level": simd_level(),
        "sentinel_backend_env": os.environ.get("SENTINEL_BACKEND"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda_device=props.name,
            cuda_device_count=torch.cuda.device_count(),
            cuda_capability=f"{props.major}.{props.minor}",
            cuda_memory_gib=round(props.total_memory / 2**30, 1),
            cuda_l2_bytes=getattr(props, "L2_cache_size", None),
            cuda_sm_count=props.multi_processor_count,
        )
    machine_info["sentinel"] = info


def pytest_benchmark_update_commit_info(config: pytest.Config, commit_info: dict) -> None:
    """Record ``SENTINEL_GIT_COMMIT`` as the commit when it is set (it names the tree that
    really ran: a copy of a working tree on the lent GPU machine may carry a stale git
    checkout, whose HEAD pytest-benchmark would record), else what git says."""
    env_commit = os.environ.get("SENTINEL_GIT_COMMIT")
    if env_commit:
        commit_info["id"] = env_commit
        commit_info["source"] = "SENTINEL_GIT_COMMIT"
        commit_info.pop("error", None)


# --------------------------------------------------------------------------- timing


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that timing must defeat (GPU L2 or CPU L3)."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or 64 * 2**20
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            return int(digits) * scale
    return 32 * 2**20


def rotation_count(device: torch.device, bytes_per_set: int, *, min_sets: int = 3) -> int:
    """How many input sets to rotate over so that together they exceed the cache.

    GPU: at least 3 sets and at least 3x the L2 size in total (capped at 4096 sets, for tiny
    inputs). CPU: at least 3 sets, 1.5x the L3 size, but at most 8 sets (server L3 sizes are
    shared between many cores and filling RAM with randn would dominate the run time).
    """
    bytes_per_set = max(1, int(bytes_per_set))
    if device.type == "cuda":
        return max(min_sets, min(4096, math.ceil(3 * cache_bytes(device) / bytes_per_set)))
    return max(min_sets, min(8, math.ceil(1.5 * cache_bytes(device) / bytes_per_set)))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Rotor:
    """Callable that runs ``fn`` on the next input set and syncs every ``sync_every`` calls."""

    def __init__(
        self,
        fn: Callable[..., Any],
        arg_sets: Sequence[Sequence[Any]],
        device: torch.device | None,
        sync_every: int,
    ) -> None:
        self.fn = fn
        self.arg_sets = arg_sets
        self.device = device
        self.sync_every = max(1, sync_every)
        self.calls = 0

    def __call__(self) -> None:
        args = self.arg_sets[self.calls % len(self.arg_sets)]
        self.calls += 1
        self.fn(*args)
        if self.device is not None and self.calls % self.sync_every == 0:
            synchronize(self.device)


def capture_graphs(
    fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]]
) -> list[tuple[torch.cuda.CUDAGraph]]:
    """One CUDA graph per input set, each holding one call ``fn(*args)``.

    Replaying these back to back times the kernels alone: the graph launch costs a few
    microseconds of host time and none of the Python, dispatcher and Triton launcher work
    of an eager call. Outputs are allocated once, in the graphs' memory pool.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets:  # warm up (compile, autotune) outside capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graphs = []
    for args in arg_sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append((g,))
    torch.cuda.synchronize()
    return graphs


def replay(graph: torch.cuda.CUDAGraph) -> None:
    """Launch one captured graph (the timed function of graph-mode entries)."""
    graph.replay()


class Measure:
    """Time one implementation of an op under pytest-benchmark, the same way in every suite.

    GPU: each pytest-benchmark round launches ``iterations`` calls back to back on rotating
    inputs and synchronises after the last one, inside the timed function, so that the
    per-call time pytest-benchmark reports (round time / iterations) is the kernel time with
    launch overhead hidden behind the queue, not the time to enqueue a launch.
    ``triton.testing.do_bench(..., return_mode="median")`` is recorded as a cross-check
    (CUDA events around single calls with an L2 flush in between).

    CPU: one call per round, rounds chosen to fill about ``cpu_budget_s`` seconds.
    """

    capture_graphs = staticmethod(capture_graphs)
    replay = staticmethod(replay)

    def __init__(
        self,
        *,
        gpu_round_s: float = 2e-3,
        gpu_rounds: int = 100,
        cpu_budget_s: float = 2.0,
        do_bench: bool = True,
    ) -> None:
        self.gpu_round_s = gpu_round_s
        self.gpu_rounds = gpu_rounds
        self.cpu_budget_s = cpu_budget_s
        self.do_bench = do_bench

    @staticmethod
    def rotation_count(device: torch.device, bytes_per_set: int) -> int:
        """See :func:`rotation_count`."""
        return rotation_count(device, bytes_per_set)

    def __call__(
        self,
        benchmark: Any,
        fn: Callable[..., Any],
        arg_sets: Sequence[Sequence[Any]],
        *,
        group: str,
        impl: str,
        role: str,
        backend: str,
        device: torch.device,
        nbytes: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        flops: float | None = None,
        extra: dict[str, Any] | None = None,
        cuda_graph: bool = False,
    ) -> dict[str, Any]:
        """Benchmark ``fn(*arg_sets[i % n])`` and fill ``benchmark.extra_info``.

        ``role`` is ``"candidate"`` (our op), ``"baseline"`` (eager PyTorch, the speedup
        reference of its group) or ``"copy"`` (device copy of the same bytes, the
        bandwidth reference). ``nbytes`` counts the bytes one call must read plus write.
        ``cuda_graph``: capture one CUDA graph per input set (:func:`capture_graphs`) and
        time their replays. Returns the ``extra_info`` dict.
        """
        if cuda_graph:
            fn, arg_sets = replay, capture_graphs(fn, arg_sets)
        benchmark.group = group
        # Warm-up outside timing, one pass over every input set: compiles/autotunes Triton
        # kernels and faults in output pages; then a first estimate of one call's time.
        probe = _Rotor(fn, arg_sets, device if device.type == "cuda" else None, 1)
        for _ in range(max(2, len(arg_sets))):
            probe()
        synchronize(device)
        t0 = time.perf_counter()
        probe_calls = 3
        for _ in range(probe_calls):
            probe()
        synchronize(device)
        est_s = max((time.perf_counter() - t0) / probe_calls, 1e-7)

        if device.type == "cuda":
            iterations = max(1, min(1000, math.ceil(self.gpu_round_s / est_s)))
            rounds, warmup_rounds = self.gpu_rounds, 3
        else:
            iterations = 1
            rounds = max(5, min(200, int(self.cpu_budget_s / est_s)))
            warmup_rounds = 1
        rotor = _Rotor(fn, arg_sets, device if device.type == "cuda" else None, iterations)
        benchmark.pedantic(rotor, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)
        synchronize(device)

        info: dict[str, Any] = {
            "impl": impl,
            "role": role,
            "backend": backend,
            "device": device.type,
            "device_name": device_name(device),
            "shape": list(shape),
            "dtype": str(dtype).removeprefix("torch."),
            "bytes": int(nbytes),
            "inputs_rotated": len(arg_sets),
            "iterations_per_round": iterations,
            "torch_threads": torch.get_num_threads(),
            "cuda_graph": bool(cuda_graph),
        }
        if flops is not None:
            info["flops"] = float(flops)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        median = getattr(stats, "median", None)
        if median:
            info["median_s"] = median
            info["gbps"] = nbytes / median / 1e9
            if flops is not None:
                info["tflops"] = flops / median / 1e12
        if device.type == "cuda" and self.do_bench:
            try:
                import triton.testing

                plain = _Rotor(fn, arg_sets, None, 1)
                ms = triton.testing.do_bench(plain, warmup=25, rep=100, return_mode="median")
                info["do_bench_median_s"] = ms / 1e3
                info["do_bench_gbps"] = nbytes / (ms / 1e3) / 1e9
            except Exception as exc:  # the cross-check must never sink the benchmark
                info["do_bench_error"] = f"{type(exc).__name__}: {exc}"
        if extra:
            info.update(extra)
        benchmark.extra_info.update(info)
        return info

    def decode_attention(self, *args: Any, label: str, dims: tuple[int, ...], **kwargs: Any):
        """``self(*args, ...)`` for a GQA decode-attention entry replayed from CUDA graphs:
        ``dims`` is ``(batch, query heads, kv heads, kv length, head dim)``; the group is
        ``label`` followed by the dims, the FLOPs ``4 * B * Hq * L * D``. Other keywords go
        to :meth:`__call__`."""
        b, hq, hkv, length, d = dims
        return self(
            *args,
            group=f"{label} GQA {hq}/{hkv} B{b} L{length} D{d} bfloat16 cuda graph",
            shape=dims,
            flops=4.0 * b * hq * length * d,
            cuda_graph=True,
            **kwargs,
        )


@pytest.fixture
def measure() -> Measure:
    """The shared timing helper (see :class:`Measure`)."""
    return Measure()


def _load_sentinel_ops() -> tuple[Any, Callable[..., str], Callable[..., Any]]:
    try:
        import sentinel_kernels.ops as ops
        from sentinel_kernels._backend import resolve, use_backend
    except ImportError as exc:
        pytest.skip(f"sentinel_kernels.ops is not importable: {exc}")
    return ops, resolve, use_backend


@pytest.fixture
def sentinel_ops() -> Callable[[], tuple[Any, Callable[..., str], Callable[..., Any]]]:
    """A loader of ``(sentinel_kernels.ops, _backend.resolve, _backend.use_backend)`` that
    skips the entry when the package is not importable; called by the entries that time
    our ops only, so the baselines of a suite still run."""
    return _load_sentinel_ops

"""The C++ extension ``sentinel_kernels._C`` itself (not one kernel family): module
metadata and CPU features, SIMD level selection, and the thread pool every kernel runs on
(concurrent Python threads, fork, interpreter exit, many tiny calls, exceptions in
workers), driven with the quantize and int8 linear kernels as the work."""

from __future__ import annotations

import multiprocessing
import os
import sys

import pytest
import torch
from helpers import int8_linear_args, native_quantize, quantize_input, run_python, run_threads

_C = pytest.importorskip("sentinel_kernels._C")
from sentinel_kernels.reference.quantize import quantize_int8  # noqa: E402

LEVELS = _C.supported_simd_levels()


def test_module_metadata():
    assert _C.abi_version == 1
    feats = _C.cpu_features()
    for key in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"):
        assert isinstance(feats[key], bool)
    assert LEVELS[0] == "scalar"
    assert set(LEVELS) <= {"scalar", "avx2", "avx512", "avx512_vnni"}
    assert _C.simd_level() in LEVELS
    if "avx2" in LEVELS:
        assert feats["avx2"] and feats["fma"] and feats["f16c"]
    if "avx512" in LEVELS:
        assert feats["avx512f"] and feats["avx512bw"]
    if "avx512_vnni" in LEVELS:
        assert feats["avx512_vnni"]


def test_default_level_is_best():
    # Run in a fresh interpreter: other tests change the process-wide level.
    code = "import sentinel_kernels._C as C; print(C.simd_level(), C.supported_simd_levels()[-1])"
    out = run_python("-c", code, check=True, env=_subprocess_env(), timeout=120).stdout.split()
    assert out[0] == out[1]


def test_set_simd_level_errors():
    old = _C.simd_level()
    with pytest.raises(ValueError):
        _C.set_simd_level("sse9")
    with pytest.raises(ValueError):
        _C.set_simd_level("")
    for name in ("avx2", "avx512", "avx512_vnni"):
        if name not in LEVELS:
            with pytest.raises(ValueError):
                _C.set_simd_level(name)
    assert _C.simd_level() == old
    for name in LEVELS:
        _C.set_simd_level(name)
        assert _C.simd_level() == name
    _C.set_simd_level(old)


# --------------------------------------------------------------------------- threading


def test_concurrent_python_threads():
    xs = [quantize_input(64, 1000, torch.float32, seed=100 + i) for i in range(4)]
    refs = [quantize_int8(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                q, s = native_quantize(xs[i], 2)
                assert torch.equal(q, refs[i][0]) and torch.equal(s, refs[i][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    run_threads(work, 4, timeout=120)
    assert not errors, errors


def _fork_child(conn, x, q, s):
    # Only the native op runs in the child: torch's own OpenMP pool is not fork-safe,
    # so the child must not run parallel torch ops (tensors come from the parent).
    rows, cols = x.shape
    _C.quantize_int8(
        x.data_ptr(), "float32", rows, cols, cols, 1, q.data_ptr(), cols, s.data_ptr(), 2
    )
    conn.send((q.numpy().tobytes(), s.numpy().tobytes()))
    conn.close()


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_pool_survives_fork():
    x = quantize_input(64, 1000, torch.float32, seed=9)
    q_ref, s_ref = quantize_int8(x)
    native_quantize(x, 2)  # the pool has running workers now
    q = torch.zeros_like(q_ref)
    s = torch.zeros_like(s_ref)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_fork_child, args=(child, x, q, s))
    p.start()
    p.join(timeout=120)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child hung in the thread pool")
    assert p.exitcode == 0
    q_bytes, s_bytes = parent.recv()
    assert q_bytes == q_ref.numpy().tobytes()
    assert s_bytes == s_ref.numpy().tobytes()


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def test_clean_interpreter_exit():
    code = (
        "import torch, sentinel_kernels._C as C\n"
        "x = torch.randn(256, 4096); q = torch.empty(256, 4096, dtype=torch.int8)\n"
        "s = torch.empty(256)\n"
        "for _ in range(3):\n"
        "    C.quantize_int8(x.data_ptr(), 'float32', 256, 4096, 4096, 1, q.data_ptr(), 4096,"
        " s.data_ptr(), 4)\n"
        "print('ok')\n"
    )
    r = run_python("-c", code, env=_subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# --------------------------------------------------------------------------- pool stress


def _linear_call(w8a8: bool, x, w, s, out, num_threads):
    fn = _C.int8_linear_w8a8 if w8a8 else _C.int8_linear_w8a16
    fn(**int8_linear_args(x, w, s, out, w8a8=w8a8, threads=num_threads))


def _quantize_call(x, q, s, num_threads):
    rows, cols = x.shape
    _C.quantize_int8(
        x.data_ptr(), "float32", rows, cols, cols, 1, q.data_ptr(), cols, s.data_ptr(), num_threads
    )


def _stress_pool(py_threads: int, calls: int) -> None:
    """`calls` tiny back-to-back native calls per Python thread, each small enough to
    take a few microseconds yet split across pool threads (decode-sized GEMVs and a
    quantize of 2 rows), with the thread count varying between calls; every result must
    be bit-identical to the single-threaded one."""
    g = torch.Generator().manual_seed(1234)
    gemv_shapes = [(192, 576), (576, 576), (1536, 576), (576, 1536)]
    weights = []
    for n, k in gemv_shapes:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g) * 0.01 + 1e-4
        weights.append((w, s))
    xq = torch.randn(2, 32768, generator=g)

    def expected(x, i):
        case = i % (2 * len(gemv_shapes) + 1)
        if case == 2 * len(gemv_shapes):
            q, s = torch.empty(xq.shape, dtype=torch.int8), torch.empty(xq.shape[0])
            _quantize_call(xq, q, s, 1)
            return (q, s)
        w, s = weights[case // 2]
        out = torch.empty(x[w.shape[1]].shape[0], w.shape[0])
        _linear_call(case % 2 == 1, x[w.shape[1]], w, s, out, 1)
        return (out,)

    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            gl = torch.Generator().manual_seed(tid)
            x = {k: torch.randn(1, k, generator=gl) for k in (576, 1536)}
            period = 2 * len(gemv_shapes) + 1
            refs = [expected(x, i) for i in range(period)]
            outs = [tuple(torch.empty_like(t) for t in r) for r in refs]
            thread_counts = (2, 2, 3, 2, 4)
            for i in range(calls):
                case = i % period
                nt = thread_counts[(i // period + tid) % len(thread_counts)]
                o = outs[case]
                if case == 2 * len(gemv_shapes):
                    _quantize_call(xq, o[0], o[1], nt)
                else:
                    w, s = weights[case // 2]
                    _linear_call(case % 2 == 1, x[w.shape[1]], w, s, o[0], nt)
                for got, ref in zip(o, refs[case], strict=True):
                    if not torch.equal(got, ref):
                        raise AssertionError(f"thread {tid} call {i} (case {case}, {nt} threads)")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    run_threads(work, py_threads)
    assert not errors, errors


@pytest.mark.parametrize("py_threads", [1, 3])
def test_pool_many_tiny_calls(py_threads):
    _stress_pool(py_threads, 10_000)
    assert _C.thread_pool_size() >= 1  # the calls were split


def test_pool_many_tiny_calls_without_spinning():
    """Same stress with the pool's spinning disabled: every hand-off goes through the
    condition variables (sleep / wake-up path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r})\n"
        "import test_native_ext as t\n"
        "t._stress_pool(1, 3000)\n"
        "t._stress_pool(3, 1000)\n"
        "print('ok')\n"
    )
    env = _subprocess_env()
    env["SENTINEL_POOL_SPIN_US"] = "0"
    r = run_python("-c", code, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def _failing_quantize(num_threads):
    """A call whose every chunk throws inside the pool: with a column stride != 1 the
    kernel allocates a row buffer of `cols` floats per chunk, and 2**62 floats exceed
    std::vector's max_size (std::length_error -> ValueError) before anything is read."""
    huge = 2**62
    dummy = torch.zeros(16)
    q = torch.zeros(16, dtype=torch.int8)
    s = torch.zeros(16)
    _C.quantize_int8(
        dummy.data_ptr(), "float32", 8, huge, 1, 2, q.data_ptr(), huge, s.data_ptr(), num_threads
    )


def test_pool_worker_exceptions_propagate():
    x = quantize_input(2, 32768, torch.float32, seed=77)
    q_ref, s_ref = quantize_int8(x)
    errors: list[BaseException] = []

    def work(tid):
        try:
            for i in range(300):
                nt = (2, 3, 2, 4)[(i + tid) % 4]
                with pytest.raises((ValueError, MemoryError)):
                    _failing_quantize(nt)
                # the pool is still healthy right after the failure
                q, s = native_quantize(x, nt)
                assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    for py_threads in (1, 3):
        run_threads(work, py_threads)
        assert not errors, errors

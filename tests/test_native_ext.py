"""Tests for the C++ CPU extension ``sentinel_kernels._C``.

Every SIMD level this CPU supports (forced with ``set_simd_level``) must give results
bit-identical to a pure-PyTorch fp32 reference computed exactly as the kernel contract
says: ``absmax = max|x|``, ``scale = absmax / 127``, ``inv = 127 / absmax`` (both
correctly rounded fp32 divisions), ``q = clamp(round_half_even(x * inv), -127, 127)``,
all-zero rows give scale 0 and q 0.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

torch = pytest.importorskip("torch")
_C = pytest.importorskip("sentinel_kernels._C")

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
LEVELS = _C.supported_simd_levels()
COLS = (1, 7, 15, 16, 17, 127, 1000, 4096)
ROWS = (1, 3, 64)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=LEVELS)
def level(request):
    """Force one SIMD level for the test, restore the previous one afterwards."""
    old = _C.simd_level()
    _C.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        _C.set_simd_level(old)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor (compares NaNs and -0.0 bit for bit)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.is_floating_point():
        a, b = bits(a.contiguous()), bits(b.contiguous())
    mismatch = (a != b).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} mismatches, first at {mismatch[0].tolist()}"


def ref_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    scale = absmax / 127.0
    nonzero = absmax > 0
    # NB: tensor / tensor. `127 / t` would be t.reciprocal() * 127 (two roundings).
    inv = torch.full_like(absmax, 127.0) / torch.where(nonzero, absmax, torch.ones_like(absmax))
    inv = torch.where(nonzero, inv, torch.zeros_like(inv))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def native_quantize(x: torch.Tensor, num_threads: int = 1, q_stride_row: int | None = None):
    rows, cols = x.shape
    qsr = cols if q_stride_row is None else q_stride_row
    q_buf = torch.full((rows, qsr), 99, dtype=torch.int8)  # 99: padding must stay untouched
    scale = torch.full((rows,), -1.0, dtype=torch.float32)
    _C.quantize_int8(
        x.data_ptr(),
        DTYPES[x.dtype],
        rows,
        cols,
        x.stride(0),
        x.stride(1),
        q_buf.data_ptr(),
        qsr,
        scale.data_ptr(),
        num_threads,
    )
    if qsr > cols:
        assert bool((q_buf[:, cols:] == 99).all()), "wrote into q row padding"
    return q_buf[:, :cols], scale


def native_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    num_threads: int = 1,
    out_stride_row: int | None = None,
) -> torch.Tensor:
    rows, cols = q.shape
    osr = cols if out_stride_row is None else out_stride_row
    out_buf = torch.full((rows, osr), 7.0, dtype=dtype)
    _C.dequantize_int8(
        q.data_ptr(),
        rows,
        cols,
        q.stride(0),
        q.stride(1),
        scale.data_ptr(),
        scale.stride(0),
        out_buf.data_ptr(),
        DTYPES[dtype],
        osr,
        num_threads,
    )
    if osr > cols:
        assert bool((out_buf[:, cols:] == 7.0).all()), "wrote into out row padding"
    return out_buf[:, :cols]


def make_input(rows: int, cols: int, dtype: torch.dtype, seed: int, wide: int = 0) -> torch.Tensor:
    """Random rows spanning magnitudes; some all-zero rows; some exact .5 ties.

    ``wide`` > 0 allocates rows of ``cols + wide`` elements and returns the first ``cols``
    (row stride larger than cols).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols + wide, generator=g)
    x *= torch.pow(10.0, torch.empty(rows, 1).uniform_(-4, 3.5, generator=g))
    if rows >= 3:
        x[1] = 0.0  # all-zero row
        # absmax 127 -> inv == 1 exactly: every half-integer is a rounding tie.
        halves = (torch.randint(-253, 254, (cols + wide,), generator=g) / 2.0).clamp(-126.5, 126.5)
        x[2] = halves
        x[2, 0] = 127.0 if cols > 1 else x[2, 0]
    if rows >= 8:
        x[5] = -0.0
        x[6, : min(cols, 3)] = torch.tensor([-3.0e-3, 2.5e-3, 1.0e-3])[: min(cols, 3)]
    return x.to(dtype)[:, :cols]


# --------------------------------------------------------------------------- features / levels


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
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=_subprocess_env(),
        timeout=120,
    ).stdout.split()
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


# --------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_quantize_matches_reference(level, dtype):
    for rows in ROWS:
        for cols in COLS:
            x = make_input(rows, cols, dtype, seed=rows * 10007 + cols)
            q_ref, s_ref = ref_quantize(x)
            for threads in (1, 2):
                q, s = native_quantize(x, threads)
                assert_same_bits(s, s_ref)
                assert_same_bits(q, q_ref)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_quantize_strided(level, dtype):
    for rows in ROWS:
        for cols in COLS:
            base = make_input(rows, 2 * cols + 3, dtype, seed=cols * 31 + rows)
            # column stride 2 (gather path), row stride 2 * cols + 3
            x = base[:, : 2 * cols : 2]
            assert x.shape == (rows, cols) and x.stride(1) == 2
            # column stride 1, row stride > cols (contiguous SIMD path)
            y = make_input(rows, cols, dtype, seed=cols + rows, wide=5)
            assert y.stride(0) == cols + 5
            for t in (x, y):
                q_ref, s_ref = ref_quantize(t)
                for threads in (1, 2):
                    q, s = native_quantize(t, threads, q_stride_row=cols + 9)
                    assert_same_bits(s, s_ref)
                    assert_same_bits(q, q_ref)
                    # strided and contiguous inputs agree bit for bit
                    q2, s2 = native_quantize(t.contiguous(), threads)
                    assert_same_bits(q2, q)
                    assert_same_bits(s2, s)


def test_quantize_transposed_input(level):
    x = make_input(64, 200, torch.float32, seed=5).t()  # [200, 64], strides (1, 200)
    q_ref, s_ref = ref_quantize(x)
    q, s = native_quantize(x, 2)
    assert_same_bits(q, q_ref)
    assert_same_bits(s, s_ref)


def test_quantize_large_rows_threads(level):
    x = make_input(257, 4096, torch.float32, seed=11)
    q_ref, s_ref = ref_quantize(x)
    for threads in (1, 2, 3, 8):
        q, s = native_quantize(x, threads)
        assert_same_bits(q, q_ref)
        assert_same_bits(s, s_ref)


def _run_all_levels(fn):
    old = _C.simd_level()
    try:
        results = {}
        for name in LEVELS:
            _C.set_simd_level(name)
            results[name] = fn()
        return results
    finally:
        _C.set_simd_level(old)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_quantize_every_16bit_pattern_consistent(dtype):
    """All 65536 bit patterns (NaN, inf, subnormals included), one per row and mixed
    into long rows: every SIMD level agrees bit for bit, and finite rows match the
    reference."""
    pats = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    single = pats.reshape(-1, 1)
    g = torch.Generator().manual_seed(3)
    mixed = pats[torch.randperm(pats.numel(), generator=g)].reshape(-1, 1000 + 24)[:, :1000]
    mixed = mixed.contiguous()
    finite = torch.isfinite(mixed.float()).all(dim=1)

    def run():
        return [native_quantize(t, 2) for t in (single, mixed, mixed[:, ::3])]

    results = _run_all_levels(run)
    first = results[LEVELS[0]]
    for name in LEVELS[1:]:
        for (q0, s0), (q1, s1) in zip(first, results[name], strict=True):
            assert_same_bits(q1, q0)
            assert_same_bits(s1, s0)
    q, s = first[0]
    ok = torch.isfinite(single.float()).squeeze(1)
    q_ref, s_ref = ref_quantize(single[ok])
    assert_same_bits(q[ok], q_ref)
    assert_same_bits(s[ok], s_ref)
    q, s = first[1]
    q_ref, s_ref = ref_quantize(mixed[finite])
    assert_same_bits(q[finite], q_ref)
    assert_same_bits(s[finite], s_ref)


def test_quantize_special_float32_consistent():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(48, 100, generator=g)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = -float("inf")
    x[3] = 1e-42  # subnormal absmax: 127 / absmax overflows to inf
    x[4, ::2] = float("nan")
    x[5] = torch.randint(0, 2**31, (100,), generator=g, dtype=torch.int32).view(torch.float32)
    x[6] = torch.tensor(3.4e38)
    x[7, 50] = -3.4e38

    def run():
        return native_quantize(x, 2), native_quantize(x[:, ::2], 1)

    results = _run_all_levels(run)
    first = results[LEVELS[0]]
    for name in LEVELS[1:]:
        for (q0, s0), (q1, s1) in zip(first, results[name], strict=True):
            assert_same_bits(q1, q0)
            assert_same_bits(s1, s0)
    (q, s), _ = first
    assert torch.isnan(s[0]) and torch.isnan(s[4]) and bool((q[0] == 0).all())
    assert torch.isinf(s[1]) and torch.isinf(s[2])
    finite_rows = [r for r in range(48) if r not in (0, 1, 2, 3, 4, 5)]
    q_ref, s_ref = ref_quantize(x[finite_rows])
    assert_same_bits(q[finite_rows], q_ref)
    assert_same_bits(s[finite_rows], s_ref)


# --------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_dequantize_matches_reference(level, dtype):
    g = torch.Generator().manual_seed(1)
    for rows in ROWS:
        for cols in COLS:
            q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
            scale = torch.rand(rows, generator=g) * torch.pow(
                10.0, torch.randint(-6, 4, (rows,), generator=g)
            )
            ref = (q.float() * scale[:, None]).to(dtype)
            for threads in (1, 2):
                out = native_dequantize(q, scale, dtype, threads)
                assert_same_bits(out, ref)
                out = native_dequantize(q, scale, dtype, threads, out_stride_row=cols + 3)
                assert_same_bits(out, ref)
            # strided q columns and scale stride 2
            q_wide = torch.randint(-127, 128, (rows, 2 * cols), dtype=torch.int8, generator=g)
            q_s = q_wide[:, ::2]
            scale_wide = torch.rand(2 * rows, generator=g)
            scale_s = scale_wide[::2]
            out = native_dequantize(q_s, scale_s, dtype, 2)
            assert_same_bits(out, (q_s.float() * scale_s[:, None]).to(dtype))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_dequantize_conversion_edge_cases(dtype):
    """q = +-1 times scales with arbitrary bit patterns: exercises the fp32 -> fp16/bf16
    rounding (ties, overflow to inf, subnormals, NaN) on every level."""
    g = torch.Generator().manual_seed(2)
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            65504.0,
            65519.99,
            65520.0,
            2.0**-24,
            2.0**-25,
            1.5 * 2.0**-25,
            2.0**-14,
            3.0e38,
            1e-40,
            1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8,
        ]
    )
    rnd = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int32)
    near_half = (
        torch.randint(0x33000000, 0x47800000, (100_000,), generator=g, dtype=torch.int32) & ~0xFFF
    ) | 0x1000  # exact fp16 ties
    scale = torch.cat([specials, rnd.view(torch.float32), near_half.view(torch.float32)])
    q = torch.where(torch.rand(scale.numel(), 1, generator=g) < 0.5, 1, -1).to(torch.int8)
    q = q.expand(-1, 17).contiguous()  # 17 columns: SIMD body plus tail

    results = _run_all_levels(lambda: native_dequantize(q, scale, dtype, 2))
    first = results[LEVELS[0]]
    for name in LEVELS[1:]:
        assert_same_bits(results[name], first)
    prod = q.float() * scale[:, None]
    ref = prod.to(dtype)
    nan = torch.isnan(prod)
    assert bool(torch.isnan(first[nan].float()).all())
    assert_same_bits(first[~nan], ref[~nan])
    if dtype == torch.bfloat16:
        assert bool((first[nan].view(torch.int16) == 0x7FC0).all())


def test_round_trip(level):
    for dtype in DTYPES:
        x = make_input(64, 1000, dtype, seed=4)
        q, s = native_quantize(x, 2)
        y = native_dequantize(q, s, torch.float32, 2)
        err = (y - x.float()).abs()
        assert bool((err <= s[:, None] * 0.5001 + 1e-30).all())
        y16 = native_dequantize(q, s, dtype, 2)
        assert_same_bits(y16, y.to(dtype))


# --------------------------------------------------------------------------- validation


def test_bad_arguments_raise_value_error():
    x = torch.randn(4, 8)
    q = torch.empty(4, 8, dtype=torch.int8)
    s = torch.empty(4)
    xp, qp, sp = x.data_ptr(), q.data_ptr(), s.data_ptr()
    good = dict(
        x_ptr=xp,
        dtype="float32",
        rows=4,
        cols=8,
        x_stride_row=8,
        x_stride_col=1,
        q_ptr=qp,
        q_stride_row=8,
        scale_ptr=sp,
        num_threads=1,
    )
    _C.quantize_int8(**good)
    bad = [
        dict(dtype="float64"),
        dict(dtype="int8"),
        dict(rows=-1),
        dict(cols=0),
        dict(cols=-3),
        dict(x_ptr=0),
        dict(q_ptr=0),
        dict(scale_ptr=0),
        dict(x_stride_row=0),
        dict(x_stride_row=-8),
        dict(x_stride_col=0),
        dict(x_stride_col=-1),
        dict(q_stride_row=7),
        dict(q_stride_row=0),
        dict(num_threads=0),
        dict(num_threads=-2),
    ]
    for change in bad:
        with pytest.raises(ValueError):
            _C.quantize_int8(**{**good, **change})
    # zero rows: nothing to do, null pointers allowed
    _C.quantize_int8(**{**good, "rows": 0, "x_ptr": 0, "q_ptr": 0, "scale_ptr": 0})

    out = torch.empty(4, 8)
    goodd = dict(
        q_ptr=qp,
        rows=4,
        cols=8,
        q_stride_row=8,
        q_stride_col=1,
        scale_ptr=sp,
        scale_stride=1,
        out_ptr=out.data_ptr(),
        out_dtype="float32",
        out_stride_row=8,
        num_threads=1,
    )
    _C.dequantize_int8(**goodd)
    badd = [
        dict(out_dtype="float64"),
        dict(out_dtype=""),
        dict(rows=-1),
        dict(cols=0),
        dict(q_ptr=0),
        dict(scale_ptr=0),
        dict(out_ptr=0),
        dict(q_stride_row=0),
        dict(q_stride_col=0),
        dict(scale_stride=0),
        dict(scale_stride=-1),
        dict(out_stride_row=7),
        dict(out_stride_row=0),
        dict(num_threads=0),
    ]
    for change in badd:
        with pytest.raises(ValueError):
            _C.dequantize_int8(**{**goodd, **change})
    _C.dequantize_int8(**{**goodd, "rows": 0, "q_ptr": 0, "scale_ptr": 0, "out_ptr": 0})

    with pytest.raises(TypeError):
        _C.quantize_int8(xp, "float32", 4, 8, 8, 1, qp, 8, sp)  # missing num_threads


def test_error_message_is_clear():
    with pytest.raises(ValueError, match="dtype"):
        _C.quantize_int8(1, "float64", 1, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="q_stride_row"):
        _C.quantize_int8(1, "float32", 1, 8, 8, 1, 1, 4, 1, 1)


# --------------------------------------------------------------------------- threading


def test_concurrent_python_threads():
    xs = [make_input(64, 1000, torch.float32, seed=100 + i) for i in range(4)]
    refs = [ref_quantize(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                q, s = native_quantize(xs[i], 2)
                assert torch.equal(q, refs[i][0]) and torch.equal(s, refs[i][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
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
    x = make_input(64, 1000, torch.float32, seed=9)
    q_ref, s_ref = ref_quantize(x)
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
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# --------------------------------------------------------------------------- pool stress


def _w8a16_call(x, w, s, out, num_threads):
    m, k = x.shape
    n = w.shape[0]
    _C.int8_linear_w8a16(
        x.data_ptr(),
        "float32",
        m,
        k,
        k,
        w.data_ptr(),
        n,
        k,
        s.data_ptr(),
        0,
        1,
        0,
        "float32",
        out.data_ptr(),
        "float32",
        n,
        num_threads,
    )


def _w8a8_call(x, w, s, out, num_threads):
    m, k = x.shape
    n = w.shape[0]
    _C.int8_linear_w8a8(
        x.data_ptr(),
        "float32",
        m,
        k,
        k,
        0,
        w.data_ptr(),
        n,
        k,
        s.data_ptr(),
        0,
        "float32",
        out.data_ptr(),
        "float32",
        n,
        num_threads,
    )


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
        (_w8a16_call if case % 2 == 0 else _w8a8_call)(x[w.shape[1]], w, s, out, 1)
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
                    (_w8a16_call if case % 2 == 0 else _w8a8_call)(x[w.shape[1]], w, s, o[0], nt)
                for got, ref in zip(o, refs[case], strict=True):
                    if not torch.equal(got, ref):
                        raise AssertionError(f"thread {tid} call {i} (case {case}, {nt} threads)")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(py_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock"
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
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
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
    x = make_input(2, 32768, torch.float32, seed=77)
    q_ref, s_ref = ref_quantize(x)
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
        threads = [threading.Thread(target=work, args=(t,)) for t in range(py_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors

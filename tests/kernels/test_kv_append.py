"""Triton KV append (``kernels.kv_append.kv_append_fwd``) against ``reference.kv_append``.

The kernel entry point is called directly, with the exact signature the op layer uses: on
the GPU when there is one, otherwise on CPU tensors through Triton's interpreter
(tests/conftest.py switches it on). Shapes are tiny: the interpreter runs every program in
Python. Codes and scales must equal the reference bit for bit (the quantization rule is a
chain of correctly rounded fp32 operations), and slots not written keep their poison.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_same_bits,
    poisoned_cache,
    require_triton_kernels,
    transposed_randn,
)

from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append
from sentinel_kernels.reference.kv_formats import KV_FORMATS

DEVICE, DTYPES = require_triton_kernels()

from sentinel_kernels.kernels import kv_append as kka  # noqa: E402


def _append_both(x, start, fmt, n_groups, cap, wrap, cache_dtype=None, transposed=False):
    """Run the kernel and the reference on identical poisoned caches; return both."""
    b, h, _, d = x.shape
    cdt = cache_dtype or x.dtype
    got = poisoned_cache(b, h, cap, d, fmt, n_groups, cdt, DEVICE, transposed)
    want_c, want_s = poisoned_cache(b, h, cap, d, fmt, n_groups, cdt)
    kka.kv_append_fwd(x, got[0], start, kv_format=fmt, scales=got[1], wrap=wrap)
    ref_kv_append(x.cpu(), want_c, start.cpu(), fmt, want_s, wrap)
    return got, (want_c, want_s)


def _assert_same_store(got, want) -> None:
    (gc, gs), (wc, ws) = got, want
    assert_same_bits(gc, wc, "codes")
    if ws is not None:
        assert_same_bits(gs, ws, "scales")


# ------------------------------------------------------------------------------- append


DG = [(1, 1), (7, 1), (7, 2), (64, 1), (64, 2), (7, 3), (64, 4)]


@pytest.mark.parametrize("wrap", [False, True], ids=["nowrap", "wrap"])
@pytest.mark.parametrize("dg", DG, ids=lambda t: f"D{t[0]}G{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_append_bit_exact(fmt, dtype, dg, wrap):
    d, n_groups = dg
    if fmt == "dense" and n_groups > 1:
        pytest.skip("dense has no groups")
    b, h, cap = 2, 3, 8
    # No wrap: row 1 starts at 5, so 3 of its 5 tokens fall past L (never written).
    # Wrap: 11 > L tokens (only the last 8 land), row 1 from position 14 (wraps twice).
    s, starts = (11, [3, 14]) if wrap else (5, [0, 5])
    x = transposed_randn(b, h, s, d, dtype, DEVICE, seed=d * 31 + n_groups)
    start = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    got, want = _append_both(x, start, fmt, n_groups, cap, wrap)
    _assert_same_store(got, want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_append_edge_values(fmt):
    """Zero groups, exact half-integer quotients, saturated and underflowing scales, inf."""
    d = 8
    rows = [
        [0.0] * 8,  # s = 0: codes 0
        # Exact half-integer quotients x / s (ties: half to even) for which x * RN(1 / s)
        # lands on the wrong side of the tie. int8, s = 1.1015625 (absmax 127 s):
        # x / s = -63.5, -125.5, -123.5, -121.5; and per group of 4, s = 1.044921875
        # (x / s = +-62.5) and s = 1.1015625 again.
        [139.8984375, -69.94921875, -138.24609375, -136.04296875, -133.83984375, 0.5, 0.0, 1.0],
        [
            132.705078125,
            65.3076171875,
            -65.3076171875,
            0.0,
            139.8984375,
            -69.94921875,
            -138.24609375,
            1.0,
        ],
        # int4, lo = 0 and hi = 15 s: s = 1.19921875, (x - m) / s = 3.5, 7.5 (both groups);
        # s = 1.1318359375, (x - m) / s = 14.5.
        [0.0, 17.98828125, 4.197265625, 8.994140625, 0.0, 17.98828125, 4.197265625, 8.994140625],
        [0.0, 16.9775390625, 16.41162109375, 1.0, 0.0, 16.9775390625, 16.41162109375, 1.0],
        [1e9, -3e8, 5.0, 0.0, -1e9, 2.0, 7e8, -1.0],  # s saturates at 65504
        [3e-6, -1e-6, 2e-6, 0.0, 1e-7, -3e-6, 5e-7, 1e-6],  # f16-subnormal / zero s
        [1e-4, -2e-4, 3e-4, 5e-5, 0.0, -1e-4, 2e-4, 7e-5],
        [float("inf"), 1.0, -2.0, 0.0, 3.0, 4.0, -5.0, 6.0],
        [float("-inf"), 1.0, -2.0, 0.0, 3.0, 4.0, -5.0, 6.0],
    ]
    x = torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), d).to(DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for n_groups in (1, 2):
        got, want = _append_both(x, start, fmt, n_groups, len(rows), wrap=False)
        _assert_same_store(got, want)


@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_append_decode_step_and_layouts(fmt):
    """S = 1 appends into a [B, L, H, D]-strided cache (scales too), fp32 into fp16 dense."""
    b, h, cap, d = 3, 2, 6, 64
    start = torch.tensor([0, 5, 2], dtype=torch.int32, device=DEVICE)
    x = transposed_randn(b, h, 1, d, torch.float32, DEVICE, seed=7)
    got, want = _append_both(
        x,
        start,
        fmt,
        2 if fmt != "dense" else 1,
        cap,
        wrap=False,
        cache_dtype=torch.float16,
        transposed=True,
    )
    _assert_same_store(got, want)
    # Wrap with per-row starts past L.
    start = torch.tensor([6, 13, 0], dtype=torch.int32, device=DEVICE)
    x = transposed_randn(b, h, 3, d, torch.float32, DEVICE, seed=8)
    got, want = _append_both(x, start, fmt, 1, cap, wrap=True, transposed=True)
    _assert_same_store(got, want)


def test_append_sequence_matches_one_shot():
    """Appending token by token equals one append of the whole sequence (no wrap)."""
    b, h, s, d, cap = 2, 2, 6, 16, 8
    x = transposed_randn(b, h, s, d, torch.float16, DEVICE, seed=9)
    start = torch.zeros(b, dtype=torch.int32, device=DEVICE)
    one, _ = _append_both(x, start, "int4", 2, cap, wrap=False)
    step = poisoned_cache(b, h, cap, d, "int4", 2, torch.float16, DEVICE)
    for i in range(s):
        kka.kv_append_fwd(
            x[:, :, i : i + 1], step[0], start + i, kv_format="int4", scales=step[1], wrap=False
        )
    _assert_same_store(step, (one[0].cpu(), one[1].cpu()))

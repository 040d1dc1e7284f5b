"""A fused kernel that cannot run falls back to its composition, once and loudly.

``ops._dispatch.try_fused_launch``: outside the test suite's strict mode, a fused launch
that raises (e.g. a Triton release that cannot compile it) is logged once, never tried
again, and the op returns the composition of the unfused ops, which computes the same
thing. In strict mode (``SENTINEL_STRICT_KERNELS=1``, set by ``conftest.py``) the error
propagates, so a broken kernel fails its tests instead of hiding behind the fallback.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import Backend
from helpers import randn, same_bits

import sentinel_kernels as sk
from sentinel_kernels import settings
from sentinel_kernels.ops import _dispatch


@pytest.fixture
def lenient(monkeypatch):
    """Strict mode off and an empty failure record (restored after)."""
    monkeypatch.setattr(_dispatch, "_fused_failed", {})
    with settings.override(settings.STRICT_KERNELS_ENV, None):
        yield


def _linear_inputs(dev: str) -> dict:
    x = randn((1, 64), torch.float32, dev, seed=1)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8, device=dev)
    s = randn((24,), torch.float32, dev, seed=2).abs() + 0.01
    nw = randn((64,), torch.float32, dev, seed=3)
    res = randn((1, 24), torch.float32, dev, seed=4)
    return {"x": x, "w_int8": w, "w_scale": s, "norm_weight": nw, "residual": res}


def _linear_composition(kw: dict) -> torch.Tensor:
    a = sk.ops.rms_norm(kw["x"], kw["norm_weight"], 1e-6)
    return kw["residual"] + sk.ops.int8_linear(a, kw["w_int8"], kw["w_scale"])


def test_int8_linear_fused_falls_back_once(triton_backend: Backend, lenient, monkeypatch, caplog):
    from sentinel_kernels.kernels import int8_matmul as kim

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cannot compile (simulated)")

    monkeypatch.setattr(kim, "w8a16_fused", broken)
    kw = _linear_inputs(triton_backend.device)
    with caplog.at_level(logging.WARNING, logger="sentinel_kernels"):
        y1 = sk.ops.int8_linear_fused(**kw)
        y2 = sk.ops.int8_linear_fused(**kw)
    want = _linear_composition(kw)
    assert same_bits(y1, want) and same_bits(y2, want)
    assert len(calls) == 1, "a failed fused kernel must not be tried again"
    warnings = [r for r in caplog.records if "int8_linear_fused" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
    assert "simulated" in _dispatch.fused_kernel_failures()["int8_linear_fused"]


def test_strict_mode_raises(triton_backend: Backend, monkeypatch):
    from sentinel_kernels.kernels import int8_matmul as kim

    monkeypatch.setattr(_dispatch, "_fused_failed", {})

    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile (simulated)")

    monkeypatch.setattr(kim, "w8a16_fused", broken)
    with (
        settings.override(settings.STRICT_KERNELS_ENV, "1"),
        pytest.raises(RuntimeError, match="simulated"),
    ):
        sk.ops.int8_linear_fused(**_linear_inputs(triton_backend.device))
    assert _dispatch.fused_kernel_failures() == {}


def test_rope_kv_append_falls_back_with_the_same_state(
    triton_backend: Backend, lenient, monkeypatch
):
    """The fallback appends exactly once: caches and lengths equal the composition's."""
    from sentinel_kernels.kernels import kv_append as kkv

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cannot compile (simulated)")

    monkeypatch.setattr(kkv, "rope_kv_append_fwd", broken)
    dev = triton_backend.device
    b, hq, hkv, s, d, cap = 2, 4, 2, 3, 8, 16
    q = randn((b, s, hq * d), torch.float32, dev, seed=5).view(b, s, hq, d).transpose(1, 2)
    k = randn((b, s, hkv * d), torch.float32, dev, seed=6).view(b, s, hkv, d).transpose(1, 2)
    v = randn((b, hkv, s, d), torch.float32, dev, seed=7)
    pos = torch.arange(s, dtype=torch.float32, device=dev)[:, None]
    freq = torch.arange(d // 2, dtype=torch.float32, device=dev)[None] + 1.0
    ang = torch.cat([pos / freq, pos / freq], dim=-1)
    cos, sin = ang.cos(), ang.sin()

    def state():
        kc = randn((b, hkv, cap, d), torch.float32, dev, seed=8)
        vc = randn((b, hkv, cap, d), torch.float32, dev, seed=9)
        return kc, vc, torch.tensor([0, 5], dtype=torch.int32, device=dev)

    kc, vc, lens = state()
    q_out = sk.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, lens, "dense")
    assert len(calls) == 1
    kc2, vc2, lens2 = state()
    want_q, k_rot = sk.ops.rotary_embedding(q, k, cos, sin)
    sk.ops.kv_append(k_rot, kc2, lens2, "dense")
    sk.ops.kv_append(v, vc2, lens2, "dense")
    lens2 += s
    assert same_bits(q_out, want_q)
    assert same_bits(kc, kc2) and same_bits(vc, vc2) and torch.equal(lens, lens2)
    sk.ops.rope_kv_append(q, k, v, cos, sin, *state(), "dense")
    assert len(calls) == 1

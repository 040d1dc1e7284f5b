"""``call_op``: an op's function called directly in plain eager calls, the dispatcher
whenever compile, fake tensors, modes, the profiler or autograd need it; same results."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import sentinel_kernels as sk
from sentinel_kernels.ops import _dispatch


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 127, generator=g), torch.randn(127, generator=g)


def test_direct_call_equals_the_dispatcher():
    x, w = _inputs()
    with torch.inference_mode():
        assert _dispatch._direct_ok((x, w))
        direct = sk.ops.rms_norm(x, w, 1e-6)
        via = torch.ops.sentinel.rms_norm(x, w, 1e-6)
    assert torch.equal(direct, via)


def test_the_dispatcher_is_used_when_something_needs_it():
    x, w = _inputs()
    with torch.no_grad():
        assert _dispatch._direct_ok((x, w, 1.0))
    p = torch.nn.Parameter(w.clone())
    assert not _dispatch._direct_ok((x, p))  # grad enabled and a leaf that requires grad
    with torch.no_grad():
        assert _dispatch._direct_ok((x, p))
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        assert not _dispatch._direct_ok((fx, fw))
        out = sk.ops.rms_norm(fx, fw, 1e-6)  # the fake implementation answers
        assert out.shape == x.shape
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        assert not _dispatch._direct_ok((x, w))
        sk.ops.rms_norm(x, w, 1e-6)
    assert any(e.name == "sentinel::rms_norm" for e in prof.events())

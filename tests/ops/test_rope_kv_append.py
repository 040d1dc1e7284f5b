"""sk.ops.rope_kv_append: rotary embedding + K/V append + ``lens += S``, bit for bit.

The op is defined as the composition ``q_out, k_rot = rotary_embedding(q, k, cos, sin)``,
``kv_append(k_rot, ...)``, ``kv_append(v, ...)``, ``lens += S``. Every step is elementwise
with the same roundings in the fused Triton kernel (the rotary kernel's products and sum,
rounded to the input dtype, then kv_append's correctly rounded quantization steps), so
``q_out``, every cache tensor (codes and scales) and ``lens`` must equal the composition
of the reference functions exactly. Outputs and caches start poisoned (NaN, int8 -128,
int4 bytes 0xEE, scales NaN): slots the append does not own must keep their poison.

The fused kernel is called through its launcher on the Triton backend (the interpreter on
CPU tensors, else the GPU). The interpreter converts fp32 to bfloat16 by truncation (the
plain kv_append kernel shows the same), so bf16 inputs and bf16 caches are compared with
the reference on the GPU only (``test_cuda_*``).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import Backend
from helpers import assert_same_bits, poisoned_cache, randn, same_bits, skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.ops.kv_append import ROPE_KV_APPEND_MAX_FUSED
from sentinel_kernels.reference import fused as ref_fused
from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append
from sentinel_kernels.reference.kv_append import rope_kv_append as ref_rope_kv_append

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _composition(q, k, v, cos, sin, k_cache, v_cache, lens, fmt, k_scales, v_scales, wrap):
    """The defining composition, on the reference functions (CPU copies, in place)."""
    q_out, k_rot = ref_fused.rotary_embedding(q, k, cos, sin)
    ref_kv_append(k_rot, k_cache, lens, fmt, k_scales, wrap)
    ref_kv_append(v, v_cache, lens, fmt, v_scales, wrap)
    lens += q.shape[2]
    return q_out


def _heads(b, h, s, d, dtype, dev, seed):
    """``proj(x).view(B, S, H, D).transpose(1, 2)``: the non-contiguous layout callers pass."""
    return randn((b, s, h * d), dtype, dev, seed=seed).view(b, s, h, d).transpose(1, 2)


def _cpu(t):
    return t.detach().cpu().clone() if t is not None else None


class _Problem:
    """Inputs, poisoned caches and a CPU copy of the state for the composition."""

    def __init__(
        self,
        dev,
        *,
        b,
        hq,
        hkv,
        s,
        d,
        cap,
        groups,
        fmt,
        dtype,
        cache_dtype,
        lens,
        lens_dtype=torch.int32,
        wrap=False,
        cos_batch=1,
        v_dtype=None,
        seed=0,
    ):
        self.fmt = fmt
        self.wrap = wrap
        self.q = _heads(b, hq, s, d, dtype, dev, seed + 1)
        self.k = _heads(b, hkv, s, d, dtype, dev, seed + 2)
        self.v = _heads(b, hkv, s, d, v_dtype or dtype, dev, seed + 3)
        # Random cos/sin whose halves differ: a kernel reading one half for both fails.
        self.cos = randn((cos_batch, s, d), dtype, dev, seed=seed + 4)
        self.sin = randn((cos_batch, s, d), dtype, dev, seed=seed + 5)
        g = 1 if fmt == "dense" else groups
        self.k_cache, self.k_scales = poisoned_cache(b, hkv, cap, d, fmt, g, cache_dtype, dev)
        self.v_cache, self.v_scales = poisoned_cache(b, hkv, cap, d, fmt, g, cache_dtype, dev)
        self.lens = torch.tensor(lens, dtype=lens_dtype, device=dev)
        self.poison = [_cpu(t) for t in self.state()]

    def state(self):
        return [self.k_cache, self.v_cache, self.lens, self.k_scales, self.v_scales]

    def expected(self):
        """``(q_out, [k_cache, v_cache, lens, k_scales, v_scales])`` of the composition."""
        st = [_cpu(t) for t in self.state()]
        kc, vc, lens, ks, vs = st
        ins = [t.detach().cpu() for t in (self.q, self.k, self.v, self.cos, self.sin)]
        q_out = _composition(*ins, kc, vc, lens, self.fmt, ks, vs, self.wrap)
        return q_out, st

    def check(self, q_out, want_q, want_state):
        assert q_out.is_contiguous() and q_out.dtype == self.q.dtype
        assert_same_bits(q_out, want_q, "q_out")
        names = ("k_cache", "v_cache", "lens", "k_scales", "v_scales")
        for name, got, want in zip(names, self.state(), want_state, strict=True):
            if got is not None:
                assert_same_bits(got, want, name)
        # Something was appended (the comparison above would also pass on a no-op if
        # the composition wrote nothing).
        assert not same_bits(self.k_cache, self.poison[0]), "no key was written"
        assert not same_bits(self.v_cache, self.poison[1]), "no value was written"


# (fmt, x dtype, cache dtype, groups, S, Hq, Hkv, D, L, lens, wrap, cos batch, lens dtype)
KERNEL_CASES = [
    ("dense", F32, F32, 1, 1, 6, 2, 64, 40, [0, 5, 37], False, 1, torch.int32),
    ("dense", F16, F16, 1, 3, 2, 2, 48, 40, [0, 5, 37], False, 3, torch.int64),
    # 16 tokens: row 2 runs past L (slots >= L skipped); an fp32 -> fp16 cast-copy
    ("dense", F32, F16, 1, 16, 6, 2, 64, 40, [0, 5, 37], False, 1, torch.int32),
    ("dense", F16, F32, 1, 3, 6, 2, 64, 8, [0, 5, 37], True, 3, torch.int32),  # ring
    ("dense", BF16, BF16, 1, 3, 6, 2, 64, 40, [0, 5, 37], False, 3, torch.int32),
    ("dense", F32, BF16, 1, 3, 6, 2, 64, 40, [0, 5, 37], True, 1, torch.int32),
    ("int8", F32, None, 1, 1, 6, 2, 64, 40, [0, 5, 37], False, 3, torch.int32),
    ("int8", F16, None, 3, 3, 6, 2, 48, 16, [0, 5, 37], True, 1, torch.int64),
    ("int8", F32, None, 2, 16, 2, 2, 64, 8, [0, 5, 37], True, 3, torch.int32),  # S > L
    ("int8", F16, None, 4, 3, 4, 2, 10, 40, [0, 5, 37], False, 1, torch.int32),  # short group
    ("int8", F32, None, 1, 16, 3, 3, 128, 40, [0, 5, 30], False, 3, torch.int32),  # 2 kv tiles
    ("int8", BF16, None, 2, 3, 6, 2, 64, 40, [0, 5, 37], True, 1, torch.int32),
    ("int4", F32, None, 1, 3, 6, 2, 64, 40, [0, 5, 37], False, 1, torch.int32),
    ("int4", F16, None, 2, 16, 6, 2, 64, 24, [0, 5, 37], True, 3, torch.int32),
    ("int4", F32, None, 2, 3, 3, 3, 6, 40, [0, 5, 37], False, 3, torch.int64),  # odd groups
    ("int4", F16, None, 4, 1, 4, 2, 10, 40, [0, 5, 39], True, 1, torch.int32),  # odd groups
    ("int4", F32, None, 3, 1, 6, 2, 48, 40, [0, 5, 37], False, 3, torch.int32),
    ("int4", BF16, None, 2, 16, 6, 2, 64, 40, [0, 5, 37], True, 3, torch.int32),
]


def _case_id(c) -> str:
    fmt, dt, cdt, g, s, hq, hkv, d, cap, _, wrap, cb, ld = c
    cache = f"-{str(cdt)[6:]}" if cdt is not None else f"-G{g}"
    return f"{fmt}-{str(dt)[6:]}{cache}-S{s}-Hq{hq}Hkv{hkv}-D{d}-L{cap}-wrap{int(wrap)}-cos{cb}"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_fused_kernel_matches_composition(triton_backend: Backend, case):
    from sentinel_kernels.kernels import kv_append as kkv

    fmt, dtype, cache_dtype, groups, s, hq, hkv, d, cap, lens, wrap, cos_b, lens_dtype = case
    skip_interpreted_bf16(triton_backend, dtype, cache_dtype or F32)
    dev = triton_backend.device
    p = _Problem(
        dev,
        b=3,
        hq=hq,
        hkv=hkv,
        s=s,
        d=d,
        cap=cap,
        groups=groups,
        fmt=fmt,
        dtype=dtype,
        cache_dtype=cache_dtype or dtype,
        lens=lens,
        lens_dtype=lens_dtype,
        cos_batch=cos_b,
        seed=s * 31 + d,
        wrap=wrap,
    )
    assert p.q.stride(1) == p.k.stride(1) == d  # [B, S, H, D] storage, transposed
    want_q, want_state = p.expected()
    q_out = torch.full(p.q.shape, float("nan"), dtype=dtype, device=dev)
    kkv.rope_kv_append_fwd(
        p.q,
        p.k,
        p.v,
        p.cos,
        p.sin,
        q_out,
        p.k_cache,
        p.v_cache,
        p.lens,
        kv_format=fmt,
        k_scales=p.k_scales,
        v_scales=p.v_scales,
        wrap=wrap,
    )
    p.check(q_out, want_q, want_state)


def test_fused_kernel_mixed_value_dtype_and_strided_q(triton_backend: Backend):
    """v of another dtype than q/k (kv_append takes any), q with a non-unit channel
    stride and cos/sin as strided views."""
    from sentinel_kernels.kernels import kv_append as kkv

    dev = triton_backend.device
    p = _Problem(
        dev,
        b=2,
        hq=4,
        hkv=2,
        s=2,
        d=32,
        cap=12,
        groups=2,
        fmt="int8",
        dtype=F16,
        cache_dtype=F16,
        lens=[3, 11],
        v_dtype=F32,
        cos_batch=2,
        seed=5,
        wrap=True,
    )
    p.q = randn((2, 4, 2, 64), F16, dev, seed=6)[..., ::2]
    p.cos = randn((2, 4, 40), F16, dev, seed=7)[:, ::2, 4:36]
    p.sin = randn((2, 4, 40), F16, dev, seed=8)[:, ::2, 4:36]
    want_q, want_state = p.expected()
    q_out = torch.full(p.q.shape, float("nan"), dtype=F16, device=dev)
    kkv.rope_kv_append_fwd(
        p.q,
        p.k,
        p.v,
        p.cos,
        p.sin,
        q_out,
        p.k_cache,
        p.v_cache,
        p.lens,
        kv_format="int8",
        k_scales=p.k_scales,
        v_scales=p.v_scales,
        wrap=True,
    )
    p.check(q_out, want_q, want_state)


# --------------------------------------------------------------------------------------
# The op, on every backend
# --------------------------------------------------------------------------------------


def _run_op(p: _Problem, cos=None, sin=None):
    return sk.ops.rope_kv_append(
        p.q,
        p.k,
        p.v,
        p.cos if cos is None else cos,
        p.sin if sin is None else sin,
        p.k_cache,
        p.v_cache,
        p.lens,
        p.fmt,
        p.k_scales,
        p.v_scales,
        p.wrap,
    )


OP_CASES = [  # (fmt, groups, S, wrap, lens dtype)
    ("dense", 1, 1, False, torch.int32),
    ("int8", 2, 3, True, torch.int64),
    ("int4", 2, 16, False, torch.int32),
    ("int4", 1, 17, True, torch.int32),  # longer than the fused kernel takes
]


@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "{}-G{}-S{}-wrap{}-{}".format(*c))
def test_op_matches_composition(backend: Backend, case):
    fmt, groups, s, wrap, lens_dtype = case
    dev = backend.device
    p = _Problem(
        dev,
        b=3,
        hq=6,
        hkv=2,
        s=s,
        d=64,
        cap=24,
        groups=groups,
        fmt=fmt,
        dtype=F32,
        cache_dtype=F32,
        lens=[0, 5, 20],
        lens_dtype=lens_dtype,
        seed=s,
        wrap=wrap,
    )
    want_q, want_state = p.expected()
    # The composition of the public ops on this backend, on copies of the state.
    st = [t.clone() if t is not None else None for t in p.state()]
    kc, vc, lens, ks, vs = st
    q_ops, k_rot = sk.ops.rotary_embedding(p.q, p.k, p.cos, p.sin)
    sk.ops.kv_append(k_rot, kc, lens, fmt, ks, wrap)
    sk.ops.kv_append(p.v, vc, lens, fmt, vs, wrap)
    lens.add_(s)
    q_out = _run_op(p)
    assert q_out.device == p.q.device
    p.check(q_out, want_q, want_state)
    assert_same_bits(q_out, q_ops, "q_out vs the ops' composition")
    for got, ops in zip(p.state(), st, strict=True):
        if got is not None:
            assert same_bits(got, ops), "the op differs from the composition of the ops"
    assert p.lens.dtype == lens_dtype


def test_op_layouts(backend: Backend):
    """cos/sin as [S, D] and batch-expanded, a k / v with non-unit channel stride, and a
    chunk appended after another (lens advanced by the first)."""
    dev = backend.device
    p = _Problem(
        dev,
        b=2,
        hq=4,
        hkv=2,
        s=2,
        d=16,
        cap=8,
        groups=1,
        fmt="int4",
        dtype=F16,
        cache_dtype=F16,
        lens=[1, 4],
        seed=9,
        wrap=False,
    )
    p.k = randn((2, 2, 2, 32), F16, dev, seed=10)[..., ::2]
    p.v = randn((2, 2, 2, 32), F16, dev, seed=11)[..., 1::2]
    cos2, sin2 = p.cos[0], p.sin[0]
    for cos, sin in ((cos2, sin2), (cos2.expand(2, 2, 16), sin2.expand(2, 2, 16))):
        p.cos, p.sin = cos, sin
        want_q, want_state = p.expected()
        p.check(_run_op(p), want_q, want_state)
    assert p.lens.tolist() == [5, 8]


def test_op_empty_chunk(backend: Backend):
    dev = backend.device
    p = _Problem(
        dev,
        b=2,
        hq=2,
        hkv=1,
        s=0,
        d=8,
        cap=4,
        groups=1,
        fmt="int8",
        dtype=F32,
        cache_dtype=F32,
        lens=[1, 2],
        seed=3,
        wrap=False,
    )
    q_out = _run_op(p)
    assert q_out.shape == (2, 2, 0, 8)
    assert all(same_bits(a, b) for a, b in zip(p.state(), p.poison, strict=True) if a is not None)


def test_fused_path_taken_up_to_16_tokens(triton_backend: Backend, monkeypatch):
    """On the Triton backend a chunk of <= 16 tokens is one launch of the fused kernel;
    a longer one runs the composition (and still matches)."""
    from sentinel_kernels.kernels import kv_append as kkv

    calls = []
    real = kkv.rope_kv_append_fwd
    monkeypatch.setattr(
        kkv, "rope_kv_append_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    assert ROPE_KV_APPEND_MAX_FUSED == 16
    for s, fused in ((16, 1), (17, 0)):
        calls.clear()
        p = _Problem(
            triton_backend.device,
            b=1,
            hq=2,
            hkv=1,
            s=s,
            d=8,
            cap=40,
            groups=1,
            fmt="int8",
            dtype=F32,
            cache_dtype=F32,
            lens=[3],
            seed=s,
            wrap=False,
        )
        want_q, want_state = p.expected()
        p.check(_run_op(p), want_q, want_state)
        assert len(calls) == fused, (s, calls)


def test_reference_is_the_composition():
    p = _Problem(
        "cpu",
        b=2,
        hq=4,
        hkv=2,
        s=3,
        d=16,
        cap=6,
        groups=2,
        fmt="int4",
        dtype=F16,
        cache_dtype=F16,
        lens=[0, 4],
        seed=12,
        wrap=True,
    )
    want_q, want_state = p.expected()
    q_out = ref_rope_kv_append(
        p.q,
        p.k,
        p.v,
        p.cos,
        p.sin,
        p.k_cache,
        p.v_cache,
        p.lens,
        "int4",
        p.k_scales,
        p.v_scales,
        True,
    )
    p.check(q_out, want_q, want_state)
    assert sk.reference.rope_kv_append is ref_rope_kv_append


# --------------------------------------------------------------------------------------
# Errors and the custom op
# --------------------------------------------------------------------------------------


def test_bad_inputs(backend: Backend):
    dev = backend.device
    q = torch.randn(2, 4, 3, 8, device=dev)
    k = torch.randn(2, 2, 3, 8, device=dev)
    v = torch.randn(2, 2, 3, 8, device=dev)
    cos, sin = torch.randn(1, 3, 8, device=dev), torch.randn(1, 3, 8, device=dev)
    kc = torch.zeros(2, 2, 6, 8, dtype=torch.int8, device=dev)
    vc = kc.clone()
    ks = torch.ones(2, 2, 6, 1, dtype=F16, device=dev)
    vs = ks.clone()
    lens = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    good = dict(
        q=q,
        k=k,
        v=v,
        cos=cos,
        sin=sin,
        k_cache=kc,
        v_cache=vc,
        lens=lens,
        kv_format="int8",
        k_scales=ks,
        v_scales=vs,
    )

    def call(**changes):
        kw = {**good, **changes}
        return sk.ops.rope_kv_append(**kw)

    call()
    assert lens.tolist() == [3, 4]
    cases = [
        ({"q": q[0]}, ValueError, "q must be 4-D"),
        ({"v": v[:, :1]}, ValueError, "v .* must have k's shape"),
        ({"k": k[:, :, :2], "v": v[:, :, :2]}, ValueError, "must match q"),
        ({"cos": cos[:, :2], "sin": sin[:, :2]}, ValueError, "cos/sin must be"),
        ({"k": k.half(), "v": v.half()}, TypeError, "one dtype"),
        ({"q": q.long()}, TypeError, "q has dtype int64"),
        ({"lens": lens.float()}, TypeError, "lens has dtype float32"),
        ({"lens": lens[:1]}, ValueError, r"lens must be \[batch\]"),
        ({"k_scales": None}, ValueError, "needs k_scales"),
        ({"kv_format": "dense", "v_scales": None, "k_scales": None}, TypeError, "k_cache has"),
        ({"k_cache": kc[:, :1], "k_scales": ks[:, :1]}, ValueError, "k_cache for kv_format"),
        ({"v_cache": vc.to(torch.uint8)}, TypeError, "v_cache has dtype uint8"),
        ({"v_scales": vs[..., :0]}, ValueError, "KV scale groups"),
        ({"kv_format": "int2"}, ValueError, "kv_format 'int2'"),
        ({"q": 1.0}, TypeError, "q must be a torch.Tensor"),
        (
            {"k_cache": torch.zeros(2, 2, 6, 16, dtype=torch.int8, device=dev)[..., ::2]},
            ValueError,
            "k_cache must have unit stride",
        ),
    ]
    odd = {
        "q": q[..., :7],
        "k": k[..., :7],
        "v": v[..., :7],
        "cos": cos[..., :7],
        "sin": sin[..., :7],
        "k_cache": kc[..., :7],
        "v_cache": vc[..., :7],
    }
    cases.append((odd, ValueError, "head_dim must be even"))
    dense_scales = {
        "kv_format": "dense",
        "k_cache": kc.float(),
        "v_cache": vc.float(),
        "k_scales": None,
    }
    cases.append((dense_scales, ValueError, "a dense cache takes no v_scales"))
    for changes, exc, match in cases:
        before = lens.clone()
        with pytest.raises(exc, match=match) as info:
            call(**changes)
        assert str(info.value).startswith("rope_kv_append: "), str(info.value)
        assert torch.equal(lens, before), "a rejected call advanced lens"


def test_opcheck():
    p = _Problem(
        "cpu",
        b=2,
        hq=4,
        hkv=2,
        s=3,
        d=16,
        cap=8,
        groups=2,
        fmt="int8",
        dtype=F32,
        cache_dtype=F32,
        lens=[1, 2],
        seed=13,
    )
    args = (
        p.q,
        p.k,
        p.v,
        p.cos,
        p.sin,
        p.k_cache,
        p.v_cache,
        p.lens,
        "int8",
        p.k_scales,
        p.v_scales,
        False,
    )
    for name in ("reference", "native"):
        if name == "native" and not _backend.native_available():
            continue
        with _backend.use_backend(name):
            torch.library.opcheck(torch.ops.sentinel.rope_kv_append.default, args)


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="inductor on CPU needs a C++ compiler",
)
def test_compile_fullgraph():
    """Under ``torch.compile(fullgraph=True)`` the fake traces, the op runs as one opaque
    call, and its in-place writes (caches, scales, lens) happen as in eager."""
    import torch._dynamo

    p = _Problem(
        "cpu",
        b=2,
        hq=4,
        hkv=2,
        s=1,
        d=16,
        cap=8,
        groups=1,
        fmt="int4",
        dtype=F32,
        cache_dtype=F32,
        lens=[1, 2],
        seed=14,
    )
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step(q, k, v, cos, sin, kc, vc, lens, ks, vs):
        out = sk.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, lens, "int4", ks, vs)
        return out * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    eager = [t.clone() for t in p.state()]
    ins = (p.q, p.k, p.v, p.cos, p.sin)
    want = step(*ins, eager[0], eager[1], eager[2], eager[3], eager[4])
    got = compiled(*ins, p.k_cache, p.v_cache, p.lens, p.k_scales, p.v_scales)
    assert_same_bits(got, want, "output")
    for got_t, want_t in zip(p.state(), eager, strict=True):
        assert same_bits(got_t, want_t)
    assert p.lens.tolist() == [2, 3]
    assert "sentinel.rope_kv_append.default" in seen, seen


# --------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_cuda_fused_matches_composition(fmt, dtype):
    """The op on CUDA (the fused kernel for S <= 16) against the reference composition."""
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        for s, wrap, cap in ((1, False, 20), (5, True, 20), (16, False, 20), (16, True, 8)):
            p = _Problem(
                "cuda",
                b=3,
                hq=9,
                hkv=3,
                s=s,
                d=64,
                cap=cap,
                groups=2,
                fmt=fmt,
                dtype=dtype,
                cache_dtype=dtype,
                lens=[0, 5, 17],
                seed=s,
                wrap=wrap,
            )
            want_q, want_state = p.expected()
            p.check(_run_op(p), want_q, want_state)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The fused op captures into a CUDA graph; each replay appends at the advanced lens."""
    with _backend.use_backend("triton"):
        p = _Problem(
            "cuda",
            b=2,
            hq=9,
            hkv=3,
            s=1,
            d=64,
            cap=16,
            groups=1,
            fmt="int8",
            dtype=BF16,
            cache_dtype=BF16,
            lens=[0, 3],
            seed=21,
            wrap=False,
        )
        ref_state = [_cpu(t) for t in p.state()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            want_q = _composition(
                *(t.cpu() for t in (p.q, p.k, p.v, p.cos, p.sin)),
                ref_state[0],
                ref_state[1],
                ref_state[2],
                "int8",
                ref_state[3],
                ref_state[4],
                False,
            )
            out = _run_op(p)  # warm-up (compiles); also the first step
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        assert_same_bits(out, want_q, "q_out (eager)")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _run_op(p)
        for step in range(3):
            for t in (p.q, p.k, p.v, p.cos, p.sin):
                t.copy_(torch.randn_like(t))
            want_q = _composition(
                *(t.cpu() for t in (p.q, p.k, p.v, p.cos, p.sin)),
                ref_state[0],
                ref_state[1],
                ref_state[2],
                "int8",
                ref_state[3],
                ref_state[4],
                False,
            )
            graph.replay()
            torch.cuda.synchronize()
            assert_same_bits(out, want_q, f"q_out (replay {step})")
            for name, got, want in zip(
                ("k", "v", "lens", "ks", "vs"), p.state(), ref_state, strict=True
            ):
                assert_same_bits(got, want, f"{name} (replay {step})")


@pytest.mark.gpu
def test_cuda_device_mismatch():
    p = _Problem(
        "cuda",
        b=1,
        hq=2,
        hkv=1,
        s=1,
        d=8,
        cap=4,
        groups=1,
        fmt="dense",
        dtype=F32,
        cache_dtype=F32,
        lens=[0],
    )
    p.lens = p.lens.cpu()
    with pytest.raises(ValueError, match="one device"):
        _run_op(p)

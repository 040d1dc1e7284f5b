"""Benchmarks of the fused ops (``rms_norm``, ``add_rms_norm``, ``rotary_embedding``,
``silu_mul``) against the eager PyTorch code transformers runs for them.

Every case is one pytest-benchmark group, e.g. ``rms_norm [1x4096] bfloat16 cuda``, holding:

* ``sentinel-triton`` / ``sentinel-native``: the op under the ``auto`` backend
  (``extra_info["backend"]`` records what ran);
* ``eager-torch``: transformers' eager formula (``LlamaRMSNorm.forward``, the residual add
  then the norm, ``apply_rotary_pos_emb``, ``F.silu(gate) * up``), the baseline;
* ``device-copy``: ``dst.copy_(src)`` of the op's main input, the bandwidth reference;
* on GPU, the same three replayed from CUDA graphs (``-graph``): kernel time without host
  overhead, which is what the CUDA-graph decode loop pays. At decode sizes the eager
  entries are launch-bound (RMSNorm ~7 kernels, rotary ~10, silu * up 2) and the fused
  ones are one kernel each: the graph groups show that difference.

Bytes per call (``extra_info["bytes"]``) are the op's compulsory traffic (inputs read once,
outputs written once), used for every entry of the group, and ``2 * input bytes`` for the
copy. Inputs are ``torch.randn`` rotated over sets larger than the last-level cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from benchlib import impl_params, impl_runner, run_device_copy

EPS = 1e-6


# --------------------------------------------------------------------------- eager baselines


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (transformers), verbatim."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return weight * h.to(input_dtype)


def eager_add_rms_norm(x, residual, weight):
    """The decoder layer's ``hidden = residual + hidden`` followed by the next norm."""
    h = residual + x
    return eager_rms_norm(h, weight), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def eager_rotary(q, k, cos, sin):
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (transformers), verbatim."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def eager_silu_mul(gate, up):
    """``act_fn(gate_proj(x)) * up_proj(x)`` of ``LlamaMLP`` without the projections."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One group: op, device, sizes (meaning depends on op), dtype."""

    op: str
    device: str
    dims: tuple[int, ...]
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return "x".join(map(str, self.dims))


def _cases() -> list[Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    gpu = [
        # rows x hidden: decode (1 token; SmolLM2 576, Llama-8B 4096) and a prefill chunk
        *(Case("rms_norm", "cuda", d, bf16) for d in [(1, 576), (1, 4096), (4096, 4096)]),
        *(Case("add_rms_norm", "cuda", d, bf16) for d in [(1, 4096), (4096, 4096)]),
        # B, Hq, Hkv, S, D: SmolLM2 and Llama-8B decode, Llama-8B 4096-token prefill
        *(
            Case("rotary_embedding", "cuda", d, bf16)
            for d in [(1, 9, 3, 1, 64), (1, 32, 8, 1, 128), (1, 32, 8, 4096, 128)]
        ),
        # rows x intermediate: SmolLM2 and Llama-8B decode, a prefill chunk
        *(Case("silu_mul", "cuda", d, bf16) for d in [(1, 1536), (1, 14336), (4096, 14336)]),
        Case("rms_norm", "cuda", (4096, 4096), f32),
    ]
    cpu = [
        Case("rms_norm", "cpu", (1, 576), f32),
        Case("rms_norm", "cpu", (512, 576), f32),
        Case("add_rms_norm", "cpu", (512, 576), f32),
        Case("rotary_embedding", "cpu", (1, 9, 3, 1, 64), f32),
        Case("rotary_embedding", "cpu", (1, 9, 3, 512, 64), f32),
        Case("silu_mul", "cpu", (512, 1536), f32),
    ]
    return gpu + cpu


def _case_params():
    params = []
    for case in _cases():
        dname = str(case.dtype).removeprefix("torch.")
        ident = f"{case.op}-{case.device}-{case.label}-{dname}"
        params += impl_params(case.device, (case,), ident)
    return params


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen)


def _make_set(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One input set of ``case``, laid out as the model produces it."""
    dev, dt = case.device, case.dtype
    if case.op == "rms_norm":
        rows, n = case.dims
        return _randn((rows, n), dt, dev, gen), 1 + 0.1 * _randn((n,), dt, dev, gen)
    if case.op == "add_rms_norm":
        rows, n = case.dims
        return (
            _randn((rows, n), dt, dev, gen),
            _randn((rows, n), dt, dev, gen),
            1 + 0.1 * _randn((n,), dt, dev, gen),
        )
    if case.op == "rotary_embedding":
        b, hq, hkv, s, d = case.dims
        # q/k as attention gets them: proj(x).view(B, S, H, D).transpose(1, 2)
        q = _randn((b, s, hq * d), dt, dev, gen).view(b, s, hq, d).transpose(1, 2)
        k = _randn((b, s, hkv * d), dt, dev, gen).view(b, s, hkv, d).transpose(1, 2)
        ang = _randn((b, s, d), torch.float32, dev, gen)
        return q, k, ang.cos().to(dt), ang.sin().to(dt)
    rows, n = case.dims
    return _randn((rows, n), dt, dev, gen), _randn((rows, n), dt, dev, gen)


def _nbytes(case: Case, args: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(compulsory bytes of one call, bytes of the main input)."""

    def nb(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    if case.op == "rms_norm":
        x, w = args
        return 2 * nb(x) + nb(w), nb(x)  # x in, y out (same dtype here), weight
    if case.op == "add_rms_norm":
        x, r, w = args
        return 4 * nb(x) + nb(w), nb(x)  # x, residual in; y, new residual out
    if case.op == "rotary_embedding":
        q, k, c, s = args
        return 2 * (nb(q) + nb(k)) + nb(c) + nb(s), nb(q) + nb(k)
    g, u = args
    return 3 * nb(g), nb(g)


@functools.lru_cache(maxsize=1)
def _inputs(case: Case, n: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """``n`` input sets for one case, shared by its entries (one case cached at a time)."""
    gen = torch.Generator(device=torch.device(case.device)).manual_seed(0)
    return tuple(_make_set(case, gen) for _ in range(n))


EAGER: dict[str, Callable] = {
    "rms_norm": eager_rms_norm,
    "add_rms_norm": eager_add_rms_norm,
    "rotary_embedding": eager_rotary,
    "silu_mul": eager_silu_mul,
}


def _sentinel_fn(ops, op: str) -> Callable:
    if op == "rms_norm":
        return functools.partial(ops.rms_norm, eps=EPS)
    if op == "add_rms_norm":
        return functools.partial(ops.add_rms_norm, eps=EPS)
    return getattr(ops, op)


def _sanity(case: Case, ours, eager) -> None:
    """Before timing: the op agrees with the eager formula (to its documented tolerance)."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    eager = eager if isinstance(eager, tuple) else (eager,)
    for a, b in zip(ours, eager, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if case.op == "rotary_embedding":
            assert torch.equal(a, b), "rotary_embedding is not bit-exact with transformers"
        else:
            # rms_norm: the mean's last bits may differ (1 ulp flips of the dtype);
            # silu_mul: exp differs by an ulp in fp32 (see tests/ops/test_fused.py).
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-6, atol=1e-6)


@pytest.mark.parametrize(("case", "impl"), _case_params())
def test_fused(benchmark, measure, sentinel_ops, case: Case, impl: str):
    """One entry of the group ``<op> [dims] dtype device``."""
    dev = torch.device(case.device)
    probe = _make_set(case, torch.Generator(device=dev).manual_seed(1))
    nbytes, in_bytes = _nbytes(case, probe)
    del probe
    sets = _inputs(case, measure.rotation_count(dev, nbytes))
    dname = str(case.dtype).removeprefix("torch.")
    group = f"{case.op} [{case.label}] {dname} {case.device}"
    impl_base, run = impl_runner(
        measure, benchmark, impl, group=group, device=dev, shape=case.dims, dtype=case.dtype
    )
    eager = EAGER[case.op]
    if impl_base == "eager-torch":
        run(eager, sets, role="baseline", backend="eager", nbytes=nbytes)
    elif impl_base == "device-copy":
        run_device_copy(
            run, [s[0] if case.op != "rotary_embedding" else s[0].contiguous() for s in sets]
        )
    else:
        ops, resolve, use_backend = sentinel_ops()
        with use_backend("auto"):
            backend = resolve(dev)
            fn = _sentinel_fn(ops, case.op)
            _sanity(case, fn(*sets[0]), eager(*sets[0]))
            run(
                fn,
                sets,
                role="candidate",
                backend=backend,
                nbytes=nbytes,
                extra={"input_bytes": in_bytes},
            )

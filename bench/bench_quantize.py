"""Benchmarks of ``sentinel_kernels.ops.quantize_int8`` against eager PyTorch and a copy.

Every case is one pytest-benchmark group, e.g. ``quantize_int8 [8192x8192] bfloat16 cuda``,
holding three entries:

* ``sentinel-triton`` / ``sentinel-native``: the op under the ``auto`` backend (Triton on
  CUDA tensors, the C++ extension on CPU tensors; ``extra_info["backend"]`` records what
  actually ran, e.g. ``reference`` when ``_C`` is not built);
* ``eager-torch``: the obvious eager PyTorch code (:func:`eager_quantize_int8`), the
  speedup baseline of the group;
* ``device-copy``: ``dst.copy_(src)`` of the quantize input, the bandwidth ceiling.

Bytes moved per call (``extra_info["bytes"]``) are the op's compulsory traffic: read ``x``,
write the int8 ``q`` and the float32 scales. The same number is used for the eager baseline
(its real traffic is several times larger: that is why it is slow), and ``2 * x.nbytes``
for the copy. Inputs are ``torch.randn`` (never zeros), rotated over several tensors whose
total exceeds the last-level cache (see ``bench/conftest.py``).

Targets (the issue's proof): on GPU, [8192, 8192] bf16 reaches >= 80% of copy bandwidth and
>= 3x eager; on CPU, C++ [4096, 4096] fp32 with 2 threads is >= 2x eager.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from benchlib import impl_params, impl_runner, run_device_copy

# (device, shape, dtype)
CPU_CASES = [
    ("cpu", (4096, 4096), torch.float32),
    ("cpu", (4096, 4096), torch.bfloat16),
]
GPU_CASES = [
    ("cuda", (8192, 8192), torch.bfloat16),
    ("cuda", (8192, 8192), torch.float16),
    ("cuda", (8192, 8192), torch.float32),
    ("cuda", (32, 4096), torch.bfloat16),  # per-token activations: launch-bound
]


def eager_quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch symmetric per-row absmax int8 quantization (the baseline).

    It does not special-case all-zero rows (their scale is 0, so ``x / s`` is NaN and the
    int8 cast undefined); the op does (scale 0, q 0). Benchmark inputs are ``randn`` and have
    no zero rows, so both compute the same thing here; handling zero rows in eager would add
    a ``torch.where`` pass and only make the baseline slower.
    """
    s = x.abs().amax(-1, keepdim=True).float() / 127
    q = torch.round(x.float() / s).clamp(-127, 127).to(torch.int8)
    return q, s.squeeze(-1)


def _case_params():
    params = []
    for device, shape, dtype in CPU_CASES + GPU_CASES:
        dims = "x".join(map(str, shape))
        dname = str(dtype).removeprefix("torch.")
        params += impl_params(device, (device, shape, dtype), f"{device}-{dims}-{dname}")
    return params


@functools.lru_cache(maxsize=1)
def _inputs(
    device: str, shape: tuple[int, ...], dtype: torch.dtype, n: int
) -> tuple[torch.Tensor, ...]:
    """``n`` random inputs for one case, shared by its three entries (one case cached)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    return tuple(torch.randn(shape, dtype=dtype, device=dev, generator=gen) for _ in range(n))


@pytest.mark.parametrize(("device", "shape", "dtype", "impl"), _case_params())
def test_quantize_int8(benchmark, measure, sentinel_ops, device, shape, dtype, impl):
    """One entry of the group ``quantize_int8 [shape] dtype device``."""
    dev = torch.device(device)
    numel = math.prod(shape)
    rows = numel // shape[-1]
    in_bytes = numel * torch.empty((), dtype=dtype).element_size()
    xs = _inputs(device, tuple(shape), dtype, measure.rotation_count(dev, 2 * in_bytes))
    quant_bytes = in_bytes + numel + rows * 4  # read x, write int8 q and fp32 scales
    group = f"quantize_int8 [{'x'.join(map(str, shape))}] {str(dtype).removeprefix('torch.')} "
    group += device
    impl_base, run = impl_runner(
        measure, benchmark, impl, group=group, device=dev, shape=shape, dtype=dtype
    )
    if impl_base == "eager-torch":
        run(
            eager_quantize_int8,
            [(x,) for x in xs],
            role="baseline",
            backend="eager",
            nbytes=quant_bytes,
        )
    elif impl_base == "device-copy":
        run_device_copy(run, xs)
    else:
        ops, resolve, use_backend = sentinel_ops()
        with use_backend("auto"):
            backend = resolve(dev)
            # Sanity before timing: the op agrees with the eager baseline (q within one
            # rounding step: the op multiplies by 127/absmax, eager divides by absmax/127).
            q, s = ops.quantize_int8(xs[0], dim=-1)
            q_ref, s_ref = eager_quantize_int8(xs[0])
            assert q.dtype == torch.int8 and q.shape == xs[0].shape
            torch.testing.assert_close(s.float(), s_ref, rtol=1e-6, atol=0)
            assert (q.int() - q_ref.int()).abs().max().item() <= 1
            del q, s, q_ref, s_ref
            run(
                functools.partial(ops.quantize_int8, dim=-1),
                [(x,) for x in xs],
                role="candidate",
                backend=backend,
                nbytes=quant_bytes,
            )

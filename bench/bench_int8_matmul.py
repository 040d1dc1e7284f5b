"""Benchmarks of ``int8_linear`` (W8A16) and ``int8_linear_a8`` (W8A8) on the GPU.

Groups (bf16 activations, CUDA):

* ``int8_linear M=1 N=... K=...``: decode GEMV. Entries: ``torch-bf16-linear`` (the
  baseline, ``F.linear`` on bf16 weights = cuBLAS), ``sentinel-w8a16``,
  ``eager-dequant-matmul`` (dequantize the int8 weight to bf16, then ``F.linear``).
  Replayed from CUDA graphs (as the decode loop runs them): at a few microseconds per
  kernel, an eager Python call's host overhead would be timed instead of the kernel.
* ``int8_linear M=4096 N=4096 K=4096``: prefill GEMM, replayed from CUDA graphs too
  (W8A8 is two launches, quantize pre-pass and GEMM, whose Python launch overhead on a
  slow host exceeds the ~150 us of GPU work). Entries:
  ``torch-bf16-linear`` (baseline), ``sentinel-w8a16`` (the op as dispatched: from
  ``DEQUANT_GEMM_MIN_M`` rows on, chunked dequantization then cuBLAS),
  ``sentinel-w8a16-fused`` (the fused Triton GEMM forced), ``sentinel-w8a8`` (activation
  quantization included), ``torch-int-mm`` (``torch._int_mm`` on pre-quantized int8 inputs,
  quantization not included). M = 1024 runs the W8A16 entries only: it shows where the
  dispatch threshold sits.

* ``int8_linear M=16..256 N=... K=...`` (``test_int8_linear_batched``, issue 19 item 2):
  the projections of SmolLM2's and Llama-3.2-1B's shapes at batched-decode row counts,
  ``torch-bf16-linear`` (baseline), ``sentinel-w8a16`` (as dispatched),
  ``eager-dequant-matmul``. Target there: what makes level 2 >= 1.1x level 1 tokens/s at
  batch 16, 64 and 128 (``bench_generate.py``'s batched groups).

``extra_info["flops"] = 2*M*N*K``; ``bytes`` = int8 weight + activations + output.
Targets (the INT8 issue): M=1 >= 1.7x bf16 and >= 6x eager dequant; M=4096 W8A16 >= 0.85x
bf16, W8A8 >= 1.4x bf16 and >= 5x ``_int_mm``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

DECODE_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
DECODE_IMPLS = ("torch-bf16-linear", "sentinel-w8a16", "eager-dequant-matmul")
PREFILL_IMPLS = (
    "torch-bf16-linear",
    "sentinel-w8a16",
    "sentinel-w8a16-fused",
    "sentinel-w8a8",
    "torch-int-mm",
)


def _weights(n: int, k: int, sets: int):
    import sentinel_kernels as sk

    out = []
    for i in range(sets):
        g = torch.Generator(device="cuda").manual_seed(i)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        q, s = sk.ops.quantize_int8(w)
        out.append((w.to(torch.bfloat16), q, s))
    return out


def _eager_dequant(x, q, s):
    return F.linear(x, q.to(torch.bfloat16) * s[:, None].to(torch.bfloat16))


def _measure_linear(benchmark, measure, fn, args, impl, role, dev, m: int, n: int, k: int):
    """Time ``fn`` on ``args`` as an ``[m, k] x [k, n]`` int8 linear (bf16 activations,
    int8 weights) replayed from CUDA graphs."""
    measure(
        benchmark,
        fn,
        args,
        group=f"int8_linear M={m} N={n} K={k} bfloat16 cuda graph",
        impl=impl,
        role=role,
        backend="triton" if impl.startswith("sentinel") else "torch",
        device=dev,
        nbytes=n * k + 2 * m * k + 2 * m * n,
        shape=(m, n, k),
        dtype=torch.bfloat16,
        flops=2.0 * m * n * k,
        cuda_graph=True,
    )


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("n,k", DECODE_SHAPES, ids=[f"N{n}-K{k}" for n, k in DECODE_SHAPES])
def test_int8_linear_decode(benchmark, measure, n, k, impl):
    import sentinel_kernels as sk

    dev = torch.device("cuda")
    # bf16 weight sets rotated so that their total exceeds L2
    sets = measure.rotation_count(dev, n * k * 2)
    ws = _weights(n, k, sets)
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
    if impl == "torch-bf16-linear":
        fn, args, role = F.linear, [(x, w) for x, (w, _, _) in zip(xs, ws, strict=True)], "baseline"
    elif impl == "sentinel-w8a16":
        fn, role = sk.ops.int8_linear, "candidate"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    else:
        fn, role = _eager_dequant, "other"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    _measure_linear(benchmark, measure, fn, args, impl, role, dev, 1, n, k)


@pytest.mark.parametrize("impl", PREFILL_IMPLS)
@pytest.mark.parametrize("m", [1024, 4096], ids=lambda m: f"M{m}")
def test_int8_linear_prefill(benchmark, measure, m, impl):
    import sentinel_kernels as sk
    from sentinel_kernels.kernels import int8_matmul as kim
    from sentinel_kernels.reference import int8_matmul as ref

    if m != 4096 and impl in ("sentinel-w8a8", "torch-int-mm"):
        pytest.skip("the M=1024 group compares the W8A16 paths only")
    n = k = 4096
    dev = torch.device("cuda")
    ws = _weights(n, k, 2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
    if impl == "torch-bf16-linear":
        fn, args, role = F.linear, [(x, w) for x, (w, _, _) in zip(xs, ws, strict=True)], "baseline"
    elif impl == "sentinel-w8a16":
        fn, role = sk.ops.int8_linear, "candidate"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    elif impl == "sentinel-w8a16-fused":
        # The fused Triton GEMM at every M (the op takes dequantize-then-cuBLAS from
        # DEQUANT_GEMM_MIN_M rows on): the kernel launcher with that choice turned off.
        def fn(x, q, s):
            out = torch.empty(x.shape[0], q.shape[0], device=x.device, dtype=x.dtype)
            kim.w8a16(x, q, s, None, out, dequant_gemm=False)
            return out

        role = "other"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    elif impl == "sentinel-w8a8":
        fn, role = sk.ops.int8_linear_a8, "candidate"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    else:
        qa = [ref.quantize_activations(x, None)[0] for x in xs]
        fn, role = torch._int_mm, "other"
        args = [(a, q.t()) for a, (_, q, _) in zip(qa, ws, strict=True)]
    _measure_linear(benchmark, measure, fn, args, impl, role, dev, m, n, k)


#: Issue 19, item 2: the projections of the two benchmark models, (N, K) per linear:
#: SmolLM2-135M's shape (q/k/v concatenated 960x576, o 576x576, gate/up concatenated
#: 3072x576, down 576x1536) and Llama-3.2-1B's (qkv 3072x2048, o 2048x2048, gate/up
#: 16384x2048, down 2048x8192), at the row counts of batched decode, speculative
#: verification and chunked prefill.
BATCHED_SHAPES = [
    ("smollm2-qkv", 960, 576),
    ("smollm2-o", 576, 576),
    ("smollm2-gate_up", 3072, 576),
    ("smollm2-down", 576, 1536),
    ("1b-qkv", 3072, 2048),
    ("1b-o", 2048, 2048),
    ("1b-gate_up", 16384, 2048),
    ("1b-down", 2048, 8192),
]
BATCHED_M = (16, 32, 64, 128, 256, 512)
BATCHED_IMPLS = (
    "torch-bf16-linear",
    "sentinel-w8a16",
    "sentinel-w8a16-dequant-cublas",
    "eager-dequant-matmul",
)


@pytest.mark.parametrize("impl", BATCHED_IMPLS)
@pytest.mark.parametrize("m", BATCHED_M, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("name,n,k", BATCHED_SHAPES, ids=[s[0] for s in BATCHED_SHAPES])
def test_int8_linear_batched(benchmark, measure, name, n, k, m, impl):
    """W8A16 at 16-256 rows against cuBLAS bf16 (issue 19, item 2: where the INT8 linears
    lose at batch 16-128): the op as dispatched (``M <= DECODE_MAX_M`` the swap-AB MMA,
    above it the Triton GEMM, from ``DEQUANT_GEMM_MIN_M`` dequantize-then-cuBLAS), in
    CUDA graphs, weights rotated beyond L2."""
    import sentinel_kernels as sk

    dev = torch.device("cuda")
    sets = measure.rotation_count(dev, n * k * 2)
    ws = _weights(n, k, sets)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
    if impl == "torch-bf16-linear":
        fn, args, role = F.linear, [(x, w) for x, (w, _, _) in zip(xs, ws, strict=True)], "baseline"
    elif impl == "sentinel-w8a16":
        fn, role = sk.ops.int8_linear, "candidate"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    elif impl == "sentinel-w8a16-dequant-cublas":
        # The large-M path (dequantize into a workspace, then cuBLAS) forced at every M:
        # where it beats the Triton GEMM says where DEQUANT_GEMM_MIN_M belongs.
        from sentinel_kernels.kernels import int8_matmul as kim

        def fn(x, q, s):
            out = torch.empty(x.shape[0], q.shape[0], device=x.device, dtype=x.dtype)
            kim._w8a16_dequant_gemm(x, q, s, None, out, 0, kim.DEQUANT_WORKSPACE_BYTES)
            return out

        role = "other"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    else:
        fn, role = _eager_dequant, "other"
        args = [(x, q, s) for x, (_, q, s) in zip(xs, ws, strict=True)]
    _measure_linear(benchmark, measure, fn, args, impl, role, dev, m, n, k)
    benchmark.extra_info["linear"] = name

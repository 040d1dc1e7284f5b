"""Benchmarks of the compressed KV cache on the GPU: decode attention over INT8/INT4 K/V
and the quantize-on-append kernel.

Groups (bf16 queries and inputs, CUDA graphs replayed, inputs rotated beyond L2):

* ``decode_attention kv GQA 32/8 B8 L8192 D128``: one query token per row over a full
  cache. ``sdpa`` (the baseline: ``F.scaled_dot_product_attention(..., enable_gqa=True)``
  over bf16 K/V), ``sentinel-dense`` (our kernel, bf16 K/V), ``sentinel-int8`` (1 scale
  per head vector), ``sentinel-int4-g1`` / ``sentinel-int4-g2`` (1 or 2 scale groups per
  head vector), ``sentinel-int8-recent64`` (a 64-token full-precision ring on top),
  ``sentinel-int4-kivi-v1`` / ``sentinel-int4-kivi-v4`` (KIVI: keys per channel per
  64-token block, values per token in 1 or 4 groups, the 128-slot ring of the cache; the
  rows end 32 tokens into an open block, so the ring part is read too).
  ``bytes`` = what each reads (codes + scales + ring, or bf16 K/V).
* ``decode_attention kv long GQA <Hq>/<Hkv> B<b> L<n> D<d>`` (issue 19, item 4): the same
  decode attention at long contexts, ``n`` in 8192, 32768, 131072 keys, batch 1 and 8,
  heads 32/8 with D=128 (Llama-3-8B's GQA) and 9/3 with D=64 (SmolLM2-135M's). Entries
  ``sdpa`` (baseline), ``sentinel-dense``, ``sentinel-int8`` (the INT8 cache's default:
  1 scale per head vector, no ring) and ``sentinel-int4-kivi`` (the INT4 cache's default
  layout: KIVI keys per channel over 64-token blocks, values per token with the default
  value groups, one fp16 (scale, min) per 32 channels, so 4 groups at D=128 and 2 at
  D=64 (``extra_info.v_groups``), the 128-slot ring, rows 32 tokens into an open block).
  Inputs rotated as above: at least 3 sets, so up to 3 x 4.3 GB of bf16 K/V (B8 L131072
  32/8); a compressed set's bf16 K/V are freed once it is built, and every entry's sets
  are freed when it ends. ``extra_info``: ``kv_bytes`` and ``dense_kv_bytes``.
* ``kv_append B8 H8 S2048 D128``: a prefill chunk written into an L=8192 cache.
  ``device-copy`` (role copy, the bandwidth reference: ``dst.copy_(x)`` into a contiguous
  bf16 buffer of x's shape), ``torch-copy`` (``cache[..., :S, :].copy_(x)``, the slice copy
  a user would write: a strided destination), ``eager-quantize`` (baseline: the reference
  quantizer in eager PyTorch plus the slice copies), ``sentinel-dense`` /
  ``sentinel-int8`` / ``sentinel-int4`` (one fused kernel each). ``bytes`` = bf16 read
  + what is written.

* ``rope decode step <shape> <format> L<n>`` (issue 19, item 3): one batch-1 decode step's
  RoPE, K/V append and attention over a cache holding ``n`` positions, at SmolLM2's GQA
  (9/3, D=64) and the 1B shape's (32/8, D=64), dense and INT8. ``two-ops`` (baseline:
  ``ops.rope_kv_append`` then ``ops.decode_attention``, the route with
  ``SENTINEL_ROPE_ATTENTION=0``) and ``fused`` (``ops.rope_decode_attention``, one
  launch). Each call first resets the lengths (one small copy, in both entries), so
  every replay appends at the same position. Graphs of one step: the launch gap the
  fusion removes counts as it does inside a decode graph.

Targets (the KV-cache issue): INT8 decode >= 1.7x sdpa, INT4 >= 2.8x sdpa; append >= 80%
of copy bandwidth. Issue 19, item 4 (the long group, at 32k keys): ``sentinel-int8`` >=
1.6x ``sdpa`` (speedup = sdpa's median / its median), ``sentinel-int4-kivi`` >= 2.2x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

DECODE_IMPLS = (
    "sdpa",
    "sentinel-dense",
    "sentinel-int8",
    "sentinel-int4-g1",
    "sentinel-int4-g2",
    "sentinel-int4-g4",
    "sentinel-int8-g4",
    "sentinel-int8-recent64",
    "sentinel-int4-g4-recent32",
    "sentinel-int4-kivi-v1",
    "sentinel-int4-kivi-v4",
)
KIVI_BLOCK = 64
#: The long-context group (issue 19, item 4): key lengths, batches, (query heads, KV heads,
#: head dim) of a Llama-3-8B-like GQA and of SmolLM2-135M, and the entries (the KIVI one
#: with the cache's default value groups, see ``_kivi_value_groups``).
LONG_LENGTHS = (8192, 32768, 131072)
LONG_BATCHES = (1, 8)
LONG_HEADS = ((32, 8, 128), (9, 3, 64))
LONG_IMPLS = ("sdpa", "sentinel-dense", "sentinel-int8", "sentinel-int4-kivi")
APPEND_IMPLS = (
    "device-copy",
    "torch-copy",
    "eager-quantize",
    "sentinel-dense",
    "sentinel-int8",
    "sentinel-int4",
)


def _compress(x: torch.Tensor, fmt: str, groups: int):
    """Codes and scales of ``x`` through the op (the layout the decode kernel reads)."""
    import sentinel_kernels as sk
    from sentinel_kernels.reference import kv_formats

    b, h, n, d = x.shape
    codes = torch.empty(
        (b, h, n, kv_formats.kv_code_width(d, fmt)),
        dtype=torch.int8 if fmt == "int8" else torch.uint8,
        device=x.device,
    )
    scales = torch.empty(
        kv_formats.kv_scale_shape((b, h, n), groups, fmt), dtype=torch.float16, device=x.device
    )
    sk.ops.kv_append(x, codes, torch.zeros(b, dtype=torch.int32, device=x.device), fmt, scales)
    return codes, scales


def _kivi_set(q, k, v, v_groups: int, lens):
    """A KIVI cache of ``k``/``v`` through the ops (as the cache object fills it), the rows
    ``KIVI_BLOCK // 2`` tokens into an open block (read from the 64-slot rings)."""
    import sentinel_kernels as sk
    from sentinel_kernels.reference import kv_formats

    b, h, n, d = k.shape
    t = KIVI_BLOCK
    dev = k.device
    start = torch.zeros(b, dtype=torch.int32, device=dev)
    kc = torch.empty((b, h, n, kv_formats.kv_code_width(d, "int4")), dtype=torch.uint8, device=dev)
    ks = torch.empty((b, h, n // t, d, 2), dtype=torch.float16, device=dev)
    kr = torch.empty((b, h, 2 * t, d), dtype=k.dtype, device=dev)
    vr = torch.empty_like(kr)
    keep = n - t // 2
    sk.ops.kv_append_key_blocks(k[:, :, :keep], kc, ks, kr, start, t)
    vc, vs = _compress(v, "int4", v_groups)
    sk.ops.kv_append(v[:, :, :keep], vr, start, "dense", None, True)
    return (q, kc, vc, ks, vs, kr, vr)


def _kivi_value_groups(impl: str, d: int) -> int:
    """Value scale groups of a KIVI entry: ``-v<N>`` in its name, else the cache's default
    for INT4 (``resolve_groups``: one group per ``DEFAULT_GROUP_SIZE["int4"]`` = 32
    channels, so 4 at D=128 and 2 at D=64)."""
    from sentinel_kernels.cache.spec import parse_spec, resolve_groups

    tail = impl.rsplit("-", 1)[1]
    if tail.startswith("v") and tail[1:].isdigit():
        return int(tail[1:])
    return resolve_groups(parse_spec("int4"), d, None)


def _decode_sets(
    impl: str, dims: tuple[int, int, int, int, int], n_sets: int, device: str = "cuda"
) -> tuple[list[tuple], int]:
    """``n_sets`` random input sets of decode-attention entry ``impl`` (bf16 q, K/V, then
    compressed as the entry reads them; the bf16 K/V of a compressed set are freed as soon
    as it is built) and the bytes one call reads."""
    b, hq, hkv, length, d = dims
    dev, dt = torch.device(device), torch.bfloat16
    lens = torch.full((b,), length, dtype=torch.int32, device=dev)
    sets: list[tuple] = []
    nbytes = 2 * b * hkv * length * d * 2
    for i in range(n_sets):
        g = torch.Generator(device=dev).manual_seed(i)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(b, hkv, length, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, hkv, length, d, device=dev, dtype=dt, generator=g)
        if impl in ("sdpa", "sentinel-dense"):
            sets.append((q, k, v))
            continue
        if "kivi" in impl:
            sets.append(_kivi_set(q, k, v, _kivi_value_groups(impl, d), lens))
            del k, v
            nbytes = sum(t.numel() * t.element_size() for t in sets[-1][1:])
            continue
        fmt = "int8" if "int8" in impl else "int4"
        groups = 4 if "-g4" in impl else 2 if "-g2" in impl else 1
        kc, ks = _compress(k, fmt, groups)
        vc, vs = _compress(v, fmt, groups)
        extra: tuple = ()
        if "recent" in impl:
            w = int(impl.rsplit("recent", 1)[1])
            extra = (k[:, :, -w:].contiguous(), v[:, :, -w:].contiguous())
        del k, v
        sets.append((q, kc, vc, ks, vs, *extra))
        nbytes = sum(t.numel() * t.element_size() for t in (kc, vc, ks, vs, *extra))
    return sets, nbytes


def _decode_fn(impl: str, lens: torch.Tensor):
    """The timed function of decode-attention entry ``impl`` over rows of ``lens`` keys,
    its role and backend."""
    import sentinel_kernels as sk

    if impl == "sdpa":

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return fn, "baseline", "torch"
    if impl == "sentinel-dense":

        def fn(q, k, v):
            return sk.ops.decode_attention(q, k, v, lens)

        return fn, "candidate", "triton"
    if "kivi" in impl:
        kivi_lens = lens - (KIVI_BLOCK // 2)

        def fn(q, kc, vc, ks, vs, kr, vr):
            return sk.ops.decode_attention(
                q,
                kc,
                vc,
                kivi_lens,
                kv_format="int4",
                k_scale=ks,
                v_scale=vs,
                k_recent=kr,
                v_recent=vr,
                key_block=KIVI_BLOCK,
            )

        return fn, "candidate", "triton"
    fmt = "int8" if "int8" in impl else "int4"

    def fn(q, kc, vc, ks, vs, kr=None, vr=None, fmt=fmt):
        return sk.ops.decode_attention(
            q, kc, vc, lens, kv_format=fmt, k_scale=ks, v_scale=vs, k_recent=kr, v_recent=vr
        )

    return fn, "candidate", "triton"


@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_decode_over_compressed_kv(benchmark, measure, impl):
    b, hq, hkv, length, d = 8, 32, 8, 8192, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    dense_bytes = 2 * b * hkv * length * d * 2
    n_sets = measure.rotation_count(dev, dense_bytes)
    lens = torch.full((b,), length, dtype=torch.int32, device=dev)
    sets, nbytes = _decode_sets(impl, (b, hq, hkv, length, d), n_sets)
    fn, role, backend = _decode_fn(impl, lens)
    measure.decode_attention(
        benchmark,
        fn,
        sets,
        label="decode_attention kv",
        dims=(b, hq, hkv, length, d),
        impl=impl,
        role=role,
        backend=backend,
        device=dev,
        nbytes=nbytes,
        dtype=dt,
        extra={"kv_bytes": nbytes},
    )


@pytest.mark.parametrize("impl", LONG_IMPLS)
@pytest.mark.parametrize("heads", LONG_HEADS, ids=lambda h: f"gqa{h[0]}-{h[1]}-d{h[2]}")
@pytest.mark.parametrize("batch", LONG_BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("length", LONG_LENGTHS, ids=lambda n: f"L{n}")
def test_decode_long_context(benchmark, measure, length, batch, heads, impl):
    hq, hkv, d = heads
    dims = (batch, hq, hkv, length, d)
    dev, dt = torch.device("cuda"), torch.bfloat16
    dense_bytes = 2 * batch * hkv * length * d * 2
    # at least 3 sets (the rotation's minimum): up to 3 x 4.3 GB of bf16 K/V at B8 L131072
    n_sets = measure.rotation_count(dev, dense_bytes)
    lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
    sets, nbytes = _decode_sets(impl, dims, n_sets)
    fn, role, backend = _decode_fn(impl, lens)
    extra = {"kv_bytes": nbytes, "dense_kv_bytes": dense_bytes}
    if "kivi" in impl:
        extra.update(v_groups=_kivi_value_groups(impl, d), key_block=KIVI_BLOCK)
    try:
        measure.decode_attention(
            benchmark,
            fn,
            sets,
            label="decode_attention kv long",
            dims=dims,
            impl=impl,
            role=role,
            backend=backend,
            device=dev,
            nbytes=nbytes,
            dtype=dt,
            extra=extra,
        )
    finally:
        del sets
        torch.cuda.empty_cache()


ROPE_STEP_SHAPES = {"smollm2": (9, 3, 64), "llama1b": (32, 8, 64)}


@pytest.mark.parametrize("impl", ["two-ops", "fused"])
@pytest.mark.parametrize("fmt", ["dense", "int8"])
@pytest.mark.parametrize("shape", list(ROPE_STEP_SHAPES))
def test_rope_decode_step(benchmark, measure, shape, fmt, impl):
    import sentinel_kernels as sk
    from sentinel_kernels.reference import kv_formats

    hq, hkv, d = ROPE_STEP_SHAPES[shape]
    b, cap, length = 1, 1024, 512
    dev, dt = torch.device("cuda"), torch.bfloat16
    lens0 = torch.full((b,), length, dtype=torch.int32, device=dev)
    lens = lens0.clone()
    g = torch.Generator(device=dev).manual_seed(0)
    ang = torch.rand(b, 1, d // 2, device=dev, generator=g) * 100
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    sets = []
    for _ in range(3):  # a 1024-slot cache fits in L2: the launches, not the bytes, count
        q = torch.randn(b, hq, 1, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, hkv, 1, d, device=dev, dtype=dt, generator=g)
        past_k = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
        past_v = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
        if fmt == "dense":
            stores = (past_k, past_v, None, None)
        else:
            kc, ks = kv_formats.quantize_kv(past_k, "int8", 1)
            vc, vs = kv_formats.quantize_kv(past_v, "int8", 1)
            stores = (kc, vc, ks, vs)
        sets.append((q, k, v, *stores))
    layout = {"kv_format": fmt}

    if impl == "two-ops":

        def fn(q, k, v, kc, vc, ks, vs):
            lens.copy_(lens0)
            q_rot = sk.ops.rope_kv_append(q, k, v, cos, sin, kc, vc, lens, fmt, ks, vs)
            return sk.ops.decode_attention(q_rot, kc, vc, lens, k_scale=ks, v_scale=vs, **layout)

        role = "baseline"
    else:

        def fn(q, k, v, kc, vc, ks, vs):
            lens.copy_(lens0)
            return sk.ops.rope_decode_attention(
                q, k, v, cos, sin, kc, vc, lens, k_scale=ks, v_scale=vs, **layout
            )

        role = "candidate"
    per_elem = 2 if fmt == "dense" else 1
    measure(
        benchmark,
        fn,
        sets,
        group=f"rope decode step {shape} {fmt} L{length} cuda graph",
        impl=impl,
        role=role,
        backend="triton",
        device=dev,
        nbytes=2 * b * hkv * (length + 1) * d * per_elem,
        shape=(b, hq, 1, d),
        dtype=dt,
        extra={"format": fmt, "keys": length + 1},
        cuda_graph=True,
    )


@pytest.mark.parametrize("impl", APPEND_IMPLS)
def test_kv_append(benchmark, measure, impl):
    import sentinel_kernels as sk
    from sentinel_kernels.reference import kv_formats

    b, h, s, cap, d = 8, 8, 2048, 8192, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    x_bytes = b * h * s * d * 2
    n_sets = measure.rotation_count(dev, 2 * x_bytes)
    start = torch.zeros(b, dtype=torch.int32, device=dev)
    fmt = {"sentinel-int8": "int8", "sentinel-int4": "int4", "eager-quantize": "int8"}.get(
        impl, "dense"
    )
    sets = []
    for _ in range(n_sets):
        x = torch.randn(b, h, s, d, device=dev, dtype=dt)
        if fmt == "dense":
            cache, scales = torch.empty(b, h, cap, d, device=dev, dtype=dt), None
        else:
            cache = torch.empty(
                (b, h, cap, kv_formats.kv_code_width(d, fmt)),
                dtype=torch.int8 if fmt == "int8" else torch.uint8,
                device=dev,
            )
            scales = torch.empty(
                kv_formats.kv_scale_shape((b, h, cap), 1, fmt), dtype=torch.float16, device=dev
            )
        sets.append((x, cache, scales))
    if impl == "device-copy":
        # The bandwidth reference: x copied into a contiguous buffer of its own shape.
        sets = [(x, torch.empty_like(x), None) for x, _, _ in sets]

        def fn(x, dst, scales):
            dst.copy_(x)

        role, backend, written = "copy", "torch", x_bytes
    elif impl == "torch-copy":
        # What a user writes: a slice copy into the (longer) cache, a strided destination.
        def fn(x, cache, scales):
            cache[:, :, :s].copy_(x)

        role, backend, written = "reference", "torch", x_bytes
    elif impl == "eager-quantize":

        def fn(x, cache, scales):
            codes, sc = kv_formats.quantize_kv(x, "int8", 1)
            cache[:, :, :s].copy_(codes)
            scales[:, :, :s].copy_(sc)

        role, backend, written = "baseline", "torch", x_bytes // 2 + b * h * s * 2
    else:

        def fn(x, cache, scales, fmt=fmt):
            sk.ops.kv_append(x, cache, start, fmt, scales)

        role, backend = "candidate", "triton"
        written = {
            "dense": x_bytes,
            "int8": x_bytes // 2 + b * h * s * 2,
            "int4": x_bytes // 4 + b * h * s * 4,
        }[fmt]
    measure(
        benchmark,
        fn,
        sets,
        group=f"kv_append B{b} H{h} S{s} D{d} bfloat16 cuda graph",
        impl=impl,
        role=role,
        backend=backend,
        device=dev,
        nbytes=x_bytes + written,
        shape=(b, h, s, d),
        dtype=dt,
        extra={"format": fmt},
        cuda_graph=True,
    )

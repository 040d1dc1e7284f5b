"""sk.ops.attention (prefill) on every backend against an fp64 oracle.

The oracle is the reference rule evaluated in fp64 on the very (dtype-rounded) inputs the
op gets, so what is left is the op's own arithmetic, held to ``helpers.attention_tol``
(norm-wise relative error). Decode over a cache is tests/ops/test_decode_attention.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, Backend, skip_unless_available
from helpers import (
    assert_attention_close,
    attention_tol,
    f64,
    oracle_arg,
    qkv,
    randn,
    rel_error,
    skip_interpreted_bf16,
)

import sentinel_kernels as sk
from sentinel_kernels.reference.attention import attention as ref_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(out, q, k, v, dtype, **kw) -> None:
    assert q.dtype == dtype
    kw = {n: oracle_arg(t) for n, t in kw.items()}
    assert_attention_close(out, ref_attention(f64(q), f64(k), f64(v), **kw), q)


PREFILL = [
    (1, 1, 1, 1, 1, 64),
    (2, 4, 4, 7, 7, 64),
    (1, 3, 1, 17, 17, 96),
    (2, 4, 1, 33, 33, 128),
    (1, 8, 1, 70, 70, 32),
    (1, 6, 2, 1, 40, 24),
    (1, 2, 2, 5, 127, 7),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", PREFILL, ids=lambda s: "B{}H{}x{}Sq{}Sk{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_fp64(backend: Backend, dtype, shape, causal):
    skip_interpreted_bf16(backend, dtype)
    q, k, v = qkv(*shape, dtype, backend.device)
    out = sk.ops.attention(q, k, v, causal=causal)
    _check(out, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("seg", [False, True], ids=["plain", "seg_start"])
def test_attention_output_is_transformers_layout_without_a_copy(backend: Backend, seg):
    """The [B, Hq, Sq, D] output is a view of [B, Sq, Hq, D] memory on every backend (and
    the reference fallbacks), so the caller's transpose to transformers' layout is free."""
    q, k, v = qkv(2, 4, 2, 7, 7, 32, torch.float32, backend.device)
    starts = torch.tensor([[0, 0, 0, 3, 3, 3, 3]] * 2, device=backend.device) if seg else None
    out = sk.ops.attention(q, k, v, causal=True, seg_start=starts)
    assert out.shape == (2, 4, 7, 32) and out.transpose(1, 2).is_contiguous()
    _check(out, q, k, v, torch.float32, causal=True, seg_start=starts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_scale_and_strided_inputs(backend: Backend, dtype):
    skip_interpreted_bf16(backend, dtype)
    b, s, h, d = 2, 19, 4, 40
    # HF projections give [B, S, H, D]; the op takes the transposed view without a copy.
    q = randn((b, s, h, d), dtype, backend.device, seed=3).transpose(1, 2)
    k = randn((b, s, 2, d), dtype, backend.device, seed=4).transpose(1, 2)
    v = randn((b, s, 2, 2 * d), dtype, backend.device, seed=5)[..., ::2].transpose(1, 2)
    assert not q.is_contiguous() and v.stride(-1) == 2
    out = sk.ops.attention(q, k, v, causal=True, scale=0.3)
    _check(out, q, k, v, dtype, causal=True, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_head_masks(backend: Backend, dtype):
    b, hq, hkv, s, d = 2, 6, 2, 21, 32
    q, k, v = qkv(b, hq, hkv, s, s, d, dtype, backend.device, seed=7)
    cases = {
        "one active": torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool),
        "per batch": torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], dtype=torch.int32),
        "float 0/1": torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
        "all pruned": torch.zeros(hq, dtype=torch.bool),
    }
    for name, mask in cases.items():
        mask = mask.to(backend.device)
        out = sk.ops.attention(q, k, v, causal=True, head_mask=mask)
        keep = (mask != 0).expand(b, hq).cpu()
        pruned = out.cpu()[~keep]
        assert torch.equal(pruned, torch.zeros_like(pruned)), f"{name}: pruned heads not zero"
        _check(out, q, k, v, dtype, causal=True, head_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_left_padding(backend: Backend, dtype):
    b, hq, hkv, s, d = 3, 4, 2, 23, 64
    q, k, v = qkv(b, hq, hkv, s, s, d, dtype, backend.device, seed=11)
    pad = [0, 5, 22]  # row 2 keeps a single token
    mask = torch.ones(b, s, dtype=torch.int64)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
    mask = mask.to(backend.device)
    out = sk.ops.attention(q, k, v, causal=True, attn_mask=mask)
    # Padded query rows see no key under causality: they must be zero, not NaN.
    assert torch.equal(out[1, :, :5].cpu(), torch.zeros_like(out[1, :, :5].cpu()))
    _check(out, q, k, v, dtype, causal=True, attn_mask=mask)
    # A non-causal row of all-padding keys also gives zeros.
    mask[0] = 0
    out = sk.ops.attention(q, k, v, causal=False, attn_mask=mask)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    _check(out, q, k, v, dtype, causal=False, attn_mask=mask)


@pytest.mark.parametrize("window", [1, 4, 16])
def test_attention_sliding_window(backend: Backend, window):
    q, k, v = qkv(2, 4, 2, 37, 37, 32, torch.float32, backend.device, seed=13)
    out = sk.ops.attention(q, k, v, causal=True, window=window)
    _check(out, q, k, v, torch.float32, causal=True, window=window)


def test_attention_chunk_against_cache(backend: Backend):
    """Chunked prefill: Sq new queries at the end of per-row caches of different lengths."""
    q, k, v = qkv(3, 4, 1, 9, 50, 32, torch.float32, backend.device, seed=17)
    lens = torch.tensor([50, 9, 30], dtype=torch.int32, device=backend.device)
    out = sk.ops.attention(q, k, v, causal=True, cache_lens=lens)
    _check(out, q, k, v, torch.float32, causal=True, cache_lens=lens)


def test_attention_empty(backend: Backend):
    q, k, v = qkv(2, 2, 2, 3, 0, 16, torch.float32, backend.device)
    out = sk.ops.attention(q, k, v, causal=False)
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 3, 16))
    q0 = q[:, :, :0]
    assert sk.ops.attention(q0, q0, q0).shape == (2, 2, 0, 16)


# ------------------------------------------------------------------- packed prompts (seg_start)


def _seg_start(rows: list[list[int]], device) -> torch.Tensor:
    """int32 ``[B, S]``: each token's segment start, for rows of concatenated segments."""
    starts = []
    for lens in rows:
        row = []
        for start, n in zip(torch.tensor([0, *lens[:-1]]).cumsum(0).tolist(), lens, strict=True):
            row += [start] * n
        starts.append(row)
    return torch.tensor(starts, dtype=torch.int32, device=device)


PACKED = [[[1, 7, 33]], [[5, 127]], [[16, 1, 40], [40, 17]]]


@pytest.mark.parametrize("rows", PACKED, ids=lambda r: "-".join("+".join(map(str, x)) for x in r))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_packed_segments(backend: Backend, dtype, rows):
    """Packed prompts: each segment's rows equal the segment run on its own."""
    skip_interpreted_bf16(backend, dtype)
    seg = _seg_start(rows, backend.device)
    b, s = seg.shape
    q, k, v = qkv(b, 4, 2, s, s, 32, dtype, backend.device, seed=41)
    out = sk.ops.attention(q, k, v, causal=True, seg_start=seg)
    _check(out, q, k, v, dtype, causal=True, seg_start=seg)
    for row, lens in enumerate(rows):
        start = 0
        for n in lens:
            part = slice(start, start + n)
            alone = sk.ops.attention(
                q[row : row + 1, :, part],
                k[row : row + 1, :, part],
                v[row : row + 1, :, part],
                causal=True,
            )
            err = rel_error(out[row : row + 1, :, part], alone)
            assert err <= 2 * attention_tol(dtype), f"row {row} segment at {start}: {err:.3e}"
            start += n


def test_attention_packed_with_window(backend: Backend):
    seg = _seg_start([[9, 30, 2]], backend.device)
    q, k, v = qkv(1, 4, 1, 41, 41, 32, torch.float32, backend.device, seed=43)
    out = sk.ops.attention(q, k, v, causal=True, window=12, seg_start=seg)
    _check(out, q, k, v, torch.float32, causal=True, window=12, seg_start=seg)


def test_attention_packed_with_key_mask(backend: Backend):
    """Left padding (a key mask) in front of packed prompts, non-causal as well."""
    seg = _seg_start([[6, 20, 11], [3, 34]], backend.device)
    q, k, v = qkv(2, 2, 2, 37, 37, 32, torch.float32, backend.device, seed=47)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, 10:15] = False
    mask = mask.to(backend.device)
    for causal in (True, False):
        out = sk.ops.attention(q, k, v, causal=causal, attn_mask=mask, seg_start=seg)
        _check(out, q, k, v, torch.float32, causal=causal, attn_mask=mask, seg_start=seg)


def test_attention_packed_with_head_mask(backend: Backend):
    seg = _seg_start([[13, 20], [1, 32]], backend.device)
    q, k, v = qkv(2, 4, 2, 33, 33, 16, torch.float32, backend.device, seed=53)
    hm = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool, device=backend.device)
    out = sk.ops.attention(q, k, v, causal=True, head_mask=hm, seg_start=seg)
    pruned = out.cpu()[~hm.cpu()]
    assert torch.equal(pruned, torch.zeros_like(pruned))
    _check(out, q, k, v, torch.float32, causal=True, head_mask=hm, seg_start=seg)


def test_attention_seg_start_strided_int64_and_cache(backend: Backend):
    """A strided int64 seg_start, and a chunk of queries at the end of per-row caches."""
    dev = backend.device
    wide = torch.zeros(2, 2 * 9, dtype=torch.int64, device=dev)
    wide[:, ::2] = torch.tensor([[0, 0, 0, 20, 20, 20, 20, 35, 35], [3, 3, 3, 3, 3, 5, 5, 5, 5]])
    seg = wide[:, ::2]
    assert seg.stride() == (18, 2) and seg.dtype == torch.int64
    q, k, v = qkv(2, 4, 1, 9, 40, 32, torch.float32, dev, seed=59)
    lens = torch.tensor([40, 14], dtype=torch.int32, device=dev)
    out = sk.ops.attention(q, k, v, causal=True, cache_lens=lens, seg_start=seg)
    _check(out, q, k, v, torch.float32, causal=True, cache_lens=lens, seg_start=seg)
    out = sk.ops.attention(q, k, v, causal=False, seg_start=seg)
    _check(out, q, k, v, torch.float32, causal=False, seg_start=seg)


def test_attention_seg_start_beyond_the_query(backend: Backend):
    """A query whose segment starts after itself (or past every key) sees nothing: 0."""
    q, k, v = qkv(1, 2, 2, 20, 20, 16, torch.float32, backend.device, seed=61)
    seg = torch.zeros(1, 20, dtype=torch.int32)
    seg[0, 3] = 4  # beyond itself (causal)
    seg[0, 10:] = 10
    seg[0, 17] = 1 << 30  # beyond every key
    seg = seg.to(backend.device)
    out = sk.ops.attention(q, k, v, causal=True, seg_start=seg)
    for i in (3, 17):
        row = out[0, :, i].cpu()
        assert torch.equal(row, torch.zeros_like(row)), f"query {i} saw a key"
    assert torch.isfinite(out.cpu()).all()
    _check(out, q, k, v, torch.float32, causal=True, seg_start=seg)


# ------------------------------------------------------------------------------ errors


def test_bad_inputs(backend: Backend):
    dev = backend.device
    q, k, v = qkv(2, 4, 2, 5, 5, 16, torch.float32, dev)
    with pytest.raises(TypeError, match="one dtype"):
        sk.ops.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="dtype int64"):
        sk.ops.attention(q.long(), k, v)
    with pytest.raises(ValueError, match="4-D"):
        sk.ops.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sk.ops.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="head_dim"):
        sk.ops.attention(q, k[..., :8], v[..., :8])
    big = torch.randn(1, 1, 2, 300, device=dev)
    with pytest.raises(ValueError, match=r"head_dim must be in \[1, 256\]"):
        sk.ops.attention(big, big, big)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        sk.ops.attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="head_mask shape"):
        sk.ops.attention(q, k, v, head_mask=torch.ones(3, device=dev))
    with pytest.raises(ValueError, match="key padding mask"):
        sk.ops.attention(q, k, v, attn_mask=torch.ones(2, 1, 5, 5, device=dev))
    with pytest.raises(ValueError, match="window"):
        sk.ops.attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="scale"):
        sk.ops.attention(q, k, v, scale=float("nan"))
    seg = torch.zeros(2, 5, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match=r"seg_start shape \(2, 4\) must be \[batch, query_len\]"):
        sk.ops.attention(q, k, v, seg_start=seg[:, :4])
    with pytest.raises(ValueError, match="seg_start shape"):
        sk.ops.attention(q, k, v, seg_start=seg[0])
    with pytest.raises(TypeError, match="seg_start has dtype float32"):
        sk.ops.attention(q, k, v, seg_start=seg.float())
    with pytest.raises(TypeError, match="seg_start must be a torch.Tensor"):
        sk.ops.attention(q, k, v, seg_start=[0] * 5)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_device_mismatch():
    q = torch.randn(1, 2, 3, 16, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        sk.ops.attention(q, q.cpu(), q.cpu())
    seg = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="seg_start on cpu"):
        sk.ops.attention(q, q, q, seg_start=seg)


def test_opcheck(backend: Backend):
    dev = backend.device
    q, k, v = qkv(2, 4, 2, 5, 9, 16, torch.float32, dev)
    lens = torch.tensor([9, 6], dtype=torch.int32, device=dev)
    hm = torch.tensor([1, 0, 1, 1], dtype=torch.bool, device=dev)
    torch.library.opcheck(
        torch.ops.sentinel.attention.default, (q, k, v, True, hm, None, None, 0, lens)
    )
    seg = torch.tensor([[0, 0, 5, 5, 5], [0, 2, 2, 2, 2]], dtype=torch.int32, device=dev)
    torch.library.opcheck(
        torch.ops.sentinel.attention.default, (q, k, v, True, hm, None, None, 0, lens, seg)
    )


# ------------------------------------------------------------------------------ GPU sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128, 96, 256])
def test_gpu_prefill_full_size(dtype, d):
    q, k, v = qkv(2, 8, 2, 1000, 1000, d, dtype, "cuda", seed=37)
    mask = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    mask[1, :123] = False
    hm = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], device="cuda")
    out = sk.ops.attention(q, k, v, causal=True, head_mask=hm, attn_mask=mask)
    exp = ref_attention(
        q.double(), k.double(), v.double(), causal=True, head_mask=hm, attn_mask=mask
    )
    assert rel_error(out, exp) <= attention_tol(dtype)


# ------------------------------------------------------------------------------ head tables


@pytest.mark.parametrize(
    "kind", ["bool-1d", "int-2d", "float-2d-strided", "none-active", "all-active"]
)
def test_head_tables_kernel(kind):
    """The one-launch table kernel: flags expanded over the batch, active pairs first."""
    dev = "cuda" if HAS_CUDA else "cpu"
    skip_unless_available(Backend(dev, "triton"))
    from sentinel_kernels.kernels import attention as ka

    b, h = 3, 7
    g = torch.Generator().manual_seed(3)
    full = torch.rand(b, h, generator=g) < 0.5
    mask = {
        "bool-1d": full[0],
        "int-2d": full.to(torch.int32),
        "float-2d-strided": torch.stack([full.float(), full.float()], -1)[..., 0],
        "none-active": torch.zeros(b, h, dtype=torch.bool),
        "all-active": torch.ones(h, dtype=torch.int64),
    }[kind].to(dev)
    active, order = ka.head_tables(mask, b, h, want_order=True)
    expect = (mask != 0).expand(b, h).reshape(-1).cpu()
    assert torch.equal(active.cpu(), expect.to(torch.int8))
    stable = torch.argsort((~expect).to(torch.int8), stable=True).to(torch.int32)
    assert torch.equal(order.cpu(), stable)


def test_attention_seg_start_in_any_order(backend: Backend):
    """Random segment starts (not growing with the query, as packed prompts' do) over a
    row long enough for several query tiles: each tile's key range is the union of its
    queries' ranges, and every query keeps its own bound."""
    q, k, v = qkv(2, 3, 1, 150, 150, 16, torch.float32, backend.device, seed=67)
    g = torch.Generator().manual_seed(71)
    seg = torch.randint(0, 150, (2, 150), generator=g).to(backend.device)
    out = sk.ops.attention(q, k, v, causal=True, seg_start=seg)
    _check(out, q, k, v, torch.float32, causal=True, seg_start=seg)

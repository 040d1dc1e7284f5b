"""sk.ops.rope_decode_attention (a decode step's rotary embedding, K/V append and attention
in one launch) on every backend.

Three things are checked on each call: the output against the fp64 oracle of the
composition it stands for (``reference.rope_decode_attention``: the rotation in fp64,
then ``decode_attention``'s rule; ``helpers.attention_tol`` plus the rotation's two
roundings to the dtype), the caches and lengths bit for bit against the two public ops
run on the same backend (``rope_kv_append`` then ``decode_attention``), and, on the Triton
interpreter, where both take the same single launch config, the output bit for bit too.
Several steps run in a row (the CUDA kernel's arrival counter must re-arm), and shapes
cover a split key range (the step's key written by one program of several), a row
filling its cache to the last slot, a fresh row (length 0), GQA 9/3, head and key masks,
strided q/k/v, broadcast cos/sin and int64 lengths (the two-op route).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import (
    assert_same_bits,
    attention_tol,
    poisoned_cache,
    randn,
    rel_error,
    skip_interpreted_bf16,
    transposed_randn,
)

import sentinel_kernels as sk
from sentinel_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = [
    # (B, Hq, Hkv, Sq, L, D, lens before the first step)
    (1, 9, 3, 1, 300, 64, [255]),  # SmolLM2's GQA
    (3, 4, 4, 3, 127, 32, [0, 60, 121]),  # a fresh row; a row that ends on the last slot
    (2, 8, 2, 7, 1000, 16, [993, 400]),  # several splits; the last slots again
    (1, 2, 1, 1, 7, 128, [4]),
    (2, 6, 2, 2, 77, 96, [1, 50]),  # D not a power of two
]


def _inputs(b, hq, hkv, sq, d, dtype, device, seed, cos_layout):
    q = transposed_randn(b, hq, sq, d, dtype, device, seed)  # strided, as q_proj(x).view
    k = transposed_randn(b, hkv, sq, d, dtype, device, seed + 1)
    v = transposed_randn(b, hkv, sq, d, dtype, device, seed + 2)
    # Real cos/sin values of some positions (|cos|, |sin| <= 1), of q's dtype.
    g = torch.Generator().manual_seed(seed + 3)
    ang = torch.rand(b, sq, d // 2, generator=g, dtype=torch.float64) * 100
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
    if cos_layout == "shared":  # [1, Sq, D], every row at the same positions
        cos, sin = cos[:1], sin[:1]
    elif cos_layout == "2d":
        cos, sin = cos[0], sin[0]
    return q, k, v, cos, sin


def _caches(b, hkv, cap, d, fmt, groups, dtype, device, lens, seed):
    """``(k_cache, v_cache, k_scale, v_scale)``: a random past (never zeros) stored by the
    reference append in every slot, then poison (``helpers.poisoned_cache``'s) from each
    row's length on, so that a position the step should have stored and did not shows up
    in the output."""
    out = []
    for j in range(2):
        codes, scales = poisoned_cache(b, hkv, cap, d, fmt, groups, dtype)
        past = randn((b, hkv, cap, d), dtype, "cpu", seed=seed + j)
        reference.kv_append(past, codes, torch.zeros(b, dtype=torch.int64), fmt, scales)
        fresh, fresh_scales = poisoned_cache(b, hkv, cap, d, fmt, groups, dtype)
        for row, n in enumerate(lens):
            codes[row, :, n:] = fresh[row, :, n:]
            if scales is not None:
                scales[row, :, n:] = fresh_scales[row, :, n:]
        out.append((codes.to(device), scales.to(device) if scales is not None else None))
    (kc, ks), (vc, vs) = out
    return kc, vc, ks, vs


def _oracle(q, k, v, cos, sin, kc, vc, lens, **kw):
    # fp64 vectors; codes and fp16 scales as they are (they dequantize exactly either way)
    f64 = [t.detach().to("cpu", torch.float64) for t in (q, k, v, cos, sin)]
    stores = [t.detach().cpu().clone() for t in (kc, vc)]
    if stores[0].is_floating_point():
        stores = [t.double() for t in stores]
    kw = {n: (t.cpu().clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return reference.rope_decode_attention(*f64, *stores, lens.detach().cpu().clone(), **kw)


def _rope_tol(dtype: torch.dtype) -> float:
    # The attention's budget plus the rotation's: each rotated q and k element is two
    # products and a sum rounded to the dtype (3u), which perturbs scores by ~3u relative.
    return attention_tol(dtype) + (0 if dtype == torch.float32 else 6 * torch.finfo(dtype).eps)


#: (kv_format, scale groups): the fused kernel takes dense and int8 with one group or
#: groups it dequantizes in registers; int4 and int8 groups of per-group dots run the
#: two ops (the op must give the same answers on every route).
FORMATS = [("dense", 0), ("int8", 1), ("int8", 4), ("int4", 1), ("int4", 2)]


def _clone(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-g{f[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}x{}Sq{}L{}D{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_decode_matches_composition(backend: Backend, case, dtype, fmt):
    skip_interpreted_bf16(backend, dtype)
    kv_format, groups = fmt
    b, hq, hkv, sq, cap, d, start = case
    if groups > 1 and d % groups:
        pytest.skip(f"D={d} does not split into {groups} groups")
    if backend.interpreted and kv_format != "dense" and cap >= 1000:
        pytest.skip("the interpreter is slow: the long cache runs dense only")
    dev = backend.device
    kc, vc, ks, vs = _caches(b, hkv, cap, d, kv_format, groups, dtype, dev, start, seed=5)
    lens = torch.tensor(start, dtype=torch.int32, device=dev)
    kc2, vc2, ks2, vs2, lens2 = kc.clone(), vc.clone(), _clone(ks), _clone(vs), lens.clone()
    layout = dict(kv_format=kv_format, k_scale=ks, v_scale=vs)
    layout2 = dict(kv_format=kv_format, k_scale=ks2, v_scale=vs2)
    steps = max(1, min((cap - max(start)) // sq, 3))
    for step in range(steps):
        cos_layout = ["full", "shared", "2d"][step % 3]
        q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, dev, 10 * step, cos_layout)
        expected = _oracle(q, k, v, cos, sin, kc, vc, lens, **layout)
        out = sk.ops.rope_decode_attention(q, k, v, cos, sin, kc, vc, lens, **layout)
        # The two public ops, on the same backend, over copies of the same state.
        q_rot = sk.ops.rope_kv_append(q, k, v, cos, sin, kc2, vc2, lens2, kv_format, ks2, vs2)
        out2 = sk.ops.decode_attention(q_rot, kc2, vc2, lens2, **layout2)
        assert out.dtype == dtype and out.shape == q.shape
        err = rel_error(out, expected)
        assert err <= _rope_tol(dtype), f"step {step}: relative error {err:.3e} ({dtype})"
        assert torch.equal(lens.cpu(), lens2.cpu()), (lens, lens2)
        assert lens.cpu().tolist() == [n + sq * (step + 1) for n in start]
        assert_same_bits(kc, kc2, f"step {step}: key cache")
        assert_same_bits(vc, vc2, f"step {step}: value cache")
        if ks is not None:
            assert_same_bits(ks, ks2, f"step {step}: key scales")
            assert_same_bits(vs, vs2, f"step {step}: value scales")
        if backend.interpreted:
            assert_same_bits(out, out2, f"step {step}: output against the two ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rope_decode_masks_and_window(backend: Backend, dtype):
    b, hq, hkv, sq, cap, d = 3, 6, 2, 2, 200, 32
    dev = backend.device
    start = [150, 3, 90]
    kc, vc, _, _ = _caches(b, hkv, cap, d, "dense", 0, dtype, dev, start, seed=7)
    lens = torch.tensor(start, dtype=torch.int32, device=dev)
    q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, dev, 3, "full")
    head_mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1], [1] * 6], dtype=torch.bool)
    pad = torch.ones(b, cap, dtype=torch.bool)
    pad[0, :40] = False  # left padding of row 0
    kw = dict(head_mask=head_mask.to(dev), attn_mask=pad.to(dev), scale=0.3, window=70)
    expected = _oracle(q, k, v, cos, sin, kc, vc, lens, **kw)
    out = sk.ops.rope_decode_attention(q, k, v, cos, sin, kc, vc, lens, **kw)
    err = rel_error(out, expected)
    assert err <= _rope_tol(dtype), f"relative error {err:.3e}"
    # Pruned heads give exact zeros.
    assert (out.cpu()[~head_mask] == 0).all()


def test_rope_decode_int64_lengths(backend: Backend):
    # int64 lengths cannot be advanced in place by the fused kernel: the two ops run.
    b, hq, hkv, sq, cap, d, dtype = 2, 4, 2, 1, 64, 32, torch.float32
    dev = backend.device
    kc, vc, _, _ = _caches(b, hkv, cap, d, "dense", 0, dtype, dev, [10, 63], seed=9)
    lens = torch.tensor([10, 63], dtype=torch.int64, device=dev)
    q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, dev, 4, "full")
    expected = _oracle(q, k, v, cos, sin, kc, vc, lens)
    out = sk.ops.rope_decode_attention(q, k, v, cos, sin, kc, vc, lens)
    assert rel_error(out, expected) <= _rope_tol(dtype)
    assert lens.cpu().tolist() == [11, 64]


def test_rope_decode_rejects_bad_arguments():
    b, hq, hkv, sq, cap, d, dtype = 1, 4, 2, 1, 16, 8, torch.float32
    q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, "cpu", 0, "full")
    kc, vc, _, _ = _caches(b, hkv, cap, d, "dense", 0, dtype, "cpu", [3], seed=1)
    lens = torch.tensor([3], dtype=torch.int32)
    good = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=kc, v_cache=vc, cache_lens=lens)
    sk.ops.rope_decode_attention(**good)
    bad = [
        (dict(k=k[:, :1]), "rope_decode_attention"),  # k and v heads differ
        (dict(cos=cos[..., :4]), "rope_decode_attention"),
        (dict(k_cache=kc.half()), "rope_decode_attention"),  # dtype
        (dict(v_cache=vc[:, :, :8]), "rope_decode_attention"),
        (dict(cache_lens=torch.tensor([3, 4], dtype=torch.int32)), "rope_decode_attention"),
        (dict(q=q[:, :3]), "rope_decode_attention"),  # Hq not a multiple of Hkv
    ]
    for changes, match in bad:
        with pytest.raises((TypeError, ValueError), match=match):
            sk.ops.rope_decode_attention(**{**good, **changes})

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


def _caches(b, hkv, cap, d, dtype, device, seed):
    # Random past (never zeros); slots from each row's length on are NaN, so a position
    # the step should have written and did not shows up in the output.
    k = randn((b, hkv, cap, d), dtype, device, seed=seed)
    v = randn((b, hkv, cap, d), dtype, device, seed=seed + 1)
    return k, v


def _poison_tail(cache: torch.Tensor, lens: list[int]) -> None:
    for row, n in enumerate(lens):
        cache[row, :, n:] = float("nan")


def _oracle(q, k, v, cos, sin, kc, vc, lens, **kw):
    f64 = [t.detach().to("cpu", torch.float64) for t in (q, k, v, cos, sin, kc, vc)]
    kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return reference.rope_decode_attention(*f64, lens.detach().cpu().clone(), **kw)


def _rope_tol(dtype: torch.dtype) -> float:
    # The attention's budget plus the rotation's: each rotated q and k element is two
    # products and a sum rounded to the dtype (3u), which perturbs scores by ~3u relative.
    return attention_tol(dtype) + (0 if dtype == torch.float32 else 6 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}x{}Sq{}L{}D{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_decode_matches_composition(backend: Backend, case, dtype):
    skip_interpreted_bf16(backend, dtype)
    b, hq, hkv, sq, cap, d, start = case
    dev = backend.device
    kc, vc = _caches(b, hkv, cap, d, dtype, dev, seed=5)
    _poison_tail(kc, start)
    _poison_tail(vc, start)
    lens = torch.tensor(start, dtype=torch.int32, device=dev)
    kc2, vc2, lens2 = kc.clone(), vc.clone(), lens.clone()
    steps = max(1, min((cap - max(start)) // sq, 3))
    for step in range(steps):
        layout = ["full", "shared", "2d"][step % 3]
        q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, dev, 10 * step, layout)
        expected = _oracle(q, k, v, cos, sin, kc, vc, lens)
        out = sk.ops.rope_decode_attention(q, k, v, cos, sin, kc, vc, lens)
        # The two public ops, on the same backend, over copies of the same state.
        q_rot = sk.ops.rope_kv_append(q, k, v, cos, sin, kc2, vc2, lens2)
        out2 = sk.ops.decode_attention(q_rot, kc2, vc2, lens2)
        assert out.dtype == dtype and out.shape == q.shape
        err = rel_error(out, expected)
        assert err <= _rope_tol(dtype), f"step {step}: relative error {err:.3e} ({dtype})"
        assert torch.equal(lens.cpu(), lens2.cpu()), (lens, lens2)
        assert lens.cpu().tolist() == [n + sq * (step + 1) for n in start]
        assert_same_bits(kc, kc2, f"step {step}: key cache")
        assert_same_bits(vc, vc2, f"step {step}: value cache")
        if backend.interpreted:
            assert_same_bits(out, out2, f"step {step}: output against the two ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rope_decode_masks_and_window(backend: Backend, dtype):
    b, hq, hkv, sq, cap, d = 3, 6, 2, 2, 200, 32
    dev = backend.device
    kc, vc = _caches(b, hkv, cap, d, dtype, dev, seed=7)
    start = [150, 3, 90]
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
    kc, vc = _caches(b, hkv, cap, d, dtype, dev, seed=9)
    lens = torch.tensor([10, 63], dtype=torch.int64, device=dev)
    q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, dev, 4, "full")
    expected = _oracle(q, k, v, cos, sin, kc, vc, lens)
    out = sk.ops.rope_decode_attention(q, k, v, cos, sin, kc, vc, lens)
    assert rel_error(out, expected) <= _rope_tol(dtype)
    assert lens.cpu().tolist() == [11, 64]


def test_rope_decode_rejects_bad_arguments():
    b, hq, hkv, sq, cap, d, dtype = 1, 4, 2, 1, 16, 8, torch.float32
    q, k, v, cos, sin = _inputs(b, hq, hkv, sq, d, dtype, "cpu", 0, "full")
    kc, vc = _caches(b, hkv, cap, d, dtype, "cpu", seed=1)
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

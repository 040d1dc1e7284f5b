"""KIVI keys on the reference and Triton backends: sk.ops.decode_attention(kv_format="int4",
key_block=T), per-channel int4 keys over blocks of T tokens (the C++ backend is tested per
SIMD level in test_decode_attention_native.py).

The oracle is ``reference.decode_attention`` evaluated in fp64 on the same codes, scales
and rings, so what remains is the op's own arithmetic. Dequantized keys and values are
exact in fp32 (a 4-bit code times an fp16 scale, plus one rounded add), so fp32 is held to
the dense decode bound (softmax and accumulation in fp32: 1e-5; measured ~3e-7). For fp16
the kernel rounds ``q_c * s_c`` (the block's key scales folded into the query), the
probabilities and the output to fp16: about one unit roundoff u = 2^-11 of the output
(measured up to 4.9e-4), held to 4u (~2e-3, helpers.REL_TOL).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import (
    REL_TOL,
    decode_oracle,
    on_device,
    op_args,
    poisoned_kivi_keys,
    randn,
    record_launches,
    rel_error,
)

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.reference.kv_append import kv_append as ref_kv_append
from sentinel_kernels.reference.kv_append import kv_append_key_blocks as ref_key_blocks

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dtype, seed):
    """A KIVI cache holding ``lens[b]`` positions per row, filled by the reference appends
    (on the CPU) one row at a time, in two pieces (the second completes or continues the
    first's open block), over poisoned storage: codes 0xEE, scales and rings NaN."""
    kc, ks, kr = poisoned_kivi_keys(b, hkv, cap, w, d, t, dtype)
    vc = kc.clone()
    vs = torch.full((b, hkv, cap, ng, 2), float("nan"), dtype=F16)
    vr = kr.clone()
    n_max = max(max(lens), 1)
    k = randn((b, hkv, n_max, d), dtype, "cpu", seed=seed)
    v = randn((b, hkv, n_max, d), dtype, "cpu", seed=seed + 1)
    for bi, n in enumerate(lens):
        cut = n // 2 + 1 if n > 1 else n
        for lo, hi in ((0, cut), (cut, n)):
            if hi <= lo:
                continue
            st = torch.tensor([lo], dtype=torch.int32)
            row = slice(bi, bi + 1)
            ref_key_blocks(k[row, :, lo:hi], kc[row], ks[row], kr[row], st, t)
            ref_kv_append(v[row, :, lo:hi], vc[row], st, "int4", vs[row])
            ref_kv_append(v[row, :, lo:hi], vr[row], st, "dense", None, wrap=True)
    rings = dict(k_recent=kr, v_recent=vr, key_block=t)
    return kc, vc, dict(kv_format="int4", k_scale=ks, v_scale=vs, **rings)


def _run(q, cache, lens, **kw):
    """The op (on q's device) and the fp64 oracle over the same cache (of :func:`_kivi_cache`)."""
    kc, vc, cache_kw = cache
    cl = torch.tensor(lens, dtype=torch.int32)
    call = {**cache_kw, **kw}
    dev = q.device
    out = sk.ops.decode_attention(q, kc.to(dev), vc.to(dev), cl.to(dev), **on_device(call, dev))
    exp = decode_oracle(q, kc, vc, cl, **call)
    assert out.shape == q.shape and out.dtype == q.dtype
    return out, exp


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, T, L, W, lens, NG)
    (2, 4, 4, 1, 64, 16, 64, 32, [37, 9], 1),  # GQA group 1; a row inside its 1st block
    (3, 6, 1, 3, 48, 16, 64, 32, [48, 21, 63], 3),  # D=48, NG=3 (gather); len % T == 0
    (2, 4, 1, 16, 64, 32, 96, 64, [70, 33], 2),  # Sq = 16 across the block boundary
    (1, 8, 2, 1, 128, 16, 32, 32, [29], 4),  # D=128, NG = 4 (broadcast)
    (2, 4, 2, 5, 33, 16, 48, 16, [45, 0], 1),  # odd D, W == T, an empty row
    (2, 12, 2, 1, 64, 16, 48, 32, [40, 31], 4),  # group 6, NG = 4
    (1, 3, 1, 2, 24, 256, 256, 256, [250], 3),  # T = 256 (the largest), NG = 3
    (1, 8, 2, 1, 128, 64, 128, 128, [100], 4),  # the default layout at D=128: T=64, NG=4
    (2, 9, 3, 1, 64, 64, 128, 128, [128, 77], 2),  # SmolLM2's GQA 9/3, default layout
]


@pytest.mark.parametrize(
    "case", DECODE_CASES, ids=lambda c: "B{}H{}x{}Sq{}D{}T{}L{}W{}-{}-NG{}".format(*c)
)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_decode_kivi_matches_fp64(ref_triton_backend: Backend, case, dtype):
    _check_case(ref_triton_backend, case, dtype)


def _check_case(backend: Backend, case, dtype, label: str = "") -> None:
    """One DECODE_CASES layout on ``backend`` against the fp64 oracle (REL_TOL)."""
    if dtype == BF16 and backend.interpreted:
        pytest.skip("the Triton interpreter's tl.dot is wrong for bf16 operands (triton 3.9)")
    b, hq, hkv, sq, d, t, cap, w, lens, ng = case
    cache = _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dtype, seed=d + t)
    q = randn((b, hq, sq, d), dtype, backend.device, seed=5)
    out, exp = _run(q, cache, lens)
    err = rel_error(out, exp)
    assert err <= REL_TOL[dtype], f"{label}relative error {err:.3e} > {REL_TOL[dtype]:.3e}"


_OFF = dict(K_FULL=False, V_DEQ=False, V_FULL=False, ASM=False, V_AHEAD=False)
_ALL_D = {"K_FULL": True, "K_FULL_MIN_D": 0}  # K_FULL at every D (the default: D >= 128)
# The default is test_decode_kivi_matches_fp64's; these are the other routes.
LOOP_VARIANTS = {
    "first": _OFF,  # the loop before the variants
    "vdeq": {**_OFF, "V_DEQ": True},
    "kfull": {**_OFF, **_ALL_D},
    "noasm": {**_OFF, **_ALL_D, "V_DEQ": True, "V_FULL": True, "V_AHEAD": True},
    "ahead": {**_OFF, "V_AHEAD": True},  # the first loop with the value scales ahead
    "all-ahead": {**_ALL_D, "V_DEQ": True, "V_FULL": True, "ASM": True, "V_AHEAD": True},
    "all": {**_ALL_D, "V_DEQ": True, "V_FULL": True, "ASM": True},  # the default before
}


@pytest.mark.parametrize("variant", list(LOOP_VARIANTS))
@pytest.mark.parametrize(
    "case",
    [c for c in DECODE_CASES if c[4] & (c[4] - 1) == 0],
    ids=lambda c: "B{}H{}x{}Sq{}D{}T{}L{}W{}-{}-NG{}".format(*c),
)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_decode_kivi_loop_variants(ref_triton_backend: Backend, monkeypatch, case, dtype, variant):
    """The KIVI loop with its variants (kernels.decode_attention.KIVI_LOOP: channel-order key
    and value tiles, values dequantized in the model dtype, the PTX nibble conversion,
    which the interpreter leaves out) switched off in turn, against the fp64 oracle as
    the default loop is. (The value tile in channel order is gated to key blocks of 32
    and more by the launcher, so the 16-key cases check that gate too.)"""
    from sentinel_kernels.kernels import decode_attention as kda

    if ref_triton_backend.name != "triton":
        pytest.skip("the variants are the Triton kernel's")
    for key, val in LOOP_VARIANTS[variant].items():
        monkeypatch.setitem(kda.KIVI_LOOP, key, val)
    _check_case(ref_triton_backend, case, dtype, f"{variant}: ")


def test_force_config_reaches_the_kivi_launch(ref_triton_backend: Backend, monkeypatch):
    """``force_config`` with a config without keys is the KIVI kernel's launch config (the
    launch recorded), the answer stays right, and the split kernel's is left alone."""
    from sentinel_kernels.kernels import decode_attention as kda

    if ref_triton_backend.name != "triton":
        pytest.skip("the config is the Triton kernel's")
    launched = record_launches(monkeypatch, kda, "_decode_kivi_kernel")
    monkeypatch.setattr(kda, "_AUTOTUNE", False)
    dev = ref_triton_backend.device
    lens = [70]
    cache = _kivi_cache(1, 2, 32, 16, 80, 16, lens, 1, F32, seed=17)
    q = randn((1, 4, 1, 32), F32, dev, seed=18)
    forced = kda.triton.Config({}, num_warps=2, num_stages=2, maxnreg=96)
    with kda.force_config(forced):
        assert kda._FORCED == {"split": None, "kivi": forced}
        out, exp = _run(q, cache, lens)
    assert rel_error(out, exp) <= REL_TOL[F32]
    kw = launched[-1]
    assert (kw["num_warps"], kw["num_stages"], kw["maxnreg"]) == (2, 2, 96)
    assert kda._FORCED == {"split": None, "kivi": None}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_gpu_kivi_every_autotune_candidate(dtype):
    """Each autotune candidate of the KIVI kernel (``_KIVI_GPU_CONFIGS``), forced in turn
    (the tuner checks only the one it picks), on the default layout at D=128."""
    from sentinel_kernels.kernels import decode_attention as kda

    case = (1, 8, 2, 1, 128, 64, 512, 128, [500], 4)
    b, hq, hkv, sq, d, t, cap, w, lens, ng = case
    cache = _kivi_cache(b, hkv, d, t, cap, w, lens, ng, dtype, seed=71)
    q = randn((b, hq, sq, d), dtype, "cuda", seed=72)
    for cand in kda._KIVI_GPU_CONFIGS:
        with kda.force_config(cand):
            for splits in (1, 3):
                out, exp = _run(q, cache, lens, num_splits=splits)
                err = rel_error(out, exp)
                assert err <= REL_TOL[dtype], f"{cand}: relative error {err:.3e}"


@pytest.mark.parametrize("window", [0, 7])
def test_decode_kivi_masks_and_splits(ref_triton_backend: Backend, window):
    """Head mask (row 0's KV group 1 pruned entirely: exact zeros), a slot-indexed key
    mask, a sliding window, forced splits 1/2/3 (all the same answer)."""
    dev = ref_triton_backend.device
    b, hq, hkv, d, t, cap, w, lens = 2, 6, 2, 64, 16, 80, 32, [75, 38]
    cache = _kivi_cache(b, hkv, d, t, cap, w, lens, 2, F32, seed=11)
    q = randn((b, hq, 3, d), F32, dev, seed=6)
    head_mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    key_mask = torch.ones(b, cap, dtype=torch.int8)
    key_mask[0, 3:9] = 0
    key_mask[0, 70:73] = 0  # inside row 0's open block (the ring)
    key_mask[1, 17:20] = 0
    pruned = ~head_mask[:, :, None, None].expand(b, hq, 3, d)
    for splits in (1, 2, 3):
        out, exp = _run(
            q,
            cache,
            lens,
            head_mask=head_mask,
            attn_mask=key_mask,
            window=window,
            num_splits=splits,
        )
        err = rel_error(out, exp)
        assert err <= REL_TOL[F32], f"num_splits={splits}: relative error {err:.3e}"
        got = out.cpu()[pruned]
        assert torch.equal(got, torch.zeros_like(got)), f"num_splits={splits}: pruned heads"


def test_decode_kivi_window_and_fp16_splits(ref_triton_backend: Backend):
    """A window reaching back into the quantized blocks, fp16, Sq = 2, forced splits."""
    dev = ref_triton_backend.device
    lens = [100, 57]
    cache = _kivi_cache(2, 1, 32, 32, 128, 64, lens, 1, F16, seed=13)
    q = randn((2, 4, 2, 32), F16, dev, seed=8)
    for splits in (1, 3):
        out, exp = _run(q, cache, lens, window=40, num_splits=splits)
        err = rel_error(out, exp)
        assert err <= REL_TOL[F16], f"num_splits={splits}: relative error {err:.3e}"


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _small(t: int, device, cap: int = 32, w: int = 32, d: int = 8):
    """A tiny zero KIVI cache of block ``t``: ``(q, codes, lens, the op's cache keywords)``."""
    q = torch.randn(1, 2, 1, d, device=device)
    kc = torch.zeros(1, 1, cap, (d + 1) // 2, dtype=torch.uint8, device=device)
    ks = torch.ones(1, 1, cap // t, d, 2, dtype=F16, device=device)
    vs = torch.ones(1, 1, cap, 1, 2, dtype=F16, device=device)
    kr = torch.zeros(1, 1, w, d, device=device)
    lens = torch.tensor([5], dtype=torch.int32, device=device)
    rings = dict(k_recent=kr, v_recent=kr, key_block=t)
    return q, kc, lens, dict(kv_format="int4", k_scale=ks, v_scale=vs, **rings)


def test_triton_key_block_must_be_a_power_of_two_in_range(triton_backend: Backend):
    for t in (8, 24, 512):
        q, kc, lens, kw = _small(t, triton_backend.device, cap=512, w=512)
        with pytest.raises(ValueError, match="key_block"):
            sk.ops.decode_attention(q, kc, kc, lens, **kw)


def test_reference_takes_any_key_block():
    q, kc, lens, kw = _small(8, "cpu")
    with _backend.use_backend("reference"):
        out = sk.ops.decode_attention(q, kc, kc, lens, **kw)
    assert torch.isfinite(out).all()


def test_bad_kivi_arguments(ref_triton_backend: Backend):
    dev = ref_triton_backend.device
    q, kc, lens, kivi = _small(16, dev)
    ks, vs, kr = kivi["k_scale"], kivi["v_scale"], kivi["k_recent"]
    kw = dict(kv_format="int4", v_scale=vs, k_recent=kr, v_recent=kr)
    with pytest.raises(ValueError, match="k_scale for key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=vs, key_block=16, **kw)
    with pytest.raises(ValueError, match="k_scale for key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks[:, :, :1], key_block=16, **kw)
    with pytest.raises(ValueError, match="multiple of key_block"):
        sk.ops.decode_attention(
            q,
            kc,
            kc,
            lens,
            k_scale=ks,
            key_block=16,
            **{**kw, "k_recent": kr[:, :, :24], "v_recent": kr[:, :, :24]},
        )
    with pytest.raises(ValueError, match="key_block"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks, key_block=16, wrap=True, **kw)
    with pytest.raises(ValueError, match="key_block"):
        sk.ops.decode_attention(
            q, kc, kc, lens, k_scale=ks, key_block=16, **{**kw, "k_recent": None, "v_recent": None}
        )
    k8 = torch.zeros(1, 1, 32, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(1, 1, 32, 1, dtype=F16, device=dev)
    with pytest.raises(ValueError, match="key_block"):
        int8 = dict(kv_format="int8", k_scale=s8, v_scale=s8)
        sk.ops.decode_attention(q, k8, k8, lens, **int8, k_recent=kr, v_recent=kr, key_block=16)
    with pytest.raises(ValueError, match="key_block must be an int"):
        sk.ops.decode_attention(q, kc, kc, lens, k_scale=ks, key_block=-16, **kw)


def test_opcheck_kivi_decode():
    codes = torch.zeros(1, 2, 32, 4, dtype=torch.uint8)
    scales = torch.zeros(1, 2, 2, 8, 2, dtype=F16)
    ring = torch.zeros(1, 2, 32, 8)
    q = randn((1, 4, 1, 8), F32, "cpu", seed=2)
    vs = torch.ones(1, 2, 32, 1, 2, dtype=F16)
    lens = torch.tensor([19], dtype=torch.int32)
    kw = dict(kv_format="int4", k_scale=scales, v_scale=vs, k_recent=ring, v_recent=ring)
    args = op_args(sk.ops.decode_attention, q, codes, codes, lens, key_block=16, **kw)
    with _backend.use_backend("reference"):
        torch.library.opcheck(torch.ops.sentinel.decode_attention.default, args)

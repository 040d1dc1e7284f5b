"""sk.ops.decode_attention on every backend, every cache format, against an fp64 oracle.

The oracle is ``reference.decode_attention`` evaluated in fp64 on the same queries, codes,
scales and rings (``helpers.decode_oracle``), so what remains is the op's own arithmetic:
dequantized values are exact in fp32 (an int8 code times an fp16 scale has at most 18
significant bits; int4 adds one rounded add), then the error budget of dense attention
(``helpers.attention_tol``: 8u for fp16/bf16, 2e-5 for fp32). KIVI keys are in
test_decode_attention_kivi.py, the C++ entry point in test_decode_attention_native.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Backend
from helpers import (
    assert_attention_close,
    attention_tol,
    decode_oracle,
    op_args,
    poisoned_cache,
    qkv,
    randn,
    record_launches,
    rel_error,
    skip_interpreted_bf16,
)

import sentinel_kernels as sk
from sentinel_kernels.reference.kv_formats import KV_FORMATS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _decode_and_check(q, k, v, lens, **kw) -> torch.Tensor:
    """``sk.ops.decode_attention(q, k, v, lens, **kw)`` against the fp64 oracle of the call."""
    out = sk.ops.decode_attention(q, k, v, lens, **kw)
    assert_attention_close(out, decode_oracle(q, k, v, lens, **kw), q)
    return out


# ------------------------------------------------------------------------------ dense


DECODE = [
    # (B, Hq, Hkv, Sq, L, D)
    (1, 1, 1, 1, 1, 64),
    (3, 4, 1, 1, 100, 64),
    (2, 6, 2, 2, 77, 96),
    (2, 8, 1, 5, 64, 128),
    (1, 9, 3, 1, 300, 64),
    (2, 3, 3, 3, 33, 7),
]


@pytest.mark.parametrize("shape", DECODE, ids=lambda s: "B{}H{}x{}Sq{}L{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_matches_fp64(backend: Backend, dtype, shape):
    skip_interpreted_bf16(backend, dtype)
    b, hq, hkv, sq, length, d = shape
    q, k, v = qkv(b, hq, hkv, sq, length, d, dtype, backend.device, seed=19)
    g = torch.Generator().manual_seed(5)
    lens = torch.randint(sq, length + 1, (b,), generator=g, dtype=torch.int32)
    lens[0] = length  # one full row
    lens = lens.to(backend.device)
    _decode_and_check(q, k, v, lens)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_splits_masks_padding(backend: Backend, num_splits):
    b, hq, hkv, sq, length, d = 3, 8, 2, 2, 90, 32
    q, k, v = qkv(b, hq, hkv, sq, length, d, torch.float32, backend.device, seed=23)
    lens = torch.tensor([90, 2, 41], dtype=torch.int32, device=backend.device)
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[2, :10] = False  # left padding of row 2
    pad = pad.to(backend.device)
    # Group 0 (heads 0-3) partly pruned, group 1 (heads 4-7) pruned whole in row 1.
    mask = torch.tensor(
        [[1, 0, 1, 1, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]],
        dtype=torch.bool,
        device=backend.device,
    )
    out = _decode_and_check(q, k, v, lens, head_mask=mask, attn_mask=pad, num_splits=num_splits)
    assert torch.equal(out.cpu()[~mask.cpu()], torch.zeros_like(out.cpu()[~mask.cpu()]))
    _decode_and_check(q, k, v, lens, window=7, num_splits=num_splits)


def test_decode_zero_length_rows(backend: Backend):
    q, k, v = qkv(2, 2, 1, 1, 16, 16, torch.float32, backend.device, seed=29)
    lens = torch.tensor([0, 16], dtype=torch.int32, device=backend.device)
    out = _decode_and_check(q, k, v, lens)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))


def test_decode_equals_prefill_last_rows(backend: Backend):
    """The last query of a causal prefill equals a one-token decode over the same keys."""
    q, k, v = qkv(2, 4, 2, 30, 30, 64, torch.float32, backend.device, seed=31)
    full = sk.ops.attention(q, k, v, causal=True)
    lens = torch.full((2,), 30, dtype=torch.int32, device=backend.device)
    last = sk.ops.decode_attention(q[:, :, -1:], k, v, lens)
    assert rel_error(last, full[:, :, -1:].cpu()) <= 2e-5


# ------------------------------------------------------------------------------ compressed


def _filled_cache(b, hkv, cap, d, fmt, groups, dtype, device, lens, wrap, seed):
    """A cache holding lens[b] positions (the last `cap` of them when wrapping)."""
    cache, scales = poisoned_cache(b, hkv, cap, d, fmt, groups, dtype, device)
    longest = max(max(lens), 1)
    x = randn((b, hkv, longest, d), dtype, device, seed=seed)
    for bi, n in enumerate(lens):
        if n == 0:
            continue
        first = max(0, n - cap) if wrap else 0
        seg = x[bi : bi + 1, :, first:n]
        st = torch.tensor([first], dtype=torch.int32, device=device)
        sk.ops.kv_append(
            seg,
            cache[bi : bi + 1],
            st,
            fmt,
            scales[bi : bi + 1] if scales is not None else None,
            wrap,
        )
    return cache, scales, x


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, D, L, lens, groups, recent, wrap, window)
    (1, 1, 1, 1, 64, 16, [9], 1, 0, False, 0),
    (2, 6, 2, 1, 7, 40, [0, 37], 1, 0, False, 0),
    (3, 4, 1, 5, 32, 24, [24, 6, 13], 2, 0, False, 0),
    (2, 3, 3, 1, 64, 20, [20, 11], 1, 4, False, 0),  # full-precision recent ring
    (2, 4, 2, 3, 16, 12, [30, 7], 1, 0, True, 0),  # ring cache, lens > L
    (1, 6, 2, 2, 24, 16, [45], 2, 5, True, 10),  # ring + recent + window
    (1, 8, 2, 33, 16, 40, [40], 1, 0, False, 0),  # a 33-token chunk over the cache
]


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize(
    "case",
    DECODE_CASES,
    ids=lambda c: "B{}H{}x{}Sq{}D{}L{}-{}-G{}-W{}-wrap{}-win{}".format(*c),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_over_cache_matches_fp64(backend: Backend, fmt, case, dtype):
    skip_interpreted_bf16(backend, dtype)
    b, hq, hkv, sq, d, cap, lens, groups, w, wrap, window = case
    if fmt == "dense":
        groups = 1
    dev = backend.device
    k, ks, kx = _filled_cache(b, hkv, cap, d, fmt, groups, dtype, dev, lens, wrap, seed=1)
    v, vs, vx = _filled_cache(b, hkv, cap, d, fmt, groups, dtype, dev, lens, wrap, seed=2)
    kr = vr = None
    if w:
        # The ring holds positions j in slot j % w; fill it from the same source vectors.
        kr = torch.full((b, hkv, w, d), float("nan"), dtype=dtype, device=dev)
        vr = kr.clone()
        for bi, n in enumerate(lens):
            for j in range(max(0, n - w), n):
                kr[bi, :, j % w] = kx[bi, :, j]
                vr[bi, :, j % w] = vx[bi, :, j]
    q = randn((b, hq, sq, d), dtype, dev, seed=5)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    rings = dict(k_recent=kr, v_recent=vr, wrap=wrap)
    _decode_and_check(q, k, v, cl, kv_format=fmt, window=window, k_scale=ks, v_scale=vs, **rings)


@pytest.mark.parametrize("f16_codes", [True, False], ids=["f16-codes", "bf16-codes"])
@pytest.mark.parametrize("q_scale", [1e-6, 1.0, 1e5])
@pytest.mark.parametrize(
    "case",
    [c for c in DECODE_CASES if c[7] == 1 and not c[8]],
    ids=lambda c: "B{}H{}x{}Sq{}D{}L{}-{}-G{}-W{}-wrap{}-win{}".format(*c),
)
def test_decode_int8_bf16_codes_dotted_in_fp16(
    ref_triton_backend: Backend, monkeypatch, case, q_scale, f16_codes
):
    """The INT8 loop of a bf16 model with its codes dotted in fp16
    (kernels.decode_attention.INT8_LOOP["F16_CODES"], opt-in) and without, against the
    fp64 oracle; queries scaled far below and above fp16's range, which the per-row
    normalisation must absorb. (Its dots are fp16, so this bf16 case runs on the
    interpreter too; the bf16 dots of the other route do not.)"""
    from sentinel_kernels.kernels import decode_attention as kda

    if ref_triton_backend.name != "triton":
        pytest.skip("a Triton loop variant")
    if not f16_codes:
        skip_interpreted_bf16(ref_triton_backend, torch.bfloat16)
    monkeypatch.setitem(kda.INT8_LOOP, "F16_CODES", f16_codes)
    b, hq, hkv, sq, d, cap, lens, _, _, wrap, window = case
    dev, dt = ref_triton_backend.device, torch.bfloat16
    k, ks, _ = _filled_cache(b, hkv, cap, d, "int8", 1, dt, dev, lens, wrap, seed=91)
    v, vs, _ = _filled_cache(b, hkv, cap, d, "int8", 1, dt, dev, lens, wrap, seed=92)
    q = (randn((b, hq, sq, d), torch.float32, dev, seed=93) * q_scale).to(dt)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    kw = dict(kv_format="int8", window=window, k_scale=ks, v_scale=vs, wrap=wrap)
    _decode_and_check(q, k, v, cl, **kw)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_masks_and_splits(backend: Backend, fmt):
    dev = backend.device
    b, hq, hkv, d, cap = 2, 6, 2, 16, 64
    lens = [50, 23]
    k, ks, _ = _filled_cache(b, hkv, cap, d, fmt, 1, torch.float32, dev, lens, False, seed=3)
    v, vs, _ = _filled_cache(b, hkv, cap, d, fmt, 1, torch.float32, dev, lens, False, seed=4)
    q = randn((b, hq, 2, d), torch.float32, dev, seed=6)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    head_mask = torch.tensor(
        [[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool, device=dev
    )  # row 0: group 1 pruned entirely
    key_mask = torch.ones(b, cap, dtype=torch.int8, device=dev)
    key_mask[0, :5] = 0
    key_mask[1, 10:12] = 0
    for splits in (None, 1, 3):
        kw = dict(head_mask=head_mask, kv_format=fmt, attn_mask=key_mask, k_scale=ks, v_scale=vs)
        out = _decode_and_check(q, k, v, cl, num_splits=splits, **kw)
        pruned = ~head_mask.cpu()
        assert torch.equal(out.cpu()[pruned], torch.zeros_like(out.cpu()[pruned]))


# ------------------------------------------------------------------------------ errors


def test_bad_dense_inputs(backend: Backend):
    dev = backend.device
    q, k, v = qkv(2, 4, 2, 5, 5, 16, torch.float32, dev)
    lens = torch.full((2,), 5, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="1 to 64 query tokens"):
        sk.ops.decode_attention(torch.randn(2, 4, 65, 16, device=dev), k, v, lens)
    with pytest.raises(ValueError, match="kv_format"):
        sk.ops.decode_attention(q[:, :, :1], k, v, lens, kv_format="int3")
    with pytest.raises(TypeError, match="cache_lens has dtype float32"):
        sk.ops.decode_attention(q[:, :, :1], k, v, lens.float())
    with pytest.raises(ValueError, match="cache_lens shape"):
        sk.ops.decode_attention(q[:, :, :1], k, v, lens[:1])
    with pytest.raises(ValueError, match="num_splits"):
        sk.ops.decode_attention(q[:, :, :1], k, v, lens, num_splits=0)


def test_bad_compressed_inputs(backend: Backend):
    dev = backend.device
    q = randn((1, 2, 1, 8), torch.float32, dev, seed=1)
    lens = torch.tensor([3], dtype=torch.int32, device=dev)
    k8 = torch.zeros(1, 1, 4, 8, dtype=torch.int8, device=dev)
    s8 = torch.ones(1, 1, 4, 1, dtype=torch.float16, device=dev)
    int8 = dict(kv_format="int8", k_scale=s8, v_scale=s8)
    with pytest.raises(ValueError, match="needs k_scale"):
        sk.ops.decode_attention(q, k8, k8, lens, kv_format="int8")
    with pytest.raises(TypeError, match="k_cache has dtype"):
        sk.ops.decode_attention(q, k8.float(), k8.float(), lens, **int8)
    with pytest.raises(TypeError, match="k_scale has dtype"):
        sk.ops.decode_attention(q, k8, k8, lens, **{**int8, "k_scale": s8.float()})
    with pytest.raises(ValueError, match="cannot be cut into 5 groups"):
        s3 = torch.ones(1, 1, 4, 5, dtype=torch.float16, device=dev)
        sk.ops.decode_attention(q, k8, k8, lens, kv_format="int8", k_scale=s3, v_scale=s3)
    k4 = torch.zeros(1, 1, 4, 8, dtype=torch.uint8, device=dev)
    s4 = s8[..., None].expand(1, 1, 4, 1, 2).contiguous()
    with pytest.raises(ValueError, match=r"\[batch=1, kv_heads, L, 4\]"):
        sk.ops.decode_attention(q, k4, k4, lens, kv_format="int4", k_scale=s4, v_scale=s4)
    with pytest.raises(ValueError, match="both k_recent and v_recent"):
        sk.ops.decode_attention(q, k8, k8, lens, **int8, k_recent=q.new_zeros(1, 1, 2, 8))
    with pytest.raises(ValueError, match="only for int8/int4"):
        sk.ops.decode_attention(q, q[:, :1], q[:, :1], lens, k_scale=s8)


def test_opcheck(backend: Backend):
    dev = backend.device
    q, k, v = qkv(2, 4, 2, 5, 9, 16, torch.float32, dev)
    lens = torch.tensor([9, 6], dtype=torch.int32, device=dev)
    hm = torch.tensor([1, 0, 1, 1], dtype=torch.bool, device=dev)
    args = op_args(sk.ops.decode_attention, q[:, :, :2], k, v, lens, hm, scale=0.25)
    torch.library.opcheck(torch.ops.sentinel.decode_attention.default, args)


def test_opcheck_compressed():
    cache = torch.zeros(1, 2, 6, 8, dtype=torch.int8)
    scales = torch.zeros(1, 2, 6, 1, dtype=torch.float16)
    q = randn((1, 4, 1, 8), torch.float32, "cpu", seed=2)
    lens = torch.tensor([4], dtype=torch.int32)
    kw = dict(kv_format="int8", k_scale=scales, v_scale=scales)
    args = op_args(sk.ops.decode_attention, q, cache, cache, lens, **kw)
    torch.library.opcheck(torch.ops.sentinel.decode_attention.default, args)


# ------------------------------------------------------------------------------ GPU sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_decode_full_size(dtype):
    q, k, v = qkv(8, 32, 8, 1, 8192, 128, dtype, "cuda", seed=41)
    lens = torch.tensor(
        [8192, 1, 4000, 8191, 17, 5000, 8000, 100], dtype=torch.int32, device="cuda"
    )
    out = sk.ops.decode_attention(q, k, v, lens)
    assert rel_error(out, decode_oracle(q, k, v, lens)) <= attention_tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_split_kernel_every_autotune_candidate(fmt, dtype):
    """Each autotune candidate of the split kernel, forced in turn (the tuner checks only
    the one it picks, and the tests with SENTINEL_AUTOTUNE=0 only the first): GQA 32/8,
    D=128, uneven lengths over a few hundred keys, split and unsplit."""
    from sentinel_kernels.kernels import decode_attention as kda

    b, hq, hkv, d, cap = 2, 32, 8, 128, 700
    lens = [700, 389]
    dev = "cuda"
    k, ks, _ = _filled_cache(b, hkv, cap, d, fmt, 1, dtype, dev, lens, False, seed=61)
    v, vs, _ = _filled_cache(b, hkv, cap, d, fmt, 1, dtype, dev, lens, False, seed=62)
    q = randn((b, hq, 1, d), dtype, dev, seed=63)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    scales = {} if fmt == "dense" else dict(k_scale=ks, v_scale=vs)
    # The candidates as the launcher filters them for this tile (16 query rows, D=128):
    # what the tuner can pick.
    elem = q.element_size() if fmt == "dense" else 1
    for cand in kda._configs(d, 16, elem, fmt != "dense"):
        with kda.force_config(cand):
            for splits in (1, 5):
                _decode_and_check(q, k, v, cl, kv_format=fmt, num_splits=splits, **scales)


def test_force_config_is_the_launch_config(ref_triton_backend: Backend, monkeypatch):
    """``kernels.decode_attention.force_config``: the split kernel launches with the forced
    config (recorded at the launch), the answer stays right, and the normal choice is back
    after the block, also when the block raises; a config of other keys is refused."""
    from sentinel_kernels.kernels import decode_attention as kda

    if ref_triton_backend.name != "triton":
        pytest.skip("the config is the Triton kernel's")
    launched = record_launches(monkeypatch, kda, "_split_jit")
    monkeypatch.setattr(kda, "_AUTOTUNE", False)
    dev = ref_triton_backend.device
    q, k, v = qkv(2, 4, 2, 1, 100, 64, torch.float32, dev, seed=81)
    lens = torch.tensor([100, 37], dtype=torch.int32, device=dev)
    forced = kda._cfg(32, 2, 2)
    with kda.force_config(forced):
        _decode_and_check(q, k, v, lens, num_splits=1)
    assert launched and launched[-1]["BLOCK_N"] == 32 and launched[-1]["num_warps"] == 2
    assert launched[-1]["num_stages"] == 2
    with pytest.raises(RuntimeError, match="inside"), kda.force_config(forced):
        raise RuntimeError("inside")
    launched.clear()
    _decode_and_check(q, k, v, lens, num_splits=1)
    normal = kda._configs(64, 16, 4, False)[0]
    assert launched[-1]["BLOCK_N"] == normal.kwargs["BLOCK_N"]
    assert kda._FORCED == {"split": None, "kivi": None}
    with pytest.raises(ValueError, match="BLOCK_N"):
        with kda.force_config(kda.triton.Config({"BLOCK_M": 16})):
            pass


@pytest.mark.parametrize("bad", [0, -3, True, 1.5, "511"])
def test_decode_split_scope_rejects_bad_max_keys(bad):
    with pytest.raises(ValueError, match="max_keys must be an int >= 1"):
        sk.ops.decode_split_scope(bad)


def test_decode_split_scope_takes_none_and_positive_ints():
    for keys in (None, 1, 511):
        with sk.ops.decode_split_scope(keys):
            pass

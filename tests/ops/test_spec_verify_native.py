"""Tests for ``sentinel_kernels._C.speculative_verify`` / ``philox_fill`` called directly:
argument checks (sizes, strides, pointers, modes), the random numbers, thread-count
independence and agreement with the reference on raw pointers."""

from __future__ import annotations

import pytest
import torch

_C = pytest.importorskip("sentinel_kernels._C")
from sentinel_kernels.reference import spec_verify as ref  # noqa: E402


def _call(
    target,
    drafts,
    *,
    probs=None,
    logits=None,
    thr=None,
    thr_q=None,
    greedy=False,
    temperature=0.8,
    rng=None,
    advance_rng=True,
    threads=2,
    out=None,
    **override,
):
    b, k1, v = target.shape
    q = logits if logits is not None else probs
    n = torch.full((b,), -7, dtype=torch.int64) if out is None else out[0]
    tok = torch.full((b, k1), -7, dtype=torch.int64) if out is None else out[1]
    args = dict(
        target_ptr=target.data_ptr(),
        target_dtype=str(target.dtype).removeprefix("torch."),
        B=b,
        K=k1 - 1,
        V=v,
        target_strides=list(target.stride()),
        draft_ptr=drafts.data_ptr(),
        draft_int32=drafts.dtype == torch.int32,
        draft_stride_b=drafts.stride(0),
        draft_stride_k=drafts.stride(1),
        draft_probs_ptr=probs.data_ptr() if probs is not None else 0,
        draft_logits_ptr=logits.data_ptr() if logits is not None else 0,
        q_dtype=str(q.dtype).removeprefix("torch.") if q is not None else "float32",
        q_strides=list(q.stride()) if q is not None else [0, 0, 0],
        thr_ptr=thr.data_ptr() if thr is not None else 0,
        thr_q_ptr=thr_q.data_ptr() if thr_q is not None else 0,
        greedy=greedy,
        inv_t=ref.inv_temperature(temperature) if temperature > 0 else 1.0,
        rng_ptr=rng.data_ptr() if rng is not None else 0,
        advance_rng=advance_rng,
        num_accepted_ptr=n.data_ptr(),
        tokens_ptr=tok.data_ptr(),
        tokens_stride_b=k1,
        num_threads=threads,
    )
    args.update(override)
    _C.speculative_verify(**args)
    return n, tok


def _problem(b=5, k=3, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, k + 1, v, generator=g) * 2
    dl = target[:, :k] + torch.randn(b, k, v, generator=g)
    q = torch.softmax(dl, -1)
    drafts = torch.multinomial(q.reshape(-1, v), 1, generator=g).reshape(b, k)
    return target, drafts, q, dl


def test_philox_fill_matches_reference():
    out = torch.empty(100, dtype=torch.int64)
    for seed, offset in [(0, 0), (12345, 7), (-3, 2**32 - 5), (2**40 + 17, 2**33 + 1)]:
        _C.philox_fill(seed, offset, 100, out.data_ptr())
        expect = ref.philox_uint32(torch.tensor(seed), offset + torch.arange(100))
        assert torch.equal(out, expect), (seed, offset)
    _C.philox_fill(0, 0, 1, out.data_ptr())
    assert int(out[0]) == 0x6627E8D5  # Random123 known answer (counter 0, key 0)
    with pytest.raises(ValueError, match="count must be >= 0"):
        _C.philox_fill(0, 0, -1, out.data_ptr())
    with pytest.raises(ValueError, match="out_ptr is a null pointer"):
        _C.philox_fill(0, 0, 3, 0)


@pytest.mark.parametrize("mode", ["greedy", "probs", "logits", "logits-filtered"])
def test_matches_reference(mode):
    target, drafts, q, dl = _problem()
    kw: dict = {}
    ref_kw: dict = {}
    if mode == "greedy":
        kw, temp = {"greedy": True}, 0.0
    elif mode == "probs":
        kw, temp = {"probs": q}, 0.8
        ref_kw = {}
    else:
        temp = 0.8
        kw = {"logits": dl}
        ref_kw = {"draft_logits": dl}
        if mode == "logits-filtered":
            inv = torch.tensor(ref.inv_temperature(temp))
            kw["thr"] = ref.filter_thresholds(target * inv, 10, 0.9).contiguous()
            kw["thr_q"] = ref.filter_thresholds(dl * inv, 10, 0.9).contiguous()
            ref_kw.update(top_k=10, top_p=0.9)
    rng = torch.tensor([11, 3])
    n, tok = _call(target, drafts, rng=rng, temperature=temp, **kw)
    n_ref, tok_ref = ref.speculative_verify(
        drafts,
        q if mode == "probs" else None,
        target,
        temp,
        rng=torch.tensor([11, 3]),
        **ref_kw,
    )
    assert torch.equal(n, n_ref) and torch.equal(tok, tok_ref)
    b, k1, v = target.shape
    assert rng.tolist() == ([11, 3] if mode == "greedy" else [11, 3 + b * (k1 - 1 + v)])


def test_threads_and_strides_do_not_change_results():
    target, drafts, q, _ = _problem(b=9, k=4, v=300, seed=1)
    base = _call(target, drafts, probs=q, rng=torch.tensor([5, 0]), threads=1)
    for threads in (2, 3):
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                base,
                _call(target, drafts, probs=q, rng=torch.tensor([5, 0]), threads=threads),
                strict=True,
            )
        )
    # strided copies of every input, fp16 / bf16 q and int32 drafts
    t_wide = torch.zeros(9, 6, 600)
    t_wide[:, 1:6, ::2] = target
    t_s = t_wide[:, 1:6, ::2]
    d_s = torch.zeros(9, 8, dtype=torch.int32)
    d_s[:, ::2] = drafts.int()
    d_s = d_s[:, ::2]
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    got = _call(t_s, d_s, probs=q_t, rng=torch.tensor([5, 0]))
    assert all(torch.equal(a, b) for a, b in zip(base, got, strict=True))
    got16 = _call(target.half(), drafts, probs=q.bfloat16(), rng=torch.tensor([5, 0]))
    expect16 = ref.speculative_verify(
        drafts, q.bfloat16(), target.half(), 0.8, rng=torch.tensor([5, 0])
    )
    assert torch.equal(got16[0], expect16[0]) and torch.equal(got16[1], expect16[1])


def test_advance_rng_off():
    target, drafts, q, _ = _problem()
    rng = torch.tensor([1, 2])
    _call(target, drafts, probs=q, rng=rng, advance_rng=False)
    assert rng.tolist() == [1, 2]


def test_argument_checks():
    target, drafts, q, dl = _problem()
    rng = torch.tensor([1, 0])
    cases = [
        ({"B": -1}, "B must be >= 0"),
        ({"K": -1}, "K must be >= 0"),
        ({"V": 0}, "V must be >= 1"),
        ({"num_threads": 0}, "num_threads must be >= 1"),
        ({"target_strides": [1, 2]}, "target_strides must have 3 entries"),
        ({"q_strides": [1, 2, 3, 4]}, "q_strides must have 3 entries"),
        ({"target_strides": [-1, 97, 1]}, "target_strides must be >= 0"),
        ({"draft_stride_k": -1}, "draft_stride_k must be >= 0"),
        ({"tokens_stride_b": 3}, "tokens_stride_b must be >= 4"),
        ({"target_ptr": 0}, "target_ptr is a null pointer"),
        ({"tokens_ptr": 0}, "tokens_ptr is a null pointer"),
        ({"num_accepted_ptr": 0}, "num_accepted_ptr is a null pointer"),
        ({"draft_ptr": 0}, "draft_ptr is a null pointer"),
        ({"rng_ptr": 0}, "rng_ptr is a null pointer"),
        ({"draft_logits_ptr": dl.data_ptr()}, "not both"),
        ({"draft_probs_ptr": 0}, "needs draft_probs or draft_logits"),
        ({"inv_t": 0.0}, "inv_t must be finite and > 0"),
        ({"inv_t": float("inf")}, "inv_t must be finite and > 0"),
        ({"thr_q_ptr": q.data_ptr()}, "thr_q is only used with draft_logits"),
        ({"target_dtype": "float64"}, "unsupported dtype 'float64'"),
        ({"q_dtype": "int8"}, "unsupported dtype 'int8'"),
    ]
    for override, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _call(target, drafts, probs=q, rng=rng, **override)
    assert rng.tolist() == [1, 0]  # nothing ran
    # greedy needs neither q nor rng; B = 0 needs no pointers at all
    _call(target, drafts, greedy=True, temperature=0.0, rng=None)
    _call(
        target,
        drafts,
        probs=q,
        rng=rng,
        B=0,
        target_ptr=0,
        tokens_ptr=0,
        num_accepted_ptr=0,
        draft_ptr=0,
    )


def test_outputs_fully_written():
    target, drafts, q, _ = _problem(b=7, k=5, v=50, seed=3)
    for greedy in (True, False):
        n, tok = _call(
            target,
            drafts,
            probs=q,
            greedy=greedy,
            temperature=0.0 if greedy else 1.0,
            rng=torch.tensor([2, 0]),
        )
        assert (n != -7).all() and (tok != -7).all()
        pos = torch.arange(6).expand(7, 6)
        assert ((tok == -1) == (pos > n[:, None])).all()

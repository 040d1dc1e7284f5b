"""ops.greedy_advance on every backend against the reference's torch ops: the token of
each row and the decode state it updates (output column, next token, position, finished
rows), over odd shapes, dtypes, ties, strided logits and repeated calls (the CUDA kernel's
arrival counter must re-arm), plus clear errors on bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import Backend

import sentinel_kernels as sk
from sentinel_kernels.reference import spec_verify as ref

SHAPES = [(1, 1), (1, 7), (3, 127), (7, 1000), (2, 4099), (5, 49152)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _state(b: int, t: int, device, track: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = torch.full((b, t), -77, dtype=torch.int64)  # poisoned
    col = torch.tensor([2])
    tok = torch.full((b, 1), -5, dtype=torch.int64)
    pos = torch.randint(0, 1000, (b, 1), generator=g)
    st = dict(out=out, col=col, tok=tok, pos=pos)
    if track:
        st["finished"] = torch.rand(b, generator=g) < 0.3
        st["eos"] = torch.tensor([3, 5])
        st["pad"] = torch.tensor([9])
    return {k: v.to(device) for k, v in st.items()}


def _call(logits, st, arrive=None):
    sk.ops.greedy_advance(
        logits,
        st["out"],
        st["col"],
        st["tok"],
        st["pos"],
        arrive=arrive,
        finished=st.get("finished"),
        eos=st.get("eos"),
        pad=st.get("pad"),
    )


def _expected(logits_seq, st):
    st = {k: v.cpu().clone() for k, v in st.items()}
    for lg in logits_seq:
        ref.greedy_advance(
            lg.cpu().double(),
            st["out"],
            st["col"],
            st["tok"],
            st["pos"],
            st.get("finished"),
            st.get("eos"),
            st.get("pad"),
        )
    return st


@pytest.mark.parametrize("track", [False, True], ids=["plain", "eos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("b,v", SHAPES, ids=lambda x: str(x))
def test_greedy_advance_matches_reference(backend: Backend, b, v, dtype, track):
    if backend.interpreted and v > 5000 and dtype != torch.float32:
        pytest.skip("the interpreter is slow: one long row per dtype is enough (float32)")
    dev = backend.device
    g = torch.Generator().manual_seed(b * 1000 + v)
    steps = 3
    # strided logits: the last position of [B, 2, V], as a decode step's logits[:, -1]
    full = (torch.randn(steps, b, 2, v, generator=g) * 3).to(dtype)
    if v > 3:  # a tie between two maxima in row 0 of the first step: the lower index wins
        full[0, 0, 1, 1] = full[0, 0, 1, v - 2] = full[0, 0, 1].float().max() + 1
    if track and v > 5:  # row 0 of step 1 ends on an EOS id
        full[1, 0, 1, 5] = full[1, 0, 1].float().max() + 1
    full = full.to(dev)  # moved first: a strided slice's .to(cuda) would be packed
    logits = [full[i, :, 1] for i in range(steps)]
    assert logits[0].stride(0) == 2 * v  # rows 2V apart: not a packed [B, V]
    st = _state(b, 8, dev, track, seed=v)
    arrive = torch.zeros(1, dtype=torch.int32, device=dev)
    want = _expected(logits, st)
    for lg in logits:
        _call(lg, st, arrive)
    for k, w in want.items():
        assert torch.equal(st[k].cpu(), w), k
    assert int(arrive.item()) == 0  # re-armed for the next launch


def test_greedy_advance_all_rows_finished(backend: Backend):
    dev = backend.device
    st = _state(3, 4, dev, True, seed=1)
    st["finished"].fill_(True)
    _call(torch.randn(3, 50).to(dev), st)
    assert st["out"][:, 2].tolist() == [9, 9, 9]
    assert st["tok"][:, 0].tolist() == [9, 9, 9]


@pytest.mark.parametrize(
    "change,err",
    [
        (dict(logits=torch.randn(3)), ValueError),
        (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), TypeError),
        (dict(out=torch.zeros(2, 4, dtype=torch.int32)), TypeError),
        (dict(out=torch.zeros(3, 4, dtype=torch.int64)), ValueError),
        (dict(out=torch.zeros(4, 2, dtype=torch.int64).t()), ValueError),
        (dict(col=torch.zeros(2, dtype=torch.int64)), ValueError),
        (dict(tok=torch.zeros(2, dtype=torch.int64)), ValueError),
        (dict(pos=torch.zeros(2, 1, dtype=torch.int32)), TypeError),
        (dict(finished=torch.zeros(2, dtype=torch.bool)), ValueError),  # no eos / pad
        (dict(arrive=torch.zeros(1, dtype=torch.int64)), TypeError),
    ],
)
def test_greedy_advance_rejects_bad_arguments(change, err):
    args = dict(
        logits=torch.randn(2, 5),
        out=torch.zeros(2, 4, dtype=torch.int64),
        col=torch.zeros(1, dtype=torch.int64),
        tok=torch.zeros(2, 1, dtype=torch.int64),
        pos=torch.zeros(2, 1, dtype=torch.int64),
    )
    args.update(change)
    kw = {k: args.pop(k) for k in ("arrive", "finished", "eos", "pad") if k in args}
    with pytest.raises(err, match="greedy_advance"):
        sk.ops.greedy_advance(**args, **kw)

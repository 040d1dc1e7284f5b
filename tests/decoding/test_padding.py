"""``sk.generate`` with right padding (rolled to left padding), bad masks, the real tokenizer."""

from __future__ import annotations

import pytest
import torch
from helpers import ByteTokenizer, smollm2_missing, tiny_model

import sentinel_kernels as sk

EOS, PAD = 2, 0
#: what the right-padded batches hold under their pads: masked, so it must not matter
JUNK = 99
TEXTS = ["Hello, my name is", "The cat", "A longer prompt about lobsters and the sea", "Hi"]
NEW = 12


def _model(arch: str = "llama", level: int = 1, layers: int = 2):
    return tiny_model(arch, level, num_hidden_layers=layers)


def _draft_model():
    return tiny_model("llama", seed=7, num_hidden_layers=1)


def _rows() -> list[list[int]]:
    tok = ByteTokenizer()
    return [tok(t)["input_ids"] for t in TEXTS]


def _batch(rows: list[list[int]], side: str, fill: int = PAD, extra_left: int = 0):
    """``rows`` padded to one length on ``side`` ("left", "right"); ``extra_left`` more
    pads before every row (a right-padded batch with pads on both sides)."""
    width = max(map(len, rows)) + extra_left
    ids = torch.full((len(rows), width), fill, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        start = width - len(row) if side == "left" else extra_left
        ids[r, start : start + len(row)] = torch.tensor(row)
        mask[r, start : start + len(row)] = 1
    return ids, mask


def _gen(model, ids, mask=None, **kw):
    kw.setdefault("eos_token_id", [])
    return sk.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, **kw)


def _check_right_equals_left_and_alone(model, **kw):
    rows = _rows()
    left_ids, left_mask = _batch(rows, "left")
    right_ids, right_mask = _batch(rows, "right", fill=JUNK)
    width = left_ids.shape[1]
    caller = right_ids.clone()
    left = _gen(model, left_ids, left_mask, **kw)
    right = _gen(model, right_ids, right_mask, **kw)
    assert torch.equal(right_ids, caller), "the caller's input_ids were modified"
    assert right.shape == left.shape
    # the caller's prompt, unchanged, followed by the new tokens (as for left padding)
    assert torch.equal(right[:, :width], right_ids)
    assert torch.equal(right[:, width:], left[:, width:])
    for r, row in enumerate(rows):
        alone = _gen(model, torch.tensor([row]), **kw)
        assert torch.equal(right[r, width:], alone[0, len(row) :]), (r, TEXTS[r])
    return right, left


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_right_padding_equals_left_padding_and_each_prompt_alone(arch, level):
    _check_right_equals_left_and_alone(_model(arch, level))


def test_right_padding_with_eos_trims_like_left_padding():
    model = _model()
    rows = _rows()
    free = _gen(model, *_batch(rows, "left"))
    width = free.shape[1] - NEW
    # an EOS that some row emits: rows stop, are padded after it, the batch is trimmed
    eos = int(free[0, width + 3])
    left = _gen(model, *_batch(rows, "left"), eos_token_id=eos)
    right = _gen(model, *_batch(rows, "right", fill=JUNK), eos_token_id=eos)
    assert torch.equal(right[:, width:], left[:, width:])


def test_pads_on_both_sides_are_rolled_too():
    model = _model()
    rows = _rows()
    ids, mask = _batch(rows, "right", fill=JUNK, extra_left=3)
    left = _gen(model, *_batch(rows, "left"))
    out = _gen(model, ids, mask)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(out[:, ids.shape[1] :], left[:, -NEW:])


@pytest.mark.filterwarnings("ignore:sk.kv_cache switched")  # the unpatched draft model
@pytest.mark.parametrize("drafter", ["ngram", "early_exit:1", "model"])
def test_speculative_right_padding_equals_left_padding_and_alone(drafter):
    model = _model(layers=4)
    draft = _draft_model() if drafter == "model" else drafter
    right, _ = _check_right_equals_left_and_alone(model, draft=draft, num_draft_tokens=3)
    plain = _gen(model, *_batch(_rows(), "right", fill=JUNK))
    assert torch.equal(right, plain)


def test_right_padded_streamer_gets_the_callers_prompt():
    class Recorder:
        def __init__(self):
            self.got: list[torch.Tensor] = []

        def put(self, t):
            self.got.append(t)

        def end(self):
            pass

    model = _model()
    row = _rows()[0]
    ids = torch.tensor([row + [JUNK] * 4])
    mask = torch.tensor([[1] * len(row) + [0] * 4])
    for kw in ({}, {"draft": "ngram"}):
        rec = Recorder()
        out = _gen(model, ids, mask, streamer=rec, **kw)
        assert torch.equal(rec.got[0], ids)
        assert torch.equal(torch.cat([t.reshape(-1) for t in rec.got[1:]]), out[0, ids.shape[1] :])
        alone = _gen(model, torch.tensor([row]))
        assert torch.equal(out[0, ids.shape[1] :], alone[0, len(row) :])


@pytest.mark.parametrize("draft", [None, "ngram", "early_exit:1"])
def test_mask_with_a_hole_or_an_empty_row_is_refused(draft):
    model = _model(layers=4)
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    hole = torch.ones_like(ids)
    hole[1] = torch.tensor([1, 1, 0, 1, 1, 0])  # zeros between ones (and a trailing pad)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have zeros between ones"):
        _gen(model, ids, hole, draft=draft)
    hole[1] = torch.tensor([0, 1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="zeros between ones"):
        _gen(model, ids, hole, draft=draft)
    empty = torch.ones_like(ids)
    empty[2] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] are all zeros"):
        _gen(model, ids, empty, draft=draft)
    with pytest.raises(ValueError, match="all zeros"):
        _gen(model, ids[:1], torch.zeros_like(ids[:1]), draft=draft)


def test_bool_mask_and_one_dimensional_inputs():
    model = _model()
    row = _rows()[1]
    ids = torch.tensor(row + [JUNK, JUNK])
    mask = torch.tensor([True] * len(row) + [False, False])
    out = _gen(model, ids, mask)
    alone = _gen(model, torch.tensor([row]))
    assert torch.equal(out[0, : ids.shape[0]], ids)
    assert torch.equal(out[0, ids.shape[0] :], alone[0, len(row) :])


@pytest.mark.model
@pytest.mark.skipif(smollm2_missing() is not None, reason=str(smollm2_missing()))
def test_smollm2_right_padded_batch_equals_each_prompt_alone():
    model, tok = sk.models.load_smollm2()
    assert tok.padding_side == "left"
    prompts = ["Hello, my name is", "The capital of France is a city that"]
    new = 8
    alone = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        alone.append(sk.generate(model, ids, max_new_tokens=new, eos_token_id=[])[0, -new:])
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(prompts, return_tensors="pt", padding=True)
        assert enc["attention_mask"][0, 0 if side == "left" else -1] == 0
        out = sk.generate(
            model,
            enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=new,
            eos_token_id=[],
        )
        assert torch.equal(out[:, : enc["input_ids"].shape[1]], enc["input_ids"])
        for r in range(len(prompts)):
            assert torch.equal(out[r, -new:], alone[r]), (
                side,
                prompts[r],
                tok.decode(out[r, -new:]),
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:sk.kv_cache switched")
@pytest.mark.parametrize("draft", [None, "ngram", "early_exit:1"])
def test_cuda_graph_right_padding_equals_left_padding(draft):
    model = _model(layers=4).to("cuda")
    rows = _rows()
    left_ids, left_mask = (t.cuda() for t in _batch(rows, "left"))
    right_ids, right_mask = (t.cuda() for t in _batch(rows, "right", fill=JUNK))
    width = left_ids.shape[1]
    left = _gen(model, left_ids, left_mask, draft=draft)
    for _ in range(2):  # the second call replays the captured graphs
        right = _gen(model, right_ids, right_mask, draft=draft)
        assert torch.equal(right[:, :width], right_ids)
        assert torch.equal(right[:, width:], left[:, width:])
    for r, row in enumerate(rows):
        alone = _gen(model, torch.tensor([row], device="cuda"), draft=draft)
        assert torch.equal(right[r, width:], alone[0, len(row) :]), (r, TEXTS[r])

"""Rotary cos/sin by table lookup (``nn.rotary_table``, installed by ``fused_layers``)."""

from __future__ import annotations

import contextlib
import threading
import warnings

import pytest
import torch
from helpers import assert_same_bits

import sentinel_kernels as sk
from sentinel_kernels.nn.rotary_table import (
    RotaryTable,
    rotary_table_factory,
    rotary_table_scope,
    table_limit,
)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _tiny(arch: str, **kw):
    torch.manual_seed(0)
    return sk.models.tiny(arch, **kw).eval()


def _patch(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.patch_model(model, **kw)


def _rotary(model) -> RotaryTable:
    found = [m for m in model.modules() if isinstance(m, RotaryTable)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_table_gives_the_modules_bits(arch, dtype, device):
    """Inside the scope the gathered cos/sin equal the wrapped module's own, bit for bit,
    at random (ragged, unsorted) positions of several rows, odd lengths included."""
    model = _tiny(arch).to(device)
    _patch(model, level=1)
    rot = _rotary(model)
    g = torch.Generator().manual_seed(1)
    for b, t in [(1, 1), (3, 7), (2, 127), (1, 1000)]:
        pos = torch.randint(0, 5000, (b, t), generator=g).to(device)
        x = torch.randn(b, t, 8, generator=g).to(device=device, dtype=dtype)
        want_cos, want_sin = rot.inner(x, pos)
        with rotary_table_scope(5000):
            cos, sin = rot(x, pos)
        assert cos.shape == want_cos.shape and cos.dtype == dtype
        assert_same_bits(cos, want_cos, "cos")
        assert_same_bits(sin, want_sin, "sin")
    # one table per dtype, 8192 long (the next power of two >= 5000)
    assert [len(v) for v in rot._tables.values()] == [1]
    assert next(iter(rot._tables.values()))[0].shape[0] == 8192


def test_outside_the_scope_the_module_runs_its_own_forward():
    model = _tiny("llama")
    _patch(model, level=1)
    rot = _rotary(model)
    calls = []
    rot.inner.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 3, 8)
    pos = torch.arange(3)[None]
    rot(x, pos)
    assert len(calls) == 1 and not rot._tables
    with rotary_table_scope(16):
        rot(x, pos)  # builds the table (one call of the module), then gathers
        rot(x, pos)
    assert len(calls) == 2
    with rotary_table_scope(16):
        rot(x, pos.to(torch.float32))  # not integer positions: the module's own forward
        # 1-D positions: handed to the module too (transformers 5.17's form refuses them)
        with contextlib.suppress(Exception):
            rot(x, pos[0])
    assert len(calls) == 4


def test_the_table_is_built_from_rows_of_one_position():
    """The table comes from one call of the module on ``n`` rows of one position each,
    the shape of a decode step's positions (so a matmul form multiplies each frequency by
    its position as in decoding, not inside one long GEMM)."""
    model = _tiny("llama")
    _patch(model, level=1)
    rot = _rotary(model)
    shapes = []
    rot.inner.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[1].shape)))
    with rotary_table_scope(16):
        rot(torch.randn(2, 1, 8), torch.tensor([[3], [15]]))
    assert shapes == [(4096, 1)]


def test_a_longer_scope_adds_a_table_and_keeps_the_old_one():
    model = _tiny("llama")
    _patch(model, level=1)
    rot = _rotary(model)
    x = torch.randn(1, 1, 8)
    with rotary_table_scope(100):
        rot(x, torch.tensor([[99]]))
    first = rot._tables[(x.device, x.dtype)][0]
    with rotary_table_scope(10_000):
        cos, _ = rot(x, torch.tensor([[9_999]]))
    tables = rot._tables[(x.device, x.dtype)]
    assert [t.shape[0] for t in tables] == [4096, 16384]
    assert tables[0] is first  # a graph that recorded it may still read it
    assert_same_bits(cos, rot.inner(x, torch.tensor([[9_999]]))[0], "cos")


def test_scope_is_per_thread_and_nests():
    seen = []
    with rotary_table_scope(64):
        with rotary_table_scope(8):
            assert table_limit() == 8
        assert table_limit() == 64
        t = threading.Thread(target=lambda: seen.append(table_limit()))
        t.start()
        t.join()
    assert seen == [0] and table_limit() == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8", None])
def test_scope_rejects_bad_bounds(bad):
    with pytest.raises(ValueError, match="max_positions"):
        with rotary_table_scope(bad):
            pass


def test_dynamic_rope_is_not_wrapped():
    model = _tiny("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    rot = model.model.rotary_emb
    assert "dynamic" in rot.rope_type
    assert rotary_table_factory(rot) is None
    _patch(model, level=1)
    assert not [m for m in model.modules() if isinstance(m, RotaryTable)]


def test_unpatch_restores_the_module():
    model = _tiny("llama")
    original = model.model.rotary_emb
    _patch(model, level=1)
    assert isinstance(model.model.rotary_emb, RotaryTable)
    sk.unpatch_model(model)
    assert model.model.rotary_emb is original


@pytest.mark.parametrize("level", [1, 2])
def test_generate_with_tables_equals_model_generate(level):
    """``sk.generate`` (inside the scope: tables) and the patched model's own
    ``generate`` (outside it: the module's forward) give the same greedy tokens."""
    model = _tiny("llama")
    _patch(model, level=level)
    ids = torch.randint(3, model.config.vocab_size, (2, 11))
    with torch.inference_mode():
        ref = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    got = sk.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, ref)
    assert _rotary(model)._tables  # the table was used

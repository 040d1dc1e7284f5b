"""``torch.compile`` (inductor, CPU) over the custom ops and over a patched model.

Every op is a ``torch.library.custom_op`` with a ``register_fake``: dynamo traces the fake
(shapes, dtypes) and inductor calls the op as an opaque extern kernel. These tests compile
with ``fullgraph=True`` so that a fake implementation that dynamo cannot trace, or that
returns the wrong shape or dtype, fails here rather than silently breaking the graph.

A backend wrapper records which ``sentinel::`` ops the traced graph holds before handing it
to inductor (``compile_fx``), so a test also proves that the compiled code really calls the
op (and not, e.g., a fallback path).

Tolerances: an op is opaque to inductor, so the compiled graph runs the same kernel on the
same input tensors as eager: its outputs are compared for equality. In a whole model,
inductor fuses and reorders the plain-PyTorch parts around the ops (RMSNorm, rotary,
residual adds), which changes fp32 rounding: the logits are compared by relative error
against the fp32 tolerance of the op tests (1e-5, ``helpers.REL_TOL``).
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import REL_TOL, randn, rel_error

import sentinel_kernels as sk
from sentinel_kernels import _backend, models
from sentinel_kernels.hf_compat import cache_kwargs, output_cache

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="inductor on CPU needs a C++ compiler",
)


class Recorder:
    """A ``torch.compile`` backend: records the ``sentinel::`` ops of each traced graph,
    then compiles the graph with inductor."""

    def __init__(self) -> None:
        self.ops: list[str] = []
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("sentinel."):
                self.ops.append(str(node.target))
        return compile_fx(gm, example_inputs)


def _compile(fn: Callable, fullgraph: bool = True, dynamic: bool | None = False):
    torch._dynamo.reset()
    rec = Recorder()
    return torch.compile(fn, backend=rec, fullgraph=fullgraph, dynamic=dynamic), rec


@pytest.fixture(params=["reference", "native"], ids=lambda n: f"cpu-{n}")
def cpu_ops(request):
    """The two CPU implementations behind the ops, outputs poisoned (NaN / -128)."""
    if request.param == "native" and not _backend.native_available():
        pytest.skip("sentinel_kernels._C not built")
    with _backend.use_backend(request.param), _backend.poisoned_outputs():
        yield request.param


# --------------------------------------------------------------------------------------
# each op under fullgraph=True
# --------------------------------------------------------------------------------------


def test_compile_quantize_dequantize(cpu_ops):
    x = randn((7, 33), torch.float32, "cpu", seed=1)

    def fn(x: torch.Tensor):
        q, s = sk.ops.quantize_int8(x * 3.0, dim=-1)
        return q, s, sk.ops.dequantize_int8(q, s, dim=-1, dtype=torch.float16)

    compiled, rec = _compile(fn)
    for got, want in zip(compiled(x), fn(x), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert set(rec.ops) == {"sentinel.quantize_int8.default", "sentinel.dequantize_int8.default"}


def test_compile_quantize_non_contiguous(cpu_ops):
    # dim=0 hands the op a permuted (column-major) view; dequantize gets a transposed q.
    x = randn((7, 33), torch.float32, "cpu", seed=12)

    def fn(x: torch.Tensor):
        q0, s0 = sk.ops.quantize_int8(x, dim=0)
        return q0, s0, sk.ops.dequantize_int8(q0, s0, dim=0, dtype=torch.float32)

    compiled, _ = _compile(fn)
    for got, want in zip(compiled(x), fn(x), strict=True):
        assert torch.equal(got, want)


def test_compile_int8_linear(cpu_ops):
    x = randn((2, 5, 40), torch.float32, "cpu", seed=2)
    w = randn((9, 40), torch.float32, "cpu", seed=3)
    w_q, w_s = sk.ops.quantize_int8(w, dim=-1)
    bias = randn((9,), torch.float32, "cpu", seed=4)
    smooth = torch.rand(40) + 0.5

    def fn(x: torch.Tensor):
        # around the ops: plain torch that inductor fuses (the inputs it hands the ops are
        # its own buffers, so strides come from the fake's declared outputs)
        a = sk.ops.int8_linear(x * 2.0, w_q, w_s, bias=bias)
        b = sk.ops.int8_linear_a8(x, w_q, w_s, smooth=smooth, bias=None)
        return torch.relu(a) + b

    compiled, rec = _compile(fn)
    got, want = compiled(x), fn(x)
    assert got.shape == (2, 5, 9)
    assert torch.equal(got, want)
    assert set(rec.ops) == {"sentinel.int8_linear.default", "sentinel.int8_linear_a8.default"}


def test_compile_attention(cpu_ops):
    # GQA 4/2 heads, odd lengths, a pruned head and left padding.
    q = randn((2, 4, 7, 16), torch.float32, "cpu", seed=5)
    k = randn((2, 2, 7, 16), torch.float32, "cpu", seed=6)
    v = randn((2, 2, 7, 16), torch.float32, "cpu", seed=7)
    head_mask = torch.tensor([True, False, True, True])
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :3] = False

    def fn(q, k, v):
        out = sk.ops.attention(q, k, v, causal=True, head_mask=head_mask, attn_mask=pad)
        return out.transpose(1, 2).reshape(2, 7, 64)

    compiled, rec = _compile(fn)
    got, want = compiled(q, k, v), fn(q, k, v)
    assert torch.equal(got, want)
    assert torch.isfinite(got).all()
    assert rec.ops == ["sentinel.attention.default"]


@pytest.mark.parametrize("kv_format", ["dense", "int8", "int4"])
def test_compile_kv_append_and_decode(cpu_ops, kv_format):
    b, hkv, hq, length, d = 2, 2, 4, 11, 16
    if kv_format == "dense":
        store = torch.zeros(b, hkv, length, d)
        scales = None
    elif kv_format == "int8":
        store = torch.zeros(b, hkv, length, d, dtype=torch.int8)
        scales = torch.zeros(b, hkv, length, 1, dtype=torch.float16)
    else:
        store = torch.zeros(b, hkv, length, d // 2, dtype=torch.uint8)
        scales = torch.zeros(b, hkv, length, 1, 2, dtype=torch.float16)
    keys = randn((b, hkv, 5, d), torch.float32, "cpu", seed=8)
    q = randn((b, hq, 1, d), torch.float32, "cpu", seed=9)

    def fn(keys, q, k_store, k_scales, lens):
        # a mutating op (kv_append writes the store and scales in place) then a read
        sk.ops.kv_append(keys, k_store, lens, kv_format, k_scales)
        new_lens = lens + keys.shape[2]
        out = sk.ops.decode_attention(
            q, k_store, k_store, new_lens, kv_format=kv_format, k_scale=k_scales, v_scale=k_scales
        )
        return out * 1.0

    compiled, rec = _compile(fn)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    eager_store = store.clone()
    eager_scales = None if scales is None else scales.clone()
    want = fn(keys, q, eager_store, eager_scales, lens)
    got = compiled(keys, q, store, scales, lens)
    assert torch.equal(store, eager_store)  # the in-place writes happened, identically
    if scales is not None:
        assert torch.equal(scales, eager_scales)
    assert torch.equal(got, want)
    assert sorted(set(rec.ops)) == [
        "sentinel.decode_attention.default",
        "sentinel.kv_append.default",
    ]


def test_compile_dynamic_shapes_trace_the_fakes_symbolically():
    # dynamic=True: the fakes see symbolic sizes (their checks must not force them to
    # constants). Two sequence lengths through one compiled graph.
    w = randn((9, 16), torch.float32, "cpu", seed=10)
    w_q, w_s = sk.ops.quantize_int8(w, dim=-1)

    def fn(q, k, v):
        o = sk.ops.attention(q, k, v, causal=True)
        return sk.ops.int8_linear(o, w_q, w_s)

    compiled, rec = _compile(fn, dynamic=True)
    for s in (5, 12):
        q, k, v = (randn((1, 2, s, 16), torch.float32, "cpu", seed=s + i) for i in range(3))
        assert torch.equal(compiled(q, k, v), fn(q, k, v))
    assert rec.graphs == 1, f"recompiled: {rec.graphs} graphs for two sequence lengths"


# --------------------------------------------------------------------------------------
# a patched model
# --------------------------------------------------------------------------------------


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    return ids, mask


def _skip_unless_dynamo_traces_transformers(ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Skip when this torch cannot trace the *unpatched* model in one graph either: then
    the failure is torch's and transformers', not the patch's. (torch 2.11 with
    transformers 5.17 stops at an import inside ``LlamaModel.forward``: "Bad import
    result ... _LazyModule"; torch 2.13 traces it.)"""
    plain = models.tiny("llama")
    try:
        with torch.no_grad():
            _compile(plain)[0](ids, attention_mask=mask, use_cache=False)
    except torch._dynamo.exc.Unsupported as exc:
        first = str(exc).splitlines()[0]
        pytest.skip(f"torch {torch.__version__} cannot trace the unpatched model: {first}")


@pytest.mark.parametrize("level", [1, 2])
def test_compiled_patched_model_matches_eager(level):
    # Prefill with use_cache=False, then one decode step over a DynamicCache (level 2's
    # compressed cache object is eager-only, is_compileable=False, so the decode step
    # uses transformers' dense cache here). With a 2-D attention_mask the sentinel mask
    # function hands the layers the key padding mask and each call is one graph.
    ids, mask = _inputs()
    _skip_unless_dynamo_traces_transformers(ids, mask)
    model = models.tiny("llama")
    sk.patch_model(model, level=level)
    keep = mask.bool()  # padded query rows are undefined in both
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        compiled, rec = _compile(model)
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        assert rel_error(got[keep], want[keep]) <= REL_TOL[torch.float32]
        assert rec.graphs == 1
        assert rec.ops.count("sentinel.attention.default") == 2  # one per layer
        if level == 2:
            # 4 per layer (norms and adds inside: the fused decoder layer) + the head
            assert rec.ops.count("sentinel.int8_linear_fused.default") == 8
            assert rec.ops.count("sentinel.int8_linear.default") == 1

        cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
        cache_c = copy.deepcopy(cache)
        step = torch.tensor([[42], [7]])
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        want = model(step, attention_mask=step_mask, **cache_kwargs(model, cache)).logits
        compiled, rec = _compile(model)
        got = compiled(step, attention_mask=step_mask, **cache_kwargs(model, cache_c)).logits
        assert rel_error(got, want) <= REL_TOL[torch.float32]
        assert rec.graphs == 1
        assert rec.ops.count("sentinel.decode_attention.default") == 2
    sk.unpatch_model(model)


def test_compiled_patched_model_without_mask_falls_back_correctly():
    # Without an attention_mask and without a cache, transformers (5.x) builds a packed-
    # sequence mask when compiling (it cannot test the position ids on the host), so the
    # sentinel mask function returns a 4-D mask and the layers take the plain fp32
    # fallback. Its one-time warning takes a lock dynamo cannot trace: a graph break, so
    # this runs with fullgraph=False. The result must still be right.
    model = models.tiny("llama")
    sk.patch_model(model, level=1)
    ids, _ = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = model(ids, use_cache=False).logits
        compiled, _ = _compile(model, fullgraph=False)
        got = compiled(ids, use_cache=False).logits
    assert rel_error(got, want) <= REL_TOL[torch.float32]
    sk.unpatch_model(model)

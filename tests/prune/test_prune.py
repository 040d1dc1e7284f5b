"""Head pruning: masks, importance scores, selection, compaction, patch options.

All on tiny random models (fp32, CPU). The sentinel attention function (another part of
the package) may not be registered yet: masking is checked through
``sk.prune.emulate_head_mask`` (an o_proj pre-hook zeroing the pruned heads' slice of the
attention output, which is what a head mask means), and additionally through the
``"sentinel"`` implementation when it is registered.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import ByteTokenizer, rel_error

import sentinel_kernels as sk
from sentinel_kernels import prune
from sentinel_kernels.patching import registry
from sentinel_kernels.prune import patching as prune_patching

TEXT = (
    "Attention heads are not equally useful: some can be removed at little cost, while "
    "others carry most of the signal. We score each head on calibration text. "
) * 12
TOK = ByteTokenizer()


def _tiny(arch: str = "llama", **kw) -> torch.nn.Module:
    if arch == "llama":
        # 8 query heads over 2 KV heads (groups of 4), head_dim 8, 3 layers.
        kw = dict(dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3), **kw)
    return sk.models.tiny(arch, **kw)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return _tiny()


@pytest.fixture
def model(llama) -> torch.nn.Module:
    return copy.deepcopy(llama)


def _ids(batch: int = 2, seq: int = 13, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seq), generator=g)


def _hooks_on_out_proj(model) -> int:
    return sum(len(layer.out_proj._forward_pre_hooks) for layer in prune.attention_layers(model))


def _sentinel_registered() -> bool:
    """Whether the "sentinel" attention implementation can run (registering it when the
    package has it: sentinel_kernels.nn.attention, written alongside this package)."""
    try:
        from transformers import AttentionInterface

        from sentinel_kernels.nn import attention as sentinel_attention
    except ImportError:
        return False
    sentinel_attention.register()
    return "sentinel" in AttentionInterface._global_mapping


# --------------------------------------------------------------------------------------
# layers and masks
# --------------------------------------------------------------------------------------


def test_attention_layers_llama_and_gpt2(model):
    layers = prune.attention_layers(model)
    assert [layer.name for layer in layers] == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all(layer.module is model.model.layers[i].self_attn for i, layer in enumerate(layers))
    assert {(la.num_heads, la.num_kv_heads, la.head_dim, la.group_size) for la in layers} == {
        (8, 2, 8, 4)
    }
    gpt2 = prune.attention_layers(_tiny("gpt2"))
    assert [la.name for la in gpt2] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert (gpt2[0].num_heads, gpt2[0].num_kv_heads, gpt2[0].head_dim) == (4, 4, 16)


def test_attention_layers_unsupported_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention layers found.*Llama-family"):
        prune.attention_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_set_head_mask_forms_and_clear(model):
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[1, 2] = False
    prune.set_head_mask(model, keep)
    got = prune.get_head_mask(model)
    assert torch.equal(torch.stack(got), keep)
    attn = model.model.layers[1].self_attn
    assert attn.sentinel_head_mask.dtype == torch.bool
    assert "sentinel_head_mask" in dict(attn.named_buffers())
    assert not any("sentinel_head_mask" in k for k in model.state_dict())  # non-persistent

    prune.set_head_mask(model, torch.tensor([1, 0, 1, 1, 1, 1, 1, 0]))  # [Hq]: every layer
    row = [True, False] + [True] * 5 + [False]
    assert all(m.tolist() == row for m in prune.get_head_mask(model))

    prune.set_head_mask(model, [None, [1.0] * 7 + [0.0], None])  # list, nested list, None
    got = prune.get_head_mask(model)
    assert got[0] is None and got[2] is None and got[1][-1].item() is False

    prune.set_head_mask(model, {2: torch.zeros(2, 8, dtype=torch.int64)})  # mapping, [B, Hq]
    got = prune.get_head_mask(model)
    assert got[0] is None and got[1] is None and got[2].shape == (2, 8) and not got[2].any()

    prune.set_head_mask(model, torch.ones(3, 2, 8))  # [layers, B, Hq]
    assert all(m.shape == (2, 8) for m in prune.get_head_mask(model))

    prune.set_head_mask(model, None)
    assert prune.get_head_mask(model) == [None, None, None]
    assert not hasattr(model.model.layers[0].self_attn, "sentinel_head_mask")


@pytest.mark.parametrize(
    "masks, error, match",
    [
        (torch.ones(2, 8), ValueError, "2 layers.*3 attention layers"),
        (torch.ones(3, 7), ValueError, "7 heads.*has 8"),
        (torch.ones(5), ValueError, "5 heads.*has 8"),
        (torch.ones(3, 1, 1, 8), ValueError, r"expected \[layers, heads\]"),
        ([torch.ones(8)] * 2, ValueError, "2 entries.*3 attention layers"),
        ([torch.ones(8), torch.ones(2, 2, 8), None], ValueError, "not \\[heads\\] or"),
        ([torch.ones(8), torch.full((8,), 2.0), None], ValueError, "values must be 0/1"),
        ([torch.ones(8), torch.ones(8, dtype=torch.complex64), None], TypeError, "dtype"),
        ([torch.ones(8), "abc", None], TypeError, "layer 1"),
        ({3: torch.ones(8)}, ValueError, "not a layer index"),
        ({"0": torch.ones(8)}, ValueError, "not a layer index"),
        ([torch.ones(8), torch.ones(0, 8), None], ValueError, "batch dimension is empty"),
        ("all", TypeError, "head masks must be"),
    ],
)
def test_set_head_mask_validation(model, masks, error, match):
    before = torch.zeros(3, 8, dtype=torch.bool)
    prune.set_head_mask(model, before)
    with pytest.raises(error, match=match):
        prune.set_head_mask(model, masks)
    # Validated before anything is stored: the previous masks are untouched.
    assert torch.equal(torch.stack(prune.get_head_mask(model)), before)


def test_head_mask_follows_model_device_and_emulation_zeroes_heads(model):
    x = _ids()
    base = model(x).logits
    keep = torch.ones(3, 8, dtype=torch.bool)
    keep[0, 3] = False
    prune.set_head_mask(model, keep)
    assert model(x).logits.equal(base)  # eager attention ignores the mask
    seen = {}

    def spy(_mod, args):
        seen["x"] = args[0]

    with prune.emulate_head_mask(model):
        h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(spy)
        masked = model(x).logits
        h.remove()
    # Hooks run in registration order: the spy sees the emulated (zeroed) input.
    heads = seen["x"].unflatten(-1, (8, 8))
    assert heads[:, :, 3].abs().max() == 0 and heads[:, :, 2].abs().max() > 0
    assert rel_error(masked, base) > 1e-4
    assert _hooks_on_out_proj(model) == 0


def test_emulation_per_sequence_masks(model):
    x = _ids(batch=2)
    keep = torch.ones(3, 2, 8, dtype=torch.bool)
    keep[:, 1, :5] = False  # second sequence loses 5 heads in every layer
    prune.set_head_mask(model, keep)
    with prune.emulate_head_mask(model):
        both = model(x).logits
    prune.set_head_mask(model, keep[:, 1])
    with prune.emulate_head_mask(model):
        second = model(x[1:]).logits
    prune.set_head_mask(model, None)
    first = model(x[:1]).logits
    assert rel_error(both[:1], first) < 1e-5
    assert rel_error(both[1:], second) < 1e-5


# --------------------------------------------------------------------------------------
# importance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_head_importance_shape_positive_deterministic(model, method):
    a = prune.head_importance(
        model, TOK, TEXT, method=method, n_samples=3, seq_len=48, progress=False
    )
    b = prune.head_importance(
        model, TOK, [TEXT[:500], TEXT[500:]], method=method, n_samples=3, seq_len=48, progress=False
    )
    assert a.shape == (3, 8) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.isfinite(a).all() and (a > 0).all()
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))  # per-layer L2 normalisation
    assert torch.equal(a, b)  # deterministic; a list of texts is read as one stream
    assert _hooks_on_out_proj(model) == 0


def _loss_with_head_scale(model, ids, layer_idx, head, scale):
    attn = prune.attention_layers(model)[layer_idx]

    def hook(_mod, args):
        x = args[0].unflatten(-1, (attn.num_heads, attn.head_dim)).clone()
        x[:, :, head] *= scale
        return (x.flatten(-2),)

    h = attn.out_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            logits = model(ids).logits.double()
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    finally:
        h.remove()


def test_gradient_importance_is_abs_derivative_of_loss_wrt_head_gate(model):
    """Michel et al.: I_h = |dL/dg_h| at g = 1; checked by central finite differences."""
    ids = prune.token_windows(TOK, TEXT, seq_len=40, n_samples=1)[0][None]
    # fp64, and a step large enough that the norms' internal fp32 rounding stays negligible
    # next to the difference (the O(eps^2) truncation error is ~1e-5 relative here).
    model64 = copy.deepcopy(model).double()
    scores = prune.head_importance(
        model64, TOK, TEXT, "gradient", n_samples=1, seq_len=40, progress=False, normalize=False
    )
    eps = 1e-2
    for layer_idx, head in [(0, 0), (1, 5), (2, 7)]:
        up = _loss_with_head_scale(model64, ids, layer_idx, head, 1 + eps)
        down = _loss_with_head_scale(model64, ids, layer_idx, head, 1 - eps)
        fd = abs(up - down) / (2 * eps)
        assert scores[layer_idx, head].item() == pytest.approx(fd, rel=1e-3)


def test_activation_importance_is_mean_norm_of_head_contribution(model):
    windows = prune.token_windows(TOK, TEXT, seq_len=40, n_samples=2)
    scores = prune.head_importance(
        model, TOK, TEXT, "activation", n_samples=2, seq_len=40, progress=False, normalize=False
    )
    layer = prune.attention_layers(model)[1]
    inputs = []
    h = layer.out_proj.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for w in windows:
            model(w[None])
    h.remove()
    x = torch.cat([i[0] for i in inputs]).double()  # [tokens, Hq*D]
    w = layer.out_proj.weight.double()  # [hidden, Hq*D]
    d = layer.head_dim
    expected = torch.stack(
        [
            (x[:, i * d : (i + 1) * d] @ w[:, i * d : (i + 1) * d].T).norm(dim=-1).mean()
            for i in range(8)
        ]
    )
    torch.testing.assert_close(scores[1].double(), expected, rtol=1e-5, atol=0)


def test_head_importance_restores_state_and_removes_hooks_on_error(model):
    model.train()
    model.model.layers[0].mlp.eval()
    model.lm_head.weight.requires_grad_(False)
    calls = []

    def boom(_mod, _args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    h = model.model.layers[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        prune.head_importance(model, TOK, TEXT, n_samples=3, seq_len=32, progress=False)
    h.remove()
    assert _hooks_on_out_proj(model) == 0
    assert model.training and not model.model.layers[0].mlp.training
    assert model.model.layers[1].training
    assert not model.lm_head.weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_head_importance_errors(model):
    with pytest.raises(ValueError, match="method must be"):
        prune.head_importance(model, TOK, TEXT, method="taylor")
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        prune.head_importance(model, TOK, "a", progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        prune.head_importance(model, TOK, TEXT, seq_len=1)


def test_head_importance_gpt2_and_under_inference_mode():
    m = _tiny("gpt2")
    with torch.inference_mode():
        s = prune.head_importance(m, TOK, TEXT, n_samples=2, seq_len=32, progress=False)
    assert s.shape == (2, 4) and (s > 0).all()


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------


def test_select_prunes_the_globally_least_important():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 9, generator=g)
    for ratio in (0.0, 0.1, 0.25, 0.5):
        keep = prune.select(scores, ratio)
        n = round(ratio * 54)
        assert keep.dtype == torch.bool and keep.shape == (6, 9)
        assert (~keep).sum().item() == n
        if n:  # no constraint binds at these ratios: exactly the n smallest scores
            assert scores[~keep].max() < scores[keep].min()


def test_select_keep_min_per_layer():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    keep = prune.select(scores, 0.5, keep_min_per_layer=2)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]
    keep = prune.select(scores, 0.5)
    assert keep.tolist() == [[False, False, False, True], [False, True, True, True]]
    with pytest.raises(ValueError, match="allows at most"):
        prune.select(scores, 0.9, keep_min_per_layer=1)
    with pytest.raises(ValueError, match="keep_min_per_layer"):
        prune.select(scores, 0.1, keep_min_per_layer=0)
    with pytest.raises(ValueError, match="ratio"):
        prune.select(scores, 1.0)
    with pytest.raises(ValueError, match="layers, heads"):
        prune.select(scores[0], 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        prune.select(torch.tensor([[float("nan"), 1.0]]), 0.1)


def test_select_whole_groups():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 9, generator=g)
    keep = prune.select(scores, 1 / 3, group_size=3)
    groups = keep.reshape(4, 3, 3)
    assert (groups.all(-1) | ~groups.any(-1)).all()  # every group all kept or all pruned
    assert (~groups.any(-1)).sum().item() == 4  # round(1/3 * 12 groups)
    sums = scores.reshape(4, 3, 3).sum(-1)
    assert sums[~groups.any(-1)].max() < sums[groups.all(-1)].min()
    with pytest.raises(ValueError, match="does not divide"):
        prune.select(scores, 0.2, group_size=2)
    # keep_min_per_layer rounds up to whole groups: 4 heads -> 2 groups of 3 kept.
    keep = prune.select(scores, 1 / 3, group_size=3, keep_min_per_layer=4)
    assert (keep.sum(-1) >= 6).all()


def test_random_select_is_reproducible():
    a = prune.random_select((5, 8), 0.3, torch.Generator().manual_seed(7))
    b = prune.random_select((5, 8), 0.3, torch.Generator().manual_seed(7))
    c = prune.random_select((5, 8), 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (~a).sum().item() == 12 and (a.sum(-1) >= 1).all()
    grouped = prune.random_select((5, 8), 0.5, torch.Generator().manual_seed(7), group_size=4)
    assert (~grouped).sum().item() == 20


# --------------------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------------------


def _masked_logits(model, x, sentinel: bool) -> torch.Tensor:
    if sentinel:
        old = model.config._attn_implementation
        model.config._attn_implementation = "sentinel"
        try:
            with torch.no_grad():
                return model(x).logits
        finally:
            model.config._attn_implementation = old
    with torch.no_grad(), prune.emulate_head_mask(model):
        return model(x).logits


KEEPS = {
    # layer 0: group 0 fully pruned -> KV head removed; layer 1: uneven groups (3 and 1
    # active -> padding); layer 2: untouched (all kept).
    "mixed": [[0, 0, 0, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 0, 1, 0], [1] * 8],
    # every layer loses one head per group: 8 -> 6 heads, no KV change, no padding
    "uniform": [[0, 1, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1, 1, 1]],
    # a layer with every head pruned keeps one masked head
    "all_pruned_layer": [[0] * 8, [1, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]],
    # pruned heads only needed as padding: nothing removable anywhere
    "padding_only": [[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8, [1, 1, 1, 1, 1, 1, 1, 0]],
}


@pytest.mark.parametrize("sentinel", [False, True], ids=["emulated", "sentinel"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(KEEPS))
def test_compact_matches_masked_model(case, attn, sentinel):
    if sentinel and not _sentinel_registered():
        pytest.skip('the "sentinel" attention implementation is not registered yet')
    model = _tiny(attn_implementation=attn)
    keep = torch.tensor(KEEPS[case], dtype=torch.bool)
    x = _ids(batch=2, seq=17, seed=3)
    with torch.no_grad():
        plain = model(x).logits
    prune.set_head_mask(model, keep)
    ref = _masked_logits(model, x, sentinel)
    assert rel_error(ref, plain) > 1e-3  # the masks are applied
    if sentinel:  # a head mask means: the head's slice of the o_proj input is zero
        assert rel_error(ref, _masked_logits(model, x, sentinel=False)) < 1e-5
    n_before = prune.count_parameters(model)
    report = prune.compact(model)
    out = _masked_logits(model, x, sentinel)
    assert rel_error(out, ref) < 1e-5
    assert report.params_before == n_before
    assert report.params_after == prune.count_parameters(model)
    d = 8
    for r, layer in zip(report.layers, prune.attention_layers(model), strict=True):
        assert (r.heads_after, r.kv_heads_after) == (layer.num_heads, layer.num_kv_heads)
        m = layer.module
        assert m.q_proj.weight.shape == (r.heads_after * d, 64)
        assert m.k_proj.weight.shape == m.v_proj.weight.shape == (r.kv_heads_after * d, 64)
        assert m.o_proj.weight.shape == (64, r.heads_after * d)
        assert m.num_key_value_groups == r.heads_after // r.kv_heads_after
        mask = getattr(m, "sentinel_head_mask", None)
        pad = 0 if mask is None else int((~mask).sum())
        assert pad == r.padding_heads
    if case == "mixed":
        assert [(r.heads_after, r.kv_heads_after, r.padding_heads) for r in report.layers] == [
            (3, 1, 0),
            (6, 2, 2),
            (8, 2, 0),
        ]
        assert report.params_after < report.params_before
        # layer 0 lost a KV head and 5 query heads, layer 1 two query heads
        assert report.params_before - report.params_after == (5 * 2 + 2 * 2 + 1 * 2) * d * 64
    if case == "uniform":
        assert [(r.heads_after, r.padding_heads) for r in report.layers] == [(6, 0)] * 3
        assert prune.get_head_mask(model) == [None] * 3  # no padding: masks dropped
        # no padding left: the plain model (no masking at all) gives the masked output
        with torch.no_grad():
            assert rel_error(model(x).logits, ref) < 1e-5
    if case == "all_pruned_layer":
        assert (report.layers[0].heads_after, report.layers[0].kv_heads_after) == (1, 1)
        assert report.layers[0].padding_heads == 1
    if case == "padding_only":
        assert report.params_after == report.params_before
        assert [r.heads_after for r in report.layers] == [8] * 3


def test_compact_whole_group_pruning_removes_kv_heads(model):
    scores = prune.head_importance(model, TOK, TEXT, n_samples=2, seq_len=48, progress=False)
    keep = prune.select(scores, 0.5, group_size=4)  # 3 of 6 groups
    prune.set_head_mask(model, keep)
    x = _ids(seed=5)
    ref = _masked_logits(model, x, sentinel=False)
    report = prune.compact(model)
    assert report.kv_heads_after == 3 and report.heads_after == 12
    assert report.padding_heads == 0
    assert prune.get_head_mask(model) == [None] * 3
    with torch.no_grad():
        out = model(x).logits  # nothing masked is left: no emulation needed
    assert rel_error(out, ref) < 1e-5


def test_compacted_model_generates_like_the_masked_model(model):
    keep = torch.tensor(KEEPS["mixed"], dtype=torch.bool)
    prune.set_head_mask(model, keep)
    x = _ids(batch=1, seq=9, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with prune.emulate_head_mask(model):
        ref = model.generate(x, **kw)
    prune.compact(model)
    with prune.emulate_head_mask(model):
        out = model.generate(x, **kw)  # KV cache with per-layer head counts
    assert torch.equal(out, ref)


def test_compact_gpt2():
    m = _tiny("gpt2")
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    prune.set_head_mask(m, keep)
    x = _ids(seed=6)
    ref = _masked_logits(m, x, sentinel=False)
    report = prune.compact(m)
    assert [r.heads_after for r in report.layers] == [2, 1]
    with torch.no_grad():
        out = m(x).logits
    assert rel_error(out, ref) < 1e-5
    assert m.transformer.h[0].attn.c_attn.weight.shape == (64, 3 * 32)


def test_compact_errors_and_noop(model):
    assert prune.compact(model).params_after == prune.count_parameters(model)  # no masks
    prune.set_head_mask(model, torch.ones(3, 2, 8))
    with pytest.raises(ValueError, match="per-sequence"):
        prune.compact(model)
    m = copy.deepcopy(model)
    prune.set_head_mask(m, torch.tensor(KEEPS["mixed"]))
    m.model.layers[0].self_attn.q_proj = sk.nn.Int8Linear.from_float(
        m.model.layers[0].self_attn.q_proj
    )
    with pytest.raises(TypeError, match="compact the model before patching"):
        prune.compact(m)


# --------------------------------------------------------------------------------------
# patch_model options
# --------------------------------------------------------------------------------------


@pytest.fixture
def sentinel_attention_option():
    """Make ``attention="sentinel"`` patchable: the real registration when it exists, else
    a stand-in transform that only switches the config's implementation name."""
    handle = None
    if "attention" not in registry.registered_options():

        def fake(model, ctx):
            old = model.config._attn_implementation
            model.config._attn_implementation = "sentinel"

            def undo():
                model.config._attn_implementation = old

            return undo

        handle = registry.register_transform("attention", fake, name="test stand-in")
    try:
        yield
    finally:
        if handle is not None:
            registry.unregister_transform(handle)


def test_patch_head_mask_option(model, sentinel_attention_option):
    keep = torch.tensor(KEEPS["mixed"], dtype=torch.bool)
    report = sk.patch_model(model, level=0, attention="sentinel", head_mask=keep)
    assert torch.equal(torch.stack(prune.get_head_mask(model)), keep)
    assert any("head mask" in t for t in report.transforms)
    sk.unpatch_model(model)
    assert prune.get_head_mask(model) == [None] * 3


def test_patch_head_mask_restores_previous_masks(model, sentinel_attention_option):
    before = torch.ones(3, 8, dtype=torch.bool)
    before[0, 0] = False
    prune.set_head_mask(model, before)
    sk.patch_model(model, attention="sentinel", head_mask={1: torch.zeros(8)})
    assert prune.get_head_mask(model)[0] is None
    sk.unpatch_model(model)
    assert torch.equal(torch.stack(prune.get_head_mask(model)), before)


def test_patch_prune_ratio_option(model, sentinel_attention_option, monkeypatch):
    monkeypatch.setattr(prune_patching, "CALIBRATION_SAMPLES", 2)
    monkeypatch.setattr(prune_patching, "CALIBRATION_SEQ_LEN", 48)
    expected = prune.select(
        prune.head_importance(model, TOK, TEXT, n_samples=2, seq_len=48, progress=False), 0.25
    )
    sk.patch_model(
        model, attention="sentinel", prune_ratio=0.25, calibration_text=TEXT, tokenizer=TOK
    )
    masks = prune.get_head_mask(model)
    assert sum(int((~m).sum()) for m in masks) == 6  # round(0.25 * 24)
    assert torch.equal(torch.stack(masks), expected)
    sk.unpatch_model(model)
    assert prune.get_head_mask(model) == [None] * 3


def test_patch_options_need_sentinel_attention(model):
    with pytest.raises(ValueError, match="needs attention='sentinel'"):
        sk.patch_model(model, head_mask=torch.ones(3, 8))
    with pytest.raises(ValueError, match="needs attention='sentinel'"):
        sk.patch_model(model, prune_ratio=0.25, calibration_text=TEXT, tokenizer=TOK)
    assert not sk.patching.is_patched(model)
    assert prune.get_head_mask(model) == [None] * 3


def test_patch_check_catches_an_attention_option_that_left_the_implementation(model):
    handle = None
    if "attention" not in registry.registered_options():
        handle = registry.register_transform("attention", lambda m, c: None, name="no-op")
    try:
        if handle is None:  # the real option is registered: simulate it doing nothing
            ctx = sk.patching.PatchContext({"head_mask": True}, 0, model)
            with pytest.raises(ValueError, match="uses 'eager'"):
                prune_patching.check_sentinel_attention(model, ctx)
        else:
            with pytest.raises(ValueError, match="uses 'eager'.*ignores head masks"):
                sk.patch_model(model, attention="sentinel", head_mask=torch.ones(3, 8))
            assert prune.get_head_mask(model) == [None] * 3  # rolled back
    finally:
        if handle is not None:
            registry.unregister_transform(handle)


def test_patch_prune_ratio_needs_calibration_text(model, sentinel_attention_option):
    with pytest.raises(ValueError, match="calibration_text=<str>.*and tokenizer="):
        sk.patch_model(model, attention="sentinel", prune_ratio=0.25)
    with pytest.raises(ValueError, match="tokenizer=<the model's tokenizer>"):
        sk.patch_model(model, attention="sentinel", prune_ratio=0.25, calibration_text=TEXT)
    assert not sk.patching.is_patched(model)

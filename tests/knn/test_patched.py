"""kNN-LM with a model patched at levels 1-3: its LM head is an ``Int8Linear`` at levels 2
and 3 (no ``weight``), yet a datastore built with the float model serves it, and one of
another model is still refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ByteTokenizer, knn_lm_reference, random_ids, random_text, tiny_model

import sentinel_kernels as sk
from sentinel_kernels.app.profile import breakdown
from sentinel_kernels.knn import DatastoreMismatchError, lm
from sentinel_kernels.knn.datastore import _legacy_sample_weights

TEXT = random_text(1200, seed=41)
# level 3 without calibration text: no head pruning (it scores heads on text)
LEVELS = [(1, {}), (2, {}), (3, {"prune_ratio": 0.0})]


def _patched(level: int, dtype: torch.dtype = torch.float32, seed: int = 0, **config) -> object:
    model = sk.models.tiny("llama", seed=seed, dtype=dtype, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level, **dict(LEVELS)[level])
    return model


def _store(model) -> sk.knn.Datastore:
    return sk.knn.Datastore.build(
        model, ByteTokenizer(), TEXT, index="flat", progress=False, window=128
    )


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def float_store(request):
    """``(tie_word_embeddings, store built with the float tiny model)``."""
    return request.param, _store(tiny_model(tie_word_embeddings=request.param))


def _prompt(batch=2, length=9, seed=0):
    ids = torch.tensor(ByteTokenizer()(TEXT)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (batch,), generator=g).tolist()
    return torch.stack([ids[s : s + length] for s in starts])


@pytest.mark.parametrize("level", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_sizes_and_input_dtype_of_an_int8_head(level, dtype):
    model = _patched(level, dtype)
    head = model.get_output_embeddings()
    assert not hasattr(head, "weight") and hasattr(head, "weight_int8")
    assert lm.lm_head_shape(model) == (256, 64)
    assert lm.lm_head_input(model) == (64, dtype)
    # the dequantized weight: within half an int8 step (row absmax / 254) of the float one
    ref = sk.models.tiny("llama", dtype=dtype).get_output_embeddings().weight.float()
    deq = lm.lm_head_weight(model)
    assert deq.shape == (256, 64) and deq.dtype == torch.float32
    step = ref.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((deq - ref).abs() <= 0.5 * step * 1.01 + 1e-2 * ref.abs()).all())


def test_head_of_a_float_model_is_unchanged():
    model = tiny_model().to(torch.bfloat16)
    assert lm.lm_head_shape(model) == (256, 64)
    assert lm.lm_head_input(model) == (64, torch.bfloat16)
    assert lm.lm_head_weight(model) is model.get_output_embeddings().weight


@pytest.mark.parametrize("level", [1, 2, 3])
def test_store_of_the_float_model_serves_the_patched_one(float_store, level, tmp_path):
    tied, store = float_store
    loaded = sk.knn.Datastore.load(store.save(tmp_path / "s.knn"))
    for st in (store, loaded):
        st.check_model(_patched(level, tie_word_embeddings=tied))
        st.check_model(_patched(level, torch.bfloat16, tie_word_embeddings=tied))
        other = _patched(level, seed=1, tie_word_embeddings=tied)
        with pytest.raises(DatastoreMismatchError, match="different weights"):
            st.check_model(other)
        wide = sk.models.tiny("llama", hidden_size=32, intermediate_size=64)
        with pytest.raises(DatastoreMismatchError, match="hidden_size"):
            st.check_model(wide)


def test_store_of_a_patched_model_serves_the_float_one():
    store = _store(_patched(2, tie_word_embeddings=True))
    store.check_model(tiny_model(tie_word_embeddings=True))
    with pytest.raises(DatastoreMismatchError, match="different weights"):
        store.check_model(sk.models.tiny("llama", seed=1, tie_word_embeddings=True))


@pytest.mark.parametrize("level", [2, 3])
def test_generate_on_a_patched_model(float_store, level):
    tied, store = float_store
    model = _patched(level, tie_word_embeddings=tied)
    ids = _prompt()
    plain = sk.generate(model, ids, max_new_tokens=10, eos_token_id=[])
    zero = sk.generate(model, ids, max_new_tokens=10, eos_token_id=[], knn=store, knn_lambda=0.0)
    assert torch.equal(zero, plain)  # lambda = 0: the patched model's own greedy tokens
    mixed = sk.generate(
        model,
        ids,
        max_new_tokens=10,
        eos_token_id=[],
        knn=store,
        knn_k=16,
        knn_lambda=0.6,
        knn_temperature=3.0,
    )
    assert mixed.shape == plain.shape and torch.equal(mixed[:, :9], ids)
    assert not torch.equal(mixed, plain)  # the datastore changed the choice somewhere
    other = _store(sk.models.tiny("llama", seed=1, tie_word_embeddings=tied))
    with pytest.raises(DatastoreMismatchError):
        sk.generate(model, ids, max_new_tokens=2, knn=other)


def test_generate_with_an_int8_head_equals_the_reference_loop(float_store):
    tied, store = float_store
    model = sk.models.tiny("llama", tie_word_embeddings=tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # int8 weights with a dense cache: the cache-free reference sees the same numbers
        sk.patch_model(model, level=2, kv_cache="dense")
    ids = _prompt(seed=3)
    got = sk.generate(
        model,
        ids,
        max_new_tokens=8,
        eos_token_id=[],
        knn=store,
        knn_k=16,
        knn_lambda=0.6,
        knn_temperature=3.0,
    )
    assert torch.equal(got, knn_lm_reference(model, store, ids, 8, 16, 0.6, 3.0))


def test_profile_at_level_2_with_a_float_store(float_store):
    tied, store = float_store
    model = tiny_model(tie_word_embeddings=tied)
    result = breakdown.profile_model(
        model,
        random_ids(1, 12),
        level=2,
        max_new_tokens=4,
        warmup=False,
        timed_run=False,
        knn=store,
        knn_k=8,
    )
    assert result.phases["decode"].categories["knn"] > 0
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_engine_on_a_patched_model(float_store):
    from sentinel_kernels.serve import Engine, SamplingParams

    tied, store = float_store
    model = _patched(2, tie_word_embeddings=tied)
    knn = {"knn_k": 8, "knn_lambda": 0.5, "knn_temperature": 10.0}
    prompts = [row.tolist() for row in _prompt(batch=3, length=7, seed=5)]
    refs = [
        sk.generate(model, torch.tensor([p]), max_new_tokens=6, eos_token_id=[], knn=store, **knn)[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(model, None, max_slots=2, max_seq_len=32, knn=store, **knn) as engine:
        outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == refs


def _legacy(store: sk.knn.Datastore, model) -> sk.knn.Datastore:
    """``store`` with the identity the first scheme recorded (no ``scheme`` field)."""
    ident = {k: v for k, v in store.identity.items() if k not in ("scheme", "sample_scale")}
    ident["weight_sample"] = _legacy_sample_weights(model)
    return sk.knn.Datastore(
        store.keys, store.values, store.successor, "flat", {}, ident, store.settings
    )


def test_store_saved_by_the_first_identity_scheme(float_store, tmp_path):
    tied, store = float_store
    old = sk.knn.Datastore.load(
        _legacy(store, tiny_model(tie_word_embeddings=tied)).save(tmp_path / "old.knn")
    )
    assert "scheme" not in old.identity
    old.check_model(tiny_model(tie_word_embeddings=tied))  # compared the old way
    old.check_model(tiny_model(tie_word_embeddings=tied).to(torch.bfloat16))
    with pytest.raises(DatastoreMismatchError, match="different weights"):
        old.check_model(sk.models.tiny("llama", seed=1, tie_word_embeddings=tied))
    with pytest.raises(DatastoreMismatchError, match="rebuild"):
        old.check_model(_patched(2, tie_word_embeddings=tied))
    with pytest.raises(DatastoreMismatchError, match="rebuild"):
        sk.generate(_patched(2, tie_word_embeddings=tied), _prompt(), max_new_tokens=2, knn=old)


def test_unknown_identity_scheme_is_refused(float_store):
    _, store = float_store
    ident = {**store.identity, "scheme": 99}
    odd = sk.knn.Datastore(store.keys, store.values, store.successor, "flat", {}, ident, {})
    with pytest.raises(DatastoreMismatchError, match="rebuild"):
        odd.check_model(tiny_model())

"""``sk.generate(..., knn=store)``: kNN-LM decoding against a plain reference loop."""

from __future__ import annotations

import pytest
import torch
from helpers import ByteTokenizer, knn_lm_reference, random_text, tiny_model

import sentinel_kernels as sk
from sentinel_kernels.knn import DatastoreMismatchError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXT = random_text(1200, seed=21)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def store(model):
    # faiss-cpu is a dependency (CI has it); a GPU machine without the wheel skips these
    pytest.importorskip("faiss", reason="the flat FAISS datastore needs faiss-cpu")
    return sk.knn.Datastore.build(
        model, ByteTokenizer(), TEXT, index="flat", progress=False, window=128
    )


def _prompt(batch=2, length=9, seed=0):
    """Prompts cut from the datastore's text (so that neighbours are close)."""
    ids = torch.tensor(ByteTokenizer()(TEXT)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (batch,), generator=g).tolist()
    return torch.stack([ids[s : s + length] for s in starts])


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_greedy_equals_reference_loop(model, store, backend):
    ids = _prompt()
    store.to("cpu", backend=backend)
    try:
        got = sk.generate(
            model,
            ids,
            max_new_tokens=10,
            eos_token_id=[],
            knn=store,
            knn_k=16,
            knn_lambda=0.6,
            knn_temperature=3.0,
        )
    finally:
        store.to("cpu")
    ref = knn_lm_reference(model, store, ids, 10, 16, 0.6, 3.0)
    assert torch.equal(got, ref)
    plain = sk.generate(model, ids, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(got, plain)  # the datastore changed the choice somewhere


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_lambda_zero_reproduces_the_model(model, store, backend):
    ids = _prompt(3, 7, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    store.to("cpu", backend=backend)
    try:
        for m in (None, mask):
            plain = sk.generate(model, ids, attention_mask=m, max_new_tokens=12, eos_token_id=[])
            got = sk.generate(
                model,
                ids,
                attention_mask=m,
                max_new_tokens=12,
                eos_token_id=[],
                knn=store,
                knn_lambda=0.0,
            )
            assert torch.equal(got, plain)
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            plain = sk.generate(
                model, ids, attention_mask=m, max_new_tokens=12, do_sample=True, generator=g1
            )
            got = sk.generate(
                model,
                ids,
                attention_mask=m,
                max_new_tokens=12,
                do_sample=True,
                generator=g2,
                knn=store,
                knn_lambda=0.0,
            )
            assert torch.equal(got, plain)
    finally:
        store.to("cpu")


def test_padded_batch_rows_equal_single_rows(model, store):
    ids = _prompt(2, 8, seed=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding: row 0 is 5 tokens long
    kw = {"max_new_tokens": 8, "eos_token_id": [], "knn": store, "knn_lambda": 0.7}
    both = sk.generate(model, ids, attention_mask=mask, **kw)
    row0 = sk.generate(model, ids[:1, :5], **kw)
    row1 = sk.generate(model, ids[1:], **kw)
    assert torch.equal(both[0, 8:], row0[0, 5:])
    assert torch.equal(both[1, 8:], row1[0, 8:])


def test_sampling_is_reproducible_and_knn_changes_it(model, store):
    ids = _prompt(2, 8, seed=3)
    outs = [
        sk.generate(
            model,
            ids,
            max_new_tokens=12,
            eos_token_id=[],
            do_sample=True,
            top_k=20,
            generator=torch.Generator().manual_seed(7),
            knn=store,
            knn_lambda=lam,
            knn_temperature=2.0,
        )
        for lam in (0.9, 0.9, 0.0)
    ]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_repeated_prompt_hits_the_result_cache(model, store):
    store.clear_cache()
    ids = _prompt(1, 9, seed=4)
    first = sk.generate(model, ids, max_new_tokens=6, eos_token_id=[], knn=store)
    info = store.cache_info()
    assert (info.hits, info.misses) == (0, 6)
    second = sk.generate(model, ids, max_new_tokens=6, eos_token_id=[], knn=store)
    assert torch.equal(first, second)
    assert store.cache_info().hits == 6 and store.cache_info().misses == 6


def test_hook_is_removed_and_later_plain_calls_are_unchanged(model, store):
    ids = _prompt(2, 6, seed=5)
    plain = sk.generate(model, ids, max_new_tokens=5, eos_token_id=[])
    sk.generate(model, ids, max_new_tokens=5, eos_token_id=[], knn=store, knn_lambda=0.9)
    assert not model.get_output_embeddings()._forward_pre_hooks
    assert torch.equal(sk.generate(model, ids, max_new_tokens=5, eos_token_id=[]), plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"knn_k": 0}, ValueError, "knn_k"),
        ({"knn_lambda": 1.5}, ValueError, "knn_lambda"),
        ({"knn_temperature": 0.0}, ValueError, "knn_temperature"),
        ({"draft": "ngram"}, ValueError, "draft"),
        ({"knn": "store.pt"}, TypeError, "Datastore"),
    ],
)
def test_bad_knn_arguments(model, store, kwargs, error, match):
    args = {"knn": store, **kwargs}
    with pytest.raises(error, match=match):
        sk.generate(model, _prompt(1, 5), max_new_tokens=3, **args)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_datastore_of_another_model_is_refused(store):
    other = sk.models.tiny("llama", seed=3)
    with pytest.raises(DatastoreMismatchError):
        sk.generate(other, _prompt(1, 5), max_new_tokens=3, knn=store)


@cuda
@pytest.mark.gpu
def test_cuda_graph_step_equals_eager(store):
    model = tiny_model().cuda()
    ids = _prompt(2, 9, seed=6).cuda()
    with pytest.raises(ValueError, match="store.to"):
        sk.generate(model, ids, max_new_tokens=4, knn=store)  # a FAISS (CPU) store
    gpu_store = sk.knn.Datastore.build(
        model, ByteTokenizer(), TEXT, index="flat", progress=False, window=128
    ).to("cuda")
    kw = {"max_new_tokens": 16, "eos_token_id": [], "knn": gpu_store, "knn_lambda": 0.6}
    eager = sk.generate(model, ids, cuda_graph=False, **kw)
    graphed = sk.generate(model, ids, cuda_graph=True, **kw)
    again = sk.generate(model, ids, cuda_graph=True, **kw)  # the captured graph replayed
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)

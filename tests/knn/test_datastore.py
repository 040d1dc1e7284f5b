"""Datastore build, save/load, model identity, approximate indexes' recall, bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ByteTokenizer, needs_smollm2, random_text, tiny_model

import sentinel_kernels as sk
from sentinel_kernels.knn import DatastoreMismatchError, lm

WIKITEXT2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2"


def test_entries_are_lm_head_inputs_and_next_tokens(model, tok, texts, flat_store):
    ids = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    assert len(flat_store) == sum(len(i) - 1 for i in ids)
    assert torch.equal(flat_store.values, torch.cat([i[1:] for i in ids]))
    # entry p of the first text: the LM head's input at p with the context of its window
    # (windows of 128 overlapping by one token: window w starts at 127 w)
    caught: list[torch.Tensor] = []
    w = 3
    x = ids[0][127 * w : 127 * w + 128][None]
    with torch.inference_mode(), lm.capture_lm_head_input(model, caught):
        model(input_ids=x, use_cache=False)
    expected = caught[0][0, :-1].half()
    assert torch.equal(flat_store.keys[127 * w : 127 * w + 127], expected)
    assert flat_store.keys.dtype == torch.float16
    # successor: false only at each text's last entry
    last = [len(ids[0]) - 2, len(flat_store) - 1]
    assert (~flat_store.successor).nonzero().flatten().tolist() == last
    assert flat_store.settings["window"] == 128 and flat_store.settings["texts"] == 2


def test_build_batches_do_not_change_keys(model, tok, texts, flat_store):
    one = sk.knn.Datastore.build(
        model, tok, texts, index="flat", progress=False, window=128, batch_size=1
    )
    torch.testing.assert_close(one.keys, flat_store.keys, atol=2e-3, rtol=2e-3)
    assert torch.equal(one.values, flat_store.values)


def _roundtrip(store, tmp_path):
    path = store.save(tmp_path / "store.pt")
    return sk.knn.Datastore.load(path)


@pytest.mark.parametrize(
    ("index", "options"),
    [
        ("flat", {}),
        ("ivfpq", {"nlist": 8, "m": 16, "nbits": 6, "nprobe": 3}),
        ("hnsw", {"M": 8, "ef_search": 20}),
        ("flat", {"pca_dim": 24}),
    ],
)
def test_save_load_round_trip(model, tok, texts, tmp_path, index, options):
    store = sk.knn.Datastore.build(
        model, tok, texts, index=index, progress=False, window=256, **options
    )
    loaded = _roundtrip(store, tmp_path)
    assert loaded.index_kind == index and loaded.options == store.options
    assert loaded.identity == store.identity and loaded.settings == store.settings
    assert torch.equal(loaded.keys, store.keys) and torch.equal(loaded.values, store.values)
    assert torch.equal(loaded.successor, store.successor)
    queries = torch.randn(7, store.query_dim, generator=torch.Generator().manual_seed(1))
    for a, b in zip(store.search(queries, 9), loaded.search(queries, 9), strict=True):
        assert torch.equal(a, b)
    loaded.check_model(model)
    if "pca_dim" in options:
        assert store.keys.shape[1] == 24
        # PCA: the search ranks projected queries against projected keys
        proj = (queries - store.pca_mean) @ store.pca_proj
        ref = torch.cdist(proj.double(), store.keys.double()).topk(9, largest=False).indices
        assert torch.equal(loaded.search(queries, 9)[1], store.values[ref])


def test_set_search_params_survives_save(model, tok, texts, tmp_path):
    store = sk.knn.Datastore.build(
        model, tok, texts, index="ivfpq", progress=False, window=256, nlist=8, m=16, nbits=6
    )
    store.set_search_params(nprobe=8)
    assert _roundtrip(store, tmp_path).options["nprobe"] == 8
    with pytest.raises(ValueError, match="search options"):
        store.set_search_params(ef_search=3)


def test_datastore_of_another_model_is_refused(flat_store, tok, tmp_path):
    loaded = _roundtrip(flat_store, tmp_path)
    other = sk.models.tiny("llama", seed=1)
    with pytest.raises(DatastoreMismatchError, match="different weights"):
        loaded.check_model(other)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(DatastoreMismatchError, match="config_class"):
        loaded.check_model(gpt2)
    wide = tiny_model(hidden_size=32, intermediate_size=64)
    with pytest.raises(DatastoreMismatchError, match="another model"):
        loaded.check_model(wide)
    with pytest.raises(DatastoreMismatchError):
        sk.eval.perplexity(other, tok, random_text(300, 3), window=64, progress=False, knn=loaded)


def test_same_model_in_bfloat16_is_accepted(model, flat_store):
    half = tiny_model().to(torch.bfloat16)
    flat_store.check_model(half)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a sentinel-kernels k-NN datastore"):
        sk.knn.Datastore.load(path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"index": "lsh"}, ValueError, "unknown index"),
        ({"index": "flat", "nprobe": 3}, ValueError, "unknown option"),
        ({"index": "hnsw", "nlist": 3}, ValueError, "unknown option"),
        ({"index": "ivfpq", "nlist": 100000}, ValueError, "nlist"),
        ({"index": "ivfpq", "m": 7}, ValueError, "divide"),
        ({"index": "ivfpq", "nbits": 12}, ValueError, "training keys"),
        ({"index": "ivfpq", "nprobe": 0}, ValueError, "nprobe"),
        ({"index": "hnsw", "M": 0}, ValueError, "M must be"),
        ({"window": 1}, ValueError, "window"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"pca_dim": 0}, ValueError, "pca_dim"),
        ({"pca_dim": 65}, ValueError, "pca_dim"),
        ({"texts": 5}, TypeError, "texts"),
        ({"texts": ["a"]}, ValueError, "2 tokens"),
    ],
)
def test_build_rejects_bad_arguments(model, tok, kwargs, error, match):
    args = {"texts": [random_text(400, 1)], "index": "flat", "progress": False, **kwargs}
    texts = args.pop("texts")
    with pytest.raises(error, match=match):
        sk.knn.Datastore.build(model, tok, texts, **args)


@pytest.mark.parametrize(
    ("queries", "k", "error", "match"),
    [
        (torch.randn(2, 64), 0, ValueError, "k must be"),
        (torch.randn(2, 64), 10**9, ValueError, "k must be"),
        (torch.randn(2, 63), 4, ValueError, "hidden size"),
        (torch.randint(0, 3, (2, 64)), 4, TypeError, "float"),
        ([[0.0] * 64], 4, TypeError, "tensor"),
    ],
)
def test_search_rejects_bad_arguments(flat_store, queries, k, error, match):
    with pytest.raises(error, match=match):
        flat_store.search(queries, k)


def test_faiss_backend_only_on_cpu(flat_store):
    with pytest.raises(ValueError, match="no GPU support"):
        flat_store.to("cuda", backend="faiss")
    with pytest.raises(ValueError, match="unknown backend"):
        flat_store.to("cpu", backend="gpu")


# --------------------------------------------------------------------------------------
# recall of the approximate indexes against the exact one
# --------------------------------------------------------------------------------------

#: Floors (measured on these seeds: see the test output; IVF-PQ's quantization costs
#: recall, so its floor is lower than HNSW's).
IVFPQ_RECALL_FLOOR = 0.5
HNSW_RECALL_FLOOR = 0.9


def _recall(store, exact, queries, k):
    _, _, got = store.neighbours(queries, k)
    _, _, ref = exact.neighbours(queries, k)
    return float((got[:, :, None] == ref[:, None, :]).any(-1).float().mean())


def _recalls(flat, queries, k=10):
    ivf = flat.reindex("ivfpq", nlist=16, m=flat.keys.shape[1] // 2, nbits=8, nprobe=8)
    hnsw = flat.reindex("hnsw", M=16, ef_construction=64, ef_search=64)
    return _recall(ivf, flat, queries, k), _recall(hnsw, flat, queries, k)


def test_recall_on_random_data(flat_store):
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(3000, 32, generator=g).half()
    store = sk.knn.Datastore(
        keys,
        torch.randint(0, 256, (3000,), generator=g),
        torch.ones(3000, dtype=torch.bool),
        "flat",
        {},
        {**flat_store.identity, "hidden_size": 32},
        {},
    )
    queries = keys[:200].float() + 0.3 * torch.randn(200, 32, generator=g)
    ivf, hnsw = _recalls(store, queries)
    print(f"random data: recall@10 IVF-PQ {ivf:.3f}, HNSW {hnsw:.3f}")
    assert ivf >= IVFPQ_RECALL_FLOOR and hnsw >= HNSW_RECALL_FLOOR


def test_recall_on_tiny_model_hidden_states(flat_store, model, tok):
    queries = _held_out_queries(model, tok, random_text(300, seed=99))
    ivf, hnsw = _recalls(flat_store, queries)
    print(f"tiny model: recall@10 IVF-PQ {ivf:.3f}, HNSW {hnsw:.3f}")
    assert ivf >= IVFPQ_RECALL_FLOOR and hnsw >= HNSW_RECALL_FLOOR


def _held_out_queries(model, tok, text):
    caught: list[torch.Tensor] = []
    x = torch.tensor(tok(text)["input_ids"])[None]
    with torch.inference_mode(), lm.capture_lm_head_input(model, caught):
        model(input_ids=x, use_cache=False)
    return caught[0][0].float()


@pytest.mark.model
@needs_smollm2
def test_recall_on_smollm2_hidden_states():
    """Datastore from the first 2x1024 tokens of WikiText-2 valid, queries from the next
    256 tokens (not in the store)."""
    path = WIKITEXT2 / "valid.txt"
    if not path.exists():
        pytest.skip("wikitext-2 valid split absent")
    model, tok = sk.models.load_smollm2()
    ids = tok(path.read_text(encoding="utf-8")[:40000])["input_ids"]
    store_text = tok.decode(ids[:2048])
    flat = sk.knn.Datastore.build(model, tok, store_text, index="flat", progress=False)
    queries = _held_out_queries(model, tok, tok.decode(ids[2048:2304]))
    ivf = flat.reindex("ivfpq", nlist=16, m=64, nbits=8, nprobe=8)
    hnsw = flat.reindex("hnsw", M=16, ef_search=64)
    r_ivf, r_hnsw = _recall(ivf, flat, queries, 10), _recall(hnsw, flat, queries, 10)
    print(f"SmolLM2: recall@10 IVF-PQ {r_ivf:.3f}, HNSW {r_hnsw:.3f}")
    assert r_ivf >= IVFPQ_RECALL_FLOOR and r_hnsw >= HNSW_RECALL_FLOOR


def test_byte_tokenizer_fixture_is_the_helpers_one(tok):
    assert isinstance(tok, ByteTokenizer)


def test_ivfpq_rerank_uses_exact_distances(flat_store):
    queries = torch.randn(6, flat_store.query_dim, generator=torch.Generator().manual_seed(8))
    ivf = flat_store.reindex("ivfpq", nlist=8, m=16, nbits=6, nprobe=8)
    plain = _recall(ivf, flat_store, queries, 10)
    # every cell probed and every entry a candidate: re-ranking makes the search exact
    ivf.set_search_params(rerank=len(flat_store) // 10 + 1)
    d, _, i = ivf.neighbours(queries, 10)
    ref_d, _, ref_i = flat_store.neighbours(queries, 10)
    # the same sets (the order of near-ties may differ: FAISS expands |q - k|^2)
    assert torch.equal(i.sort(-1).values, ref_i.sort(-1).values)
    torch.testing.assert_close(d, ref_d, rtol=1e-4, atol=1e-3)
    ivf.set_search_params(rerank=4, nprobe=2)
    assert _recall(ivf, flat_store, queries, 10) >= plain - 0.05
    with pytest.raises(ValueError, match="rerank"):
        ivf.set_search_params(rerank=0)

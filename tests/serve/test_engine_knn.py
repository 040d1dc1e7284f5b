"""kNN-LM through the engine: each request's greedy tokens equal ``sk.generate(...,
knn=store)`` of that request alone; the setting reaches the server's result-cache key."""

from __future__ import annotations

import random

import pytest
import torch

import sentinel_kernels as sk
from sentinel_kernels.serve import Engine, SamplingParams
from tests.helpers import ByteTokenizer, random_text, tiny_model

TEXT = random_text(1200, seed=31)
KNN = {"knn_k": 8, "knn_lambda": 0.5, "knn_temperature": 10.0}


@pytest.fixture(scope="module")
def model_store():
    model = tiny_model("llama", level=1)
    store = sk.knn.Datastore.build(
        model, ByteTokenizer(), TEXT, index="flat", progress=False, window=128
    )
    return model, store


def test_engine_knn_greedy_equals_generate_alone(model_store):
    model, store = model_store
    ids = ByteTokenizer()(TEXT)["input_ids"]
    rng = random.Random(0)
    prompts = []
    for _ in range(8):
        s = rng.randrange(0, len(ids) - 40)
        prompts.append(ids[s : s + rng.randint(3, 30)])
    refs = []
    for p in prompts:
        out = sk.generate(
            model, torch.tensor([p]), max_new_tokens=8, eos_token_id=[], knn=store, **KNN
        )
        refs.append(out[0, len(p) :].tolist())
    plain = sk.generate(model, torch.tensor([prompts[0]]), max_new_tokens=8, eos_token_id=[])[
        0, len(prompts[0]) :
    ].tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine(model, None, max_slots=4, max_seq_len=64, knn=store, **KNN) as engine:
        outs = engine.generate(prompts, params)
        setting = engine.output_setting
    assert [o.token_ids for o in outs] == refs
    assert (
        refs[0] != plain
        or refs[1:]
        != [  # the datastore changes some output
            sk.generate(model, torch.tensor([p]), max_new_tokens=8, eos_token_id=[])[
                0, len(p) :
            ].tolist()
            for p in prompts[1:]
        ]
    )
    assert "knn(" in setting and "k=8" in setting


def test_engine_refuses_bad_knn_arguments(model_store):
    model, store = model_store
    with pytest.raises(ValueError, match="lambda|knn_lambda"):
        Engine(model, None, max_slots=2, max_seq_len=32, knn=store, knn_lambda=2.0)
    other = tiny_model("qwen2", level=1)
    with pytest.raises(Exception, match="model|datastore"):
        Engine(other, None, max_slots=2, max_seq_len=32, knn=store)

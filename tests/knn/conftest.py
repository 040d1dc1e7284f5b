"""Shared fixtures of the k-NN tests: a tiny model, its byte tokenizer and datastores."""

from __future__ import annotations

import pytest
from helpers import ByteTokenizer, random_text, tiny_model

import sentinel_kernels as sk


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def texts():
    """Two random texts (1500 and 700 byte tokens)."""
    return [random_text(1500, seed=11), random_text(700, seed=12)]


@pytest.fixture(scope="module")
def flat_store(model, tok, texts):
    return sk.knn.Datastore.build(model, tok, texts, index="flat", progress=False, window=128)

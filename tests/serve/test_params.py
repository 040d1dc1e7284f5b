"""SamplingParams: defaults, normalisation and the errors of bad values."""

from __future__ import annotations

import pytest

from sentinel_kernels.serve import SamplingParams


def test_defaults_and_normalisation():
    p = SamplingParams(max_tokens=4, stop="END", stop_token_ids=[7, 9], temperature=1)
    assert p.stop == ("END",) and p.stop_token_ids == (7, 9)
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert p.top_p == 1.0 and p.top_k == 0 and p.seed is None and not p.ignore_eos
    assert not p.greedy and SamplingParams(max_tokens=1, temperature=0).greedy


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_tokens": 0}, ValueError, "max_tokens"),
        ({"max_tokens": 2.0}, TypeError, "max_tokens"),
        ({"max_tokens": True}, TypeError, "max_tokens"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**63}, ValueError, "seed"),
        ({"seed": "7"}, TypeError, "seed"),
        ({"stop": [""]}, ValueError, "stop"),
        ({"stop": [3]}, TypeError, "stop"),
        ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids"),
        ({"stop_token_ids": "ab"}, TypeError, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, TypeError, "stop_token_ids"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos"),
    ],
)
def test_bad_values_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**{"max_tokens": 4, **kwargs})

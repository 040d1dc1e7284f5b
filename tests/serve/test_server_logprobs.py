"""Logprobs through the OpenAI-compatible server (a tiny model on 127.0.0.1, the official
``openai`` client): both endpoints, plain and streamed, the result cache keyed by them,
and the 400s of bad values."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tests.serve.test_server import MODEL, _client, _metrics, _tiny_engine, serving  # noqa: E402

NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serving(_tiny_engine) as u:
        yield u


def _check_completion_logprobs(lp, n_tokens: int, n_top: int, greedy: bool) -> None:
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_tokens
    assert len(lp.text_offset) == n_tokens
    offset = 0
    for tok, chosen, top, off in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True
    ):
        assert off == offset
        offset += len(tok)
        assert chosen <= 0.0
        assert len(top) <= n_top  # two ids may decode to the same string
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        if greedy and n_top:
            assert chosen == values[0]


def test_completions_logprobs_plain_and_streamed(url):
    client = _client(url)
    kw = {"model": MODEL, "prompt": "Hello there", "max_tokens": 14, "temperature": 0}
    plain = client.completions.create(logprobs=3, extra_body=NO_EOS, **kw)
    choice = plain.choices[0]
    _check_completion_logprobs(choice.logprobs, plain.usage.completion_tokens, 3, greedy=True)
    assert plain.usage.completion_tokens == 14
    # without logprobs: none, and the same text
    bare = client.completions.create(extra_body=NO_EOS, **kw).choices[0]
    assert bare.logprobs is None and bare.text == choice.text
    chunks = list(client.completions.create(logprobs=3, stream=True, extra_body=NO_EOS, **kw))
    tokens, lps, tops, offsets = [], [], [], []
    for c in chunks:
        lp = c.choices[0].logprobs
        if lp is None:
            continue
        assert len(lp.tokens) >= 1
        tokens += lp.tokens
        lps += lp.token_logprobs
        tops += lp.top_logprobs
        offsets += lp.text_offset
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert tokens == choice.logprobs.tokens
    assert lps == choice.logprobs.token_logprobs
    assert tops == choice.logprobs.top_logprobs
    assert offsets == choice.logprobs.text_offset
    zero = client.completions.create(logprobs=0, extra_body=NO_EOS, **kw).choices[0]
    assert zero.logprobs.top_logprobs == [{}] * 14
    assert zero.logprobs.token_logprobs == choice.logprobs.token_logprobs


def test_chat_logprobs_plain_and_streamed(url):
    client = _client(url)
    kw = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": NO_EOS,
    }
    plain = client.chat.completions.create(logprobs=True, top_logprobs=4, **kw)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens == 12
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 4
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == values[0]  # greedy: the chosen token is the likeliest
        for t in entry.top_logprobs:
            assert t.bytes == list(t.token.encode("utf-8"))
    chunks = list(client.chat.completions.create(logprobs=True, top_logprobs=4, stream=True, **kw))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs is not None
        for e in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    only = client.chat.completions.create(logprobs=True, **kw).choices[0].logprobs.content
    assert [e.top_logprobs for e in only] == [[]] * 12
    assert [e.logprob for e in only] == [e.logprob for e in content]
    off = client.chat.completions.create(logprobs=False, **kw).choices[0]
    assert off.logprobs is None and off.message.content == plain.choices[0].message.content


def test_seeded_sampling_same_text_with_logprobs(url):
    client = _client(url)
    kw = {"model": MODEL, "prompt": "seed", "max_tokens": 16, "temperature": 0.9, "seed": 5}
    a = client.completions.create(**kw).choices[0]
    b = client.completions.create(logprobs=2, **kw).choices[0]
    assert a.text == b.text and b.logprobs is not None
    assert (
        len(b.logprobs.tokens)
        == client.completions.create(logprobs=2, **kw).usage.completion_tokens
    )


def test_result_cache_keys_on_logprobs(url):
    client = _client(url)
    kw = {"model": MODEL, "prompt": "cache logprobs", "max_tokens": 8, "temperature": 0}
    hits = "sentinel:cache_hits_total{cache=result}"
    before = _metrics(url).get(hits, 0.0)
    bare = client.completions.create(**kw).choices[0]
    with_lp = client.completions.create(logprobs=2, **kw).choices[0]  # a miss, not the bare one
    assert bare.logprobs is None and with_lp.logprobs is not None
    assert _metrics(url).get(hits, 0.0) == before
    again = client.completions.create(logprobs=2, **kw).choices[0]  # a hit, with its logprobs
    assert again.logprobs.model_dump() == with_lp.logprobs.model_dump()
    chunks = list(client.completions.create(logprobs=2, stream=True, **kw))  # replayed hit
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    lps = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == with_lp.logprobs.tokens and lps == with_lp.logprobs.token_logprobs
    assert _metrics(url)[hits] == before + 2


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": "2"}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ],
)
def test_bad_logprobs_get_openai_400s(url, path, body, param):
    full = {"model": MODEL, **body}
    if path.endswith("chat/completions"):
        full["messages"] = [{"role": "user", "content": "x"}]
    r = httpx.post(url + path, json=full)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    with pytest.raises(openai.BadRequestError):
        client = _client(url)
        if path.endswith("chat/completions"):
            client.chat.completions.create(
                model=MODEL, messages=full["messages"], extra_body=body, max_tokens=2
            )
        else:
            client.completions.create(model=MODEL, prompt="x", extra_body=body, max_tokens=2)

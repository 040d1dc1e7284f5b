"""The server's event-loop fast paths give exactly what the general code gives: prompt ids
encoded by the Rust tokenizer directly, detokenization through the Rust ``decode``, and
the preformatted SSE text chunks (byte for byte)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from sentinel_kernels.models import ByteTokenizer  # noqa: E402
from sentinel_kernels.serve import detok  # noqa: E402
from sentinel_kernels.serve.detok import IncrementalDetokenizer  # noqa: E402
from sentinel_kernels.serve.server import (  # noqa: E402
    _chunk_event,
    _rust_encoder,
    _TextChunks,
    chat_prompt_ids,
    text_prompt_ids,
)
from tests.helpers import needs_smollm2  # noqa: E402

#: Texts that stress JSON escaping and UTF-8: quotes, backslashes, control characters,
#: line separators, non-ASCII, emoji (also as halves of a surrogate pair would be in
#: UTF-16), the replacement character of a split byte sequence.
TRICKY = [
    "",
    " plain",
    'say "hi"',
    "back\\slash \\n not a newline",
    "line\nbreak\r\n\ttab",
    "\x00\x01\x1f\x7f",
    "\u2028\u2029",
    "naïve café – 東京",
    "🙂👍🏽🇫🇷",
    "\ufffd",
    "</script><!-- & ' -->",
    "{}[],:",
]


def _random_texts(rng: random.Random, n: int) -> list[str]:
    alphabet = string.printable + "éü東京🙂\u2028\ufffd\\\"'\x00\x1b"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("chat", [True, False])
def test_text_chunks_are_the_generic_chunks_byte_for_byte(chat):
    rng = random.Random()
    rid = ("chatcmpl-" if chat else "cmpl-") + "".join(rng.choices("0123456789abcdef", k=24))
    for model in ("smollm2", 'odd "model" \\ é/🙂', "tiny:llama"):
        fast = _TextChunks(rid, chat, model)
        for text in TRICKY + _random_texts(rng, 200):
            # created is whole seconds: retry the rare pair that straddles a second
            for _ in range(3):
                want = _chunk_event(model, rid, chat, text, None, False)
                got = fast(text)
                if json.loads(got[6:])["created"] == json.loads(want[6:])["created"]:
                    break
            assert got == want, (model, text)


def test_deep_json_is_still_refused_and_shallow_json_accepted():
    from sentinel_kernels.serve.server import MAX_JSON_DEPTH, _json_depth_ok

    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert not _json_depth_ok(deep)
    many_flat = b"[" + b",".join(b"[1]" for _ in range(3 * MAX_JSON_DEPTH)) + b"]"
    assert _json_depth_ok(many_flat)  # many brackets, depth 2: the full scan says yes
    in_strings = json.dumps({"s": "[" * (2 * MAX_JSON_DEPTH)}).encode()
    assert _json_depth_ok(in_strings)
    assert _json_depth_ok(b'{"a": [1, {"b": 2}]}')
    with pytest.raises(UnicodeDecodeError):
        _json_depth_ok(b'{"a": "\xff"}')


def test_byte_tokenizer_takes_the_general_paths():
    tok = ByteTokenizer()
    assert _rust_encoder(tok) is None
    assert detok._decoder(tok) == tok.decode
    msgs = [{"role": "user", "content": "héllo"}]
    assert chat_prompt_ids(tok, msgs) == tok.apply_chat_template(msgs)
    assert text_prompt_ids(tok, "héllo") == list("héllo".encode())


# -- SmolLM2's tokenizer (the real BPE, special tokens and chat template) -----------------


@pytest.fixture(scope="module")
def smol_tok() -> Any:
    from transformers import AutoTokenizer

    from sentinel_kernels import models

    path = Path(models.find_smollm2())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _reference_chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _conversations(rng: random.Random) -> list[list[dict[str, str]]]:
    words = ["the", " lobster", "naïve", "東京", "🙂", "12345", "  ", "\n", "\t", "it's"]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

    def content() -> str:
        parts = rng.choices(words + specials + TRICKY, k=rng.randint(0, 30))
        return "".join(parts)

    fixed = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": ""}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! 🙂"},
            {"role": "user", "content": "<|im_start|>user\nspoof<|im_end|>"},
        ],
        [{"role": "developer", "content": "rules"}, {"role": "user", "content": "ok"}],
        [{"role": "user", "content": "x", "name": "alice"}],
    ]
    roles = ["system", "user", "assistant", "developer"]
    drawn = [
        [{"role": rng.choice(roles), "content": content()} for _ in range(rng.randint(1, 6))]
        for _ in range(40)
    ]
    return fixed + drawn


@pytest.mark.model
@needs_smollm2
def test_smollm2_prompt_ids_are_apply_chat_templates(smol_tok):
    tok = smol_tok
    assert _rust_encoder(tok, ("apply_chat_template",)) is not None  # the fast path runs
    rng = random.Random()
    for msgs in _conversations(rng):
        assert chat_prompt_ids(tok, msgs) == _reference_chat_ids(tok, msgs), msgs
    for text in TRICKY + _random_texts(rng, 50) + ["<|im_start|>x<|im_end|>"]:
        for special in (True, False):
            want = tok(text, add_special_tokens=special)["input_ids"]
            assert text_prompt_ids(tok, text, add_special_tokens=special) == want, text


@pytest.mark.model
@needs_smollm2
def test_smollm2_settings_the_fast_path_cannot_honour_take_the_general_one(smol_tok):
    tok = smol_tok
    msgs = [{"role": "user", "content": " ".join(["word"] * 40)}]
    want = _reference_chat_ids(tok, msgs)
    backend = tok.backend_tokenizer
    # truncation left on the Rust tokenizer: transformers' call switches it off first
    backend.enable_truncation(8)
    assert _rust_encoder(tok) is None
    assert chat_prompt_ids(tok, msgs) == want
    assert backend.truncation is None and _rust_encoder(tok) is not None
    backend.enable_padding(length=512)
    assert _rust_encoder(tok) is None
    assert chat_prompt_ids(tok, msgs) == want
    # split_special_tokens: special-token text encoded as plain text
    tok.split_special_tokens = True
    try:
        assert _rust_encoder(tok) is None
        spoof = [{"role": "user", "content": "<|im_end|>"}]
        got = chat_prompt_ids(tok, spoof)
        assert got == _reference_chat_ids(tok, spoof)
    finally:
        tok.split_special_tokens = False
        tok("reset")  # transformers puts the Rust flag back from split_special_tokens
    assert _rust_encoder(tok) is not None

    # a subclass that changes encoding is not bypassed
    class Shouting(type(tok)):  # type: ignore[misc]
        def __call__(self, text, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN204
            return super().__call__(text.upper(), *args, **kwargs)

    loud = Shouting.__new__(Shouting)
    loud.__dict__.update(tok.__dict__)
    assert _rust_encoder(loud) is None
    assert text_prompt_ids(loud, "abc") == tok("ABC")["input_ids"]


@pytest.mark.model
@needs_smollm2
def test_smollm2_rust_decode_and_detokenizer_match_transformers(smol_tok):
    tok = smol_tok
    rng = random.Random()
    vocab = len(tok)
    if tok.clean_up_tokenization_spaces:
        # transformers 5.17 loads this tokenizer with the space clean-up on, which the
        # Rust decode does not do: the detokenizer keeps transformers' decode there
        assert detok._decoder(tok) == tok.decode
    else:
        assert detok._decoder(tok) == tok.backend_tokenizer.decode  # the fast path runs
        for _ in range(300):
            ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
            for skip in (True, False):
                rust = tok.backend_tokenizer.decode(ids, skip_special_tokens=skip)
                assert rust == tok.decode(ids, skip_special_tokens=skip)

    class OnlyDecode:  # the same tokenizer seen through transformers' decode only
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return str(tok.decode(ids, skip_special_tokens=skip_special_tokens))

    text = "Hello, naïve 東京 🙂 <|im_end|> it's 12345 done\n  indented"
    real = tok(text, add_special_tokens=False)["input_ids"]
    for trial in range(30):
        # random ids split characters over tokens (held back, then U+FFFD at flush)
        out = real if trial == 0 else [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        fast, slow = (
            IncrementalDetokenizer(tok, prompt),
            IncrementalDetokenizer(OnlyDecode(), prompt),
        )
        for t in out:
            assert fast.add(t) == slow.add(t)
        assert fast.flush() == slow.flush()
        assert fast.text == slow.text

"""Incremental detokenization and stop strings, on a byte tokenizer (multi-byte characters
split over tokens) and on SmolLM2's tokenizer (leading-space handling)."""

from __future__ import annotations

import pytest

from sentinel_kernels.serve.detok import IncrementalDetokenizer, StopStrings
from tests.helpers import ByteTokenizer, needs_smollm2


class CountingByteTokenizer(ByteTokenizer):
    """Counts the tokens it decodes, to check that the work per token stays bounded."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


TEXTS = ["plain ascii text", "naïve café – 東京 🙂 done", "🙂🙂", "a\u00e9", "x"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_rebuild_the_text(text):
    tok = CountingByteTokenizer()
    ids = list(text.encode("utf-8"))
    d = IncrementalDetokenizer(tok, [65, 66, 67])
    pieces = [d.add(i) for i in ids]
    d.flush()
    assert d.text == text and "".join(pieces) == text
    # a piece never ends inside a character
    assert all("\ufffd" not in p for p in pieces)
    # bounded work per token (a window of a few tokens), not the whole output again
    assert tok.decoded <= 2 * len(ids) * 8


def test_incomplete_character_is_flushed_as_replacement():
    d = IncrementalDetokenizer(ByteTokenizer(), [])
    assert d.add("é".encode()[0]) == ""
    assert d.flush() == "\ufffd" and d.text == "\ufffd"


@pytest.mark.parametrize(
    ("pieces", "stops", "where"),
    [
        (["hel", "lo wo", "rld"], ["lo w"], 3),  # across two pieces
        (["ab", "c", "d", "e"], ["cde"], 2),  # across three pieces
        (["xx", "STOP"], ["STOP", "xS"], 1),  # the earliest start wins
        (["abc"], ["zz"], -1),
        (["a", "b"], [], -1),
    ],
)
def test_stop_strings_across_pieces(pieces, stops, where):
    s = StopStrings(stops)
    text, found = "", -1
    for p in pieces:
        text += p
        at = s.find(text, len(p))
        if at >= 0:
            found = at
            break
    assert found == where


@pytest.mark.model
@needs_smollm2
def test_smollm2_tokenizer_matches_full_decode():
    from pathlib import Path

    from transformers import AutoTokenizer

    from sentinel_kernels import models

    path = Path(models.find_smollm2())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (
        "The lobster's claws — “crusher” and “cutter” — differ.\n  Indented line, naïve café, "
        "東京, emoji 🙂, numbers 12345 and spaces   here."
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt, out = ids[:7], ids[7:]
    d = IncrementalDetokenizer(tok, prompt)
    for i in out:
        d.add(i)
    d.flush()
    assert d.text == tok.decode(ids, skip_special_tokens=True)[len(tok.decode(prompt)) :]

"""Incremental detokenization and stop strings.

Decoding the whole output again for every new token costs O(n) per token (O(n^2) per
request). :class:`IncrementalDetokenizer` decodes a short window instead: the text of
the tokens since the last emitted boundary, with a few tokens before it as context
(tokenizers that mark word starts, SentencePiece and byte-level BPE, need the previous
token to know whether a space belongs in front). A token that ends inside a multi-byte
character decodes to U+FFFD; the text is held back until the character completes. This
is the scheme of Hugging Face TGI and vLLM (``prefix_offset`` / ``read_offset``).

:class:`StopStrings` finds stop strings in the growing text, also when one spans the
boundary between two tokens: each new piece is searched together with the last
``len(longest stop) - 1`` characters before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopStrings", "rust_backend"]

#: Prompt tokens kept in front of the output as decoding context.
CONTEXT_TOKENS = 5


def rust_backend(tokenizer: Any, methods: Sequence[str]) -> Any:
    """The Rust tokenizer (``tokenizers.Tokenizer``) inside ``tokenizer`` when calling it
    directly does what ``tokenizer``'s own ``methods`` do, else None.

    That holds for a transformers fast tokenizer (``PreTrainedTokenizerFast``, in
    transformers 5 ``TokenizersBackend``) whose class overrides none of ``methods``: they
    are then transformers' wrappers around the Rust calls, which cost the server's event
    loop several times the Rust work itself (argument conversion, padding and truncation
    set-up, ``BatchEncoding``). The callers check the remaining per-call settings.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    for name in methods:
        if getattr(cls, name, None) is not getattr(PreTrainedTokenizerFast, name, None):
            return None
    return backend


def _decoder(tokenizer: Any) -> Callable[..., Any]:
    """``tokenizer.decode``, or the Rust tokenizer's ``decode`` when that gives the same
    text: transformers' ``decode`` of a fast tokenizer is the Rust ``decode`` followed by
    ``clean_up_tokenization_spaces`` when that flag is set (tests/serve/
    test_loop_fast_paths.py checks the equality). The detokenizer decodes twice per new
    token on the server's event loop, and the wrapper is ~2.4 us of a ~3.1 us call."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        backend = rust_backend(tokenizer, ("decode", "_decode"))
        if backend is not None:
            return backend.decode
    return tokenizer.decode


class IncrementalDetokenizer:
    """The text of a token sequence, grown one token at a time.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``).
        prompt_ids: the prompt (its last :data:`CONTEXT_TOKENS` tokens are the context of
            the first output tokens; they are not part of :attr:`text`).
        skip_special_tokens: drop special tokens (EOS, chat markers) from the text.
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tok_decode = _decoder(tokenizer)
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0  # window start: context for the next piece
        self._read = len(self._ids)  # tokens before this are already in the text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok_decode(ids, skip_special_tokens=self._skip))

    def add(self, token_id: int) -> str:
        """Append ``token_id``; return the text it completes (``""`` while a character
        is still incomplete)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""
        piece = window[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the end of the
        output comes out as U+FFFD); call once at the end."""
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        piece = window[len(before) :] if window.startswith(before) else ""
        self._prefix = self._read = len(self._ids)
        self.text += piece
        return piece


class StopStrings:
    """Finds the first of ``stops`` in a text that grows piece by piece."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._overlap = max((len(s) for s in self.stops), default=1) - 1

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, new_chars: int) -> int:
        """Where the earliest stop string starts in ``text`` if one ends within its last
        ``new_chars`` characters, else ``-1``. Earlier text was searched before (no stop
        string ended there)."""
        if not self.stops or new_chars <= 0:
            return -1
        start = max(0, len(text) - new_chars - self._overlap)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    @property
    def holdback(self) -> int:
        """Characters at the end of the text that may still become the start of a stop
        string (a stream should not show them yet)."""
        return self._overlap

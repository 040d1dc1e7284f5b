"""What a request asks for: :class:`SamplingParams` (checked on construction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams"]

#: Seeds are 63-bit non-negative integers (what ``torch.Generator.manual_seed`` takes
#: without wrapping, and what JSON clients can send).
MAX_SEED = 2**63 - 1
#: The most alternatives ``logprobs`` may ask for per token (OpenAI's chat limit).
MAX_LOGPROBS = 20


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (the OpenAI / vLLM names and meanings).

    Args:
        max_tokens: the most new tokens (``>= 1``); the request ends with
            ``finish_reason="length"`` when it gets them.
        temperature: ``0`` picks the most likely token (greedy, bit-equal to
            ``sk.generate`` of the request alone); ``> 0`` samples from
            ``softmax(logits / temperature)`` after the top-k / top-p filters.
        top_p: nucleus filter in ``(0, 1]`` (1 = off; Holtzman et al. 2020).
        top_k: keep the ``k`` most likely tokens (``0`` = off).
        seed: a non-negative int: the request's own random stream (on the device), so
            its samples do not depend on what it was batched with; ``None``: a fresh
            random seed per request.
        stop: strings that end the request (``finish_reason="stop"``); the text stops
            before the first one found, also across token boundaries. A single string is
            accepted.
        stop_token_ids: token ids that end the request (kept as its last token).
        ignore_eos: do not stop at the model's end-of-sequence tokens.
        logprobs: ``None`` (off) or ``n`` in ``[0, 20]``: with each new token, return its
            log-probability and the ``n`` most likely tokens' (OpenAI's convention: the
            chosen token comes on its own, and among the ``n`` only if it is one of them).
            They are ``log_softmax`` of the model's next-token logits in float32, before
            temperature, top-k and top-p (vLLM's default "raw" log-probabilities); with
            kNN-LM, of the kNN-LM mixture the token is drawn from (before temperature).
            Asking for them changes no token.

    Raises:
        TypeError: a field of the wrong type. ValueError: a value out of range.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default=())
    stop_token_ids: Sequence[int] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens):
            raise TypeError(f"max_tokens must be an int, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not _is_number(self.temperature):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        if not (0.0 <= float(self.temperature) < float("inf")):
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not _is_number(self.top_p):
            raise TypeError(f"top_p must be a number, got {self.top_p!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be an int or None, got {self.seed!r}")
            if not 0 <= self.seed <= MAX_SEED:
                raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(map(_is_int, ids)):
            raise TypeError(f"stop_token_ids must be a sequence of ints, got {ids!r}")
        if any(i < 0 for i in ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {list(ids)}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            if not _is_int(self.logprobs):
                raise TypeError(f"logprobs must be an int or None, got {self.logprobs!r}")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be in [0, {MAX_LOGPROBS}] (None = off), got {self.logprobs}"
                )
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        """Whether the request picks the most likely token (``temperature == 0``)."""
        return self.temperature == 0.0

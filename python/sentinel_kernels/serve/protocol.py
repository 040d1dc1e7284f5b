"""The OpenAI API bodies the server takes, as pydantic models (checked on arrival).

Field names, defaults and meanings follow OpenAI's ``/v1/completions`` and
``/v1/chat/completions``; two extensions common to vLLM and TGI: ``top_k`` and
``ignore_eos``. Fields this server cannot honour are refused with a 400 that names them
(``n > 1``, ``echo``, ``suffix``, penalties, ``logit_bias``), never silently ignored;
unknown fields are refused too (``extra="forbid"``), so a typo is not mistaken for a
setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .params import MAX_SEED

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "StreamOptions", "UnsupportedField"]

#: Upper bound of ``max_tokens`` accepted at parse time (the engine's ``max_seq_len`` is
#: the real limit; this keeps absurd numbers out of arithmetic).
MAX_TOKENS_LIMIT = 1 << 20
_Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
_TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
_TokenId = Annotated[StrictInt, Field(ge=0, lt=1 << 31)]
_StopList = Annotated[list[StrictStr], Field(max_length=16)]


class UnsupportedField(ValueError):
    """A request asks for something this server does not do (a 400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` sends a last chunk with the token counts."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: _Temperature = 1.0
    top_p: _TopP = 1.0
    top_k: Annotated[StrictInt, Field(ge=0, le=1 << 20)] = 0
    n: Annotated[StrictInt, Field(ge=1, le=128)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | _StopList | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    ignore_eos: StrictBool = False
    presence_penalty: _Penalty = 0.0
    frequency_penalty: _Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    user: StrictStr | None = None

    def check_supported(self) -> None:
        """Raise :class:`UnsupportedField` for a setting this server cannot honour."""
        if self.n != 1:
            raise UnsupportedField("n", "n > 1 is not supported: send one request per choice")
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedField(
                "presence_penalty" if self.presence_penalty else "frequency_penalty",
                "presence and frequency penalties are not supported (use 0)",
            )
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options needs stream: true")

    def stops(self) -> tuple[str, ...]:
        """``stop`` as a tuple of strings."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is text or token ids (one prompt)."""

    prompt: StrictStr | Annotated[list[_TokenId], Field(min_length=1, max_length=1 << 20)]
    #: The most likely tokens to return with each new token (0..5, OpenAI's limit for
    #: this endpoint); the chosen token's log-probability comes with any value.
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        """As :meth:`_Sampling.check_supported`, plus ``echo`` and ``suffix``."""
        super().check_supported()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")

    def logprobs_count(self) -> int | None:
        """``SamplingParams.logprobs``: alternatives per token, or None (off)."""
        return self.logprobs


class ChatMessage(BaseModel):
    """One chat message: a role and its text."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr
    name: StrictStr | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` through the tokenizer's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None

    def check_supported(self) -> None:
        """As :meth:`_Sampling.check_supported`, plus ``top_logprobs`` without ``logprobs:
        true`` (as OpenAI)."""
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")

    def logprobs_count(self) -> int | None:
        """``SamplingParams.logprobs``: ``top_logprobs`` (0 when not given) with
        ``logprobs: true``, else None (off)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

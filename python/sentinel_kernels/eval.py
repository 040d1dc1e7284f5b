"""Evaluation: perplexity of a causal LM on a text.

The reference number of the design ("SmolLM2-135M wikitext-2 PPL, first 40x1024 tokens") is
``perplexity(model, tok, open("test.txt").read(), window=1024, max_windows=40)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import kv_cache
from .hf_compat import cache_kwargs
from .knn.lm import KnnScorer, capture_lm_head_input
from .nn import attention as sk_attention

__all__ = ["perplexity", "token_ids"]


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise ``text`` once, as one sequence, and return its ids as a 1-D int64 tensor.

    The tokenizer is called the standard way (``tokenizer(text)``), so it adds exactly the
    special tokens it adds by default: none for SmolLM2 and GPT-2, one leading BOS for
    tokenizers configured with ``add_bos_token`` (Llama-2 style). No separator or BOS is
    inserted between windows later; the text is one token stream.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty")
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return torch.tensor(ids, dtype=torch.long)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    window: int = 1024,
    max_windows: int | None = None,
    stride: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    chunk: int | None = None,
    cache: str | None = None,
    knn: Any = None,
    knn_k: int = 32,
    knn_lambda: float = 0.25,
    knn_temperature: float = 1.0,
) -> float:
    """Perplexity of ``model`` on ``text``: ``exp(sum of token NLL / number of predicted
    tokens)``.

    The text is tokenised once with :func:`token_ids` (the tokenizer's default special
    tokens, no others) into one stream of ``N`` tokens. Window ``i`` covers tokens
    ``[i*stride, i*stride + window)`` (the last one may be shorter) and is run through the
    model in one forward pass (batch 1, no KV cache, under ``torch.inference_mode``); token
    ``t`` of a window is predicted from the window's tokens before it (labels shifted inside
    the window). With ``stride == window`` (the default) the windows do not overlap and
    each predicts ``window - 1`` tokens (its first token has no context). With
    ``stride < window`` a token is scored only by the first window in which it is not yet
    scored, so every token after the first is scored exactly once, with up to
    ``window - stride`` tokens of extra context (the usual sliding-window evaluation).

    The NLL is computed in float32 from the model's logits (``cross_entropy``), summed in
    float64. The model is put in eval mode for the call and its training flag restored.

    Args:
        model: a causal LM whose forward takes ``input_ids`` ``[1, L]`` (int64) and returns
            an object with ``.logits`` ``[1, L, vocab]`` (a transformers ``*ForCausalLM``).
        tokenizer: the model's tokenizer (callable, returning ``{"input_ids": [...]}``).
        text: the evaluation text, e.g. the whole WikiText-2 test file.
        window: tokens per forward pass (>= 2).
        max_windows: evaluate only the first ``max_windows`` windows (``None``: all). The
            design's reference is ``window=1024, max_windows=40``.
        stride: start-to-start distance of windows, ``1 <= stride <= window``; default
            ``window``.
        device: where the token ids go; default the device of the model's first parameter.
        progress: show a tqdm progress bar over windows.
        chunk, cache: chunked evaluation through a KV cache (either one turns it on;
            ``chunk`` defaults to 32, ``cache`` to ``"dense"``). Each window is fed
            ``chunk`` tokens at a time, ``model(input_ids=piece, cache=kv,
            use_cache=True)``, into one ``sk.kv_cache(model, cache, max_cache_len=window)``
            reset before every window (the model runs the ``"sentinel"`` attention for the
            call; its previous implementation is restored afterwards). What reads what: the
            first chunk of a window goes into an empty cache, so its queries attend over
            its own keys/values in full precision (the prefill path; the keys are
            quantized into the cache on the way); every later chunk is appended first and
            its queries then read *all* their keys, the chunk's own included, from the
            compressed cache (``sk.ops.decode_attention``, 64 queries at a time; int4's
            recent window is read in full precision). ``cache`` is ``"dense"``,
            ``"int8"``, ``"int4"`` or ``"lowrank:<r>"`` (needs calibrated bases on the
            model). With ``cache="dense"`` the result equals the one-pass windows up to
            floating-point rounding.

    Returns:
        The perplexity (a Python float, > 1 for any real model).

    Raises:
        ValueError: empty text, ``window < 2``, bad ``stride``/``max_windows``/``chunk``,
            fewer than 2 tokens, bad ``knn_*`` settings.
        sentinel_kernels.knn.DatastoreMismatchError: ``knn`` belongs to another model.
    """
    scorer = None
    if knn is not None:
        scorer = KnnScorer(knn, knn_k, knn_lambda, knn_temperature, use_cache=True)
        knn.check_model(model)
    chunked = chunk is not None or cache is not None
    chunk_len = 32 if chunk is None else chunk
    cache_spec = "dense" if cache is None else cache
    if chunked and (isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1):
        raise ValueError(f"chunk must be an int >= 1; got {chunk_len!r}")
    if window < 2:
        raise ValueError(
            f"window must be >= 2 (one token of context, one to predict); got {window}"
        )
    if stride is None:
        stride = window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}]; got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None; got {max_windows}")

    ids = token_ids(tokenizer, text)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"text has {n} token(s); perplexity needs at least 2")

    # Window starts: every window until one reaches the end of the stream.
    starts: list[int] = []
    begin = 0
    while True:
        starts.append(begin)
        if begin + window >= n:
            break
        begin += stride
    if max_windows is not None:
        starts = starts[:max_windows]

    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    scored_until = 1  # positions < scored_until are scored already (position 0 never is)
    restore_attention = _use_sentinel(model) if chunked else None
    hidden: list[torch.Tensor] = []
    capture = (
        capture_lm_head_input(model, hidden) if scorer is not None else contextlib.nullcontext()
    )
    try:
        with capture, torch.inference_mode():
            kv = None
            if chunked:
                kv = kv_cache(model, cache_spec, max_cache_len=window, device=dev)
            desc = (
                f"perplexity ({cache_spec} cache, chunk {chunk_len})" if chunked else "perplexity"
            )
            for begin in tqdm(starts, desc=desc, unit="window", disable=not progress):
                end = min(begin + window, n)
                first = max(scored_until, begin + 1)  # first position this window scores
                if first >= end:
                    continue
                x = ids[begin:end].unsqueeze(0).to(dev)
                hidden.clear()
                if kv is None:
                    logits = model(input_ids=x, use_cache=False).logits
                else:
                    kv.reset()
                    logits = torch.cat(
                        [
                            model(
                                input_ids=x[:, c : c + chunk_len],
                                use_cache=True,
                                **cache_kwargs(model, kv),
                            ).logits
                            for c in range(0, x.shape[1], chunk_len)
                        ],
                        dim=1,
                    )
                # logits[:, j] predicts token j + 1 of the window.
                pred = logits[0, first - begin - 1 : end - begin - 1].float()
                target = x[0, first - begin : end - begin]
                if scorer is None:
                    nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
                else:
                    h = torch.cat(hidden, dim=1)[0, first - begin - 1 : end - begin - 1]
                    logp = scorer(pred, h)
                    nll = torch.nn.functional.nll_loss(
                        logp.to(target.device), target, reduction="sum"
                    )
                total_nll += float(nll.double())
                total_tokens += end - first
                scored_until = end
    finally:
        model.train(was_training)
        if restore_attention is not None:
            restore_attention()
    return math.exp(total_nll / total_tokens)


def _use_sentinel(model: torch.nn.Module) -> Any:
    """Switch ``model`` to the sentinel attention (which reads the compressed cache) for a
    chunked evaluation; returns the callable that switches it back."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous == sk_attention.ATTN_IMPLEMENTATION:
        return lambda: None
    ok, reason = sk_attention.supports_sentinel_attention(model)
    if not ok:
        raise NotImplementedError(f"perplexity(cache=...) needs the sentinel attention: {reason}")
    sk_attention.register()
    sk_attention._set_implementation(model, sk_attention.ATTN_IMPLEMENTATION)
    return lambda: sk_attention._set_implementation(model, previous)

"""Next-token selection on the device: greedy, temperature, top-k, top-p.

Everything here is tensor ops on the logits' device with no host sync, so a decode loop
can pick tokens without waiting for the GPU. Sampling draws one categorical sample per row
with the exponential race (``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` is distributed as
``p``, the Gumbel-max trick written with exponentials), which needs one random tensor and
an argmax instead of a CDF search.
"""

from __future__ import annotations

import torch

__all__ = ["check_sampling_args", "eos_hit", "filter_logits", "sample_next"]


def check_sampling_args(
    do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Raise ``ValueError`` for settings :func:`sample_next` cannot honour."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """``logits / temperature`` in float32 with tokens outside the top-k and outside the
    top-p nucleus set to ``-inf``.

    top-k keeps the ``k`` largest logits (ties at the k-th value are all kept, as in
    transformers' ``TopKLogitsWarper``). top-p (Holtzman et al. 2020) keeps the smallest
    set of most likely tokens whose probability reaches ``top_p`` (always at least one).
    Applied in that order (transformers' order for ``generate``).

    Args:
        logits: ``[B, V]`` any float dtype.
    Returns:
        float32 ``[B, V]``.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    vocab = x.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # mass strictly before each token: drop tokens once the kept set already has top_p
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: ``argmax`` (greedy) or a sample of
    ``softmax(filter_logits(logits))``.

    Args:
        logits: ``[B, V]``.
        generator: the random source of sampling (on the logits' device); ``None`` uses
            torch's default one.
    Returns:
        int64 ``[B]``.
    """
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    x = filter_logits(logits, temperature, top_k, top_p)
    probs = torch.softmax(x, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / race, dim=-1)


def eos_hit(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Which of ``tokens`` (any shape, int64) are one of the end ids ``eos`` ``[E]``:
    ``out[...] = any_e(tokens[...] == eos[e])``, bool, the shape of ``tokens``.

    A broadcast compare rather than ``torch.isin``: for a long ``eos`` (e.g. every id of
    the vocabulary, which bench_engine uses to stop its warm-up runs early) ``isin``
    sorts, and that cannot be captured in a CUDA graph. Cost is ``tokens.numel() * E``
    compares, nothing for the usual one to three end ids.
    """
    return (tokens.unsqueeze(-1) == eos).any(-1)

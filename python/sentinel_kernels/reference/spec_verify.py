"""Reference speculative-decoding verification: the oracle of ``sk.ops.speculative_verify``.

A draft model proposed ``k`` tokens ``x_0 .. x_{k-1}`` per row; the target model scored the
``k + 1`` positions (``target_logits [B, k+1, V]``: position ``i`` predicts the token after
``x_{i-1}``). Verification decides how many drafts to keep and emits one more token, so
every call yields between 1 and ``k + 1`` tokens per row.

Greedy (``temperature == 0``; draft probabilities, if given, are ignored)
    ``t_i = argmax_j target_logits[b, i, j]`` (ties: the lowest index, as ``torch.argmax``);
    ``n`` = the number of leading ``i < k`` with ``x_i == t_i``; emitted: the ``n`` accepted
    drafts, then ``t_n`` (the correction when ``n < k``, the bonus argmax of position ``k``
    when all ``k`` were accepted).

Sampling (``temperature > 0``): exact rejection sampling (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling"). Per position ``i``:

* ``xs_i = target_logits[b, i] * inv_t`` in fp32, ``inv_t = float32(1 / temperature)``
  (a multiply by the rounded reciprocal, identical on every backend);
* filter: the tokens kept are those with ``xs_i[j] >= thr_i``, ``thr_i`` from
  :func:`filter_thresholds` (top-k, then top-p, as
  :func:`sentinel_kernels.decoding.sampling.filter_logits`; ``-inf`` without a filter);
* ``p_i = softmax(xs_i over the kept tokens)`` (0 elsewhere);
* ``q_i = draft_probs[b, i]`` as given (the distribution the drafts were drawn from), or
  ``softmax`` of ``draft_logits[b, i] * inv_t`` filtered the same way (its own thresholds);
* for ``i = 0 .. k-1``: accept ``x_i`` iff ``u_i * q_i(x_i) < p_i(x_i)`` (that is
  ``u_i < min(1, p/q)``; with ``q_i(x_i) = 0`` it accepts iff ``p_i(x_i) > 0``);
* at the first rejection ``n``: emit a sample of ``normalize(max(0, p_n - q_n))`` (when
  that residual is all zero, which exact arithmetic rules out, a sample of ``p_n``); if all
  ``k`` were accepted, emit a sample of ``p_k`` (the bonus token).

The emitted token then follows ``p_i`` exactly at every position, whatever ``q`` is.
A draft token outside ``[0, V)`` gets ``p = q = 0`` (always rejected; greedy: never
equals the argmax), so bad drafts cannot make a kernel read out of bounds.

Random numbers are counter based, so every backend draws the same ones. ``rng`` is an int64
tensor ``[seed, offset]``; the ``c``-th number is ``philox(seed, offset + c)``: the first
32-bit word of Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3") with key ``(seed_lo, seed_hi)`` and counter ``(c_lo, c_hi, 0, 0)`` -- exactly
Triton's ``tl.randint(seed, offset + c)`` -- turned into ``u = ((r >> 9) + 0.5) * 2**-23``,
a float32 in the open interval ``(0, 1)`` (exact in fp32, never 0 or 1). Row ``b`` uses
counters ``b * (k + V) + c`` for ``c < k + V``:

* ``c = i < k``: ``u_i``, the acceptance test of draft ``i``;
* ``c = k + j``: ``E_j = -log(u)``, the exponential of token ``j`` in the race that draws
  the emitted token: ``argmax_j w_j / E_j`` is distributed as ``w / sum(w)`` (the
  exponential race, i.e. the Gumbel-max trick). The residual race uses ``w_j = max(0, p_j -
  q_j)``; the race of ``p`` uses the equivalent form ``argmax_j xs_j - log E_j`` over the
  kept tokens (no normaliser needed). Ties go to the lowest index.

One call uses ``B * (k + V)`` counters (:func:`random_count`); the op advances ``rng[1]``
by that much. Greedy verification uses none.
"""

from __future__ import annotations

import math
import struct

import torch

__all__ = [
    "filter_thresholds",
    "greedy_advance",
    "inv_temperature",
    "philox_uint32",
    "random_count",
    "speculative_verify",
    "uniform_from_bits",
]

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10


def random_count(batch: int, k: int, vocab: int) -> int:
    """Counters one sampling call uses: ``batch * (k + vocab)`` (greedy uses none)."""
    return batch * (k + vocab)


def inv_temperature(temperature: float) -> float:
    """``1 / temperature`` rounded to float32 (nearest even; ``inf`` when it overflows):
    every backend scales logits by this value."""
    try:
        return struct.unpack("f", struct.pack("f", 1.0 / float(temperature)))[0]
    except OverflowError:
        return math.inf


def _mulhilo(a: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * const`` for ``a`` in ``[0, 2**32)`` (int64).

    Split into 16-bit halves so that no partial product overflows int64.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    c_hi, c_lo = const >> 16, const & 0xFFFF
    low = a_lo * c_lo
    mid = a_hi * c_lo + a_lo * c_hi  # < 2**33
    low_sum = low + ((mid & 0xFFFF) << 16)
    lo = low_sum & _MASK32
    hi = a_hi * c_hi + (mid >> 16) + (low_sum >> 32)
    return hi & _MASK32, lo


def philox_uint32(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """First word of Philox4x32-10 for ``key = seed``, ``counter = (lo, hi, 0, 0)``.

    Bit-identical to Triton's ``tl.randint(seed, counter)`` with an int64 counter.

    Args:
        seed: int64 scalar tensor (any value; its two 32-bit halves are the key).
        counter: int64 tensor of counters.
    Returns:
        int64 tensor of ``counter``'s shape with values in ``[0, 2**32)``.
    """
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seed & _MASK32).expand_as(c0)
    k1 = ((seed >> 32) & _MASK32).expand_as(c0)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """``((bits >> 9) + 0.5) * 2**-23`` as float32: uniform on the open interval ``(0, 1)``."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def _uniforms(rng: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    seed, offset = rng[0], rng[1]
    return uniform_from_bits(philox_uint32(seed, offset + counters))


def filter_thresholds(
    xs: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Per-row threshold of top-k / top-p filtering: a token is kept iff ``xs >= thr``.

    Follows :func:`sentinel_kernels.decoding.sampling.filter_logits` applied to already
    scaled logits: top-k keeps every token ``>=`` the k-th largest value (ties kept), then
    top-p keeps the shortest run of most likely tokens (sorted descending, probabilities of
    the top-k-filtered softmax) whose mass *before* a token is ``< top_p`` (at least one).
    One documented difference: when tokens tied in value straddle the top-p boundary, the
    threshold keeps all of them, whereas ``filter_logits`` keeps whichever ones
    ``torch.sort`` happens to put first (its order among equal keys is unspecified).

    Torch ops on the input's device, no host sync (``topk``, ``sort``, ``cumsum``).

    Args:
        xs: ``[..., V]`` float32 scaled logits.
    Returns:
        float32 ``[...]``; ``-inf`` where nothing is filtered.
    """
    vocab = xs.shape[-1]
    thr = torch.full(xs.shape[:-1], float("-inf"), dtype=torch.float32, device=xs.device)
    if top_k is not None and top_k < vocab:
        thr = torch.topk(xs, top_k, dim=-1).values[..., -1].float()
    if top_p is not None and top_p < 1.0:
        x = xs.masked_fill(xs < thr.unsqueeze(-1), float("-inf"))
        sorted_x = torch.sort(x, dim=-1, descending=True).values
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        kept = (before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
        thr_p = sorted_x.gather(-1, kept - 1).squeeze(-1)
        thr = torch.maximum(thr, thr_p)
    return thr


def _filtered(xs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    thr = filter_thresholds(xs, top_k, top_p)
    return xs.masked_fill(xs < thr.unsqueeze(-1), float("-inf"))


def _first_max_index(keys: torch.Tensor) -> torch.Tensor:
    """Index of the maximum along the last dim, the lowest one among ties."""
    vocab = keys.shape[-1]
    best = keys.amax(dim=-1, keepdim=True)
    idx = torch.arange(vocab, device=keys.device).expand_as(keys)
    return torch.where(keys == best, idx, vocab).amin(dim=-1)


def greedy_advance(
    logits: torch.Tensor,
    out: torch.Tensor,
    col: torch.Tensor,
    tok: torch.Tensor,
    pos: torch.Tensor,
    finished: torch.Tensor | None = None,
    eos: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> None:
    """One greedy decode step's token and bookkeeping, in place (``ops.greedy_advance``):

    ``t[b] = argmax_v logits[b, v]`` (the lowest index among ties, as ``torch.argmax``);
    with ``finished``: ``t[b] = pad`` where ``finished[b]``, then
    ``finished[b] |= t[b] in eos``; then ``out[b, col] = t[b]``, ``col += 1``,
    ``tok[b, 0] = t[b]``, ``pos[b, 0] += 1``. This is speculative verification with no
    drafts (the emitted token is the bonus argmax) plus the decode loop's bookkeeping.
    """
    t = torch.argmax(logits, dim=-1)
    if finished is not None:
        assert eos is not None and pad is not None
        t = torch.where(finished, pad, t)
        finished.logical_or_((t[:, None] == eos[None, :]).any(dim=-1))
    out.index_copy_(1, col, t[:, None])
    col.add_(1)
    tok.copy_(t[:, None])
    pos.add_(1)


def _emit(draft_tokens: torch.Tensor, n: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``[B, k+1]`` int64: drafts before ``n``, ``last`` at ``n``, ``-1`` after."""
    b, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=n.device).expand(b, k + 1)
    drafts = torch.cat([draft_tokens.long(), draft_tokens.new_zeros(b, 1).long()], dim=1)
    out = torch.where(pos < n[:, None], drafts, -1)
    return torch.where(pos == n[:, None], last[:, None], out)


def _leading_true(ok: torch.Tensor) -> torch.Tensor:
    """Number of leading True values per row of a ``[B, k]`` bool tensor (int64)."""
    return ok.long().cumprod(dim=-1).sum(dim=-1)


def speculative_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    draft_logits: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``k`` draft tokens per row against the target's logits (rules: module doc).

    Args:
        draft_tokens: ``[B, k]`` int32/int64.
        draft_probs: ``[B, k, V]`` float, the draft distribution (sampling; or None).
        target_logits: ``[B, k+1, V]`` float.
        temperature: 0 = greedy, > 0 = rejection sampling at this temperature.
        top_k, top_p: filtering of target (and draft logits) before the softmax.
        draft_logits: ``[B, k, V]``, alternative to ``draft_probs``.
        rng: int64 ``[2]`` = (seed, offset), required when sampling; not modified here.
    Returns:
        ``(num_accepted [B] int64, tokens [B, k+1] int64)``; ``tokens[b, n+1:] = -1``.
    """
    b, k1, vocab = target_logits.shape
    k = k1 - 1
    dev = target_logits.device
    tok = draft_tokens.long()
    valid = (tok >= 0) & (tok < vocab)
    safe = torch.where(valid, tok, 0).unsqueeze(-1)
    if temperature == 0:
        t = _first_max_index(target_logits.float())  # [B, k+1]
        n = _leading_true(valid & (tok == t[:, :k]))
        return n, _emit(draft_tokens, n, t.gather(1, n[:, None]).squeeze(1))

    if rng is None:
        raise ValueError("the reference needs rng = (seed, offset) when sampling")
    inv_t = torch.tensor(inv_temperature(temperature), dtype=torch.float32, device=dev)
    f = _filtered(target_logits.float() * inv_t, top_k, top_p)  # [B, k+1, V]
    p = torch.softmax(f, dim=-1)
    if draft_logits is not None:
        q = torch.softmax(_filtered(draft_logits.float() * inv_t, top_k, top_p), dim=-1)
    elif draft_probs is not None:
        q = draft_probs.float()
    elif k == 0:
        q = p.new_zeros(b, 0, vocab)
    else:
        raise ValueError("sampling needs draft_probs or draft_logits")

    base = torch.arange(b, device=dev, dtype=torch.int64)[:, None] * (k + vocab)
    u = _uniforms(rng, base + torch.arange(k, device=dev))  # [B, k]
    e = -torch.log(_uniforms(rng, base + k + torch.arange(vocab, device=dev)))  # [B, V]

    zero = torch.zeros((), dtype=torch.float32, device=dev)
    p_x = torch.where(valid, p[:, :k].gather(-1, safe).squeeze(-1), zero)
    q_x = torch.where(valid, q.gather(-1, safe).squeeze(-1), zero)
    n = _leading_true(u * q_x < p_x)

    rows = torch.arange(b, device=dev)
    f_n = f[rows, n]  # [B, V]: the position whose token is drawn
    p_race = _first_max_index(f_n - torch.log(e))
    q_pad = torch.cat([q, q.new_zeros(b, 1, vocab)], dim=1)  # position k has no residual
    w = (p[rows, n] - q_pad[rows, n]).clamp(min=0.0)
    w = torch.where((n < k)[:, None], w, zero)
    r_race = _first_max_index(w / e)
    has_residual = (w > 0).any(dim=-1)
    return n, _emit(draft_tokens, n, torch.where(has_residual, r_race, p_race))

"""``sentinel::speculative_verify``: the verification step of speculative decoding.

``k`` draft tokens per row are checked against the target model's logits of the ``k + 1``
positions in one fused call, with no host sync: greedy (argmax match) or exact rejection
sampling (Leviathan et al. 2023; Chen et al. 2023) at a temperature, with top-k / top-p
applied identically to target and draft. The exact rules, including which random number
decides what, are in :mod:`sentinel_kernels.reference.spec_verify`; every backend follows
them and draws the same counter-based random numbers, so Triton, C++ and the reference
make the same decisions for the same ``rng`` (up to float rounding in softmax sums, which
can only matter when a uniform lands within ~1e-7 of an acceptance boundary).

Backends: Triton on CUDA tensors (``kernels/spec_verify.py``: a split-vocabulary pass for
the softmax statistics, then one pass over the single row per batch row whose token is
drawn), the C++ extension on CPU tensors, or the reference. Top-k / top-p need a threshold
per (row, position); it is computed here with torch ops on the logits' device (``topk`` /
``sort``, no sync) and handed to the kernels, which keep ``xs >= thr``. Without filtering
that step is skipped and the kernels do all the work.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import spec_verify as ref
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, dtype_name
from ._dispatch import call_op

_OP = "speculative_verify"
_TOKEN_DTYPES = (torch.int64, torch.int32)


def _filtering(top_k: int | None, top_p: float | None, vocab: int) -> bool:
    return (top_k is not None and top_k < vocab) or (top_p is not None and top_p < 1.0)


def _check(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    draft_logits: torch.Tensor | None,
    rng: torch.Tensor | None,
) -> None:
    check_tensor(target_logits, "target_logits", _OP, FLOAT_DTYPES)
    check_tensor(draft_tokens, "draft_tokens", _OP, _TOKEN_DTYPES)
    if target_logits.dim() != 3 or target_logits.shape[1] < 1 or target_logits.shape[2] < 1:
        raise ValueError(
            f"{_OP}: target_logits must be [B, k+1, V] with k+1 >= 1 and V >= 1, got shape "
            f"{tuple(target_logits.shape)}"
        )
    b, k1, vocab = target_logits.shape
    if draft_tokens.dim() != 2 or tuple(draft_tokens.shape) != (b, k1 - 1):
        raise ValueError(
            f"{_OP}: draft_tokens must be [B, k] = {(b, k1 - 1)} for target_logits "
            f"[B, k+1, V] = {tuple(target_logits.shape)}, got {tuple(draft_tokens.shape)}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{_OP}: temperature must be a float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{_OP}: temperature must be finite and >= 0, got {temperature!r}")
    if temperature > 0 and not math.isfinite(ref.inv_temperature(temperature)):
        raise ValueError(f"{_OP}: temperature {temperature!r} is too small (1/T overflows float32)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{_OP}: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"{_OP}: top_p must be in (0, 1] or None, got {top_p!r}")
    if draft_probs is not None and draft_logits is not None:
        raise ValueError(f"{_OP}: give draft_probs or draft_logits, not both")
    tensors = {"draft_tokens": draft_tokens, "target_logits": target_logits}
    for name, t in (("draft_probs", draft_probs), ("draft_logits", draft_logits)):
        if t is None:
            continue
        check_tensor(t, name, _OP, FLOAT_DTYPES)
        if tuple(t.shape) != (b, k1 - 1, vocab):
            raise ValueError(
                f"{_OP}: {name} must be [B, k, V] = {(b, k1 - 1, vocab)} (one row fewer than "
                f"target_logits' k+1 positions), got {tuple(t.shape)}"
            )
        tensors[name] = t
    if temperature > 0 and k1 > 1 and draft_probs is None and draft_logits is None:
        raise ValueError(
            f"{_OP}: sampling (temperature > 0) needs draft_probs or draft_logits; "
            "greedy verification is temperature=0"
        )
    if rng is not None:
        check_tensor(rng, "rng", _OP, (torch.int64,))
        if tuple(rng.shape) != (2,) or not rng.is_contiguous():
            raise ValueError(
                f"{_OP}: rng must be a contiguous int64 tensor [2] = (seed, offset), got shape "
                f"{tuple(rng.shape)}"
            )
        tensors["rng"] = rng
    check_same_device(_OP, **tensors)


@torch.library.custom_op("sentinel::speculative_verify", mutates_args=("rng",))
def _speculative_verify_op(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    draft_logits: torch.Tensor | None,
    rng: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, draft_logits, rng)
    b, k1, vocab = target_logits.shape
    k = k1 - 1
    dev = target_logits.device
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError(f"{_OP}: sampling needs rng (the public function makes one)")
    if greedy:
        draft_probs = draft_logits = None  # documented: ignored
    elif k == 0:
        draft_probs = draft_logits = None  # nothing to verify: the bonus token only
    backend = _backend.resolve(dev)
    if backend == "reference":
        n, tokens = ref.speculative_verify(
            draft_tokens,
            draft_probs,
            target_logits,
            temperature,
            top_k=top_k,
            top_p=top_p,
            draft_logits=draft_logits,
            rng=rng,
        )
        if not greedy and rng is not None:  # rng is set when sampling (checked above)
            rng[1:].add_(ref.random_count(b, k, vocab))
        return n, tokens

    num_accepted = _backend.empty_output((b,), torch.int64, dev)
    tokens = _backend.empty_output((b, k1), torch.int64, dev)
    if b == 0:
        return num_accepted, tokens
    inv_t = ref.inv_temperature(temperature) if not greedy else 1.0
    thr = thr_q = None
    if not greedy and _filtering(top_k, top_p, vocab):
        # One threshold per (row, position), with torch ops on the device (topk / sort).
        inv = torch.tensor(inv_t, dtype=torch.float32, device=dev)
        thr = ref.filter_thresholds(target_logits.float() * inv, top_k, top_p).contiguous()
        if draft_logits is not None:
            thr_q = ref.filter_thresholds(draft_logits.float() * inv, top_k, top_p)
            thr_q = thr_q.contiguous()

    if backend == "triton":
        from ..kernels import spec_verify as ksv

        if greedy:
            ksv.verify_greedy(target_logits, draft_tokens, num_accepted, tokens)
        else:
            ksv.verify_sample(
                target_logits,
                draft_tokens,
                draft_probs,
                draft_logits,
                thr,
                thr_q,
                inv_t,
                rng,
                num_accepted,
                tokens,
            )
        return num_accepted, tokens

    q = draft_logits if draft_logits is not None else draft_probs
    _backend.native_module().speculative_verify(
        target_logits.data_ptr(),
        dtype_name(target_logits.dtype),
        b,
        k,
        vocab,
        list(target_logits.stride()),
        draft_tokens.data_ptr(),
        draft_tokens.dtype == torch.int32,
        draft_tokens.stride(0),
        draft_tokens.stride(1),
        draft_probs.data_ptr() if draft_probs is not None else 0,
        draft_logits.data_ptr() if draft_logits is not None else 0,
        dtype_name(q.dtype) if q is not None else "float32",
        list(q.stride()) if q is not None else [0, 0, 0],
        thr.data_ptr() if thr is not None else 0,
        thr_q.data_ptr() if thr_q is not None else 0,
        greedy,
        inv_t,
        rng.data_ptr() if rng is not None else 0,
        True,
        num_accepted.data_ptr(),
        tokens.data_ptr(),
        k1,
        _backend.native_threads(),
    )
    return num_accepted, tokens


@_speculative_verify_op.register_fake
def _(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, draft_logits, rng):
    _check(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, draft_logits, rng)
    b, k1, _ = target_logits.shape
    dev = target_logits.device
    return (
        torch.empty((b,), dtype=torch.int64, device=dev),
        torch.empty((b, k1), dtype=torch.int64, device=dev),
    )


def make_rng(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``rng`` state, int64 ``[2]`` = (seed, offset), drawn on ``device``.

    Both entries come from ``generator`` (torch's default generator of that device when
    None) with one ``torch.randint`` on the device: no host sync, capturable in a CUDA
    graph (a captured graph replays the draw from the generator's graph-safe state).
    """
    dev = torch.device(device)
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(
            f"{_OP}: generator is on {generator.device}, the logits on {dev}; "
            "use a generator of the logits' device"
        )
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=dev, generator=generator)


def speculative_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    draft_logits: torch.Tensor | None = None,
    rng: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``k`` draft tokens per row against the target logits of ``k + 1`` positions.

    Greedy (``temperature=0``): ``t_i = argmax target_logits[b, i]`` (lowest index on
    ties); ``n`` = number of leading drafts equal to ``t_i``; emitted: the ``n`` drafts,
    then ``t_n`` (the correction, or the bonus token of position ``k``).

    Sampling (``temperature > 0``): exact speculative sampling. With ``p_i =
    softmax(filter(target_logits[b, i] / T))`` and ``q_i`` the draft's distribution, draft
    ``x_i`` is accepted iff ``u_i * q_i(x_i) < p_i(x_i)`` (``u_i ~ U(0, 1)``, i.e. with
    probability ``min(1, p/q)``); at the first rejection the emitted token is drawn from
    ``normalize(max(0, p_n - q_n))``; if all ``k`` are accepted, a bonus token is drawn from
    ``p_k``. Every emitted token is then distributed exactly as the target's ``p``
    (Leviathan et al. 2023, Chen et al. 2023). ``filter`` = top-k then top-p as
    :func:`sentinel_kernels.decoding.sampling.filter_logits` (a tie straddling the top-p
    boundary is kept whole; see :func:`sentinel_kernels.reference.spec_verify.filter_thresholds`),
    and ``logits / T`` is computed as ``logits * float32(1 / T)``.

    Args:
        draft_tokens: ``[B, k]`` int64/int32. A token outside ``[0, V)`` is rejected.
        draft_probs: ``[B, k, V]`` float32/float16/bfloat16: the distribution each draft
            was sampled from (already tempered/filtered as the draft sampler did it), used
            as given. Ignored when greedy (may be passed). Or None with ``draft_logits``.
        target_logits: ``[B, k+1, V]`` float32/float16/bfloat16, any strides.
        temperature: ``0`` = greedy; ``> 0`` = sampling at this temperature.
        generator: random source when ``rng`` is None (on the logits' device; None =
            torch's default generator). A fresh ``(seed, offset)`` is drawn from it on the
            device, so results are deterministic for a given generator state.
        top_k, top_p: filtering applied to the target (and to ``draft_logits``) before the
            softmax; ignored when greedy (neither can change the argmax).
        draft_logits: ``[B, k, V]`` draft logits instead of ``draft_probs``: ``q_i =
            softmax(filter(draft_logits[b, i] / T))`` with the same temperature and filter.
        rng: int64 ``[2]`` = (seed, offset) on the logits' device, advanced in place
            (``rng[1] += B * (k + V)``, on the device) by a sampling call: counter-based
            Philox random numbers, so a call is deterministic given ``rng`` and graph
            capturable. Greedy calls neither read nor advance it.
    Returns:
        ``(num_accepted, tokens)``: int64 ``[B]`` with values in ``[0, k]``, and int64
        ``[B, k+1]`` where ``tokens[b, :n]`` are the accepted drafts, ``tokens[b, n]`` the
        correction or bonus token and ``tokens[b, n+1:] = -1``.
    Raises:
        TypeError / ValueError: wrong dtypes, shapes (``k`` vs ``k+1``), devices, a
        negative temperature, both ``draft_probs`` and ``draft_logits``, sampling without
        either, bad ``top_k`` / ``top_p`` / ``rng``.
    """
    if rng is None:
        # validate before drawing a seed (the op checks again; with rng given, only there)
        _check(
            draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, draft_logits, rng
        )
        if temperature > 0:
            rng = make_rng(target_logits.device, generator)
    if isinstance(temperature, int) and not isinstance(temperature, bool):
        temperature = float(temperature)
    return call_op(
        _speculative_verify_op,
        draft_tokens,
        draft_probs,
        target_logits,
        temperature,
        top_k,
        top_p,
        draft_logits,
        rng,
    )


_ADVANCE_OP = "greedy_advance"


def _int64(t: object, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    x = check_tensor(t, name, _ADVANCE_OP, (torch.int64,))
    if tuple(x.shape) != shape:
        raise ValueError(f"{_ADVANCE_OP}: {name} must have shape {shape}, got {tuple(x.shape)}")
    return x


def greedy_advance(
    logits: torch.Tensor,
    out: torch.Tensor,
    col: torch.Tensor,
    tok: torch.Tensor,
    pos: torch.Tensor,
    *,
    arrive: torch.Tensor | None = None,
    finished: torch.Tensor | None = None,
    eos: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
) -> None:
    """One greedy decode step's token and its bookkeeping, in place, with no host sync:

    ``t[b] = argmax_v logits[b, v]`` (lowest index among ties, as ``torch.argmax``); with
    ``finished``: ``t[b] = pad`` where ``finished[b]``, then ``finished[b] |= t[b] in eos``;
    then ``out[b, col] = t[b]``, ``col += 1``, ``tok[b, 0] = t[b]``, ``pos[b, 0] += 1``
    (the rules: :func:`sentinel_kernels.reference.spec_verify.greedy_advance`).

    It is speculative verification with no drafts, plus the decode loop's bookkeeping: on
    CUDA two Triton launches (the split-vocabulary argmax of the greedy verifier, then one
    program per row that merges it and updates the state), where ``torch.argmax`` runs one
    program per row over the whole vocabulary and the bookkeeping takes four or more
    launches (issue 19: the argmax alone was 12 us of a 530-us SmolLM2 decode token on an
    H100). Other backends run the reference's torch ops.

    Args:
        logits: ``[B, V]`` float32/float16/bfloat16, any strides. A NaN logit is not
            ranked (``torch.argmax`` would pick it); a row of NaN or ``-inf`` picks 0.
        out: ``[B, T]`` int64 output tokens; ``col`` ``[1]`` int64, the column to write
            (``0 <= col < T``: not checked on the device, which would need a sync).
        tok, pos: ``[B, 1]`` int64, the next step's input token and position.
        arrive: ``[1]`` int32 zeros, the CUDA kernel's arrival counter for ``B > 1`` (kept
            across calls and graph replays; it is re-armed by the kernel). ``None``
            allocates one per call.
        finished, eos, pad: all or none: ``[B]`` bool rows already ended, ``[E]`` int64 end
            ids (``E >= 1``), ``[1]`` int64 pad id.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, devices, or a partial
            ``finished``/``eos``/``pad`` set.
    """
    check_tensor(logits, "logits", _ADVANCE_OP, FLOAT_DTYPES)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(
            f"{_ADVANCE_OP}: logits must be [B, V] with V >= 1, got {tuple(logits.shape)}"
        )
    b = logits.shape[0]
    check_tensor(out, "out", _ADVANCE_OP, (torch.int64,))
    if out.dim() != 2 or out.shape[0] != b or out.stride(1) != 1:
        raise ValueError(
            f"{_ADVANCE_OP}: out must be [B, T] = [{b}, T] with unit column stride, got "
            f"shape {tuple(out.shape)} strides {out.stride()}"
        )
    _int64(col, "col", (1,))
    _int64(tok, "tok", (b, 1))
    _int64(pos, "pos", (b, 1))
    tensors = {"logits": logits, "out": out, "col": col, "tok": tok, "pos": pos}
    given = [x is not None for x in (finished, eos, pad)]
    if any(given) and not all(given):
        raise ValueError(f"{_ADVANCE_OP}: give finished, eos and pad together, or none")
    if finished is not None and eos is not None and pad is not None:
        check_tensor(finished, "finished", _ADVANCE_OP, (torch.bool,))
        if tuple(finished.shape) != (b,):
            raise ValueError(
                f"{_ADVANCE_OP}: finished must have shape ({b},), got {tuple(finished.shape)}"
            )
        check_tensor(eos, "eos", _ADVANCE_OP, (torch.int64,))
        if eos.dim() != 1 or eos.numel() < 1:
            raise ValueError(f"{_ADVANCE_OP}: eos must be [E] with E >= 1, got {tuple(eos.shape)}")
        _int64(pad, "pad", (1,))
        eos = eos.contiguous()
        tensors.update(finished=finished, eos=eos, pad=pad)
    if arrive is not None:
        check_tensor(arrive, "arrive", _ADVANCE_OP, (torch.int32,))
        if tuple(arrive.shape) != (1,):
            raise ValueError(
                f"{_ADVANCE_OP}: arrive must have shape (1,), got {tuple(arrive.shape)}"
            )
        tensors["arrive"] = arrive
    dev = check_same_device(_ADVANCE_OP, **tensors)
    if b == 0:
        return
    if _backend.resolve(dev) != "triton":
        ref.greedy_advance(logits, out, col, tok, pos, finished, eos, pad)
        return
    from ..kernels import spec_verify as ksv

    if arrive is None:
        arrive = torch.zeros(1, dtype=torch.int32, device=dev)
    ksv.greedy_advance(
        logits,
        out,
        col,
        tok,
        pos,
        arrive,
        finished,
        eos,
        pad,
    )

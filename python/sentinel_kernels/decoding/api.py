"""``sk.generate``: check the call, pick the loop, run it with the sentinel attention.

:func:`generate` checks its arguments, turns right padding into left padding, switches the
model to the sentinel attention for the call, and hands the batch to the plain decode loop
(:func:`.fast.run`) or, with ``draft=...``, to the speculative one
(:func:`.speculative.speculative_generate`). Both keep their caches and graphs in
:mod:`.session`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..knn.lm import KnnScorer, scorer_for
from ..nn import attention as sk_attention
from ..patching.apply import patch_report
from . import fast
from .sampling import check_sampling_args
from .session import DecodeRequest, clear_sessions, fingerprint, get_session
from .speculative import parse_draft, speculative_generate

__all__ = ["generate"]


def _patched_spec(model: nn.Module) -> str:
    report = patch_report(model)
    spec = None if report is None else report.options.get("kv_cache")
    return str(spec) if spec else "dense"


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_inputs(
    model: nn.Module, input_ids: Any, attention_mask: Any, max_new_tokens: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a transformers causal LM (nn.Module), got {type(model).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be [batch, seq] with batch, seq >= 1, got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 (or int32), got {input_ids.dtype}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    device, _ = _model_device_dtype(model)
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device}, the model on {device}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a tensor or None")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the "
                f"shape of input_ids {tuple(input_ids.shape)}"
            )
        if attention_mask.device != device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, the model on {device}")
    return input_ids.long(), attention_mask


def _to_left_padding(
    ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, bool, bool]:
    """Check the padding mask and make it left padding.

    Returns ``(ids, mask, padded, rolled)``: ``padded`` whether any position is masked,
    ``rolled`` whether some row had pads after its tokens, in which case every row of
    ``ids`` and ``mask`` is rotated so that its trailing pads come first (a row
    ``[a, b, c, 0, 0]`` becomes ``[0, 0, a, b, c]``; rows without trailing pads are left
    as they are). One host read (the call's only one before decoding).

    Raises:
        ValueError: a row of ``mask`` is all zeros, or has zeros between its ones.
    """
    if mask is None:
        return ids, None, False, False
    batch, seq = mask.shape
    on = mask != 0
    count = on.sum(-1)
    col = torch.arange(seq, device=mask.device)
    first = torch.where(on, col, seq).min(-1).values
    last = torch.where(on, col, -1).max(-1).values
    empty = count == 0
    hole = ~empty & (last - first + 1 != count)
    trailing = torch.where(empty, 0, seq - 1 - last)
    flags = torch.stack([(count == seq).all(), empty.any(), hole.any(), (trailing > 0).any()])
    full, any_empty, any_hole, any_trailing = flags.tolist()  # the one host sync
    if any_empty:
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask row(s) {rows} are all zeros: every row needs at least one prompt token"
        )
    if any_hole:
        rows = hole.nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask row(s) {rows} have zeros between ones: sk.generate "
            f"takes left or right padding only (each row's ones contiguous)"
        )
    if full:
        return ids, mask, False, False
    if not any_trailing:
        return ids, mask, True, False
    idx = (col[None] - trailing[:, None]) % seq  # output slot j reads slot j - trailing
    return ids.gather(1, idx), mask.gather(1, idx), True, True


def _eos_ids(eos_token_id: Any) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(
            f"eos_token_id must be an int >= 0 or a list of them, got {eos_token_id!r}"
        )
    return ids


def _knn_scorer(
    model: nn.Module,
    device: torch.device,
    store: Any,
    k: Any,
    lam: Any,
    temperature: Any,
    drafter: Any,
) -> KnnScorer | None:
    """The kNN-LM scorer of a call (None without ``knn``), after checking that it can
    run here."""
    if store is None:
        return None
    if drafter is not None:
        raise ValueError(
            "knn= cannot be combined with draft= (speculative decoding verifies drafts "
            "against the model's own distribution, not the kNN-LM mixture)"
        )
    return scorer_for(model, device, store, k, lam, temperature)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    streamer: Any = None,
    *,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    kv_cache: str | None = None,
    cuda_graph: bool | None = None,
    prefill_graph: bool | None = None,
    draft: Any = None,
    num_draft_tokens: int = 4,
    return_stats: bool = False,
    knn: Any = None,
    knn_k: int = 32,
    knn_lambda: float = 0.25,
    knn_temperature: float = 1.0,
) -> Any:
    """Generate up to ``max_new_tokens`` tokens per row, fast (how: :mod:`.fast`).

    Greedy output equals ``model.generate(input_ids, attention_mask=..., do_sample=False,
    max_new_tokens=...)`` of the same patched model: the decode step is the model's own
    forward over the same cache format and cache length that the patched
    ``model.generate`` allocates (prompt + ``max_new_tokens`` slots), hence the same
    kernels with the same shapes.

    Args:
        model: a transformers causal LM whose attention runs through
            ``AttentionInterface`` (Llama, Mistral, Qwen2/3, SmolLM ...), patched or not. It
            runs the sentinel attention for the call (switched back afterwards if it was
            not).
        input_ids: int64 ``[B, S]`` (or ``[S]``) on the model's device.
        attention_mask: ``[B, S]`` 0/1; None = no padding. Left padding (zeros before each
            row's tokens) and right padding (zeros after them, the default of most
            tokenizers; also both at once) give each row the tokens it gets alone: a
            right-padded batch is rolled to left padding internally (one gather). Each
            row's ones must be contiguous and non-empty.
        max_new_tokens: tokens to generate per row (fewer when every row hit an EOS).
        do_sample, temperature, top_k, top_p: greedy when ``do_sample`` is False, else a
            sample of the filtered softmax (:func:`.sampling.sample_next`).
        eos_token_id: an id or ids ending a row; after it the row gets ``pad_token_id``,
            and generation stops when all rows ended. None: the model's
            ``generation_config.eos_token_id`` (as ``model.generate``); ``[]``: never stop
            early (always ``max_new_tokens``).
        pad_token_id: filler after a row's EOS; default ``generation_config.pad_token_id``,
            else the first EOS id.
        streamer: a transformers streamer (``put``/``end``), batch 1 only; it receives the
            prompt, then each token (one host sync per token).
        generator: random source for sampling (on the model's device).
        kv_cache: cache format override (``"dense"``, ``"int8"``, ``"int4"``,
            ``"lowrank:r"``); default: the patch's ``kv_cache`` option, else dense.
        cuda_graph: capture the decode step (default: on CUDA devices).
        prefill_graph: prefill a prompt shape (batch, length, padding, cache length) seen
            before by a CUDA graph: its first call runs eagerly, its second captures and
            replays, later ones replay (the session keeps the 2 most recently used shapes'
            graphs). It pays for repeated shapes (benchmarks, fixed-length batch jobs, a
            chat turn re-sent): a small model's eager prefill is host-bound (a 2048-token
            SmolLM2 prefill: 39 ms eager, 5 ms replayed on the H200). Default (``None``):
            on with CUDA graphs, without ``draft`` and ``knn``, a failed capture logged;
            ``True``: the same, a failed capture warned, and an error where it cannot
            apply (not CUDA, ``draft``, ``knn``); ``False``: always eager.
        draft, num_draft_tokens: speculative decoding
            (:mod:`sentinel_kernels.decoding.speculative`): ``"ngram"`` (prompt lookup),
            ``"early_exit:L"`` (the model's first ``L`` layers) or a draft model with the
            same vocabulary (or the :class:`~.speculative.DraftSpec` of one); up to
            ``num_draft_tokens`` drafts per step, adapted to the acceptance. The
            verification (one graph per ``k``) and the drafters' forwards are CUDA graphs
            on a GPU; greedy output equals the non-speculative greedy output up to float
            rounding of the ``k + 1``-token verification forward (bit-equal in float32 in
            the tests).
        return_stats: also return a dict of statistics (speculative decoding: steps,
            acceptance rate, mean accepted drafts per row and step, final ``k``).
        knn, knn_k, knn_lambda, knn_temperature: kNN-LM decoding (Khandelwal et al.
            2020) with a :class:`sentinel_kernels.knn.Datastore` built with this model:
            every token (greedy or sampled; ``temperature``/``top_k``/``top_p`` then apply
            to the mixture) is chosen from ``log(lambda * p_kNN + (1 - lambda) * p_LM)``,
            ``p_kNN`` the ``softmax(-d / knn_temperature)`` of the ``knn_k`` nearest keys
            to the LM head's input, summed per next token. The store must search where
            the model runs: a CUDA model needs ``store.to("cuda")`` (exact device search,
            captured in the decode graph); a CPU model searches FAISS through the store's
            result cache. Off by default; not with ``draft``.

    Returns:
        int64 ``[B, S + n]``: the caller's ``input_ids`` unchanged followed by the ``n <=
        max_new_tokens`` new tokens (and the statistics dict when ``return_stats``), so
        ``out[:, S:]`` are the new tokens whatever the padding side. With right padding a
        row's pads stay between its prompt and its new tokens (drop them with the mask, or
        decode ``out[:, S:]``). A streamer receives the caller's ``input_ids``, too.

    Raises:
        ValueError: bad shapes, devices or arguments (the message says which;
            ``prefill_graph`` off CUDA or with ``draft`` / ``knn``); an
            ``attention_mask`` row that is all zeros or has zeros between ones (e.g.
            ``[1, 0, 1]``).
        TypeError: ``input_ids`` not an integer tensor, ``model`` not a module, ``draft``
            neither a drafter name nor a model.
        NotImplementedError: the model cannot run the sentinel attention.
        sentinel_kernels.knn.DatastoreMismatchError: ``knn`` belongs to another model.
    """
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    check_sampling_args(do_sample, temperature, top_k, top_p)
    caller_ids = input_ids
    input_ids, attention_mask, padded, rolled = _to_left_padding(input_ids, attention_mask)
    device, _ = _model_device_dtype(model)
    gen_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_config, "eos_token_id", None)
    eos_ids = _eos_ids(eos_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("a streamer takes batch 1 only (transformers' streamers do too)")
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    if prefill_graph is not None and not isinstance(prefill_graph, bool):
        raise TypeError(f"prefill_graph must be a bool or None, got {prefill_graph!r}")
    if prefill_graph and (device.type != "cuda" or draft is not None or knn is not None):
        raise ValueError(
            "prefill_graph=True needs a CUDA model, and works without draft= and knn= only"
        )
    explicit_prefill_graph = prefill_graph is not None
    if prefill_graph is None:
        prefill_graph = use_graph and draft is None and knn is None
    drafter = parse_draft(draft) if draft is not None else None
    scorer = _knn_scorer(model, device, knn, knn_k, knn_lambda, knn_temperature, drafter)

    previous_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    spec = kv_cache if kv_cache is not None else _patched_spec(model)
    if previous_impl != sk_attention.ATTN_IMPLEMENTATION:
        ok, reason = sk_attention.supports_sentinel_attention(model)
        if not ok:
            raise NotImplementedError(f"sk.generate needs the sentinel attention: {reason}")
        sk_attention.register()
        sk_attention._set_implementation(model, sk_attention.ATTN_IMPLEMENTATION)
    req = DecodeRequest(
        model,
        input_ids,
        attention_mask,
        max_new_tokens,
        {
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "generator": generator,
        },
        eos,
        pad_token_id,
        streamer,
        spec,
        padded=padded,
        shown_prompt=caller_ids,
    )
    try:
        with torch.inference_mode():
            if drafter is not None:
                out, stats = speculative_generate(
                    req,
                    drafter,
                    num_draft_tokens,
                    device,
                    graphs=use_graph,
                    session=lambda key, build: get_session(
                        model, ("speculative", fingerprint(model), *key), build
                    ),
                )
            else:
                out = fast.run(
                    req,
                    use_graph,
                    device,
                    knn=scorer,
                    prefill_graph=prefill_graph,
                    warn_prefill=explicit_prefill_graph,
                )
                stats = {}
            if rolled:  # the caller's (right-padded) prompt in front of the new tokens
                out[:, : caller_ids.shape[1]] = caller_ids
            return (out, stats) if return_stats else out
    finally:
        if previous_impl != sk_attention.ATTN_IMPLEMENTATION and previous_impl is not None:
            # kv_cache() switched an unpatched model to the sentinel attention: undo
            sk_attention._set_implementation(model, previous_impl)


# ``sk.generate.clear_sessions(model)``: the session cache belongs with the function.
generate.clear_sessions = clear_sessions  # type: ignore[attr-defined]

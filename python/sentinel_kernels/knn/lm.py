"""kNN-LM (Khandelwal et al. 2020, "Generalization through Memorization"): interpolate a
language model's next-token distribution with one read off the nearest neighbours of the
current hidden state in a datastore of ``(hidden state -> next token)`` pairs.

``p(y) = lambda * p_kNN(y) + (1 - lambda) * p_LM(y)`` with
``p_kNN(y) = sum_{i: v_i = y} softmax_i(-d_i / T)`` over the ``k`` neighbours (squared L2
distance ``d_i``, value token ``v_i``). Everything is computed in log space for the whole
batch on the device: the neighbour weights are a ``log_softmax``, the per-token
aggregation a log-sum-exp done with two scatters (``amax`` then ``sum`` of
``exp(w - max)``), the mixture a ``logaddexp``. No value is read back to the host, so the
interpolation can sit inside a CUDA-graph decode step.

The hidden state is caught on its way into the LM head by a forward pre-hook on
``model.get_output_embeddings()`` (:func:`capture_lm_head_input`), which works for any
transformers causal LM and inside a captured graph (the hook copies into a static buffer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import record_function

if TYPE_CHECKING:
    from .datastore import Datastore

__all__ = [
    "KNN_INTERPOLATE_RANGE",
    "KnnScorer",
    "capture_lm_head_input",
    "check_knn_args",
    "interpolate",
    "knn_log_probs",
    "mix_log_probs",
    "lm_head",
    "lm_head_input",
    "lm_head_shape",
    "lm_head_weight",
    "scorer_for",
]

#: Profiler range around the interpolation (the ``knn`` category of the profiler).
KNN_INTERPOLATE_RANGE = "sentinel::knn_interpolate"


def lm_head(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()``, the module whose input is a kNN-LM key.

    Raises:
        ValueError: the model has none.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"kNN-LM needs the LM head: {type(model).__name__}.get_output_embeddings() "
            "returned no module"
        )
    return head


def lm_head_shape(model: nn.Module) -> tuple[int, int]:
    """``(V, D)``: the LM head's output size (vocabulary) and input size (a key's size).

    Read from a float head's ``weight`` ``[V, D]``, else from ``out_features`` /
    ``in_features`` (an ``Int8Linear`` head of a model patched at level 2 or 3 keeps its
    weights as int8 buffers and has no ``weight``).

    Raises:
        ValueError: no LM head, or one with neither a 2-D ``weight`` nor integer
            ``in_features`` / ``out_features``.
    """
    head = lm_head(model)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    n_in = getattr(head, "in_features", None)
    n_out = getattr(head, "out_features", None)
    if isinstance(n_in, int) and isinstance(n_out, int):
        return n_out, n_in
    raise ValueError(
        f"the LM head of {type(model).__name__} ({type(head).__name__}) has neither a "
        "weight tensor nor in_features/out_features"
    )


def _compute_dtype(model: nn.Module, head: nn.Module) -> torch.dtype:
    """The dtype of the activations the model computes in (what enters the LM head)."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    # an nn.Embedding's table, or the output dtype an int8 embedding (no float table) keeps
    for candidate in (getattr(emb, "weight", None), getattr(emb, "dtype", None)):
        if isinstance(candidate, torch.Tensor) and candidate.is_floating_point():
            return candidate.dtype
        if isinstance(candidate, torch.dtype) and candidate.is_floating_point:
            return candidate
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def lm_head_input(model: nn.Module) -> tuple[int, torch.dtype]:
    """``(D, dtype)`` of the LM head's input, i.e. of a kNN-LM query.

    ``D`` is the head's input size (:func:`lm_head_shape`). The dtype is the model's
    compute dtype: a float head's weight dtype; for a head without a float weight (an
    ``Int8Linear``, which takes activations in the model's dtype) the input embeddings'
    weight dtype (or the ``dtype`` of an int8 embedding), else that of the first floating
    parameter, else torch's default dtype. Shapes and dtypes only: nothing is computed.

    Raises:
        ValueError: as :func:`lm_head_shape`.
    """
    _, dim = lm_head_shape(model)
    return dim, _compute_dtype(model, lm_head(model))


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight ``[V, D]`` (``D``: the size of a key).

    A float head's ``weight`` itself (its dtype, no copy); for a quantized head with a
    ``dequantized_weight()`` method (``Int8Linear``: ``q_w * s_w``, divided by the
    SmoothQuant factors in W8A8) a new float32 ``[V, D]`` tensor, the weight it computes
    with. For sizes and dtypes only, use :func:`lm_head_input` / :func:`lm_head_shape`,
    which allocate nothing.

    Raises:
        ValueError: no LM head, or one with neither a ``weight`` tensor nor
            ``dequantized_weight()``.
    """
    head = lm_head(model)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    dequantize = getattr(head, "dequantized_weight", None)
    if callable(dequantize):
        out = dequantize()
        if isinstance(out, torch.Tensor):
            return out
    raise ValueError(f"the LM head of {type(model).__name__} has no weight tensor")


def check_knn_args(store: Any, k: Any, lam: Any, temperature: Any) -> None:
    """Raise a clear error for kNN-LM settings that make no sense.

    Raises:
        TypeError: ``store`` has no ``search`` / ``neighbours`` (not a Datastore).
        ValueError: ``k`` not an int in ``[1, len(store)]``, ``lam`` outside ``[0, 1]``,
            ``temperature <= 0`` (or not a number).
    """
    if not (hasattr(store, "neighbours") and hasattr(store, "check_model")):
        raise TypeError(f"knn must be a sentinel_kernels.knn.Datastore, got {type(store).__name__}")
    n = len(store)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"knn_k must be an int in [1, {n}] (the datastore's size); got {k!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"knn_lambda must be a number in [0, 1]; got {lam!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"knn_temperature must be a number > 0; got {temperature!r}")


def knn_log_probs(
    distances: torch.Tensor, token_ids: torch.Tensor, vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """``log p_kNN`` over the vocabulary: ``log sum_{i: v_i = y} softmax_i(-d_i / T)``.

    Neighbours with ``token_ids < 0`` (FAISS found fewer than ``k``) or infinite distance
    get no weight. A row without any valid neighbour is ``-inf`` everywhere (the caller
    falls back to the LM for it, :func:`interpolate`).

    Args:
        distances: float ``[B, k]`` squared L2 distances.
        token_ids: int64 ``[B, k]`` the neighbours' next tokens (``-1``: none).
        vocab_size: ``V``.
        temperature: ``T > 0``.

    Returns:
        float32 ``[B, V]``; ``exp`` of each row sums to 1 (or the row is all ``-inf``).
    """
    valid = (token_ids >= 0) & torch.isfinite(distances)
    # a fill, not torch.tensor(...): no host-to-device copy inside a CUDA-graph capture
    logw = (-distances.float() / temperature).masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(logw, dim=-1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    logw = logw - norm
    tok = token_ids.clamp_min(0)
    batch = distances.shape[0]
    top = torch.full((batch, vocab_size), float("-inf"), device=distances.device)
    top = top.scatter_reduce(-1, tok, logw, reduce="amax", include_self=True)
    shifted = torch.where(valid, torch.exp(logw - top.gather(-1, tok)), torch.zeros_like(logw))
    total = torch.zeros((batch, vocab_size), device=distances.device).scatter_add(-1, tok, shifted)
    return torch.log(total) + top


def interpolate(lm_logits: torch.Tensor, knn_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """``log(lambda * p_kNN + (1 - lambda) * softmax(lm_logits))`` per row, float32.

    ``lambda = 0`` gives ``log_softmax(lm_logits)`` exactly (``logaddexp(x, -inf) = x``);
    rows of ``knn_logp`` that are all ``-inf`` (no neighbour) get the LM distribution.

    Args:
        lm_logits: ``[B, V]`` any float dtype.
        knn_logp: float32 ``[B, V]`` from :func:`knn_log_probs`.
        lam: ``lambda`` in ``[0, 1]`` (a Python number: no device read).
    """
    lm_logp = torch.log_softmax(lm_logits.float(), dim=-1)
    has_any = torch.isfinite(knn_logp).any(dim=-1, keepdim=True)
    knn_logp = torch.where(has_any, knn_logp, lm_logp)
    log_lam = math.log(lam) if lam > 0 else float("-inf")
    log_rest = math.log1p(-lam) if lam < 1 else float("-inf")
    return torch.logaddexp(lm_logp + log_rest, knn_logp + log_lam)


#: Rows x k x k entries up to which :func:`mix_log_probs` aggregates duplicate neighbour
#: tokens by an all-pairs compare (exact in log space, no vocabulary-sized buffer); above
#: it, by a scatter into a ``[B, V]`` buffer of linear weights.
PAIRWISE_LIMIT = 1 << 22


def mix_log_probs(
    lm_logits: torch.Tensor,
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    lam: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``interpolate(lm_logits, knn_log_probs(distances, token_ids, V, temperature), lam)``
    computed sparsely: ``log((1 - lambda) softmax(lm_logits))`` everywhere, then the ``k``
    neighbour tokens of each row raised to ``logaddexp(that, log lambda + log p_kNN(y))``.

    The two-step form makes about ten passes over ``[B, V]`` (a ``-inf`` fill, two scatters
    that copy their ``[B, V]`` input, a gather, ``log``, the max shift, ``isfinite``,
    ``where``, two shifts and ``logaddexp``); this one makes the ``log_softmax`` and one
    shift over ``[B, V]``, and works on ``[B, k]`` otherwise: per row the weights
    ``w_j = softmax_j(-d_j / T)`` over the valid neighbours, ``log p_kNN(y_i) =
    logsumexp_{j: y_j = y_i} log w_j`` (all pairs ``[B, k, k]`` while ``B k^2 <=``
    :data:`PAIRWISE_LIMIT`, else ``log`` of a scatter-add of ``w`` into ``[B, V]``), and a
    scatter of the mixed values (duplicate tokens write equal values). Rows without a
    valid neighbour get ``log_softmax(lm_logits)`` exactly, as with :func:`interpolate`;
    ``lambda = 0`` gives it for every row.

    Args:
        lm_logits: ``[B, V]`` any float dtype.
        distances: float ``[B, k]`` squared L2 distances.
        token_ids: int64 ``[B, k]`` the neighbours' next tokens (``-1``: none).
        lam: ``lambda`` in ``[0, 1]``; temperature: ``T > 0`` (Python numbers).

    Returns:
        float32 ``[B, V]``. Equal to the two-step form up to float32 rounding (its max
        shift also keeps kNN weights below ``e^-87`` of a row's total, which this form's
        scatter path rounds to 0).
    """
    out = torch.log_softmax(lm_logits.float(), dim=-1)
    valid = (token_ids >= 0) & torch.isfinite(distances)
    logw = (-distances.float() / temperature).masked_fill(~valid, float("-inf"))
    norm = torch.logsumexp(logw, dim=-1, keepdim=True)
    has_any = torch.isfinite(norm)
    logw = logw - torch.where(has_any, norm, torch.zeros_like(norm))
    tok = token_ids.clamp_min(0)
    batch, k = tok.shape
    if batch * k * k <= PAIRWISE_LIMIT:
        same = tok[:, :, None] == tok[:, None, :]
        pair = logw[:, None, :].expand(batch, k, k).masked_fill(~same, float("-inf"))
        log_knn = torch.logsumexp(pair, dim=-1)
    else:
        total = torch.zeros_like(out).scatter_add_(-1, tok, logw.exp())
        log_knn = total.gather(-1, tok).log()
    log_rest = math.log1p(-lam) if lam < 1 else float("-inf")
    rest = torch.where(has_any, torch.full_like(norm, log_rest), torch.zeros_like(norm))
    out = out + rest
    if lam > 0:
        # an invalid neighbour's clamped token 0 carries the weight of the valid ones with
        # token 0 (if any), or -inf: it writes what they write, or leaves the entry as is
        mixed = torch.logaddexp(out.gather(-1, tok), log_knn + math.log(lam))
        out.scatter_(-1, tok, mixed)
    return out


class KnnScorer:
    """One kNN-LM setting: ``scorer(logits, hidden)`` is the interpolated log-distribution.

    Args:
        store: the :class:`~sentinel_kernels.knn.datastore.Datastore`.
        k, lam, temperature: neighbours, ``lambda`` and ``T`` (checked by
            :func:`check_knn_args`).
        use_cache: look queries up in the store's result cache (a host copy of each query:
            not for a CUDA-graph step).
    """

    def __init__(
        self,
        store: Datastore,
        k: int,
        lam: float,
        temperature: float,
        use_cache: bool = False,
    ) -> None:
        check_knn_args(store, k, lam, temperature)
        self.store = store
        self.k = k
        self.lam = float(lam)
        self.temperature = float(temperature)
        self.use_cache = use_cache

    def key(self) -> tuple[Any, ...]:
        """What a captured decode graph depends on (the store's key buffer included: a
        graph reads it at the address it was captured with)."""
        return (
            *self.store.search_key(),
            self.k,
            self.lam,
            self.temperature,
            self.use_cache,
        )

    def __call__(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities float32 ``[B, V]`` of ``logits`` ``[B, V]`` mixed with the
        neighbours of ``hidden`` ``[B, D]`` (the LM head's input for those logits)."""
        # no-op moves when the store sits on the model's device (the decode-step case); a
        # FAISS (CPU) store under a model elsewhere costs a host round trip (evaluation)
        dist, tokens, _ = self.store.neighbours(
            hidden.to(self.store.device), self.k, use_cache=self.use_cache
        )
        dist, tokens = dist.to(logits.device), tokens.to(logits.device)
        with record_function(KNN_INTERPOLATE_RANGE):
            return mix_log_probs(logits, dist, tokens, self.lam, self.temperature)


def scorer_for(
    model: nn.Module, device: torch.device, store: Any, k: Any, lam: Any, temperature: Any
) -> KnnScorer:
    """The :class:`KnnScorer` of ``store`` for ``model`` running on ``device``, after
    checking the arguments, that the store searches where the model runs, and that it was
    built from this model. With a FAISS store (host search) its result cache is used.

    Raises:
        ValueError: bad arguments; the store searches on another device.
        sentinel_kernels.knn.DatastoreMismatchError: the store belongs to another model.
    """
    scorer = KnnScorer(store, k, lam, temperature)
    # the FAISS backend searches on the host anyway: its result cache costs nothing extra
    scorer.use_cache = store.backend == "faiss"
    if store.device != device:
        raise ValueError(
            f"the datastore searches on {store.device} ({store.backend}), the model runs on "
            f"{device}: move it with store.to({str(device)!r})"
        )
    store.check_model(model)
    return scorer


@contextlib.contextmanager
def capture_lm_head_input(
    model: nn.Module, out: torch.Tensor | list[torch.Tensor]
) -> Iterator[None]:
    """Catch the hidden state that enters the LM head while the block runs.

    ``out`` a tensor ``[B, D]``: every LM-head call copies its input's last position into
    it (a static buffer: the copy is recorded in a CUDA graph and replayed with it). ``out``
    a list: every call appends its whole input ``[B, L, D]`` (evaluation).

    Raises:
        ValueError: the model has no output embeddings (``get_output_embeddings()``).
    """
    head = lm_head(model)

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(out, list):
            out.append(x.detach())
        else:
            out.copy_(x[:, -1])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()

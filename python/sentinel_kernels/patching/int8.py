"""The int8 options of :func:`sentinel_kernels.patch_model`: ``Int8Linear`` in place of the
linears (the steps that :data:`sentinel_kernels.patching.options.OPTIONS` declares).

* ``int8_weights=True`` (level 2): every ``nn.Linear`` becomes a W8A16 ``Int8Linear``.
* ``int8_activations=True`` (level 3): W8A8 instead. With ``calibration_text`` (a str
  plus ``tokenizer=``, or a precomputed :class:`~sentinel_kernels.quant.Calibration`),
  SmoothQuant factors (alpha :data:`SMOOTHQUANT_ALPHA`) are computed; where a norm feeds
  the linears directly (q/k/v, gate/up in Llama-family layers) ``1/s`` is folded into the
  norm's weight, elsewhere the kernel divides the activations by ``s``.

A tied LM head (its weight is the input embedding table, as in SmolLM2) is quantized
together with the table when :data:`QUANTIZE_TIED_HEAD` is true: the head becomes an
``Int8Linear`` and the embedding an ``Int8Embedding`` over the same int8 rows and per-row
scales, so the weights shrink 4x and the head's GEMV, the largest in a small model, reads a
quarter of the bytes. Measured on SmolLM2-135M (wikitext-2 test, 40 x 1024 tokens, fp32 CPU)
and recorded in bench/results: see docs/MEASUREMENTS.md (INT8 linear).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..nn.int8_linear import Int8Embedding, Int8Linear, quantize_weight
from ..quant.calibrate import Calibration, calibrate, foldable_groups, smoothquant_factors
from .context import PatchContext

__all__ = [
    "QUANTIZE_TIED_HEAD",
    "SMOOTHQUANT_ALPHA",
    "conv1d_w8a8",
    "conv1d_w8a16",
    "embedding",
    "smoothing",
    "tied_int8",
    "w8a8",
    "w8a16",
]

SMOOTHQUANT_ALPHA = 0.5
QUANTIZE_TIED_HEAD = True
_SMOOTH_ATTR = "_sentinel_smoothing"
_TIED_ATTR = "_sentinel_tied_int8"


def _is_tied_head(module: nn.Module, model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return emb is not None and getattr(emb, "weight", None) is module.weight


def tied_int8(model: nn.Module, ctx: PatchContext) -> Callable[[], None] | None:
    """Transform (both int8 options): quantize a tied embedding/head table once (int8 rows,
    one scale per row, :func:`~sentinel_kernels.nn.int8_linear.quantize_weight`) for
    :func:`embedding` and the head replacement to share; ``None`` when nothing is tied."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if (
        not QUANTIZE_TIED_HEAD
        or type(emb) is not nn.Embedding
        or type(head) is not nn.Linear
        or head.weight is not emb.weight
    ):
        return None
    q, s = quantize_weight(emb.weight)
    setattr(model, _TIED_ATTR, (emb, head, q.to(emb.weight.device), s.to(emb.weight.device)))

    def undo() -> None:
        if hasattr(model, _TIED_ATTR):
            delattr(model, _TIED_ATTR)

    return undo


def _tied(ctx: PatchContext) -> Any:
    return getattr(ctx.model, _TIED_ATTR, None)


def embedding(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    """Replacement of the tied input embedding: an ``Int8Embedding`` over the table that
    :func:`tied_int8` quantized (``None`` for any other embedding)."""
    tied = _tied(ctx)
    if tied is None or module is not tied[0]:
        return None
    return Int8Embedding(tied[2], tied[3], module.weight.dtype, module.padding_idx)


def _tied_head(module: Any, ctx: PatchContext) -> nn.Module | None:
    tied = _tied(ctx)
    if tied is None or module is not tied[1]:
        return None
    head = Int8Linear(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        mode="w8a16",
        dtype=module.weight.dtype,
        device=module.weight.device,
    )
    head.weight_int8, head.weight_scale = tied[2], tied[3]  # shared with the embedding
    if module.bias is not None and head.bias is not None:
        head.bias.copy_(module.bias.detach())
    return head


def w8a16(module: Any, ctx: PatchContext) -> nn.Module | None:
    """Replacement of an ``nn.Linear`` for ``int8_weights``: a W8A16 ``Int8Linear`` (int8
    weights with per-row scales, activations in the model dtype)."""
    # The tied stash is checked first: once the embedding has been replaced, the model no
    # longer shows the tie through get_input_embeddings().
    if _tied(ctx) is not None and module is _tied(ctx)[1]:
        return _tied_head(module, ctx)
    if _is_tied_head(module, ctx.model):
        return None
    return Int8Linear.from_float(module, mode="w8a16")


def w8a8(module: Any, ctx: PatchContext) -> nn.Module | None:
    """Replacement of an ``nn.Linear`` for ``int8_activations``: a W8A8 ``Int8Linear`` with
    the SmoothQuant factors :func:`smoothing` computed for it (the tied head stays W8A16)."""
    if _tied(ctx) is not None and module is _tied(ctx)[1]:
        # The head's input is the final norm's output: weight-only int8 keeps the logits
        # accurate, and the table stays shared with the embedding.
        return _tied_head(module, ctx)
    if _is_tied_head(module, ctx.model):
        return None
    smoothing = getattr(ctx.model, _SMOOTH_ATTR, {})
    smooth, folded = smoothing.get(ctx.name, (None, False))
    return Int8Linear.from_float(module, mode="w8a8", smooth=smooth, fold_smooth=folded)


def smoothing(model: nn.Module, ctx: PatchContext) -> Callable[[], None] | None:
    """Transform of ``int8_activations`` with ``calibration_text``: SmoothQuant factors
    ``s`` (alpha :data:`SMOOTHQUANT_ALPHA`; Xiao et al. 2023) per linear, ``1/s`` folded
    into the norm that feeds a group of linears where there is one; kept on the model for
    :func:`w8a8`. ``None`` without calibration text."""
    source = ctx["calibration_text"]
    if source is None:
        return None
    if isinstance(source, Calibration):
        cal = source
    else:
        tok = ctx["tokenizer"]
        if tok is None:
            raise ValueError("calibration_text as a str needs tokenizer=... in patch_model")
        cal = calibrate(model, tok, source)
    factors = smoothquant_factors(model, cal, alpha=SMOOTHQUANT_ALPHA)
    saved: list[tuple[Any, torch.Tensor]] = []
    plan: dict[str, tuple[torch.Tensor, bool]] = {}
    for group_norm, names in foldable_groups(model):
        if not all(n in factors for n in names):
            continue
        norm: Any = group_norm  # an HF RMSNorm: its weight is a Parameter
        s = factors[names[0]].to(norm.weight.device)
        saved.append((norm, norm.weight.detach().clone()))
        with torch.no_grad():
            norm.weight.div_(s.to(norm.weight.dtype))
        for n in names:
            plan[n] = (factors[n], True)
    for n, s in factors.items():
        plan.setdefault(n, (s, False))
    setattr(model, _SMOOTH_ATTR, plan)

    def undo() -> None:
        with torch.no_grad():
            for norm, w in saved:
                norm.weight.copy_(w)
        if hasattr(model, _SMOOTH_ATTR):
            delattr(model, _SMOOTH_ATTR)

    return undo


# GPT-2 keeps its projections in transformers' ``Conv1D``: ``y = x @ W + b`` with ``W``
# stored ``[in, out]``, i.e. an ``nn.Linear`` with weight ``W^T``. It is matched by class
# name (transformers is not imported here) below the ``nn.Linear`` replacements.
def _conv1d_as_linear(module: nn.Module) -> nn.Linear | None:
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ != "Conv1D"
        or not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or getattr(module, "nf", None) != weight.shape[1]
    ):
        return None
    bias = getattr(module, "bias", None)
    lin = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().t(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def conv1d_w8a16(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    """Replacement of GPT-2's ``Conv1D`` for ``int8_weights``: a W8A16 ``Int8Linear`` of
    its transposed weight (``None`` for any other module)."""
    del ctx
    lin = _conv1d_as_linear(module)
    return None if lin is None else Int8Linear.from_float(lin, mode="w8a16")


def conv1d_w8a8(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    """Replacement of GPT-2's ``Conv1D`` for ``int8_activations``: a W8A8 ``Int8Linear``
    (no SmoothQuant factors: calibration hooks ``nn.Linear`` inputs only)."""
    del ctx
    lin = _conv1d_as_linear(module)
    return None if lin is None else Int8Linear.from_float(lin, mode="w8a8")

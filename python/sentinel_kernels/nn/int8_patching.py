"""Register ``Int8Linear`` with :func:`sentinel_kernels.patch_model`.

* ``int8_weights=True`` (level 2): every ``nn.Linear`` becomes a W8A16 ``Int8Linear``.
* ``int8_activations=True`` (level 3): W8A8 instead. With ``calibration_text`` (a str
  plus ``tokenizer=``, or a precomputed :class:`~sentinel_kernels.quant.Calibration`),
  SmoothQuant factors (alpha :data:`SMOOTHQUANT_ALPHA`) are computed; where a norm feeds
  the linears directly (q/k/v, gate/up in Llama-family layers) ``1/s`` is folded into the
  norm's weight, elsewhere the kernel divides the activations by ``s``.

The LM head is left in floating point when its weight is tied to the input embeddings:
quantizing it would add an int8 copy beside the embedding table the model still needs,
so it would cost memory. (Whether an untied head is worth quantizing is measured in the
INT8 issue's notes.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..quant.calibrate import Calibration, calibrate, foldable_groups, smoothquant_factors
from .int8_linear import Int8Linear
from .registry import PatchContext, register_replacement, register_transform

SMOOTHQUANT_ALPHA = 0.5
_SMOOTH_ATTR = "_sentinel_smoothing"


def _is_tied_head(module: nn.Module, model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    return emb is not None and getattr(emb, "weight", None) is module.weight


def _w8a16(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    if _is_tied_head(module, ctx.model):
        return None
    return Int8Linear.from_float(module, mode="w8a16")


def _w8a8(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    if _is_tied_head(module, ctx.model):
        return None
    smoothing = getattr(ctx.model, _SMOOTH_ATTR, {})
    smooth, folded = smoothing.get(ctx.name, (None, False))
    return Int8Linear.from_float(module, mode="w8a8", smooth=smooth, fold_smooth=folded)


def _smoothing(model: nn.Module, ctx: PatchContext) -> Callable[[], None] | None:
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
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    smoothing: dict[str, tuple[torch.Tensor, bool]] = {}
    for norm, names in foldable_groups(model):
        if not all(n in factors for n in names):
            continue
        s = factors[names[0]].to(norm.weight.device)
        saved.append((norm, norm.weight.detach().clone()))
        with torch.no_grad():
            norm.weight.div_(s.to(norm.weight.dtype))
        for n in names:
            smoothing[n] = (factors[n], True)
    for n, s in factors.items():
        smoothing.setdefault(n, (s, False))
    setattr(model, _SMOOTH_ATTR, smoothing)

    def undo() -> None:
        with torch.no_grad():
            for norm, w in saved:
                norm.weight.copy_(w)
        if hasattr(model, _SMOOTH_ATTR):
            delattr(model, _SMOOTH_ATTR)

    return undo


register_replacement(nn.Linear, "int8_weights", _w8a16, name="Int8Linear(w8a16)")
register_replacement(nn.Linear, "int8_activations", _w8a8, priority=1, name="Int8Linear(w8a8)")
register_transform("int8_activations", _smoothing, order=-1, name="SmoothQuant folding")

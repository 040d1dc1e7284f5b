"""The head-pruning options of :func:`sentinel_kernels.patch_model` (their steps, declared in
:data:`sentinel_kernels.patching.options.OPTIONS`).

* ``head_mask=...`` (explicit masks, any form :func:`set_head_mask` takes) stores the masks
  on the attention modules.
* ``prune_ratio=r`` (level 3) scores the heads on ``calibration_text`` (a str, with
  ``tokenizer=``) with the gradient method of Michel et al. (2019), prunes the globally
  least important ``round(r * heads)`` (at least :data:`KEEP_MIN_PER_LAYER` kept per
  layer) and stores the masks.

Both only change the attention computation through the sentinel attention function,
which reads the masks: they need ``attention="sentinel"`` (levels >= 1 turn it on), and
``patch_model`` fails with a clear error otherwise. ``unpatch_model`` puts back the masks
the model had before (usually none). Neither compacts the model; call
:func:`~sentinel_kernels.prune.compact` yourself for that (a one-way change).

The importance pass runs before every other transform and module replacement
(order :data:`SCORE_ORDER`): it needs a float model with autograd, before int8 layers
replace the linears and before SmoothQuant folds factors into the norms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from .importance import head_importance
from .masks import get_head_mask, set_head_mask
from .select import select

if TYPE_CHECKING:
    from ..patching.context import PatchContext

__all__ = [
    "CALIBRATION_SAMPLES",
    "CALIBRATION_SEQ_LEN",
    "KEEP_MIN_PER_LAYER",
    "SENTINEL_ATTENTION",
    "apply_head_mask",
    "apply_prune_ratio",
    "check_sentinel_attention",
]

#: Windows x tokens of calibration text scored for ``prune_ratio``: one forward+backward
#: each (SmolLM2 fp32 on a busy 2-core CPU: ~19 s per 512-token window).
CALIBRATION_SAMPLES = 16
CALIBRATION_SEQ_LEN = 512
KEEP_MIN_PER_LAYER = 1
#: Name of the attention implementation that reads the head masks.
SENTINEL_ATTENTION = "sentinel"
#: Runs first: scoring needs the untouched float model (int8 transforms use -2 and -1).
SCORE_ORDER = -100
#: Runs last, after the attention option had its chance to install the implementation.
CHECK_ORDER = 1_000_000


def _needs_sentinel(option: str, ctx: PatchContext) -> None:
    if ctx["attention"] != SENTINEL_ATTENTION:
        raise ValueError(
            f"{option} needs attention={SENTINEL_ATTENTION!r}: head masks act through the "
            "sentinel attention function. Pass attention='sentinel' (levels >= 1 turn it on)"
        )


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def check_sentinel_attention(model: nn.Module, ctx: PatchContext) -> None:
    """Transform (both options, last): the model must run the sentinel attention after
    patching, else its head masks would be ignored silently."""
    impl = _attn_implementation(model)
    if impl != SENTINEL_ATTENTION:
        option = "head_mask" if ctx.enabled("head_mask") else "prune_ratio"
        raise ValueError(
            f"{option} needs the {SENTINEL_ATTENTION!r} attention implementation, but after "
            f"patching the model uses {impl!r}, which ignores head masks. Pass "
            "attention='sentinel' (levels >= 1 turn it on)"
        )
    return None


def _restorer(model: nn.Module) -> Callable[[], None]:
    before = get_head_mask(model)

    def undo() -> None:
        set_head_mask(model, before)

    return undo


def apply_head_mask(model: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """Transform of ``head_mask=...``: store the masks on the attention modules
    (:func:`set_head_mask`); the undo puts back the masks the model had."""
    _needs_sentinel("head_mask", ctx)
    undo = _restorer(model)
    set_head_mask(model, ctx["head_mask"])
    return undo


def apply_prune_ratio(model: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """Transform of ``prune_ratio=r``: score the heads on ``calibration_text`` (gradient
    method), keep all but the least important ``round(r * heads)`` and store the masks;
    the undo puts back the masks the model had."""
    _needs_sentinel("prune_ratio", ctx)
    text: Any = ctx["calibration_text"]
    tokenizer = ctx["tokenizer"]
    missing = []
    if not isinstance(text, str):
        missing.append(
            "calibration_text=<str> (e.g. wikitext-2 validation text)"
            + ("" if text is None else f"; got a {type(text).__name__}")
        )
    if tokenizer is None:
        missing.append("tokenizer=<the model's tokenizer>")
    if missing:
        raise ValueError(
            f"prune_ratio={ctx['prune_ratio']} scores the heads on calibration text: pass "
            f"{' and '.join(missing)} to patch_model, or give explicit head_mask=... instead"
        )
    scores = head_importance(
        model,
        tokenizer,
        text,
        method="gradient",
        n_samples=CALIBRATION_SAMPLES,
        seq_len=CALIBRATION_SEQ_LEN,
    )
    keep = select(scores, float(ctx["prune_ratio"]), keep_min_per_layer=KEEP_MIN_PER_LAYER)
    undo = _restorer(model)
    set_head_mask(model, keep)
    return undo

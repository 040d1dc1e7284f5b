"""Attention-head pruning: score heads, choose which to prune, mask or remove them.

::

    import sentinel_kernels as sk
    scores = sk.prune.head_importance(model, tok, valid_text)          # [layers, Hq]
    keep = sk.prune.select(scores, 0.25)                               # bool, True = keep
    sk.prune.set_head_mask(model, keep)        # read by attention="sentinel"
    report = sk.prune.compact(model)           # optional: slice the pruned heads out

or ``sk.patch_model(model, attention="sentinel", prune_ratio=0.25, calibration_text=...,
tokenizer=tok)``. One job per module: :mod:`.layers` finds the attention modules,
:mod:`.masks` stores the masks, :mod:`.importance` scores heads, :mod:`.select` picks
them, :mod:`.compact` removes them, :mod:`.patching` holds the steps of the ``head_mask`` and
``prune_ratio`` options of ``patch_model``.
"""

from __future__ import annotations

from .compact import CompactReport, LayerCompaction, compact, count_parameters
from .importance import METHODS, head_importance, token_windows
from .layers import MASK_ATTR, AttentionLayer, attention_layers
from .masks import MaskEmulation, emulate_head_mask, get_head_mask, set_head_mask
from .select import random_select, select

__all__ = [
    "MASK_ATTR",
    "METHODS",
    "AttentionLayer",
    "CompactReport",
    "LayerCompaction",
    "MaskEmulation",
    "attention_layers",
    "compact",
    "count_parameters",
    "emulate_head_mask",
    "get_head_mask",
    "head_importance",
    "random_select",
    "select",
    "set_head_mask",
    "token_windows",
]

"""Find a model's self-attention modules and read their head geometry.

Pruning works per attention layer: the module that owns the query and output projections
(``self_attn`` of a Llama-family decoder layer, ``attn`` of a GPT-2 block). Two layouts
are recognised, by attribute names rather than by class, so that Llama, Mistral, Qwen2/3,
SmolLM and the like are all found without a list of classes:

* **Llama-family**: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear`` or any
  module with ``in_features``/``out_features``) and an integer ``head_dim``. The head
  counts are read from the projection shapes (transformers 5 infers them the same way,
  ``view(*input_shape, -1, head_dim)``), so they stay right after
  :func:`~sentinel_kernels.prune.compact` changed them per layer.
* **GPT-2**: ``c_attn`` and ``c_proj`` (``Conv1D``, weight ``[in, out]``), ``num_heads``
  and ``head_dim``, self-attention only (no ``q_attn``).

Head ``h`` of a layer owns the columns ``h*D:(h+1)*D`` of the output projection's input,
which is the attention output ``[B, S, Hq*D]`` with the heads side by side; query head
``h`` reads KV head ``h // (Hq // Hkv)`` (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["AttentionLayer", "attention_layers"]

#: Buffer holding a layer's head mask (bool ``[Hq]`` or ``[B, Hq]``); the sentinel
#: attention function reads it from the attention module.
MASK_ATTR = "sentinel_head_mask"


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention module and its head geometry.

    Attributes:
        index: position among the model's attention layers (0-based, model order).
        name: qualified module name (``model.layers.3.self_attn``).
        module: the attention module (the one that carries ``sentinel_head_mask``).
        kind: ``"llama"`` (q/k/v/o_proj) or ``"gpt2"`` (c_attn/c_proj).
    """

    index: int
    name: str
    # A transformers attention module of any class: its attributes come from the model.
    module: Any
    kind: str

    @property
    def head_dim(self) -> int:
        """Per-head width ``D``."""
        return int(self.module.head_dim)

    @property
    def num_heads(self) -> int:
        """Query heads ``Hq`` now (after any compaction)."""
        if self.kind == "gpt2":
            return int(self.module.num_heads)
        return int(self.module.q_proj.out_features) // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads ``Hkv`` now (``Hq`` for GPT-2, which has no GQA)."""
        if self.kind == "gpt2":
            return self.num_heads
        return int(self.module.k_proj.out_features) // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head, ``Hq // Hkv``."""
        return self.num_heads // self.num_kv_heads

    @property
    def out_proj(self) -> nn.Module:
        """The output projection, whose input is the heads' outputs side by side."""
        return self.module.c_proj if self.kind == "gpt2" else self.module.o_proj

    @property
    def device(self) -> torch.device:
        """Device of the output projection's parameters (where the mask buffer goes)."""
        for p in self.out_proj.parameters():
            return p.device
        for b in self.out_proj.buffers():
            return b.device
        return torch.device("cpu")

    def out_weight_by_head(self) -> torch.Tensor:
        """The output projection's weight as ``[hidden, Hq, D]`` (a view, model dtype):
        ``out = sum_h W[:, h] @ x_h`` (+ bias). Needs a float weight (not an int8 one)."""
        w = getattr(self.out_proj, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(
                f"{self.name}: the output projection {type(self.out_proj).__name__} has no "
                "floating-point weight; compute head importance before int8 patching"
            )
        if self.kind == "gpt2":  # Conv1D stores [in, out]
            w = w.t()
        return w.reshape(w.shape[0], self.num_heads, self.head_dim)


def _kind(module: nn.Module) -> str | None:
    has = [hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if all(has) and isinstance(getattr(module, "head_dim", None), int):
        if all(hasattr(getattr(module, n), "out_features") for n in ("q_proj", "k_proj", "o_proj")):
            return "llama"
    if (
        hasattr(module, "c_attn")
        and hasattr(module, "c_proj")
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
        and not getattr(module, "is_cross_attention", False)
    ):
        return "gpt2"
    return None


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The self-attention layers of ``model``, in model order.

    Raises:
        ValueError: none found (the model is neither Llama-family nor GPT-2 style); the
            message names the layouts looked for.
    """
    found: list[AttentionLayer] = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            found.append(AttentionLayer(len(found), name, module, kind))
    if not found:
        raise ValueError(
            f"no attention layers found in {type(model).__name__}: head pruning supports "
            "Llama-family attention (q_proj/k_proj/v_proj/o_proj with head_dim, e.g. "
            "model.model.layers[i].self_attn) and GPT-2 attention (transformer.h[i].attn "
            "with c_attn/c_proj)"
        )
    return found

"""Physically remove pruned heads: smaller projections, less compute, smaller KV cache.

A masked head costs nothing in the sentinel attention kernels, but its rows of ``q_proj``
(and, for a fully pruned GQA group, of ``k_proj``/``v_proj``) are still multiplied and its
columns of ``o_proj`` still read. :func:`compact` slices them out, in place, so that the
compacted model computes what the masked model computed.

transformers' attention needs every KV head to serve the same number of query heads
(``repeat_kv``/``enable_gqa`` with ``num_key_value_groups = Hq / Hkv``). So in a layer with
``Hkv`` groups of ``G`` query heads:

* a KV group with no active query head is removed entirely (its ``G`` query heads and its
  K/V head);
* every kept group keeps ``G' = max over kept groups of (active heads in the group)``
  query heads: its active heads, plus pruned heads of the same group as padding. Padding
  heads stay masked: the layer's ``sentinel_head_mask`` is rewritten for the new head
  order, ``False`` at the padding heads (the mask is removed when no padding is left).

The new head counts are read from the tensor shapes by transformers 5
(``view(*input_shape, -1, head_dim)``); :func:`compact` sets the module's
``num_key_value_groups`` (and ``num_heads``/``num_key_value_heads`` where the module has
them, GPT-2's ``num_heads``/``split_size``). The model config is shared by all layers and
is left as it was (transformers' caches size themselves from the key/value tensors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import MASK_ATTR, AttentionLayer, attention_layers
from .masks import _store

__all__ = ["CompactReport", "LayerCompaction", "compact", "count_parameters"]


@dataclass(frozen=True)
class LayerCompaction:
    """Head counts of one attention layer before and after :func:`compact`
    (``padding_heads``: pruned heads kept, masked, to keep the GQA groups uniform)."""

    index: int
    name: str
    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    padding_heads: int


@dataclass
class CompactReport:
    """What :func:`compact` did: one :class:`LayerCompaction` per layer and the model's
    parameter count (each tensor once) before and after."""

    layers: list[LayerCompaction] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def heads_before(self) -> int:
        """Query heads over all layers, before."""
        return sum(r.heads_before for r in self.layers)

    @property
    def heads_after(self) -> int:
        """Query heads over all layers, after (padding heads included)."""
        return sum(r.heads_after for r in self.layers)

    @property
    def kv_heads_after(self) -> int:
        """KV heads over all layers, after."""
        return sum(r.kv_heads_after for r in self.layers)

    @property
    def padding_heads(self) -> int:
        """Masked heads left in the compacted model (they need the head mask applied)."""
        return sum(r.padding_heads for r in self.layers)

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [asdict(r) for r in self.layers],
        }

    def __str__(self) -> str:
        kv_before = sum(r.kv_heads_before for r in self.layers)
        lines = [
            f"compact: query heads {self.heads_before} -> {self.heads_after} "
            f"({self.padding_heads} masked padding), KV heads {kv_before} -> "
            f"{self.kv_heads_after}, parameters {self.params_before:,} -> {self.params_after:,}",
            "  layer  heads   kv   padding",
        ]
        for r in self.layers:
            lines.append(
                f"  {r.index:5d}  {r.heads_before:2d}->{r.heads_after:<2d}  "
                f"{r.kv_heads_before}->{r.kv_heads_after}  {r.padding_heads}"
            )
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each (possibly tied) parameter counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _rows(heads: list[int], d: int, device: torch.device) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * d + torch.arange(d, device=device)).reshape(-1)


def _set_param(module: Any, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _slice_linear(linear: Any, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (``dim=0``: output features) or columns (``dim=1``) ``idx`` of an
    ``nn.Linear``, in place (the module object stays, so references to it stay valid)."""
    with torch.no_grad():
        _set_param(linear, "weight", linear.weight.index_select(dim, idx))
        if dim == 0 and linear.bias is not None:
            _set_param(linear, "bias", linear.bias.index_select(0, idx))
    if dim == 0:
        linear.out_features = idx.numel()
    else:
        linear.in_features = idx.numel()


def _plan(active: list[bool], hkv: int) -> tuple[list[int], list[int], list[bool]]:
    """(kept query heads, kept KV heads, new mask) for one layer."""
    g = len(active) // hkv
    groups = [[h for h in range(k * g, (k + 1) * g) if active[h]] for k in range(hkv)]
    kept = [k for k in range(hkv) if groups[k]]
    if not kept:  # every head pruned: keep one masked head (a 0-head layer cannot run)
        return [0], [0], [False]
    width = max(len(groups[k]) for k in kept)
    heads: list[int] = []
    for k in kept:
        padding = [h for h in range(k * g, (k + 1) * g) if not active[h]]
        heads.extend(sorted(groups[k] + padding[: width - len(groups[k])]))
    return heads, kept, [active[h] for h in heads]


def _check_linear(layer: AttentionLayer, names: tuple[str, ...]) -> None:
    for n in names:
        mod = getattr(layer.module, n)
        if not isinstance(mod, nn.Linear) and type(mod).__name__ != "Conv1D":
            raise TypeError(
                f"{layer.name}.{n} is a {type(mod).__name__}, not nn.Linear: compact the "
                "model before patching it (int8 layers cannot be sliced)"
            )


def _compact_llama(layer: AttentionLayer, heads: list[int], kv: list[int]) -> None:
    m, d = layer.module, layer.head_dim
    _check_linear(layer, ("q_proj", "k_proj", "v_proj", "o_proj"))
    dev = m.q_proj.weight.device
    q_idx, kv_idx = _rows(heads, d, dev), _rows(kv, d, dev)
    _slice_linear(m.q_proj, q_idx, 0)
    _slice_linear(m.k_proj, kv_idx, 0)
    _slice_linear(m.v_proj, kv_idx, 0)
    _slice_linear(m.o_proj, q_idx.to(m.o_proj.weight.device), 1)
    m.num_key_value_groups = len(heads) // len(kv)
    # Older transformers versions keep head counts on the module; 5.x reads the shapes.
    for attr, value in (
        ("num_heads", len(heads)),
        ("num_attention_heads", len(heads)),
        ("num_key_value_heads", len(kv)),
    ):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, value)


def _compact_gpt2(layer: AttentionLayer, heads: list[int]) -> None:
    m, d = layer.module, layer.head_dim
    _check_linear(layer, ("c_attn", "c_proj"))
    width = m.c_attn.weight.shape[1] // 3  # q, k, v side by side in Conv1D's [in, out]
    idx = _rows(heads, d, m.c_attn.weight.device)
    qkv = torch.cat([idx, idx + width, idx + 2 * width])
    with torch.no_grad():
        _set_param(m.c_attn, "weight", m.c_attn.weight.index_select(1, qkv))
        _set_param(m.c_attn, "bias", m.c_attn.bias.index_select(0, qkv))
        _set_param(m.c_proj, "weight", m.c_proj.weight.index_select(0, idx))
    m.c_attn.nf = qkv.numel()
    m.c_proj.nx = idx.numel()
    m.num_heads = len(heads)
    m.split_size = idx.numel()


def compact(model: nn.Module) -> CompactReport:
    """Remove the pruned heads of ``model`` in place, following each layer's head mask.

    For every attention layer with a ``[Hq]`` mask (see :func:`set_head_mask`) that prunes
    something removable: rows of ``q_proj`` (and its bias) and columns of ``o_proj`` of the
    removed heads go; with GQA, the rows of ``k_proj``/``v_proj`` of a KV head go when its
    whole query group is pruned; kept groups are padded with masked pruned heads to a
    uniform size (see the module docstring). Layers without a mask, with nothing pruned,
    or whose pruned heads are all needed as padding are left untouched.

    The compacted model's output equals the masked model's output (with the head masks
    applied: ``attention="sentinel"`` or :func:`emulate_head_mask`; padding heads need
    that, a compacted model without padding does not). Tied or shared parameters are not
    involved (attention projections are per layer). The change is one-way.

    Returns:
        A :class:`CompactReport` (per-layer head counts, parameters before/after).

    Raises:
        ValueError: a per-batch ``[B, Hq]`` mask (nothing can be removed for one sequence).
        TypeError: a projection is not ``nn.Linear`` (e.g. already int8-patched).
    """
    layers = attention_layers(model)
    for layer in layers:
        mask = getattr(layer.module, MASK_ATTR, None)
        if mask is not None and mask.dim() != 1:
            raise ValueError(
                f"{layer.name}: head mask has shape {list(mask.shape)}; compact needs one "
                "[heads] mask per layer, not per-sequence masks"
            )
    report = CompactReport(params_before=count_parameters(model))
    for layer in layers:
        hq, hkv = layer.num_heads, layer.num_kv_heads
        mask = getattr(layer.module, MASK_ATTR, None)
        heads, kv = list(range(hq)), list(range(hkv))
        new_mask: list[bool] | None = None if mask is None else mask.tolist()
        if mask is not None and new_mask is not None and not all(new_mask):
            heads, kv, new_mask = _plan(new_mask, hkv)
            if len(heads) < hq:
                if layer.kind == "gpt2":
                    _compact_gpt2(layer, heads)
                else:
                    _compact_llama(layer, heads, kv)
                keep = None if all(new_mask) else torch.tensor(new_mask, device=mask.device)
                _store(layer.module, keep)
            else:  # every pruned head is needed as padding: nothing to remove
                heads, kv, new_mask = list(range(hq)), list(range(hkv)), mask.tolist()
        report.layers.append(
            LayerCompaction(
                index=layer.index,
                name=layer.name,
                heads_before=hq,
                heads_after=len(heads),
                kv_heads_before=hkv,
                kv_heads_after=len(kv),
                padding_heads=0 if new_mask is None else sum(not a for a in new_mask),
            )
        )
    report.params_after = count_parameters(model)
    return report

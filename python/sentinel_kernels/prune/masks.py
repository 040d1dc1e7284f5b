"""Per-layer head masks: store them where the attention function reads them.

A layer's mask lives on its attention module as a non-persistent bool buffer
``sentinel_head_mask`` of shape ``[Hq]`` (every sequence of the batch) or ``[B, Hq]`` (one
row per sequence); ``True`` keeps a head, ``False`` prunes it: the head's attention output
is exactly zero, so it adds nothing through the output projection. The sentinel attention
function (``attention="sentinel"``) reads the buffer and skips the work of pruned heads;
other attention implementations ignore it. :func:`emulate_head_mask` applies the same
masks with any implementation (zeroing the output projection's input slices), which is
how the masks can be checked and evaluated without the sentinel kernels.

Being a buffer, the mask follows ``model.to(device)``; being non-persistent, it is not in
``state_dict()`` (a mask is a patch setting, not a weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .layers import MASK_ATTR, AttentionLayer, attention_layers

__all__ = ["MASK_ATTR", "MaskEmulation", "emulate_head_mask", "get_head_mask", "set_head_mask"]

HeadMasks = torch.Tensor | Sequence[Any] | Mapping[int, Any] | None


def _as_mask(value: Any, layer: AttentionLayer) -> torch.Tensor | None:
    """One layer's mask as a bool tensor ``[Hq]``/``[B, Hq]`` (validated), or ``None``."""
    if value is None:
        return None
    where = f"head mask of layer {layer.index} ({layer.name})"
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: not a tensor or a nested list of 0/1 ({exc})") from None
    if value.dtype != torch.bool:
        if value.is_complex():
            raise TypeError(f"{where}: dtype {value.dtype} is not bool or a 0/1 number")
        if value.numel() and not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"{where}: values must be 0/1 (or bool)")
        value = value != 0
    if value.dim() not in (1, 2):
        raise ValueError(f"{where}: shape {list(value.shape)} is not [heads] or [batch, heads]")
    hq = layer.num_heads
    if value.shape[-1] != hq:
        raise ValueError(
            f"{where}: has {value.shape[-1]} heads in its last dimension, the layer has {hq}"
        )
    if value.dim() == 2 and value.shape[0] == 0:
        raise ValueError(f"{where}: batch dimension is empty")
    return value.detach().to(device=layer.device, dtype=torch.bool).contiguous()


def _per_layer(masks: HeadMasks, layers: list[AttentionLayer]) -> list[Any]:
    n = len(layers)
    if masks is None:
        return [None] * n
    if isinstance(masks, torch.Tensor):
        if masks.dim() == 1:  # one [Hq] mask for every layer
            return [masks] * n
        if masks.dim() not in (2, 3):
            raise ValueError(
                f"head mask tensor of shape {list(masks.shape)}: expected [layers, heads], "
                "[layers, batch, heads] or [heads]"
            )
        if masks.shape[0] != n:
            raise ValueError(
                f"head mask tensor has {masks.shape[0]} layers (shape {list(masks.shape)}), "
                f"the model has {n} attention layers"
            )
        return list(masks.unbind(0))
    if isinstance(masks, Mapping):
        out: list[Any] = [None] * n
        for key, value in masks.items():
            if isinstance(key, bool) or not isinstance(key, int) or not -n <= key < n:
                raise ValueError(f"head mask mapping key {key!r} is not a layer index in [0, {n})")
            out[key] = value
        return out
    if isinstance(masks, (list, tuple)):
        if len(masks) != n:
            raise ValueError(
                f"head mask sequence has {len(masks)} entries, the model has {n} attention "
                "layers (use None for a layer without a mask, or a mapping {layer: mask})"
            )
        return list(masks)
    raise TypeError(
        "head masks must be None, a tensor [layers, heads], a sequence of per-layer masks "
        f"or a mapping {{layer: mask}}; got {type(masks).__name__}"
    )


def _store(module: nn.Module, mask: torch.Tensor | None) -> None:
    if MASK_ATTR in module._buffers:
        del module._buffers[MASK_ATTR]
    elif hasattr(module, MASK_ATTR):
        delattr(module, MASK_ATTR)
    if mask is not None:
        module.register_buffer(MASK_ATTR, mask, persistent=False)


def set_head_mask(model: nn.Module, masks: HeadMasks) -> None:
    """Set (or clear) the head masks of every attention layer of ``model``.

    Args:
        model: a Llama-family or GPT-2 style transformers model (see
            :func:`~sentinel_kernels.prune.layers.attention_layers`).
        masks: ``True``/``1`` keeps a head, ``False``/``0`` prunes it. One of

            * ``None``: clear every layer's mask;
            * a tensor ``[layers, Hq]`` (or ``[layers, B, Hq]`` for per-sequence masks),
              or ``[Hq]`` for the same mask in every layer;
            * a sequence with one entry per layer: a ``[Hq]`` or ``[B, Hq]`` tensor (or
              nested list of 0/1), or ``None`` for no mask in that layer;
            * a mapping ``{layer index: mask}``; layers not in it get no mask.

            Layers may have different head counts (after compaction); the sequence and
            mapping forms allow that.

    The masks are stored as bool buffers ``sentinel_head_mask`` on the attention modules
    (on the device of the output projection), replacing what was there: this call sets the
    complete state. Everything is validated before anything is stored.

    Raises:
        ValueError: wrong number of layers, wrong head count, wrong rank, values not 0/1.
        TypeError: a mask that is not a tensor/list of numbers, or masks of another type.
    """
    layers = attention_layers(model)
    entries = _per_layer(masks, layers)
    checked = [_as_mask(v, layer) for v, layer in zip(entries, layers, strict=True)]
    for layer, mask in zip(layers, checked, strict=True):
        _store(layer.module, mask)


def get_head_mask(model: nn.Module) -> list[torch.Tensor | None]:
    """The head mask of every attention layer (bool ``[Hq]``/``[B, Hq]``, ``None`` where a
    layer has none), in layer order. ``torch.stack`` them for a ``[layers, Hq]`` tensor
    when every layer has a ``[Hq]`` mask of the same size."""
    return [getattr(layer.module, MASK_ATTR, None) for layer in attention_layers(model)]


class MaskEmulation:
    """Handle of :func:`emulate_head_mask`: ``remove()`` it, or use it as a context
    manager."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> MaskEmulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _zero_pruned(layer: AttentionLayer):
    module = layer.module

    def hook(_proj: nn.Module, args: tuple[Any, ...]):
        mask = getattr(module, MASK_ATTR, None)
        if mask is None:
            return None
        x = args[0]
        hq = mask.shape[-1]
        heads = x.unflatten(-1, (hq, x.shape[-1] // hq))  # [B, S, Hq, D]
        keep = mask[:, None, :, None] if mask.dim() == 2 else mask[:, None]
        return (heads.masked_fill(~keep, 0).flatten(-2), *args[1:])

    return hook


def emulate_head_mask(model: nn.Module) -> MaskEmulation:
    """Apply the stored head masks with any attention implementation.

    Registers a forward pre-hook on every output projection (``o_proj``/``c_proj``) that
    zeroes the input columns of pruned heads, read from ``sentinel_head_mask`` at each
    call (so later :func:`set_head_mask` calls take effect). A pruned head's attention
    output is exactly zero under the sentinel attention, so its share of the output
    projection's input is zero: the two give the same result. For tests and for
    evaluating masks without the sentinel kernels; it saves no work.

    Returns:
        A :class:`MaskEmulation`; call ``.remove()`` (or use ``with``) to take the hooks off.
    """
    handles = [
        layer.out_proj.register_forward_pre_hook(_zero_pruned(layer))
        for layer in attention_layers(model)
    ]
    return MaskEmulation(handles)

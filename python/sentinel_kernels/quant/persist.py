"""Save a quantized model once, reload it without calibration data or the float weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "sentinel-kernels/int8/1"


def _int8_embeddings(model: nn.Module) -> dict[str, dict]:
    from ..nn.int8_linear import Int8Embedding, Int8Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            heads = [
                n for n, h in model.named_modules()
                if isinstance(h, Int8Linear) and h.weight_int8 is m.weight_int8
            ]
            out[name] = {
                "num_embeddings": m.num_embeddings,
                "embedding_dim": m.embedding_dim,
                "padding_idx": m.padding_idx,
                "dtype": str(m.dtype).removeprefix("torch."),
                "tied_heads": heads,
            }
    return out


def _int8_layers(model: nn.Module) -> dict[str, dict]:
    from ..nn.int8_linear import Int8Linear

    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "mode": m.mode,
            "group_size": m.group_size,
            "has_smooth": m.smooth is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, Int8Linear)
    }


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (with its ``Int8Linear`` layers) to ``path`` (one file).

    Stored: the transformers config (when the model has one), the layout of every
    ``Int8Linear`` and the full state dict (int8 weights, scales, smoothing factors, and
    norm weights with folded SmoothQuant factors). Tied tensors are stored once.
    Reload with :func:`load_quantized`; no calibration data is needed.
    """
    layers = _int8_layers(model)
    if not layers:
        raise ValueError("model has no Int8Linear layers: quantize it first (patch_model)")
    config = getattr(model, "config", None)
    payload = {
        "format": FORMAT,
        "config": config.to_dict() if config is not None else None,
        "model_class": type(model).__name__,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "int8_layers": layers,
        "int8_embeddings": _int8_embeddings(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    torch.save(payload, path)
    return path


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def load_quantized(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`.

    Args:
        path: the saved file.
        model: an un-quantized model of the same architecture to load into (its weights
            are overwritten); ``None`` builds one from the stored transformers config
            (``AutoModelForCausalLM.from_config``), so the float checkpoint is not needed.
        device, dtype: where and in which float dtype to put the model (default: as saved).
    Returns:
        The model, in eval mode, with ``Int8Linear`` layers in place.
    """
    from ..nn.int8_linear import Int8Embedding, Int8Linear

    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sentinel-kernels quantized model ({FORMAT})")
    state = payload["state_dict"]
    if model is None:
        if payload["config"] is None:
            raise ValueError("the file holds no transformers config: pass model=")
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(payload["config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        attn = payload.get("attn_implementation")
        kwargs = {"attn_implementation": attn} if attn else {}
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    float_dtype = dtype or next(
        (v.dtype for k, v in state.items() if v.is_floating_point() and "scale" not in k),
        torch.float32,
    )
    model = model.to(float_dtype)
    for name, spec in payload["int8_layers"].items():
        _set_submodule(
            model,
            name,
            Int8Linear(
                spec["in_features"],
                spec["out_features"],
                bias=spec["bias"],
                mode=spec["mode"],
                group_size=spec["group_size"],
                has_smooth=spec["has_smooth"],
                dtype=float_dtype,
            ),
        )
    embeddings = payload.get("int8_embeddings", {})
    for name, spec in embeddings.items():
        n, d = spec["num_embeddings"], spec["embedding_dim"]
        _set_submodule(
            model,
            name,
            Int8Embedding(
                torch.zeros(n, d, dtype=torch.int8), torch.zeros(n),
                getattr(torch, spec["dtype"]), spec["padding_idx"],
            ),
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    for name, spec in embeddings.items():  # re-share the int8 table with tied heads
        emb = model.get_submodule(name)
        for head_name in spec["tied_heads"]:
            head = model.get_submodule(head_name)
            head.weight_int8, head.weight_scale = emb.weight_int8, emb.weight_scale
    # Tied weights (lm_head = embed_tokens) may be stored under one name only.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if device is not None:
        model = model.to(device)
    return model.eval()

"""Save a quantized model once, reload it without calibration data or the float weights."""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .. import __version__
from ..nn.int8_linear import Int8Embedding, Int8Linear

FORMAT = "sentinel-kernels/int8/1"
_FORMAT_FAMILY = "sentinel-kernels/"
_EXPECTED = "expected a file written by sk.save_quantized"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# Keys every spec in a checkpoint holds (see _int8_layers / _int8_embeddings).
_LAYER_KEYS = ("in_features", "out_features", "bias", "mode", "group_size", "has_smooth")
_EMBEDDING_KEYS = ("num_embeddings", "embedding_dim", "padding_idx", "dtype", "tied_heads")


class CheckpointError(ValueError):
    """A file :func:`load_quantized` cannot load.

    Raised when the file is empty, is not a PyTorch zip archive, is a truncated or corrupted
    one, is a PyTorch file that is not a sentinel-kernels checkpoint, is a sentinel-kernels
    checkpoint of an unsupported format version, or does not fit the model it is loaded into.
    The message names the file; the underlying error, if any, is chained (``__cause__``).
    """


def _int8_embeddings(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            heads = [
                n
                for n, h in model.named_modules()
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


def _diagnose(path: Path, exc: Exception) -> CheckpointError:
    """Why ``torch.load`` failed on ``path``: the file's size and structure tell."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError:  # vanished or unreadable since torch.load opened it
        return CheckpointError(
            f"{path} could not be read as a sentinel-kernels checkpoint; {_EXPECTED}"
        )
    if size == 0:
        return CheckpointError(
            f"{path} is empty (0 bytes), not a sentinel-kernels checkpoint: an interrupted "
            f"save or copy leaves such a file; {_EXPECTED}"
        )
    if head != _ZIP_MAGIC:
        return CheckpointError(
            f"{path} is not a sentinel-kernels checkpoint: it is not a PyTorch zip archive "
            f"(it starts with {head!r}); {_EXPECTED}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            is_torch = any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)
            bad_member = archive.testzip() if is_torch else None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError):
        return CheckpointError(
            f"{path} is truncated or corrupted: it starts like a PyTorch zip archive but its "
            f"zip directory cannot be read ({size} bytes; an interrupted save or copy cuts "
            f"off the end); expected a complete file written by sk.save_quantized"
        )
    if not is_torch:
        return CheckpointError(
            f"{path} is not a sentinel-kernels checkpoint: it is a zip archive but not a "
            f"PyTorch file (no data.pkl in it); {_EXPECTED}"
        )
    if bad_member is not None:
        return CheckpointError(
            f"{path} is truncated or corrupted: its archive member {bad_member!r} fails its "
            f"CRC check; expected an intact file written by sk.save_quantized"
        )
    if isinstance(exc, pickle.UnpicklingError):
        return CheckpointError(
            f"{path} is a PyTorch file but not a sentinel-kernels checkpoint: it holds Python "
            f"objects other than tensors and plain containers, which a file written by "
            f"sk.save_quantized never does"
        )
    return CheckpointError(
        f"{path} could not be loaded as a sentinel-kernels checkpoint: torch.load failed "
        f"with {type(exc).__name__} on an intact PyTorch archive (see the chained error); "
        f"{_EXPECTED}"
    )


def _keys(d: dict) -> str:
    keys = [repr(k) for k in list(d)[:8]]
    return ", ".join(keys) + (", ..." if len(d) > 8 else "") if keys else "none"


def _check_payload(path: Path, payload: Any) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` is what :func:`save_quantized` writes."""
    not_ours = f"{path} is a PyTorch file but not a sentinel-kernels checkpoint"
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{not_ours}: it holds a {type(payload).__name__}, not the dict that "
            f"sk.save_quantized writes; {_EXPECTED}"
        )
    if "format" not in payload:
        raise CheckpointError(
            f"{not_ours}: it has no 'format' marker (top-level keys: {_keys(payload)}); {_EXPECTED}"
        )
    fmt = payload["format"]
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY) and fmt != FORMAT:
        raise CheckpointError(
            f"{path} is a sentinel-kernels checkpoint of an unsupported format version: "
            f"{fmt!r} (sentinel-kernels {__version__} reads {FORMAT!r}); load it with the "
            f"sentinel-kernels version that wrote it, or save the model again with this "
            f"version's sk.save_quantized"
        )
    if fmt != FORMAT:
        raise CheckpointError(
            f"{not_ours}: its format marker is {fmt!r}, expected {FORMAT!r}; {_EXPECTED}"
        )
    damaged = f"{path} is a damaged sentinel-kernels checkpoint ({FORMAT})"
    missing = [k for k in ("config", "int8_layers", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(
            f"{damaged}: it lacks the key(s) {', '.join(map(repr, missing))}; {_EXPECTED}"
        )
    state, config = payload["state_dict"], payload["config"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{damaged}: 'state_dict' is not a dict of tensors; {_EXPECTED}")
    if config is not None and (not isinstance(config, dict) or "model_type" not in config):
        raise CheckpointError(
            f"{damaged}: 'config' is not a transformers config dict with a 'model_type'; "
            f"{_EXPECTED}"
        )
    for key, fields in (("int8_layers", _LAYER_KEYS), ("int8_embeddings", _EMBEDDING_KEYS)):
        specs = payload.get(key, {})
        if not isinstance(specs, dict):
            raise CheckpointError(f"{damaged}: {key!r} is not a dict; {_EXPECTED}")
        for name, spec in specs.items():
            lacking = [f for f in fields if not isinstance(spec, dict) or f not in spec]
            if lacking:
                raise CheckpointError(
                    f"{damaged}: {key}[{name!r}] lacks {', '.join(map(repr, lacking))}; {_EXPECTED}"
                )


def _read_checkpoint(path: Path) -> dict:
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a sentinel-kernels checkpoint: {_EXPECTED} (one file, "
            f"not a save_pretrained folder)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, f"no such file ({_EXPECTED})", str(path)) from exc
    except (OSError, MemoryError):  # permissions, I/O errors: not the file's content
        raise
    except Exception as exc:
        raise _diagnose(path, exc) from exc
    _check_payload(path, payload)
    return payload


def _mismatch(path: Path, model: nn.Module, built: bool, saved_class: Any, what: str):
    whose = "the model built from its stored config" if built else "the model passed"
    saved = f", saved from a {saved_class}" if isinstance(saved_class, str) else ""
    return CheckpointError(f"{path} does not fit {whose} ({type(model).__name__}{saved}): {what}")


def _list(items: list[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f"; ... ({len(items)} in all)" if len(items) > n else "")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _saved_submodule(
    path: Path, model: nn.Module, built: bool, saved_class: Any, name: str, what: str
) -> nn.Module:
    """``model``'s submodule ``name``, which the checkpoint quantized as a ``what``."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise _mismatch(
            path,
            model,
            built,
            saved_class,
            f"it quantizes the {what} {name!r}, which the model does not have",
        ) from exc


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
    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError: (a ``ValueError``; the message names ``path`` and says what is
            wrong, the underlying error is chained) ``path`` is a directory; an empty file;
            not a PyTorch zip archive; a truncated or corrupted one; a PyTorch file that is
            not a sentinel-kernels checkpoint (no or another ``format`` marker, Python
            objects other than tensors); a sentinel-kernels checkpoint of an unsupported
            format version or lacking some of its keys; or a checkpoint that does not fit
            ``model`` (another architecture or size: the message names the layer or the
            tensors whose shapes differ).
        ValueError: the file holds no transformers config and ``model`` is ``None``.
        OSError: the file cannot be read (permissions, I/O errors).
    """
    path = Path(path)
    payload = _read_checkpoint(path)
    state = payload["state_dict"]
    built = model is None
    if model is None:
        if payload["config"] is None:
            raise ValueError(
                f"{path} holds no transformers config (the model saved had none): pass "
                f"model=, an un-quantized model of the same architecture"
            )
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
    saved_class = payload.get("model_class")
    for name, spec in payload["int8_layers"].items():
        old = _saved_submodule(path, model, built, saved_class, name, "layer")
        old_shape = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if None not in old_shape and old_shape != (spec["in_features"], spec["out_features"]):
            raise _mismatch(
                path,
                model,
                built,
                saved_class,
                f"the layer {name!r} has in/out features "
                f"{(spec['in_features'], spec['out_features'])} in the checkpoint, "
                f"{old_shape} in the model",
            )
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
        old = _saved_submodule(path, model, built, saved_class, name, "embedding")
        old_shape = (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
        if None not in old_shape and old_shape != (n, d):
            raise _mismatch(
                path,
                model,
                built,
                saved_class,
                f"the embedding {name!r} is {(n, d)} in the checkpoint, {old_shape} in the model",
            )
        _set_submodule(
            model,
            name,
            Int8Embedding(
                torch.zeros(n, d, dtype=torch.int8),
                torch.zeros(n),
                getattr(torch, spec["dtype"]),
                spec["padding_idx"],
            ),
        )
    own = model.state_dict()
    wrong = [
        f"{k}: {list(v.shape)} in the checkpoint, {list(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise _mismatch(path, model, built, saved_class, f"tensor shapes differ: {_list(wrong)}")
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
        parts = []
        if missing:
            parts.append(f"the model has tensors the checkpoint lacks: {_list(missing)}")
        if unexpected:
            parts.append(f"the checkpoint has tensors the model lacks: {_list(unexpected)}")
        raise _mismatch(path, model, built, saved_class, "; ".join(parts))
    if device is not None:
        model = model.to(device)
    return model.eval()

"""Input validation shared by the ops: one place, clear messages."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    x: object,
    name: str,
    op: str,
    dtypes: Iterable[torch.dtype] | None = None,
    min_dim: int = 0,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``op`` and ``name`` unless ``x`` fits."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            raise TypeError(
                f"{op}: {name} has dtype {str(x.dtype).replace('torch.', '')}; "
                f"supported: {_dtype_names(dtypes)}"
            )
    if x.dim() < min_dim:
        raise ValueError(
            f"{op}: {name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """Raise ``ValueError`` unless all ``tensors`` are on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listed}")
    return first


def normalize_dim(dim: int, ndim: int, op: str) -> int:
    """Map a possibly negative ``dim`` into ``[0, ndim)`` or raise ``IndexError``."""
    if not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} out of range for a tensor with {ndim} dimension(s)")
    return dim % ndim


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D ``[rows, cols]`` view of ``x`` over its last dim, copying only when necessary.

    Leading dimensions are flattened without a copy when their strides allow it (any
    column stride is kept: the kernels take it); otherwise, or when a stride is 0 (an
    expanded tensor), the data is made contiguous first.
    """
    cols = x.shape[-1]
    try:
        x2 = x.view(-1, cols)
    except RuntimeError:
        x2 = x.reshape(-1, cols).contiguous()
    if x2.numel() > 0 and (x2.stride(0) <= 0 or x2.stride(1) <= 0):
        x2 = x2.contiguous()
    return x2


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the names the C++ layer takes)."""
    return str(dtype).replace("torch.", "")

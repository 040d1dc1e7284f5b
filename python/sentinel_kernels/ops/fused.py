"""``sentinel::rms_norm``, ``add_rms_norm``, ``rotary_embedding`` and ``silu_mul``.

One kernel each for the small elementwise/row ops of a Llama-style decoder layer, which
transformers runs as many tiny kernels (RMSNorm ~7, rotary embedding ~10, SiLU * up 2). In a
CUDA-graph decode step at batch 1, time is the number of kernels, so fusing them cuts a layer
from ~41 kernels to ~17.

Every op reproduces transformers' eager formula in the input dtype, including its
intermediate roundings (torch computes each op on a 16-bit tensor in fp32 and rounds the
result to the dtype):

* ``rms_norm``: ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``;
  only the fp32 sum of squares is reduced in a different order than torch's, so the mean can
  differ in its last bits and an output element by one rounding step of ``x.dtype`` (times
  ``|weight|``) in rare cases; everything after the mean is rounded exactly as torch does.
* ``rotary_embedding``: bit-exact with ``apply_rotary_pos_emb`` on every backend.
* ``silu_mul``: on CUDA the Triton kernel calls libdevice's ``expf``, the function torch's
  CUDA silu calls, with an IEEE division, so it is expected to be bit-exact there. On CPU
  the C++ backend has its own polynomial ``exp`` and torch its vectorised one (each ~1 ulp):
  fp32 ``silu`` values can differ by up to 4 ulps where ``exp(-g) > 2^24`` amplifies it;
  fp16/bf16 results are rounded far coarser than that and practically always agree.

All ops are CUDA-graph capturable (no host synchronisation; outputs allocated from shapes).
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import fused as ref
from ._checks import FLOAT_DTYPES, as_rows, check_same_device, check_tensor, dtype_name, native_rows
from ._dispatch import call_op

_RMS = "rms_norm"
_ADD_RMS = "add_rms_norm"
_ROPE = "rotary_embedding"
_SILU = "silu_mul"


def _require_tensors(op: str, **tensors: object) -> None:
    # The dispatcher's own message for a non-tensor argument does not say which op or
    # argument; this one does (and costs an isinstance per argument).
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``[rows, cols]`` view (no copy when its strides allow), strides > 0."""
    if x.dim() == 2 and x.stride(0) > 0 and x.stride(1) > 0:
        return x
    return as_rows(x)


# --------------------------------------------------------------------------- RMSNorm


def _check_norm(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_tensor(x, "x", op, FLOAT_DTYPES, min_dim=1)
    check_tensor(weight, "weight", op, FLOAT_DTYPES)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must be 1-D with x's last dimension ({x.shape[-1]}) elements, got "
            f"shape {tuple(weight.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: cannot normalise over an empty dimension (shape {tuple(x.shape)})")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
    check_same_device(op, x=x, weight=weight)


def _run_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared body of rms_norm / add_rms_norm on the triton and native backends."""
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = _backend.empty_output(x.shape, out_dtype, x.device)
    res_out = _backend.empty_output(x.shape, x.dtype, x.device) if residual is not None else None
    x2 = _rows(x)
    rows, cols = x2.shape
    if rows == 0:
        return y, res_out
    r2 = _rows(residual) if residual is not None else None
    if backend == "triton":
        from ..kernels import fused as kf

        kf.rms_norm_rows(x2, weight, eps, y, r2, res_out)
    else:
        _backend.native_module().rms_norm(
            *native_rows(x2),
            r2.data_ptr() if r2 is not None else 0,
            r2.stride(0) if r2 is not None else 0,
            r2.stride(1) if r2 is not None else 0,
            res_out.data_ptr() if res_out is not None else 0,
            cols,
            weight.data_ptr(),
            dtype_name(weight.dtype),
            weight.stride(0),
            eps,
            y.data_ptr(),
            dtype_name(out_dtype),
            cols,
            _backend.native_threads(),
        )
    return y, res_out


@torch.library.custom_op("sentinel::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(_RMS, x, weight, eps)
    backend = _backend.resolve(x.device)
    if backend == "reference":
        return ref.rms_norm(x, weight, eps).contiguous()
    return _run_norm(x, None, weight, eps, backend)[0]


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(_RMS, x, weight, eps)
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)


def _check_add_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    _check_norm(_ADD_RMS, x, weight, eps)
    check_tensor(residual, "residual", _ADD_RMS, FLOAT_DTYPES)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{_ADD_RMS}: residual must have x's shape and dtype {tuple(x.shape)} "
            f"{dtype_name(x.dtype)}, got {tuple(residual.shape)} {dtype_name(residual.dtype)}"
        )
    check_same_device(_ADD_RMS, x=x, residual=residual, weight=weight)


@torch.library.custom_op("sentinel::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_add_norm(x, residual, weight, eps)
    backend = _backend.resolve(x.device)
    if backend == "reference":
        y, res_out = ref.add_rms_norm(x, residual, weight, eps)
        return y.contiguous(), res_out.contiguous()
    y, res_norm = _run_norm(x, residual, weight, eps, backend)
    assert res_norm is not None  # _run_norm writes it whenever a residual is given
    return y, res_norm


@_add_rms_norm_op.register_fake
def _(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_add_norm(x, residual, weight, eps)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    return (
        torch.empty(x.shape, dtype=out_dtype, device=x.device),
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
    )


# --------------------------------------------------------------------------- rotary


def _check_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensor(q, "q", _ROPE, FLOAT_DTYPES)
    check_tensor(k, "k", _ROPE, FLOAT_DTYPES)
    check_tensor(cos, "cos", _ROPE, FLOAT_DTYPES)
    check_tensor(sin, "sin", _ROPE, FLOAT_DTYPES)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{_ROPE}: q and k must be 4-D [batch, heads, seq, head_dim], got shapes "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(
            f"{_ROPE}: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim"
        )
    if d < 2 or d % 2 != 0:
        raise ValueError(f"{_ROPE}: head_dim must be even and >= 2, got {d}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"{_ROPE}: cos and sin must have one shape, got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}"
        )
    ok = cos.dim() in (2, 3) and tuple(cos.shape[-2:]) == (s, d)
    if ok and cos.dim() == 3:
        ok = cos.shape[0] in (1, b)
    if not ok:
        raise ValueError(
            f"{_ROPE}: cos/sin must be [batch or 1, seq, head_dim] = [{b} or 1, {s}, {d}] "
            f"(or [seq, head_dim]), got {tuple(cos.shape)}"
        )
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
        raise TypeError(
            f"{_ROPE}: q, k, cos and sin must have one dtype (transformers casts cos/sin to "
            f"q's), got {dtype_name(q.dtype)}, {dtype_name(k.dtype)}, {dtype_name(cos.dtype)}, "
            f"{dtype_name(sin.dtype)}"
        )
    check_same_device(_ROPE, q=q, k=k, cos=cos, sin=sin)


def _strides4_bhsd(t: torch.Tensor) -> list[int]:
    """cos/sin ``[B', S, D]`` as ``[B', 1, S, D]`` strides: broadcast dims get stride 0."""
    b_stride = t.stride(0) if t.shape[0] > 1 else 0
    return [b_stride, 0, t.stride(1), t.stride(2)]


@torch.library.custom_op("sentinel::rotary_embedding", mutates_args=())
def _rotary_embedding_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rope(q, k, cos, sin)
    backend = _backend.resolve(q.device)
    if backend == "reference":
        return ref.rotary_embedding(q, k, cos, sin)
    q_out = _backend.empty_output(q.shape, q.dtype, q.device)
    k_out = _backend.empty_output(k.shape, k.dtype, k.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if backend == "triton":
        from ..kernels import fused as kf

        kf.rotary_embedding(q, k, cos, sin, q_out, k_out)
    else:
        B, Hq, S, D = q.shape
        _backend.native_module().rotary_embedding(
            q.data_ptr(),
            k.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            q_out.data_ptr(),
            k_out.data_ptr(),
            dtype_name(q.dtype),
            B,
            Hq,
            k.shape[1],
            S,
            D,
            list(q.stride()),
            list(k.stride()),
            _strides4_bhsd(cos),
            _strides4_bhsd(sin),
            list(q_out.stride()),
            list(k_out.stride()),
            _backend.native_threads(),
        )
    return q_out, k_out


@_rotary_embedding_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rope(q, k, cos, sin)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device
    )


# --------------------------------------------------------------------------- SiLU * up


def _check_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensor(gate, "gate", _SILU, FLOAT_DTYPES, min_dim=1)
    check_tensor(up, "up", _SILU, FLOAT_DTYPES, min_dim=1)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"{_SILU}: gate and up must have one shape and dtype, got {tuple(gate.shape)} "
            f"{dtype_name(gate.dtype)} and {tuple(up.shape)} {dtype_name(up.dtype)}"
        )
    check_same_device(_SILU, gate=gate, up=up)


@torch.library.custom_op("sentinel::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_silu_mul(gate, up)
    backend = _backend.resolve(gate.device)
    if backend == "reference":
        return ref.silu_mul(gate, up).contiguous()
    y = _backend.empty_output(gate.shape, gate.dtype, gate.device)
    if y.numel() == 0:
        return y
    g2, u2 = _rows(gate), _rows(up)
    rows, cols = g2.shape
    if backend == "triton":
        from ..kernels import fused as kf

        kf.silu_mul_rows(g2, u2, y)
    else:
        _backend.native_module().silu_mul(
            g2.data_ptr(),
            u2.data_ptr(),
            y.data_ptr(),
            dtype_name(gate.dtype),
            rows,
            cols,
            g2.stride(0),
            g2.stride(1),
            u2.stride(0),
            u2.stride(1),
            cols,
            _backend.native_threads(),
        )
    return y


@_silu_mul_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_silu_mul(gate, up)
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


# --------------------------------------------------------------------------- public API


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm with ``LlamaRMSNorm``'s roundings, in one kernel.

    ``y = weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``
    (Zhang & Sennrich, 2019; the form of transformers' Llama/Mistral/Qwen2/Qwen3 norms).
    The sum of squares is an fp32 reduction in another order than torch's, so the mean may
    differ from torch's in its last bits; ``1 / sqrt`` is correctly rounded (torch's CPU
    ``rsqrt``), the normalised row is rounded to ``x.dtype``, then multiplied by ``weight``
    and rounded to the promoted dtype, as in the eager module.

    Args:
        x: ``[..., N]`` float32/float16/bfloat16, any strides (leading dims are flattened
            without a copy when possible; a non-unit last-dim stride is read as is).
        weight: ``[N]`` float32/float16/bfloat16 (any stride).
        eps: added to the mean square (rounded to fp32, as torch does).
    Returns:
        Contiguous ``x.shape`` tensor of ``torch.promote_types(weight.dtype, x.dtype)``.
    """
    _require_tensors(_RMS, x=x, weight=weight)
    return call_op(_rms_norm_op, x, weight, float(eps))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one kernel (vLLM's ``fused_add_rms_norm``, out of place).

    ``new_residual = residual + x`` (rounded to the dtype) and
    ``y = rms_norm(new_residual, weight, eps)``, exactly as the eager decoder layer computes
    ``hidden = residual + hidden; hidden = norm(hidden)``.

    Args:
        x, residual: ``[..., N]`` of one shape and dtype (any strides). weight, eps: as
            :func:`rms_norm`.
    Returns:
        ``(y, new_residual)``: contiguous; ``y`` of the promoted dtype, ``new_residual`` of
        ``x.dtype``.
    """
    _require_tensors(_ADD_RMS, x=x, residual=residual, weight=weight)
    return call_op(_add_rms_norm_op, x, residual, weight, float(eps))


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k in one launch (``apply_rotary_pos_emb``).

    ``x_out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[D/2:],
    x[:D/2])`` (RoFormer, Su et al., 2021, in transformers' half-split convention), cos/sin
    broadcast over heads (``unsqueeze_dim=1``). Each product and the sum are rounded to the
    dtype as torch does, so the result is bit-exact with transformers.

    Args:
        q: ``[B, Hq, S, D]``, k: ``[B, Hkv, S, D]``, any strides (typically the transposed
            views ``proj(x).view(B, S, H, D).transpose(1, 2)``); D even.
        cos, sin: ``[B, S, D]`` or ``[1, S, D]`` (broadcast over the batch) or ``[S, D]``, of
            q's dtype (the rotary module's output).
    Returns:
        ``(q_out, k_out)``: new **contiguous** ``[B, Hq, S, D]`` / ``[B, Hkv, S, D]`` tensors.
    """
    _require_tensors(_ROPE, q=q, k=k, cos=cos, sin=sin)
    return call_op(_rotary_embedding_op, q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one kernel (the SwiGLU of ``LlamaMLP``; Shazeer, 2020).

    ``silu(g) = g / (1 + exp(-g))`` in fp32, rounded to the dtype, then multiplied by ``up``
    and rounded, as torch computes ``F.silu(gate) * up``.

    Args:
        gate, up: ``[..., N]`` of one shape and dtype (float32/float16/bfloat16), any
            strides (e.g. the two halves of a fused gate/up projection).
    Returns:
        Contiguous tensor of ``gate``'s shape and dtype.
    """
    _require_tensors(_SILU, gate=gate, up=up)
    return call_op(_silu_mul_op, gate, up)

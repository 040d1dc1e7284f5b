"""``sentinel::int8_linear`` (W8A16), ``int8_linear_fused`` (W8A16 with the RMSNorm / SiLU-mul
before it and the residual add after it) and ``sentinel::int8_linear_a8`` (W8A8, SmoothQuant).

Weight-only INT8 (LLM.int8(), Dettmers et al., 2022, without the outlier decomposition)::

    y = x @ (w_int8 * scale)^T + bias          scale per output channel [N] or per
                                               (channel, group of K) [N, ceil(K / g)]

SmoothQuant W8A8 (Xiao et al., 2023): activations are quantized per token on the fly,
after dividing each input channel by the calibrated ``smooth`` factor the weights were
multiplied by before their own quantization::

    q, a_scale = quantize_int8(x / smooth)                 (per row, absmax rule)
    y = (q @ w_int8^T) * a_scale[:, None] * w_scale[None, :] + bias

Conventions, identical on every backend: products and sums in fp32 (W8A8: exact int32
sums), the output rounded once to ``x.dtype`` (one exception: on the Triton tensor-core
paths, a ``group_size`` with no power-of-two divisor >= 16 rounds each dequantized weight
to ``x.dtype`` first); the activation quantization of W8A8 is
bit-for-bit the rule of :func:`sentinel_kernels.ops.quantize_int8`. NaN/Inf in ``x`` and
zeros in ``smooth`` are not checked (that would need a device sync).
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import int8_matmul as ref
from ._checks import (
    FLOAT_DTYPES,
    as_rows,
    check_same_device,
    check_tensor,
    data_ptr,
    dtype_name,
)
from ._dispatch import call_op, try_fused_launch
from .fused import rms_norm, silu_mul

_W8A16 = "int8_linear"
_W8A16_FUSED = "int8_linear_fused"
_W8A8 = "int8_linear_a8"


def _check_weights(op: str, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> None:
    check_tensor(x, "x", op, FLOAT_DTYPES, min_dim=1)
    check_tensor(w_int8, "w_int8", op, (torch.int8,))
    check_tensor(w_scale, "w_scale", op, (torch.float32,))
    if w_int8.dim() != 2:
        raise ValueError(f"{op}: w_int8 must be 2-D [N, K], got shape {tuple(w_int8.shape)}")
    if x.shape[-1] != w_int8.shape[1]:
        raise ValueError(
            f"{op}: x has K={x.shape[-1]} but w_int8 has K={w_int8.shape[1]} "
            f"(x is [..., K], w_int8 is [N, K])"
        )


def _check_bias(op: str, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    if bias is None:
        return
    allowed = (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)
    check_tensor(bias, "bias", op, allowed)
    if tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias shape {tuple(bias.shape)} must be [N] = ({n},)")


def _check_group_scales(
    op: str, w_int8: torch.Tensor, w_scale: torch.Tensor, group_size: int | None
) -> None:
    n, k = w_int8.shape
    if group_size is None:
        expected: tuple[int, ...] = (n,)
        what = "[N] (one scale per output channel)"
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{op}: group_size must be an int or None, got {group_size!r}")
        if group_size <= 0:
            raise ValueError(f"{op}: group_size must be positive, got {group_size}")
        expected = (n, (k + group_size - 1) // group_size)
        what = f"[N, ceil(K / group_size)] for group_size={group_size}"
    if tuple(w_scale.shape) != expected:
        raise ValueError(f"{op}: w_scale shape {tuple(w_scale.shape)} must be {what} = {expected}")


def _check_w8a16(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None,
) -> None:
    _check_weights(_W8A16, x, w_int8, w_scale)
    _check_group_scales(_W8A16, w_int8, w_scale, group_size)
    _check_bias(_W8A16, x, bias, w_int8.shape[0])
    extra = {"bias": bias} if bias is not None else {}
    check_same_device(_W8A16, x=x, w_int8=w_int8, w_scale=w_scale, **extra)


def _check_w8a16_fused(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    silu_input: bool,
) -> None:
    op = _W8A16_FUSED
    if not isinstance(silu_input, bool):
        raise TypeError(f"{op}: silu_input must be a bool, got {silu_input!r}")
    check_tensor(x, "x", op, FLOAT_DTYPES, min_dim=1)
    check_tensor(w_int8, "w_int8", op, (torch.int8,))
    check_tensor(w_scale, "w_scale", op, (torch.float32,))
    if w_int8.dim() != 2:
        raise ValueError(f"{op}: w_int8 must be 2-D [N, K], got shape {tuple(w_int8.shape)}")
    n, k = w_int8.shape
    if silu_input and x.shape[-1] != 2 * k:
        raise ValueError(
            f"{op}: with silu_input, x is [..., 2K] ([gate | up]): x has last dimension "
            f"{x.shape[-1]} but w_int8 has K={k}"
        )
    if not silu_input and x.shape[-1] != k:
        raise ValueError(
            f"{op}: x has K={x.shape[-1]} but w_int8 has K={k} (x is [..., K], w_int8 is [N, K])"
        )
    _check_group_scales(op, w_int8, w_scale, group_size)
    _check_bias(op, x, bias, n)
    tensors = {"x": x, "w_int8": w_int8, "w_scale": w_scale}
    if bias is not None:
        tensors["bias"] = bias
    if norm_weight is not None:
        check_tensor(norm_weight, "norm_weight", op, FLOAT_DTYPES)
        if norm_weight.dtype != x.dtype:
            raise TypeError(
                f"{op}: norm_weight must have x's dtype {dtype_name(x.dtype)} (the normalised "
                f"row keeps x's dtype), got {dtype_name(norm_weight.dtype)}"
            )
        if tuple(norm_weight.shape) != (k,):
            raise ValueError(
                f"{op}: norm_weight shape {tuple(norm_weight.shape)} must be [K] = ({k},)"
            )
        if k == 0:
            raise ValueError(f"{op}: cannot normalise over an empty dimension (K = 0)")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"{op}: eps must be a number, got {type(eps).__name__}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps}")
        tensors["norm_weight"] = norm_weight
    if residual is not None:
        check_tensor(residual, "residual", op, FLOAT_DTYPES)
        if residual.dtype != x.dtype:
            raise TypeError(
                f"{op}: residual must have x's dtype {dtype_name(x.dtype)}, got "
                f"{dtype_name(residual.dtype)}"
            )
        out_shape = (*x.shape[:-1], n)
        if tuple(residual.shape) != out_shape:
            raise ValueError(
                f"{op}: residual shape {tuple(residual.shape)} must be the output's "
                f"[..., N] = {out_shape}"
            )
        tensors["residual"] = residual
    check_same_device(op, **tensors)


def _check_w8a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    _check_weights(_W8A8, x, w_int8, w_scale)
    n, k = w_int8.shape
    if tuple(w_scale.shape) != (n,):
        raise ValueError(
            f"{_W8A8}: w_scale shape {tuple(w_scale.shape)} must be [N] = ({n},) "
            "(one scale per output channel)"
        )
    if smooth is not None:
        check_tensor(smooth, "smooth", _W8A8, (torch.float32,))
        if tuple(smooth.shape) != (k,):
            raise ValueError(
                f"{_W8A8}: smooth shape {tuple(smooth.shape)} must be [K] = ({k},) "
                "(one factor per input channel)"
            )
    _check_bias(_W8A8, x, bias, n)
    extra = {"bias": bias} if bias is not None else {}
    if smooth is not None:
        extra["smooth"] = smooth
    check_same_device(_W8A8, x=x, w_int8=w_int8, w_scale=w_scale, **extra)


def _unit_col(t: torch.Tensor) -> torch.Tensor:
    # Kernels read rows as contiguous runs: a column stride other than 1 costs a copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = as_rows(x)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _run(x, w_int8, w_scale, bias, reference, triton, native) -> torch.Tensor:
    """One INT8 linear on the selected backend, inputs already validated.

    ``reference()`` computes it in PyTorch; ``triton(kim, x2, w, scale, b, out)`` and
    ``native(mod, head, weights, scale, tail)`` launch the kernels on the 2-D row view
    ``x2`` (``head``/``weights``/``tail``: the C++ arguments the two linears share).
    """
    backend = _backend.resolve(x.device)
    n, k = w_int8.shape
    if backend == "reference" or x.numel() == 0 or n == 0:
        return reference()
    x2 = _rows(x)
    m = x2.shape[0]
    w = _unit_col(w_int8)
    scale = w_scale.contiguous()
    out = _backend.empty_output((m, n), x.dtype, x.device)
    if backend == "triton":
        from ..kernels import int8_matmul as kim

        triton(kim, x2, w, scale, bias.contiguous() if bias is not None else None, out)
    else:
        # The C++ kernels take the bias in x's dtype.
        b = bias.to(x.dtype).contiguous() if bias is not None else None
        name = dtype_name(x.dtype)
        head = (x2.data_ptr(), name, m, k, x2.stride(0))
        weights = (w.data_ptr(), n, w.stride(0))
        tail = (data_ptr(b), name, out.data_ptr(), name, out.stride(0), _backend.native_threads())
        native(_backend.native_module(), head, weights, scale, tail)
    return out.view(*x.shape[:-1], n)


@torch.library.custom_op("sentinel::int8_linear", mutates_args=())
def _int8_linear_op(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None,
) -> torch.Tensor:
    _check_w8a16(x, w_int8, w_scale, bias, group_size)
    g = group_size or 0
    return _run(
        x,
        w_int8,
        w_scale,
        bias,
        lambda: ref.int8_linear(x, w_int8, w_scale, bias, group_size),
        lambda kim, x2, w, scale, b, out: kim.w8a16(x2, w, scale, b, out, g),
        lambda mod, head, weights, scale, tail: mod.int8_linear_w8a16(
            *head, *weights, scale.data_ptr(), g, scale.stride(0) if scale.dim() == 2 else 1, *tail
        ),
    )


@_int8_linear_op.register_fake
def _(x, w_int8, *rest):
    _check_w8a16(x, w_int8, *rest)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@torch.library.custom_op("sentinel::int8_linear_fused", mutates_args=())
def _int8_linear_fused_op(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    silu_input: bool,
) -> torch.Tensor:
    _check_w8a16_fused(x, w_int8, w_scale, bias, group_size, norm_weight, eps, residual, silu_input)
    n, k = w_int8.shape
    rows = math.prod(x.shape[:-1])
    if n > 0 and k > 0 and _backend.resolve(x.device) == "triton":
        from ..kernels import int8_matmul as kim

        x2, nw, silu = _rows(x), norm_weight, silu_input
        # Several rows: a GEMM tile sees a K slice of its rows, not the whole rows the RMS
        # statistic needs, so the norm (and the SiLU-mul before it) run first as separate
        # ops and the launch takes what is left (the SiLU-mul alone, the residual add).
        multi = rows > 1 and kim.fused_rows_supported(x2)
        if multi and nw is not None and residual is not None:
            x2 = as_rows(rms_norm(silu_mul(x[..., :k], x[..., k:]) if silu else x, nw, eps))
            nw, silu = None, False
        if rows == 1 or (multi and nw is None and (silu or residual is not None)):
            # One launch: the prologue, the GEMV / MMA / GEMM and the residual add.
            out = _backend.empty_output((rows, n), x.dtype, x.device)
            a = x2
            if try_fused_launch(
                "int8_linear_fused",
                lambda: kim.w8a16_fused(
                    a,
                    _unit_col(w_int8),
                    w_scale.contiguous(),
                    bias.contiguous() if bias is not None else None,
                    out,
                    group_size or 0,
                    norm_weight=nw.contiguous() if nw is not None else None,
                    eps=eps,
                    residual=as_rows(residual) if residual is not None else None,
                    silu_input=silu,
                ),
            ):
                return out.view(*x.shape[:-1], n)
    # Everything else is the composition of the unfused ops (the same kernels, launches
    # and roundings as calling them one by one).
    a = silu_mul(x[..., :k], x[..., k:]) if silu_input else x
    if norm_weight is not None:
        a = rms_norm(a, norm_weight, eps)
    y = int8_linear(a, w_int8, w_scale, bias, group_size)
    return residual + y if residual is not None else y


@_int8_linear_fused_op.register_fake
def _(x, w_int8, w_scale, bias, group_size, norm_weight, eps, residual, silu_input):
    _check_w8a16_fused(x, w_int8, w_scale, bias, group_size, norm_weight, eps, residual, silu_input)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@torch.library.custom_op("sentinel::int8_linear_a8", mutates_args=())
def _int8_linear_a8_op(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    _check_w8a8(x, w_int8, w_scale, smooth, bias)
    sm = smooth.contiguous() if smooth is not None else None
    return _run(
        x,
        w_int8,
        w_scale,
        bias,
        lambda: ref.int8_linear_a8(x, w_int8, w_scale, smooth, bias),
        lambda kim, x2, w, scale, b, out: kim.w8a8(x2, w, scale, sm, b, out),
        lambda mod, head, weights, scale, tail: mod.int8_linear_w8a8(
            *head, data_ptr(sm), *weights, scale.data_ptr(), *tail
        ),
    )


@_int8_linear_a8_op.register_fake
def _(x, w_int8, *rest):
    _check_w8a8(x, w_int8, *rest)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


def _require_tensors(op: str, **tensors: object) -> None:
    # The custom-op dispatcher's own message for a non-tensor is cryptic; name the argument.
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """W8A16 linear layer: ``y = x @ (w_int8 * scale)^T + bias``, int8 weights, 16-bit math.

    The weights stay int8 in memory and are dequantized in registers (LLM.int8(),
    Dettmers et al., 2022: absmax int8 weights); products and sums are fp32 and the
    output is rounded once to ``x.dtype``. On CUDA, up to 16 rows run a split-K GEMV that
    streams the int8 weights once (decode), more rows a tensor-core GEMM (prefill); see
    ``sentinel_kernels.kernels.int8_matmul`` (split-K and grouped ordering as in the
    Triton matmul tutorial).

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32, any leading dims.
        w_int8: ``[N, K]`` int8 (e.g. from ``quantize_int8(w)`` per output channel).
        w_scale: float32 ``[N]`` (per output channel, ``group_size=None``) or
            ``[N, ceil(K / group_size)]`` (one scale per ``group_size`` consecutive input
            channels; ``K`` need not be a multiple, the last group is partial).
        bias: ``[N]`` in ``x.dtype`` or float32, or ``None``.
        group_size: ``None`` (per channel) or a positive int (128 is typical).
    Returns:
        ``[..., N]`` in ``x.dtype``.
    Raises:
        TypeError: a dtype outside the above. ValueError: mismatched K, a wrong
        ``w_scale``/``bias`` shape, ``group_size <= 0``, tensors on different devices.
    """
    _require_tensors(_W8A16, x=x, w_int8=w_int8, w_scale=w_scale, bias=bias)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise TypeError(f"{_W8A16}: group_size must be an int or None, got {group_size!r}")
    return call_op(_int8_linear_op, x, w_int8, w_scale, bias, group_size)


def int8_linear_a8(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear layer (SmoothQuant, Xiao et al., 2023): int8 activations and weights.

    Each row of ``x / smooth`` is quantized on the fly with the absmax rule of
    :func:`~sentinel_kernels.ops.quantize_int8` (``a_scale = max|xs| / 127``,
    ``q = clamp(rint(xs * 127 / max|xs|), -127, 127)``, zero rows give 0), then
    ``y = (q @ w_int8^T) * a_scale[:, None] * w_scale[None, :] + bias`` with exact int32
    sums (int8 tensor cores on CUDA). The weights must have been multiplied by
    ``smooth`` per input channel before quantization, so that ``y ~= x @ W^T``.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32.
        w_int8: ``[N, K]`` int8 of ``W * smooth``.
        w_scale: float32 ``[N]``, per output channel.
        smooth: float32 ``[K]`` (positive per-input-channel factors) or ``None`` (no
            smoothing: plain dynamic per-token W8A8).
        bias: ``[N]`` in ``x.dtype`` or float32, or ``None``.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    Raises:
        TypeError: a dtype outside the above. ValueError: mismatched K, a wrong
        ``w_scale``/``smooth``/``bias`` shape, tensors on different devices.
    """
    _require_tensors(_W8A8, x=x, w_int8=w_int8, w_scale=w_scale, smooth=smooth, bias=bias)
    return call_op(_int8_linear_a8_op, x, w_int8, w_scale, smooth, bias)


def int8_linear_fused(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_input: bool = False,
) -> torch.Tensor:
    """W8A16 linear with the decoder layer's work around it fused in (one launch at batch 1).

    Computes, with the roundings of the unfused ops (each 16-bit step rounded to
    ``x.dtype`` as eager PyTorch does)::

        a = silu_mul(x[..., :K], x[..., K:]) if silu_input else x          # SwiGLU input
        a = rms_norm(a, norm_weight, eps) if norm_weight is not None else a
        y = int8_linear(a, w_int8, w_scale, bias, group_size)
        y = residual + y if residual is not None else y                     # y rounded first

    so that a batch-1 decode step runs "RMSNorm -> QKV / gate-up projection" and
    "SiLU-mul -> down projection -> residual add" (and "o_proj -> residual add") as one
    kernel each: a GEMV reads its whole input row anyway, and at batch 1 the step's time
    is its kernel count (the fusion vLLM and TensorRT-LLM apply around their GEMMs; the
    layer's norm and SwiGLU are ``LlamaRMSNorm`` and ``LlamaMLP``'s).

    On CUDA (Triton) with one row (the product of ``x``'s leading dims is 1) the decode
    GEMV of :func:`int8_linear` does it all in one launch, no host synchronisation (CUDA
    graph capturable): each program reads the whole row for the RMS statistic (fp32 sum
    of squares; ``1 / sqrt`` and the divisions correctly rounded, as :func:`rms_norm`),
    transforms its activation tiles as it streams the weights, and adds the residual in
    the epilogue. Several rows (batched decode, verification, chunks below the
    dequantize-then-cuBLAS size of :func:`int8_linear`) take the SiLU-mul into the MMA /
    GEMM's activation loads and the residual add into its epilogue; their RMSNorm runs
    first as :func:`rms_norm` (a GEMM tile sees a K slice of its rows, the statistic needs
    whole rows), so a batched decoder layer saves the SiLU-mul and both adds. The result
    then equals the composition up to the order of the fp32 sums (in fp32 the compiler
    may also fuse the last scale multiply with the residual add). Every other case (large
    M on a GPU, CPU backends, the reference backend, empty tensors, a norm with nothing
    left to fuse after it) runs the composition itself through :func:`silu_mul`,
    :func:`rms_norm` and :func:`int8_linear` and an eager add, exactly the unfused
    behaviour; there is no C++ kernel of its own.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32 (``[..., 2K]``, the concatenated gate
            and up projections, with ``silu_input``).
        w_int8, w_scale, bias, group_size: as :func:`int8_linear`.
        norm_weight: ``[K]`` of ``x.dtype`` (an RMSNorm of the input first), or ``None``.
        eps: the RMSNorm epsilon (finite, >= 0); unused without ``norm_weight``.
        residual: ``[..., N]`` (the output's shape) of ``x.dtype``, any strides, or ``None``.
        silu_input: whether ``x`` is ``[gate | up]`` to combine with ``silu(gate) * up``.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    Raises:
        TypeError: a non-tensor, a dtype outside the above, ``norm_weight``/``residual`` of
        another dtype than ``x``, a non-bool ``silu_input``, a non-int ``group_size``.
        ValueError: mismatched K (2K with ``silu_input``), a wrong ``w_scale``/``bias``/
        ``norm_weight``/``residual`` shape, ``group_size <= 0``, a bad ``eps``, K = 0 with
        a norm, tensors on different devices.
    """
    _require_tensors(
        _W8A16_FUSED,
        x=x,
        w_int8=w_int8,
        w_scale=w_scale,
        bias=bias,
        norm_weight=norm_weight,
        residual=residual,
    )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise TypeError(f"{_W8A16_FUSED}: group_size must be an int or None, got {group_size!r}")
    if not isinstance(silu_input, bool):
        raise TypeError(f"{_W8A16_FUSED}: silu_input must be a bool, got {silu_input!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{_W8A16_FUSED}: eps must be a number, got {type(eps).__name__}")
    return call_op(
        _int8_linear_fused_op,
        x,
        w_int8,
        w_scale,
        bias,
        group_size,
        norm_weight,
        float(eps),
        residual,
        silu_input,
    )

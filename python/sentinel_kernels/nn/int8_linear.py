"""``Int8Linear``: a drop-in ``nn.Linear`` with INT8 weights (W8A16 or W8A8).

W8A16 (weight-only): ``y = x @ (q_w * s_w)^T + b``; ``q_w`` int8 ``[N, K]``, ``s_w`` fp32
per output channel (``[N]``) or per group of ``group_size`` input channels
(``[N, ceil(K / group_size)]``); dequantized in registers by the kernel
(:func:`sentinel_kernels.ops.int8_linear`).

W8A8 (SmoothQuant, Xiao et al. 2023): the weight is first multiplied per input channel by
the smoothing factors ``smooth`` (``W' = W * smooth``), then quantized per output channel;
at run time the activations are divided by ``smooth`` (in the kernel, or folded into the
preceding norm's weight), quantized per token and multiplied on int8 tensor cores
(:func:`sentinel_kernels.ops.int8_linear_a8`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _backend, ops

MODES = ("w8a16", "w8a8")
_NATIVE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _native_fast_path_ok(x: torch.Tensor) -> bool:
    """Whether an eager CPU call may go straight to the C++ kernel.

    The op layer's dispatcher round trip and checks cost ~20 us a call on a slow host,
    a quarter of a small decode GEMV; the layer's own buffers were validated when it was
    built, so only ``x`` needs looking at. Plain tensors only: fake/functional tensors and
    ``torch.compile`` go through the custom op.
    """
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.dtype in _NATIVE_DTYPES
        and not x.requires_grad
        and not torch.compiler.is_compiling()
        and _backend.resolve(x.device) == "native"
    )


def quantize_weight(
    weight: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantization of a ``[N, K]`` weight.

    Per output channel (``group_size=None``: scales ``[N]``) or per group of
    ``group_size`` consecutive input channels (scales ``[N, ceil(K / group_size)]``; a
    partial last group is quantized on its own absmax). Same rounding rule as
    :func:`sentinel_kernels.ops.quantize_int8`, computed in fp32.
    """
    w = weight.detach().float()
    if group_size is None:
        return ops.quantize_int8(w, dim=-1)
    n, k = w.shape
    groups = math.ceil(k / group_size)
    padded = w.new_zeros(n, groups * group_size)
    padded[:, :k] = w  # zero padding leaves each group's absmax unchanged
    q, s = ops.quantize_int8(padded.view(n, groups, group_size), dim=-1)
    return q.reshape(n, groups * group_size)[:, :k].contiguous(), s


class Int8Linear(nn.Module):
    """Linear layer holding int8 weights; see the module docstring for the math.

    Buffers: ``weight_int8`` int8 ``[out, in]``, ``weight_scale`` fp32, optional
    ``smooth`` fp32 ``[in]`` (W8A8 only, when not folded), optional ``bias`` in the
    activation dtype. Inputs ``[..., in]`` fp32/fp16/bf16; output ``[..., out]`` same dtype.
    """

    # Buffers, declared so the type checker sees tensors rather than Module.__getattr__'s union.
    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    smooth: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        mode: str = "w8a16",
        group_size: int | None = None,
        has_smooth: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear mode must be one of {MODES}, got {mode!r}")
        if mode == "w8a8" and group_size is not None:
            raise ValueError("group-wise scales are supported for w8a16 only")
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.group_size = group_size
        scale_shape = (
            (out_features,)
            if group_size is None
            else (out_features, math.ceil(in_features / group_size))
        )
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.zeros(scale_shape, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "smooth",
            torch.ones(in_features, dtype=torch.float32, device=device) if has_smooth else None,
        )
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        mode: str = "w8a16",
        smooth: torch.Tensor | None = None,
        group_size: int | None = None,
        fold_smooth: bool = False,
    ) -> Int8Linear:
        """Quantize ``linear`` (left unchanged) into a new ``Int8Linear``.

        Args:
            linear: an ``nn.Linear``.
            mode: ``"w8a16"`` (int8 weights, activations stay in their dtype) or
                ``"w8a8"`` (dynamic per-token int8 activations too).
            smooth: SmoothQuant factors ``[in]`` (w8a8 only): the weight is multiplied by
                them before quantization.
            group_size: group-wise weight scales along the input dim (w8a16 only).
            fold_smooth: the caller has divided the activations by ``smooth`` already
                (folded into the preceding norm), so the kernel must not do it again.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects nn.Linear, got {type(linear).__name__}")
        if smooth is not None and mode != "w8a8":
            raise ValueError("smoothing factors only apply to mode='w8a8'")
        w = linear.weight.detach().float()
        if smooth is not None:
            smooth = smooth.detach().to(w.device, torch.float32)
            if smooth.shape != (linear.in_features,):
                raise ValueError(
                    f"smooth must have shape [{linear.in_features}], got {tuple(smooth.shape)}"
                )
            w = w * smooth[None, :]
        q, s = quantize_weight(w, group_size)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            group_size=group_size,
            has_smooth=smooth is not None and not fold_smooth,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        mod.weight_int8.copy_(q)
        mod.weight_scale.copy_(s)
        if mod.smooth is not None and smooth is not None:
            mod.smooth.copy_(smooth)
        if mod.bias is not None and linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer computes with (``W'`` / smooth for w8a8)."""
        w = self.weight_int8.float()
        if self.group_size is None:
            w = w * self.weight_scale[:, None]
        else:
            idx = torch.arange(self.in_features, device=w.device) // self.group_size
            w = w * self.weight_scale[:, idx]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"Int8Linear: input has {x.shape[-1]} features, expected {k}")
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1 or x2.stride(0) < k:
            x2 = x2.contiguous()
        m = x2.shape[0]
        out = torch.empty((m, n), dtype=x.dtype)
        if m == 0:
            return out.view(*x.shape[:-1], n)
        name = _NATIVE_DTYPES[x.dtype]
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        b_ptr = bias.data_ptr() if bias is not None else 0
        C = _backend.native_module()
        threads = _backend.native_threads()
        if self.mode == "w8a16":
            s = self.weight_scale
            C.int8_linear_w8a16(
                x2.data_ptr(),
                name,
                m,
                k,
                x2.stride(0),
                self.weight_int8.data_ptr(),
                n,
                k,
                s.data_ptr(),
                self.group_size or 0,
                s.shape[1] if s.dim() == 2 else 1,
                b_ptr,
                name,
                out.data_ptr(),
                name,
                n,
                threads,
            )
        else:
            sm = self.smooth.data_ptr() if self.smooth is not None else 0
            C.int8_linear_w8a8(
                x2.data_ptr(),
                name,
                m,
                k,
                x2.stride(0),
                sm,
                self.weight_int8.data_ptr(),
                n,
                k,
                self.weight_scale.data_ptr(),
                b_ptr,
                name,
                out.data_ptr(),
                name,
                n,
                threads,
            )
        return out.view(*x.shape[:-1], n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_fast_path_ok(x):
            return self._forward_native(x)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.mode == "w8a16":
            return ops.int8_linear(x, self.weight_int8, self.weight_scale, bias, self.group_size)
        return ops.int8_linear_a8(x, self.weight_int8, self.weight_scale, self.smooth, bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        sm = ", smooth" if self.smooth is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}{g}{sm}"
        )


class Int8Embedding(nn.Module):
    """Embedding table stored as int8 rows with one fp32 scale per row.

    ``out[i] = q[ids[i]] * scale[ids[i]]`` in ``dtype``. Its buffers are shared with the
    ``Int8Linear`` that replaces a tied LM head (per-row scales of the table are the
    per-output-channel scales of the head), so tying survives quantization and the float
    table can be dropped.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(
        self,
        weight_int8: torch.Tensor,
        weight_scale: torch.Tensor,
        dtype: torch.dtype,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_int8.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Three launches (two gathers and ops.dequantize_int8, fp32 product rounded once
        # to dtype) where the eager expression took five: every decode step runs this.
        rows = nn.functional.embedding(ids, self.weight_int8)
        scales = nn.functional.embedding(ids, self.weight_scale.unsqueeze(-1)).squeeze(-1)
        return ops.dequantize_int8(rows, scales, dtype=self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"

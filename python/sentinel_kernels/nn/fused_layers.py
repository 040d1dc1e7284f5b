"""The ``fused_layers`` option of :func:`sentinel_kernels.patch_model`: fewer, fused kernels
in the Llama-family decoder layer.

At batch 1 a decode step's time on a GPU is the number of kernels it launches, not the
bytes it reads (SmolLM2-135M on an H200: ~1.7 us per kernel even inside a CUDA graph,
against ~0.1 ms to stream all of its weights; transformers' eager layer launches about
40). That layer spends 7 kernels on each RMSNorm, ~10 on the rotary embedding of q and k
and 2 on SiLU-times-up; this option replaces each group with one kernel:

* every ``LlamaRMSNorm``/``MistralRMSNorm``/``Qwen2RMSNorm``/``Qwen3RMSNorm`` becomes a
  :class:`SentinelRMSNorm` (:func:`sentinel_kernels.ops.rms_norm`, same parameter);
* the model's static rotary embedding module (cos/sin of the positions, ~9 kernels) becomes
  a :class:`~sentinel_kernels.nn.rotary_table.RotaryTable`: one gather from a table inside
  ``sk.generate`` and the serving engine (see that module);
* the MLP of those models runs ``down(silu_mul(gate(x), up(x)))``
  (:func:`sentinel_kernels.ops.silu_mul`), with gate and up as one concatenated
  projection;
* their attention runs transformers' forward with q, k and v from one concatenated
  projection, the rotary embedding of q and k in one kernel
  (:func:`sentinel_kernels.ops.rotary_embedding`) and the sentinel attention function
  called directly; a :class:`~sentinel_kernels.cache.SentinelKVCache` layer holding
  positions takes a decode chunk's q/k rotation, K/V append and length update in one
  launch (``update_rotary``, :func:`sentinel_kernels.ops.rope_kv_append`);
* their decoder layers (:data:`DECODER_CLASSES`, when both children are fused) hand the
  input norms and residual adds to those forwards, so that W8A16 projections run
  ``norm -> q/k/v``, ``o + residual``, ``norm -> gate/up`` and
  ``silu_mul -> down + residual`` as one GEMV each
  (:func:`sentinel_kernels.ops.int8_linear_fused`). A level-2 layer's batch-1 decode step
  is then six launches: q/k/v, RoPE + append, attention, o, gate/up, down. With several
  rows (batched decode, chunks) the norms stay separate launches (their statistic needs
  whole rows, a GEMM tile sees a K slice) and the SiLU-mul and both adds still fuse:
  eight launches. Decoder layers whose projections are other linears (level 1's
  ``nn.Linear`` on cuBLAS, which takes no prologue) hand each residual add to the norm
  after it, one :func:`sentinel_kernels.ops.add_rms_norm` launch (vLLM's
  ``fused_add_rms_norm``), when that norm is a :class:`SentinelRMSNorm`: the add after
  the attention to the layer's second norm, and the add after the MLP to the next
  layer's input norm (or the model's final norm), which holds the result until it is
  called with that very tensor. The same bits as the launches they replace, one launch
  per add fewer.

The concatenated projections (``nn.Linear`` or ``Int8Linear`` of one kind) own the
weights; the original projections keep working on row views of them, so nothing is stored
twice. A concatenated GEMV sums in the same order per output as its parts, but may pick
another kernel configuration (split-K), so outputs can differ from the separate
projections by float rounding; ``model.generate`` and :func:`sentinel_kernels.generate`
of a patched model both use it.

The fused ops reproduce transformers' formulas with the same roundings in the model dtype
(the rotary embedding and SiLU-mul bit for bit; the norm up to the order of its fp32 sum),
so a patched model's outputs stay within the level-1 budget. The MLP and attention
changes are instance-level ``forward`` overrides (the modules, their children and their
attributes stay as they are, so INT8 linears and head masks compose), undone by
``unpatch_model``; they fall back to the class's own forward when the model does not run
the sentinel attention, or in training mode.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .. import ops
from ..hf_compat import CACHE_NAMES
from . import attention as sk_attention
from .int8_linear import Int8Linear

if TYPE_CHECKING:
    from ..patching.context import PatchContext

__all__ = [
    "ATTENTION_CLASSES",
    "CONCAT_GATE_UP",
    "CONCAT_QKV",
    "DECODER_CLASSES",
    "FUSED_ATTENTION",
    "FUSED_DECODER",
    "FUSED_DECODER_ADD_NORM",
    "FUSED_MLP",
    "FUSED_NEXT_NORM",
    "MLP_CLASSES",
    "NORM_CLASSES",
    "SentinelRMSNorm",
]

#: RMSNorm classes computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``.
NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
#: Gated MLPs ``down(act(gate(x)) * up(x))``; fused when ``act`` is SiLU.
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
#: Attention classes whose forward this module reproduces, with where their sliding window
#: comes from (``None``: the class passes none).
ATTENTION_CLASSES: dict[str, str | None] = {
    "LlamaAttention": None,
    "MistralAttention": "config",
    "Qwen2Attention": "module",
    "Qwen3Attention": "module",
}
#: Decoder layers ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` whose norms and adds
#: the fused attention and MLP forwards take over when both are fused.
DECODER_CLASSES = (
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
)
_SILU_CLASSES = ("SiLU", "SiLUActivation")
_OVERRIDE_ATTR = "_sentinel_fused_forward"
#: On a level-1 decoder layer: the RMSNorm that reads its output next (the next layer's
#: input norm, or the model's final norm), which it then runs in its last add's launch.
_NEXT_NORM_ATTR = "_sentinel_next_norm"
#: On that norm: ``(input, output)`` of the norm already run, taken by its next call.
_READY_ATTR = "_sentinel_ready"
#: (projection, output sizes) of a module's concatenated q/k/v or gate/up projection.
_CONCAT_ATTR = "_sentinel_concat_proj"


class SentinelRMSNorm(nn.Module):
    """RMSNorm in one kernel: ``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``
    (Zhang & Sennrich 2019; transformers' Llama formula), sharing the replaced module's
    ``weight`` parameter."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # A linked decoder layer before this norm may already have normed this very
        # tensor in the launch that made it (see _decoder_forward_add_norm): take that.
        ready = self.__dict__.get(_READY_ATTR)
        if ready is not None and not torch.compiler.is_compiling():
            self.__dict__[_READY_ATTR] = None
            if ready[0] is hidden_states:
                return ready[1]
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _class_name(module: object) -> str:
    return type(module).__name__


def _norm_factory(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    del ctx
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, nn.Parameter) or eps is None or weight.dim() != 1:
        return None
    return SentinelRMSNorm(weight, eps)


def _mlp_forward(
    self: Any,
    x: torch.Tensor,
    sentinel_norm: nn.Module | None = None,
    sentinel_residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + down(silu(gate(n)) * up(n))`` with ``n = norm(x)`` (the norm and the
    residual only when the fused decoder layer passes them). W8A16 projections take the
    norm into the gate/up GEMV and SiLU-mul and the residual add into the down GEMV
    (:func:`sentinel_kernels.ops.int8_linear_fused`)."""
    if self.training:
        out = type(self).forward(self, _normed(x, sentinel_norm))
        return out if sentinel_residual is None else sentinel_residual + out
    concat = _current_concat(self, ("gate_proj", "up_proj"))
    if concat is None:
        n = _normed(x, sentinel_norm)
        gate, up = self.gate_proj(n), self.up_proj(n)
        out = self.down_proj(ops.silu_mul(gate, up))
        return out if sentinel_residual is None else sentinel_residual + out
    gate_up = _project(concat[0], x, norm=sentinel_norm)
    down = self.down_proj
    # SiLU-mul goes into the down GEMV with the decoder's residual (the fused decoder
    # layer): alone, the MLP keeps its separate launches (the "before" the probes compare with).
    fuse_down = sentinel_residual is not None and sentinel_residual.dtype == gate_up.dtype
    if fuse_down and _w8a16(down) and concat[1][0] == concat[1][1]:
        return _int8_fused(down, gate_up, residual=sentinel_residual, silu_input=True)
    gate, up = gate_up.split(concat[1], dim=-1)
    out = down(ops.silu_mul(gate, up))
    return out if sentinel_residual is None else sentinel_residual + out


def _normed(x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    return x if norm is None else norm(x)


def _w8a16(module: object) -> bool:
    """An ``Int8Linear`` whose W8A16 GEMV the fused prologue/epilogue op reproduces."""
    return type(module) is Int8Linear and module.mode == "w8a16" and module.smooth is None


def _norm_params(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` of an RMSNorm whose formula :func:`ops.int8_linear_fused` applies
    (:data:`NORM_CLASSES` or :class:`SentinelRMSNorm`, weight in ``x``'s dtype)."""
    if not isinstance(norm, SentinelRMSNorm) and _class_name(norm) not in NORM_CLASSES:
        return None
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or eps is None or weight.dtype != x.dtype:
        return None
    return weight, float(eps)


def _int8_fused(
    lin: Int8Linear,
    x: torch.Tensor,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    silu_input: bool = False,
) -> torch.Tensor:
    bias = lin.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # Int8Linear.forward's rounding of the bias
    return ops.int8_linear_fused(
        x,
        lin.weight_int8,
        lin.weight_scale,
        bias,
        lin.group_size,
        norm_weight=None if norm is None else norm[0],
        eps=1e-6 if norm is None else norm[1],
        residual=residual,
        silu_input=silu_input,
    )


def _project(
    lin: nn.Module,
    x: torch.Tensor,
    *,
    norm: nn.Module | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + lin(norm(x))``: one fused GEMV when ``lin`` is W8A16 and the norm's
    formula is known, else the modules one after another."""
    params = None if norm is None else _norm_params(norm, x)
    fusable_norm = norm is None or params is not None
    fusable_residual = residual is None or residual.dtype == x.dtype
    if _w8a16(lin) and (norm is not None or residual is not None):
        if fusable_norm and fusable_residual:
            return _int8_fused(cast(Int8Linear, lin), x, norm=params, residual=residual)
    out = lin(_normed(x, norm))
    return out if residual is None else residual + out


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    sentinel_norm: nn.Module | None = None,
    sentinel_residual: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention forward with q/k/v from one projection, RoPE in one kernel
    and the sentinel attention called directly. From the fused decoder layer it also takes
    the input norm (into the q/k/v GEMV) and the residual (into the o GEMV); a
    :class:`~sentinel_kernels.cache.SentinelKVCache` that can (``update_rotary``) rotates
    q and k and appends k and v in one launch."""
    # The decoder layer passes the cache as `cache=` (transformers >= 5.25) or
    # `past_key_values=` (older): accept either, under the name the class declares.
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    impl = getattr(self.config, "_attn_implementation", None)
    if impl != sk_attention.ATTN_IMPLEMENTATION or position_embeddings is None or self.training:
        out, weights = type(self).forward(
            self,
            _normed(hidden_states, sentinel_norm),
            position_embeddings,
            attention_mask,
            cache,
            **kwargs,
        )
        return (out if sentinel_residual is None else sentinel_residual + out), weights
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    concat = _current_concat(self, ("q_proj", "k_proj", "v_proj"))
    if concat is not None:
        q, k, v = _project(concat[0], hidden_states, norm=sentinel_norm).split(concat[1], dim=-1)
    else:
        x = _normed(hidden_states, sentinel_norm)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.view(hidden_shape)
    k = k.view(hidden_shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = self.q_norm(q)
        k = self.k_norm(k)
    v = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    fused = None
    update_rotary = getattr(cache, "update_rotary", None)
    if update_rotary is not None:
        fused = update_rotary(q, k, v, cos, sin, self.layer_idx)
    if fused is not None:
        q, k, v = fused
    else:
        q, k = ops.rotary_embedding(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
    source = ATTENTION_CLASSES.get(_class_name(self))
    if source == "config":
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif source == "module":
        kwargs["sliding_window"] = self.sliding_window
    out, weights = sk_attention.sentinel_attention_forward(
        self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
    )
    out = out.reshape(*input_shape, -1).contiguous()
    return _project(self.o_proj, out, residual=sentinel_residual), weights


def _decoder_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """A Llama-family decoder layer with its norms and residual adds handed to the fused
    attention and MLP forwards: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``, where
    each norm runs in the GEMV after it and each add in the GEMV before it (vLLM fuses the
    add into the next norm instead; here both go into W8A16 GEMVs, which read their
    whole input row anyway). Falls back to the class's forward in training mode or for
    an unexpected call layout."""
    if self.training or args:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h, _ = self.self_attn(
        hidden_states=hidden_states,
        sentinel_norm=self.input_layernorm,
        sentinel_residual=hidden_states,
        **kwargs,
    )
    return self.mlp(h, sentinel_norm=self.post_attention_layernorm, sentinel_residual=h)


def _decoder_forward_add_norm(
    self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """A Llama-family decoder layer whose projections take no norm or add (``nn.Linear``):
    ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` with ``x + attn`` and ``norm2``
    in one :func:`ops.add_rms_norm` launch (the add rounded to the dtype first, then the
    norm of :class:`SentinelRMSNorm`: its bits). Falls back to the class's forward in
    training mode or for an unexpected call layout."""
    if self.training or args:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    attn, _ = self.self_attn(
        hidden_states=hidden_states, sentinel_norm=self.input_layernorm, **kwargs
    )
    norm = self.post_attention_layernorm
    normed, h = ops.add_rms_norm(attn, hidden_states, norm.weight, norm.variance_epsilon)
    mlp = self.mlp(normed)
    nxt = self.__dict__.get(_NEXT_NORM_ATTR)
    if nxt is None or torch.compiler.is_compiling():  # inductor fuses the add and norm itself
        return h + mlp
    # The layer's last add and the next norm in one launch (vLLM carries the residual
    # between layers instead; transformers' loop passes one tensor, so the norm's
    # output waits on that norm, which returns it when called with this very output).
    normed_next, out = ops.add_rms_norm(mlp, h, nxt.weight, nxt.variance_epsilon)
    nxt.__dict__[_READY_ATTR] = (out, normed_next)
    return out


#: The leading parameters of the attention forward this module reproduces (transformers
#: >= 4.56); the fourth is the cache, named ``cache`` from 5.25, ``past_key_values`` before.
_ATTENTION_PARAMS = ["self", "hidden_states", "position_embeddings", "attention_mask"]


def _unsupported_forward(cls: type[nn.Module]) -> str | None:
    """Why ``cls.forward`` is not the layout :func:`_attention_forward` reproduces
    (``None`` when it is)."""
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return f"{cls.__name__}.forward has no readable signature"
    if params[:4] == _ATTENTION_PARAMS and params[4:5] and params[4] in CACHE_NAMES:
        return None
    return (
        f"{cls.__name__}.forward{tuple(params[1:6])} is not the layout the fused forward "
        f"reproduces ({', '.join(_ATTENTION_PARAMS[1:])}, cache)"
    )


def _int8_compatible(mods: list[Any]) -> bool:
    first = mods[0]
    return all(
        type(m) is Int8Linear
        and m.mode == first.mode
        and m.group_size == first.group_size
        and m.smooth is None
        and (m.bias is None) == (first.bias is None)
        and m.in_features == first.in_features
        for m in mods
    )


def _linear_compatible(mods: list[Any]) -> bool:
    first = mods[0]
    return all(
        type(m) is nn.Linear
        and m.in_features == first.in_features
        and (m.bias is None) == (first.bias is None)
        and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        for m in mods
    )


def _concat(mods: list[Any]) -> tuple[nn.Module, list[int], Callable[[], None]] | None:
    """One projection computing ``cat([m(x) for m in mods], -1)``, or None.

    The modules' weights become row views of the concatenated weight (their own storage
    is freed, so the model does not hold the weights twice); the returned undo gives
    each module its own copy back. One GEMV instead of several: at batch 1 each costs
    ~3 us of fixed latency on a GPU whatever its size.
    """
    sizes = [m.out_features for m in mods]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if _linear_compatible(mods):
        first = mods[0]
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in mods], 0)
            bias = torch.cat([m.bias.detach() for m in mods]) if first.bias is not None else None
        fused = nn.Linear(first.in_features, bounds[-1], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        for m, a, b in zip(mods, bounds, bounds[1:], strict=False):
            m.weight.data = weight[a:b]
            if bias is not None:
                m.bias.data = bias[a:b]

        def undo() -> None:
            for m in mods:
                m.weight.data = m.weight.data.clone()
                if m.bias is not None:
                    m.bias.data = m.bias.data.clone()

        return fused, sizes, undo
    if _int8_compatible(mods):
        first = mods[0]
        fused8 = Int8Linear(
            first.in_features,
            bounds[-1],
            bias=first.bias is not None,
            mode=first.mode,
            group_size=first.group_size,
            dtype=first.bias.dtype if first.bias is not None else torch.float32,
            device="meta",
        )
        names = ["weight_int8", "weight_scale"] + (["bias"] if first.bias is not None else [])
        for name in names:
            full = torch.cat([getattr(m, name) for m in mods], 0)
            setattr(fused8, name, full)
            for m, a, b in zip(mods, bounds, bounds[1:], strict=False):
                setattr(m, name, full[a:b])

        def undo_int8() -> None:
            for m in mods:
                for name in names:
                    setattr(m, name, getattr(m, name).clone())

        return fused8, sizes, undo_int8
    return None


def _weight_of(m: nn.Module) -> torch.Tensor:
    return m.weight_int8 if isinstance(m, Int8Linear) else cast(torch.Tensor, m.weight)


def _current_concat(module: nn.Module, names: tuple[str, ...]) -> Any:
    """The module's concatenated projection, rebuilt when its parts no longer view it.

    ``model.to(device/dtype)`` after patching gives every parameter its own new storage
    and leaves the concatenated copy (a plain attribute) behind: a host-side pointer
    check per call finds that and concatenates again (no device sync)."""
    concat = vars(module).get(_CONCAT_ATTR)
    if concat is None or torch.compiler.is_compiling():
        # dynamo cannot trace pointer comparisons: a compiled model is not moved midway
        return concat
    first = _weight_of(getattr(module, names[0]))
    fused_w = _weight_of(concat[0])
    if first.data_ptr() == fused_w.data_ptr() and first.device == fused_w.device:
        return concat
    got = _concat([getattr(module, n) for n in names])
    if got is None:  # the parts changed kind: use them separately from now on
        object.__delattr__(module, _CONCAT_ATTR)
        return None
    object.__setattr__(module, _CONCAT_ATTR, (got[0], got[1]))
    return vars(module)[_CONCAT_ATTR]


def _attach_concat(module: nn.Module, names: tuple[str, ...]) -> Callable[[], None] | None:
    mods = [getattr(module, n, None) for n in names]
    if any(m is None for m in mods):
        return None
    got = _concat(mods)
    if got is None:
        return None
    fused, sizes, undo = got
    # a plain attribute, not a submodule: state_dict and the module tree stay as they are
    object.__setattr__(module, _CONCAT_ATTR, (fused, sizes))

    def detach() -> None:
        if _CONCAT_ATTR in vars(module):
            object.__delattr__(module, _CONCAT_ATTR)
        undo()

    return detach


def _override(module: nn.Module, fn: Callable[..., Any]) -> None:
    module.forward = types.MethodType(fn, module)
    object.__setattr__(module, _OVERRIDE_ATTR, True)


def _restore(module: nn.Module) -> None:
    if getattr(module, _OVERRIDE_ATTR, False):
        if "forward" in vars(module):
            del module.forward
        object.__delattr__(module, _OVERRIDE_ATTR)


#: Report labels of what ``fused_layers`` puts in effect (tests look for them).
FUSED_MLP = "fused SiLU-mul MLP forward"
FUSED_ATTENTION = "fused attention forward (RoPE kernel, sentinel attention called directly)"
FUSED_DECODER = "fused decoder layer (norms and residual adds inside the projections)"
FUSED_DECODER_ADD_NORM = "fused decoder layer (residual add and RMSNorm in one launch)"
FUSED_NEXT_NORM = "decoder layer's last residual add in the next RMSNorm's launch"
CONCAT_QKV = "concatenated q/k/v projection"
CONCAT_GATE_UP = "concatenated gate/up projection"
_ATTENTION_ATTRS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "head_dim",
    "scaling",
    "layer_idx",
    "config",
)


def _decoder_projections_fusable(attn: nn.Module, mlp: nn.Module) -> bool:
    """Whether the layer's four GEMVs are W8A16 ``Int8Linear`` (the q/k/v and gate/up ones
    concatenated), the projections :func:`ops.int8_linear_fused` takes the norms and
    residual adds into."""
    qkv, gate_up = vars(attn).get(_CONCAT_ATTR), vars(mlp).get(_CONCAT_ATTR)
    return (
        qkv is not None
        and gate_up is not None
        and all(_w8a16(m) for m in (qkv[0], gate_up[0], attn.o_proj, mlp.down_proj))
    )


def _sentinel_attention_on(model: nn.Module, ctx: PatchContext) -> bool:
    """Whether the model will run the sentinel attention after this patch (the fused
    attention forward only acts then)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return (
        impl == sk_attention.ATTN_IMPLEMENTATION
        or ctx.enabled("attention")
        or ctx.enabled("kv_cache")
    )


def _fuse_model(model: nn.Module, ctx: PatchContext) -> Callable[[], None] | None:
    """patch_model transform of ``fused_layers=True``: override the forward of the gated
    SiLU MLPs and of the supported attention modules (instance attributes), concatenating
    their projections. Records in ``ctx`` what it applied and, per class, what it could not
    apply and why (an unfamiliar forward layout, a non-SiLU activation, projections of
    different kinds)."""
    touched: list[nn.Module] = []
    undos: list[Callable[[], None]] = []
    skipped: dict[str, int] = {}  # reason -> modules
    attention_on = _sentinel_attention_on(model, ctx)

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def concat(module: nn.Module, names: tuple[str, ...], label: str) -> None:
        undo = _attach_concat(module, names)
        if undo is None:
            kinds = sorted({type(getattr(module, n, None)).__name__ for n in names})
            skip(
                f"{label}: {_class_name(module)}.{{{','.join(names)}}} are "
                f"{'/'.join(kinds)} of different kinds or shapes; they run separately"
            )
            return
        undos.append(undo)
        ctx.applied(label)

    for module in model.modules():
        name = _class_name(module)
        if getattr(module, _OVERRIDE_ATTR, False):
            continue
        if name in MLP_CLASSES:
            act = _class_name(getattr(module, "act_fn", None))
            if act not in _SILU_CLASSES:
                skip(f"{FUSED_MLP}: {name}'s activation is {act}, not SiLU; it keeps its forward")
                continue
            if not all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
                skip(f"{FUSED_MLP}: {name} lacks gate_proj/up_proj/down_proj")
                continue
            _override(module, _mlp_forward)
            touched.append(module)
            ctx.applied(FUSED_MLP)
            concat(module, ("gate_proj", "up_proj"), CONCAT_GATE_UP)
        elif name in ATTENTION_CLASSES:
            why = _unsupported_forward(type(module))
            missing = [a for a in _ATTENTION_ATTRS if not hasattr(module, a)]
            if why is None and missing:
                why = f"{name} lacks {', '.join(missing)}"
            if why is not None:
                skip(f"{FUSED_ATTENTION}: {why}; it keeps its forward")
                continue
            if not attention_on:
                skip(
                    f"{FUSED_ATTENTION}: the model does not run attention='sentinel', which "
                    f"the fused {name} forward calls"
                )
                continue
            _override(module, _attention_forward)
            touched.append(module)
            ctx.applied(FUSED_ATTENTION)
            concat(module, ("q_proj", "k_proj", "v_proj"), CONCAT_QKV)
    fused_children = set(map(id, touched))
    for module in model.modules():
        name = _class_name(module)
        if name not in DECODER_CLASSES or getattr(module, _OVERRIDE_ATTR, False):
            continue
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        norms = [getattr(module, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if not (_w8a16(getattr(attn, "o_proj", None)) and _w8a16(getattr(mlp, "down_proj", None))):
            # e.g. level 1's bf16 nn.Linear run on cuBLAS, with no GEMV of ours to take the
            # norms and adds: only the add before the second norm fuses, into that norm.
            # Not a shortfall where it cannot (no note).
            children = (
                attn is not None and mlp is not None and {id(attn), id(mlp)} <= fused_children
            )
            if children and all(isinstance(n, SentinelRMSNorm) for n in norms):
                _override(module, _decoder_forward_add_norm)
                touched.append(module)
                ctx.applied(FUSED_DECODER_ADD_NORM)
            continue
        if attn is None or mlp is None or not {id(attn), id(mlp)} <= fused_children:
            skip(f"{FUSED_DECODER}: {name}'s attention or MLP keeps its own forward")
            continue
        if any(not isinstance(n, nn.Module) for n in norms):
            skip(f"{FUSED_DECODER}: {name} lacks input_layernorm/post_attention_layernorm")
            continue
        if not _decoder_projections_fusable(attn, mlp):
            skip(f"{FUSED_DECODER}: {name}'s q/k/v or gate/up are not one W8A16 projection")
            continue
        _override(module, _decoder_forward)
        touched.append(module)
        ctx.applied(FUSED_DECODER)
    undos.append(_link_next_norms(model, ctx))
    for reason, count in skipped.items():
        ctx.not_applied(f"fused_layers: not applied to {count} module(s): {reason}")
    if not touched:
        return None

    def undo() -> None:
        for module in touched:
            _restore(module)
        for fn in reversed(undos):
            fn()

    return undo


def _link_next_norms(model: nn.Module, ctx: PatchContext) -> Callable[[], None]:
    """Give each :func:`_decoder_forward_add_norm` layer of a decoder stack (a module with
    a ``layers`` list and a final ``norm``) the :class:`SentinelRMSNorm` that reads its
    output next: the next layer's ``input_layernorm``, the stack's ``norm`` after the
    last. Such a layer then runs its last residual add and that norm in one
    :func:`ops.add_rms_norm` launch (the same bits as the add and the norm apart), one
    launch per layer fewer. Returns the undo."""
    linked: list[nn.Module] = []
    for stack in model.modules():
        layers, final = getattr(stack, "layers", None), getattr(stack, "norm", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        nexts = [getattr(m, "input_layernorm", None) for m in list(layers)[1:]] + [final]
        for layer, nxt in zip(layers, nexts, strict=True):
            add_norm = layer.__dict__.get("forward")
            if (
                isinstance(nxt, SentinelRMSNorm)
                and getattr(add_norm, "__func__", None) is _decoder_forward_add_norm
            ):
                layer.__dict__[_NEXT_NORM_ATTR] = nxt
                linked.append(layer)
                ctx.applied(FUSED_NEXT_NORM)

    def undo() -> None:
        for layer in linked:
            nxt = layer.__dict__.pop(_NEXT_NORM_ATTR, None)
            if nxt is not None:
                nxt.__dict__.pop(_READY_ATTR, None)

    return undo


def _norm_factory_by_name(module: nn.Module, ctx: PatchContext) -> nn.Module | None:
    if _class_name(module) not in NORM_CLASSES:
        return None
    return _norm_factory(module, ctx)

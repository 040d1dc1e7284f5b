"""Per-channel activation statistics and SmoothQuant smoothing factors.

SmoothQuant (Xiao et al., 2023) moves activation outliers into the weights: for a linear
layer with input channels ``j``,

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
    X' = X / s,   W' = W * s          (so X' W'^T = X W^T)

``alpha = 0`` leaves activations alone; larger ``alpha`` makes them easier to quantize at
the weights' expense. Layers that share one input (q/k/v after the attention norm,
gate/up after the MLP norm in Llama-family models) must share ``s``, computed from the
largest weight magnitude over the group, so that ``1/s`` can be folded into the norm's
weight and costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

# Linear layers fed by the same norm in Llama-family decoder layers (Llama, Mistral,
# Qwen2/3, SmolLM): (norm attribute, attention/mlp attribute, linear names).
LLAMA_SHARED_INPUTS = (
    ("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
    ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")),
)


@dataclass
class Calibration:
    """Per-input-channel ``max |x|`` of every ``nn.Linear`` input, by qualified name."""

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0

    def to_dict(self) -> dict:
        return {"act_absmax": dict(self.act_absmax), "n_tokens": self.n_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(act_absmax=dict(d["act_absmax"]), n_tokens=int(d["n_tokens"]))


def _token_windows(tokenizer, texts: str | Iterable[str], seq_len: int, n_samples: int):
    if isinstance(texts, str):
        texts = [texts]
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= seq_len * n_samples:
            break
    if len(ids) < 2:
        raise ValueError("calibration text is empty after tokenization")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)][:n_samples]
    return [w for w in windows if len(w) >= 2]


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    tokenizer,
    texts: str | Iterable[str],
    n_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
) -> Calibration:
    """Run ``n_samples`` windows of ``seq_len`` tokens and record each linear input's absmax.

    The text is tokenized (no special tokens), cut into consecutive windows, and each is
    run through ``model`` once; a forward pre-hook on every ``nn.Linear`` keeps the running
    per-channel maximum of ``|input|`` in fp32. Use validation data, never the test split.

    Returns:
        :class:`Calibration` with ``act_absmax[name]`` of shape ``[in_features]``.
    """
    windows = _token_windows(tokenizer, texts, seq_len, n_samples)
    cal = Calibration()
    hooks = []

    def make_hook(name: str):
        def hook(_mod, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            prev = cal.act_absmax.get(name)
            cal.act_absmax[name] = amax if prev is None else torch.maximum(prev, amax)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    device = next(model.parameters()).device
    try:
        for w in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
            model(torch.tensor([w], device=device))
            cal.n_tokens += len(w)
    finally:
        for h in hooks:
            h.remove()
    cal.act_absmax = {k: v.cpu() for k, v in cal.act_absmax.items()}
    return cal


def _factors(act: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(dim=0).float().cpu() for w in weights]).amax(0)
    a = act.float().clamp(min=1e-5)
    w_max = w_max.clamp(min=1e-5)
    s = a.pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def smoothquant_factors(
    model: nn.Module, calibration: Calibration, alpha: float = 0.5
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors ``s`` (``[in_features]``, fp32) for every calibrated linear.

    Linears that share an input norm (see ``LLAMA_SHARED_INPUTS``) get one shared ``s``
    computed from the group's largest weight magnitudes; the others get their own.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for _norm, block, linears in LLAMA_SHARED_INPUTS:
            sub = getattr(mod, block, None)
            if sub is None or not all(
                isinstance(getattr(sub, n, None), nn.Linear) for n in linears
            ):
                continue
            names = [f"{name}.{block}.{n}" if name else f"{block}.{n}" for n in linears]
            if not all(n in calibration.act_absmax for n in names):
                continue
            act = torch.stack([calibration.act_absmax[n] for n in names]).amax(0)
            s = _factors(act, [getattr(sub, n).weight for n in linears], alpha)
            for n in names:
                out[n] = s
    for name, act in calibration.act_absmax.items():
        if name not in out and isinstance(modules.get(name), nn.Linear):
            out[name] = _factors(act, [modules[name].weight], alpha)
    return out


def foldable_groups(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """``(norm, [linear names])`` pairs whose shared input comes straight from ``norm``."""
    groups = []
    for name, mod in model.named_modules():
        for norm_attr, block, linears in LLAMA_SHARED_INPUTS:
            norm = getattr(mod, norm_attr, None)
            sub = getattr(mod, block, None)
            if norm is None or sub is None or getattr(norm, "weight", None) is None:
                continue
            if not all(isinstance(getattr(sub, n, None), nn.Linear) for n in linears):
                continue
            prefix = f"{name}.{block}" if name else block
            groups.append((norm, [f"{prefix}.{n}" for n in linears]))
    return groups

"""Head importance scores from calibration text.

Two estimators, both computed at the input of each layer's output projection (``o_proj``
in Llama-family models, ``c_proj`` in GPT-2), which sees the heads' attention outputs side
by side as ``[B, S, Hq*D]``. Working there, rather than inside the attention function,
makes them independent of the attention implementation (eager, sdpa, sentinel ...).

* ``"gradient"``: Michel, Levy & Neubig (2019), *Are Sixteen Heads Really Better than
  One?* Each head's output is multiplied by a gate ``g_h = 1``; the importance of head
  ``h`` is ``I_h = sum over windows |dL/dg_h|``, ``L`` the mean next-token cross-entropy
  of the window, i.e. the first-order estimate of the loss change when the head is
  removed (``g_h = 0``). As in the paper, the scores of each layer are divided by their
  L2 norm, which makes them comparable across layers for global pruning.
* ``"activation"``: gradient-free. ``I_h`` is the mean over tokens of the L2 norm of the
  head's contribution to the layer output, ``||W_o[:, h] x_h||`` (``W_o[:, h]`` the
  output projection's ``D`` columns of head ``h``, ``x_h`` the head's attention output),
  computed as ``sqrt(x_h^T (W_h^T W_h) x_h)``. One forward pass per window, no backward.
  Normalised per layer the same way (``normalize=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .layers import AttentionLayer, attention_layers

__all__ = ["METHODS", "head_importance", "token_windows"]

METHODS = ("gradient", "activation")


def token_windows(
    tokenizer: Any, texts: str | Iterable[str], seq_len: int, n_samples: int
) -> list[torch.Tensor]:
    """Up to ``n_samples`` consecutive windows of ``seq_len`` token ids (int64 ``[L]``).

    ``texts`` (a str, or strings joined into one stream) is tokenized without special
    tokens, as the SmoothQuant calibration does; tokenizing stops once enough tokens are
    read. A last window shorter than ``seq_len`` is kept if it has >= 2 tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(texts, str):
        texts = [texts]
    ids: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"calibration texts must be str, got {type(text).__name__}")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= seq_len * n_samples:
            break
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)][:n_samples]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("calibration text has fewer than 2 tokens after tokenization")
    return [torch.tensor(w, dtype=torch.long) for w in windows]


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one window ``[1, L]``, in fp32."""
    logits = _logits(model(input_ids=ids, use_cache=False))
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def _gate_hook(gate: torch.Tensor) -> Callable:
    def hook(_proj: nn.Module, args: tuple[Any, ...]):
        x = args[0]
        h = gate.shape[0]
        # The gate is cast to the activations' dtype; autograd still reaches the fp32 leaf.
        gated = x.unflatten(-1, (h, x.shape[-1] // h)) * gate.to(x.dtype)[:, None]
        return (gated.flatten(-2), *args[1:])

    return hook


def _activation_hook(layer: AttentionLayer, acc: torch.Tensor) -> Callable:
    def hook(_proj: nn.Module, args: tuple[Any, ...]):
        x = args[0]
        w = layer.out_weight_by_head().float()  # [O, H, D]
        gram = torch.einsum("ohd,ohe->hde", w, w)  # W_h^T W_h, [H, D, D]
        heads = x.unflatten(-1, (w.shape[1], w.shape[2])).float()  # [B, S, H, D]
        sq = torch.einsum("bshd,hde,bshe->bsh", heads, gram, heads)
        acc.add_(sq.clamp_min(0).sqrt().sum(dim=(0, 1)))
        return None

    return hook


def head_importance(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Iterable[str],
    method: str = "gradient",
    n_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Importance of every attention head, ``[layers, Hq]`` float32 on the CPU.

    Args:
        model: a Llama-family or GPT-2 style causal LM (forward takes ``input_ids`` and
            returns ``.logits``), with floating-point output projections (score before
            int8 patching).
        tokenizer: its tokenizer.
        texts: calibration text (a str, or a list of str read as one stream); use
            validation data, never the test split.
        method: ``"gradient"`` (Michel et al. 2019, one forward + backward per window) or
            ``"activation"`` (mean L2 norm of each head's contribution through the output
            projection, forward only). See the module docstring for the formulas.
        n_samples: number of windows (fewer if the text is short).
        seq_len: tokens per window (batch 1).
        progress: show a tqdm bar over windows.
        normalize: divide each layer's scores by their L2 norm (the paper's per-layer
            normalisation, which makes global selection across layers fair).

    Heads that are already masked (``sentinel_head_mask`` with the sentinel attention)
    score 0 with the gradient method. The model's training mode and its parameters'
    ``requires_grad`` are restored and every hook removed, also on error. The gradient
    method needs autograd through the model (not under a patched int8 model).

    Raises:
        ValueError: unknown method, a text too short, layers with different head counts.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    layers = attention_layers(model)
    counts = {layer.num_heads for layer in layers}
    if len(counts) != 1:
        raise ValueError(
            f"attention layers have different head counts {sorted(counts)} (a compacted "
            "model?); score heads before compaction"
        )
    windows = token_windows(tokenizer, texts, seq_len, n_samples)
    device = next(iter(model.parameters())).device
    modes = {m: m.training for m in model.modules()}
    grads = [(p, p.requires_grad) for p in model.parameters()]
    hooks: list[Any] = []
    scores = torch.zeros(len(layers), counts.pop(), dtype=torch.float32)
    try:
        model.eval()
        desc = f"head importance ({method})"
        if method == "gradient":
            for p, _ in grads:
                p.requires_grad_(False)  # only the gates need gradients
            # Also under a caller's inference_mode: the gates must be normal tensors.
            with torch.inference_mode(False), torch.enable_grad():
                gates = [
                    torch.ones(layer.num_heads, device=layer.device, requires_grad=True)
                    for layer in layers
                ]
                hooks = [
                    layer.out_proj.register_forward_pre_hook(_gate_hook(g))
                    for layer, g in zip(layers, gates, strict=True)
                ]
                for w in tqdm(windows, desc=desc, unit="window", disable=not progress):
                    # clone: the ids may be inference tensors, which autograd cannot save
                    loss = _lm_loss(model, w[None].to(device).clone())
                    step = torch.autograd.grad(loss, gates)
                    # |dL/dg| per window, then summed: the paper's expectation of |grad|.
                    scores = scores + torch.stack([g.abs().float().cpu() for g in step])
        else:
            accs = [torch.zeros(layer.num_heads, device=layer.device) for layer in layers]
            hooks = [
                layer.out_proj.register_forward_pre_hook(_activation_hook(layer, acc))
                for layer, acc in zip(layers, accs, strict=True)
            ]
            n_tokens = 0
            with torch.inference_mode():
                for w in tqdm(windows, desc=desc, unit="window", disable=not progress):
                    model(input_ids=w[None].to(device), use_cache=False)
                    n_tokens += w.numel()
            scores = torch.stack([a.float().cpu() for a in accs]) / n_tokens
    finally:
        for h in hooks:
            h.remove()
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training
    if normalize:
        scores = scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return scores

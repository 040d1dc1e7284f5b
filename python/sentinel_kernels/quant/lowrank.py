"""Calibrated low-rank KV bases: per layer and KV head, the principal axes of the keys and
values a model produces.

A low-rank cache (``sk.kv_cache(model, "lowrank:r")``) stores, per token and KV head,
``r < D`` coordinates instead of ``D`` channels::

    k_lat = (k - mu_k) P_k[:, :r]          v_lat = (v - mu_v) P_v[:, :r]

where ``P_k`` / ``P_v`` ``[D, D]`` hold the eigenvectors of the covariance of the keys /
values (columns, sorted by eigenvalue, descending) and ``mu_k`` / ``mu_v`` their means.
Attention then runs in the latent space (``q P_k[:, :r]`` against ``k_lat``; the output is
``o_lat P_v[:, :r]^T + mu_v``). This is PCA of the KV activations, the idea behind
low-rank KV compression such as Eigen Attention (Saxena et al., 2024) and the offline
projections of Palu (Chang et al., 2024); here the bases are the plain per-head PCA of the
*post-RoPE* keys (what the cache stores), so no kernel has to re-apply the rotary embedding.

:func:`calibrate_lowrank` runs the model on calibration text with a transformers
``DynamicCache`` and reads the cached keys/values of every layer; the statistics (sum and
sum of outer products per head) accumulate in float64. The result, a
:class:`LowRankBases`, is attached to the model (attribute :data:`LOWRANK_ATTR`) where
``sk.kv_cache`` looks for it; :meth:`LowRankBases.save` / :meth:`LowRankBases.load` keep
it on disk.

Quality. Plain per-head PCA is lossy on SmolLM2-135M (head dim 64): chunked wikitext-2
perplexity (3 windows of 256 test tokens, chunks of 32, bases from 8 x 256 valid tokens,
fp32 CPU) rises by +61% at ``r = 60``, +119% at ``r = 48`` and +267% at ``r = 32``, although
``r = 48`` keeps >= 92% of every head's key variance. Replacing the keys and values by their
rank-``r`` reconstructions inside a plain ``DynamicCache`` with eager attention gives the
same picture (+85% at ``r = 60``), so this is the method, not the kernels: the directions
of small key variance carry large query components, and the value error is not weighted
by ``o_proj``. Query- and output-aware bases would be the next step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..hf_compat import cache_kwargs

__all__ = [
    "CALIBRATION_MAX_LENGTH",
    "CALIBRATION_SAMPLES",
    "LOWRANK_ATTR",
    "LowRankBases",
    "calibrate_lowrank",
    "get_lowrank_bases",
]

#: Attribute of a model holding its :class:`LowRankBases` (set by :func:`calibrate_lowrank`).
LOWRANK_ATTR = "sentinel_lowrank_bases"
#: Default number of calibration sequences and their length in tokens.
CALIBRATION_SAMPLES = 16
CALIBRATION_MAX_LENGTH = 512

_FORMAT_VERSION = 1


@dataclass
class LowRankBases:
    """Per-layer PCA bases of a model's post-RoPE keys and values.

    Every list has one entry per decoder layer; tensors are float32 on the CPU:

    * ``k_basis`` / ``v_basis``: ``[Hkv, D, D]``; column ``i`` of head ``h`` is the
      eigenvector with the ``i``-th largest eigenvalue of that head's covariance;
    * ``k_mean`` / ``v_mean``: ``[Hkv, D]`` means;
    * ``k_eigenvalues`` / ``v_eigenvalues``: ``[Hkv, D]`` eigenvalues, descending (>= 0).

    ``n_tokens`` is the number of token vectors per head the statistics saw; ``meta`` is
    free-form provenance (model class, calibration sizes).
    """

    k_basis: list[torch.Tensor]
    v_basis: list[torch.Tensor]
    k_mean: list[torch.Tensor]
    v_mean: list[torch.Tensor]
    k_eigenvalues: list[torch.Tensor]
    v_eigenvalues: list[torch.Tensor]
    n_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.k_basis)
        for name in ("v_basis", "k_mean", "v_mean", "k_eigenvalues", "v_eigenvalues"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"LowRankBases: {name} has {len(getattr(self, name))} layers, k_basis has {n}"
                )
        for i, (kb, vb) in enumerate(zip(self.k_basis, self.v_basis, strict=True)):
            if kb.dim() != 3 or kb.shape[1] != kb.shape[2] or vb.shape != kb.shape:
                raise ValueError(
                    f"LowRankBases: layer {i} bases must be [Hkv, D, D] and equal in shape, "
                    f"got {tuple(kb.shape)} and {tuple(vb.shape)}"
                )

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.k_basis)

    def head_shape(self, layer: int) -> tuple[int, int]:
        """``(Hkv, D)`` of ``layer``."""
        return int(self.k_basis[layer].shape[0]), int(self.k_basis[layer].shape[1])

    def explained_variance(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fraction of the variance (around the mean) the first ``rank`` axes keep.

        Returns:
            ``(k_frac, v_frac)``, float32 ``[layers, Hkv]``: ``sum(eig[:r]) / sum(eig)``
            (1 for a head with zero variance).
        """

        def frac(eigs: list[torch.Tensor]) -> torch.Tensor:
            rows = []
            for e in eigs:
                total = e.sum(-1)
                kept = e[:, :rank].sum(-1)
                rows.append(
                    torch.where(total > 0, kept / total.clamp_min(1e-30), torch.ones_like(total))
                )
            return torch.stack(rows).float()

        return frac(self.k_eigenvalues), frac(self.v_eigenvalues)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of lists of tensors (what :meth:`save` writes)."""
        return {
            "format": "sentinel_kernels.LowRankBases",
            "version": _FORMAT_VERSION,
            "k_basis": list(self.k_basis),
            "v_basis": list(self.v_basis),
            "k_mean": list(self.k_mean),
            "v_mean": list(self.v_mean),
            "k_eigenvalues": list(self.k_eigenvalues),
            "v_eigenvalues": list(self.v_eigenvalues),
            "n_tokens": int(self.n_tokens),
            "meta": dict(self.meta),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the bases with ``torch.save`` (a dict of tensor lists, see :meth:`to_dict`)."""
        torch.save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowRankBases:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != "sentinel_kernels.LowRankBases":
            raise ValueError("not a sentinel_kernels LowRankBases dict (missing 'format')")
        if int(data.get("version", 0)) > _FORMAT_VERSION:
            raise ValueError(
                f"LowRankBases format version {data['version']} is newer than "
                f"this sentinel_kernels ({_FORMAT_VERSION})"
            )
        return cls(
            k_basis=[t.float() for t in data["k_basis"]],
            v_basis=[t.float() for t in data["v_basis"]],
            k_mean=[t.float() for t in data["k_mean"]],
            v_mean=[t.float() for t in data["v_mean"]],
            k_eigenvalues=[t.float() for t in data["k_eigenvalues"]],
            v_eigenvalues=[t.float() for t in data["v_eigenvalues"]],
            n_tokens=int(data.get("n_tokens", 0)),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LowRankBases:
        """Read bases written by :meth:`save` (tensors only: ``weights_only=True``)."""
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))

    def attach(self, model: nn.Module) -> None:
        """Store these bases on ``model`` (attribute :data:`LOWRANK_ATTR`)."""
        setattr(model, LOWRANK_ATTR, self)


def get_lowrank_bases(model: nn.Module) -> LowRankBases | None:
    """The :class:`LowRankBases` attached to ``model``, or ``None``."""
    bases = getattr(model, LOWRANK_ATTR, None)
    return bases if isinstance(bases, LowRankBases) else None


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return list(ids)


def _samples(
    tokenizer: Any, texts: str | Sequence[str], n_samples: int, max_length: int
) -> list[list[int]]:
    """Token id lists: one text cut into consecutive windows, or one per text (truncated)."""
    if isinstance(texts, str):
        ids = _encode(tokenizer, texts)
        out = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    else:
        out = [_encode(tokenizer, t)[:max_length] for t in texts if t and t.strip()]
    out = [s for s in out if len(s) >= 1][:n_samples]
    if not out:
        raise ValueError("calibrate_lowrank: the calibration text holds no tokens")
    return out


def _layer_kv(cache: DynamicCache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values ``[B, Hkv, S, D]`` of layer ``i`` of a transformers ``DynamicCache``."""
    # transformers types ``layers`` as a union of layer classes; a DynamicCache of a
    # softmax-attention model holds DynamicLayer, which has keys/values.
    layer: Any = cache.layers[i]
    return layer.keys, layer.values


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def calibrate_lowrank(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str],
    n_samples: int = CALIBRATION_SAMPLES,
    max_length: int = CALIBRATION_MAX_LENGTH,
    progress: bool = True,
    *,
    attach: bool = True,
) -> LowRankBases:
    """PCA bases of the post-RoPE keys and values of every layer and KV head.

    Runs ``model`` (eval mode, ``torch.inference_mode``) on up to ``n_samples`` sequences of
    at most ``max_length`` tokens, each with a fresh transformers ``DynamicCache``, and reads
    what the cache stored (keys after the rotary embedding, values). Per layer and KV head
    it accumulates, in float64, ``n``, ``sum x`` and ``sum x x^T`` over all tokens, then
    ``mu = sum x / n``, ``C = sum x x^T / n - mu mu^T`` and the eigendecomposition of ``C``
    (``torch.linalg.eigh``), sorted descending.

    Args:
        model: a transformers causal LM whose forward fills a ``DynamicCache``.
        tokenizer: its tokenizer (called as ``tokenizer(text)``).
        texts: one text (tokenised once and cut into consecutive windows of
            ``max_length`` tokens) or a sequence of texts (each truncated to ``max_length``).
            Use calibration data, never the evaluation split.
        n_samples: sequences used at most.
        max_length: tokens per sequence.
        progress: show a tqdm bar.
        attach: store the result on ``model`` (:data:`LOWRANK_ATTR`), where
            ``sk.kv_cache(model, "lowrank:r")`` finds it.

    Returns:
        The :class:`LowRankBases` (float32, CPU).
    """

    if n_samples < 1 or max_length < 1:
        raise ValueError(f"n_samples and max_length must be >= 1, got {n_samples}, {max_length}")
    samples = _samples(tokenizer, texts, n_samples, max_length)
    dev = _model_device(model)
    stats: list[list[torch.Tensor]] | None = None  # per layer: [n, sk, skk, sv, svv]
    n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for ids in tqdm(samples, desc="low-rank KV calibration", disable=not progress):
                x = torch.tensor([ids], dtype=torch.long, device=dev)
                cache = DynamicCache()
                model(input_ids=x, use_cache=True, **cache_kwargs(model, cache))
                n_layers = len(cache.layers)
                if stats is None:
                    stats = [[] for _ in range(n_layers)]
                for i in range(n_layers):
                    k, v = _layer_kv(cache, i)
                    k64 = k[0].double()  # [Hkv, S, D]
                    v64 = v[0].double()
                    add = [
                        k64.sum(1),
                        k64.transpose(1, 2) @ k64,
                        v64.sum(1),
                        v64.transpose(1, 2) @ v64,
                    ]
                    if stats[i]:
                        for acc, a in zip(stats[i], add, strict=True):
                            acc += a
                    else:
                        stats[i] = add
                n_tokens += len(ids)
    finally:
        model.train(was_training)
    assert stats is not None

    def pca(s: torch.Tensor, ss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu = s / n_tokens
        cov = ss / n_tokens - mu[:, :, None] * mu[:, None, :]
        cov = 0.5 * (cov + cov.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals = evals.flip(-1).clamp_min(0.0)
        evecs = evecs.flip(-1)
        return evecs.float().cpu(), mu.float().cpu(), evals.float().cpu()

    kb, vb, km, vm, ke, ve = [], [], [], [], [], []
    for sk_, skk, sv, svv in stats:
        b, m, e = pca(sk_, skk)
        kb.append(b)
        km.append(m)
        ke.append(e)
        b, m, e = pca(sv, svv)
        vb.append(b)
        vm.append(m)
        ve.append(e)
    bases = LowRankBases(
        kb,
        vb,
        km,
        vm,
        ke,
        ve,
        n_tokens=n_tokens,
        meta={"model": type(model).__name__, "n_samples": len(samples), "max_length": max_length},
    )
    if attach:
        bases.attach(model)
    return bases

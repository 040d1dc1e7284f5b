"""The kNN-LM datastore: ``(hidden state -> next token)`` pairs of a text collection and
the index that searches them.

Which hidden state is the key: the input of the LM head, i.e. the decoder's output after
its final norm (``model.norm`` of Llama-like models, ``ln_f`` of GPT-2). Khandelwal et
al. (2020) keyed on the input of the last transformer layer's feed-forward block (after
its layer norm), which they found best for their 16-layer Transformer; we take the LM
head's input because (a) it is what the LM head scores, so two contexts that the model
already treats alike are near each other in it, (b) it exists under one name in every
transformers causal LM (``get_output_embeddings()``'s input), so one forward pre-hook
catches it on any architecture, patched or not, and inside a CUDA-graph decode step, and
(c) it needs no second forward or extra output. Keys are stored in float16 (half the
memory of float32; the search computes in float32), optionally reduced to ``pca_dim``
dimensions by PCA first (He et al. 2021, "Efficient Nearest Neighbor Language Models").
The value of a key is the token that followed it in the text.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from . import index as faiss_index
from .cache import CacheInfo, KnnCache
from .ivf import DeviceIVF
from .lm import lm_head, lm_head_shape, lm_head_weight
from .search import KNN_SEARCH_RANGE, exact_search, mixed_matmul_supported, squared_norms

__all__ = ["BACKENDS", "Datastore", "DatastoreMismatchError", "model_identity"]

FORMAT = "sentinel-knn-datastore"
VERSION = 1
#: Where a search runs: ``"faiss"`` (the FAISS index, CPU), ``"torch"`` (exact search
#: on the keys' device, :func:`~sentinel_kernels.knn.search.exact_search`) or ``"ivf"``
#: (an IVF-Flat index on the keys' device, :class:`~sentinel_kernels.knn.ivf.DeviceIVF`).
BACKENDS = ("faiss", "torch", "ivf")
_SAMPLE_ROWS = 16
_SAMPLE_COLS = 4
_SAMPLE_NORM = 16
#: The scheme of :func:`model_identity` (its ``"scheme"`` field); identities without the
#: field were written by the first scheme (LM head + middle parameter samples).
IDENTITY_SCHEME = 2
#: Allowed difference of a sampled embedding value, in units of its row's absmax: one int8
#: step (absmax / 127), twice the rounding error of the per-row int8 table a tied LM head
#: is quantized into by ``patch_model(level >= 2)``.
_QUANT_TOL = 1.0 / 127
_RTOL = 1e-2
_ATOL = 1e-6


class DatastoreMismatchError(ValueError):
    """The datastore was built with another model than the one it is used with."""


class _Stop(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the build's LM-head hook: the keys are caught, the logits not needed."""


def _spread(size: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` evenly spread indices of ``range(size)`` (int64 on ``device``)."""
    return torch.linspace(0, size - 1, n).long().to(device)


def _embedding_rows(model: nn.Module, n: int) -> torch.Tensor | None:
    """``n`` evenly spread rows of the input embedding table as the model uses them,
    float32 ``[n, D]``: an ``nn.Embedding``'s weight, or the dequantized rows
    ``q * scale[:, None]`` of an embedding that keeps int8 rows and per-row scales
    (``weight_int8`` / ``weight_scale``, the ``Int8Embedding`` of a tied head patched at
    level >= 2; only these rows are dequantized); ``None`` if neither."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
        return weight.detach()[_spread(weight.shape[0], n, weight.device)].float()
    q = getattr(emb, "weight_int8", None)
    scale = getattr(emb, "weight_scale", None)
    if (
        isinstance(q, torch.Tensor)
        and isinstance(scale, torch.Tensor)
        and q.dim() == 2
        and scale.shape == q.shape[:1]
    ):
        r = _spread(q.shape[0], n, q.device)
        return q[r].float() * scale[r].float()[:, None]
    return None


def _final_norm_weight(model: nn.Module) -> torch.Tensor | None:
    """The 1-D weight of the model's last norm module (by class name: ``*Norm``; the final
    norm before the LM head in Llama-like models and GPT-2), ``None`` without one."""
    found = None
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if (
            type(mod).__name__.lower().endswith("norm")
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 1
            and weight.is_floating_point()
        ):
            found = weight
    return found


def _grid(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``w`` ``[R, C]`` at ``rows x cols`` evenly spread fixed positions, float32 on the host
    (``[rows, cols]``)."""
    return (
        w.detach()[_spread(w.shape[0], rows, w.device)][:, _spread(w.shape[1], cols, w.device)]
        .float()
        .cpu()
    )


def _sample_weights(model: nn.Module) -> tuple[list[float], list[float]]:
    """``(sample, scale)`` of the current identity scheme (see :func:`model_identity`).

    ``sample``: 16 x 4 values of the input embedding table at fixed positions, the absmax
    of those 16 rows, then 16 values of the final norm's weight (if there is one). ``scale``:
    for each embedding value its row's absmax, 0 for the others (the tolerance unit of the
    int8 rounding, :func:`_identity_mismatch`).

    Raises:
        ValueError: the model has no readable embedding table and no LM head weight.
    """
    with torch.no_grad():
        table = _embedding_rows(model, _SAMPLE_ROWS)
        if table is None:  # no table in a known form: the head's (dequantized) weight
            head = lm_head_weight(model)
            table = head.detach()[_spread(head.shape[0], _SAMPLE_ROWS, head.device)].float()
        table = table.cpu()
        absmax = table.abs().amax(dim=1)
        values = _grid(table, _SAMPLE_ROWS, _SAMPLE_COLS)
        sample = values.flatten().tolist() + absmax.tolist()
        scale = absmax[:, None].expand_as(values).flatten().tolist() + [0.0] * len(absmax)
        norm = _final_norm_weight(model)
        if norm is not None:
            picked = _grid(norm[None], 1, min(_SAMPLE_NORM, norm.shape[0])).flatten().tolist()
            sample += picked
            scale += [0.0] * len(picked)
    return sample, scale


def _legacy_sample_weights(model: nn.Module) -> list[float]:
    """The first scheme's sample: 16 x 4 values of the LM head's weight and of the middle
    parameter tensor (``model.parameters()`` with ``dim >= 1``) at fixed positions.

    Raises:
        ValueError: the LM head has no float weight (a quantized head: not computable).
    """
    weight = getattr(lm_head(model), "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError("the LM head has no float weight")
    tensors = [weight]
    params = [p for p in model.parameters() if p.dim() >= 1]
    tensors.append(params[len(params) // 2])
    out: list[float] = []
    with torch.no_grad():
        for w in tensors:
            w2 = w.detach().reshape(w.shape[0], -1)
            out += _grid(w2, _SAMPLE_ROWS, _SAMPLE_COLS).flatten().tolist()
    return out


def _fingerprint(sample: list[float]) -> str:
    rounded = ",".join(f"{v:.3g}" for v in sample)
    return hashlib.sha256(rounded.encode()).hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What identifies the model a datastore belongs to.

    Fields: ``scheme`` (:data:`IDENTITY_SCHEME`), ``model_class``, ``config_class``,
    ``hidden_size`` / ``vocab_size`` (the LM head's input / output size,
    :func:`~sentinel_kernels.knn.lm.lm_head_shape`), ``weight_sample`` and ``sample_scale``
    (:func:`_sample_weights`) and ``fingerprint`` (SHA-256 of the sample rounded to 3
    significant digits, for display).

    The sample is taken from tensors that ``patch_model`` leaves in place at every level:
    the input embedding table (16 x 4 values at fixed positions and the absmax of those 16
    rows) and the final norm's weight (16 values). The LM head and the other linears are
    not sampled: levels 2-3 turn them into ``Int8Linear`` (int8 buffers, no ``weight``),
    and level 1 concatenates projections, which moves the parameters around. A tied
    embedding quantized with its head (level >= 2) is read dequantized; symmetric absmax
    int8 keeps each row's absmax and moves a value by at most half a step, so a datastore
    built with the float model is accepted by the same model patched at levels 1-3 (and in
    float32, bfloat16 or float16), while another model's embeddings differ far beyond it
    (:meth:`Datastore.check_model`).

    Raises:
        ValueError: the model has no LM head with readable sizes.
    """
    vocab, hidden = lm_head_shape(model)
    sample, scale = _sample_weights(model)
    config = getattr(model, "config", None)
    return {
        "scheme": IDENTITY_SCHEME,
        "model_class": type(model).__name__,
        "config_class": type(config).__name__,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "weight_sample": sample,
        "sample_scale": scale,
        "fingerprint": _fingerprint(sample),
    }


def _identity_mismatch(stored: dict[str, Any], model: nn.Module) -> str | None:
    """Why ``model`` is not the model of the ``stored`` identity (``None``: it is).

    Sizes and config class must be equal. Current scheme: each sampled value ``b`` of the
    model must satisfy ``|a - b| <= 1e-2 |a| + 1e-6 + scale / 127`` against the stored
    value ``a`` (``scale``: its embedding row's absmax; 0 for the row absmaxes and the norm
    values). An identity of the first scheme (no ``scheme`` field) is compared the old way
    (head and middle parameter samples, ``rtol=1e-2``) when the model still has a float LM
    head; with a quantized head that is not computable, and the answer says to rebuild.
    """
    other = model_identity(model)
    for field in ("config_class", "hidden_size", "vocab_size"):
        if stored.get(field) != other[field]:
            return (
                f"this datastore was built with another model: its {field} is "
                f"{stored.get(field)!r}, the model's {other[field]!r}"
            )
    a = np.asarray(stored["weight_sample"], dtype=np.float64)
    if stored.get("scheme") == IDENTITY_SCHEME:
        b = np.asarray(other["weight_sample"], dtype=np.float64)
        scale = np.asarray(stored.get("sample_scale", [0.0] * len(a)), dtype=np.float64)
        fingerprint = other["fingerprint"]
        same = a.shape == b.shape == scale.shape and bool(
            np.all(np.abs(a - b) <= _RTOL * np.abs(a) + _ATOL + _QUANT_TOL * scale)
        )
        old = ""
    elif "scheme" in stored:
        return (
            f"this datastore's model identity has scheme {stored['scheme']!r}, this version "
            f"reads {IDENTITY_SCHEME} and the first one: rebuild the datastore with this model"
        )
    else:
        try:
            legacy = _legacy_sample_weights(model)
        except ValueError:
            return (
                "this datastore was saved with the first model-identity scheme (samples of "
                "the LM head's weight), which a model whose LM head is quantized (patched "
                "at level 2 or 3) cannot be compared with: rebuild the datastore (with the "
                "float or the patched model)"
            )
        b = np.asarray(legacy, dtype=np.float64)
        fingerprint = _fingerprint(legacy)
        same = a.shape == b.shape and bool(np.allclose(a, b, rtol=_RTOL, atol=_ATOL))
        old = (
            "; it was saved with the first model-identity scheme, which patching can upset: "
            "if this is the right model, rebuild the datastore"
        )
    if not same:
        return (
            "this datastore was built with another model (same architecture, different "
            f"weights: fingerprint {stored.get('fingerprint')} vs {fingerprint}){old}"
        )
    return None


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class Datastore:
    """A kNN-LM datastore; build it with :meth:`build`, reopen it with :meth:`load`.

    Attributes:
        keys: float16 ``[N, d]`` on :attr:`device` (``d`` = the model's hidden size, or
            ``pca_dim``).
        values: int64 ``[N]``, the next token of each key.
        successor: bool ``[N]``, whether entry ``i + 1`` is the token after entry ``i``
            in the same text (for pointer-following shortcuts).
        index_kind: ``"flat"``, ``"ivfpq"`` or ``"hnsw"``.
        options: the index options (:func:`~sentinel_kernels.knn.index.index_options`).
        identity: :func:`model_identity` of the model it was built with.
        settings: the build settings (window, texts, tokens, PCA, time).
        backend: ``"faiss"`` or ``"torch"`` (see :data:`BACKENDS`).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        successor: torch.Tensor,
        index_kind: str,
        options: dict[str, Any],
        identity: dict[str, Any],
        settings: dict[str, Any],
        *,
        pca_mean: torch.Tensor | None = None,
        pca_proj: torch.Tensor | None = None,
        index: Any = None,
        index_bytes: np.ndarray | None = None,
        cache_size: int = 4096,
    ) -> None:
        if keys.dim() != 2 or values.shape != (keys.shape[0],):
            raise ValueError(
                f"keys [N, d] and values [N] expected; got {tuple(keys.shape)}, "
                f"{tuple(values.shape)}"
            )
        self.keys = keys.to(torch.float16)
        self.values = values.long()
        self.successor = successor.bool()
        self.index_kind = index_kind
        self.options = dict(options)
        self.identity = identity
        self.settings = settings
        self.pca_mean = pca_mean
        self.pca_proj = pca_proj
        self._index = index
        self._index_bytes = index_bytes
        self._key_sqnorms: torch.Tensor | None = None
        self._ivf: DeviceIVF | None = None
        self.cache = KnnCache(cache_size)
        self.device = torch.device("cpu")
        self.backend = "faiss"
        self.keys = self.keys.cpu()

    # ----------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Any,
        texts: str | Sequence[str],
        index: str = "flat",
        progress: bool = True,
        *,
        window: int = 1024,
        batch_size: int = 4,
        pca_dim: int | None = None,
        cache_size: int = 4096,
        seed: int = 0,
        **index_options: Any,
    ) -> Datastore:
        """Run ``model`` over ``texts`` and store every ``(LM-head input, next token)``.

        Each text is tokenised on its own (the tokenizer's default special tokens) and cut
        into windows of ``window`` tokens that overlap by one token, so that every position
        but a text's last gets exactly one entry, with the context of its window before it
        (no KV cache; ``batch_size`` windows per forward, under ``torch.inference_mode``,
        on the model's device). The LM head itself is skipped (the hook that catches its
        input ends the forward). With ``pca_dim``, keys are centred and projected on the
        top ``pca_dim`` principal components of all keys (the queries are too, at search).
        The index (``"flat"``, ``"ivfpq"``, ``"hnsw"``; options in
        :func:`~sentinel_kernels.knn.index.index_options`) is built from the float16 keys.

        Args:
            model: a transformers causal LM.
            tokenizer: its tokenizer.
            texts: one text or several (never the evaluation text).
            index: index kind.
            progress: a tqdm bar over windows.
            window: tokens per forward (>= 2).
            batch_size: windows per forward (>= 1).
            pca_dim: reduce keys to this many dimensions (``1 <= pca_dim <= hidden``).
            cache_size: entries of the search-result cache (0: none).
            seed: IVF-PQ training sample.
            index_options: the index's options (``nlist``, ``m``, ``nbits``, ``nprobe``,
                ``train_size`` for IVF-PQ; ``M``, ``ef_construction``, ``ef_search`` for
                HNSW).

        Returns:
            The datastore on the CPU with the FAISS backend (move it with :meth:`to`).

        Raises:
            ValueError: unknown index or option, bad ``window``/``batch_size``/``pca_dim``,
                no text with 2 tokens, non-finite keys (float16 overflow).
            TypeError: ``texts`` not a str or sequence of str.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a sequence of str")
        if index not in faiss_index.INDEX_KINDS:
            raise ValueError(
                f"unknown index {index!r}; choose one of {', '.join(faiss_index.INDEX_KINDS)}"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2; got {window!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        identity = model_identity(model)
        hidden = identity["hidden_size"]
        if pca_dim is not None and (
            isinstance(pca_dim, bool) or not isinstance(pca_dim, int) or not 1 <= pca_dim <= hidden
        ):
            raise ValueError(f"pca_dim must be an int in [1, {hidden}] or None; got {pca_dim!r}")
        start_time = time.perf_counter()
        device = _model_device(model)

        # Windows: (text number, first position, tokens); full windows batched together.
        streams = [_token_ids(tokenizer, t) for t in texts]
        windows: list[tuple[int, int, list[int]]] = []
        for t, ids in enumerate(streams):
            for s in range(0, max(len(ids) - 1, 0), window - 1):
                piece = ids[s : s + window]
                if len(piece) >= 2:
                    windows.append((t, s, piece))
        if not windows:
            raise ValueError("no text has 2 tokens: nothing to store")
        batches: list[list[tuple[int, int, list[int]]]] = []
        for w in windows:
            last = batches[-1] if batches else None
            if (
                last is not None
                and len(last) < batch_size
                and len(last[0][2]) == len(w[2])
                and last[-1][0] == w[0]
            ):
                last.append(w)
            else:
                batches.append([w])

        key_parts: list[torch.Tensor] = []
        value_parts: list[torch.Tensor] = []
        succ_parts: list[torch.Tensor] = []
        was_training = model.training
        model.eval()
        head = lm_head(model)
        caught: list[torch.Tensor] = []

        def stop(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            caught.append(args[0].detach())
            raise _Stop

        handle = head.register_forward_pre_hook(stop)
        bar = tqdm(total=len(windows), desc="knn datastore", unit="window", disable=not progress)
        try:
            with torch.inference_mode():
                for group in batches:
                    x = torch.tensor([w[2] for w in group], dtype=torch.long, device=device)
                    caught.clear()
                    try:
                        model(input_ids=x, use_cache=False)
                    except _Stop:
                        pass
                    if len(caught) != 1:
                        raise RuntimeError("the LM head's input was not caught during the build")
                    h = caught[0][:, :-1].reshape(-1, caught[0].shape[-1])
                    key_parts.append(h.to(torch.float16).cpu())
                    value_parts.append(x[:, 1:].reshape(-1).cpu())
                    for t, s, piece in group:
                        succ = torch.ones(len(piece) - 1, dtype=torch.bool)
                        if s + len(piece) >= len(streams[t]):  # the text's last entry
                            succ[-1] = False
                        succ_parts.append(succ)
                    bar.update(len(group))
        finally:
            handle.remove()
            bar.close()
            model.train(was_training)
        keys = torch.cat(key_parts)
        if not bool(torch.isfinite(keys).all()):
            raise ValueError("some hidden states overflow float16: cannot store them")
        values = torch.cat(value_parts)
        successor = torch.cat(succ_parts)

        pca_mean = pca_proj = None
        if pca_dim is not None:
            x32 = keys.float()
            pca_mean = x32.mean(0)
            centred = x32 - pca_mean
            cov = centred.t().double() @ centred.double() / max(len(centred) - 1, 1)
            _, vecs = torch.linalg.eigh(cov)
            pca_proj = vecs[:, -pca_dim:].flip(-1).float().contiguous()  # largest first
            keys = (centred @ pca_proj).to(torch.float16)

        opts = faiss_index.index_options(index, keys.shape[0], keys.shape[1], index_options)
        built = faiss_index.build_index(
            index, np.ascontiguousarray(keys.float().numpy()), opts, seed=seed
        )
        settings = {
            "window": window,
            "batch_size": batch_size,
            "pca_dim": pca_dim,
            "texts": len(texts),
            "tokens": sum(len(s) for s in streams),
            "entries": int(keys.shape[0]),
            "build_device": str(device),
            "build_seconds": time.perf_counter() - start_time,
            "seed": seed,
        }
        return cls(
            keys,
            values,
            successor,
            index,
            opts,
            identity,
            settings,
            pca_mean=pca_mean,
            pca_proj=pca_proj,
            index=built,
            cache_size=cache_size,
        )

    def reindex(self, index: str, seed: int = 0, **index_options: Any) -> Datastore:
        """A new datastore with the same keys, values and model under another FAISS index
        (no forward pass; e.g. an approximate index next to the exact one). On the CPU
        with the FAISS backend; its own (empty) result cache.

        Raises:
            ValueError: unknown index or option (as :meth:`build`).
        """
        keys = self.keys.cpu()
        opts = faiss_index.index_options(index, keys.shape[0], keys.shape[1], index_options)
        built = faiss_index.build_index(
            index, np.ascontiguousarray(keys.float().numpy()), opts, seed=seed
        )
        return Datastore(
            keys,
            self.values.cpu(),
            self.successor.cpu(),
            index,
            opts,
            self.identity,
            {**self.settings, "seed": seed},
            pca_mean=None if self.pca_mean is None else self.pca_mean.cpu(),
            pca_proj=None if self.pca_proj is None else self.pca_proj.cpu(),
            index=built,
            cache_size=self.cache.maxsize,
        )

    # ----------------------------------------------------------------------------------
    # Saving
    # ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the datastore to one file (``torch.save``): keys, values, the FAISS index
        (serialized; an exact index is rebuilt from the keys at load instead), PCA, the
        model identity, the build settings and the index options."""
        path = Path(path)
        data = None if self.index_kind == "flat" else self._faiss_bytes()
        torch.save(
            {
                "format": FORMAT,
                "version": VERSION,
                "keys": self.keys.cpu(),
                "values": self.values.cpu(),
                "successor": self.successor.cpu(),
                "index_kind": self.index_kind,
                "options": self.options,
                "index_bytes": None if data is None else torch.from_numpy(data),
                "pca_mean": None if self.pca_mean is None else self.pca_mean.cpu(),
                "pca_proj": None if self.pca_proj is None else self.pca_proj.cpu(),
                "identity": self.identity,
                "settings": self.settings,
                "cache_size": self.cache.maxsize,
            },
            path,
        )
        return path

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device | str = "cpu", backend: str | None = None
    ) -> Datastore:
        """Read a datastore written by :meth:`save` and place it with :meth:`to`.

        Raises:
            ValueError: the file is not a datastore (or of an unknown version).
        """
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sentinel-kernels k-NN datastore")
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: datastore version {data.get('version')}, expected {VERSION}")
        raw = data["index_bytes"]
        store = cls(
            data["keys"],
            data["values"],
            data["successor"],
            data["index_kind"],
            data["options"],
            data["identity"],
            data["settings"],
            pca_mean=data["pca_mean"],
            pca_proj=data["pca_proj"],
            index_bytes=None if raw is None else raw.numpy(),
            cache_size=int(data["cache_size"]),
        )
        return store.to(device, backend)

    # ----------------------------------------------------------------------------------
    # Placement and the index
    # ----------------------------------------------------------------------------------

    def to(
        self,
        device: torch.device | str,
        backend: str | None = None,
        progress: bool = False,
        **ivf_options: Any,
    ) -> Datastore:
        """Put the search on ``device`` (in place; returns ``self``).

        ``backend`` ``"faiss"`` searches the FAISS index (CPU only: the installed
        ``faiss-cpu`` has no GPU indexes); ``"torch"`` runs the exact search of
        :mod:`~sentinel_kernels.knn.search` on the float16 keys moved to ``device`` (what a
        CUDA decode step needs: no host round trip, capturable in a CUDA graph; the search
        is exact whatever ``index_kind``); ``"ivf"`` builds an IVF-Flat index on
        ``device`` from the keys (:class:`~sentinel_kernels.knn.ivf.DeviceIVF`, options
        ``ivf_options``: ``nlist``, ``nprobe``, ``cap_factor``, ``train_size``, ``iters``,
        ``seed``; k-means on the device) and searches only the probed
        lists, also capturable (``progress``: a bar over its k-means). Default:
        ``"faiss"`` on the CPU, ``"torch"`` elsewhere. Clears the result cache.

        Raises:
            ValueError: unknown backend, ``"faiss"`` on a non-CPU device, IVF options
                with another backend or out of range.
        """
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            # canonical form: a model's parameters report cuda:N, and devices compare
            # unequal when one of them has no index
            dev = torch.device("cuda", torch.cuda.current_device())
        if backend is None:
            backend = "faiss" if dev.type == "cpu" else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "faiss" and dev.type != "cpu":
            raise ValueError(
                "the installed faiss has no GPU support: a datastore on "
                f"{dev} searches with backend='torch' (exact search on the device) or "
                "backend='ivf'"
            )
        if ivf_options and backend != "ivf":
            raise ValueError(
                f"options {sorted(ivf_options)} are for backend='ivf', not {backend!r}"
            )
        self.keys = self.keys.to(dev)
        self.values = self.values.to(dev)
        self.successor = self.successor.to(dev)
        if self.pca_mean is not None and self.pca_proj is not None:
            self.pca_mean = self.pca_mean.to(dev)
            self.pca_proj = self.pca_proj.to(dev)
        self._key_sqnorms = squared_norms(self.keys) if backend == "torch" else None
        if backend == "torch":
            mixed_matmul_supported(self.keys)  # probed here, never inside a graph capture
        self._ivf = (
            DeviceIVF.build(self.keys, progress=progress, **ivf_options)
            if backend == "ivf"
            else None
        )
        self.device, self.backend = dev, backend
        self.cache.clear()
        return self

    def _faiss(self) -> Any:
        if self._index is None:
            if self._index_bytes is not None:
                self._index = faiss_index.deserialize(
                    self._index_bytes, self.index_kind, self.options
                )
            else:  # an exact index: rebuilt from the stored keys
                self._index = faiss_index.build_index(
                    self.index_kind,
                    np.ascontiguousarray(self.keys.float().cpu().numpy()),
                    self.options,
                )
        return self._index

    def _faiss_bytes(self) -> np.ndarray:
        if self._index_bytes is None:
            self._index_bytes = faiss_index.serialize(self._faiss())
        return self._index_bytes

    def set_search_params(self, **params: Any) -> None:
        """Change search-time options (``nprobe`` and ``rerank`` of IVF-PQ, ``ef_search``
        of HNSW; ``nprobe`` of the device IVF with ``backend="ivf"``); clears the result
        cache (results depend on them).

        Raises:
            ValueError: an option the index kind does not have, or a bad value.
        """
        if self._ivf is not None:
            if set(params) - {"nprobe"}:
                raise ValueError(
                    f"{sorted(set(params) - {'nprobe'})} are not search options of the "
                    "device IVF (it has: nprobe)"
                )
            if "nprobe" in params:
                self._ivf.set_nprobe(params["nprobe"])
            self.cache.clear()
            return
        allowed = faiss_index.SEARCH_PARAMS[self.index_kind]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"{unknown} are not search options of a {self.index_kind!r} index "
                f"(it has: {', '.join(allowed) or 'none'})"
            )
        opts = {**self.options, **params}
        faiss_index.set_search_params(self._faiss(), self.index_kind, opts)
        self.options = opts
        self._index_bytes = None
        self.cache.clear()

    # ----------------------------------------------------------------------------------
    # Facts
    # ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def query_dim(self) -> int:
        """Dimension of a query: the model's hidden size (before PCA)."""
        return int(self.identity["hidden_size"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``keys`` (float16), ``values``, ``index`` (the serialized FAISS
        index: an exact one holds a float32 copy of the keys; 0 for an exact index that a
        ``"torch"`` or ``"ivf"`` search never built), ``device_ivf`` (with ``"ivf"``)."""
        has_index = (
            self.backend == "faiss" or self._index is not None or self._index_bytes is not None
        )
        out = {
            "keys": self.keys.numel() * self.keys.element_size(),
            "values": self.values.numel() * self.values.element_size(),
            "index": int(self._faiss_bytes().nbytes) if has_index else 0,
        }
        if self._ivf is not None:
            out["device_ivf"] = self._ivf.memory_bytes()
        return out

    def search_key(self) -> tuple[Any, ...]:
        """What a search captured in a CUDA graph depends on: the buffers it reads (their
        addresses) and the search settings."""
        ivf = self._ivf
        return (
            id(self),
            self.keys.data_ptr(),
            self.backend,
            None if ivf is None else (id(ivf), ivf.keys.data_ptr(), ivf.nprobe),
        )

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`DatastoreMismatchError` unless ``model`` is the model the
        datastore was built with: same config class and sizes, and the sampled embedding
        and norm weights within the tolerance of :func:`model_identity` (so the float model
        and the same model patched at any level, or cast to another float dtype, match).
        A datastore saved with the first identity scheme is compared the old way (LM head
        and middle parameter samples) while the model's LM head is a float one; with a
        quantized head the error says to rebuild it. One small host copy of weights.
        """
        why = _identity_mismatch(self.identity, model)
        if why is not None:
            raise DatastoreMismatchError(why)

    # ----------------------------------------------------------------------------------
    # Searching
    # ----------------------------------------------------------------------------------

    def search(
        self, queries: torch.Tensor, k: int, use_cache: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest keys of each query: ``(distances, token_ids)``.

        Args:
            queries: float ``[B, D]`` or ``[D]`` LM-head inputs (``D`` the model's hidden
                size; PCA is applied here), any device.
            k: ``1 <= k <= len(self)``.
            use_cache: look each query up in the LRU result cache first
                (:meth:`cache_info`).

        Returns:
            float32 ``[B, k]`` squared L2 distances (ascending; ``inf`` where the index
            found fewer than ``k``) and int64 ``[B, k]`` the neighbours' next tokens
            (``-1`` there), on the queries' device.

        Raises:
            TypeError: queries not a float tensor.
            ValueError: wrong dimension or ``k`` out of range.
        """
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a tensor, got {type(queries).__name__}")
        if not queries.is_floating_point():
            raise TypeError(f"queries must be a float tensor, got {queries.dtype}")
        if queries.dim() == 1:
            queries = queries[None]
        if queries.dim() != 2 or queries.shape[1] != self.query_dim:
            raise ValueError(
                f"queries must be [B, {self.query_dim}] (the model's hidden size); got "
                f"{tuple(queries.shape)}"
            )
        self._check_k(k)
        dist, tokens, _ = self.neighbours(queries.to(self.device), k, use_cache=use_cache)
        return dist.to(queries.device), tokens.to(queries.device)

    def _check_k(self, k: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(
                f"k must be an int in [1, {len(self)}] (the datastore size); got {k!r}"
            )

    def neighbours(
        self, queries: torch.Tensor, k: int, use_cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`search` without the argument checks, plus the entry indices:
        ``(distances, token_ids, indices)`` (``indices`` ``-1`` where none). With the
        torch backend and ``use_cache=False`` it reads nothing back to the host (a CUDA
        graph can hold it); ``queries`` must then be on :attr:`device`."""
        if not use_cache or self.cache.maxsize == 0:
            return self._raw(queries, k)
        cache_keys = KnnCache.keys_of(queries, k)
        found = [self.cache.get(key) for key in cache_keys]
        miss = [i for i, f in enumerate(found) if f is None]
        if miss:
            d, _, idx = self._raw(queries[torch.tensor(miss, device=queries.device)], k)
            for j, i in enumerate(miss):
                hit = (d[j].clone(), idx[j].clone())
                self.cache.put(cache_keys[i], hit)
                found[i] = hit
        dist = torch.stack([f[0] for f in found if f is not None])
        idx = torch.stack([f[1] for f in found if f is not None])
        return dist, self._tokens(idx), idx

    def _tokens(self, idx: torch.Tensor) -> torch.Tensor:
        values = self.values if self.values.device == idx.device else self.values.to(idx.device)
        return torch.where(idx >= 0, values[idx.clamp_min(0)], torch.full_like(idx, -1))

    def _project(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.float()
        if self.pca_mean is not None and self.pca_proj is not None:
            q = (q - self.pca_mean.to(q.device)) @ self.pca_proj.to(q.device)
        return q

    def _raw(
        self, queries: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self._project(queries)
        if self.backend == "torch":
            if q.device != self.keys.device:
                raise ValueError(
                    f"queries are on {q.device}, the datastore on {self.keys.device} "
                    "(move it with store.to(device))"
                )
            dist, idx = exact_search(self.keys, q, k, key_sqnorms=self._key_sqnorms)
            return dist, self._tokens(idx), idx
        if self._ivf is not None:
            dist, idx = self._ivf.search(q.to(self._ivf.keys.device), k)
            return dist, self._tokens(idx), idx
        rerank = int(self.options.get("rerank", 1))
        with record_function(KNN_SEARCH_RANGE):
            host = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
            d_np, i_np = self._faiss().search(host, min(k * rerank, len(self)))
            idx = torch.from_numpy(i_np)
            dist = torch.from_numpy(d_np)
            dist = torch.where(idx >= 0, dist, torch.full_like(dist, math.inf))
            if rerank > 1:
                dist, idx = self._rerank(torch.from_numpy(host), idx, k)
        idx = idx.to(queries.device)
        return dist.to(queries.device), self._tokens(idx), idx

    def _rerank(
        self, q: torch.Tensor, cand: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` of the candidates ``cand`` ``[B, C]`` (``-1``: none) nearest to ``q``
        ``[B, d]`` by exact squared L2 to the stored float16 keys (host, row groups of
        bounded memory)."""
        keys = self.keys.cpu()
        rows = max(1, (1 << 24) // max(1, cand.shape[1] * keys.shape[1]))
        out_d, out_i = [], []
        for s in range(0, cand.shape[0], rows):
            c = cand[s : s + rows]
            vec = keys[c.clamp_min(0)].float()  # [b, C, d]
            d = (vec - q[s : s + rows, None]).pow(2).sum(-1)
            d = d.masked_fill(c < 0, math.inf)
            d, pick = d.topk(k, dim=-1, largest=False)
            out_d.append(d)
            out_i.append(torch.where(torch.isfinite(d), c.gather(-1, pick), -1))
        return torch.cat(out_d), torch.cat(out_i)

    def cache_info(self) -> CacheInfo:
        """The result cache's ``CacheInfo(hits, misses, size, maxsize)``."""
        return self.cache.info()

    def clear_cache(self) -> None:
        """Empty the result cache and reset its counters."""
        self.cache.clear()

    def __repr__(self) -> str:
        return (
            f"Datastore({len(self)} entries, dim {self.keys.shape[1]}, index "
            f"{self.index_kind!r}, backend {self.backend!r} on {self.device}, model "
            f"{self.identity['model_class']} {self.identity['fingerprint']})"
        )

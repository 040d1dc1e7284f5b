"""Speculative decoding for :func:`sentinel_kernels.generate` (``draft=...``).

Each step a *drafter* proposes ``k`` tokens per row, the target model scores the last
accepted token plus the ``k`` drafts in one forward (``k + 1`` query tokens over its
cache), and :func:`sentinel_kernels.ops.speculative_verify` accepts a prefix of the drafts
and emits one more token (the correction, or the bonus when all ``k`` were accepted):
greedy (argmax match) or exact rejection sampling (Leviathan et al. 2023; Chen et al.
2023), so the output follows the target's distribution whatever the drafter proposes.

Drafters (``draft=`` takes the name, a model, or the :class:`DraftSpec` that
:func:`parse_draft` makes of either):

* ``"ngram"``: prompt lookup (Saxena 2023): the tokens that followed the most recent
  earlier occurrence of the row's last ``n`` tokens (``n`` = 3, 2, 1), no model. A
  deterministic proposal: its draft distribution is one-hot;
* ``"early_exit:L"``: the target itself cut after decoder layer ``L`` (its final norm and
  LM head on layer ``L``'s output; self-speculative decoding, Zhang et al. 2023 "Draft &
  Verify", Elhoushi et al. 2024 "LayerSkip"). Its cache is the target's own for layers
  ``< L``: entries the target wrote for accepted tokens are exactly what the draft would
  write, so drafting needs no catch-up;
* a transformers model with the target's tokenizer (vocabulary): its own
  :func:`sentinel_kernels.kv_cache`; each step it re-reads the last two tokens (so an
  all-accepted step needs no special case), then drafts one token at a time.

KV rollback: every cache here is a preallocated :class:`SentinelKVCache` whose per-row
lengths (``cache_lens``, on the device) are set back to the accepted length after each
verification; entries past it are overwritten later. Rows accept different numbers of
tokens (ragged lengths are native to the decode kernel). Caches are built without the
recent full-precision ring (a rollback would leave rejected tokens in it).

The host reads one small tensor per step (accepted counts, finished flags, the emitted
tokens for ``ngram``): a step emits up to ``k + 1`` tokens per row, and ``k`` is adapted
to the running acceptance (``k = round(mean accepted) + 1``, within ``[1,
num_draft_tokens]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import ops
from ..cache import kv_cache
from ..hf_compat import cache_kwargs
from .sampling import eos_hit, sample_next
from .session import DecodeRequest, capture_stream, fingerprint

__all__ = ["NGRAM_MAX", "DraftSpec", "make_drafter", "parse_draft", "speculative_generate"]

#: Longest n-gram the prompt-lookup drafter matches.
NGRAM_MAX = 3
_EARLY_EXIT = "early_exit:"


@dataclass(frozen=True)
class DraftSpec:
    """What proposes the drafts: ``kind`` ``"ngram"``, ``"early_exit"`` (the target's first
    ``layers`` decoder layers) or ``"model"`` (the draft ``model``). ``str()`` gives the
    name ``draft=`` takes (``"model"`` for a model)."""

    kind: str
    layers: int = 0
    model: nn.Module | None = None

    def __str__(self) -> str:
        return f"{_EARLY_EXIT}{self.layers}" if self.kind == "early_exit" else self.kind


def parse_draft(draft: Any) -> DraftSpec:
    """``draft=`` of :func:`sentinel_kernels.generate` as a :class:`DraftSpec`:
    ``"ngram"``, ``"early_exit:L"`` (``L >= 1``, checked against the model's depth when the
    drafter is built), a transformers model, or a ``DraftSpec`` (returned as it is).

    Raises:
        ValueError: a string that names no drafter. TypeError: neither a string nor a model.
    """
    if isinstance(draft, DraftSpec):
        return draft
    if isinstance(draft, str):
        if draft == "ngram":
            return DraftSpec("ngram")
        layers = draft.removeprefix(_EARLY_EXIT)
        if (
            draft.startswith(_EARLY_EXIT)
            and layers.isascii()
            and layers.isdigit()
            and layers[0] != "0"
        ):
            return DraftSpec("early_exit", layers=int(layers))
        raise ValueError(f"draft must be 'ngram', 'early_exit:<layer>' or a model; got {draft!r}")
    if not isinstance(draft, nn.Module) or not callable(getattr(draft, "forward", None)):
        raise TypeError("draft must be 'ngram', 'early_exit:L' or a transformers model")
    return DraftSpec("model", model=draft)


def _set_host_lengths(cache: Any) -> None:
    # The host counters only gate the capacity check and the prefill/decode choice; the
    # real per-row lengths live on the device. 1 = "decoding into a non-empty cache".
    for layer in cache.layers:
        layer.seq_length = 1


def _set_lens(cache: Any, lens: torch.Tensor, layers: range | None = None) -> None:
    idx = range(len(cache.layers)) if layers is None else layers
    for i in idx:
        cache.layers[i].cache_lens.copy_(lens)


class _StepGraph:
    """Run ``fn`` (a forward over static input buffers) eagerly the first time (it also
    autotunes), capture it in a CUDA graph the second time, replay it from then on.
    ``enabled=False``: always eager (CPU)."""

    def __init__(self, fn: Any, enabled: bool) -> None:
        self.fn, self.enabled = fn, enabled
        self.calls = 0
        self.graph: Any = None
        self.out: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self.fn()
        graph = torch.cuda.CUDAGraph()
        side = capture_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            out = self.fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph, self.out = graph, out
        graph.replay()
        return out


class _Drafter:
    """Proposes ``k`` tokens per row (and draft logits, or None for one-hot proposals)."""

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, padded: bool
    ) -> None:
        """See the prompt (after the target's prefill)."""

    def propose(
        self,
        seq: torch.Tensor,
        seq_len: torch.Tensor,
        pads: torch.Tensor,
        k: int,
        sampling: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class NgramDrafter(_Drafter):
    """Prompt-lookup drafting on the host copy of the tokens (one-hot proposals)."""

    def __init__(self) -> None:
        self.host: list[list[int]] = []

    def prefill(self, ids, mask, pos, padded) -> None:  # noqa: D102
        rows = ids.tolist()
        if mask is not None:
            keep = mask.tolist()
            rows = [
                [t for t, m in zip(r, km, strict=True) if m]
                for r, km in zip(rows, keep, strict=True)
            ]
        self.host = rows

    def extend(self, row: int, tokens: list[int]) -> None:
        """Append emitted tokens of ``row`` (the generate loop calls this)."""
        self.host[row].extend(tokens)

    @staticmethod
    def lookup(tokens: list[int], k: int) -> list[int]:
        """The ``k`` tokens after the latest earlier match of the last 3/2/1 tokens."""
        n_tok = len(tokens)
        for n in range(min(NGRAM_MAX, n_tok - 1), 0, -1):
            tail = tokens[n_tok - n :]
            for start in range(n_tok - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow + [follow[-1]] * (k - len(follow))
        return [tokens[-1]] * k

    def propose(self, seq, seq_len, pads, k, sampling):  # noqa: D102
        drafts = [self.lookup(r, k) for r in self.host]
        return torch.tensor(drafts, dtype=torch.int64, device=seq.device), None


class EarlyExitDrafter(_Drafter):
    """The target's first ``L`` layers + its final norm and head, on the target's cache."""

    def __init__(
        self,
        model: Any,
        cache: Any,
        layers: int,
        batch: int,
        device: torch.device,
        graphs: bool,
    ) -> None:
        n = int(model.config.num_hidden_layers)
        if not 1 <= layers < n:
            raise ValueError(
                f"early_exit:{layers}: the model has {n} layers; L must be in [1, {n - 1}]"
            )
        self.model, self.cache, self.layers = model, cache, layers
        self.cache_kw = cache_kwargs(model, cache)  # decided once, not per step
        self.tok = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.step = _StepGraph(self._forward, graphs)

    def _forward(self) -> torch.Tensor:
        config = self.model.config
        full = config.num_hidden_layers
        config.num_hidden_layers = self.layers  # transformers runs layers[:n]
        try:
            _set_host_lengths(self.cache)
            out = self.model(
                input_ids=self.tok,
                position_ids=self.pos,
                use_cache=True,
                **self.cache_kw,
            )
        finally:
            config.num_hidden_layers = full
        return out.logits[:, -1]

    def propose(self, seq, seq_len, pads, k, sampling):  # noqa: D102
        # layers < L: entries below seq_len - 1 are the verified tokens' (the target wrote
        # them); roll back the rejected rest
        _set_lens(self.cache, seq_len - 1, range(self.layers))
        rows = torch.arange(seq.shape[0], device=seq.device)
        self.tok.copy_(seq[rows, seq_len - 1][:, None])
        self.pos.copy_((seq_len - 1 - pads)[:, None])
        drafts, logits = [], []
        for j in range(k):
            if j:
                self.pos.add_(1)
            lg = self.step()
            tok = sample_next(lg, **sampling)
            self.tok.copy_(tok[:, None])
            drafts.append(tok[:, None])
            logits.append(lg.clone())
        return torch.cat(drafts, 1), torch.stack(logits, 1)


def _vocab(model: Any) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = getattr(head, "out_features", None)
    return int(n) if n is not None else int(model.config.vocab_size)


class ModelDrafter(_Drafter):
    """Another causal LM over the same vocabulary, with its own preallocated cache."""

    def __init__(
        self,
        draft: nn.Module,
        target: nn.Module,
        batch: int,
        capacity: int,
        device: torch.device,
        graphs: bool,
    ) -> None:
        tv = _vocab(target)
        dv = _vocab(draft)
        if tv != dv:
            raise ValueError(
                f"the draft model's vocabulary ({dv}) differs from the target's "
                f"({tv}); speculative decoding needs the same tokenizer"
            )
        self.model = draft
        self.cache = kv_cache(
            draft, "dense", max_cache_len=capacity, batch_size=batch, device=device, recent=0
        )
        self.cache_kw = cache_kwargs(draft, self.cache)  # decided once, not per step
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.tok2 = torch.zeros(batch, 2, dtype=torch.int64, device=device)
        self.pos2 = torch.zeros(batch, 2, dtype=torch.int64, device=device)
        self.tok1 = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.pos1 = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.catch_up = _StepGraph(self._forward2, graphs)
        self.step = _StepGraph(self._forward1, graphs)

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        _set_host_lengths(self.cache)
        return self.model(
            input_ids=tok,
            position_ids=pos,
            use_cache=True,
            **self.cache_kw,
        ).logits[:, -1]

    def _forward2(self) -> torch.Tensor:
        _set_lens(self.cache, self.lens)
        return self._forward(self.tok2, self.pos2)

    def _forward1(self) -> torch.Tensor:
        return self._forward(self.tok1, self.pos1)

    def prefill(self, ids, mask, pos, padded) -> None:  # noqa: D102
        self.cache.reset()
        self.cache.set_static_key_mask(None)
        self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **self.cache_kw,
        )
        if padded:
            self.cache.set_static_key_mask(mask)

    def propose(self, seq, seq_len, pads, k, sampling):  # noqa: D102
        rows = torch.arange(seq.shape[0], device=seq.device)
        # re-read the last two tokens: covers the all-accepted case, whose last draft the
        # draft model never saw
        self.lens.copy_(seq_len - 2)
        idx = torch.stack([seq_len - 2, seq_len - 1], 1)
        self.tok2.copy_(seq[rows[:, None], idx])
        self.pos2.copy_(idx - pads[:, None])
        lg = self.catch_up()
        drafts, logits = [], []
        for j in range(k):
            if j:
                self.pos1.add_(1)
                lg = self.step()
            else:
                self.pos1.copy_(self.pos2[:, 1:] + 1)
            nxt = sample_next(lg, **sampling)
            self.tok1.copy_(nxt[:, None])
            drafts.append(nxt[:, None])
            logits.append(lg.to(torch.float32, copy=True))  # lg: a graph's output
        return torch.cat(drafts, 1), torch.stack(logits, 1)


def make_drafter(
    draft: DraftSpec,
    model: nn.Module,
    cache: Any,
    batch: int,
    capacity: int,
    device: torch.device,
    graphs: bool = False,
) -> _Drafter:
    """The drafter ``draft`` describes (see the module docstring), for target ``model``
    with its ``cache``, ``batch`` rows and ``capacity`` cache slots."""
    if draft.kind == "ngram":
        return NgramDrafter()
    if draft.kind == "early_exit":
        return EarlyExitDrafter(model, cache, draft.layers, batch, device, graphs)
    assert draft.model is not None
    return ModelDrafter(draft.model, model, batch, capacity, device, graphs)


#: Cache slots of a speculative session are rounded up to a multiple of this.
WIDTH_BUCKET = 128


class _SpecSession:
    """What speculative calls with one key share: the target cache, the drafter (its own
    cache and graphs), static inputs and one captured verification graph per ``k``."""

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        draft: DraftSpec,
        batch: int,
        width: int,
        num_draft: int,
        device: torch.device,
        graphs: bool,
    ) -> None:
        self.model, self.graphs = model, graphs
        self.cache = kv_cache(
            model, spec, max_cache_len=width, batch_size=batch, device=device, recent=0
        )
        self.drafter = make_drafter(draft, model, self.cache, batch, width, device, graphs)
        self.xbuf = torch.zeros(batch, num_draft + 1, dtype=torch.int64, device=device)
        self.pbuf = torch.zeros_like(self.xbuf)
        self.lens_buf = torch.zeros(batch, dtype=torch.int32, device=device)
        self.verifiers: dict[int, _StepGraph] = {}
        self.keepalive: Any = None

    def verifier(self, k: int) -> _StepGraph:
        """The verification forward of ``k`` drafts (k + 1 query tokens per row)."""
        if k not in self.verifiers:
            model, cache = self.model, self.cache
            kw = cache_kwargs(model, cache)
            xbuf, pbuf, lens_buf = self.xbuf, self.pbuf, self.lens_buf

            def fn() -> torch.Tensor:
                _set_lens(cache, lens_buf)
                _set_host_lengths(cache)
                return model(
                    input_ids=xbuf[:, : k + 1],
                    position_ids=pbuf[:, : k + 1],
                    use_cache=True,
                    **kw,
                ).logits

            self.verifiers[k] = _StepGraph(fn, self.graphs)
        return self.verifiers[k]


def speculative_generate(
    req: DecodeRequest,
    draft: DraftSpec,
    num_draft: int,
    device: torch.device,
    graphs: bool = False,
    session: Any = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The speculative loop behind ``sk.generate(..., draft=...)``: returns the output
    ``[B, S + n]`` and statistics (steps, mean accepted drafts per row-step, acceptance
    rate, final ``k``). ``session(key, build)`` returns a cached :class:`_SpecSession`
    (caches, drafter and captured graphs are reused by calls with the same key).

    ``req.ids``/``req.mask``: a left-padded (or unpadded) batch; ``sk.generate`` has
    already turned right padding into left padding and checked the mask."""
    model, ids, mask, max_new, spec = req.model, req.ids, req.mask, req.max_new, req.spec
    eos, pad_id, streamer = req.eos, req.pad_id, req.streamer
    sampling = req.sampling
    temperature, top_k, top_p = sampling["temperature"], sampling["top_k"], sampling["top_p"]
    generator = sampling["generator"]
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft!r}")
    batch, prompt = ids.shape
    # cache slots rounded up, so prompts of different lengths share one session
    width = -(-(prompt + max_new + num_draft + 2) // WIDTH_BUCKET) * WIDTH_BUCKET
    padded = req.is_padded()
    draft_key: Any = str(draft)
    if draft.model is not None:
        draft_key = ("model", id(draft.model), fingerprint(draft.model))

    def build() -> _SpecSession:
        return _SpecSession(model, spec, draft, batch, width, num_draft, device, graphs)

    key = (spec, draft_key, batch, width, num_draft, padded, graphs, device)
    sess = session(key, build) if session is not None else build()
    if draft.model is not None:
        sess.keepalive = draft.model
    cache, drafter = sess.cache, sess.drafter
    cache.reset()
    cache.set_static_key_mask(None)
    pos = req.positions(device)
    if mask is not None:
        pads = (mask == 0).sum(-1)
    else:
        pads = torch.zeros(batch, dtype=torch.int64, device=device)
    verify_t = temperature if sampling["do_sample"] else 0.0

    req.stream_prompt()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **cache_kwargs(model, cache),
    )
    first = sample_next(out.logits[:, -1], **sampling)
    del out
    if padded:
        cache.set_static_key_mask(mask)
    drafter.prefill(ids, mask, pos, padded)

    seq = torch.full((batch, width), pad_id, dtype=torch.int64, device=device)
    seq[:, :prompt] = ids
    seq[:, prompt] = first
    seq_len = torch.full((batch,), prompt + 1, dtype=torch.int64, device=device)
    finished = (
        eos_hit(first, eos)
        if eos is not None
        else torch.zeros(batch, dtype=torch.bool, device=device)
    )
    first_host = first.tolist()
    if isinstance(drafter, NgramDrafter):
        for r, t in enumerate(first_host):
            drafter.extend(r, [t])
    if streamer is not None:
        streamer.put(first.cpu())
    col = torch.arange(num_draft + 1, device=device)
    rows = torch.arange(batch, device=device)
    xbuf, pbuf, lens_buf = sess.xbuf, sess.pbuf, sess.lens_buf
    k = num_draft
    steps = accepted_sum = proposed = 0
    produced = seq_len - prompt
    active = ~finished & (produced < max_new)
    go = bool(active.any())
    while go:
        drafts, dlogits = drafter.propose(seq, seq_len, pads, k, sampling)
        xbuf[:, 0] = seq[rows, seq_len - 1]
        xbuf[:, 1 : k + 1] = drafts
        pbuf[:, : k + 1] = (seq_len - 1 - pads)[:, None] + col[: k + 1]
        lens_buf.copy_(seq_len - 1)
        logits = sess.verifier(k)()
        if verify_t == 0.0:
            n_acc, toks = ops.speculative_verify(drafts, None, logits, temperature=0.0)
        elif dlogits is None:  # one-hot proposals (ngram)
            probs = torch.zeros(
                batch, k, logits.shape[-1], dtype=torch.float32, device=device
            ).scatter_(-1, drafts[..., None], 1.0)
            n_acc, toks = ops.speculative_verify(
                drafts,
                probs,
                logits,
                temperature=verify_t,
                generator=generator,
                top_k=top_k,
                top_p=top_p,
            )
        else:
            n_acc, toks = ops.speculative_verify(
                drafts,
                None,
                logits,
                temperature=verify_t,
                generator=generator,
                top_k=top_k,
                top_p=top_p,
                draft_logits=dlogits,
            )
        emit = n_acc + 1
        if eos is not None:
            hit = eos_hit(toks, eos) & (col[: k + 1][None] < emit[:, None])
            first_eos = torch.where(hit, col[: k + 1][None], k + 1).min(1).values
            emit = torch.minimum(emit, first_eos + 1)
            finished = finished | (first_eos <= k)
        emit = torch.minimum(emit, max_new - produced)
        emit = torch.where(active, emit, torch.zeros_like(emit))
        keep = col[: k + 1][None] < emit[:, None]
        dest = (seq_len[:, None] + col[: k + 1][None]).clamp(max=width - 1)
        seq.scatter_(1, dest, torch.where(keep, toks, seq.gather(1, dest)))
        seq_len = seq_len + emit
        # the cache's lengths are rolled back where they are read next: the verification
        # graph sets them from lens_buf, the early-exit drafter sets layers < L
        produced = seq_len - prompt
        active = ~finished & (produced < max_new)
        # the one read per step: accepted counts (k adaptation), emitted counts, whether
        # any row goes on, and the step's tokens
        host = torch.cat([n_acc, emit, active.any()[None].long(), toks.reshape(-1)]).cpu()
        n_host, e_host = host[:batch].tolist(), host[batch : 2 * batch].tolist()
        go = bool(host[2 * batch])
        new_tok = host[2 * batch + 1 :].reshape(batch, k + 1)
        steps += 1
        live = [r for r in range(batch) if e_host[r] > 0]
        if live:
            accepted_sum += sum(min(n_host[r], k) for r in live)
            proposed += k * len(live)
            mean_acc = sum(n_host[r] for r in live) / len(live)
            k = max(1, min(num_draft, round(mean_acc) + 1))
        if isinstance(drafter, NgramDrafter) or streamer is not None:
            for r in range(batch):
                e = e_host[r]
                if e and isinstance(drafter, NgramDrafter):
                    drafter.extend(r, new_tok[r, :e].tolist())
                if e and streamer is not None:
                    streamer.put(new_tok[r, :e])
    if streamer is not None:
        streamer.end()
    longest = int((seq_len - prompt).max())
    out_ids = seq[:, : prompt + longest].clone()
    # rows that stopped early are padded after their end, as transformers does
    tail = torch.arange(prompt + longest, device=device)[None] >= seq_len[:, None]
    out_ids[tail] = pad_id
    stats = {
        "steps": float(steps),
        "acceptance_rate": accepted_sum / max(proposed, 1),
        "mean_accepted": accepted_sum / max(steps * batch, 1),
        "final_k": float(k),
    }
    return out_ids, stats

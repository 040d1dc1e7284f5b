"""Benchmarks of ``sentinel_kernels.ops.speculative_verify`` against eager PyTorch verification.

Groups ``speculative_verify <mode> B16 k8 V49152 float32 cuda`` (and `` graph``: the same
entries replayed from CUDA graphs, kernel time without host overhead), ``mode`` one of

* ``sample``: rejection sampling at temperature 0.8 with the draft's probabilities given;
* ``greedy``: argmax matching.

Entries: ``sentinel-triton`` (the op, backend ``auto``) and ``eager-torch`` (the baseline,
:func:`eager_verify_sample` / :func:`eager_verify_greedy`: the straightforward vectorised
PyTorch verification a serving loop would write, HF / gpt-fast style: softmax, gather,
comparisons, cumprod for the accepted prefix, the residual distribution, one
``torch.multinomial``). Both run without host syncs. A CPU group (``B4 k4 V32000``,
``sentinel-native`` vs ``eager-torch``) is included for the C++ path.

``extra_info``: ``bytes`` = the inputs an eager implementation must read once (target
logits, plus draft probabilities when sampling; ours reads less: only one row of ``q`` per
batch row), ``mean_accepted`` and ``tokens_per_call`` (emitted tokens, sum of ``n + 1``) of
the first input set, and on the candidate ``speedup_vs_eager_do_bench`` (both timed with
``triton.testing.do_bench`` in the same test, a cross-check of the report's ratio).

Target (the speculative-decoding issue): the sampling verify at B16 k8 V49152 fp32 is
>= 5x faster than eager in the same run.
"""

from __future__ import annotations

import functools

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# (device, B, k, V)
GPU_CASES = [("cuda", 16, 8, 49152)]
CPU_CASES = [("cpu", 4, 4, 32000)]
MODES = ("sample", "greedy")
TEMPERATURE = 0.8


def eager_verify_sample(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised eager speculative sampling (the baseline), same outputs' format as the op.

    ``p = softmax(logits / T)``; accept draft ``i`` iff ``u_i < min(1, p(x)/q(x))``;
    ``n`` = leading accepts (cumprod); the emitted token is drawn with ``torch.multinomial``
    from ``normalize(max(0, p_n - q_n))`` (``p_n`` when that is all zero) or from ``p_k``.
    """
    b, k1, _ = target_logits.shape
    k = k1 - 1
    dev = target_logits.device
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    p_draft = p[:, :k]
    idx = draft_tokens.unsqueeze(-1)
    px = p_draft.gather(-1, idx).squeeze(-1)
    qx = draft_probs.gather(-1, idx).squeeze(-1)
    u = torch.rand(b, k, device=dev, generator=generator)
    accepted = u < torch.clamp(px / qx, max=1.0)
    n = accepted.long().cumprod(dim=-1).sum(dim=-1)
    residual = (p_draft - draft_probs).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_draft)
    dist = torch.cat([residual, p[:, k:]], dim=1)
    rows = torch.arange(b, device=dev)
    nxt = torch.multinomial(dist[rows, n], 1, generator=generator).squeeze(-1)
    pos = torch.arange(k1, device=dev).expand(b, k1)
    drafts = torch.cat([draft_tokens, draft_tokens.new_zeros(b, 1)], dim=1)
    tokens = torch.where(pos < n[:, None], drafts, -1)
    tokens = torch.where(pos == n[:, None], nxt[:, None], tokens)
    return n, tokens


def eager_verify_greedy(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised eager greedy verification (the baseline): argmax, match, cumprod."""
    b, k1, _ = target_logits.shape
    k = k1 - 1
    t = target_logits.argmax(dim=-1)
    n = (draft_tokens == t[:, :k]).long().cumprod(dim=-1).sum(dim=-1)
    pos = torch.arange(k1, device=target_logits.device).expand(b, k1)
    drafts = torch.cat([draft_tokens, draft_tokens.new_zeros(b, 1)], dim=1)
    tokens = torch.where(pos < n[:, None], drafts, -1)
    tokens = torch.where(pos == n[:, None], t.gather(1, n[:, None]), tokens)
    return n, tokens


@functools.lru_cache(maxsize=1)
def _inputs(device: str, b: int, k: int, v: int, n_sets: int):
    """``n_sets`` problems (target logits, draft probs, drafts sampled from them)."""
    dev = torch.device(device)
    sets = []
    for i in range(n_sets):
        g = torch.Generator(device=dev).manual_seed(i)
        target = torch.randn(b, k + 1, v, device=dev, generator=g) * 4
        # a draft model that mostly agrees with the target: acceptance well above zero
        dl = target[:, :k] + torch.randn(b, k, v, device=dev, generator=g)
        q = torch.softmax(dl / TEMPERATURE, dim=-1)
        drafts = torch.multinomial(q.reshape(-1, v), 1, generator=g).reshape(b, k)
        greedy_drafts = target[:, :k].argmax(-1)
        # greedy: a mismatch at a random position per row (some rows fully accepted)
        stop = torch.randint(0, k + 1, (b, 1), device=dev, generator=g)
        pos = torch.arange(k, device=dev)
        greedy_drafts = torch.where(pos < stop, greedy_drafts, (greedy_drafts + 1) % v)
        sets.append((target, q, drafts, greedy_drafts))
    return tuple(sets)


def _params():
    out = []
    for device, b, k, v in GPU_CASES + CPU_CASES:
        impls = ("sentinel", "eager-torch")
        graphs = (False, True) if device == "cuda" else (False,)
        marks = []
        if device == "cuda":
            marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
        for mode in MODES:
            for graph in graphs:
                for impl in impls:
                    name = f"{device}-{mode}-B{b}k{k}V{v}-{impl}{'-graph' if graph else ''}"
                    out.append(
                        pytest.param(device, b, k, v, mode, impl, graph, marks=marks, id=name)
                    )
    return out


@pytest.mark.parametrize(("device", "b", "k", "v", "mode", "impl", "graph"), _params())
def test_speculative_verify(benchmark, measure, device, b, k, v, mode, impl, graph):
    """One entry of the group ``speculative_verify <mode> B.. k.. V.. float32 <device>``."""
    import sentinel_kernels as sk
    from sentinel_kernels._backend import resolve, use_backend

    dev = torch.device(device)
    target_bytes = b * (k + 1) * v * 4
    nbytes = target_bytes + (b * k * v * 4 if mode == "sample" else 0)
    sets = _inputs(device, b, k, v, measure.rotation_count(dev, nbytes))
    group = f"speculative_verify {mode} B{b} k{k} V{v} float32 {device}"
    if graph:
        group += " graph"

    if impl == "eager-torch":
        backend = "eager"
        if mode == "sample":
            fn = functools.partial(eager_verify_sample, temperature=TEMPERATURE)
            arg_sets = [(d, q, t) for t, q, d, _ in sets]
        else:
            fn = eager_verify_greedy
            arg_sets = [(gd, t) for t, _, _, gd in sets]
    else:
        with use_backend("auto"):
            backend = resolve(dev)
        if mode == "sample":

            def fn(d, q, t, rng):
                return sk.ops.speculative_verify(d, q, t, TEMPERATURE, rng=rng)

            arg_sets = [
                (d, q, t, torch.tensor([i, 0], device=dev)) for i, (t, q, d, _) in enumerate(sets)
            ]
        else:

            def fn(d, t):
                return sk.ops.speculative_verify(d, None, t, 0.0)

            arg_sets = [(gd, t) for t, _, _, gd in sets]

    # sanity before timing, on the first set: the format, and greedy equal to eager
    n, tokens = fn(*arg_sets[0])
    assert n.shape == (b,) and tokens.shape == (b, k + 1)
    if mode == "greedy":
        n_e, tok_e = eager_verify_greedy(sets[0][3], sets[0][0])
        assert torch.equal(n, n_e) and torch.equal(tokens, tok_e)
    extra = {
        "mode": mode,
        "cuda_graph": graph,
        "batch": b,
        "k": k,
        "vocab": v,
        "temperature": TEMPERATURE if mode == "sample" else 0.0,
        "mean_accepted": float(n.float().mean()),
        "tokens_per_call": int((n + 1).sum()),
    }
    if impl != "eager-torch" and device == "cuda" and not graph:
        try:
            import triton.testing

            if mode == "sample":
                eager = functools.partial(
                    eager_verify_sample, sets[0][2], sets[0][1], sets[0][0], TEMPERATURE
                )
            else:
                eager = functools.partial(eager_verify_greedy, sets[0][3], sets[0][0])
            ours = functools.partial(fn, *arg_sets[0])
            t_e = triton.testing.do_bench(eager, warmup=25, rep=200, return_mode="median")
            t_o = triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median")
            extra["speedup_vs_eager_do_bench"] = t_e / t_o
        except Exception as exc:  # the cross-check must never sink the benchmark
            extra["do_bench_error"] = f"{type(exc).__name__}: {exc}"

    if graph:
        try:
            arg_sets = measure.capture_graphs(fn, arg_sets)
        except Exception as exc:  # report, do not hide: the entry is skipped with the reason
            pytest.skip(f"CUDA graph capture failed: {type(exc).__name__}: {exc}")
        fn = measure.replay
    measure(
        benchmark,
        fn,
        arg_sets,
        group=group,
        impl=f"{impl}-{backend}" if impl == "sentinel" else impl,
        role="candidate" if impl == "sentinel" else "baseline",
        backend=backend,
        device=dev,
        nbytes=nbytes,
        shape=(b, k + 1, v),
        dtype=torch.float32,
        extra=extra,
    )

"""speculative_verify on every backend: greedy exactness, sampling agreement with the
reference (same counter-based random numbers), format, determinism, rng advance, and the
statistical proof that rejection sampling keeps the target distribution (with a broken
acceptance rule that must fail the same check)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, Backend
from helpers import skip_interpreted_bf16

import sentinel_kernels as sk
from sentinel_kernels.decoding.sampling import filter_logits
from sentinel_kernels.reference import spec_verify as ref

# (B, k, V): every B in 1/3/7, k in 1/2/5/8, V in 7/127/1000/4099 appears, with odd mixes
SHAPES = [
    (1, 1, 7),
    (3, 2, 127),
    (7, 5, 1000),
    (3, 8, 4099),
    (1, 8, 1000),
    (7, 1, 4099),
    (3, 5, 7),
    (7, 8, 127),
    (1, 2, 4099),
    (7, 2, 7),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype, device, seed, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(device)


def _greedy_drafts(target: torch.Tensor, seed: int) -> torch.Tensor:
    """Drafts equal to the argmax up to a random first mismatch per row (or none): covers
    all-accepted (bonus), first-rejected and mid-way rejections."""
    b, k1, vocab = target.shape
    k = k1 - 1
    t = target.float().cpu().argmax(-1)[:, :k]
    g = _gen(seed)
    stop = torch.randint(0, k + 1, (b,), generator=g)
    stop[0] = k  # at least one all-accepted row
    if b > 1:
        stop[1] = 0  # and one rejected at once
    wrong = (t + 1 + torch.randint(0, vocab - 1, t.shape, generator=g)) % vocab if vocab > 1 else t
    pos = torch.arange(k).expand(b, k)
    d = torch.where(pos < stop[:, None], t, wrong)
    rand = torch.randint(0, vocab, t.shape, generator=g)  # after the mismatch: anything
    return torch.where(pos > stop[:, None], rand, d).to(target.device)


def _check_format(n: torch.Tensor, tokens: torch.Tensor, drafts: torch.Tensor, vocab: int):
    b, k = drafts.shape
    assert n.dtype == torch.int64 and tokens.dtype == torch.int64
    assert n.shape == (b,) and tokens.shape == (b, k + 1)
    n, tokens, drafts = n.cpu(), tokens.cpu(), drafts.cpu().long()
    assert ((n >= 0) & (n <= k)).all(), f"num_accepted out of [0, {k}]: {n}"
    pos = torch.arange(k + 1).expand(b, k + 1)
    padded = torch.cat([drafts, torch.zeros(b, 1, dtype=torch.long)], 1)
    acc = pos < n[:, None]
    assert torch.equal(tokens[acc], padded[acc]), "the accepted prefix is not the drafts"
    assert (tokens[pos > n[:, None]] == -1).all(), "tokens after the emitted one must be -1"
    last = tokens.gather(1, n[:, None])
    assert ((last >= 0) & (last < vocab)).all(), "the emitted token is not a vocabulary index"


def _assert_same(actual, expected, what: str, allowed_rows: int = 0) -> None:
    n, t = (x.cpu() for x in actual)
    n_ref, t_ref = (x.cpu() for x in expected)
    bad = (n != n_ref) | (t != t_ref).any(-1)
    assert int(bad.sum()) <= allowed_rows, (
        f"{what}: {int(bad.sum())} rows differ from the reference, e.g. row "
        f"{int(bad.nonzero()[0])}: {t[bad][0].tolist()} vs {t_ref[bad][0].tolist()}"
    )


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "k", "V"), SHAPES)
def test_greedy_matches_reference(backend: Backend, B, k, V, dtype):
    skip_interpreted_bf16(backend, dtype)
    target = _logits((B, k + 1, V), dtype, backend.device, seed=B * 1000 + k * 10 + V)
    drafts = _greedy_drafts(target, seed=V)
    out = sk.ops.speculative_verify(drafts, None, target, temperature=0.0)
    _check_format(*out, drafts, V)
    expected = ref.speculative_verify(drafts.cpu(), None, target.cpu(), 0.0)
    _assert_same(out, expected, "greedy")
    # the oracle itself against torch.argmax
    t = target.cpu().float().argmax(-1)
    n = expected[0]
    for b in range(B):
        m = 0
        while m < k and int(drafts[b, m]) == int(t[b, m]):
            m += 1
        assert int(n[b]) == m and int(expected[1][b, m]) == int(t[b, m])


def test_greedy_ties_and_edge_cases(backend: Backend):
    dev = backend.device
    B, k, V = 6, 3, 37
    # integer logits in a small range: many ties; argmax is the lowest index
    target = torch.randint(0, 3, (B, k + 1, V), generator=_gen(1)).float().to(dev)
    t = target.cpu().argmax(-1)
    drafts = t[:, :k].clone()
    drafts[1, 0] = (t[1, 0] + 1) % V  # a tied-but-later index is a mismatch
    drafts[2, 1] = -1  # out-of-range drafts are rejected, never read
    drafts[3, 2] = V
    drafts[4, 0] = 10**12
    out = sk.ops.speculative_verify(drafts.to(dev), None, target, temperature=0.0)
    _check_format(*out, drafts, V)
    assert out[0].cpu().tolist() == [3, 0, 1, 2, 0, 3]
    assert out[1].cpu()[:, :].gather(1, out[0].cpu()[:, None]).squeeze(1).tolist() == [
        int(t[b, int(out[0][b])]) for b in range(B)
    ]
    _assert_same(out, ref.speculative_verify(drafts, None, target.cpu(), 0.0), "ties")
    # all -inf row: index 0, like torch.argmax
    target2 = torch.full((1, 2, 9), float("-inf"), device=dev)
    n, tok = sk.ops.speculative_verify(
        torch.zeros(1, 1, dtype=torch.long, device=dev), None, target2, temperature=0.0
    )
    assert n.tolist() == [1] and tok.tolist() == [[0, 0]]


def test_greedy_non_contiguous_int32_and_probs_ignored(backend: Backend):
    dev = backend.device
    B, k, V = 5, 4, 300
    big = _logits((B, k + 3, 2 * V), torch.float32, dev, seed=3)
    target = big[:, 1 : k + 2, ::2]  # strided positions and vocabulary
    assert not target.is_contiguous()
    wide = torch.zeros(B, 2 * k, dtype=torch.int32)
    wide[:, ::2] = _greedy_drafts(target.cpu(), seed=4).int()
    drafts = wide.to(dev)[:, ::2]  # int32, column stride 2
    probs = torch.softmax(torch.randn(B, k, V), -1).to(dev)
    out = sk.ops.speculative_verify(drafts, probs, target, temperature=0.0, top_k=3)
    _check_format(*out, drafts, V)
    _assert_same(
        out,
        ref.speculative_verify(drafts.cpu(), None, target.cpu().contiguous(), 0.0),
        "non-contiguous greedy",
    )
    # a transposed layout: vocabulary is not the fastest dim
    tv = _logits((V, k + 1, B), torch.float16, dev, seed=5).permute(2, 1, 0)
    d2 = _greedy_drafts(tv.cpu(), seed=6).to(dev)
    out2 = sk.ops.speculative_verify(d2, None, tv, temperature=0)
    _assert_same(out2, ref.speculative_verify(d2.cpu(), None, tv.cpu(), 0.0), "transposed")


def test_k_zero_and_empty_batch(backend: Backend):
    dev = backend.device
    target = _logits((3, 1, 50), torch.float32, dev, seed=7)
    d0 = torch.zeros(3, 0, dtype=torch.long, device=dev)
    n, tok = sk.ops.speculative_verify(d0, None, target, temperature=0.0)
    assert n.tolist() == [0, 0, 0]
    assert tok[:, 0].cpu().tolist() == target.cpu().argmax(-1)[:, 0].tolist()
    rng = torch.tensor([3, 0], device=dev)
    n, tok = sk.ops.speculative_verify(d0, None, target, temperature=0.7, rng=rng)
    _assert_same(
        (n, tok),
        ref.speculative_verify(d0.cpu(), None, target.cpu(), 0.7, rng=torch.tensor([3, 0])),
        "k=0 sampling",
    )
    assert rng.cpu().tolist() == [3, 3 * 50]
    e = torch.empty(0, 4, 10, device=dev)
    n, tok = sk.ops.speculative_verify(
        torch.empty(0, 3, dtype=torch.long, device=dev), None, e, temperature=0.0
    )
    assert n.shape == (0,) and tok.shape == (0, 4)


# ----------------------------------------------------------------------------- sampling


def _sampling_problem(B, k, V, dtype, device, seed, draft_scale=2.0):
    target = _logits((B, k + 1, V), dtype, device, seed=seed)
    g = _gen(seed + 1)
    # draft distribution: a perturbed target (so acceptance is frequent but not certain)
    dl = target[:, :k].float().cpu() + draft_scale * torch.randn(B, k, V, generator=g)
    q = torch.softmax(dl, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, k)
    return target, drafts.to(device), q.to(dtype).to(device), dl.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("B", "k", "V"), [(7, 5, 1000), (3, 8, 4099), (1, 2, 7), (7, 1, 127)])
@pytest.mark.parametrize("mode", ["probs", "logits", "probs-topk-topp", "logits-topk-topp"])
def test_sampling_matches_reference(backend: Backend, B, k, V, dtype, mode):
    skip_interpreted_bf16(backend, dtype)
    if backend.interpreted and V > 1000 and mode != "probs":
        pytest.skip("kept small for the interpreter")
    dev = backend.device
    target, drafts, q, dl = _sampling_problem(B, k, V, dtype, dev, seed=B * 7 + k + V)
    kw = {"top_k": 50, "top_p": 0.9} if "topk" in mode else {}
    probs, logits = (q, None) if mode.startswith("probs") else (None, dl)
    rng = torch.tensor([1234, 99], device=dev)
    out = sk.ops.speculative_verify(drafts, probs, target, 0.8, draft_logits=logits, rng=rng, **kw)
    _check_format(*out, drafts, V)
    assert rng.cpu().tolist() == [1234, 99 + B * (k + V)], "rng[1] not advanced by B*(k+V)"
    expected = ref.speculative_verify(
        drafts.cpu(),
        None if probs is None else probs.cpu(),
        target.cpu(),
        0.8,
        draft_logits=None if logits is None else logits.cpu(),
        rng=torch.tensor([1234, 99]),
        **kw,
    )
    # same random numbers: the same decisions, except (GPU) a uniform within float
    # rounding of an acceptance boundary
    _assert_same(out, expected, f"sampling {mode}", allowed_rows=1 if dev == "cuda" else 0)
    if kw:  # emitted tokens lie inside the filtered set of their position
        xs = target.cpu().float() * ref.inv_temperature(0.8)
        thr = ref.filter_thresholds(xs, **kw)
        n, tok = out[0].cpu(), out[1].cpu()
        last = tok.gather(1, n[:, None]).squeeze(1)
        val = xs[torch.arange(B), n].gather(1, last[:, None]).squeeze(1)
        assert (val >= thr[torch.arange(B), n]).all()


def test_sampling_determinism_and_generator(backend: Backend):
    dev = backend.device
    B, k, V = 6, 4, 300
    target, drafts, q, _ = _sampling_problem(B, k, V, torch.float32, dev, seed=11)
    rng = torch.tensor([7, 0], device=dev)
    a = sk.ops.speculative_verify(drafts, q, target, 1.0, rng=rng)
    assert rng.cpu().tolist() == [7, B * (k + V)]
    b = sk.ops.speculative_verify(drafts, q, target, 1.0, rng=torch.tensor([7, 0], device=dev))
    _assert_same(a, b, "same rng")
    c = sk.ops.speculative_verify(drafts, q, target, 1.0, rng=rng)  # advanced: new numbers
    _check_format(*c, drafts, V)
    assert rng.cpu().tolist() == [7, 2 * B * (k + V)]
    # results over many offsets differ (the random numbers are used)
    outs = {
        tuple(sk.ops.speculative_verify(drafts, q, target, 1.0, rng=rng)[1].flatten().tolist())
        for _ in range(4)
    }
    assert len(outs) > 1
    # a generator: deterministic for its state; generator=None uses torch's default one
    gdev = torch.Generator(device=dev)
    x = sk.ops.speculative_verify(drafts, q, target, 1.0, gdev.manual_seed(5))
    y = sk.ops.speculative_verify(drafts, q, target, 1.0, generator=gdev.manual_seed(5))
    _assert_same(x, y, "same generator seed")
    torch.manual_seed(3)
    z1 = sk.ops.speculative_verify(drafts, q, target, 1.0)
    torch.manual_seed(3)
    z2 = sk.ops.speculative_verify(drafts, q, target, 1.0)
    _assert_same(z1, z2, "default generator")
    # greedy neither reads nor advances rng
    rng2 = torch.tensor([7, 5], device=dev)
    sk.ops.speculative_verify(drafts, q, target, 0.0, rng=rng2)
    assert rng2.cpu().tolist() == [7, 5]


def test_sampling_p_equals_q_accepts_everything(backend: Backend):
    dev = backend.device
    B, k, V = 64, 5, 200
    target = _logits((B, k + 1, V), torch.float32, dev, seed=12)
    T = 0.7
    xs = target.cpu() * ref.inv_temperature(T)
    p = torch.softmax(xs, -1)
    drafts = torch.multinomial(p[:, :k].reshape(-1, V), 1, generator=_gen(13)).reshape(B, k)
    # q given as probabilities equal (up to rounding) to p, and as the same logits
    n, _ = sk.ops.speculative_verify(
        drafts.to(dev), p[:, :k].to(dev), target, T, rng=torch.tensor([1, 0], device=dev)
    )
    assert (n.cpu() == k).all(), f"p == q must accept every draft, got {n.tolist()}"
    n, _ = sk.ops.speculative_verify(
        drafts.to(dev),
        None,
        target,
        T,
        draft_logits=target[:, :k],
        top_k=20,
        top_p=0.95,
        rng=torch.tensor([2, 0], device=dev),
    )
    xs_f = filter_logits(target.cpu().reshape(-1, V), T, 20, 0.95).reshape(B, k + 1, V)
    kept = torch.isfinite(xs_f[:, :k].gather(-1, drafts[..., None]).squeeze(-1))
    expect = kept.long().cumprod(-1).sum(-1)  # accepted up to the first filtered-out draft
    assert torch.equal(n.cpu(), expect)


def test_filter_thresholds_match_filter_logits():
    g = _gen(14)
    x = torch.randn(40, 500, generator=g) * 2
    for top_k, top_p in [(1, None), (10, None), (None, 0.5), (None, 0.99), (30, 0.8), (500, 1.0)]:
        thr = ref.filter_thresholds(x, top_k, top_p)
        ours = x >= thr[:, None]
        theirs = torch.isfinite(filter_logits(x, 1.0, top_k, top_p))
        assert torch.equal(ours, theirs), (top_k, top_p)
    # top-k ties at the k-th value are kept, as in filter_logits
    xt = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert (xt >= ref.filter_thresholds(xt, 2, None)[:, None]).tolist() == [
        [True, False, True, True, False]
    ]


def test_random_numbers_are_philox():
    # Random123's known-answer vector for philox4x32-10 (Salmon et al. 2011): counter
    # (0, 0, 0, 0), key (0, 0) -> first word 0x6627e8d5 (the kernels' counters always have
    # zero high words, so the other published vectors do not apply)
    z = torch.zeros((), dtype=torch.int64)
    assert int(ref.philox_uint32(z, z)) == 0x6627E8D5
    u = ref.uniform_from_bits(torch.tensor([0, 2**32 - 1]))
    assert u.tolist() == [2.0**-24, 1 - 2.0**-24]


# ----------------------------------------------------------------------------- statistics

# Chi-square goodness of fit, V = 6 categories (5 degrees of freedom). Three checks per
# run (first token, second token given acceptance, bonus token given all accepted), each
# at alpha = 1e-4 / 3 (Bonferroni): a correct implementation fails the test with
# probability <= 1e-4 over the choice of seed. (The seeds are fixed, so the outcome is
# reproducible.) chi2.isf(1e-4 / 3, 5) = 28.195 (scipy; hard-coded when it is missing).
STAT_V, STAT_K, STAT_B = 6, 3, 20000
ALPHA = 1e-4 / 3
CHI2_CRIT_DOF5 = 28.195387740769178

P_TARGET = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
        [0.05, 0.10, 0.45, 0.05, 0.15, 0.20],
        [0.30, 0.05, 0.05, 0.30, 0.10, 0.20],
        [0.10, 0.35, 0.10, 0.15, 0.05, 0.25],
    ],
    dtype=torch.float64,
)
Q_DRAFT = torch.tensor(
    [
        [0.10, 0.10, 0.30, 0.30, 0.10, 0.10],
        [0.30, 0.20, 0.10, 0.20, 0.10, 0.10],
        [0.10, 0.30, 0.20, 0.10, 0.20, 0.10],
    ],
    dtype=torch.float64,
)


def _chi2_crit(dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:  # pragma: no cover - scipy is a test extra
        assert dof == 5
        return CHI2_CRIT_DOF5
    return float(chi2.isf(ALPHA, dof))


def _chi2(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(tokens.cpu(), minlength=STAT_V).double()
    total = counts.sum()
    expected = probs * total
    assert (expected >= 5).all(), "too few samples for a chi-square test"
    return float(((counts - expected) ** 2 / expected).sum()), int(total)


def _stat_problem(device: str):
    target = torch.log(P_TARGET).float().expand(STAT_B, -1, -1).contiguous().to(device)
    q = Q_DRAFT.float().expand(STAT_B, -1, -1).contiguous()
    drafts = torch.multinomial(q.reshape(-1, STAT_V), 1, generator=_gen(21)).reshape(STAT_B, STAT_K)
    return target, drafts.to(device), q.to(device)


def _distribution_checks(n: torch.Tensor, tokens: torch.Tensor) -> list[tuple[str, float, float]]:
    """(name, chi-square statistic, critical value) of the three checks."""
    n, tokens = n.cpu(), tokens.cpu()
    crit = _chi2_crit(STAT_V - 1)
    out = []
    stat, _ = _chi2(tokens[:, 0], P_TARGET[0])
    out.append(("first token ~ p_0", stat, crit))
    stat, _ = _chi2(tokens[n >= 1, 1], P_TARGET[1])
    out.append(("second token | first accepted ~ p_1", stat, crit))
    stat, _ = _chi2(tokens[n == STAT_K, STAT_K], P_TARGET[STAT_K])
    out.append(("bonus token | all accepted ~ p_3", stat, crit))
    return out


def _broken_verify(drafts: torch.Tensor, q: torch.Tensor, rule: str, seed: int):
    """Deliberately wrong verification rules (the test of the test)."""
    p = P_TARGET.float()
    b = drafts.shape[0]
    g = _gen(seed)
    px = p[:STAT_K].expand(b, -1, -1).gather(-1, drafts[..., None]).squeeze(-1)
    qx = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(b, STAT_K, generator=g)
    accept = torch.ones_like(px, dtype=torch.bool) if rule == "always-accept" else u * qx < px
    n = accept.long().cumprod(-1).sum(-1)
    # "no-residual": on rejection draw from p_n itself instead of max(0, p_n - q_n)
    dist = p[n]
    last = torch.multinomial(dist, 1, generator=g).squeeze(1)
    pos = torch.arange(STAT_K + 1).expand(b, -1)
    padded = torch.cat([drafts, torch.zeros(b, 1, dtype=torch.long)], 1)
    tokens = torch.where(pos < n[:, None], padded, -1)
    tokens = torch.where(pos == n[:, None], last[:, None], tokens)
    return n, tokens


def test_sampling_keeps_target_distribution(backend: Backend):
    if backend.interpreted:
        pytest.skip(
            "20000 rows are too many programs for the interpreter; the Triton "
            "kernels draw the reference's random numbers (test_sampling_matches_"
            "reference) and the GPU run covers cuda-triton"
        )
    target, drafts, q = _stat_problem(backend.device)
    n, tokens = sk.ops.speculative_verify(
        drafts, q, target, 1.0, rng=torch.tensor([2024, 0], device=backend.device)
    )
    _check_format(n, tokens, drafts, STAT_V)
    checks = _distribution_checks(n, tokens)
    for name, stat, crit in checks:
        assert stat < crit, f"{name}: chi2 = {stat:.2f} >= {crit:.2f} (alpha {ALPHA:.1e})"
    # acceptance rate of the first draft: sum_x min(p, q) = 0.55 here (5 sigma band)
    rate = float((n.cpu() >= 1).double().mean())
    expect = float(torch.minimum(P_TARGET[0], Q_DRAFT[0]).sum())
    sigma = math.sqrt(expect * (1 - expect) / STAT_B)
    assert abs(rate - expect) < 5 * sigma, (rate, expect)
    print(
        "chi2 (dof 5):",
        ", ".join(f"{name}: {stat:.2f}" for name, stat, _ in checks),
        f"critical {checks[0][2]:.2f}",
    )


def test_statistical_problem_matches_reference(backend: Backend):
    # The first 64 rows of the chi-square problem: every backend (the Triton interpreter
    # too, which is too slow for all 20000 rows) emits exactly the reference's tokens, so
    # the reference's distribution result carries over to it.
    target, drafts, q = _stat_problem(backend.device)
    rows = 64
    rng = torch.tensor([2024, 0], device=backend.device)
    out = sk.ops.speculative_verify(drafts[:rows], q[:rows], target[:rows], 1.0, rng=rng)
    expected = ref.speculative_verify(
        drafts[:rows].cpu(), q[:rows].cpu(), target[:rows].cpu(), 1.0, rng=torch.tensor([2024, 0])
    )
    _assert_same(out, expected, "chi-square problem", allowed_rows=1 if HAS_CUDA else 0)


@pytest.mark.parametrize("rule", ["no-residual", "always-accept"])
def test_statistical_check_catches_a_broken_rule(rule):
    target, drafts, q = _stat_problem("cpu")
    n, tokens = _broken_verify(drafts, q, rule, seed=5)
    _check_format(n, tokens, drafts, STAT_V)  # well-formed output, wrong distribution
    checks = _distribution_checks(n, tokens)
    failed = [(name, stat) for name, stat, crit in checks if stat >= crit]
    print(rule, "chi2 (dof 5):", ", ".join(f"{name}: {stat:.1f}" for name, stat, _ in checks))
    assert failed, f"the chi-square check did not catch the broken rule {rule!r}: {checks}"
    assert checks[0][1] >= checks[0][2], "the first-token check alone must catch it"


# ----------------------------------------------------------------------------- errors


def test_bad_inputs(backend: Backend):
    dev = backend.device
    B, k, V = 2, 3, 10
    t = torch.randn(B, k + 1, V, device=dev)
    d = torch.zeros(B, k, dtype=torch.long, device=dev)
    q = torch.full((B, k, V), 0.1, device=dev)
    sv = sk.ops.speculative_verify
    with pytest.raises(ValueError, match=r"draft_tokens must be \[B, k\]"):
        sv(torch.zeros(B, k + 1, dtype=torch.long, device=dev), None, t, 0.0)  # k+1 drafts
    with pytest.raises(ValueError, match=r"\[B, k\+1, V\]"):
        sv(d, None, t[0], 0.0)
    with pytest.raises(ValueError, match=r"draft_probs must be \[B, k, V\]"):
        sv(d, torch.full((B, k + 1, V), 0.1, device=dev), t, 1.0)
    with pytest.raises(ValueError, match=r"draft_logits must be \[B, k, V\]"):
        sv(d, None, t, 1.0, draft_logits=torch.randn(B, k, V + 1, device=dev))
    with pytest.raises(TypeError, match="draft_tokens has dtype float32"):
        sv(d.float(), None, t, 0.0)
    with pytest.raises(TypeError, match="target_logits has dtype float64"):
        sv(d, None, t.double(), 0.0)
    with pytest.raises(TypeError, match="draft_probs has dtype int64"):
        sv(d, q.long(), t, 1.0)
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        sv(d, q, t, -0.5)
    with pytest.raises(ValueError, match="temperature must be finite"):
        sv(d, q, t, float("nan"))
    with pytest.raises(ValueError, match="too small"):
        sv(d, q, t, 1e-40)
    with pytest.raises(TypeError, match="temperature must be a float"):
        sv(d, q, t, "hot")
    with pytest.raises(ValueError, match="not both"):
        sv(d, q, t, 1.0, draft_logits=t[:, :k])
    with pytest.raises(ValueError, match="needs draft_probs or draft_logits"):
        sv(d, None, t, 1.0)
    with pytest.raises(ValueError, match="top_k must be"):
        sv(d, q, t, 1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p must be"):
        sv(d, q, t, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="rng must be a contiguous int64 tensor"):
        sv(d, q, t, 1.0, rng=torch.zeros(3, dtype=torch.long, device=dev))
    with pytest.raises(TypeError, match="rng has dtype int32"):
        sv(d, q, t, 1.0, rng=torch.zeros(2, dtype=torch.int32, device=dev))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sv(d.tolist(), q, t, 1.0)
    # greedy with draft probabilities is allowed and ignores them
    n, _ = sv(d, q, t, 0.0)
    assert n.shape == (B,)


@pytest.mark.gpu
def test_device_mismatch():
    t = torch.randn(2, 3, 10, device="cuda")
    d = torch.zeros(2, 2, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="one device"):
        sk.ops.speculative_verify(d.cpu(), None, t, 0.0)
    with pytest.raises(ValueError, match="one device"):
        sk.ops.speculative_verify(d, torch.full((2, 2, 10), 0.1), t, 1.0)
    with pytest.raises(ValueError, match="generator is on cpu"):
        sk.ops.speculative_verify(
            d, torch.full((2, 2, 10), 0.1, device="cuda"), t, 1.0, torch.Generator()
        )


@pytest.mark.gpu
def test_cuda_graph_capture():
    B, k, V = 4, 3, 5000
    target, drafts, q, _ = _sampling_problem(B, k, V, torch.float32, "cuda", seed=31)
    rng = torch.tensor([9, 0], device="cuda")
    sk.ops.speculative_verify(drafts, q, target, 0.9, rng=rng)  # compile outside capture
    torch.cuda.synchronize()
    rng.copy_(torch.tensor([9, 0]))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        n, tok = sk.ops.speculative_verify(drafts, q, target, 0.9, rng=rng)
    rng.copy_(torch.tensor([9, 0]))
    g.replay()
    first = (n.clone(), tok.clone())
    assert rng.cpu().tolist() == [9, B * (k + V)]
    g.replay()  # the offset moved on the device: new random numbers, rng advanced again
    assert rng.cpu().tolist() == [9, 2 * B * (k + V)]
    expected = ref.speculative_verify(
        drafts.cpu(), q.cpu(), target.cpu(), 0.9, rng=torch.tensor([9, 0])
    )
    _assert_same(first, expected, "graph replay", allowed_rows=1)


def test_opcheck(backend: Backend):
    dev = backend.device
    B, k, V = 3, 2, 33
    target, drafts, q, dl = _sampling_problem(B, k, V, torch.float32, dev, seed=41)
    op = torch.ops.sentinel.speculative_verify.default
    torch.library.opcheck(op, (drafts, None, target, 0.0, None, None, None, None))
    torch.library.opcheck(
        op, (drafts, q, target, 0.8, None, None, None, torch.tensor([1, 2], device=dev))
    )
    torch.library.opcheck(
        op, (drafts, None, target, 1.3, 5, 0.9, dl, torch.tensor([1, 2], device=dev))
    )


def test_backend_selection_native_only_cpu(monkeypatch):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    monkeypatch.setenv("SENTINEL_BACKEND", "native")
    from sentinel_kernels import _backend

    with pytest.raises(_backend.BackendUnavailableError, match="CPU tensors only"):
        sk.ops.speculative_verify(
            torch.zeros(1, 1, dtype=torch.long, device="cuda"),
            None,
            torch.randn(1, 2, 5, device="cuda"),
            0.0,
        )

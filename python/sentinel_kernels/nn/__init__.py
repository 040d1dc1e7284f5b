"""Replacement modules and transformers integration used by :func:`sentinel_kernels.patch_model`.

The registry (:mod:`sentinel_kernels.nn.registry`) that replacement modules register
into, and the modules that register on import: ``Int8Linear`` (options ``int8_weights`` /
``int8_activations``) and the ``"sentinel"`` attention for transformers' attention
interfaces (option ``attention``).
"""

from . import (
    attention,  # noqa: E402,F401  (registers the "sentinel" attention option)
    fused_layers,  # noqa: E402,F401  (registers the fused_layers option)
    int8_patching,  # noqa: E402,F401  (registers Int8Linear with patch_model)
    kv_cache_patch,  # noqa: E402,F401  (registers the kv_cache option)
)
from .int8_linear import Int8Linear  # noqa: E402
from .registry import (
    FEATURE_OPTIONS,
    KNOWN_OPTIONS,
    PatchContext,
    Replacement,
    Transform,
    is_enabled,
    register_replacement,
    register_transform,
    registered_options,
    replacements_for,
    transforms_for,
    unregister_replacement,
    unregister_transform,
)

__all__ = [
    "Int8Linear",
    "FEATURE_OPTIONS",
    "KNOWN_OPTIONS",
    "PatchContext",
    "Replacement",
    "Transform",
    "is_enabled",
    "register_replacement",
    "register_transform",
    "registered_options",
    "replacements_for",
    "transforms_for",
    "unregister_replacement",
    "unregister_transform",
]

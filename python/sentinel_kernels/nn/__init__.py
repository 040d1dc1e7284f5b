"""Replacement modules and transformers integration used by :func:`sentinel_kernels.patch_model`.

For now this holds the registry (:mod:`sentinel_kernels.nn.registry`) that replacement
modules register into; the modules themselves (``Int8Linear``, the sentinel attention
function, cache classes) arrive with their issues and register on import.
"""

from . import int8_patching  # noqa: E402,F401  (registers Int8Linear with patch_model)
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

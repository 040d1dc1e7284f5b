"""Replacement modules and transformers integration used by :func:`sentinel_kernels.patch_model`.

For now this holds the registry (:mod:`sentinel_kernels.nn.registry`) that replacement
modules register into; the modules themselves (``Int8Linear``, the sentinel attention
function, cache classes) arrive with their issues and register on import.
"""

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

"""Modules that :func:`sentinel_kernels.patch_model` puts into a model.

:mod:`.attention` (the ``"sentinel"`` attention function for transformers' attention
interfaces), :mod:`.int8_linear` (``Int8Linear``, ``Int8Embedding``) and
:mod:`.fused_layers` (fused RMSNorm, MLP and attention forwards). Which option uses which
is declared in :mod:`sentinel_kernels.patching.options`; importing these modules registers
nothing with ``patch_model``.
"""

from .int8_linear import Int8Linear

__all__ = ["Int8Linear"]

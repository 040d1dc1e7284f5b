"""Triton kernels of sentinel-kernels, one module per kernel family.

Shipped in the wheel as ``sentinel_kernels.kernels``. Modules here know nothing about
models: they take tensors that the op layer (``sentinel_kernels.ops``) has already
validated, pick launch configurations and launch ``@triton.jit`` functions.
"""

"""Plain-PyTorch reference implementations of every op.

Written for clarity, not speed: they are the oracle for the tests and the fallback where
neither the Triton nor the C++ backend applies.
"""

from .attention import attention
from .decode_attention import decode_attention, rope_decode_attention
from .fused import add_rms_norm, rms_norm, rotary_embedding, silu_mul
from .int8_matmul import (
    dequantize_weight,
    int8_linear,
    int8_linear_a8,
    int8_linear_fused,
    quantize_activations,
)
from .kv_append import kv_append, kv_append_key_blocks, rope_kv_append
from .kv_formats import dequantize_kv, quantize_kv
from .quantize import dequantize_int8, quantize_int8
from .spec_verify import speculative_verify

__all__ = [
    "add_rms_norm",
    "attention",
    "decode_attention",
    "dequantize_kv",
    "dequantize_int8",
    "dequantize_weight",
    "int8_linear",
    "int8_linear_a8",
    "int8_linear_fused",
    "kv_append",
    "kv_append_key_blocks",
    "quantize_activations",
    "quantize_int8",
    "quantize_kv",
    "rms_norm",
    "rope_decode_attention",
    "rope_kv_append",
    "rotary_embedding",
    "silu_mul",
    "speculative_verify",
]

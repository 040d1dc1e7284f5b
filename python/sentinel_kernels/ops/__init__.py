"""The op layer: ``torch.library`` custom ops (``sentinel::<name>``) with fake kernels.

Each op validates its inputs here, once, then runs on the backend chosen by
``SENTINEL_BACKEND`` (see :mod:`sentinel_kernels._backend`): Triton for CUDA tensors,
the C++ extension for CPU tensors, or the plain-PyTorch reference.
"""

from ._dispatch import pdl_scope
from .attention import attention
from .decode_attention import decode_attention, decode_split_scope, rope_decode_attention
from .fused import add_rms_norm, rms_norm, rotary_embedding, silu_mul
from .int8_matmul import int8_linear, int8_linear_a8, int8_linear_fused
from .knn import ivf_scores, knn_topk
from .kv_append import kv_append, kv_append_key_blocks, rope_kv_append
from .quantize import dequantize_int8, quantize_int8
from .spec_verify import greedy_advance, speculative_verify

__all__ = [
    "pdl_scope",
    "add_rms_norm",
    "attention",
    "decode_attention",
    "decode_split_scope",
    "dequantize_int8",
    "greedy_advance",
    "int8_linear",
    "int8_linear_a8",
    "int8_linear_fused",
    "ivf_scores",
    "knn_topk",
    "kv_append",
    "kv_append_key_blocks",
    "quantize_int8",
    "rms_norm",
    "rope_decode_attention",
    "rope_kv_append",
    "rotary_embedding",
    "silu_mul",
    "speculative_verify",
]

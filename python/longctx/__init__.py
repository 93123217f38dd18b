"""longctx: fast long-context attention kernels for NVIDIA Hopper GPUs, as torch custom ops.

Ops are reachable as torch.ops.longctx.* once this package is imported; the functions here are
thin wrappers with FlashAttention-compatible semantics.
"""
__version__ = "0.1.0"

import torch as _torch  # noqa: F401  (loads libtorch before the extension; private name, so
#                                   dir(longctx) lists the API, not torch)

from . import _C  # noqa: F401  (registers torch.ops.longctx.*)
from .attention import flash_attn_func, flash_attn_varlen_func
from .info import build_info
from .kvcache import (PagedKVCache, flash_attn_with_kvcache, fp8_scales_from_data,
                      int8_scales, kv_pool, kvcache_append)
from .ring import ring_flash_attn_func, ring_positions, ring_shard, ring_unshard
from .rope import apply_rope
from .rope_scaling import ROPE_TYPES, RopeFrequencies, rope_frequencies

__all__ = [
    "__version__",
    "build_info",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "kvcache_append",
    "PagedKVCache",
    "fp8_scales_from_data",
    "int8_scales",
    "kv_pool",
    "ring_flash_attn_func",
    "ring_shard",
    "ring_unshard",
    "ring_positions",
    "apply_rope",
    "rope_frequencies",
    "RopeFrequencies",
    "ROPE_TYPES",
]

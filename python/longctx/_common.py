"""Helpers the library modules share (attention, kvcache, ring): argument normalization and NVTX.

Private: the public API is what longctx/__init__.py exports.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch

from . import _C


def resolve_window(window_size, causal: bool) -> Tuple[int, int]:
    """(left, right) from a FlashAttention window_size pair; causal forces right = 0."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        raise ValueError(f"window_size values must be -1 (unbounded) or >= 0, got {window_size!r}")
    if causal and right > 0:
        raise ValueError(f"window_size right = {right} contradicts causal=True (causal means "
                         "window_size right = 0)")
    return left, (0 if causal else right)


def resolve_scale(softmax_scale: Optional[float], q: torch.Tensor) -> float:
    """softmax_scale as a float, 1 / sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range in the "longctx" domain (the domain the C++ launchers use), so an Nsight
    Systems timeline groups benchmark cases, ring steps and kernels together. A no-op in CPU-only
    builds."""
    _C.nvtx_push(name)
    try:
        yield
    finally:
        _C.nvtx_pop()

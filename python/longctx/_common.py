"""Helpers the library modules share (attention, kvcache, rope, ring): argument normalization,
argument checks and NVTX.

Private: the public API is what longctx/__init__.py exports.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterable, Optional, Tuple

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


def resolve_scale(softmax_scale: Optional[float], q, op: str = "flash_attn_func") -> float:
    """softmax_scale as a float, 1 / sqrt(head_dim) when None. A q without a last dimension is
    left to the op's rank check (the value returned then is never used); head_dim 0 is an error
    here, before the division."""
    if softmax_scale is not None:
        return float(softmax_scale)
    if not isinstance(q, torch.Tensor) or q.dim() == 0:
        return 1.0
    if q.shape[-1] == 0:
        raise ValueError(f"longctx.{op}: q must have head_dim >= 1 (its last dimension), got "
                         f"shape {tuple(q.shape)}")
    return 1.0 / math.sqrt(q.shape[-1])


def resolve_softcap(softcap, op: str) -> float:
    """softcap as a float (None: 0.0, no capping); the op checks that it is finite and >= 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"longctx.{op}: softcap must be a number (0 = no capping), got "
                        f"{type(softcap).__name__}")
    return float(softcap)


def resolve_sinks(sinks, op: str) -> Optional[torch.Tensor]:
    """sinks as the fp32 contiguous tensor the ops take (None stays None); a floating tensor of
    another dtype is converted, through autograd, so its gradient reaches the caller's tensor.
    The op checks the shape (heads,) and the device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"longctx.{op}: sinks must be a tensor of shape (heads,) or None, got "
                        f"{type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"longctx.{op}: sinks must be a floating-point tensor, got {sinks.dtype}")
    return sinks.to(torch.float32).contiguous()


def size_or_zero(t, dim: int) -> int:
    """t.shape[dim], or 0 where t has no such dimension (the op's rank check then names t)."""
    return t.shape[dim] if isinstance(t, torch.Tensor) and -t.dim() <= dim < t.dim() else 0


def check_same_device(op: str, tensors: Iterable[Tuple[str, Optional[torch.Tensor]]]) -> None:
    """Every tensor of (name, tensor) pairs (None skipped) is on the device of the first one;
    RuntimeError with the C++ check's message otherwise (csrc/common/checks.cpp).

    The fake (meta) implementations call it: a call mixing meta tensors with real ones is sent
    by the dispatcher to the fake implementation, where the C++ checks never run."""
    ref_name, ref = None, None
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if ref is None:
            ref_name, ref = name, t
        elif t.device != ref.device:
            raise RuntimeError(f"longctx.{op}: {name} must be on the same device as {ref_name} "
                               f"({ref.device}), got {t.device}")


_C_DTYPE_NAMES = {torch.int32: "Int", torch.int64: "Long", torch.int16: "Short",
                  torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
                  torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                  torch.bfloat16: "BFloat16"}


def c_dtype_name(dtype: torch.dtype) -> str:
    """The dtype as the C++ checks print it (c10::ScalarType), so a check mirrored in Python
    reads as its C++ twin."""
    return _C_DTYPE_NAMES.get(dtype, str(dtype))


def check_index_vector(t, op: str, arg: str, shape: str, length: Optional[int],
                       length_error: str) -> None:
    """The structure of an int32 index vector (no values, no sync), with the C++ checks'
    messages: an int32 tensor, contiguous 1-D of the given shape text ("(batch,)"), and, when
    length is not None, that many entries (length_error: what the message says it must have)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"longctx.{op}: {arg} must be an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise RuntimeError(f"longctx.{op}: {arg} must have dtype Int, got "
                           f"{c_dtype_name(t.dtype)}")
    if t.dim() != 1 or not t.is_contiguous():
        raise RuntimeError(f"longctx.{op}: {arg} must be a contiguous 1-D {shape} tensor, got "
                           f"shape {list(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise RuntimeError(f"longctx.{op}: {arg} must have {length_error}, got {t.shape[0]}")


def check_cu_seqlens(cu, op: str, arg: str, batch: Optional[int], ref: torch.Tensor,
                     ref_name: str) -> None:
    """The structure of a cu_seqlens tensor (csrc/kvcache/kvcache_args.cpp check_cu): batch + 1
    entries, on ref's device."""
    check_index_vector(cu, op, arg, "(batch + 1,)", None if batch is None else batch + 1,
                       f"batch + 1 = {None if batch is None else batch + 1} entries "
                       f"(batch = rows of block_table)")
    check_same_device(op, ((ref_name, ref), (arg, cu)))


def check_cu_seqlens_values(values, total_rows: int, max_seqlen: Optional[int], op: str,
                            arg: str) -> None:
    """The values of cu_seqlens (a list of ints), with the C++ check's messages
    (csrc/flash/flash_args.cpp check_cu_seqlens_values): start at 0, non-decreasing, each length
    <= max_seqlen (None: unbounded), end at total_rows."""
    c = values
    if not c or c[0] != 0:
        raise RuntimeError(f"longctx.{op}: {arg} must start at 0, got {c[0] if c else -1}")
    for b in range(len(c) - 1):
        n = c[b + 1] - c[b]
        if n < 0:
            raise RuntimeError(f"longctx.{op}: {arg} must be non-decreasing, got {arg}[{b}] = "
                               f"{c[b]} > {arg}[{b + 1}] = {c[b + 1]}")
        if max_seqlen is not None and n > max_seqlen:
            raise RuntimeError(f"longctx.{op}: {arg} describes sequence {b} of length {n}, "
                               f"longer than its max_seqlen = {max_seqlen}")
    if c[-1] != total_rows:
        raise RuntimeError(f"longctx.{op}: {arg} must end at the number of packed rows "
                           f"({total_rows}), got {c[-1]}")


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

"""Fused rotary position embedding on q and k: `apply_rope`.

The kernels (CPU and CUDA) live in the extension as torch.ops.longctx.apply_rope_ (in place) and
torch.ops.longctx.apply_rope (out of place, differentiable). This module registers their fake
(meta) implementations for torch.compile and the autograd formula of the functional op: the
backward of a rotation is the inverse rotation, scaled by the same attention factor.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.longctx.*)
from ._common import check_same_device

__all__ = ["apply_rope"]

_ops = torch.ops.longctx


@torch.library.register_fake("longctx::apply_rope_")
def _apply_rope_inplace_fake(q, k, positions, inv_freq, attention_factor, interleaved, inverse,
                             max_position):
    check_same_device("apply_rope_", (("q", q), ("k", k), ("positions", positions),
                                      ("inv_freq", inv_freq)))
    return None


@torch.library.register_fake("longctx::apply_rope")
def _apply_rope_fake(q, k, positions, inv_freq, attention_factor, interleaved, inverse,
                     max_position):
    check_same_device("apply_rope", (("q", q), ("k", k), ("positions", positions),
                                     ("inv_freq", inv_freq)))
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _q, _k, positions, inv_freq, attention_factor, interleaved, inverse, _max = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.attention_factor = attention_factor
    ctx.interleaved = interleaved
    ctx.inverse = inverse


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def _backward(ctx, grad_q, grad_k):
    positions, inv_freq = ctx.saved_tensors
    gq, gk = _ops.apply_rope(_last_dim_contiguous(grad_q), _last_dim_contiguous(grad_k), positions,
                             inv_freq, ctx.attention_factor, ctx.interleaved, not ctx.inverse, -1)
    return gq, gk, None, None, None, None, None, None


torch.library.register_autograd("longctx::apply_rope", _backward, setup_context=_setup_context)


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    *,
    interleaved: bool = False,
    inplace: bool = True,
    max_position: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate q and k by their positions (RoPE), in one fused kernel.

    q: (batch, seqlen, heads, head_dim) or packed (tokens, heads, head_dim); k: the same layout
    with its own head count (GQA), or None. bf16, fp16 or fp32, last dimension contiguous.
    positions: int32/int64, (batch, seqlen) or (seqlen,) for the batched layout, (tokens,) for the
    packed one: offsets for chunked prefill and sequence shards are just other positions.
    inv_freq, attention_factor: from `rope_frequencies`; rotary_dim = 2 * len(inv_freq) leading
    channels of each head rotate, the rest are left as they are. Angles are computed in fp32
    with an exact range reduction, accurate at positions past 2^21 (exact up to 2^24).
    interleaved: pairs (2i, 2i+1) (GPT-J style) instead of NeoX's (i, i + rotary_dim/2).
    inplace: rotate q and k in place and return them (when autograd records, the rotation is
    computed out of place and copied back, so gradients flow); otherwise return new tensors.
    max_position: if given (an int >= 0), every position must lie in [0, max_position) (costs a
    device sync); None checks nothing.
    Returns (q_rotated, k_rotated).
    """
    if max_position is None:
        maxp = -1
    else:
        try:
            maxp = operator.index(max_position)
        except TypeError:
            maxp = None
        if maxp is None or isinstance(max_position, bool) or maxp < 0:
            raise ValueError(f"longctx.apply_rope: max_position must be None (no check) or an int "
                             f">= 0, got {max_position!r}")
    k_given = k is not None
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) and (name == "q" or k_given):
            raise TypeError(f"longctx.apply_rope: {name} must be a tensor, got "
                            f"{type(t).__name__}")
    if not k_given:  # an empty k of q's layout (a q of the wrong rank is the op's error)
        k = q.new_empty(q.shape[:-2] + (0, q.shape[-1]) if q.dim() >= 2 else (0, 0, 0))
    factor = float(attention_factor)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and not needs_grad:
        _ops.apply_rope_(q, k, positions, inv_freq, factor, interleaved, False, maxp)
        q_out, k_out = q, k
    else:
        q_out, k_out = _ops.apply_rope(q, k, positions, inv_freq, factor, interleaved, False, maxp)
        if inplace:
            q_out = q.copy_(q_out)
            k_out = k.copy_(k_out) if k_given else k_out
    return q_out, (k_out if k_given else None)

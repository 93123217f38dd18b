"""Flash attention: `flash_attn_func` (batched) and `flash_attn_varlen_func` (packed sequences).

FlashAttention semantics and layouts, so a user can swap: q (batch, seqlen_q, heads, head_dim),
k/v (batch, seqlen_k, heads_kv, head_dim) with heads % heads_kv == 0 (GQA/MQA); varlen packs the
sequences as (total_tokens, heads, head_dim) with int32 cu_seqlens offsets. Causal masking is
aligned to the bottom-right corner (query i sees keys j <= i + seqlen_k - seqlen_q), and
window_size=(left, right) keeps keys in [i + sk - sq - left, i + sk - sq + right] (-1: unbounded).
A query row that sees no key gets out = 0 and lse = -inf (its gradient is 0). Two logit
modifiers models use: softcap (Gemma 2) and attention sinks (gpt-oss); see flash_attn_func.

The kernels live in the extension as torch.ops.longctx.flash_attn_fwd / flash_attn_bwd. This
module registers their fake implementations (torch.compile, opcheck) and the autograd formula of
flash_attn_fwd (backward = flash_attn_bwd).

Gradients:
- lse is returned for use (e.g. merging attention over chunks), but its gradient is ignored: the
  backward only propagates the gradient of out. A loss that depends on lse gets no gradient
  through it (as in FlashAttention).
- deterministic=True asks for bitwise-reproducible gradients (on CUDA the dQ accumulation then
  runs in a fixed order); torch.use_deterministic_algorithms(True) asks for it too. The CPU
  backward is deterministic whatever the flag. The flag is an argument of the forward op (which
  ignores it) so that the op's registered autograd can hand it to the backward; an
  autograd.Function wrapper could carry it too, but Dynamo cannot trace one that receives the
  same tensor twice (flash_attn_func(x, x, x), or cu_seqlens_q is cu_seqlens_k), and
  torch.compile(fullgraph=True) must work for those calls.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.longctx.*)
from ._common import (check_same_device, resolve_scale, resolve_sinks, resolve_softcap,
                      resolve_window, size_or_zero)

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

_ops = torch.ops.longctx


@torch.library.register_fake("longctx::flash_attn_fwd")
def _flash_attn_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale, causal, window_left, window_right, deterministic=False,
                         sinks=None, softcap=0.0):
    check_same_device("flash_attn_fwd", (("q", q), ("k", k), ("v", v),
                                         ("cu_seqlens_q", cu_seqlens_q),
                                         ("cu_seqlens_k", cu_seqlens_k), ("sinks", sinks)))
    out = q.new_empty(q.shape)
    if cu_seqlens_q is None:
        torch._check(q.dim() == 4, lambda: "longctx.flash_attn_fwd: q must have 4 dimensions")
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        torch._check(q.dim() == 3, lambda: "longctx.flash_attn_fwd: q must have 3 dimensions")
        lse_shape = (q.shape[1], q.shape[0])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.register_fake("longctx::flash_attn_bwd")
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, softmax_scale, causal, window_left, window_right,
                         deterministic, sinks=None, softcap=0.0):
    check_same_device("flash_attn_bwd", (("q", q), ("k", k), ("v", v), ("out", out),
                                         ("lse", lse), ("dout", dout),
                                         ("cu_seqlens_q", cu_seqlens_q),
                                         ("cu_seqlens_k", cu_seqlens_k), ("sinks", sinks)))
    dsinks = (sinks.new_empty(sinks.shape) if sinks is not None
              else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, causal, window_left, window_right, deterministic, sinks, softcap):
    if dout is None:
        dout = torch.zeros_like(out)
    # Autograd may hand in an expanded (stride-0) or otherwise strided gradient; the kernels need
    # the last dimension contiguous.
    dout = dout.contiguous()
    return _ops.flash_attn_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale, causal, window_left, window_right,
                               deterministic, sinks, softcap)


# The op's arguments after window_right, with their schema defaults (a call may leave them out).
_FWD_DEFAULTS = (False, None, 0.0)  # deterministic, sinks, softcap


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
     window_left, window_right, *rest) = inputs
    deterministic, sinks, softcap = tuple(rest) + _FWD_DEFAULTS[len(rest):]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right)
    ctx.deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    ctx.softcap = float(softcap)


def _op_backward(ctx, dout, dlse):  # dlse: ignored, see the module docstring
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args,
                                   ctx.deterministic, sinks, ctx.softcap)
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None,
            dsinks if sinks is not None else None, None)


torch.library.register_autograd("longctx::flash_attn_fwd", _op_backward,
                                setup_context=_setup_context)


# --- the public API -----------------------------------------------------------------------------

def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             causal, window_size, return_lse, deterministic, softcap, sinks, op):
    left, right = resolve_window(window_size, causal)
    out, lse = _ops.flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, resolve_scale(softmax_scale, q, op),
                                   bool(causal), left, right, bool(deterministic),
                                   resolve_sinks(sinks, op), resolve_softcap(softcap, op))
    return (out, lse) if return_lse else out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    deterministic: bool = False,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """softmax(softmax_scale * q k^T + mask) v, per head, without materializing the scores.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), heads a
    multiple of heads_kv (GQA/MQA: query head h reads kv head h // (heads / heads_kv)).
    CUDA: bf16/fp16, head_dim a multiple of 8 up to 256 (64/128/256 have their own kernels, the
    others run the next one up, forward and backward); CPU: also fp32/float64, any
    head_dim in [1, 256]. The last dimension must be contiguous. softmax_scale defaults to
    1/sqrt(head_dim).

    causal: query i sees key j only if j <= i + seqlen_k - seqlen_q, i.e. the mask is aligned to
    the bottom-right corner: with seqlen_k > seqlen_q the queries are the last seqlen_q positions
    of the keys' sequence (a chunk attending to [cache; chunk]); with seqlen_k < seqlen_q the
    first seqlen_q - seqlen_k rows see no key. causal=True is window_size right = 0.
    window_size: (left, right), each -1 (unbounded) or >= 0: query i sees keys j with
    i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (sliding-window
    attention: (4096, 0) with causal=True sees the current key and the 4096 before it).
    A query row that sees no key gets out = 0 and lse = -inf; a NaN in q, k or v gives NaN in
    the rows it reaches.
    deterministic: the backward's gradients are bitwise reproducible run to run (on CUDA dQ is
    then accumulated in a fixed order: on an H200 1.0-1.1x the default's time at head dim
    128, 1.1-1.6x at 64, 1.2-1.4x at 256); torch.use_deterministic_algorithms(True) asks for
    it too.
    The forward is deterministic either way, and so is the CPU backward.
    softcap: > 0 caps the scores as softcap * tanh(softmax_scale * q.k / softcap) before the mask
    and the softmax (Gemma 2's attention logit softcapping); 0 (default) leaves them.
    sinks: (heads,) float tensor, one logit per query head that joins the softmax denominator
    as a key with a zero value (gpt-oss's learnable sinks): out_i = sum_j exp(s_ij - L_i) v_j with
    L_i = log(exp(sinks[h]) + sum_j exp(s_ij)), in the units of the scaled (and capped) scores;
    computed in fp32; its gradient flows when it requires grad. A row that sees no key then
    gets out = 0 and lse = sinks[h]. Both modifiers run forward and backward on CPU and CUDA.

    Returns out (q's shape and dtype), or (out, lse) with return_lse, lse (batch, heads,
    seqlen_q) fp32 = logsumexp_j(s_ij), the sink included (-inf for rows that see no key). The
    gradient of lse is ignored (as in FlashAttention).
    """
    return _forward(q, k, v, None, None, size_or_zero(q, 1), size_or_zero(k, 1), softmax_scale,
                    causal, window_size, return_lse, deterministic, softcap, sinks,
                    "flash_attn_func")


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    deterministic: bool = False,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over packed sequences of different lengths.

    q: (total_q, heads, head_dim); k, v: (total_k, heads_kv, head_dim). cu_seqlens_q/_k: int32,
    (batch + 1,), offsets of each sequence's first row, starting at 0 and ending at total_q /
    total_k (a zero-length sequence is allowed). max_seqlen_q/_k bound every sequence length.
    The CPU op checks these values; the CUDA op does not read them on the host (no sync per call,
    as in FlashAttention), so on CUDA they must hold: values that break them are not detected.
    The mask applies within each sequence, bottom-right aligned per sequence; the other
    arguments are flash_attn_func's.
    Returns out, or (out, lse) with lse (heads, total_q) fp32.
    """
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                    softmax_scale, causal, window_size, return_lse, deterministic, softcap, sinks,
                    "flash_attn_varlen_func")

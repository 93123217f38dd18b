"""longctx.ring_flash_attn_func: attention over one sequence sharded across the ranks of a group.

Registered with autograd as a torch.autograd.Function (backward = ring_attn.ring_backward).
torch.compile is not supported for ring attention: the exchanges are eager torch.distributed
calls; compile the model around it (Dynamo graph-breaks at the call).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._common import resolve_scale, resolve_window
from .check import check_across_ranks
from .comm import make_comm
from .ring_attn import ring_backward, ring_forward


class _RingFlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, layout, causal, window, scale, deterministic):
        out, lse = ring_forward(q, k, v, comm, layout, causal, window, scale, deterministic)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (comm, layout, causal, window, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # dlse ignored, as in flash_attn_func
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    layout: str = "zigzag",
    *,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Flash attention over a sequence whose shards live on the ranks of `group`.

    Each rank passes its shard of q (batch, local_seqlen, heads, head_dim) and of k, v (batch,
    local_seqlen, heads_kv, head_dim), cut from the full sequence by `layout` ("zigzag": chunks
    r and 2N-1-r of 2N, balanced under a causal mask; "contiguous": chunk r of N); use
    ring_shard / ring_unshard / ring_positions (RoPE positions) for the layout. The result is this
    rank's shard of flash_attn_func(full q, full k, full v, causal, window_size) (and of its
    lse, (batch, heads, local_seqlen) fp32, with return_lse), with masks defined on the global
    positions; gradients flow to q, k, v of every rank. Every rank must call it with the same
    shapes and options (checked: a mismatch raises the same ValueError on every rank).

    group: a torch.distributed process group (None: the default group); gloo on CPU, NCCL on GPUs.
    A failure on one rank makes the others raise RingTimeoutError after the group's timeout, so
    create the group with a timeout that fits (init_process_group(timeout=...)); the backward
    must run on every rank too.
    Not supported: torch.compile tracing through this function (it graph-breaks).
    """
    left, right = resolve_window(window_size, causal)
    scale = resolve_scale(softmax_scale, q, "ring_flash_attn_func")
    comm = make_comm(group, q.device if isinstance(q, torch.Tensor) else None)
    check_across_ranks(comm, group, q, k, v, layout, causal, (left, right), scale)
    out, lse = _RingFlashAttn.apply(q, k, v, comm, layout, bool(causal), (left, right), scale,
                                    bool(deterministic) or
                                    torch.are_deterministic_algorithms_enabled())
    return (out, lse) if return_lse else out

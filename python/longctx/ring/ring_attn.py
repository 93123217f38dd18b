"""The ring loops: forward and backward of attention over a sequence sharded across N ranks.

Forward (N steps). At step i rank r holds the K/V shard of src = (r - i) mod N. It first posts
the exchange that passes this shard on to rank r+1 and receives the next one from rank r-1 into
a spare buffer (two receive buffers alternate; the input K/V is only ever sent), then computes
the blocks plan_step gives for (r, src) with torch.ops.longctx.flash_attn_fwd and merges each
partial (out, lse) into fp32 accumulators (merge.py), then waits for the exchange. The exchange
of step i+1's K/V is thus in flight while step i computes.

Backward (N steps). The same K/V rotation; each step recomputes its blocks with
flash_attn_bwd given the *global* out and lse of the query rows (the op computes
D = rowsum(dout * out) from the out it is given and P = exp(S - lse), so the block's dq, dk, dv are
exact partial gradients). dq accumulates locally. dK/dV for the shard of src accumulate in a
buffer that travels the ring behind the K/V: at step i the rank adds its contribution to the
accumulator it received from rank r-1 (which added its own at step i-1 for the same src) and
passes it on; after the last step one more hop brings every accumulator home to its owner.
Accumulators (dq, dk, dv, out) are fp32, float64 for float64 inputs; dK/dV travel in that dtype.

NVTX ranges "ring step {i} compute", "ring step {i} exchange" (posting) and
"ring step {i} wait" show the overlap on a GPU timeline (no-ops on CPU builds).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from .._common import nvtx_range
from .merge import acc_dtype, merge_
from .plan import plan_step

_ops = torch.ops.longctx


@functools.lru_cache(maxsize=4096)
def _plan(rank, src, world_size, local_seqlen, layout, causal, window):
    return tuple(plan_step(rank, src, world_size, local_seqlen, layout, causal, window))


def _spare_kv(kv, n: int):
    """The receive buffers of the K/V rotation: two, alternating (one is received into while the
    other is computed with); one for 2 ranks, none for 1. The input K/V is only ever sent."""
    return [tuple(torch.empty_like(t) for t in kv) for _ in range(2 if n > 2 else n - 1)]


def _post_kv_exchange(comm, kv, spare, step: int):
    """Posts the exchange that passes this step's K/V to rank r+1 and receives the next step's
    from rank r-1 into a spare buffer: (handle, buffer), or (None, None) at the last step."""
    if step + 1 >= comm.world_size:
        return None, None
    nxt = spare[step % len(spare)]
    with nvtx_range(f"ring step {step} exchange"):
        return comm.send_recv_kv(list(kv), list(nxt), channel=0), nxt


def ring_forward(q, k, v, comm, layout: str, causal: bool, window: Tuple[int, int],
                 scale: float, deterministic: bool = False):
    """out (q's dtype) and lse (fp32, (batch, heads, local seqlen)) of this rank's queries."""
    n, rank = comm.world_size, comm.rank
    b, s, h, d = q.shape
    adt = acc_dtype(q.dtype)
    out_acc = torch.zeros(b, s, h, v.shape[-1], dtype=adt, device=q.device)
    lse_acc = torch.full((b, h, s), float("-inf"), dtype=adt, device=q.device)
    kv = (k.contiguous(), v.contiguous())
    spare = _spare_kv(kv, n)
    last = None
    merged = []  # row ranges that hold a partial result already
    for step in range(n):
        handle, nxt = _post_kv_exchange(comm, kv, spare, step)
        src = (rank - step) % n
        with nvtx_range(f"ring step {step} compute"):
            for blk in _plan(rank, src, n, s, layout, causal, window):
                ks, vs = kv[0][:, blk.k0:blk.k1], kv[1][:, blk.k0:blk.k1]
                qs = q[:, blk.q0:blk.q1]
                o, lse = _ops.flash_attn_fwd(qs, ks, vs, None, None, qs.shape[1], ks.shape[1],
                                             scale, blk.causal, blk.window_left,
                                             blk.window_right, deterministic)
                first = not any(a < blk.q1 and blk.q0 < b for a, b in merged)
                merge_(out_acc[:, blk.q0:blk.q1], lse_acc[:, :, blk.q0:blk.q1], o, lse, first)
                merged.append((blk.q0, blk.q1))
        if handle is not None:
            with nvtx_range(f"ring step {step} wait"):
                handle.wait()
            kv, last = nxt, handle
    if last is not None:
        comm.finish(last)  # host check that the exchanges completed (raises instead of hanging)
    return out_acc.to(q.dtype), lse_acc.to(torch.float32)


def ring_backward(dout, q, k, v, out, lse, comm, layout: str, causal: bool,
                  window: Tuple[int, int], scale: float, deterministic: bool = False):
    """dq, dk, dv for this rank's shards (dk/dv summed over every rank's queries)."""
    n, rank = comm.world_size, comm.rank
    s = q.shape[1]
    adt = acc_dtype(q.dtype)
    dout = dout.contiguous()
    dq = torch.zeros(q.shape, dtype=adt, device=q.device)
    kv = (k.contiguous(), v.contiguous())
    spare = _spare_kv(kv, n)
    # dK/dV: the accumulator this rank adds to and sends (two, alternating: one may be in
    # flight) and the one received from rank r-1 (two, alternating).
    dkv_acc = [(torch.empty(k.shape, dtype=adt, device=k.device),
                torch.empty(v.shape, dtype=adt, device=v.device)) for _ in range(min(n, 2))]
    dkv_in = [tuple(torch.empty_like(t) for t in dkv_acc[0]) for _ in range(min(n, 2))]
    dkv_handle, received = None, None
    for step in range(n):
        kv_handle, nxt = _post_kv_exchange(comm, kv, spare, step)
        src = (rank - step) % n
        dk, dv = dkv_acc[step % len(dkv_acc)]
        dk.zero_()
        dv.zero_()
        with nvtx_range(f"ring step {step} compute"):
            for blk in _plan(rank, src, n, s, layout, causal, window):
                q0, q1, k0, k1 = blk.q0, blk.q1, blk.k0, blk.k1
                qs, ks, vs = q[:, q0:q1], kv[0][:, k0:k1], kv[1][:, k0:k1]
                dq_b, dk_b, dv_b, _ = _ops.flash_attn_bwd(
                    dout[:, q0:q1], qs, ks, vs, out[:, q0:q1], lse[:, :, q0:q1], None, None,
                    qs.shape[1], ks.shape[1], scale, blk.causal, blk.window_left,
                    blk.window_right, deterministic)
                dq[:, q0:q1] += dq_b
                dk[:, k0:k1] += dk_b
                dv[:, k0:k1] += dv_b
        if n > 1:
            if dkv_handle is not None:
                with nvtx_range(f"ring step {step} wait dkv"):
                    dkv_handle.wait()
                dk += received[0]
                dv += received[1]
            received = dkv_in[step % len(dkv_in)]
            with nvtx_range(f"ring step {step} exchange dkv"):
                dkv_handle = comm.send_recv_kv([dk, dv], list(received), channel=1)
        if kv_handle is not None:
            with nvtx_range(f"ring step {step} wait"):
                kv_handle.wait()
            kv = nxt
    if n > 1:
        with nvtx_range("ring dkv home"):
            dkv_handle.wait()
        comm.finish(dkv_handle)  # the last exchange posted: every earlier one has completed too
        dk, dv = received
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

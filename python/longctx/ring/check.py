"""Argument checks for ring attention that fail on every rank together, never hang one.

Each rank first checks its own arguments without raising, then all ranks all-gather a small
int64 descriptor (shapes, dtype, layout, mask, scale, and whether the local check failed) before
the first exchange. If any rank's check failed or the descriptors differ, every rank gathers the
messages (all_gather_object) and raises the same ValueError naming the ranks and fields. A rank
that never reaches the check (it failed earlier) makes the others raise RingTimeoutError after
the process group's timeout.

Cost: one all-gather of 20 int64 per call, on the inputs' device; on GPUs reading it back is a
host sync (moving the check to the host, e.g. over the group's store, is left for the NCCL
communicator).
"""
from __future__ import annotations

import struct
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .layout import LAYOUTS, num_chunks

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def local_error(q, k, v, layout: str, world_size: int) -> Optional[str]:
    """What is wrong with this rank's own arguments (None: nothing)."""
    if layout not in LAYOUTS:
        return f"layout must be one of {LAYOUTS}, got {layout!r}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return (f"{name} must be a 4-d tensor (batch, local_seqlen, heads, head_dim), got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape[:3] != v.shape[:3]:
        return (f"k and v must agree on (batch, seqlen, heads_kv), got {tuple(k.shape)}, "
                f"{tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        return f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}"
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        return (f"q and k must have the same batch and local sequence length (each rank holds "
                f"its shard of q, k and v), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        return f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})"
    per_rank = num_chunks(world_size, layout) // world_size
    if q.shape[1] % per_rank != 0:
        return (f"layout={layout!r}: the local sequence length must be divisible by {per_rank} "
                f"(the full length by {num_chunks(world_size, layout)}), got {q.shape[1]}")
    return None


def _descriptor(q, k, v, layout, causal, window, scale, err) -> torch.Tensor:
    def shape(t):
        return list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [-1] * 4
    dev = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    scale_bits = struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    vals = ([1 if err else 0] + shape(q) + shape(k) + shape(v)
            + [_DTYPES.index(q.dtype) if getattr(q, "dtype", None) in _DTYPES else -1,
               LAYOUTS.index(layout) if layout in LAYOUTS else -1, int(bool(causal)),
               int(window[0]), int(window[1]), scale_bits, 1 if dev.type == "cuda" else 0])
    return torch.tensor(vals, dtype=torch.int64, device=dev)


# the descriptor's fields: (name, slice of the int64 descriptor)
_SPANS: List[Tuple[str, slice]] = [
    ("local check", slice(0, 1)), ("q shape", slice(1, 5)), ("k shape", slice(5, 9)),
    ("v shape", slice(9, 13)), ("dtype", slice(13, 14)), ("layout", slice(14, 15)),
    ("causal", slice(15, 16)), ("window_size", slice(16, 18)),
    ("softmax_scale", slice(18, 19)), ("device type", slice(19, 20))]


def check_across_ranks(comm, group, q, k, v, layout, causal, window, scale) -> None:
    """Raises the same ValueError on every rank when any rank's arguments are wrong or differ."""
    err = local_error(q, k, v, layout, comm.world_size)
    desc = _descriptor(q, k, v, layout, causal, window, scale, err)
    if comm.world_size == 1:
        if err:
            raise ValueError(f"longctx.ring_flash_attn_func: {err}")
        return
    table = comm.all_gather(desc).cpu()
    bad_ranks = [r for r in range(comm.world_size) if table[r, 0] != 0]
    differing = [name for name, sl in _SPANS
                 if name != "local check" and not bool((table[:, sl] == table[0, sl]).all())]
    if not bad_ranks and not differing:
        return
    # Something is wrong somewhere: every rank takes part in gathering the details.
    mine = err or ""
    if differing and not err:
        mine = "; ".join(f"{name} {_show(name, desc, sl)}" for name, sl in _SPANS
                         if name in differing)
    msgs: List[Optional[str]] = [None] * comm.world_size
    dist.all_gather_object(msgs, mine, group=group)
    lines = [f"rank {r}: {msgs[r]}" for r in range(comm.world_size) if msgs[r]]
    head = ("longctx.ring_flash_attn_func: "
            + (f"rank(s) {bad_ranks} rejected their arguments" if bad_ranks else
               f"the ranks disagree on {', '.join(differing)}; every rank must pass its shard "
               "of the same full-sequence q, k, v (same shapes) with the same options"))
    raise ValueError(head + " (raised on every rank):\n  " + "\n  ".join(lines))


def _show(name: str, desc: torch.Tensor, sl: slice) -> str:
    vals = desc[sl].tolist()
    if name == "dtype":
        return str(_DTYPES[vals[0]]) if vals[0] >= 0 else "?"
    if name == "layout":
        return repr(LAYOUTS[vals[0]]) if vals[0] >= 0 else "?"
    if name == "softmax_scale":
        return repr(struct.unpack("<d", struct.pack("<q", vals[0]))[0])
    if name == "device type":
        return "cuda" if vals[0] else "cpu"
    return str(tuple(vals)) if len(vals) > 1 else str(vals[0])

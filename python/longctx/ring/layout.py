"""How one sequence is split across the N ranks of a ring, and the helpers that go with it.

Tensors are batch-first, (batch, seqlen, ...) with the sequence on dim 1 (pass dim=2 for an lse
of shape (batch, heads, seqlen)). Two layouts:

- "contiguous": rank r holds tokens [r*S/N, (r+1)*S/N). S must be divisible by N. Under a causal
  mask rank N-1 does N times the work of rank 0.
- "zigzag": the sequence is cut into 2N chunks of S/(2N) tokens and rank r holds chunks r and
  2N-1-r, concatenated in that order. S must be divisible by 2N. Under a causal mask every rank
  does the same work.

A rank's local tokens are described as segments (local_start, global_start, length): the plan
(plan.py) needs the global position of every local row to build each block's mask, and
ring_positions gives those positions to RoPE.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch

LAYOUTS = ("contiguous", "zigzag")


class Segment(NamedTuple):
    """A run of a rank's local tokens that is contiguous in the global sequence."""
    local_start: int
    global_start: int
    length: int


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the full sequence is cut into."""
    return world_size * (2 if check_layout(layout) == "zigzag" else 1)


def check_seqlen(seqlen: int, world_size: int, layout: str) -> int:
    """Returns the chunk length; raises ValueError when seqlen does not split evenly."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = num_chunks(world_size, layout)
    if seqlen % n != 0:
        what = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(f"layout={layout!r} needs the sequence length to be divisible by {what} "
                         f"= {n}, got seqlen {seqlen} (world_size {world_size})")
    return seqlen // n


def chunk_ids(rank: int, world_size: int, layout: str) -> List[int]:
    """The global chunk indices rank holds, in local order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if check_layout(layout) == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    return [rank]


def local_segments(rank: int, world_size: int, local_seqlen: int, layout: str) -> List[Segment]:
    """rank's local tokens as segments, given the local (per-rank) sequence length."""
    ids = chunk_ids(rank, world_size, layout)
    if local_seqlen % len(ids) != 0:
        raise ValueError(f"layout={layout!r}: the local sequence length must be divisible by "
                         f"{len(ids)}, got {local_seqlen}")
    c = local_seqlen // len(ids)
    return [Segment(i * c, cid * c, c) for i, cid in enumerate(ids)]


def _check_dim(op: str, x, dim, arg: str = "x") -> None:
    """x is a tensor with a dimension dim (the sequence's): TypeError / ValueError naming it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"longctx.{op}: {arg} must be a tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"longctx.{op}: dim must be an int in [{-x.dim()}, {x.dim()}) (the "
                         f"sequence dimension of {arg}, of shape {tuple(x.shape)}), got {dim!r}")


def ring_shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag",
               dim: int = 1) -> torch.Tensor:
    """rank's shard of a full-sequence tensor (a view for "contiguous", a copy for "zigzag")."""
    _check_dim("ring_shard", x, dim)
    c = check_seqlen(x.shape[dim], world_size, layout)
    parts = [x.narrow(dim, cid * c, c) for cid in chunk_ids(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def ring_unshard(shards: Sequence[torch.Tensor], layout: str = "zigzag",
                 dim: int = 1) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard (shards[r] from rank r)."""
    n = len(shards)
    if n == 0:
        raise ValueError("ring_unshard needs at least one shard")
    per_rank = len(chunk_ids(0, n, layout))
    for r, x in enumerate(shards):
        _check_dim("ring_unshard", x, dim, f"shards[{r}]")
    local = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError("ring_unshard: every shard must have the same shape, got "
                         f"{[tuple(s.shape) for s in shards]}")
    if local % per_rank != 0:
        raise ValueError(f"layout={layout!r}: the shard length must be divisible by {per_rank}, "
                         f"got {local}")
    c = local // per_rank
    chunks = [None] * (n * per_rank)
    for r, s in enumerate(shards):
        for i, cid in enumerate(chunk_ids(r, n, layout)):
            chunks[cid] = s.narrow(dim, i * c, c)
    return torch.cat(chunks, dim=dim)


def ring_positions(seqlen: int, rank: int, world_size: int, layout: str = "zigzag",
                   device=None) -> torch.Tensor:
    """int64 global positions of rank's local tokens (for RoPE), for a full sequence of seqlen."""
    c = check_seqlen(seqlen, world_size, layout)
    ids = chunk_ids(rank, world_size, layout)
    return torch.cat([torch.arange(cid * c, (cid + 1) * c, device=device, dtype=torch.int64)
                      for cid in ids])


def ring_gather(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """All-gathers every rank's shard over `group` and unshards: the full-sequence tensor."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return ring_unshard(parts, layout, dim)

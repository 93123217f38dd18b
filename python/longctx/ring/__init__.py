"""Ring attention: one sequence sharded across the ranks of a process group.

- api.py        ring_flash_attn_func, registered with autograd
- layout.py     "contiguous" and "zigzag" shards: ring_shard, ring_unshard, ring_positions
- plan.py       which blocks a rank computes at each step, with which op mask
- comm.py       the ring exchange: torch.distributed P2P, or longctx's NCCL communicator (C++)
- merge.py      fp32 log-sum-exp merge of partial results
- ring_attn.py  the forward and backward loops
- check.py      argument checks that fail on every rank at once
"""
from .api import ring_flash_attn_func
from .comm import RingTimeoutError
from .layout import ring_gather, ring_positions, ring_shard, ring_unshard

__all__ = ["ring_flash_attn_func", "ring_shard", "ring_unshard", "ring_positions",
           "ring_gather", "RingTimeoutError"]

"""Merging partial attention results by their log-sum-exp.

Attention of a query over keys K1 u K2, from the attention over each part:
    lse = log(exp(lse1) + exp(lse2)),   out = exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2.
The accumulator is fp32 (float64 for float64 inputs); partial lse come from the ops in fp32.
A row that has seen no key yet has lse = -inf and out = 0; merging two such rows keeps
lse = -inf and out = 0 (no NaN from -inf - -inf).

Shapes follow the ops: out (batch, seqlen, heads, head_dim), lse (batch, heads, seqlen).
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float64 stays float64, the rest fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor,
           lse: torch.Tensor, first: bool = False) -> None:
    """Merges (out, lse) into the accumulators (out_acc, lse_acc) in place.

    out_acc/lse_acc may be views (a slice of rows of the full accumulators); out/lse any float
    dtype, converted to the accumulator's. first=True: these rows hold nothing yet (lse -inf,
    out 0), so the merge is a copy (one pass over out instead of four).
    """
    if first:
        out_acc.copy_(out)
        lse_acc.copy_(lse)
        return
    lse = lse.to(lse_acc.dtype)
    m = torch.maximum(lse_acc, lse)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both -inf: weights exp(-inf) = 0
    w_acc = torch.exp(lse_acc - m)
    w_new = torch.exp(lse - m)
    total = w_acc + w_new
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    # (b, h, s) -> (b, s, h, 1), to scale out's rows
    a = (w_acc * inv).transpose(1, 2).unsqueeze(-1).to(out_acc.dtype)
    b = (w_new * inv).transpose(1, 2).unsqueeze(-1).to(out_acc.dtype)
    out_acc.mul_(a).addcmul_(out, b)  # out's dtype is promoted inside the kernel
    lse_acc.copy_(m + torch.log(total))  # log(0) = -inf for rows that saw nothing

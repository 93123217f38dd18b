"""attn_implementation "rounded_ref": attention in float64 rounded to the input dtype where
a flash kernel rounds for its tensor cores, the error scale of a bf16 flash backward in the GPU
training test (test_transformers_gpu.py).

Rounded, as in FlashAttention-2/3 and longctx: P before P V; out; P before dV = P^T dout; dS
before dQ = dS K and dK = dS^T Q; lse to fp32; D = rowsum(dout * out) from the rounded out.
Everything else is float64. Eager rounds other values (its softmax output and the gradient
entering its softmax backward), so its error is not a flash kernel's: on gpt-oss's k_proj
gradients (sinks, head dim 64, a sum over tokens with cancellation) this reference's relative
error is 2.2x eager bf16's, the CUDA kernel's 2.3x.

Takes what the training test runs: batched inputs without a padding mask; causal or not, sliding
windows, GQA, softcap, sinks.
"""
import math

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import flash_attention_mask

from attention_reference import visible_mask
from longctx.integrations.transformers import window_size_for

NAME = "rounded_ref"  # no "flash" in it: transformers takes such names for its flash kernels


def _scores(q, k, scale, causal, window, softcap):
    """(S before the cap, S after the cap and the mask), (batch, heads, sq, sk) in float64."""
    s0 = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = softcap * torch.tanh(s0 / softcap) if softcap else s0
    keep = visible_mask(q.shape[1], k.shape[1], causal, window, q.device)
    return s0, s.masked_fill(~keep, float("-inf"))


class _Rounded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, causal, window, softcap):
        dtype, group = q.dtype, q.shape[2] // k.shape[2]
        rnd = lambda t: t.to(dtype).double()  # noqa: E731
        q64 = q.double()
        k64, v64 = (t.double().repeat_interleave(group, 2) for t in (k, v))
        s0, s = _scores(q64, k64, scale, causal, window, softcap)
        sink = (sinks.double().view(1, -1, 1) if sinks is not None
                else torch.full_like(s[..., 0], float("-inf")))
        m = torch.maximum(s.amax(-1), sink)
        p = torch.exp(s - m[..., None])
        denom = p.sum(-1) + torch.exp(sink - m)
        out = torch.einsum("bhqk,bkhd->bqhd", rnd(p), v64) / denom.transpose(1, 2)[..., None]
        lse = (m + torch.log(denom)).float().double()
        ctx.save_for_backward(q, k, v, sinks, out.to(dtype), lse, s0, s)
        ctx.args = (scale, softcap, group)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse, s0, s = ctx.saved_tensors
        scale, softcap, group = ctx.args
        rnd = lambda t: t.to(q.dtype).double()  # noqa: E731
        k64, v64 = (t.double().repeat_interleave(group, 2) for t in (k, v))
        do = dout.double()
        p = torch.exp(s - lse[..., None])
        d = (do * out.double()).sum(-1).transpose(1, 2)  # (batch, heads, sq)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, v64) - d[..., None])
        if softcap:
            ds = ds * (1 - torch.tanh(s0 / softcap) ** 2)
        ds = rnd(ds)
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k64) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.double()) * scale
        dv = torch.einsum("bhqk,bqhd->bkhd", rnd(p), do)
        fold = lambda t: t.unflatten(2, (-1, group)).sum(3)  # noqa: E731  (GQA: sum the group)
        dsinks = None
        if sinks is not None:
            dsinks = -(torch.exp(sinks.double().view(1, -1, 1) - lse) * d).sum((0, 2))
            dsinks = dsinks.to(sinks.dtype)
        return (dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype), dsinks,
                None, None, None, None)


def rounded_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function contract, (batch, heads, seq, dim) in and
    ((batch, seq, heads, dim), None) out."""
    if attention_mask is not None or (dropout and module.training):
        raise NotImplementedError(f"{NAME}: no padding masks or dropout")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    out = _Rounded.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         s_aux, scale, causal, window_size_for(sliding_window, causal),
                         float(softcap or 0.0))
    return out, None


AttentionInterface.register(NAME, rounded_attention)
AttentionMaskInterface.register(NAME, flash_attention_mask)

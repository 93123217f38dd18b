"""Reference attention in plain torch, materializing the scores (small shapes only).

Same semantics as longctx.flash_attn_func / flash_attn_varlen_func: bottom-right aligned causal
and sliding-window masks, GQA by repeating each kv head over its group of query heads, rows that
see no key give out = 0 and lse = -inf (with sinks: lse = the sink), softcap and sinks.

Two precisions (`upcast`):
- upcast=True: everything in float64 (the ground truth the tests measure errors against).
- upcast=False: "the same computation done by PyTorch at the input precision": the products
  q k^T and P v run in the input dtype (torch's CPU matmul accumulates in fp32 and rounds the
  result to the dtype), scaling, mask, softmax and lse run in fp32 (float64 for float64 inputs),
  and P is rounded to the input dtype before P v. This is FlashAttention-3's attention_ref with
  upcast=False; its error against the float64 truth sets the tolerance of the tests
  (assert_fa3_close).
Both are differentiable (autograd gives the reference gradients).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def visible_mask(sq: int, sk: int, causal: bool, window_size=(-1, -1),
                 device=None) -> torch.Tensor:
    """(sq, sk) bool: query row i sees key j (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    shift = sk - sq
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i + shift - left
    if right >= 0:
        vis &= j <= i + shift + right
    return vis


def attend_one(q, k, v, scale, causal, window_size=(-1, -1), upcast=True, softcap=0.0,
               sinks=None):
    """q (sq, h, d), k/v (sk, hk, d) -> out (sq, h, d), lse (h, sq). softcap > 0 caps the scaled
    scores as softcap * tanh(s / softcap); sinks (h,) join the softmax denominator (a key with a
    zero value): longctx/logit_mods.h."""
    sq, h, _ = q.shape
    sk, hk, _ = k.shape
    dtype = q.dtype
    soft_dtype = torch.float64 if (upcast or dtype == torch.float64) else torch.float32
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(h // hk, dim=1)
    v = v.repeat_interleave(h // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k).to(soft_dtype) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    vis = visible_mask(sq, sk, causal, window_size, device=q.device)
    if sinks is not None:
        scores = scores.masked_fill(~vis, -math.inf)
        sink = sinks.to(soft_dtype).view(h, 1, 1).expand(h, sq, 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
        p = torch.exp(scores - lse[..., None])  # masked keys: exp(-inf) = 0
        return torch.einsum("hqk,khd->qhd", p.to(v.dtype), v), lse
    empty = ~vis.any(dim=-1)  # rows that see no key
    scores = scores.masked_fill(~vis, -math.inf).masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1).masked_fill(~vis, 0.0)
    out = torch.einsum("hqk,khd->qhd", p.to(v.dtype), v)
    lse = lse.masked_fill(empty, -math.inf)
    return out, lse


def attention_ref(q, k, v, softmax_scale: Optional[float] = None, causal: bool = False,
                  window_size=(-1, -1), upcast: bool = True, softcap: float = 0.0,
                  sinks=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched: q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, d), lse (b, h, sq)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, l = attend_one(q[b], k[b], v[b], scale, causal, window_size, upcast, softcap, sinks)
        outs.append(o)
        lses.append(l)
    return torch.stack(outs), torch.stack(lses)


def attention_varlen_ref(q, k, v, cu_seqlens_q: Sequence[int], cu_seqlens_k: Sequence[int],
                         softmax_scale: Optional[float] = None, causal: bool = False,
                         window_size=(-1, -1), upcast: bool = True, softcap: float = 0.0,
                         sinks=None):
    """Varlen: q (total_q, h, d), k/v (total_k, hk, d) -> out (total_q, h, d), lse (h, total_q)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    cq = [int(x) for x in cu_seqlens_q]
    ck = [int(x) for x in cu_seqlens_k]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, l = attend_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], scale,
                           causal, window_size, upcast, softcap, sinks)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def _atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """2 * max|fl(X_f64 + 0.3) - 0.3 - X_f64| + 1e-6, fl = rounding to dtype: twice the dtype's
    rounding error at the magnitude of the values (FA3's fwd_atol), plus a floor of 1e-6."""
    if ref64.numel() == 0:
        return 1e-6
    r = ref64.masked_fill(~torch.isfinite(ref64), 0.0)
    return 2 * ((r + 0.3).to(dtype).double() - 0.3 - r).abs().max().item() + 1e-6


def assert_fa3_close(name, ours, ref64, pt, dtype):
    """FlashAttention-3's rule: max|ours - ref64| <= 2 * max|pt - ref64| + atol, with ref64 the
    float64 reference (upcast=True) and pt the same reference at the input precision
    (upcast=False). -inf must appear exactly where ref64 has it; the rest is compared on the
    finite entries."""
    ours, pt = ours.double(), pt.double()
    assert ours.shape == ref64.shape, f"{name}: shape {ours.shape} vs {ref64.shape}"
    inf_ref = torch.isinf(ref64)
    if inf_ref.any() or torch.isinf(ours).any():
        assert torch.equal(torch.isinf(ours), inf_ref), f"{name}: -inf pattern differs"
        assert (ours[inf_ref] < 0).all()
        keep = ~inf_ref
        ours, ref64, pt = ours[keep], ref64[keep], pt[keep]
    if ref64.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref64).abs().max().item()
    err_pt = (pt - ref64).abs().max().item()
    atol = _atol(ref64, dtype)
    assert err <= 2 * err_pt + atol, (
        f"{name}: error {err:.3e} > 2 * pytorch-{dtype} error {err_pt:.3e} + atol {atol:.3e}")

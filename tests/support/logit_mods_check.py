"""The accuracy checks of the logit modifiers (softcap, sinks) shared by the CPU and GPU tests
(tests/flash/test_logit_mods_*.py): outputs and gradients, dsinks included, against the float64
reference under FlashAttention-3's rule (attention_reference.assert_fa3_close)."""
import math
import zlib

import torch

import longctx
from attention_reference import assert_fa3_close, attention_ref

FP32 = torch.float32

# (name, softcap, with sinks): the modifier settings both test files run
MODS = [("softcap", 2.5, False), ("sinks", 0.0, True), ("both", 4.0, True)]


def seed(*key):
    """A fixed seed per test case (its parameters), independent of the run order."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def make_sinks(h, device="cpu"):
    """Sinks a softmax of scores ~N(0, 1) notices, exact fp32 values (the ops compute in fp32)."""
    return (torch.randn(h, device=device) * 2 + 0.5).to(FP32)


def assert_grads_close(names, ours, g64, gpt, dtype, lse64, out64, dout, sinks64):
    """assert_fa3_close for each gradient; dsinks gets one more term in its atol. It sums
    exp(sinks - lse_i) * D_i over every row of a head, and lse is fp32 (as in every flash
    kernel): each term carries lse's rounding (a few ulp of |lse|) as a relative error, which the
    PyTorch reference (its softmax backward never exponentiates lse) does not have. Allowed:
    4 ulp(max |lse|) * sum_i |term_i|, from the float64 terms."""
    for name, g, r64, rpt in zip(names, ours, g64, gpt):
        assert g.dtype == (FP32 if name == "dsinks" else dtype), name
        if name != "dsinks":
            assert_fa3_close(name, g, r64, rpt, dtype)
            continue
        varlen = lse64.dim() == 2  # (heads, total_q); batched (batch, heads, seqlen_q)
        d = (dout.double() * out64.detach()).sum(-1)  # (.., rows, heads)
        d = d.transpose(0, 1) if varlen else d.transpose(1, 2)
        s = sinks64.detach().view((-1, 1) if varlen else (1, -1, 1))
        terms = (torch.exp(s - lse64.detach()) * d).abs()
        terms = terms.sum(1) if varlen else terms.sum((0, 2))
        ulp = 2.0 ** -23 * 2.0 ** math.ceil(math.log2(lse64.detach().abs().max().item()))
        err = (g.double() - r64).abs()
        bound = 2 * (rpt.double() - r64).abs().max() + 1e-6 + 4 * ulp * terms
        assert (err <= bound).all(), f"dsinks: error {err.tolist()} > bound {bound.tolist()}"


def check_case(ours, ref, q, k, v, sinks, dtype, grads=True):
    """ours(q, k, v, sinks) -> (out, lse) against ref(q, k, v, sinks, upcast) -> (out, lse), the
    float64 reference (upcast) and the same at the input precision: outputs, then dq, dk, dv and
    dsinks (when sinks is given) by autograd (grads=False: outputs only). Returns (out, lse)."""
    out, lse = ours(q, k, v, sinks)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = sinks.detach().double().requires_grad_() if sinks is not None else None
    out64, lse64 = ref(q64, k64, v64, s64, True)
    out_pt, lse_pt = ref(q, k, v, sinks, False)
    assert_fa3_close("out", out, out64, out_pt, dtype)
    assert_fa3_close("lse", lse, lse64, lse_pt, dtype)
    if not grads:
        return out, lse
    dout = torch.randn_like(out)
    wrt = (q, k, v) + ((sinks,) if sinks is not None else ())
    wrt64 = (q64, k64, v64) + ((s64,) if sinks is not None else ())
    assert_grads_close(("dq", "dk", "dv", "dsinks"), torch.autograd.grad(out, wrt, dout),
                        torch.autograd.grad(out64, wrt64, dout.double(), retain_graph=True),
                        torch.autograd.grad(out_pt, wrt, dout), dtype, lse64, out64, dout, s64)
    return out, lse


def check_flash_func(q, k, v, sinks, dtype, scale, causal, window, softcap):
    """check_case for longctx.flash_attn_func against attention_ref, both with these arguments."""
    return check_case(lambda q, k, v, s: longctx.flash_attn_func(q, k, v, scale, causal, window,
                                                                 return_lse=True, softcap=softcap,
                                                                 sinks=s),
                      lambda q, k, v, s, up: attention_ref(q, k, v, scale, causal, window, up,
                                                           softcap, s),
                      q, k, v, sinks, dtype)

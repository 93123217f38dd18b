"""The accuracy checks of the logit modifiers (softcap, sinks) shared by the CPU and GPU tests
(tests/flash/test_logit_mods_*.py): outputs and gradients, dsinks included, against the float64
reference under FlashAttention-3's rule (attention_reference.assert_fa3_close)."""
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


def assert_grads_close(names, ours, g64, gpt, dtype, out, lse, dout, sinks):
    """assert_fa3_close for dq, dk and dv. dsinks is checked against its definition,
    -sum_i exp(sinks - lse_i) * D_i with D_i = dout_i . out_i, evaluated in float64 on the
    forward's own out and lse (the stored values every flash backward uses; their accuracy is
    checked by assert_fa3_close in check_case). Against the float64 model instead, dsinks carries
    the forward's bf16 rounding (P and out) through a sum with cancellation, on no scale of
    PyTorch's bf16 softmax backward: a float64 emulation of a flash kernel's rounding points
    exceeded 2x PyTorch's error on 2 of 6 random cases. Allowed: fp32 arithmetic, (rows + head_dim
    + 16) ulp of sum_i |term_i|."""
    for name, g, r64, rpt in zip(names, ours, g64, gpt):
        assert g.dtype == (FP32 if name == "dsinks" else dtype), name
        if name != "dsinks":
            assert_fa3_close(name, g, r64, rpt, dtype)
            continue
        varlen = lse.dim() == 2  # (heads, total_q); batched (batch, heads, seqlen_q)
        d = (dout.double() * out.detach().double()).sum(-1)  # (.., rows, heads)
        d = d.transpose(0, 1) if varlen else d.transpose(1, 2)
        s = sinks.detach().double().view((-1, 1) if varlen else (1, -1, 1))
        terms = torch.exp(s - lse.detach().double()) * d
        if not varlen:  # (heads, rows) as varlen's
            terms = terms.transpose(0, 1).reshape(terms.shape[1], -1)
        err = (g.double() + terms.sum(1)).abs()
        bound = 1e-6 + (terms.shape[1] + out.shape[-1] + 16) * 2.0 ** -24 * terms.abs().sum(1)
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
                        torch.autograd.grad(out_pt, wrt, dout), dtype, out, lse, dout, sinks)
    return out, lse


def check_flash_func(q, k, v, sinks, dtype, scale, causal, window, softcap):
    """check_case for longctx.flash_attn_func against attention_ref, both with these arguments."""
    return check_case(lambda q, k, v, s: longctx.flash_attn_func(q, k, v, scale, causal, window,
                                                                 return_lse=True, softcap=softcap,
                                                                 sinks=s),
                      lambda q, k, v, s, up: attention_ref(q, k, v, scale, causal, window, up,
                                                           softcap, s),
                      q, k, v, sinks, dtype)

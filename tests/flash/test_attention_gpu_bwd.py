"""GPU tests of the flash-attention backward (torch.ops.longctx.flash_attn_bwd, the Hopper kernel).

Gradients of longctx.flash_attn_func / flash_attn_varlen_func (autograd through the registered
backward) are compared with float64 autograd through support/attention_reference.py under the
FlashAttention-3 rule: max|g - g_f64| <= 2 * max|g_pt - g_f64| + atol, g_pt the same reference run
in the input precision by PyTorch, atol as in assert_fa3_close. deterministic=True
must give bitwise-equal gradients on two runs. Skipped without a Hopper GPU or when the
(head_dim, dtype) is not compiled in (forward and backward).
"""
import pytest
import torch

import longctx
from gpu_kernels import skip_unless_compiled
from attention_reference import attention_ref, attention_varlen_ref

pytestmark = pytest.mark.gpu


def _skip_unless(hdim, dtype):
    skip_unless_compiled(hdim, dtype, ("flash_fwd", "flash_bwd"))


def _atol(ref64, dtype):
    r = ref64.abs()
    return 2 * ((r + 0.3).to(dtype).double() - 0.3 - r).abs().max().item() + 1e-6


def _check(name, g, g64, gpt):
    err = (g.double() - g64).abs().max().item()
    err_pt = (gpt.double() - g64).abs().max().item()
    atol = _atol(g64, g.dtype)
    assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
    assert err <= 2 * err_pt + atol, (
        f"{name}: error {err:.3e} > 2 * pytorch error {err_pt:.3e} + atol {atol:.3e}")


def _grads(fn, inputs, dout):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    return torch.autograd.grad(out, xs, dout)


CASES = [  # (b, sq, sk, h, hk, causal, window)
    (2, 256, 256, 4, 4, False, (-1, -1)),
    (1, 300, 300, 4, 4, True, (-1, -1)),
    (1, 200, 333, 4, 1, True, (-1, -1)),
    (1, 333, 200, 4, 2, True, (-1, -1)),
    (1, 257, 257, 2, 2, False, (64, 16)),
]


def _check_all(ours, ref, pt, again=None):
    """The FA3 rule for dq, dk, dv; with `again` (deterministic mode) bitwise equality too."""
    for name, g, g64, gp in zip(("dq", "dk", "dv"), ours, ref, pt):
        _check(name, g, g64, gp)
    if again is not None:
        for name, a, b in zip(("dq", "dk", "dv"), ours, again):
            assert torch.equal(a, b), f"{name}: deterministic runs differ"


# deterministic=True runs other instantiations (hdim 64: 128-row query tiles), so every case
# runs in both modes.
@pytest.mark.parametrize("det", [False, True], ids=["default", "det"])
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_flash_bwd_batched(hdim, dtype, case, det):
    _skip_unless(hdim, dtype)
    b, sq, sk, h, hk, causal, win = case
    torch.manual_seed(hash((hdim, sq, sk, h, causal)) % 2**31)
    q = torch.randn(b, sq, h, hdim, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    dout = torch.randn(b, sq, h, hdim, device="cuda", dtype=dtype)
    def f(q, k, v):
        return longctx.flash_attn_func(q, k, v, causal=causal, window_size=win,
                                       deterministic=det)

    ours = _grads(f, (q, k, v), dout)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, window_size=win)[0],
                 (q.double(), k.double(), v.double()), dout.double())
    pt = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, window_size=win,
                                              upcast=False)[0], (q, k, v), dout)
    _check_all(ours, ref, pt, _grads(f, (q, k, v), dout) if det else None)


@pytest.mark.parametrize("det", [False, True], ids=["default", "det"])
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_bwd_varlen(causal, hdim, det):
    _skip_unless(hdim, torch.bfloat16)
    torch.manual_seed(7 + hdim)
    lq, lk = [17, 300, 0, 128, 1, 129], [17, 260, 5, 128, 90, 300]
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device="cuda")
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lq), 4, hdim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lk), 2, hdim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lk), 2, hdim, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    def f(q, k, v):
        return longctx.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal,
                                              deterministic=det)

    ours = _grads(f, (q, k, v), dout)
    ref = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cq.tolist(), ck.tolist(),
                                                      causal=causal)[0],
                 (q.double(), k.double(), v.double()), dout.double())
    pt = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cq.tolist(), ck.tolist(),
                                                     causal=causal, upcast=False)[0],
                (q, k, v), dout)
    _check_all(ours, ref, pt, _grads(f, (q, k, v), dout) if det else None)


def _nan_padded(x):
    """x as a view into a wider tensor whose extra columns hold NaN: a kernel that reads past
    head_dim gets NaN into the gradients (the padded kernels must see zeros there instead)."""
    d = x.shape[-1]
    wide = torch.full((*x.shape[:-1], d + 24), float("nan"), device=x.device, dtype=x.dtype)
    wide[..., :d] = x
    return wide[..., :d]


def _padded_bwd(q, k, v, dout, causal, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """dq, dk, dv of the ops called directly (autograd would make dout contiguous) with q, k, v,
    out and dout all NaN-padded views."""
    q, k, v = (_nan_padded(t) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    tq, tk = (None if c is None else torch.tensor(c, dtype=torch.int32, device="cuda")
              for c in (cu_q, cu_k))
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, tq, tk, max_q, max_k, scale, causal,
                                                -1, -1)
    return torch.ops.longctx.flash_attn_bwd(_nan_padded(dout), q, k, v, _nan_padded(out), lse,
                                            tq, tk, max_q, max_k, scale, causal, -1, -1,
                                            False)[:3]


# Head dims between the compiled ones run the next kernel up (flash_bwd_dispatch.cuh): Phi-3's 96,
# 80 and 192 (on the 256 kernel), with odd lengths and GQA.
PADDED_CASES = [  # (b, sq, sk, h, hk, causal)
    (2, 256, 256, 4, 4, False),
    (1, 300, 300, 4, 4, True),
    (1, 200, 333, 4, 1, True),
    (2, 333, 201, 6, 2, False),
]


@pytest.mark.parametrize("hdim", [80, 96, 192])
@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: "b%d_sq%d_sk%d_h%d_%d_c%d" % c)
def test_flash_bwd_padded_head_dim(hdim, case):
    dtype = torch.bfloat16
    _skip_unless(64 if hdim <= 64 else 128 if hdim <= 128 else 256, dtype)
    b, sq, sk, h, hk, causal = case
    torch.manual_seed(hash((hdim, sq, sk, h, causal)) % 2**31)
    q = torch.randn(b, sq, h, hdim, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    dout = torch.randn(b, sq, h, hdim, device="cuda", dtype=dtype)
    ours = _padded_bwd(q, k, v, dout, causal)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal)[0],
                 (q.double(), k.double(), v.double()), dout.double())
    pt = _grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=False)[0],
                (q, k, v), dout)
    for name, g, g64, gp in zip(("dq", "dk", "dv"), ours, ref, pt):
        assert g.shape == g64.shape
        _check(name, g, g64, gp)


@pytest.mark.parametrize("hdim", [80, 96, 192])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_bwd_padded_head_dim_varlen(hdim, causal):
    dtype = torch.bfloat16
    _skip_unless(128 if hdim <= 128 else 256, dtype)
    torch.manual_seed(hdim + causal)
    lq, lk = [17, 0, 300, 1, 257], [17, 5, 400, 90, 200]
    cq = [0] + torch.tensor(lq).cumsum(0).tolist()
    ck = [0] + torch.tensor(lk).cumsum(0).tolist()
    q = torch.randn(cq[-1], 4, hdim, device="cuda", dtype=dtype)
    k = torch.randn(ck[-1], 2, hdim, device="cuda", dtype=dtype)
    v = torch.randn(ck[-1], 2, hdim, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    ours = _padded_bwd(q, k, v, dout, causal, cq, ck, max(lq), max(lk))
    ref = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cq, ck, causal=causal)[0],
                 (q.double(), k.double(), v.double()), dout.double())
    pt = _grads(lambda q, k, v: attention_varlen_ref(q, k, v, cq, ck, causal=causal,
                                                     upcast=False)[0], (q, k, v), dout)
    for name, g, g64, gp in zip(("dq", "dk", "dv"), ours, ref, pt):
        _check(name, g, g64, gp)


def test_flash_bwd_deterministic():
    _skip_unless(128, torch.bfloat16)
    torch.manual_seed(3)
    q = torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    f = lambda q, k, v: longctx.flash_attn_func(q, k, v, causal=True, deterministic=True)  # noqa: E731
    g1 = _grads(f, (q, k, v), dout)
    g2 = _grads(f, (q, k, v), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_flash_bwd_training_step_matches_sdpa():
    """One SGD step of a tiny attention layer: longctx vs SDPA (math backend, fp32 upcast)."""
    _skip_unless(128, torch.bfloat16)
    torch.manual_seed(11)
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 3 * 256, device="cuda", dtype=torch.bfloat16) / 16

    def loss(w, use_ours):
        qkv = (x @ w).view(2, 512, 3, 2, 128)
        q, k, v = qkv.unbind(2)
        if use_ours:
            o = longctx.flash_attn_func(q, k, v, causal=True)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
                is_causal=True).transpose(1, 2)
        return o.float().square().mean()

    wa = w.clone().requires_grad_(True)
    wb = w.clone().requires_grad_(True)
    (gw_ours,) = torch.autograd.grad(loss(wa, True), [wa])
    (gw_ref,) = torch.autograd.grad(loss(wb, False), [wb])
    rel = (gw_ours.float() - gw_ref.float()).norm() / gw_ref.float().norm()
    assert rel < 2e-2, f"weight-gradient relative error {rel:.3e}"

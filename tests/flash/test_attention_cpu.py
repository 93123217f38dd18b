"""CPU tests of longctx.flash_attn_func / flash_attn_varlen_func (forward, backward, lse).

Tolerance (FlashAttention-3's rule): for every compared tensor X (out, lse, dq, dk, dv),
    max|X_ours - X_f64| <= 2 * max|X_pt - X_f64| + atol
where X_f64 is the float64 reference (support/attention_reference.py, upcast=True) and X_pt the
same reference computed by PyTorch at the input precision (upcast=False: matmuls in the input
dtype, softmax in fp32, P rounded to the input dtype), with the gradients of both obtained by
autograd (support/attention_reference.py: assert_fa3_close).
atol = 2 * max|fl(X_f64 + 0.3) - 0.3 - X_f64| + 1e-6, fl = rounding to the input dtype: twice the
dtype's rounding error at the magnitude of the values (as FA3's fwd_atol), plus a floor of 1e-6 so
fp32 never fails on errors below its own noise. lse is compared on its finite entries after
checking that -inf appears exactly where the reference has it.
"""
import math
import zlib

import pytest
import torch

import longctx
from attention_reference import assert_fa3_close, attention_ref, attention_varlen_ref

ops = torch.ops.longctx

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _rand(*shape, dtype, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _check_batched(b, sq, sk, h, hk, d, causal, window, dtype, scale=None):
    # reproducible per case (Python's hash() of strings changes per process)
    torch.manual_seed(zlib.crc32(repr((b, sq, sk, h, hk, d, causal, window, str(dtype))).encode()))
    q = _rand(b, sq, h, d, dtype=dtype)
    k = _rand(b, sk, hk, d, dtype=dtype)
    v = _rand(b, sk, hk, d, dtype=dtype)
    out, lse = longctx.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal,
                                       window_size=window, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_ref(q64, k64, v64, scale, causal, window, upcast=True)
    out_pt, lse_pt = attention_ref(q, k, v, scale, causal, window, upcast=False)
    assert_fa3_close("out", out, out64, out_pt, dtype)
    assert_fa3_close("lse", lse, lse64, lse_pt, dtype)

    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    g64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    gpt = torch.autograd.grad(out_pt, (q, k, v), dout)
    for name, ours, r64, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gpt):
        assert ours.dtype == dtype
        assert_fa3_close(name, ours, r64, rpt, dtype)


MASKS = [
    ("full", False, (-1, -1)),
    ("causal", True, (-1, -1)),
    ("left", False, (32, -1)),
    ("right", False, (-1, 20)),
    ("both", False, (40, 7)),
    ("narrow", False, (5, 3)),  # window narrower than a 64-key tile
    ("causal_left", True, (16, -1)),
]
SEQS = [(1, 1), (17, 17), (100, 129), (129, 100), (129, 17), (17, 129), (100, 100)]
GQA = [(4, 4), (8, 2), (8, 1)]  # ratios 1, 4, 8


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", MASKS, ids=[m[0] for m in MASKS])
def test_batched_fwd_bwd(dtype, d, mask):
    _, causal, window = mask
    i = MASKS.index(mask) + (d // 64) + {BF16: 0, FP16: 1, FP32: 2}[dtype]
    sq, sk = SEQS[i % len(SEQS)]
    h, hk = GQA[i % len(GQA)]
    _check_batched(2, sq, sk, h, hk, d, causal, window, dtype)


@pytest.mark.parametrize("sq,sk", [(129, 17), (17, 129), (1, 100), (100, 1)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, 0)), (False, (3, -1))])
def test_seqlen_mismatch_rows_without_keys(sq, sk, causal, window):
    # bottom-right alignment: with sq > sk, the first sq - sk rows of a causal mask see nothing
    _check_batched(1, sq, sk, 2, 1, 64, causal, window, BF16)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_tiny(causal):
    _check_batched(1, 33, 70, 2, 1, 256, causal, (-1, -1), BF16)


def test_odd_head_dim_and_scale_fp32():
    _check_batched(1, 65, 65, 3, 1, 40, True, (10, -1), FP32, scale=0.3)


def test_long_window_skips_and_full_tiles():
    # 300 keys in 5 tiles: per query tile, some KV tiles are skipped, some fully visible
    # (unmasked path), some cut by the window edges
    _check_batched(1, 300, 300, 4, 1, 64, False, (70, 10), BF16)
    _check_batched(1, 200, 300, 2, 2, 32, True, (100, -1), FP32)


def test_empty_shapes():
    for b, sq, sk in [(0, 5, 5), (2, 0, 5), (2, 5, 0)]:
        q = _rand(b, sq, 4, 32, dtype=FP32)
        k = _rand(b, sk, 2, 32, dtype=FP32)
        v = _rand(b, sk, 2, 32, dtype=FP32)
        out, lse = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True)
        assert out.shape == q.shape and lse.shape == (b, 4, sq)
        assert (out == 0).all() and (lse == -math.inf).all()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


VARLEN_MASKS = [("full", False, (-1, -1)), ("causal", True, (-1, -1)), ("both", False, (20, 5))]


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mask", VARLEN_MASKS, ids=[m[0] for m in VARLEN_MASKS])
def test_varlen_fwd_bwd(dtype, mask):
    _, causal, window = mask
    torch.manual_seed(7)
    lens_q = [17, 0, 100, 1, 65]
    lens_k = [17, 5, 129, 0, 40]  # a zero-length query sequence, and a query with no keys
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    h, hk, d = 8, 2, 64
    q = _rand(int(cu_q[-1]), h, d, dtype=dtype)
    k = _rand(int(cu_k[-1]), hk, d, dtype=dtype)
    v = _rand(int(cu_k[-1]), hk, d, dtype=dtype)
    out, lse = longctx.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                              causal=causal, window_size=window, return_lse=True)
    assert lse.shape == (h, q.shape[0])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_varlen_ref(q64, k64, v64, cu_q, cu_k, None, causal, window)
    out_pt, lse_pt = attention_varlen_ref(q, k, v, cu_q, cu_k, None, causal, window, upcast=False)
    assert_fa3_close("out", out, out64, out_pt, dtype)
    assert_fa3_close("lse", lse, lse64, lse_pt, dtype)
    # the row of sequence 3 (1 query, 0 keys) sees nothing
    assert torch.isinf(lse[:, 117]).all() and (out[117] == 0).all()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    g64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    gpt = torch.autograd.grad(out_pt, (q, k, v), dout)
    for name, ours, r64, rpt in zip(("dq", "dk", "dv"), grads, g64, gpt):
        assert_fa3_close(name, ours, r64, rpt, dtype)
    # keys of sequence 1 (5 keys, 0 queries) get zero gradient
    assert (grads[1][17:22] == 0).all() and (grads[2][17:22] == 0).all()


def test_varlen_matches_batched():
    torch.manual_seed(3)
    b, s, h, d = 3, 70, 4, 64
    q, k, v = (torch.randn(b, s, h, d, dtype=BF16) for _ in range(3))
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    ob, lb = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True)
    ov, lv = longctx.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu,
                                            cu, s, s, causal=True, return_lse=True)
    assert torch.equal(ob.flatten(0, 1), ov)
    assert torch.equal(lb.permute(1, 0, 2).flatten(1), lv)


def test_strided_inputs():
    # q/k/v as views into a packed qkv tensor (non-contiguous except the last dim)
    torch.manual_seed(4)
    qkv = torch.randn(2, 80, 3, 4, 64, dtype=FP32)
    q, k, v = qkv.unbind(2)
    out = longctx.flash_attn_func(q, k, v, causal=True)
    ref = longctx.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, ref)


def test_backward_deterministic_across_threads():
    torch.manual_seed(5)
    q = _rand(2, 150, 8, 64, dtype=BF16)
    k = _rand(2, 150, 2, 64, dtype=BF16)
    v = _rand(2, 150, 2, 64, dtype=BF16)
    dout = torch.randn(2, 150, 8, 64, dtype=BF16)
    nthreads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, nthreads)):
            torch.set_num_threads(n)
            out = longctx.flash_attn_func(q, k, v, causal=True, deterministic=True)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    finally:
        torch.set_num_threads(nthreads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lse_gradient_is_ignored():
    q, k, v = (_rand(1, 10, 2, 16, dtype=torch.float64) for _ in range(3))
    out, lse = longctx.flash_attn_func(q, k, v, return_lse=True)
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    out2, lse2 = longctx.flash_attn_func(q, k, v, return_lse=True)
    g_both = torch.autograd.grad(out2.sum() + lse2.sum(), (q, k, v))
    for a, b in zip(g_out, g_both):
        assert torch.equal(a, b)


# ---- gradcheck (float64) -------------------------------------------------------------------

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 1)),
                                           (True, (3, -1))])
def test_gradcheck_batched(causal, window):
    torch.manual_seed(11)
    q = _rand(2, 5, 4, 6, dtype=torch.float64)
    k = _rand(2, 7, 2, 6, dtype=torch.float64)
    v = _rand(2, 7, 2, 6, dtype=torch.float64)
    fn = lambda q, k, v: longctx.flash_attn_func(q, k, v, causal=causal, window_size=window)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (1, 2))])
def test_gradcheck_varlen(causal, window):
    torch.manual_seed(12)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    q = _rand(8, 2, 5, dtype=torch.float64)
    k = _rand(9, 1, 5, dtype=torch.float64)
    v = _rand(9, 1, 5, dtype=torch.float64)
    fn = lambda q, k, v: longctx.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, causal=causal,
                                                        window_size=window)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_op_registered_autograd():
    # the autograd registered on torch.ops.longctx.flash_attn_fwd itself (direct op users)
    torch.manual_seed(13)
    q = _rand(1, 6, 2, 4, dtype=torch.float64)
    k = _rand(1, 4, 1, 4, dtype=torch.float64)
    v = _rand(1, 4, 1, 4, dtype=torch.float64)
    fn = lambda q, k, v: ops.flash_attn_fwd(q, k, v, None, None, 6, 4, 0.7, True, 2, -1)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---- opcheck and torch.compile -------------------------------------------------------------

def test_opcheck_fwd_bwd():
    torch.manual_seed(14)
    q = _rand(2, 70, 4, 32, dtype=FP32)
    k = _rand(2, 50, 2, 32, dtype=FP32)
    v = _rand(2, 50, 2, 32, dtype=FP32)
    args = (q, k, v, None, None, 70, 50, 0.2, True, -1, -1)
    torch.library.opcheck(ops.flash_attn_fwd.default, args)
    out, lse = ops.flash_attn_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.flash_attn_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           None, None, 70, 50, 0.2, True, -1, -1, False))
    cu_q = torch.tensor([0, 30, 30, 70], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 25, 50], dtype=torch.int32)
    vargs = (q[0], k[0], v[0], cu_q, cu_k, 40, 25, 0.2, False, 8, 3)
    torch.library.opcheck(ops.flash_attn_fwd.default, vargs)


def test_torch_compile_fullgraph():
    torch.manual_seed(15)

    def f(q, k, v, cu, q2, k2, v2):
        o1 = longctx.flash_attn_func(q, k, v, causal=True, window_size=(20, -1))
        # the same tensor as q, k and v; the same cu_seqlens for q and k
        o0 = longctx.flash_attn_func(q, q, q, deterministic=True)
        o2, lse = longctx.flash_attn_varlen_func(q2, k2, v2, cu, cu, 30, 30, return_lse=True)
        return o1.float().sum() + o0.float().mean() + o2.float().square().sum() + lse.sum()

    q, k, v = (_rand(1, 40, 2, 32, dtype=BF16) for _ in range(3))
    q2, k2, v2 = (_rand(50, 2, 32, dtype=FP32) for _ in range(3))
    cu = torch.tensor([0, 30, 50], dtype=torch.int32)
    inputs = (q, k, v, cu, q2, k2, v2)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, (q, k, v, q2, k2, v2))
    loss_e = f(*inputs)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, q2, k2, v2))
    assert torch.equal(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


# ---- bad inputs ----------------------------------------------------------------------------

def _qkv(dtype=BF16, b=1, sq=8, sk=8, h=4, hk=2, d=64):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


def _fwd(q, k, v, cu_q=None, cu_k=None, mq=8, mk=8, causal=False, wl=-1, wr=-1):
    return ops.flash_attn_fwd(q, k, v, cu_q, cu_k, mq, mk, 0.125, causal, wl, wr)


def test_bad_dtype():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"flash_attn_fwd: q must have dtype"):
        _fwd(q.int(), k, v)
    with pytest.raises(RuntimeError, match=r"flash_attn_fwd: k must have the dtype of q"):
        _fwd(q, k.half(), v)
    with pytest.raises(RuntimeError, match=r"flash_attn_fwd: v must have the dtype of q"):
        _fwd(q, k, v.float())


def test_bad_rank_and_shapes():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"q must have 4 dimensions"):
        _fwd(q[0], k, v)
    with pytest.raises(RuntimeError, match=r"k must have 4 dimensions"):
        _fwd(q, k[0], v)
    with pytest.raises(RuntimeError, match=r"q must have 3 dimensions"):
        _fwd(q, k[0], v[0], torch.tensor([0, 8], dtype=torch.int32),
             torch.tensor([0, 8], dtype=torch.int32))
    q6, _, _ = _qkv(h=6, hk=4)
    with pytest.raises(RuntimeError, match=r"q heads must be a multiple"):
        _fwd(q6, *_qkv(hk=4)[1:])
    with pytest.raises(RuntimeError, match=r"v must have the heads_kv of k"):
        _fwd(q, k, _qkv(hk=1)[2])
    with pytest.raises(RuntimeError, match=r"k must have the head_dim of q"):
        _fwd(q, _qkv(d=32)[1], v)
    with pytest.raises(RuntimeError, match=r"q must have head_dim in \[1, 256\]"):
        _fwd(*_qkv(d=320))
    with pytest.raises(RuntimeError, match=r"v must have the seqlen_k of k"):
        _fwd(q, k, _qkv(sk=9)[2])
    with pytest.raises(RuntimeError, match=r"k must have the batch of q"):
        _fwd(q, *_qkv(b=2)[1:])
    with pytest.raises(RuntimeError, match=r"q must be contiguous in its last dimension"):
        _fwd(torch.randn(1, 8, 4, 128, dtype=BF16)[..., ::2], k, v)


def test_bad_mask_args():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"window_right must be -1 or 0 with causal"):
        _fwd(q, k, v, causal=True, wr=4)
    with pytest.raises(ValueError, match=r"window_size right = 4 contradicts causal"):
        longctx.flash_attn_func(q, k, v, causal=True, window_size=(-1, 4))
    with pytest.raises(RuntimeError, match=r"window_left must be -1"):
        _fwd(q, k, v, wl=-2)
    with pytest.raises(ValueError, match=r"window_size"):
        longctx.flash_attn_func(q, k, v, window_size=(-3, 0))
    with pytest.raises(RuntimeError, match=r"softmax_scale must be finite"):
        ops.flash_attn_fwd(q, k, v, None, None, 8, 8, math.inf, False, -1, -1)


def test_bad_cu_seqlens():
    q, k, v = (t[0] for t in _qkv(sq=10, sk=10))
    good = torch.tensor([0, 4, 10], dtype=torch.int32)

    def call(cu_q, cu_k=good, mq=10, mk=10):
        return _fwd(q, k, v, cu_q, cu_k, mq, mk)

    call(good)  # sanity
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must have dtype Int"):
        call(good.long())
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must be 1-D"):
        call(good[None])
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k must have the batch \+ 1 = 3"):
        call(good, torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k must be given together"):
        _fwd(q, k, v, good, None, 10, 10)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must start at 0"):
        call(torch.tensor([1, 4, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q must be non-decreasing"):
        call(torch.tensor([0, 6, 4, 10], dtype=torch.int32),
             torch.tensor([0, 2, 4, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k must end at the number of packed rows"):
        call(good, torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q describes sequence 1 of length 6"):
        call(good, mq=5)
    with pytest.raises(RuntimeError, match=r"max_seqlen_q must lie in"):
        call(good, mq=-1)


def test_bad_backward_args():
    q, k, v = _qkv(dtype=FP32)
    out, lse = _fwd(q, k, v)
    with pytest.raises(RuntimeError, match=r"flash_attn_bwd: dout must have the shape of q"):
        ops.flash_attn_bwd(out[:, :4], q, k, v, out, lse, None, None, 8, 8, 0.125, False, -1, -1,
                           False)
    with pytest.raises(RuntimeError, match=r"flash_attn_bwd: lse must have shape"):
        ops.flash_attn_bwd(out, q, k, v, out, lse[:, :2], None, None, 8, 8, 0.125, False, -1, -1,
                           False)
    with pytest.raises(RuntimeError, match=r"flash_attn_bwd: out must have the dtype of q"):
        ops.flash_attn_bwd(out, q, k, v, out.double(), lse, None, None, 8, 8, 0.125, False, -1,
                           -1, False)


def test_build_info_lists_flash_cpu():
    fams = {(e["family"], e["device"]) for e in longctx.build_info()["kernels"]}
    assert ("flash_fwd", "cpu") in fams and ("flash_bwd", "cpu") in fams

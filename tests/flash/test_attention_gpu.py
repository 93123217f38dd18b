"""GPU tests of torch.ops.longctx.flash_attn_fwd (the Hopper sm_90a kernel).

Compared with a float64 reference (upcast inputs) under the FlashAttention-3 rule: our max error
must be <= 2x the max error of the same computation done in PyTorch at the input precision
(16-bit matmuls, fp32 softmax, P rounded to 16 bits), plus a small atol. lse (fp32, natural log)
is compared with the float64 one; rows that see no key must give out = 0 and lse = -inf.
Skipped without a CUDA Hopper GPU or when the forward kernel is not compiled in.
"""
import math

import pytest
import torch

import longctx  # noqa: F401  (registers the ops)
from attention_reference import attend_one
from gpu_kernels import skip_unless_compiled

pytestmark = pytest.mark.gpu


def _skip_unless(hdim, dtype):
    skip_unless_compiled(hdim, dtype, ("flash_fwd",))


def _check(out, lse, q, k, v, scale, causal, wl, wr, cu_q=None, cu_k=None):
    dtype = q.dtype
    if cu_q is None:
        seqs = [(q[b], k[b], v[b], out[b], lse[b]) for b in range(q.shape[0])]
    else:
        seqs = []
        for b in range(len(cu_q) - 1):
            qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
            seqs.append((q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe], lse[:, qs:qe]))
    atol = 2e-3 if dtype == torch.bfloat16 else 5e-4
    for qb, kb, vb, ob, lb in seqs:
        if qb.shape[0] == 0:
            continue
        ref, ref_lse = attend_one(qb, kb, vb, scale, causal, (wl, wr), upcast=True)
        low, _ = attend_one(qb, kb, vb, scale, causal, (wl, wr), upcast=False)
        low = low.double()
        assert torch.isfinite(ob).all(), "out has NaN/inf"
        err = (ob.double() - ref).abs().max().item()
        err_low = (low - ref).abs().max().item()
        assert err <= 2 * err_low + atol, f"out error {err:.3e} > 2 * {err_low:.3e} + {atol}"
        inf_ref = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lb), inf_ref), "lse -inf pattern differs"
        assert (lb[inf_ref] < 0).all()
        if (~inf_ref).any():
            lerr = (lb.double()[~inf_ref] - ref_lse[~inf_ref]).abs().max().item()
            assert lerr <= 1e-3, f"lse error {lerr:.3e}"
        empty_rows = inf_ref.all(dim=0)  # (sq,) rows with no key in every head
        if empty_rows.any():
            assert (ob[empty_rows] == 0).all()


CASES = [  # (batch, sq, sk, heads, heads_kv, causal, window_left, window_right)
    (2, 256, 256, 4, 4, False, -1, -1),
    (2, 256, 256, 4, 4, True, -1, -1),
    (1, 200, 333, 4, 2, True, -1, -1),     # sk > sq, odd lengths, GQA
    (1, 333, 200, 4, 1, True, -1, -1),     # sq > sk: rows that see nothing, MQA
    (2, 1, 777, 8, 2, True, -1, -1),       # decode
    (1, 500, 517, 2, 2, False, 100, 0),    # sliding window (causal edge)
    (1, 450, 450, 2, 1, False, 64, 32),    # two-sided window
    (1, 300, 77, 2, 2, False, -1, -1),     # sk shorter than one tile
]


@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b%d_sq%d_sk%d_h%d_%d_c%d_w%d_%d" % c)
def test_flash_fwd_batched(hdim, dtype, case):
    _skip_unless(hdim, dtype)
    b, sq, sk, h, hk, causal, wl, wr = case
    dev = "cuda"
    q = torch.randn(b, sq, h, hdim, device=dev, dtype=dtype)
    k = torch.randn(b, sk, hk, hdim, device=dev, dtype=dtype)
    v = torch.randn(b, sk, hk, hdim, device=dev, dtype=dtype)
    scale = 1.0 / math.sqrt(hdim)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, scale, causal, wl, wr)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    _check(out, lse, q, k, v, scale, causal, wl, -1 if causal else wr)


@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_fwd_varlen(hdim, dtype, causal):
    _skip_unless(hdim, dtype)
    lens_q = [17, 0, 300, 128, 1, 257]
    lens_k = [17, 5, 400, 0, 90, 200]
    cu_q = [0]
    cu_k = [0]
    for a, c in zip(lens_q, lens_k):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + c)
    h, hk, dev = 4, 2, "cuda"
    q = torch.randn(cu_q[-1], h, hdim, device=dev, dtype=dtype)
    k = torch.randn(cu_k[-1], hk, hdim, device=dev, dtype=dtype)
    v = torch.randn(cu_k[-1], hk, hdim, device=dev, dtype=dtype)
    scale = 0.7 / math.sqrt(hdim)
    tq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    tk = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, tq, tk, max(lens_q), max(lens_k), scale,
                                                causal, -1, -1)
    assert lse.shape == (h, cu_q[-1])
    _check(out, lse, q, k, v, scale, causal, -1, -1, cu_q, cu_k)


# hdim 64 (and head dims padded to it) runs 192-row tiles from this many query rows on
# (kFwdTallTileMinSeqlenQ in csrc/include/longctx/flash/flash_fwd_launch.cuh), 128-row ones below;
# the cases above are all shorter, these are all at or past it.
TALL_TILE_MIN_SEQLEN_Q = 4096
TALL_CASES = [  # (batch, sq, sk, heads, heads_kv, causal, window_left, window_right)
    (1, 4096, 4096, 2, 1, True, -1, -1),    # exactly the threshold, 21.3 tiles per head
    (1, 4300, 4500, 3, 1, True, -1, -1),    # sk > sq (bottom-right diagonal), GQA 3/1
    (1, 4500, 4300, 2, 2, True, -1, -1),    # sq > sk: the first 200 rows see no key
    (1, 4201, 4201, 2, 2, False, 700, 0),   # sliding window, skipped tiles on both sides
    (2, 4097, 333, 2, 2, False, -1, -1),    # sk 333: the last 112-key tile partial; batch 2
]


@pytest.mark.parametrize("hdim", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TALL_CASES, ids=lambda c: "b%d_sq%d_sk%d_h%d_%d_c%d_w%d_%d" % c)
def test_flash_fwd_tall_tiles(hdim, dtype, case):
    _skip_unless(64, dtype)
    b, sq, sk, h, hk, causal, wl, wr = case
    assert sq >= TALL_TILE_MIN_SEQLEN_Q
    q = torch.randn(b, sq, h, hdim, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, hdim, device="cuda", dtype=dtype)
    scale = 1.0 / math.sqrt(hdim)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, scale, causal, wl, wr)
    _check(out, lse, q, k, v, scale, causal, wl, -1 if causal else wr)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_fwd_tall_tiles_varlen(causal):
    """One long sequence puts every sequence of the launch on 192-row tiles (max_seqlen_q)."""
    _skip_unless(64, torch.bfloat16)
    lens_q = [4100, 0, 300, 1, 257]
    lens_k = [4000, 5, 400, 90, 200]
    cu_q, cu_k = [0], [0]
    for a, c in zip(lens_q, lens_k):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + c)
    assert max(lens_q) >= TALL_TILE_MIN_SEQLEN_Q
    h, hk, dev = 3, 1, "cuda"
    q = torch.randn(cu_q[-1], h, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(cu_k[-1], hk, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(cu_k[-1], hk, 64, device=dev, dtype=torch.bfloat16)
    tq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    tk = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, tq, tk, max(lens_q), max(lens_k), 0.125,
                                                causal, -1, -1)
    _check(out, lse, q, k, v, 0.125, causal, -1, -1, cu_q, cu_k)


def test_flash_fwd_strided_qkv():
    """q, k, v as views of one packed (b, s, 3, h, d) tensor (row stride 3*h*d)."""
    _skip_unless(128, torch.bfloat16)
    qkv = torch.randn(2, 700, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, 0.1, True, -1, -1)
    _check(out, lse, q, k, v, 0.1, True, -1, -1)


def test_flash_fwd_long_matches_sdpa():
    """A longer causal run against torch SDPA (fp32 math on upcast inputs)."""
    _skip_unless(128, torch.bfloat16)
    q, k, v = (torch.randn(1, 4096, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, _ = torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, 128 ** -0.5, True, -1, -1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        is_causal=True).transpose(1, 2)
    low = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    err = (out.float() - ref).abs().max().item()
    err_low = (low.float() - ref).abs().max().item()
    assert err <= 2 * err_low + 2e-3


def test_flash_fwd_64bit_offsets():
    """Packed q/out with more than 2^31 elements: the last sequences start past 2^31."""
    _skip_unless(128, torch.bfloat16)
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GB of free GPU memory")
    lens = [1024] * 520 + [1000, 777]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    h, hk, d = 32, 8, 128
    assert cu[-2] * h * d > 2**31
    q = torch.randn(cu[-1], h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cu[-1], hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(cu[-1], hk, d, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor(cu, dtype=torch.int32, device="cuda")
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, t, t, 1024, 1024, d ** -0.5, True, -1, -1)
    keep = [0, len(lens) - 2, len(lens) - 1]  # first and the two past 2^31 elements
    for b in keep:
        s0, s1 = cu[b], cu[b + 1]
        _check(out[s0:s1][None], lse[:, s0:s1][None], q[s0:s1][None], k[s0:s1][None],
               v[s0:s1][None], d ** -0.5, True, -1, -1)


# Head dims between the compiled ones run the next kernel up, the columns past head_dim loaded
# as zeros (fwd_kernel_head_dim): 96 (Phi-3) and a spread of others.
PADDED_CASES = [CASES[1], CASES[2], CASES[4], CASES[5], CASES[7]]


@pytest.mark.parametrize("hdim", [8, 32, 80, 96, 112, 136, 192, 248])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PADDED_CASES,
                         ids=lambda c: "b%d_sq%d_sk%d_h%d_%d_c%d_w%d_%d" % c)
def test_flash_fwd_padded_head_dim(hdim, dtype, case):
    _skip_unless(64 if hdim <= 64 else 128 if hdim <= 128 else 256, dtype)
    b, sq, sk, h, hk, causal, wl, wr = case
    # q/k/v are views into wider tensors whose extra columns hold large values: the kernel must
    # read head_dim columns only (the TMA's zero fill, not what lies past them in memory).
    wide = (hdim + 15) // 16 * 16 + 16
    q, k, v = (1e3 * torch.randn(b, s, n, wide, device="cuda", dtype=dtype)
               for s, n in ((sq, h), (sk, hk), (sk, hk)))
    q, k, v = (t[..., :hdim].normal_() for t in (q, k, v))
    scale = 1.0 / math.sqrt(hdim)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, 0, 0, scale, causal, wl, wr)
    assert out.shape == (b, sq, h, hdim) and out.dtype == dtype
    _check(out, lse, q, k, v, scale, causal, wl, -1 if causal else wr)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_fwd_padded_head_dim_varlen(causal):
    _skip_unless(128, torch.bfloat16)
    lens_q, lens_k = [17, 0, 300, 1, 257], [17, 5, 400, 90, 200]
    cu_q, cu_k = [0], [0]
    for a, c in zip(lens_q, lens_k):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + c)
    hdim, dev = 96, "cuda"
    q = torch.randn(cu_q[-1], 4, hdim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(cu_k[-1], 2, hdim, device=dev, dtype=torch.bfloat16)
    v = torch.randn(cu_k[-1], 2, hdim, device=dev, dtype=torch.bfloat16)
    tq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    tk = torch.tensor(cu_k, dtype=torch.int32, device=dev)
    out, lse = torch.ops.longctx.flash_attn_fwd(q, k, v, tq, tk, max(lens_q), max(lens_k),
                                                hdim ** -0.5, causal, -1, -1)
    _check(out, lse, q, k, v, hdim ** -0.5, causal, -1, -1, cu_q, cu_k)


def test_flash_fwd_errors():
    _skip_unless(128, torch.bfloat16)
    for d in (100, 264):  # not a multiple of 8; past 256
        q = torch.randn(1, 64, 2, d, device="cuda", dtype=torch.bfloat16)
        msg = f"q must have head_dim a multiple of 8 in \\[8, 256\\] on CUDA, got {d}"
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.longctx.flash_attn_fwd(q, q, q, None, None, 0, 0, 0.1, False, -1, -1)
    q = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.ops.longctx.flash_attn_fwd(q, q, q, None, None, 0, 0, 0.1, False, -1, -1)


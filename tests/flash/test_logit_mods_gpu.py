"""GPU tests of the two logit modifiers (longctx/logit_mods.h) in the Hopper kernels: softcap and
sinks in the forward and the backward (dq, dk, dv and dsinks), deterministic mode and varlen
included.

Accuracy: FlashAttention-3's rule against the float64 reference with the same modifiers
(support/logit_mods_check.py), as the CPU tests (test_logit_mods_cpu.py). Exact semantics: a row
that sees no key gets out = 0 and lse = its sink (bitwise: the kernel adds the sink in natural-log
units); a sink of -inf is no sink (bitwise, outputs and gradients); a NaN sink makes its head's
rows NaN and leaves the other heads bitwise unchanged; a saturated cap (tanh = +-1) stops the
scores' gradients (dq = dk = 0 exactly, dv unchanged). Skipped without a Hopper GPU or without the
kernels of the case.
"""
import math
import zlib

import pytest
import torch

import longctx
from attention_reference import attention_ref, attention_varlen_ref
from gpu_kernels import skip_unless_compiled
from logit_mods_check import check_case, check_flash_func

pytestmark = pytest.mark.gpu

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MODS = [("softcap", 2.5, False), ("sinks", 0.0, True), ("both", 4.0, True)]
MASKS = [  # (name, sq, sk, causal, window)
    ("full", 70, 90, False, (-1, -1)),
    ("causal", 200, 333, True, (-1, -1)),
    ("window", 257, 257, False, (37, 5)),
    ("causal_rows_without_keys", 333, 200, True, (-1, -1)),
]


def _seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _sinks(h):
    return (torch.randn(h, device="cuda") * 2 + 0.5).to(FP32)


def _qkv(b, sq, sk, h, hk, d, dtype, grad=True):
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
@pytest.mark.parametrize("mask", MASKS, ids=[m[0] for m in MASKS])
def test_batched_matches_reference(dtype, hdim, mods, mask):
    """Forward (out, lse) and backward (dq, dk, dv, dsinks) with each modifier."""
    _, softcap, with_sinks = mods
    _, sq, sk, causal, window = mask
    skip_unless_compiled(hdim, dtype, ("flash_fwd", "flash_bwd"))
    _seed(dtype, hdim, mods, mask)
    q, k, v = _qkv(2, sq, sk, 4, 2, hdim, dtype)
    sinks = _sinks(4).requires_grad_() if with_sinks else None
    scale = 1 / 8  # exact in fp32
    check_flash_func(q, k, v, sinks, dtype, scale, causal, window, softcap)


@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_tall_tiles_match_reference(mods):
    """hdim 64 from 4,096 query rows runs the forward's 192-row tiles (test_attention_gpu.py's
    TALL_TILE_MIN_SEQLEN_Q): each modifier there, causal with sk > sq, forward and backward."""
    _, softcap, with_sinks = mods
    skip_unless_compiled(64, BF16, ("flash_fwd", "flash_bwd"))
    _seed("tall", mods)
    q, k, v = _qkv(1, 4150, 4400, 4, 2, 64, BF16)
    sinks = _sinks(4).requires_grad_() if with_sinks else None
    check_flash_func(q, k, v, sinks, BF16, 1 / 8, True, (-1, -1), softcap)


@pytest.mark.parametrize("hdim", [64, 128, 256])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_deterministic_backward(hdim, mods):
    """deterministic=True with each modifier: the reference's accuracy, and bitwise equal
    gradients from a second run."""
    _, softcap, with_sinks = mods
    skip_unless_compiled(hdim, BF16, ("flash_fwd", "flash_bwd"))
    _seed("deterministic", hdim, mods)
    q, k, v = _qkv(2, 700, 600, 4, 2, hdim, BF16)
    sinks = _sinks(4).requires_grad_() if with_sinks else None
    f = lambda q, k, v, s: longctx.flash_attn_func(q, k, v, 0.125, True, (300, -1),  # noqa: E731
                                                   return_lse=True, deterministic=True,
                                                   softcap=softcap, sinks=s)
    out, _ = check_case(f, lambda q, k, v, s, up: attention_ref(q, k, v, 0.125, True, (300, -1),
                                                                 up, softcap, s),
                        q, k, v, sinks, BF16)
    wrt = (q, k, v) + ((sinks,) if with_sinks else ())
    dout = torch.randn_like(out)
    g1 = torch.autograd.grad(f(q, k, v, sinks)[0], wrt, dout)
    g2 = torch.autograd.grad(f(q, k, v, sinks)[0], wrt, dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_varlen_with_empty_sequences(mods):
    _, softcap, with_sinks = mods
    skip_unless_compiled(128, BF16, ("flash_fwd", "flash_bwd"))
    _seed("varlen", mods)
    lens_q, lens_k = [33, 0, 300, 5, 129], [50, 12, 260, 0, 129]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32).cuda()
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32).cuda()
    h, hk, d = 6, 3, 128
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=BF16).requires_grad_()
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=BF16).requires_grad_()
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=BF16).requires_grad_()
    sinks = _sinks(h).requires_grad_() if with_sinks else None
    out, lse = check_case(
        lambda q, k, v, s: longctx.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.125, True, (70, -1),
            return_lse=True, softcap=softcap, sinks=s),
        lambda q, k, v, s, up: attention_varlen_ref(q, k, v, cu_q.tolist(), cu_k.tolist(),
                                                    0.125, True, (70, -1), up, softcap, s),
        q, k, v, sinks, BF16)
    if with_sinks:  # sequence 3 has no key: out 0, lse = the sinks exactly
        rows = slice(333, 338)
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        assert torch.equal(lse[:, rows], sinks.detach()[:, None].expand(h, 5))


@pytest.mark.parametrize("hdim", [64, 128, 256])
def test_rows_without_keys_get_zero_and_their_sink(hdim):
    skip_unless_compiled(hdim, BF16)
    _seed("empty rows", hdim)
    h = 4
    q, k, v = _qkv(1, 333, 200, h, 2, hdim, BF16, grad=False)
    sinks = _sinks(h)
    out, lse = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=sinks)
    # causal with sq > sk: the first 133 rows see no key (a whole 128-row tile and 5 more rows)
    assert torch.equal(out[:, :133], torch.zeros_like(out[:, :133]))
    assert torch.equal(lse[0, :, :133], sinks[:, None].expand(h, 133))
    assert torch.isfinite(out[:, 133:]).all() and (out[:, 133:] != 0).any()


def test_no_keys_anywhere_gives_the_sinks():
    skip_unless_compiled(128, BF16)
    h = 4
    q = torch.randn(7, h, 128, device="cuda", dtype=BF16)
    k = torch.randn(0, 2, 128, device="cuda", dtype=BF16)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
    cu_k = torch.zeros(3, dtype=torch.int32, device="cuda")
    sinks = _sinks(h)
    out, lse = longctx.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 4, 0, return_lse=True,
                                              sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sinks[:, None].expand(h, 7))


@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["no_softcap", "softcap"])
def test_sink_of_minus_inf_is_no_sink(softcap):
    skip_unless_compiled(128, BF16, ("flash_fwd", "flash_bwd"))
    _seed("-inf sink", softcap)
    q, k, v = _qkv(2, 300, 300, 4, 2, 128, BF16)
    minus_inf = torch.full((4,), -math.inf, device="cuda", requires_grad=True)
    o1, l1 = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=minus_inf,
                                     softcap=softcap, deterministic=True)
    o0, l0 = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, softcap=softcap,
                                     deterministic=True)
    assert torch.equal(o1, o0) and torch.equal(l1, l0)
    dout = torch.randn_like(o0)
    g1 = torch.autograd.grad(o1, (q, k, v, minus_inf), dout)
    g0 = torch.autograd.grad(o0, (q, k, v), dout)
    for a, b in zip(g1, g0):  # (deterministic: dQ's additions in a fixed order)
        assert torch.equal(a, b)
    assert torch.equal(g1[3], torch.zeros(4, device="cuda"))


def test_nan_sink_reaches_its_head_only():
    skip_unless_compiled(128, BF16)
    _seed("nan sink")
    q, k, v = _qkv(1, 200, 200, 4, 4, 128, BF16, grad=False)
    sinks = _sinks(4)
    base, lbase = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=sinks)
    sinks[2] = math.nan
    out, lse = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=sinks)
    assert torch.isnan(out[:, :, 2]).all() and torch.isnan(lse[:, 2]).all()
    keep = [0, 1, 3]
    assert torch.equal(out[:, :, keep], base[:, :, keep])
    assert torch.equal(lse[:, keep], lbase[:, keep])


def test_softcap_bounds_the_scores():
    skip_unless_compiled(64, BF16)
    # scores far beyond the cap: the softmax is over tanh(+-big) = +-1 times the cap
    q = torch.full((1, 1, 1, 64), 8.0, device="cuda", dtype=BF16)
    k = torch.tensor([1.0, -1.0], device="cuda").view(1, 2, 1, 1).expand(1, 2, 1, 64)
    v = torch.tensor([1.0, 0.0], device="cuda").view(1, 2, 1, 1).expand(1, 2, 1, 64)
    out, lse = longctx.flash_attn_func(q, k.to(BF16).contiguous(), v.to(BF16).contiguous(), 1.0,
                                       return_lse=True, softcap=0.5)
    p0 = 1 / (1 + math.exp(-1.0))  # exp(0.5) / (exp(0.5) + exp(-0.5))
    assert out[0, 0, 0, 0].item() == pytest.approx(p0, abs=4e-3)  # bf16 out
    assert lse[0, 0, 0].item() == pytest.approx(math.log(math.exp(0.5) + math.exp(-0.5)),
                                                rel=1e-5)


@pytest.mark.parametrize("hdim", [64, 128, 256])
def test_saturated_softcap_stops_the_score_gradients(hdim):
    """Scores far beyond the cap: tanh = +-1 exactly, so the cap's derivative 1 - tanh^2 is 0 and
    dq = dk = 0 exactly, while dv = P^T dout is the uncapped softmax's over +-cap."""
    skip_unless_compiled(hdim, BF16, ("flash_fwd", "flash_bwd"))
    q = torch.full((1, 1, 1, hdim), 8.0, device="cuda", dtype=BF16, requires_grad=True)
    k = torch.tensor([1.0, -1.0], device="cuda").view(1, 2, 1, 1).expand(1, 2, 1, hdim)
    k = k.to(BF16).contiguous().requires_grad_()
    v = torch.randn(1, 2, 1, hdim, device="cuda", dtype=BF16, requires_grad=True)
    out = longctx.flash_attn_func(q, k, v, 1.0, softcap=0.5)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    p0 = 1 / (1 + math.exp(-1.0))  # the softmax over (0.5, -0.5)
    want = torch.stack([p0 * dout[0, 0, 0].float(), (1 - p0) * dout[0, 0, 0].float()])
    torch.testing.assert_close(dv[0, :, 0].float(), want, atol=0, rtol=1e-2)


def test_build_info_lists_the_mods():
    kernels = [k for k in longctx.build_info()["kernels"] if k["device"] == "cuda"]
    if not kernels:
        pytest.skip("no CUDA kernels in this build")
    for k in kernels:
        if k["family"] in ("flash_fwd", "flash_bwd", "kvcache"):
            assert {"softcap", "sinks"} <= set(k["features"]), k

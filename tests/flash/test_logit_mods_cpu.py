"""CPU tests of the two logit modifiers (longctx/logit_mods.h): softcap (Gemma 2) and attention
sinks (gpt-oss), in flash_attn_func / flash_attn_varlen_func (forward and backward, dsinks
included) and flash_attn_with_kvcache.

Accuracy: FlashAttention-3's rule against the float64 reference with the same modifiers
(support/attention_reference.py: assert_fa3_close), gradients by autograd of the reference. The
semantics that a tolerance could hide are checked exactly: a row that sees no key gets out = 0
and lse = its sink; a sink of -inf is no sink (bitwise); a NaN sink makes its head's rows NaN and
leaves the other heads bitwise unchanged.
"""
import math

import pytest
import torch

import longctx
from attention_reference import assert_fa3_close, attention_ref, attention_varlen_ref
from logit_mods_check import (MODS, check_case as _check_case, check_flash_func,
                              make_sinks as _sinks, seed as _seed)

ops = torch.ops.longctx
BF16, FP32 = torch.bfloat16, torch.float32

MASKS = [  # (name, sq, sk, causal, window)
    ("full", 70, 90, False, (-1, -1)),
    ("causal", 70, 130, True, (-1, -1)),
    ("window", 100, 100, False, (17, 5)),
    ("causal_rows_without_keys", 90, 40, True, (-1, -1)),
]


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
@pytest.mark.parametrize("mask", MASKS, ids=[m[0] for m in MASKS])
def test_batched_fwd_bwd(dtype, mods, mask):
    _, softcap, with_sinks = mods
    _, sq, sk, causal, window = mask
    b, h, hk, d = 2, 4, 2, 40
    _seed(dtype, mods, mask)
    q = torch.randn(b, sq, h, d, dtype=dtype).requires_grad_()
    k = torch.randn(b, sk, hk, d, dtype=dtype).requires_grad_()
    v = torch.randn(b, sk, hk, d, dtype=dtype).requires_grad_()
    sinks = _sinks(h).requires_grad_() if with_sinks else None
    scale = 0.25  # exact in fp32 (the op keeps the scale in fp32)
    check_flash_func(q, k, v, sinks, dtype, scale, causal, window, softcap)


@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_varlen_fwd_bwd_with_empty_sequences(mods):
    _, softcap, with_sinks = mods
    _seed("varlen", mods)
    lens_q, lens_k = [33, 0, 70, 5], [50, 12, 70, 0]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    h, hk, d = 6, 3, 24
    q = torch.randn(int(cu_q[-1]), h, d, dtype=FP32).requires_grad_()
    k = torch.randn(int(cu_k[-1]), hk, d, dtype=FP32).requires_grad_()
    v = torch.randn(int(cu_k[-1]), hk, d, dtype=FP32).requires_grad_()
    sinks = _sinks(h).requires_grad_() if with_sinks else None
    _check_case(lambda q, k, v, s: longctx.flash_attn_varlen_func(
                    q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.125, True, (20, -1),
                    return_lse=True, softcap=softcap, sinks=s),
                lambda q, k, v, s, up: attention_varlen_ref(q, k, v, cu_q, cu_k, 0.125, True,
                                                            (20, -1), up, softcap, s),
                q, k, v, sinks, FP32)


def test_rows_without_keys_get_zero_and_their_sink():
    _seed("empty rows")
    h = 3
    q = torch.randn(1, 50, h, 16)
    k = torch.randn(1, 20, h, 16)
    v = torch.randn(1, 20, h, 16)
    sinks = _sinks(h)
    out, lse = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=sinks)
    # causal with sq > sk: the first 30 rows see no key
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    torch.testing.assert_close(lse[0, :, :30], sinks[:, None].expand(h, 30), rtol=1e-6,
                               atol=1e-6)  # (held in log2 units: an ulp or two of round trip)
    assert torch.isfinite(out[:, 30:]).all() and (out[:, 30:] != 0).any()


def test_sink_of_minus_inf_is_no_sink():
    _seed("-inf sink")
    q, k, v = (torch.randn(2, 70, 4, 32, requires_grad=True) for _ in range(3))
    minus_inf = torch.full((4,), -math.inf, requires_grad=True)
    o1, l1 = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=minus_inf,
                                     softcap=3.0)
    o0, l0 = longctx.flash_attn_func(q, k, v, causal=True, return_lse=True, softcap=3.0)
    assert torch.equal(o1, o0) and torch.equal(l1, l0)
    dout = torch.randn_like(o0)
    g1 = torch.autograd.grad(o1, (q, k, v, minus_inf), dout)
    g0 = torch.autograd.grad(o0, (q, k, v), dout)
    for a, b in zip(g1, g0):
        assert torch.equal(a, b)
    assert torch.equal(g1[3], torch.zeros(4))


def test_nan_sink_reaches_its_head_only():
    _seed("nan sink")
    q, k, v = (torch.randn(1, 40, 4, 32) for _ in range(3))
    sinks = _sinks(4)
    base, lbase = longctx.flash_attn_func(q, k, v, return_lse=True, sinks=sinks)
    sinks[2] = math.nan
    out, lse = longctx.flash_attn_func(q, k, v, return_lse=True, sinks=sinks)
    assert torch.isnan(out[:, :, 2]).all() and torch.isnan(lse[:, 2]).all()
    keep = [0, 1, 3]
    assert torch.equal(out[:, :, keep], base[:, :, keep])
    assert torch.equal(lse[:, keep], lbase[:, keep])


def test_softcap_bounds_the_scores():
    # scores far beyond the cap: capped, the softmax is near uniform over tanh(+-big) = +-1
    q = torch.full((1, 1, 1, 8), 100.0)
    k = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 8).contiguous()
    v = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 8).contiguous()
    out, lse = longctx.flash_attn_func(q, k, v, 1.0, return_lse=True, softcap=0.5)
    p0 = 1 / (1 + math.exp(-1.0))  # exp(0.5) / (exp(0.5) + exp(-0.5))
    assert out[0, 0, 0, 0].item() == pytest.approx(p0, rel=1e-6)
    assert lse[0, 0, 0].item() == pytest.approx(math.log(math.exp(0.5) + math.exp(-0.5)),
                                                rel=1e-6)


def test_sinks_in_model_dtype_get_their_gradient():
    # gpt-oss keeps its sinks as a bf16 parameter: the gradient reaches it in bf16
    _seed("bf16 sinks")
    q, k, v = (torch.randn(1, 30, 4, 32, dtype=BF16, requires_grad=True) for _ in range(3))
    sinks = torch.nn.Parameter(torch.randn(4, dtype=BF16))
    longctx.flash_attn_func(q, k, v, causal=True, sinks=sinks).float().sum().backward()
    assert sinks.grad is not None and sinks.grad.dtype == BF16 and sinks.grad.shape == (4,)
    assert torch.isfinite(sinks.grad).all() and (sinks.grad != 0).all()


def test_gradcheck_with_softcap_and_sinks():
    torch.manual_seed(21)
    q = torch.randn(1, 9, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 4, dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0])
    fn = lambda q, k, v: longctx.flash_attn_func(q, k, v, 0.5, True, (3, -1), softcap=1.5,
                                                 sinks=sinks)
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-5)


def test_opcheck_and_compile():
    torch.manual_seed(22)
    q = torch.randn(2, 40, 4, 16, requires_grad=True)
    k = torch.randn(2, 30, 2, 16, requires_grad=True)
    v = torch.randn(2, 30, 2, 16, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    args = (q, k, v, None, None, 40, 30, 0.25, True, -1, -1, False, sinks, 2.0)
    torch.library.opcheck(ops.flash_attn_fwd.default, args)
    out, lse = ops.flash_attn_fwd(*args)
    torch.library.opcheck(ops.flash_attn_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse.detach(), None, None, 40, 30, 0.25, True, -1, -1,
                           False, sinks.detach(), 2.0))

    def f(q, k, v, sinks):
        return longctx.flash_attn_func(q, k, v, causal=True, softcap=2.0, sinks=sinks).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gc = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    ge = torch.autograd.grad(f(q, k, v, sinks), (q, k, v, sinks))
    for a, b in zip(gc, ge):
        assert torch.equal(a, b)


# ---- flash_attn_with_kvcache ---------------------------------------------------------------

def _paged(ks, vs, block_size, cache_dtype=None):
    hk, d = ks[0].shape[1], ks[0].shape[2]
    c = longctx.PagedKVCache(64, block_size, hk, d, dtype=ks[0].dtype, cache_dtype=cache_dtype)
    ids = [c.add_sequence() for _ in ks]
    c.append(torch.cat(ks), torch.cat(vs), ids,
             cu_new=torch.tensor([0] + [x.shape[0] for x in ks]).cumsum(0).to(torch.int32))
    return c, ids


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_kvcache_matches_varlen(mods, num_splits):
    _, softcap, with_sinks = mods
    _seed("kvcache", mods, num_splits)
    h, hk, d = 8, 2, 32
    lens, lens_q = [150, 0, 77], [5, 3, 1]
    ks = [torch.randn(n, hk, d) for n in lens]
    vs = [torch.randn(n, hk, d) for n in lens]
    c, ids = _paged(ks, vs, 16)
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d)
    sinks = _sinks(h) if with_sinks else None
    out, lse = c.attend(q, ids, causal=True, window_size=(60, 0), return_lse=True,
                        cu_seqlens_q=cu_q, max_seqlen_q=max(lens_q), num_splits=num_splits,
                        softcap=softcap, sinks=sinks)
    cu_k = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    k, v = torch.cat(ks), torch.cat(vs)
    ref, ref_lse = longctx.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens),
                                                  causal=True, window_size=(60, 0),
                                                  return_lse=True, softcap=softcap, sinks=sinks)
    if num_splits == 1:  # the same per-row arithmetic (kvcache_cpu.h)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out64, lse64 = attention_varlen_ref(q.double(), k.double(), v.double(), cu_q, cu_k,
                                        1 / math.sqrt(d), True, (60, 0), True, softcap,
                                        None if sinks is None else sinks.double())
    out_pt, lse_pt = attention_varlen_ref(q, k, v, cu_q, cu_k, 1 / math.sqrt(d), True, (60, 0),
                                          False, softcap, sinks)
    assert_fa3_close("out", out, out64, out_pt, FP32)
    assert_fa3_close("lse", lse, lse64, lse_pt, FP32)
    if with_sinks:  # sequence 1 has no cached key: out 0, lse = the sinks
        assert torch.equal(out[5:8], torch.zeros_like(out[5:8]))
        # (the kernel holds the sink in log2 units: a round trip of an ulp or two)
        torch.testing.assert_close(lse[:, 5:8], sinks[:, None].expand(h, 3), rtol=1e-6, atol=1e-6)


def test_kvcache_int8_with_mods():
    _seed("kvcache int8")
    h, hk, d = 4, 2, 64
    ks = [torch.randn(100, hk, d, dtype=BF16)]
    vs = [torch.randn(100, hk, d, dtype=BF16)]
    c, ids = _paged(ks, vs, 16, cache_dtype=torch.int8)
    q = torch.randn(1, 2, h, d, dtype=BF16)
    sinks = _sinks(h)
    out = c.attend(q, ids, softcap=3.0, sinks=sinks, num_splits=2)
    k, v = (x.unsqueeze(0).to(BF16) for x in c.gather(ids[0]))  # the dequantized cache
    out64, _ = attention_ref(q.double(), k.double(), v.double(), None, True, (-1, -1), True, 3.0,
                             sinks.double())
    out_pt, _ = attention_ref(q, k, v, None, True, (-1, -1), False, 3.0, sinks)
    assert_fa3_close("out", out, out64, out_pt, BF16)


def test_kvcache_opcheck_and_compile():
    _seed("kvcache opcheck")
    h, hk, d = 4, 2, 32
    c, ids = _paged([torch.randn(40, hk, d), torch.randn(9, hk, d)],
                    [torch.randn(40, hk, d), torch.randn(9, hk, d)], 16)
    q = torch.randn(2, 3, h, d)
    sinks = _sinks(h)
    args = (q, c.k_cache, c.v_cache, None, None, None, None, c.block_table(ids),
            c.cache_seqlens(ids), None, 3, 0.2, True, -1, -1, 2, True, sinks, 1.5)
    torch.library.opcheck(ops.flash_attn_with_kvcache.default, args)
    torch.library.opcheck(ops.flash_attn_with_kvcache_check.default, args + (3,))

    def f(q, kc, vc, seqlens, table, sinks):
        out = longctx.flash_attn_with_kvcache(q, kc, vc, seqlens, table, causal=True,
                                              softcap=1.5, sinks=sinks)
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = (q, c.k_cache, c.v_cache, c.cache_seqlens(ids), c.block_table(ids), sinks)
    assert torch.equal(compiled(*inputs), f(*inputs))


def test_kvcache_bad_sinks_with_new_tokens_writes_nothing():
    h, hk, d = 4, 2, 16
    c, ids = _paged([torch.randn(10, hk, d)], [torch.randn(10, hk, d)], 8)
    before = (c.k_cache.clone(), c.v_cache.clone())
    q = torch.randn(1, 1, h, d)
    k, v = torch.randn(1, 1, hk, d), torch.randn(1, 1, hk, d)
    with pytest.raises(RuntimeError, match=r"sinks must have shape \(heads,\) = \(4\)"):
        longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, c.cache_seqlens(ids),
                                        c.block_table(ids), k, v, sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"softcap must be finite and >= 0"):
        longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, c.cache_seqlens(ids),
                                        c.block_table(ids), k, v, softcap=-1.0)
    assert torch.equal(c.k_cache, before[0]) and torch.equal(c.v_cache, before[1])


# ---- bad inputs ----------------------------------------------------------------------------

def _q_k_v():
    return torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"sinks": torch.zeros(3)}, RuntimeError, r"flash_attn_fwd: sinks must have shape \(heads,\) "
                                              r"= \(4\), got \[3\]"),
    ({"sinks": torch.zeros(1, 4)}, RuntimeError, r"sinks must have shape \(heads,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int32)}, TypeError,
     r"flash_attn_func: sinks must be a floating-point tensor"),
    ({"sinks": [0.0] * 4}, TypeError, r"sinks must be a tensor of shape \(heads,\) or None"),
    ({"sinks": torch.zeros(4, device="meta")}, RuntimeError,
     r"sinks must be on the same device as q"),
    ({"softcap": -1.0}, RuntimeError, r"flash_attn_fwd: softcap must be finite and >= 0"),
    ({"softcap": math.inf}, RuntimeError, r"softcap must be finite and >= 0"),
    ({"softcap": math.nan}, RuntimeError, r"softcap must be finite and >= 0"),
    ({"softcap": 1e-300}, RuntimeError, r"softcap is too small for fp32"),
    ({"softcap": "50"}, TypeError, r"flash_attn_func: softcap must be a number"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        longctx.flash_attn_func(*_q_k_v(), **kwargs)

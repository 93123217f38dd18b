"""CPU tests of the paged KV cache: kvcache_append, flash_attn_with_kvcache, PagedKVCache.

Accuracy rules:
- Unquantized caches: attention over the cache is compared with longctx.flash_attn_varlen_func
  on the gathered contiguous K/V (bitwise: the CPU kernel does the same per-row arithmetic) and
  with the float64 reference under FlashAttention-3's rule (assert_fa3_close:
  err <= 2 * err_pytorch_same_precision + atol).
- Quantized caches: the stored codes are checked bitwise against a torch reference quantizer
  (torch's float8_e4m3fn cast is the oracle of fp8 rounding); the round-trip error against the
  float64 original is bounded per element by half a quantization step (so a wrong scale fails)
  and reported; attention is checked with the FA3 rule against the float64 reference on the
  dequantized K/V (so the fused dequantization is exact), and its error against the unquantized
  float64 attention is reported.
- Chunked prefill: bitwise equal to a single pass (num_splits = 1): every query row's arithmetic
  depends only on its own query and the keys (key tiles start at key 0 whatever the chunk, and
  masked keys add exact zeros), and append quantizes each token independently.
"""
import math

import pytest
import torch

import longctx
from attention_reference import assert_fa3_close, attention_varlen_ref
from kvcache_reference import (check_append_writes_only_new_slots, gather_kv,
                               keys_with_outliers, quantize_fp8_ref, quantize_int8_ref)

ops = torch.ops.longctx
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
INT8, FP8 = torch.int8, torch.float8_e4m3fn


def _cu(lens):
    return torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _fill_cache(lens, hk, d, block_size, dtype, cache_dtype=None, rounds=3, k_scale=None,
                v_scale=None, gen=None, num_blocks=None):
    """A PagedKVCache holding sequences of the given lengths, appended in `rounds` interleaved
    packed appends (so pages of different sequences interleave in the pool). Returns the cache,
    the ids, and the full (unrotated) K/V per sequence in the input dtype."""
    need = sum(-(-n // block_size) for n in lens) + 2
    c = longctx.PagedKVCache(num_blocks or need + 3, block_size, hk, d, dtype=dtype,
                             cache_dtype=cache_dtype, k_scale=k_scale, v_scale=v_scale)
    # a freed sequence first, so later pages are reused ones
    tmp = c.add_sequence()
    c.reserve(tmp, 2 * block_size)
    ids = [c.add_sequence() for _ in lens]
    c.free(tmp)
    ks = [keys_with_outliers(n, hk, d, dtype=dtype, generator=gen) for n in lens]
    vs = [torch.randn(n, hk, d, generator=gen).to(dtype) for n in lens]
    bounds = [[n * r // rounds for r in range(rounds + 1)] for n in lens]
    for r in range(rounds):
        parts = [(b[r], b[r + 1]) for b in bounds]
        k = torch.cat([x[a:e] for x, (a, e) in zip(ks, parts)])
        v = torch.cat([x[a:e] for x, (a, e) in zip(vs, parts)])
        c.append(k, v, ids, cu_new=_cu([e - a for a, e in parts]))
    return c, ids, ks, vs


# ---- fp8 / int8 conversion ------------------------------------------------------------------

def _fp8_probe_values():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = codes[torch.isfinite(codes)].unique()
    pos = finite[finite >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties in fp32
    ulp_up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    ulp_dn = torch.nextafter(mids, torch.zeros_like(mids))
    special = torch.tensor([448.0, 449.0, 463.99, 464.0, 464.01, 479.9, 480.0, 500.0, 1e30,
                            math.inf, 2.0 ** -10, 2.0 ** -11, 2.0 ** -30, 1e-45, 0.0])
    rand = torch.exp(torch.empty(20000).uniform_(math.log(2.0 ** -12), math.log(600.0)))
    x = torch.cat([finite, mids, ulp_up, ulp_dn, special, rand])
    return torch.cat([x, -x, torch.tensor([math.nan])])


def test_fp8_conversion_matches_torch():
    x = _fp8_probe_values()
    d = 64
    n = -(-x.numel() // d)
    x = torch.cat([x, torch.zeros(n * d - x.numel())]).view(1, n, 1, d)
    one = torch.ones(1)
    kc = torch.zeros(-(-n // 16), 16, 1, d, dtype=FP8)
    vc = torch.zeros_like(kc)
    table = torch.arange(kc.shape[0], dtype=torch.int32)[None]
    longctx.kvcache_append(x, x, kc, vc, torch.zeros(1, dtype=torch.int32), table,
                           k_scale=one, v_scale=one)
    ours = kc.flatten()[: x.numel()].view(torch.uint8)
    # saturate first (CUDA's __NV_SATFINITE): torch's own cast saturates from 2.14 on only
    ref = x.flatten().clamp(-448.0, 448.0).to(FP8).view(torch.uint8)
    nan = torch.isnan(x.flatten())
    assert torch.equal(ours[~nan], ref[~nan])
    assert torch.isnan(kc.flatten()[: x.numel()][nan].float()).all()
    # saturation to +-448 (CUDA's __NV_SATFINITE) for large finite values and inf
    big = x.flatten().abs() >= 464.01
    assert (kc.flatten()[: x.numel()][big & ~nan].float().abs() == 448).all()


def test_quantized_codes_match_reference():
    gen = torch.Generator().manual_seed(1)
    hk, d, bs = 2, 64, 16
    lens = [37, 0, 70]
    for cache_dtype in (INT8, FP8):
        scale = torch.tensor([0.05, 0.11]) if cache_dtype == FP8 else None
        c, ids, ks, vs = _fill_cache(lens, hk, d, bs, BF16, cache_dtype, k_scale=scale,
                                     v_scale=scale, gen=gen)
        table, seqlens = c.block_table(ids), c.cache_seqlens(ids)
        for b, n in enumerate(lens):
            pages = table[b, : -(-n // bs)].long()
            for pool, scales, x in ((c.k_cache, c.k_scale, ks[b]), (c.v_cache, c.v_scale, vs[b])):
                stored = pool[pages].flatten(0, 1)[:n]
                if cache_dtype == INT8:
                    q, s = quantize_int8_ref(x)
                    assert torch.equal(stored, q)
                    assert torch.equal(scales[pages].flatten(0, 1)[:n], s)
                else:
                    ref = quantize_fp8_ref(x, scales)
                    assert torch.equal(stored.view(torch.uint8), ref.view(torch.uint8))
        assert int(seqlens.sum()) == sum(lens)


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=["bf16", "fp16", "int8",
                                                                      "fp8"])
def test_quantization_error_outlier_keys(cache_dtype):
    """Round-trip error vs the float64 original on keys with outlier channels, per element
    bounded by half a quantization step (tight: a scale off by 2x fails), and reported."""
    gen = torch.Generator().manual_seed(2)
    hk, d, bs, n = 4, 128, 16, 300
    x = keys_with_outliers(n, hk, d, dtype=FP32, generator=gen)  # fp32 input: error is the cache's
    dtype = FP32 if cache_dtype in (INT8, FP8) else cache_dtype
    xin = x.to(dtype)
    scale = longctx.fp8_scales_from_data(xin) if cache_dtype == FP8 else None
    c = longctx.PagedKVCache(-(-n // bs), bs, hk, d, dtype=dtype, cache_dtype=cache_dtype,
                             k_scale=scale, v_scale=scale)
    sid = c.add_sequence()
    c.append(xin[None], xin[None])
    deq, _ = gather_kv(c.k_cache, c.v_cache, c.block_table(), n, 0, c.k_scale, c.v_scale)
    x64 = x.double()
    err = (deq - x64).abs()
    rel = (err.norm() / x64.norm()).item()
    rel_max = (err.max() / x64.abs().max()).item()
    if cache_dtype in (BF16, FP16):
        # half ulp, relative (fp16: absolute 2^-25 below its normal range)
        step = x64.abs() * (2.0 ** (-8 if cache_dtype == BF16 else -11))
        if cache_dtype == FP16:
            step = step.clamp_min(2.0 ** -25)
    elif cache_dtype == INT8:
        step = (x64.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(x64)
    else:  # fp8 e4m3: half ulp = 2^-4 relative (normal), 2^-10 * scale (subnormal)
        s = scale.double()[None, :, None]
        step = torch.maximum(x64.abs() * 2.0 ** -4, (2.0 ** -10) * s.expand_as(x64))
    ratio = (err / step.clamp_min(1e-300)).max().item()
    print(f"[kvcache] {str(cache_dtype).split('.')[-1]:>14} round-trip on outlier keys: "
          f"relative Frobenius error {rel:.2e}, max error / max |x| {rel_max:.2e}, "
          f"max error / half step {ratio:.3f}")  # captured: shown with -rP or -s
    assert ratio <= 1.0 + 1e-6
    assert ratio > 0.5  # the bound is tight: half a step is reached, twice it would fail
    expect = {BF16: 3e-3, FP16: 4e-4, INT8: 3e-2, FP8: 4e-2}[cache_dtype]
    assert rel < expect
    c.free(sid)


# ---- append then attend ---------------------------------------------------------------------

CASES = [  # block_size, (heads, kv_heads), causal, window, dtype
    (16, (8, 2), True, (-1, -1), BF16),
    (64, (8, 1), True, (-1, -1), FP16),
    (48, (4, 1), False, (-1, -1), BF16),
    (16, (8, 2), False, (50, 10), FP32),
    (64, (4, 1), True, (30, -1), BF16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"bs{c[0]}-gqa{c[1][0]//c[1][1]}-"
                         f"{'causal' if c[2] else 'full'}-w{c[3][0]}_{c[3][1]}-"
                         f"{str(c[4]).split('.')[-1]}")
def test_append_attend_matches_varlen(case):
    bs, (h, hk), causal, window, dtype = case
    gen = torch.Generator().manual_seed(3)
    d = 64
    lens = [0, 1, 100, 257, 64]          # an empty sequence in the batch
    q_lens = [0, 1, 37, 257, 5]          # decode row, chunks, a full prefill
    c, ids, ks, vs = _fill_cache(lens, hk, d, bs, dtype, gen=gen)
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype)
    cu_q, cu_k = _cu(q_lens), _cu(lens)
    out, lse = c.attend(q, ids, causal=causal, window_size=window, return_lse=True,
                        cu_seqlens_q=cu_q)
    k_all, v_all = torch.cat(ks), torch.cat(vs)
    ref_out, ref_lse = longctx.flash_attn_varlen_func(
        q, k_all, v_all, cu_q, cu_k, max(q_lens), max(lens), causal=causal, window_size=window,
        return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    out64, lse64 = attention_varlen_ref(q.double(), k_all.double(), v_all.double(), cu_q, cu_k,
                                        None, causal, window)
    out_pt, lse_pt = attention_varlen_ref(q, k_all, v_all, cu_q, cu_k, None, causal, window,
                                          upcast=False)
    assert_fa3_close("out", out, out64, out_pt, dtype)
    assert_fa3_close("lse", lse, lse64, lse_pt, dtype)
    # the gathered cache is bitwise the appended K/V
    table = c.block_table(ids)
    for b, n in enumerate(lens):
        kg, vg = gather_kv(c.k_cache, c.v_cache, table, n, b)
        assert torch.equal(kg.to(dtype), ks[b]) and torch.equal(vg.to(dtype), vs[b])


@pytest.mark.parametrize("cache_dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_quantized_attention(cache_dtype):
    gen = torch.Generator().manual_seed(4)
    h, hk, d, bs = 8, 2, 64, 16
    lens = [0, 130, 300]
    q_lens = [1, 1, 20]
    scale = None  # fp8: calibrated from the first append
    c, ids, ks, vs = _fill_cache(lens, hk, d, bs, BF16, cache_dtype, gen=gen, k_scale=scale,
                                 v_scale=scale)
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(BF16)
    cu_q, cu_k = _cu(q_lens), _cu(lens)
    out, lse = c.attend(q, ids, causal=True, return_lse=True, cu_seqlens_q=cu_q)
    table = c.block_table(ids)
    deq = [gather_kv(c.k_cache, c.v_cache, table, n, b, c.k_scale, c.v_scale)
           for b, n in enumerate(lens)]
    kd, vd = torch.cat([x[0] for x in deq]), torch.cat([x[1] for x in deq])
    out64, lse64 = attention_varlen_ref(q.double(), kd, vd, cu_q, cu_k, None, True)
    out_pt, lse_pt = attention_varlen_ref(q, kd.to(BF16), vd.to(BF16), cu_q, cu_k, None, True,
                                          upcast=False)
    assert_fa3_close("out", out, out64, out_pt, BF16)
    assert_fa3_close("lse", lse, lse64, lse_pt, BF16)
    # error of quantized attention vs the unquantized float64 attention (reported)
    exact, _ = attention_varlen_ref(q.double(), torch.cat(ks).double(), torch.cat(vs).double(),
                                    cu_q, cu_k, None, True)
    err = (out.double() - exact).abs().max().item()
    rel = ((out.double() - exact).norm() / exact.norm()).item()
    print(f"[kvcache] {str(cache_dtype).split('.')[-1]:>14} attention output vs "
          f"unquantized float64: max abs error {err:.2e}, relative {rel:.2e}")
    # Outlier channels dominate the per-token (int8) / per-head (fp8) scale, so the ordinary
    # channels keep few levels: measured ~6e-2 (int8) and ~1.3e-1 (fp8) on this data.
    assert rel < {INT8: 1e-1, FP8: 2.5e-1}[cache_dtype]


@pytest.mark.parametrize("cache_dtype", [BF16, INT8], ids=["bf16", "int8"])
def test_decode_split_kv(cache_dtype):
    gen = torch.Generator().manual_seed(5)
    h, hk, d, bs = 8, 1, 64, 16
    lens = [0, 1, 300, 1000]
    c, ids, ks, vs = _fill_cache(lens, hk, d, bs, BF16, cache_dtype, rounds=1, gen=gen)
    q = torch.randn(len(lens), 1, h, d, generator=gen).to(BF16)
    table = c.block_table(ids)
    deq = [gather_kv(c.k_cache, c.v_cache, table, n, b, c.k_scale, c.v_scale)
           for b, n in enumerate(lens)]
    kd, vd = torch.cat([x[0] for x in deq]), torch.cat([x[1] for x in deq])
    cu_q, cu_k = _cu([1] * len(lens)), _cu(lens)
    out64, lse64 = attention_varlen_ref(q.flatten(0, 1).double(), kd, vd, cu_q, cu_k, None, True)
    out_pt, lse_pt = attention_varlen_ref(q.flatten(0, 1), kd.to(BF16), vd.to(BF16), cu_q, cu_k,
                                          None, True, upcast=False)
    base = None
    for splits in (1, 3, 8, 40):
        out, lse = c.attend(q, ids, causal=True, return_lse=True, num_splits=splits)
        assert out.shape == q.shape and lse.shape == (len(lens), h, 1)
        assert_fa3_close(f"out[{splits}]", out.flatten(0, 1), out64, out_pt, BF16)
        assert_fa3_close(f"lse[{splits}]", lse[..., 0].t(), lse64, lse_pt, BF16)
        assert (out[0] == 0).all() and torch.isinf(lse[0]).all()  # the empty sequence
        if base is None:
            base = (out, lse)
        else:  # merging by lse: the same result within rounding
            assert (out.float() - base[0].float()).abs().max() <= 2 ** -7
            assert (lse - base[1])[1:].abs().max() <= 1e-5


@pytest.mark.parametrize("cache_dtype,window", [(BF16, (-1, -1)), (INT8, (-1, -1)),
                                                (BF16, (300, -1)), (FP8, (-1, -1))],
                         ids=["bf16", "int8", "bf16-window", "fp8"])
def test_chunked_prefill_equals_single_pass(cache_dtype, window):
    """A 1000-token prompt prefilled in chunks of 256 (append the chunk, attend its queries)
    equals one pass over the whole prompt, bitwise (see the module docstring for why)."""
    gen = torch.Generator().manual_seed(6)
    h, hk, d, bs, n, chunk = 8, 2, 64, 16, 1000, 256
    k = keys_with_outliers(1, n, hk, d, generator=gen)
    v = torch.randn(1, n, hk, d, generator=gen).to(BF16)
    q = torch.randn(1, n, h, d, generator=gen).to(BF16)
    scale = longctx.fp8_scales_from_data(k) if cache_dtype == FP8 else None
    vscale = longctx.fp8_scales_from_data(v) if cache_dtype == FP8 else None
    outs = []
    for step in (chunk, n):
        c = longctx.PagedKVCache(-(-n // bs), bs, hk, d, dtype=BF16, cache_dtype=cache_dtype,
                                 k_scale=scale, v_scale=vscale)
        sid = c.add_sequence()
        parts = []
        for s in range(0, n, step):
            e = min(n, s + step)
            c.append(k[:, s:e], v[:, s:e], [sid])
            parts.append(c.attend(q[:, s:e], [sid], causal=True, window_size=window,
                                  return_lse=True))
        outs.append((torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 2)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    if cache_dtype == BF16:
        ref = longctx.flash_attn_func(q, k, v, causal=True, window_size=window)
        assert torch.equal(outs[1][0], ref)


def test_functional_with_new_tokens_matches_flash_attn():
    """flash_attn_with_kvcache(..., k=, v=): append then attend, FlashAttention's API."""
    gen = torch.Generator().manual_seed(7)
    h, hk, d, bs = 4, 2, 32, 16
    c, ids, ks, vs = _fill_cache([10, 40], hk, d, bs, BF16, gen=gen, num_blocks=20)
    for s in ids:
        c.reserve(s, c.seqlen(s) + 3)
    knew = torch.randn(2, 3, hk, d, generator=gen).to(BF16)
    vnew = torch.randn(2, 3, hk, d, generator=gen).to(BF16)
    q = torch.randn(2, 3, h, d, generator=gen).to(BF16)
    seqlens = c.cache_seqlens(ids)
    out = longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, seqlens, c.block_table(ids),
                                          k=knew, v=vnew, causal=True)
    assert torch.equal(seqlens, torch.tensor([10, 40], dtype=torch.int32))  # not advanced
    for b in range(2):
        kf = torch.cat([ks[b], knew[b]])[None]
        vf = torch.cat([vs[b], vnew[b]])[None]
        ref = longctx.flash_attn_func(q[b:b + 1], kf, vf, causal=True)
        assert torch.equal(out[b:b + 1], ref)


# ---- RoPE on append -------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype,interleaved,partial",
                         [(BF16, False, False), (BF16, True, True), (INT8, False, True),
                          (FP8, True, False)], ids=["bf16-neox", "bf16-interleaved-partial",
                                                    "int8-neox-partial", "fp8-interleaved"])
def test_append_rope_equals_apply_rope_then_append(cache_dtype, interleaved, partial):
    gen = torch.Generator().manual_seed(8)
    hk, d, bs = 2, 64, 16
    rf = longctx.rope_frequencies(d, base=500000.0, rotary_dim=48 if partial else None,
                                  scaling={"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 4096})
    lens_before, new = [5, 0, 33], [7, 20, 1]
    total = [a + b for a, b in zip(lens_before, new)]
    scale = torch.tensor([0.06, 0.09]) if cache_dtype == FP8 else None
    k = keys_with_outliers(sum(new), hk, d, generator=gen)
    v = torch.randn(sum(new), hk, d, generator=gen).to(BF16)
    positions = torch.randint(0, 100000, (sum(new),), generator=gen)
    for explicit in (False, True):
        caches = []
        for fused in (True, False):
            c = longctx.PagedKVCache(12, bs, hk, d, cache_dtype=cache_dtype, k_scale=scale,
                                     v_scale=scale)
            ids = [c.add_sequence() for _ in total]
            c.append(torch.zeros(sum(lens_before), hk, d, dtype=BF16),
                     torch.zeros(sum(lens_before), hk, d, dtype=BF16), ids,
                     cu_new=_cu(lens_before))
            cu = _cu(new)
            if explicit:
                pos = positions
            else:
                pos = torch.cat([torch.arange(a, a + b) for a, b in zip(lens_before, new)])
            if fused:
                c.append(k, v, ids, cu_new=cu, positions=pos if explicit else None, rope=rf,
                         rope_interleaved=interleaved)
            else:
                kr, _ = longctx.apply_rope(k.clone(), None, pos, rf.inv_freq, rf.attention_factor,
                                           interleaved=interleaved)
                c.append(kr, v, ids, cu_new=cu)
            caches.append(c)
        a, b = caches
        assert torch.equal(a.k_cache.view(torch.uint8), b.k_cache.view(torch.uint8))
        assert torch.equal(a.v_cache.view(torch.uint8), b.v_cache.view(torch.uint8))
        if cache_dtype == INT8:
            assert torch.equal(a.k_scale, b.k_scale) and torch.equal(a.v_scale, b.v_scale)


def test_functional_rope_rotates_q_and_k():
    gen = torch.Generator().manual_seed(9)
    h, hk, d, bs = 4, 1, 32, 8
    rf = longctx.rope_frequencies(d, base=10000.0)
    c = longctx.PagedKVCache(8, bs, hk, d)
    sid = c.add_sequence()
    c.reserve(sid, 20)
    k = torch.randn(1, 20, hk, d, generator=gen).to(BF16)
    v = torch.randn(1, 20, hk, d, generator=gen).to(BF16)
    q = torch.randn(1, 20, h, d, generator=gen).to(BF16)
    out = longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, c.cache_seqlens(),
                                          c.block_table(), k=k, v=v, causal=True, rope=rf)
    pos = torch.arange(20)
    qr, kr = longctx.apply_rope(q.clone(), k.clone(), pos, rf.inv_freq, rf.attention_factor)
    assert torch.equal(out, longctx.flash_attn_func(qr, kr, v, causal=True))


# ---- memory safety --------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=["bf16", "int8", "fp8"])
def test_nothing_written_outside_own_slots(cache_dtype):
    check_append_writes_only_new_slots(cache_dtype, 32, "cpu", torch.Generator().manual_seed(10))


def test_unvalidated_bad_page_is_skipped_not_written():
    hk, d, bs = 1, 16, 4
    kc = torch.full((4, bs, hk, d), math.nan, dtype=BF16)
    vc = kc.clone()
    table = torch.tensor([[0, 99], [2, -5]], dtype=torch.int32)  # bad ids in the 2nd pages
    seqlens = torch.tensor([2, 3], dtype=torch.int32)
    k = torch.ones(2, 3, hk, d, dtype=BF16)
    before = kc.clone()
    ops.kvcache_append(k, k, kc, vc, None, None, None, None, table, seqlens, None, None, None,
                       1.0, False, False)
    # seq 0 writes slots 2, 3 of page 0, token 4 would go to page 99: dropped
    # seq 1 writes slot 3 of page 2, tokens 4, 5 would go to page -5: dropped
    assert (kc[0, 2:] == 1).all() and (kc[2, 3] == 1).all()
    untouched = torch.ones(4, bs, dtype=torch.bool)
    untouched[0, 2:] = False
    untouched[2, 3] = False
    assert torch.equal(kc[untouched].view(torch.int16), before[untouched].view(torch.int16))
    # attention masks keys on invalid pages instead of reading them: sequence 0 with 5 keys sees
    # keys 0..3 (page 0) and not key 4 (page 99)
    kc.nan_to_num_(0.0)
    vc.normal_()
    q = torch.randn(2, 1, 2, d, dtype=BF16)
    out, lse = ops.flash_attn_with_kvcache(q, kc, vc, None, None, None, None, table,
                                           seqlens + 3, None, 1, 0.25, True, -1, -1, 0, False)
    ref, ref_lse = longctx.flash_attn_func(q[:1], kc[:1], vc[:1], softmax_scale=0.25,
                                           return_lse=True)
    assert torch.equal(out[:1], ref) and torch.equal(lse[:1], ref_lse)


# ---- errors ---------------------------------------------------------------------------------

def _small(cache_dtype=BF16):
    hk, d, bs = 2, 16, 4
    kc = torch.zeros(6, bs, hk, d, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    seqlens = torch.tensor([3, 0], dtype=torch.int32)
    k = torch.randn(2, 2, hk, d, dtype=BF16)
    return k, kc, vc, table, seqlens


def _append(k, kc, vc, table, seqlens, ksc=None, vsc=None, kf=None, vf=None, cu=None, pos=None,
            inv=None):
    ops.kvcache_append(k, k, kc, vc, ksc, vsc, kf, vf, table, seqlens, cu, pos, inv)


def test_errors_name_the_argument():
    k, kc, vc, table, seqlens = _small()
    _append(k, kc, vc, table, seqlens)  # sanity
    with pytest.raises(RuntimeError, match=r"kvcache_append: block_table\[0\]\[1\] = 9 is not a "
                                           r"page of the pool"):
        _append(k, kc, vc, torch.tensor([[0, 9], [2, 3]], dtype=torch.int32), seqlens)
    with pytest.raises(RuntimeError, match=r"kvcache_append: cache_seqlens\[0\] = 7 plus 2 new "
                                           r"tokens = 9 tokens need 3 pages"):
        _append(k, kc, vc, table, torch.tensor([7, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] = -1 must be >= 0"):
        _append(k, kc, vc, table, torch.tensor([0, -1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"block_table\[0\]\[0\] = 0 receives new tokens of "
                                           r"sequence 0 but the page is used 2 times"):
        _append(k, kc, vc, torch.tensor([[0, 1], [0, 3]], dtype=torch.int32), seqlens)
    with pytest.raises(RuntimeError, match=r"k_cache must have the dtype of k"):
        _append(k, kc.half(), vc.half(), table, seqlens)
    with pytest.raises(RuntimeError, match=r"v_cache must have the dtype of k_cache"):
        _append(k, kc.to(INT8), vc, table, seqlens)
    with pytest.raises(RuntimeError, match=r"k_scale_cache is required for an int8 cache"):
        _append(k, kc.to(INT8), vc.to(INT8), table, seqlens)
    s8 = torch.zeros(6, 4, 2)
    with pytest.raises(RuntimeError, match=r"v_scale_cache must have shape \(num_blocks, "
                                           r"block_size, kv_heads\)"):
        _append(k, kc.to(INT8), vc.to(INT8), table, seqlens, s8, s8[:, :, :1])
    with pytest.raises(RuntimeError, match=r"k_fp8_scale must be None for an int8 cache"):
        _append(k, kc.to(INT8), vc.to(INT8), table, seqlens, s8, s8, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"k_fp8_scale is required for a float8_e4m3fn"):
        _append(k, kc.to(FP8), vc.to(FP8), table, seqlens)
    with pytest.raises(RuntimeError, match=r"v_fp8_scale must be a contiguous \(kv_heads,\)"):
        _append(k, kc.to(FP8), vc.to(FP8), table, seqlens, kf=torch.ones(2), vf=torch.ones(3))
    with pytest.raises(RuntimeError, match=r"k_fp8_scale\[1\] = 0 must be finite and > 0"):
        _append(k, kc.to(FP8), vc.to(FP8), table, seqlens, kf=torch.tensor([1.0, 0.0]),
                vf=torch.ones(2))
    with pytest.raises(RuntimeError, match=r"k_scale_cache must be None for an unquantized"):
        _append(k, kc, vc, table, seqlens, s8, s8)
    with pytest.raises(RuntimeError, match=r"kvcache_append: k has 4 heads but k_cache has "
                                           r"kv_heads = 2"):
        _append(torch.randn(2, 2, 4, 16, dtype=BF16), kc, vc, table, seqlens)
    with pytest.raises(RuntimeError, match=r"k must have the batch of block_table"):
        _append(k[:1], kc, vc, table, seqlens)
    with pytest.raises(RuntimeError, match=r"cu_new must have batch \+ 1 = 3 entries"):
        _append(k[0], kc, vc, table, seqlens, cu=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cu_new must end at the number of packed rows"):
        _append(k[0], kc, vc, table, seqlens, cu=torch.tensor([0, 1, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"positions is given but inv_freq is not"):
        _append(k, kc, vc, table, seqlens, pos=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"inv_freq has 9 frequencies"):
        _append(k, kc, vc, table, seqlens, inv=torch.ones(9))
    with pytest.raises(RuntimeError, match=r"block_table must have dtype Int"):
        _append(k, kc, vc, table.long(), seqlens)
    with pytest.raises(RuntimeError, match=r"cache_seqlens must have one entry per row"):
        _append(k, kc, vc, table, seqlens[:1])


def test_attention_errors_name_the_argument():
    _, kc, vc, table, seqlens = _small()
    q = torch.randn(2, 1, 4, 16, dtype=BF16)

    def attn(q=q, kc=kc, vc=vc, table=table, seqlens=seqlens, cu=None, mq=1, causal=False,
             wr=-1, splits=0, ksc=None, vsc=None, kf=None, vf=None):
        return ops.flash_attn_with_kvcache(q, kc, vc, ksc, vsc, kf, vf, table, seqlens, cu, mq,
                                           0.25, causal, -1, wr, splits)

    attn()  # sanity
    with pytest.raises(RuntimeError, match=r"flash_attn_with_kvcache: block_table\[1\]\[0\] = 7 "
                                           r"is not a page"):
        attn(table=torch.tensor([[0, 1], [7, 3]], dtype=torch.int32),
             seqlens=torch.tensor([3, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 9 tokens need 3 pages of 4 "
                                           r"but block_table has 2 columns"):
        attn(seqlens=torch.tensor([9, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"k_cache must have the dtype of q"):
        attn(q=q.half())
    with pytest.raises(RuntimeError, match=r"q heads must be a multiple of the kv_heads"):
        attn(q=torch.randn(2, 1, 3, 16, dtype=BF16))
    with pytest.raises(RuntimeError, match=r"q has head_dim 32 but k_cache has head_dim = 16"):
        attn(q=torch.randn(2, 1, 4, 32, dtype=BF16))
    with pytest.raises(RuntimeError, match=r"window_right must be -1 or 0 with causal"):
        attn(causal=True, wr=3)
    with pytest.raises(RuntimeError, match=r"num_splits must lie in \[0, 1024\]"):
        attn(splits=-1)
    with pytest.raises(RuntimeError, match=r"num_splits must lie in \[0, 1024\]"):
        attn(splits=1025)  # the same bound as on CUDA
    with pytest.raises(RuntimeError, match=r"cu_seqlens_q describes sequence 0 of length 2"):
        attn(q=q[0].expand(2, 4, 16).contiguous(), cu=torch.tensor([0, 2, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"v_cache must have the shape of k_cache"):
        attn(vc=vc[:, :2])
    with pytest.raises(RuntimeError, match=r"k_cache must have 4 dimensions"):
        attn(kc=kc[0], vc=vc[0])


def test_paged_cache_manager():
    c = longctx.PagedKVCache(4, 8, 1, 16, max_blocks_per_seq=3)
    a, b = c.add_sequence(), c.add_sequence()
    c.reserve(a, 17)
    assert c.pages(a) == [0, 1, 2] and c.num_free_blocks == 1
    with pytest.raises(RuntimeError, match=r"out of pages: sequence 1 needs 2 more, 1 are free"):
        c.reserve(b, 9)
    with pytest.raises(RuntimeError, match=r"more than max_blocks_per_seq = 3"):
        c.reserve(a, 25)
    c.free(a)
    c.reserve(b, 9)
    assert c.pages(b) == [0, 1] or len(set(c.pages(b))) == 2
    assert c.block_table([b]).tolist() == [c.pages(b) + [-1]]
    with pytest.raises(KeyError, match=r"no live sequence 0"):
        c.seqlen(a)
    with pytest.raises(ValueError, match=r"cache_dtype"):
        longctx.PagedKVCache(4, 8, 1, 16, cache_dtype=torch.float16)


def _reserve_new_tokens(c, ids, gen):
    """Pages for 20 and 30 more tokens of the two sequences `ids` of c (kv_heads 2, head_dim
    32) and those tokens: (k, v, cache_seqlens before, block_table, cu_new)."""
    k = keys_with_outliers(50, 2, 32, generator=gen)
    v = torch.randn(50, 2, 32, generator=gen).to(BF16)
    lens = c.cache_seqlens(ids)
    for sid, n in zip(ids, (20, 30)):
        c.reserve(sid, c.seqlen(sid) + n)
    return k, v, lens, c.block_table(ids), _cu([20, 30])


def test_int8_scales_head_major_equals_slot_major():
    """int8_scales / PagedKVCache store the scales head-major within a page (logical shape
    (num_blocks, block_size, kv_heads)); append and attention through them give bitwise the
    results of slot-major (contiguous) scale tensors."""
    s = longctx.int8_scales(5, 16, 3)
    assert s.shape == (5, 16, 3) and s.stride() == (48, 1, 16) and s.dtype == torch.float32
    assert (s == 0).all()
    with pytest.raises(ValueError, match=r"int8_scales: .*>= 1"):
        longctx.int8_scales(0, 16, 3)
    gen = torch.Generator().manual_seed(31)
    c, ids, _, _ = _fill_cache([40, 77], 2, 32, 16, BF16, INT8, gen=gen)
    assert c.k_scale.stride() == (32, 1, 16) and c.v_scale.stride() == (32, 1, 16)
    # the same appends into slot-major scale tensors
    k, v, lens, table, cu = _reserve_new_tokens(c, ids, gen)
    slot = [c.k_scale.contiguous(), c.v_scale.contiguous()]
    pools = [c.k_cache.clone(), c.v_cache.clone()]
    head = [c.k_scale.clone(), c.v_scale.clone()]
    longctx.kvcache_append(k, v, c.k_cache, c.v_cache, lens, table, k_scale=c.k_scale,
                           v_scale=c.v_scale, cu_new=cu)
    longctx.kvcache_append(k, v, pools[0], pools[1], lens, table, k_scale=slot[0],
                           v_scale=slot[1], cu_new=cu)
    assert torch.equal(c.k_cache, pools[0]) and torch.equal(c.v_cache, pools[1])
    assert torch.equal(c.k_scale, slot[0]) and torch.equal(c.v_scale, slot[1])
    assert not torch.equal(c.k_scale, head[0])  # the append wrote scales
    q = torch.randn(2, 1, 4, 32, generator=gen).to(BF16)
    lens = lens + torch.tensor([20, 30], dtype=torch.int32)
    o1 = longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, lens, table, causal=True,
                                         k_scale=c.k_scale, v_scale=c.v_scale)
    o2 = longctx.flash_attn_with_kvcache(q, pools[0], pools[1], lens, table, causal=True,
                                         k_scale=slot[0], v_scale=slot[1])
    assert torch.equal(o1, o2) and o1.abs().max() > 0


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=["bf16", "int8", "fp8"])
def test_kv_pool_head_major_equals_token_major(cache_dtype):
    """kv_pool / PagedKVCache store each page head-major (memory (blocks, kv_heads, block_size,
    d) behind the ops' (blocks, block_size, kv_heads, d) view) where a key row is narrower than
    256 bytes; append and attention through such pools give bitwise the results of token-major
    (contiguous) pools."""
    p = longctx.kv_pool(5, 16, 3, 8, dtype=INT8)
    assert p.shape == (5, 16, 3, 8) and p.stride() == (384, 8, 128, 1) and p.dtype == INT8
    assert (p == 0).all()
    with pytest.raises(ValueError, match=r"kv_pool: .*head_dim must be >= 1, got \(5, 16, 3, 0\)"):
        longctx.kv_pool(5, 16, 3, 0)
    # head-major by default where a key row is narrower than 256 bytes, else token-major
    assert longctx.kv_pool(2, 16, 2, 128, dtype=INT8).stride() == (4096, 128, 2048, 1)
    assert longctx.kv_pool(2, 16, 2, 120, dtype=BF16).stride() == (3840, 120, 1920, 1)
    assert longctx.kv_pool(2, 16, 2, 128, dtype=BF16).is_contiguous()
    assert longctx.kv_pool(2, 16, 2, 256, dtype=FP8).is_contiguous()
    assert longctx.kv_pool(2, 16, 2, 64, dtype=BF16, head_major=False).is_contiguous()
    assert longctx.kv_pool(2, 16, 2, 256, head_major=True).stride() == (8192, 256, 4096, 1)
    gen = torch.Generator().manual_seed(37)
    fp8 = dict(k_scale=0.05, v_scale=0.04) if cache_dtype == FP8 else {}
    c, ids, _, _ = _fill_cache([40, 77], 2, 32, 16, BF16, cache_dtype, gen=gen, **fp8)
    assert c.k_cache.stride() == (1024, 32, 512, 1) and c.v_cache.stride() == (1024, 32, 512, 1)
    scales = dict(k_scale=c.k_scale, v_scale=c.v_scale)
    tok = [c.k_cache.contiguous(), c.v_cache.contiguous()]
    tok_scales = {n: t.clone() for n, t in scales.items() if t is not None}
    k, v, lens, table, cu = _reserve_new_tokens(c, ids, gen)
    before = c.k_cache.clone()
    longctx.kvcache_append(k, v, c.k_cache, c.v_cache, lens, table, cu_new=cu, **scales)
    longctx.kvcache_append(k, v, tok[0], tok[1], lens, table, cu_new=cu, **tok_scales)
    assert c.k_cache.stride() == (1024, 32, 512, 1)
    assert not torch.equal(c.k_cache.view(torch.uint8), before.view(torch.uint8))
    assert torch.equal(c.k_cache.view(torch.uint8), tok[0].view(torch.uint8))
    assert torch.equal(c.v_cache.view(torch.uint8), tok[1].view(torch.uint8))
    q = torch.randn(2, 3, 4, 32, generator=gen).to(BF16)
    lens = lens + torch.tensor([20, 30], dtype=torch.int32)
    o1 = longctx.flash_attn_with_kvcache(q, c.k_cache, c.v_cache, lens, table, causal=True,
                                         **scales)
    o2 = longctx.flash_attn_with_kvcache(q, tok[0], tok[1], lens, table, causal=True,
                                         **tok_scales)
    assert torch.equal(o1, o2) and o1.abs().max() > 0


# ---- opcheck and torch.compile --------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=["bf16", "int8", "fp8"])
def test_opcheck(cache_dtype):
    gen = torch.Generator().manual_seed(11)
    hk, d, bs = 2, 32, 16
    kc = torch.zeros(6, bs, hk, d, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    ksc = vsc = kf = vf = None
    if cache_dtype == INT8:
        ksc, vsc = torch.zeros(6, bs, hk), torch.zeros(6, bs, hk)
    if cache_dtype == FP8:
        kf, vf = torch.full((hk,), 0.05), torch.full((hk,), 0.07)
    table = torch.tensor([[4, 1, 0], [2, 3, 5]], dtype=torch.int32)
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    k = torch.randn(2, 9, hk, d, generator=gen).to(BF16)
    inv = longctx.rope_frequencies(d, base=10000.0).inv_freq
    # test_schema compares tensors with allclose, which torch does not implement for fp8
    utils = (("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if cache_dtype == FP8 else None)
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(ops.kvcache_append.default,
                          (k, k, kc, vc, ksc, vsc, kf, vf, table, seqlens, None, None, inv, 1.0,
                           False, True), **kw)
    q = torch.randn(2, 3, 8, d, generator=gen).to(BF16)
    torch.library.opcheck(ops.flash_attn_with_kvcache.default,
                          (q, kc, vc, ksc, vsc, kf, vf, table, seqlens + 9, None, 3, 0.2, True,
                           -1, -1, 2, True), **kw)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    torch.library.opcheck(ops.flash_attn_with_kvcache.default,
                          (q[0], kc, vc, ksc, vsc, kf, vf, table, seqlens, cu, 2, 0.2, False, 4,
                           -1, 0, True), **kw)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(12)
    h, hk, d, bs = 4, 2, 32, 16
    c, ids, ks, vs = _fill_cache([30, 70], hk, d, bs, BF16, INT8, gen=gen)
    q = torch.randn(2, 1, h, d, generator=gen).to(BF16)
    args = (q, c.k_cache, c.v_cache, c.cache_seqlens(ids), c.block_table(ids), c.k_scale,
            c.v_scale)

    def f(q, kc, vc, seqlens, table, ks, vs):
        out, lse = longctx.flash_attn_with_kvcache(q, kc, vc, seqlens, table, causal=True,
                                                   return_lse=True, k_scale=ks, v_scale=vs,
                                                   num_splits=2)
        return out.float().square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), f(*args))

    # the mutating append inside a compiled function (functionalized, written back)
    def g(q, kc, vc, seqlens, table, ks, vs, knew):
        return longctx.flash_attn_with_kvcache(q, kc, vc, seqlens, table, k=knew, v=knew,
                                               causal=True, k_scale=ks, v_scale=vs)

    for s in ids:
        c.reserve(s, c.seqlen(s) + 1)
    knew = torch.randn(2, 1, hk, d, generator=gen).to(BF16)
    snap = [t.clone() for t in (c.k_cache, c.v_cache, c.k_scale, c.v_scale)]
    args2 = (q, c.k_cache, c.v_cache, c.cache_seqlens(ids), c.block_table(ids), c.k_scale,
             c.v_scale, knew)
    out_c = torch.compile(g, fullgraph=True, backend="aot_eager")(*args2)
    after_c = [t.clone() for t in (c.k_cache, c.v_cache, c.k_scale, c.v_scale)]
    for t, s in zip((c.k_cache, c.v_cache, c.k_scale, c.v_scale), snap):
        t.copy_(s)
    out_e = g(*args2)
    assert torch.equal(out_c, out_e)
    for a, b in zip(after_c, (c.k_cache, c.v_cache, c.k_scale, c.v_scale)):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_build_info_lists_kvcache_cpu():
    fams = {(e["family"], e["device"]) for e in longctx.build_info()["kernels"]}
    assert ("kvcache", "cpu") in fams

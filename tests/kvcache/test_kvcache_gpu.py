"""GPU tests of the paged KV cache (CUDA kernels of kvcache_append / flash_attn_with_kvcache).

Accuracy rules (as in test_kvcache_cpu.py):
- append without RoPE is bitwise the CPU op (same quant.h arithmetic); with RoPE it is bitwise
  GPU apply_rope followed by an append (same device sincosf), and close to the CPU op;
- attention (decode split-KV path and gather + forward prefill path) is compared with the float64
  reference on the dequantized K/V under FlashAttention-3's rule (err <= 2 * err of PyTorch in
  the same precision + atol), so the fused dequantization must be right;
- chunked prefill vs one pass: close within bf16 rounding, both close to the reference.
"""
import math

import pytest
import torch

import longctx
from attention_reference import assert_fa3_close, attention_varlen_ref
from kvcache_reference import check_append_writes_only_new_slots, gather_kv, keys_with_outliers

pytestmark = pytest.mark.gpu

ops = torch.ops.longctx
BF16, FP16 = torch.bfloat16, torch.float16
INT8, FP8 = torch.int8, torch.float8_e4m3fn
FMT_IDS = {BF16: "bf16", FP16: "fp16", INT8: "int8", FP8: "fp8"}


def _cuda_compiled(family):
    return any(k["family"] == family and k["device"] == "cuda"
               for k in longctx.build_info()["kernels"])


def _flash_fwd_compiled(d, dtype):
    name = "bf16" if dtype == BF16 else "fp16"
    return any(k["family"] == "flash_fwd" and k["device"] == "cuda" and f"hdim{d}" in k["features"]
               and name in k["dtypes"] for k in longctx.build_info()["kernels"])


_CACHE_FEATURE = {BF16: "cache_bf16", FP16: "cache_fp16", INT8: "cache_int8",
                  FP8: "cache_fp8_e4m3"}


def _decode_compiled(cache_dtype, dtype=None):
    """Whether the decode kernels of the cache format for queries of dtype (default: the tests'
    choice, fp16 for an fp16 cache and bf16 otherwise) are in the build: each (format, dtype)
    instantiation registers its own entry (csrc/generate_kernels.py)."""
    name = FMT_IDS[dtype or (FP16 if cache_dtype == FP16 else BF16)]
    return any(k["family"] == "kvcache" and k["device"] == "cuda" and "decode" in k["features"]
               and _CACHE_FEATURE[cache_dtype] in k["features"] and name in k["dtypes"]
               for k in longctx.build_info()["kernels"])


@pytest.fixture(autouse=True)
def _needs_kernels(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the kvcache kernels need a Hopper GPU (sm_90)")
    if not _cuda_compiled("kvcache"):
        pytest.skip("kvcache CUDA kernels not compiled in this build")
    # A build restricted by LONGCTX_DTYPES may lack a format's decode kernels (a full build has
    # them all: test_build_info_lists_every_decode_instantiation).
    callspec = getattr(request.node, "callspec", None)
    cache_dtype = callspec.params.get("cache_dtype") if callspec is not None else None
    if cache_dtype in _CACHE_FEATURE and not _decode_compiled(cache_dtype):
        pytest.skip(f"the {FMT_IDS[cache_dtype]} cache's decode kernels are not in this build")


def _cu(lens, device="cpu"):
    return torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def _int8_scales(num_blocks, bs, hk, layout):
    """Random (num_blocks, bs, hk) int8 scales stored in `layout` (the staged decode kernel's
    scale copies depend on it, csrc/include/longctx/kvcache/decode_launch.cuh):
    "head": head-major within a page, as PagedKVCache / longctx.int8_scales store them (4-byte
    copies per key, contiguous per tile);
    "slot": contiguous (slot-major; all heads' scales of a slot copied where hk <= 8);
    "head_odd": head-major with a head stride of bs + 1 and a base one float past a 16-byte
    boundary (nothing aligned)."""
    def make():
        if layout == "slot":
            return torch.rand(num_blocks, bs, hk) * 0.05
        pad = {"head": 0, "head_odd": 1}[layout]
        flat = torch.rand(num_blocks * hk * (bs + pad) + 4) * 0.05
        start = 1 if layout == "head_odd" else 0
        return flat[start:start + num_blocks * hk * (bs + pad)].view(
            num_blocks, hk, bs + pad)[:, :, :bs].transpose(1, 2)
    return make(), make()


def _to(t, device):
    """t on device with its strides and its offset within the storage (the layout under test)."""
    if t.device.type == device:
        return t
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return base.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def _pool(num_blocks, bs, hk, d, cache_dtype, device, scale_layout="head"):
    """Random pool contents (so stale values would show), scales of each format."""
    shape = (num_blocks, bs, hk, d)
    if cache_dtype == INT8:
        kc = torch.randint(-127, 128, shape, dtype=INT8)
        vc = torch.randint(-127, 128, shape, dtype=INT8)
        ks, vs = _int8_scales(num_blocks, bs, hk, scale_layout)
        return [t.to(device) for t in (kc, vc)], (_to(ks, device), _to(vs, device)), (None, None)
    if cache_dtype == FP8:
        kc = (torch.randn(shape) * 50).to(FP8)
        vc = (torch.randn(shape) * 50).to(FP8)
        kf, vf = torch.rand(hk) * 0.05 + 0.01, torch.rand(hk) * 0.05 + 0.01
        return [t.to(device) for t in (kc, vc)], (None, None), (kf.to(device), vf.to(device))
    kc = torch.randn(shape).to(cache_dtype)
    vc = torch.randn(shape).to(cache_dtype)
    return [kc.to(device), vc.to(device)], (None, None), (None, None)


def _random_table(batch, max_blocks, num_blocks, gen):
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]
    return perm.view(batch, max_blocks).to(torch.int32)


def _bytes(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.float32 else t.view(torch.int32)


# ---- append ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dtype,dtype", [(BF16, BF16), (FP16, FP16), (INT8, BF16),
                                               (FP8, BF16), (INT8, FP16), (FP8, FP16)],
                         ids=["bf16", "fp16", "int8-bf16", "fp8-bf16", "int8-fp16", "fp8-fp16"])
@pytest.mark.parametrize("bs,d", [(16, 128), (5, 64), (1, 96)], ids=["bs16-d128", "bs5-d64",
                                                                     "bs1-d96"])
def test_append_matches_cpu(cache_dtype, dtype, bs, d):
    gen = torch.Generator().manual_seed(1)
    hk, batch = 3, 4
    lens_before, new = [7, 0, 33, 2], [5, 19, 1, 0]
    max_blocks = -(-max(a + b for a, b in zip(lens_before, new)) // bs)
    num_blocks = batch * max_blocks + 3
    table = _random_table(batch, max_blocks, num_blocks, gen)
    seqlens = torch.tensor(lens_before, dtype=torch.int32)
    k = keys_with_outliers(sum(new), hk, d, dtype=dtype, generator=gen)
    v = torch.randn(sum(new), hk, d, generator=gen).to(dtype)
    cu = _cu(new)
    res = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(5)
        (kc, vc), (ksc, vsc), (kf, vf) = _pool(num_blocks, bs, hk, d, cache_dtype, "cpu")
        t = [x.to(dev) if x is not None else None for x in (kc, vc, ksc, vsc, kf, vf)]
        ops.kvcache_append(k.to(dev), v.to(dev), t[0], t[1], t[2], t[3], t[4], t[5],
                           table.to(dev), seqlens.to(dev), cu.to(dev), None, None, 1.0, False,
                           True)
        res[dev] = [x.cpu() for x in t[:4] if x is not None]
    for a, b in zip(res["cpu"], res["cuda"]):
        assert torch.equal(_bytes(a), _bytes(b))


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=["bf16", "int8", "fp8"])
@pytest.mark.parametrize("interleaved,partial,scaling",
                         [(False, False, None), (True, True, "yarn"), (False, True, "llama3")],
                         ids=["neox", "interleaved-partial-yarn", "neox-partial-llama3"])
@pytest.mark.parametrize("d", [128, 96], ids=["d128", "d96"])
def test_append_rope_equals_apply_rope_then_append(cache_dtype, interleaved, partial, scaling, d):
    """head_dim 96: Phi-3's (LongRoPE models), partial rotary 64 of it."""
    if not _cuda_compiled("rope"):
        pytest.skip("the CUDA RoPE kernels are not compiled in this build")
    gen = torch.Generator().manual_seed(2)
    hk, bs = 2, 16
    sc = {"yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
          "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
          None: None}[scaling]
    rf = longctx.rope_frequencies(d, base=500000.0, rotary_dim=d * 3 // 4 if partial else None,
                                  scaling=sc)
    inv = rf.inv_freq.cuda()
    lens_before, new = [5, 0, 33], [7, 20, 1]
    cu = _cu(new, "cuda")
    k = keys_with_outliers(sum(new), hk, d, generator=gen).cuda()
    v = torch.randn(sum(new), hk, d, generator=gen).to(BF16).cuda()
    positions = torch.randint(0, 200000, (sum(new),), generator=gen).cuda()
    table = _random_table(3, 4, 14, gen).cuda()
    seqlens = torch.tensor(lens_before, dtype=torch.int32).cuda()
    for pos in (None, positions):
        outs = []
        for fused in (True, False):
            torch.manual_seed(6)
            (kc, vc), (ksc, vsc), (kf, vf) = _pool(14, bs, hk, d, cache_dtype, "cuda")
            if fused:
                ops.kvcache_append(k, v, kc, vc, ksc, vsc, kf, vf, table, seqlens, cu, pos, inv,
                                   rf.attention_factor, interleaved, True)
            else:
                p = pos if pos is not None else torch.cat(
                    [torch.arange(a, a + b) for a, b in zip(lens_before, new)]).cuda()
                kr, _ = longctx.apply_rope(k.clone(), None, p, inv, rf.attention_factor,
                                           interleaved=interleaved)
                ops.kvcache_append(kr, v, kc, vc, ksc, vsc, kf, vf, table, seqlens, cu, None,
                                   None, 1.0, False, True)
            outs.append((kc, vc, ksc, vsc))
        (ka, va, ksa, vsa), (kb, vb, ksb, vsb) = outs
        # V (never rotated) and its scales: bitwise
        assert torch.equal(_bytes(va), _bytes(vb))
        if vsa is not None:
            assert torch.equal(vsa, vsb)
        # K: the rotation is the same rope_math.h code in both kernels, but nvcc may contract
        # x1 * cos - x2 * sin into an FMA differently in each, so a rare element differs by one
        # rounding of the rotated bf16 value (seen once in 9 cases): at most one step per element
        # and a small fraction of the elements.
        if cache_dtype == BF16:
            x, y = ka.float(), kb.float()
            bad = x != y
            assert ((x - y).abs() <= 2 ** -7 * x.abs().clamp_min(2 ** -20))[bad].all()
        elif cache_dtype == INT8:
            x, y = ka.int(), kb.int()
            bad = x != y
            assert ((x - y).abs() <= 1).all()
            assert ((ksa - ksb).abs() <= 2 ** -7 * ksa.abs()).all()
        else:
            x, y = ka.float(), kb.float()
            bad = x != y
            assert ((x - y).abs() <= 2 ** -3 * x.abs())[bad].all()
        assert bad.float().mean() <= 2e-3, f"{int(bad.sum())} of {bad.numel()} K elements differ"
    # and close to the CPU op (host sin/cos differ from the device's in the last bit)
    if cache_dtype == BF16:
        torch.manual_seed(6)
        (kc, vc), _, _ = _pool(14, bs, hk, d, BF16, "cpu")
        kc_gpu = kc.cuda()
        ops.kvcache_append(k.cpu(), v.cpu(), kc, vc, None, None, None, None, table.cpu(),
                           seqlens.cpu(), cu.cpu(), positions.cpu(), rf.inv_freq,
                           rf.attention_factor, interleaved, True)
        ops.kvcache_append(k, v, kc_gpu, vc.cuda(), None, None, None, None, table, seqlens, cu,
                           positions, inv, rf.attention_factor, interleaved, True)
        diff = (kc_gpu.cpu().float() - kc.float()).abs()
        assert diff.max() <= 2 ** -7 * kc.float().abs().max()


def test_append_unvalidated_bad_pages_not_written():
    hk, d, bs = 2, 64, 4
    kc = torch.full((6, bs, hk, d), math.nan, dtype=BF16, device="cuda")
    vc = kc.clone()
    table = torch.tensor([[0, 99], [2, -5]], dtype=torch.int32, device="cuda")
    seqlens = torch.tensor([2, 3], dtype=torch.int32, device="cuda")
    k = torch.ones(2, 3, hk, d, dtype=BF16, device="cuda")
    before = kc.clone()
    ops.kvcache_append(k, k, kc, vc, None, None, None, None, table, seqlens, None, None, None,
                       1.0, False, False)
    assert (kc[0, 2:] == 1).all() and (kc[2, 3] == 1).all()
    untouched = torch.ones(6, bs, dtype=torch.bool, device="cuda")
    untouched[0, 2:] = False
    untouched[2, 3] = False
    assert torch.equal(kc[untouched].view(torch.int16), before[untouched].view(torch.int16))
    # attention masks keys on invalid pages: sequence 0 with 5 keys sees keys 0..3 only
    kc.nan_to_num_(0.0)
    vc.normal_()
    q = torch.randn(2, 1, 4, d, dtype=BF16, device="cuda")
    out, lse = ops.flash_attn_with_kvcache(q, kc, vc, None, None, None, None, table,
                                           seqlens + 3, None, 1, 0.125, True, -1, -1, 0, False)
    ref, ref_lse = attention_varlen_ref(q[0].cpu(), kc[0].cpu(), vc[0].cpu(), [0, 1], [0, 4],
                                        0.125, False)
    assert (out[0].cpu().double() - ref).abs().max() < 1e-2
    assert (lse[0].cpu().double() - ref_lse).abs().max() < 1e-3


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=["bf16", "int8", "fp8"])
def test_nothing_written_outside_own_slots(cache_dtype):
    check_append_writes_only_new_slots(cache_dtype, 64, "cuda", torch.Generator().manual_seed(3))


# ---- attention ------------------------------------------------------------------------------

def _device_pools(kc, vc, combined=False, pad=0, head_major=False):
    """The pools on the GPU: two tensors, or k_cache = kv[:, 0] and v_cache = kv[:, 1] of one
    combined pool (strided pages); pad > 0 pads every head row by `pad` elements (the pools are
    [..., :head_dim] views, the padding poisoned: a kernel that read it would fail the test);
    head_major: each page stored (kv_heads, block_size, d), the op's (block_size, kv_heads, d)
    view a transpose of it (a kv head's page one contiguous run of key rows)."""
    d = kc.shape[-1]
    page = kc.shape[1:-1][::-1] if head_major else kc.shape[1:-1]
    shape = (kc.shape[0],) + ((2,) if combined else ()) + page + (d + pad,)
    bufs = [torch.empty(shape, dtype=kc.dtype, device="cuda") for _ in range(1 if combined else 2)]
    for buf in bufs:
        buf.view(torch.uint8).fill_(0x7F)  # int8 127, fp8 NaN, bf16 3e38, fp16 NaN
    if combined:
        pools = [bufs[0][:, 0], bufs[0][:, 1]]
    else:
        pools = bufs
    if head_major:
        pools = [p.transpose(1, 2) for p in pools]
    pools = [p[..., :d] for p in pools]
    for dst, src in zip(pools, (kc, vc)):
        dst.copy_(src)
    return pools


def _check_attention(cache_dtype, dtype, h, hk, d, bs, lens, q_lens, causal, window, splits,
                     packed, combined=False, pad=0, gen=None, scale_layout="head",
                     table_blocks=0, softcap=0.0, sinks=None, check=True, q_pad=0,
                     head_major=False):
    """Random pool + table, attention vs the float64 reference on the dequantized K/V.
    head_major: the pools stored head-major within a page (_device_pools).
    q_pad > 0: q is the [..., :d] view of rows of d + q_pad elements whose padding is NaN (a
    kernel that read q past head_dim would turn its rows NaN).
    table_blocks: the block table's width (its capacity, which the staged kernel's tile order
    depends on); the columns past a sequence's pages are -1, as PagedKVCache pads them.
    softcap, sinks (CPU fp32 (h,)): the logit modifiers, passed to the op and the reference.
    check=False: only the op's (out, lse)."""
    batch = len(lens)
    max_blocks = max(1, -(-max(lens) // bs))
    num_blocks = batch * max_blocks + 5
    table = _random_table(batch, max_blocks, num_blocks, gen)
    if table_blocks > max_blocks:
        table = torch.cat([table, table.new_full((batch, table_blocks - max_blocks), -1)], 1)
    (kc, vc), (ksc, vsc), (kf, vf) = _pool(num_blocks, bs, hk, d, cache_dtype, "cpu",
                                           scale_layout)
    if cache_dtype in (BF16, FP16):
        kc = keys_with_outliers(num_blocks, bs, hk, d, dtype=cache_dtype, generator=gen)
    kc_d, vc_d = _device_pools(kc, vc, combined, pad, head_major)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if packed:
        q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype)
        cu_q = _cu(q_lens)
    else:
        q = torch.randn(batch, q_lens[0], h, d, generator=gen).to(dtype)
        cu_q = None
    cd = lambda x: None if x is None else _to(x, "cuda")  # noqa: E731
    left, right = window
    if causal:
        right = 0
    q_d = q.cuda()
    if q_pad:
        q_buf = torch.full(q.shape[:-1] + (d + q_pad,), math.nan, dtype=dtype, device="cuda")
        q_buf[..., :d] = q_d
        q_d = q_buf[..., :d]
    out, lse = ops.flash_attn_with_kvcache(
        q_d, kc_d, vc_d, cd(ksc), cd(vsc), cd(kf), cd(vf), table.cuda(), seqlens.cuda(),
        cd(cu_q), max(q_lens), 1.0 / math.sqrt(d), causal, left, right, splits, True, cd(sinks),
        softcap)
    out, lse = out.cpu(), lse.cpu()
    if not check:
        return out, lse
    ks_, vs_ = (ksc, vsc) if cache_dtype == INT8 else (kf, vf)
    deq = [gather_kv(kc, vc, table, n, b, ks_, vs_) for b, n in enumerate(lens)]
    kd, vd = torch.cat([x[0] for x in deq]), torch.cat([x[1] for x in deq])
    qf = q if packed else q.flatten(0, 1)
    cq = cu_q if packed else _cu([q_lens[0]] * batch)
    ck = _cu(lens)
    # float64 truth on the GPU (tens of seconds per call on the CPU at 40K keys)
    out64, lse64 = attention_varlen_ref(qf.double().cuda(), kd.cuda(), vd.cuda(), cq, ck, None,
                                        causal, window, True, softcap,
                                        None if sinks is None else sinks.double().cuda())
    out64, lse64 = out64.cpu(), lse64.cpu()
    out_pt, lse_pt = attention_varlen_ref(qf, kd.to(dtype), vd.to(dtype), cq, ck, None, causal,
                                          window, False, softcap, sinks)
    of = out if packed else out.flatten(0, 1)
    lf = lse if packed else lse.permute(1, 0, 2).flatten(1, 2)
    assert_fa3_close("out", of, out64, out_pt, dtype)
    assert_fa3_close("lse", lf, lse64, lse_pt, dtype)
    return out, lse


# The decode kernel is chosen by the cache's layout (csrc/include/longctx/kvcache/
# decode_choice.h; tests/kvcache/decode_choice_test.cpp checks the choice on the CPU): caches of
# every format at head_dim 64/128 whose page, slot and head strides are multiples of 16 bytes and
# whose page size is a multiple of 16 run the cp.async-staged tensor-core kernel (every 16-bit
# pool with such a page size); other head_dim 128 caches with 16-byte-aligned rows the register
# tensor-core kernel (page size 8: the last DECODE_CASES entry); the rest the CUDA-core kernel.
# Other head dims run the kernels of the next width up (test_decode_padded_head_dims).
# int8 scales: copied per key when head-major within a page (as PagedKVCache stores them) or
# slot-major with more than 8 kv heads, as whole 16-byte lines of all kv heads' scales when
# slot-major with <= 8 kv heads. The variants run every kernel on the same cases:
# - default: contiguous pools, head-major int8 scales;
# - fallback_layout: pools whose head rows are padded by 8 elements (head_dim + 8: strides
#   still multiples of 8 elements, as the launcher requires, but not of 16 bytes for 8-bit
#   caches), so 8-bit caches take the CUDA-core kernel instead of the staged one; 16-bit caches
#   stay on the staged kernel with strided (16-byte padded) rows;
# - slot_major_scales: int8 scales stored slot-major (int8 only).
VARIANTS = {"default": (0, "head"), "fallback_layout": (8, "head"),
            "slot_major_scales": (0, "slot")}


def _variant(variant, cache_dtype):
    """(pool padding, int8 scale layout) of the variant; skips slot_major_scales but for int8."""
    if variant == "slot_major_scales" and cache_dtype != INT8:
        pytest.skip("the scale layout is an int8 variant")
    return VARIANTS[variant]


DECODE_CASES = [  # h, hk, d, bs, causal, window
    (8, 2, 128, 16, True, (-1, -1)),     # GQA 4: one CTA row tile of 4
    (32, 8, 128, 16, True, (-1, -1)),    # the benchmark's GQA 32/8
    (4, 4, 64, 7, False, (-1, -1)),      # MHA, odd page size (8-bit: the CUDA-core kernel)
    (8, 2, 64, 16, True, (-1, -1)),      # head_dim 64 through the staged kernel (8-bit)
    (16, 1, 256, 32, True, (100, -1)),   # group 16: two row tiles; sliding window
    (8, 2, 256, 16, True, (-1, -1)),     # width 256 on the staged kernel, GQA 4
    (4, 4, 256, 8, False, (-1, -1)),     # width 256, page size 8: the CUDA-core kernel
    (6, 2, 128, 64, False, (40, 7)),     # group 3 (tile of 4 with an inactive row), 2-sided
    (12, 3, 128, 32, False, (-1, -1)),   # 3 kv heads: int8 line scales of 12 pieces per pool
    (16, 16, 128, 16, True, (-1, -1)),   # 16 kv heads: slot-major int8 scales copied per key
    (8, 2, 128, 8, True, (-1, -1)),      # page size 8: the register kernel (staged fallback)
]


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=lambda c: f"h{c[0]}-hk{c[1]}-d{c[2]}-bs{c[3]}-"
                         f"{'causal' if c[4] else 'full'}-w{c[5][0]}_{c[5][1]}")
@pytest.mark.parametrize("splits", [0, 1, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_matches_reference(cache_dtype, case, splits, variant):
    """Every decode kernel (see VARIANTS) against the reference."""
    pad, scale_layout = _variant(variant, cache_dtype)
    h, hk, d, bs, causal, window = case
    dtype = FP16 if cache_dtype == FP16 else BF16
    gen = torch.Generator().manual_seed(4)
    lens = [0, 1, 300, 1537, 5000]  # an empty sequence, one key, long ones
    out, lse = _check_attention(cache_dtype, dtype, h, hk, d, bs, lens, [1], causal, window,
                                splits, packed=False, pad=pad, gen=gen, scale_layout=scale_layout)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


# The staged kernel deals a row tile's 16-key tiles round-robin to the 4 warps of each of its
# splits: in runs of 2 adjacent tiles where a warp has at least 48 tiles, else one at a time.
TILE_WARPS, PAIRS_FROM = 4, 48


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("case", [DECODE_CASES[i] for i in (1, 3, 5, 6)],
                         ids=lambda c: f"h{c[0]}-hk{c[1]}-d{c[2]}-bs{c[3]}-w{c[5][0]}_{c[5][1]}")
@pytest.mark.parametrize("splits", [3, 7])
@pytest.mark.parametrize("run", [1, 2], ids=["single", "pairs"])
def test_decode_tile_runs(cache_dtype, case, splits, run):
    """The staged kernel's deal orders: single 16-key tiles, or runs of 2 adjacent tiles
    per warp and round-robin step where a warp has at least 48 tiles of the block table's
    capacity (its width x page size, whatever the lengths). The table is padded with -1 columns
    to just below (single) or just at (pairs) that capacity; the lengths end inside a warp's
    run, at the edge of a round over all warps and past it."""
    h, hk, d, bs, causal, window = case
    warps = splits * TILE_WARPS
    threshold_tiles = PAIRS_FROM * warps
    if run == 2:
        table_blocks = -(-threshold_tiles * 16 // bs)
    else:
        table_blocks = (threshold_tiles - 1) * 16 // bs
    capacity = table_blocks * bs
    assert ((capacity + 15) // 16 // warps >= PAIRS_FROM) == (run == 2)
    round_keys = 16 * run * warps
    lens = [17, 16 * run * 3 + 5, round_keys, round_keys + 16 * run * 5 + 3, 4 * round_keys - 7]
    gen = torch.Generator().manual_seed(13)
    dtype = FP16 if cache_dtype == FP16 else BF16
    _check_attention(cache_dtype, dtype, h, hk, d, bs, lens, [1], causal, window, splits,
                     packed=False, gen=gen, table_blocks=table_blocks)


@pytest.mark.parametrize("cache_dtype", [BF16, FP16], ids=FMT_IDS.get)
@pytest.mark.parametrize("h,hk,d,bs", [(32, 8, 128, 16), (16, 16, 128, 64), (32, 8, 64, 16),
                                       (8, 8, 64, 32)],
                         ids=["gqa32_8-d128-bs16", "mha16-d128-bs64", "gqa32_8-d64-bs16",
                              "mha8-d64-bs32"])
@pytest.mark.parametrize("splits", [1, 0, 7])
def test_decode_16bit_staged_odd_lengths(cache_dtype, h, hk, d, bs, splits):
    """16-bit caches on the staged kernel (256- and 128-byte key rows): lengths of one key, one
    short of a tile, one past it and one past 4096 (the last tile holds one key), GQA and MHA,
    one split, the automatic count and several."""
    gen = torch.Generator().manual_seed(25)
    _check_attention(cache_dtype, cache_dtype, h, hk, d, bs, [1, 15, 17, 4097], [1], True,
                     (-1, -1), splits, packed=False, gen=gen)


# Head dims between the compiled widths: head_dim d (a multiple of 8 up to 256) runs the kernels
# of width D, the next of 64/128/256 (decode_choice.h), reading d columns of a key row. 16-bit
# rows (2 d bytes) and 8-bit rows with d a multiple of 16 are whole 16-byte pieces: the staged
# kernel at every width (page size a multiple of 16), else the register kernel at D = 128 and
# the CUDA-core kernel at D = 64 and 256 (page size 8); 8-bit rows of an odd multiple of 8 bytes
# (d = 40, 72) run the CUDA-core kernel. With poison, the pools' head rows are D elements whose
# columns past d hold 0x7F bytes (NaN / 3e38 / int8 127, _device_pools) and q's rows carry 8 NaN
# columns past d: a kernel that read a column past d would fail.
PAD_DIMS = [96, 80, 40, 72, 192]
PAD_CASES = [  # h, hk, bs, causal, window
    (32, 8, 16, True, (-1, -1)),   # GQA 32/8, page 16
    (4, 4, 64, False, (40, 7)),    # MHA, page 64, a two-sided window
    (8, 2, 8, True, (-1, -1)),     # page 8: the register kernel at D = 128 (whole-piece rows)
]


def _kernel_width(d):
    return 64 if d <= 64 else 128 if d <= 128 else 256


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d", PAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("case", PAD_CASES, ids=lambda c: f"h{c[0]}-hk{c[1]}-bs{c[2]}")
@pytest.mark.parametrize("splits", [1, 0, 7])
@pytest.mark.parametrize("poison", [False, True], ids=["contiguous", "poisoned"])
def test_decode_padded_head_dims(cache_dtype, d, case, splits, poison):
    """Head dims 96 (Phi-3), 80, 40, 72 and 192 on every decode kernel against the reference:
    an empty sequence, one key, lengths off the tile and page edges."""
    h, hk, bs, causal, window = case
    dtype = FP16 if cache_dtype == FP16 else BF16
    gen = torch.Generator().manual_seed(31)
    pad = _kernel_width(d) - d if poison else 0
    out, lse = _check_attention(cache_dtype, dtype, h, hk, d, bs, [0, 1, 17, 300, 1537], [1],
                                causal, window, splits, packed=False, pad=pad, gen=gen,
                                q_pad=8 if poison else 0)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d", [96, 80], ids=["d96", "d80"])
@pytest.mark.parametrize("window", [(-1, -1), (200, -1)], ids=["causal", "window200"])
def test_prefill_padded_head_dims(cache_dtype, d, window):
    """The chunked prefill at head dims between the compiled widths: the gather writes d columns
    and the forward kernel of width 128 runs them (pools poisoned past d)."""
    if not _flash_fwd_compiled(_kernel_width(d), BF16):
        pytest.skip(f"flash_fwd hdim{_kernel_width(d)} bf16 not compiled")
    gen = torch.Generator().manual_seed(33)
    _check_attention(cache_dtype, BF16, 8, 2, d, 16, [300, 1000, 77], [100, 513, 77], True,
                     window, 0, packed=True, gen=gen, pad=_kernel_width(d) - d, q_pad=8)


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d,bs", [(128, 16), (64, 16), (128, 8), (64, 8), (96, 16), (96, 8),
                                  (192, 16)],
                         ids=["d128-staged", "d64-staged", "d128-register", "d64-cuda_cores",
                              "d96-staged", "d96-register", "d192-cuda_cores"])
@pytest.mark.parametrize("splits", [1, 7])
def test_decode_nan_key_reaches_its_rows(cache_dtype, d, bs, splits):
    """A NaN in K (int8: a NaN K scale) makes NaN exactly the rows that see its key: the query
    heads of its kv head in its sequence, when the key is inside their window. Every other row is
    bitwise the output without the NaN (a window of 200 keys, GQA 4)."""
    h, hk, window = 8, 2, (200, 0)  # causal: window_right 0
    lens = [1000, 1000, 17]
    # (sequence, key, kv head): visible (last row sees [799, 999]), outside the window, the
    # last key of an odd length
    nans = [(0, 900, 0), (1, 300, 0), (2, 16, 1)]
    reached = [(0, 0), (2, 1)]  # (sequence, kv head) whose rows turn NaN
    gen = torch.Generator().manual_seed(26)
    batch = len(lens)
    max_blocks = -(-max(lens) // bs)
    num_blocks = batch * max_blocks + 5
    table = _random_table(batch, max_blocks, num_blocks, gen)
    torch.manual_seed(27)
    (kc, vc), (ksc, vsc), (kf, vf) = _pool(num_blocks, bs, hk, d, cache_dtype, "cpu")
    q = torch.randn(batch, 1, h, d, generator=gen).to(FP16 if cache_dtype == FP16 else BF16)

    def attend(k_pool, k_scales):
        return ops.flash_attn_with_kvcache(
            q.cuda(), k_pool.cuda(), vc.cuda(), k_scales, None if vsc is None else vsc.cuda(),
            None if kf is None else kf.cuda(), None if vf is None else vf.cuda(), table.cuda(),
            torch.tensor(lens, dtype=torch.int32).cuda(), None, 1, 1.0 / math.sqrt(d), True,
            window[0], window[1], splits, True)

    clean = [x.cpu() for x in attend(kc, None if ksc is None else ksc.cuda())]
    kp, ksp = kc.clone(), None if ksc is None else ksc.clone()
    for b, key, head in nans:
        page, slot = int(table[b, key // bs]), key % bs
        if cache_dtype == INT8:
            ksp[page, slot, head] = math.nan
        elif cache_dtype == FP8:
            kp.view(torch.uint8)[page, slot, head, 5] = 0x7F
        else:
            kp[page, slot, head, 5] = math.nan
    out, lse = [x.cpu() for x in attend(kp, None if ksp is None else ksp.cuda())]
    group = h // hk
    hit = torch.zeros(batch, h, dtype=torch.bool)
    for b, head in reached:
        hit[b, head * group:(head + 1) * group] = True
    assert torch.isnan(out[:, 0][hit]).all() and torch.isnan(lse[:, :, 0][hit]).all()
    assert torch.equal(_bytes(out[:, 0][~hit]), _bytes(clean[0][:, 0][~hit]))
    assert torch.equal(lse[:, :, 0][~hit], clean[1][:, :, 0][~hit])
    assert torch.isfinite(clean[0].float()).all()


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("splits", [255, 300, 1024])
def test_decode_many_splits(cache_dtype, splits):
    """Many splits, up to the op's maximum: most see no key (lse -inf partials), and the merge
    kernel's warps fold several chunks of splits each (8 warps x 8 splits per chunk)."""
    gen = torch.Generator().manual_seed(12)
    _check_attention(cache_dtype, BF16, 8, 1, 64, 16, [700, 4500], [1], True, (-1, -1),
                     splits, packed=False, gen=gen)


# ---- softcap and sinks (longctx/logit_mods.h) ---------------------------------------------------

MODS = [("softcap", 2.5, False), ("sinks", 0.0, True), ("both", 4.0, True)]


def _mod_sinks(h, with_sinks, gen):
    return (torch.randn(h, generator=gen) * 2 + 0.5) if with_sinks else None


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("case", [DECODE_CASES[i] for i in (0, 2, 3, 4)],
                         ids=lambda c: f"h{c[0]}-hk{c[1]}-d{c[2]}-bs{c[3]}")
@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("variant", ["default", "fallback_layout"])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_decode_with_mods(cache_dtype, case, splits, variant, mods):
    """Every decode kernel with softcap and sinks: the sink joins once, where the final row is
    written (num_splits 1) or in the merge (7); an empty sequence gets out = 0, lse = sink."""
    pad, scale_layout = _variant(variant, cache_dtype)
    _, softcap, with_sinks = mods
    h, hk, d, bs, causal, window = case
    dtype = FP16 if cache_dtype == FP16 else BF16
    gen = torch.Generator().manual_seed(21)
    sinks = _mod_sinks(h, with_sinks, gen)
    out, lse = _check_attention(cache_dtype, dtype, h, hk, d, bs, [0, 1, 300, 1537], [1],
                                causal, window, splits, packed=False, pad=pad, gen=gen,
                                scale_layout=scale_layout, softcap=softcap, sinks=sinks)
    assert (out[0] == 0).all()
    if with_sinks:
        assert torch.equal(lse[0, :, 0], sinks)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8], ids=FMT_IDS.get)
@pytest.mark.parametrize("splits", [1, 7])
def test_decode_sink_edge_values(cache_dtype, splits):
    """A -inf sink is bitwise no sink; a NaN sink makes its head's rows NaN only (same pool,
    table and queries in every run: the same generator seed)."""
    h = 8
    sinks = torch.randn(h, generator=torch.Generator().manual_seed(22)) * 2 + 0.5

    def run(s):
        torch.manual_seed(23)  # (the 8-bit pools draw from the global generator)
        return _check_attention(cache_dtype, BF16, h, 2, 128, 16, [0, 300, 1537], [1], True,
                                (-1, -1), splits, packed=False,
                                gen=torch.Generator().manual_seed(23), sinks=s, check=False)

    o0, l0 = run(None)
    o1, l1 = run(torch.full((h,), -math.inf))
    assert torch.equal(o0, o1) and torch.equal(l0, l1)
    base, lbase = run(sinks)
    sinks[5] = math.nan
    out, lse = run(sinks)
    assert torch.isnan(out[:, :, 5]).all() and torch.isnan(lse[:, 5]).all()
    keep = [i for i in range(h) if i != 5]
    assert torch.equal(out[:, :, keep], base[:, :, keep])
    assert torch.equal(lse[:, keep], lbase[:, keep])


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_prefill_with_mods(cache_dtype, mods):
    """The chunked prefill runs the forward kernel on the gathered pages: the mods reach it."""
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    _, softcap, with_sinks = mods
    gen = torch.Generator().manual_seed(24)
    sinks = _mod_sinks(8, with_sinks, gen)
    out, lse = _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [300, 0, 77], [100, 40, 77],
                                True, (-1, -1), 0, packed=True, gen=gen, softcap=softcap,
                                sinks=sinks)
    assert (out[100:140] == 0).all()  # sequence 1 has no cached key
    if with_sinks:
        assert torch.equal(lse[:, 100:140], sinks[:, None].expand(8, 40))


# The unwindowed prefill gathers at most kPrefillKeyChunk = 32768 keys of a sequence at a time,
# from the last key back, and folds the chunks by their lse (prefill_chunks.h, prefill_fold.cuh).
KEY_CHUNK = 32768
CHUNK_MASKS = {"causal": (True, (-1, -1)), "non_causal": (False, (-1, -1)),
               "right_window": (False, (-1, 700))}


CHUNK_CASES = [("causal", m) for m in [("none", 0.0, False)] + MODS] + [
    ("non_causal", ("none", 0.0, False)), ("right_window", ("none", 0.0, False)),
    ("right_window", MODS[2])]


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("mask,mods", CHUNK_CASES, ids=[f"{c[0]}-{c[1][0]}" for c in CHUNK_CASES])
def test_prefill_key_chunks_match_reference(cache_dtype, mask, mods):
    """Contexts of three chunks (70001 keys: 4465 + 2 x 32768), of exactly one chunk, of a
    chunk and a bit (33000) and of 5 keys in one packed batch, then not packed: against float64
    over all the keys at once. The sinks join the first chunk only; softcap every chunk."""
    if not _flash_fwd_compiled(64, BF16):
        pytest.skip("flash_fwd hdim64 bf16 not compiled")
    causal, window = CHUNK_MASKS[mask]
    _, softcap, with_sinks = mods
    gen = torch.Generator().manual_seed(25)
    sinks = _mod_sinks(4, with_sinks, gen)
    _check_attention(cache_dtype, BF16, 4, 2, 64, 16, [70001, KEY_CHUNK, 33000, 5],
                     [300, 40, 77, 5], causal, window, 0, packed=True, gen=gen, softcap=softcap,
                     sinks=sinks)
    _check_attention(cache_dtype, BF16, 4, 2, 64, 16, [66000, 40000], [64], causal, window, 0,
                     packed=False, gen=gen, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("with_sinks", [False, True], ids=["plain", "sinks"])
def test_prefill_key_chunks_long_query(with_sinks):
    """A 33000-row query chunk against 66000 keys (causal): rows below 33000 - 32768 = 232 see no
    key of the first chunk (lse -inf there, folded in from the next). A second sequence of 20000
    keys leaves its first 13000 rows with no key at all (out 0, lse -inf or the sink). Rows
    around both edges and the last ones against a float64 reference."""
    if not _flash_fwd_compiled(64, BF16):
        pytest.skip("flash_fwd hdim64 bf16 not compiled")
    gen = torch.Generator().manual_seed(26)
    h, hk, d, bs, sq = 2, 1, 64, 16, 33000
    lens = [66000, 20000]
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    kc = keys_with_outliers(num_blocks, bs, hk, d, dtype=BF16, generator=gen)
    vc = torch.randn(num_blocks, bs, hk, d, generator=gen).to(BF16)
    max_blocks = -(-max(lens) // bs)
    table = _random_table(1, num_blocks, num_blocks, gen)[0]
    table = torch.stack([table[:max_blocks], table[-max_blocks:]]).contiguous()
    sinks = _mod_sinks(h, with_sinks, gen)
    q = torch.randn(2 * sq, h, d, generator=gen).to(BF16)
    scale = 1.0 / math.sqrt(d)
    out, lse = ops.flash_attn_with_kvcache(
        q.cuda(), kc.cuda(), vc.cuda(), None, None, None, None, table.cuda(),
        torch.tensor(lens, dtype=torch.int32).cuda(), _cu([sq, sq]).cuda(), sq, scale, True, -1,
        -1, 0, True, None if sinks is None else sinks.cuda(), 0.0)
    out, lse = out.cpu(), lse.cpu()
    for b, n in enumerate(lens):
        kd, vd = gather_kv(kc, vc, table, n, b)
        rows = sorted({*range(0, 300), *range(sq - KEY_CHUNK - 20, sq - KEY_CHUNK + 20),
                       *range(sq - n - 20, sq - n + 20), *range(sq - 40, sq)} & {*range(sq)})
        rows = torch.tensor(rows)
        qb = q[b * sq + rows].double()
        s = torch.einsum("rhd,kd->hrk", qb, kd[:, 0]) * scale  # hk = 1
        visible = torch.arange(n)[None, :] <= (rows + n - sq)[:, None]
        s = s.masked_fill(~visible, -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.double()[:, None, None].expand(h, len(rows), 1)], -1)
        lse64 = torch.logsumexp(s, -1)
        p = torch.exp(s - lse64[..., None]).nan_to_num(0.0)[..., :n]
        out64 = torch.einsum("hrk,kd->rhd", p, vd[:, 0])
        got_o, got_l = out[b * sq + rows].double(), lse[:, b * sq + rows].double()
        assert torch.equal(torch.isinf(got_l), torch.isinf(lse64))
        fin = torch.isfinite(lse64)
        assert (got_l[fin] - lse64[fin]).abs().max() < 2e-3
        assert (got_o - out64).abs().max() < 2e-2
        empty = rows < sq - n
        assert (got_o[empty] == 0).all()


@pytest.mark.parametrize("cache_dtype", [BF16, FP16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d,bs", [(96, 16), (96, 8), (192, 16)],
                         ids=["d96-staged", "d96-register", "d192-cuda_cores"])
@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("mods", MODS, ids=[m[0] for m in MODS])
def test_decode_padded_head_dims_with_mods(cache_dtype, d, bs, splits, mods):
    """Softcap and sinks at head dims between the compiled widths, pools poisoned past d."""
    _, softcap, with_sinks = mods
    h, hk = 8, 2
    dtype = FP16 if cache_dtype == FP16 else BF16
    gen = torch.Generator().manual_seed(32)
    sinks = _mod_sinks(h, with_sinks, gen)
    out, lse = _check_attention(cache_dtype, dtype, h, hk, d, bs, [0, 1, 300, 1537], [1], True,
                                (-1, -1), splits, packed=False, pad=_kernel_width(d) - d,
                                gen=gen, softcap=softcap, sinks=sinks, q_pad=8)
    assert (out[0] == 0).all()
    if with_sinks:
        assert torch.equal(lse[0, :, 0], sinks)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_unvalidated_bad_pages_are_masked(cache_dtype, variant):
    """validate=False: page ids outside the pool inside a sequence's length mask their keys
    (nothing read there), and pages the table does not reference hold NaN (NaN scales for int8):
    the output must be the attention over the remaining keys, every kernel variant."""
    pad, layout = _variant(variant, cache_dtype)
    gen = torch.Generator().manual_seed(11)
    h, hk, d, bs, n = 8, 2, 128, 16, 1000
    nblk = -(-n // bs)
    num_blocks = nblk + 8
    table = _random_table(1, nblk, num_blocks, gen)
    (kc, vc), (ksc, vsc), (kf, vf) = _pool(num_blocks, bs, hk, d, cache_dtype, "cpu", layout)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    used[table[0].long()] = True
    if cache_dtype == INT8:
        ksc[~used] = float("nan")
        vsc[~used] = float("nan")
    elif cache_dtype == FP8:  # no masked_fill for float8: write the NaN code 0x7f
        kc.view(torch.uint8)[~used] = 0x7F
        vc.view(torch.uint8)[~used] = 0x7F
    else:
        kc[~used] = float("nan")
        vc[~used] = float("nan")
    bad = [3, 17, nblk - 1]  # table slots whose page id is out of range (the last one partial)
    table_bad = table.clone()
    for blk, pid in zip(bad, (-1, num_blocks, num_blocks + 100)):
        table_bad[0, blk] = pid
    q = torch.randn(1, 1, h, d, generator=gen).to(BF16)
    cd = lambda x: None if x is None else _to(x, "cuda")  # noqa: E731
    kc_d, vc_d = _device_pools(kc, vc, pad=pad)
    out, lse = ops.flash_attn_with_kvcache(
        q.cuda(), kc_d, vc_d, cd(ksc), cd(vsc), cd(kf), cd(vf), table_bad.cuda(),
        torch.tensor([n], dtype=torch.int32).cuda(), None, 1, 1.0 / math.sqrt(d), False, -1, -1,
        0, False)
    ks_, vs_ = (ksc, vsc) if cache_dtype == INT8 else (kf, vf)
    kd, vd = gather_kv(kc, vc, table, n, 0, ks_, vs_)
    keep = torch.ones(n, dtype=torch.bool)
    for blk in bad:
        keep[blk * bs: (blk + 1) * bs] = False
    kd, vd = kd[keep], vd[keep]
    m = int(keep.sum())
    out64, lse64 = attention_varlen_ref(q[0].double(), kd, vd, [0, 1], [0, m])
    out_pt, lse_pt = attention_varlen_ref(q[0], kd.to(BF16), vd.to(BF16), [0, 1], [0, m],
                                          upcast=False)
    assert torch.isfinite(out).all()
    assert_fa3_close("out", out[0].cpu(), out64, out_pt, BF16)
    assert_fa3_close("lse", lse[0].cpu(), lse64, lse_pt, BF16)  # (heads, 1)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_several_queries_packed_and_pool_view(cache_dtype, variant):
    """Speculative decode: 1-3 query rows per sequence, packed (cu_seqlens_q), the pools as
    views of one combined pool."""
    pad, layout = _variant(variant, cache_dtype)
    gen = torch.Generator().manual_seed(5)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [3, 900, 2500], [1, 3, 2], True,
                     (-1, -1), 0, packed=True, combined=True, pad=pad, gen=gen,
                     scale_layout=layout)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [10, 700], [4, 4], False, (64, 2), 5,
                     packed=False, pad=pad, gen=gen, scale_layout=layout)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("splits", [0, 5])
def test_decode_and_prefill_head_major_pools(cache_dtype, d, splits):
    """Pools stored head-major within a page (bench's head_major_pool_ms alternative): slot
    stride d, head stride block_size x d (+ poisoned row padding), decode and prefill."""
    gen = torch.Generator().manual_seed(41)
    _check_attention(cache_dtype, BF16, 8, 2, d, 16, [1, 300, 4099], [1], True, (-1, -1),
                     splits, packed=False, gen=gen, head_major=True)
    _check_attention(cache_dtype, BF16, 8, 2, d, 16, [1, 300, 4099], [1, 2, 77], True,
                     (-1, -1), splits, packed=True, pad=8, gen=gen, head_major=True)
    if not _flash_fwd_compiled(_kernel_width(d), BF16):
        pytest.skip(f"flash_fwd hdim{_kernel_width(d)} bf16 not compiled (the prefill case)")
    _check_attention(cache_dtype, BF16, 8, 2, d, 16, [700, 2000], [300, 600], True, (-1, -1),
                     splits, packed=True, gen=gen, head_major=True)


@pytest.mark.parametrize("layout", ["head", "slot", "head_odd"])
@pytest.mark.parametrize("case", [DECODE_CASES[i] for i in (1, 3, 6, 7)],
                         ids=lambda c: f"h{c[0]}-hk{c[1]}-d{c[2]}-bs{c[3]}")
@pytest.mark.parametrize("splits", [0, 3])
def test_decode_int8_scale_layouts(layout, case, splits):
    """int8 scales head-major (per-key copies, contiguous per tile), slot-major (line copies of
    all kv heads' scales of a slot for <= 8 kv heads; per-key copies for the 16 kv heads case)
    and unaligned: the output matches the reference; lengths end inside a tile and at a page
    edge."""
    h, hk, d, bs, causal, window = case
    gen = torch.Generator().manual_seed(14)
    _check_attention(INT8, BF16, h, hk, d, bs, [5, 16 * 9, 1000 + 3, 2048], [1], causal, window,
                     splits, packed=False, gen=gen, scale_layout=layout)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("window", [(-1, -1), (200, -1)], ids=["causal", "window200"])
def test_prefill_matches_reference(cache_dtype, window):
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    gen = torch.Generator().manual_seed(6)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [300, 1000, 77], [100, 513, 77], True,
                     window, 0, packed=True, gen=gen)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("window", [(-1, -1), (200, -1)], ids=["causal", "window200"])
@pytest.mark.parametrize("splits", [0, 3], ids=["auto_splits", "splits3"])
def test_mixed_batch_leading_decode_rows(cache_dtype, window, splits):
    """A continuous-batching step: leading decode rows (1 and 2 queries: 4 and 8 packed rows per
    kv head), then prefill chunks, then one more decode row, packed. The leading rows run the
    decode kernels and the rest the chunked prefill (attend_mixed); the trailing decode row stays
    on the prefill. Against float64, like every other call."""
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    gen = torch.Generator().manual_seed(61)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [300, 1000, 77, 2000, 500],
                     [1, 2, 77, 513, 1], True, window, splits, packed=True, gen=gen)
    # an empty cache and an empty query among the leading decode rows; leading rows that are
    # all empty queries
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [0, 700, 40, 900], [1, 0, 40, 300], True,
                     window, splits, packed=True, gen=gen)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [50, 600], [0, 200], True, window, splits,
                     packed=True, gen=gen)
    # decode rows at 40000 and 3001 keys beside a prefill over 40000 keys (two key chunks)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [40000, 3001, 40000], [1, 2, 700], True,
                     window, splits, packed=True, gen=gen)


def test_mixed_batch_on_a_user_stream():
    """A mixed call on a user stream (decode and prefill kernels, the prefill's gathers and folds
    all enqueued there): its outputs, read on that stream, match float64 and equal the default
    stream's bitwise (same inputs: both generators seeded)."""
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    args = (BF16, BF16, 8, 2, 128, 16, [20000, 1000, 3000], [1, 2, 1500], True, (-1, -1), 0)
    torch.manual_seed(62)  # _pool draws V from the global generator
    ref = _check_attention(*args, packed=True, gen=torch.Generator().manual_seed(62))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.manual_seed(62)
        got = _check_attention(*args, packed=True, gen=torch.Generator().manual_seed(62))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
@pytest.mark.parametrize("d", [128, 96], ids=["d128", "d96"])
def test_chunked_prefill_equals_single_pass(cache_dtype, d):
    """A 4000-token prompt prefilled in chunks of 1024 (append the chunk, attend its queries,
    then decode a few tokens) equals one pass over the whole prompt; head_dim 96 runs the
    forward and the decode kernels of width 128."""
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    gen = torch.Generator().manual_seed(7)
    h, hk, bs, n, chunk = 8, 2, 16, 4000, 1024
    k = keys_with_outliers(1, n, hk, d, generator=gen).cuda()
    v = torch.randn(1, n, hk, d, generator=gen).to(BF16).cuda()
    q = torch.randn(1, n, h, d, generator=gen).to(BF16).cuda()
    scale = longctx.fp8_scales_from_data(k) if cache_dtype == FP8 else None
    vscale = longctx.fp8_scales_from_data(v) if cache_dtype == FP8 else None
    outs = []
    for step in (chunk, n):
        c = longctx.PagedKVCache(-(-n // bs) + 3, bs, hk, d, dtype=BF16, cache_dtype=cache_dtype,
                                 k_scale=scale, v_scale=vscale, device="cuda")
        sid = c.add_sequence()
        parts = []
        for s in range(0, n, step):
            e = min(n, s + step)
            c.append(k[:, s:e], v[:, s:e], [sid])
            parts.append(c.attend(q[:, s:e], [sid], causal=True, return_lse=True))
        outs.append((torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 2)))
    (o1, l1), (o2, l2) = outs
    assert (o1.float() - o2.float()).abs().max() <= 2 ** -8
    assert (l1 - l2).abs().max() <= 1e-4
    if cache_dtype == BF16:
        ref = longctx.flash_attn_func(q, k, v, causal=True)
        assert (o2.float() - ref.float()).abs().max() <= 2 ** -8


@pytest.mark.parametrize("cache_dtype", [BF16, INT8, FP8], ids=FMT_IDS.get)
def test_decode_steps_in_graph_equal_eager(cache_dtype):
    """The decode and merge kernels are launched as programmatic dependents (they may start
    while the kernel before them runs and wait for it before any memory access). A chain of
    decode steps where every input is written by the kernel just before - the appended token
    (append kernel), the lengths (a torch add), the query and the new K/V (the previous step's
    merge output) - gives bitwise the same outputs eagerly and replayed from a CUDA graph, and
    the same as with every op run alone (a device sync between the ops)."""
    gen = torch.Generator().manual_seed(21)
    h, hk, d, bs, steps = 8, 2, 128, 16, 6
    lens = [5000, 1200, 33]
    batch = len(lens)
    max_blocks = -(-(max(lens) + steps) // bs)
    num_blocks = batch * max_blocks + 3
    table = _random_table(batch, max_blocks, num_blocks, gen).cuda()
    (kc, vc), (ksc, vsc), (kf, vf) = _pool(num_blocks, bs, hk, d, cache_dtype, "cuda")
    scales = dict(zip(("k_scale", "v_scale"), (ksc, vsc) if cache_dtype == INT8 else (kf, vf)))
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q0 = torch.randn(batch, 1, h, d, generator=gen).to(BF16).cuda()
    state = [t for t in (kc, vc, ksc, vsc, seqlens, q0) if t is not None]
    initial = [t.clone() for t in state]
    q = q0  # the chain's input (restored with the state)

    def run_steps(alone=False):
        outs, x = [], q
        for _ in range(steps):
            kv = (x[:, :, :hk] * 0.5).contiguous()  # new K/V from the previous output
            if alone:  # the append, the new lengths and the attention, each after a sync
                torch.cuda.synchronize()
                longctx.kvcache_append(kv, kv, kc, vc, seqlens, table, validate=False, **scales)
                torch.cuda.synchronize()
                total = seqlens + 1
                torch.cuda.synchronize()
                x = longctx.flash_attn_with_kvcache(x, kc, vc, total, table, causal=True,
                                                    validate=False, **scales)
                torch.cuda.synchronize()
            else:
                x = longctx.flash_attn_with_kvcache(x, kc, vc, seqlens, table, k=kv, v=kv,
                                                    causal=True, validate=False, **scales)
            seqlens.add_(1)
            outs.append(x)
        return torch.stack(outs)

    def restore():
        for t, t0 in zip(state, initial):
            t.copy_(t0)

    restore()
    alone = run_steps(alone=True).clone()
    restore()
    eager = run_steps().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (allocator, kernel attributes)
        restore()
        run_steps()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = run_steps()
    restore()
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(eager.float()).all() and eager.float().abs().max() > 0
    assert torch.equal(_bytes(eager), _bytes(alone))
    assert torch.equal(_bytes(captured), _bytes(eager))
    # the chain really depends on each step: the lengths advanced by one per step
    assert seqlens.cpu().tolist() == [n + steps for n in lens]


def test_int64_offsets_large_page_id():
    """Pages past 2^31 elements of the pool (int64 offsets): append and decode on page ids
    131072+ of an fp8 pool with 16384-element pages (~2.2 GB per pool)."""
    hk, d, bs = 8, 128, 16
    num_blocks = 2 ** 31 // (bs * hk * d) + 64
    try:
        kc = torch.zeros(num_blocks, bs, hk, d, dtype=FP8, device="cuda")
        vc = torch.zeros_like(kc)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a > 2^31-element pool")
    gen = torch.Generator().manual_seed(8)
    n = 200
    pages = torch.arange(num_blocks - 13, num_blocks - 13 + (n + bs - 1) // bs, dtype=torch.int32)
    table = pages[None].cuda()
    k = keys_with_outliers(1, n, hk, d, generator=gen).cuda()
    v = torch.randn(1, n, hk, d, generator=gen).to(BF16).cuda()
    ks, vs = longctx.fp8_scales_from_data(k), longctx.fp8_scales_from_data(v)
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    ops.kvcache_append(k, v, kc, vc, None, None, ks, vs, table, zero, None, None, None, 1.0,
                       False, True)
    q = torch.randn(1, 1, 4 * hk, d, generator=gen).to(BF16).cuda()
    out = longctx.flash_attn_with_kvcache(q, kc, vc, torch.full_like(zero, n), table,
                                          k_scale=ks, v_scale=vs)
    kd, vd = gather_kv(kc[pages.long().cuda()].cpu(), vc[pages.long().cuda()].cpu(),
                       torch.arange(len(pages), dtype=torch.int32)[None], n, 0, ks.cpu(),
                       vs.cpu())
    out64, _ = attention_varlen_ref(q[0].cpu().double(), kd, vd, [0, 1], [0, n])
    assert (out[0].cpu().double() - out64).abs().max() < 2e-2
    assert kc[: num_blocks - 13].view(torch.uint8).max() == 0  # nothing written below


def test_errors_name_the_argument_cuda():
    hk, d, bs = 2, 64, 4
    kc = torch.zeros(6, bs, hk, d, dtype=BF16, device="cuda")
    vc = torch.zeros_like(kc)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device="cuda")
    seqlens = torch.tensor([3, 0], dtype=torch.int32, device="cuda")
    k = torch.randn(2, 2, hk, d, dtype=BF16, device="cuda")
    q = torch.randn(2, 1, 4, d, dtype=BF16, device="cuda")

    def app(table=table, seqlens=seqlens, kc=kc, vc=vc):
        ops.kvcache_append(k, k, kc, vc, None, None, None, None, table, seqlens, None, None, None)

    def attn(table=table, seqlens=seqlens, q=q, kc=kc, vc=vc):
        return ops.flash_attn_with_kvcache(q, kc, vc, None, None, None, None, table, seqlens,
                                           None, q.shape[1], 0.125, True, -1, -1, 0, True)

    app()
    attn()
    with pytest.raises(RuntimeError, match=r"block_table\[0\]\[1\] = 9 is not a page"):
        app(table=torch.tensor([[0, 9], [2, 3]], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 7 plus 2 new tokens"):
        app(seqlens=torch.tensor([7, 0], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"block_table\[1\]\[0\] = 7 is not a page"):
        attn(table=torch.tensor([[0, 1], [7, 3]], dtype=torch.int32, device="cuda"),
             seqlens=torch.tensor([3, 1], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[0\] = 9 tokens need 3 pages"):
        attn(seqlens=torch.tensor([9, 0], dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match=r"k_cache must have the dtype of q"):
        attn(q=q.half())
    with pytest.raises(RuntimeError, match=r"v_cache must have the dtype of k_cache"):
        attn(vc=vc.to(INT8))
    with pytest.raises(RuntimeError, match=r"k_scale_cache is required for an int8 cache"):
        attn(kc=kc.to(INT8), vc=vc.to(INT8))
    with pytest.raises(RuntimeError, match=r"k_cache must have the dtype of k"):
        app(kc=kc.half(), vc=vc.half())
    # head dims: multiples of 8 up to 256 (the others of 64/128/256 on the next kernel up)
    kc2 = torch.zeros(6, bs, hk, 40, dtype=BF16, device="cuda")
    attn(q=torch.randn(2, 1, 4, 40, dtype=BF16, device="cuda"), kc=kc2, vc=kc2.clone())
    with pytest.raises(RuntimeError, match=r"head_dim must be a multiple of 8 in \[8, 256\] on "
                       r"CUDA .*got 36"):
        kc2 = torch.zeros(6, bs, hk, 36, dtype=BF16, device="cuda")
        attn(q=torch.randn(2, 1, 4, 36, dtype=BF16, device="cuda"), kc=kc2, vc=kc2.clone())


def test_build_info_lists_kvcache_cuda():
    fams = [k for k in longctx.build_info()["kernels"] if k["family"] == "kvcache"]
    assert {k["device"] for k in fams} >= {"cpu", "cuda"}


def test_build_info_lists_every_decode_instantiation():
    """A build of every kernel and dtype holds the decode kernels of every cache format for both
    query dtypes (the fixture's skips cannot hide a missing one there)."""
    sw = longctx.build_info()["switches"]
    if "kernels=all" not in sw or "dtypes=bf16,fp16" not in sw:
        pytest.skip(f"a restricted build ({sw})")
    for cache_dtype, dtype in [(BF16, BF16), (FP16, FP16), (INT8, BF16), (INT8, FP16),
                               (FP8, BF16), (FP8, FP16)]:
        assert _decode_compiled(cache_dtype, dtype), (cache_dtype, dtype)


@pytest.mark.parametrize("cache_dtype", [BF16, INT8], ids=FMT_IDS.get)
def test_prefill_window_batched_queries(cache_dtype):
    """The windowed prefill gathers only the keys the chunk's queries can see (from
    sk - sq - window_left): batched queries of 64 rows over caches of 300, 1000 and 77 keys with a
    window of 50 (gathers start at 186, 886 and 0)."""
    if not _flash_fwd_compiled(128, BF16):
        pytest.skip("flash_fwd hdim128 bf16 not compiled")
    gen = torch.Generator().manual_seed(41)
    _check_attention(cache_dtype, BF16, 8, 2, 128, 16, [300, 1000, 77], [64], True, (50, -1), 0,
                     packed=False, gen=gen)

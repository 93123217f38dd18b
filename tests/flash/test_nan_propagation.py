"""A NaN input gives NaN in the rows it reaches, and only there (CPU; the CUDA cases are marked
gpu and run on a GPU).

- flash_attn_func: a NaN in a query row makes that row's out and lse NaN (not the 0 / -inf of a
  row that sees no key); a NaN in a key makes NaN every row that sees the key; rows that do not
  see it are unchanged (compared with the same call on NaN-free inputs). A NaN in a value stays
  in the tiles that load it; a NaN in one packed (varlen) sequence changes nothing in another,
  forward and backward.
- flash_attn_with_kvcache over bf16, int8 and fp8 caches, with one split and several: the same for
  a NaN query row, and for a NaN in a key written by kvcache_append (int8: the key's scale becomes
  NaN, so every channel of that key dequantizes to NaN; fp8: the element's code is NaN).
"""
import pytest
import torch

import longctx
from gpu_kernels import skip_unless_compiled, skip_unless_family

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_unless_kvcache_built(device):
    """On CUDA: skip without a Hopper GPU or without the kvcache kernels."""
    if device == "cuda":
        skip_unless_family("kvcache")


def _skip_unless_built(device, hdim, dtype, backward=False):
    """On CUDA: skip without a Hopper GPU or without the (hdim, dtype) attention kernels."""
    if device == "cuda":
        skip_unless_compiled(hdim, dtype, ("flash_fwd", "flash_bwd") if backward
                             else ("flash_fwd",))


def _finite_rows_equal(out, ref, keep):
    """Rows selected by keep (a bool mask over out's leading dims) are finite and equal to ref."""
    assert torch.isfinite(out[keep]).all()
    torch.testing.assert_close(out[keep], ref[keep], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_nan_query_row(device, causal):
    _skip_unless_built(device, 64, torch.bfloat16)
    b, s, h, hk, d = 2, 70, 4, 2, 64
    q = torch.randn(b, s, h, d, dtype=torch.bfloat16, device=device)
    k = torch.randn(b, s, hk, d, dtype=torch.bfloat16, device=device)
    v = torch.randn(b, s, hk, d, dtype=torch.bfloat16, device=device)
    ref, ref_lse = longctx.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    q[1, 33, 2, 5] = float("nan")
    out, lse = longctx.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert torch.isnan(out[1, 33, 2]).all() and torch.isnan(lse[1, 2, 33])
    keep = torch.ones(b, s, h, dtype=torch.bool, device=device)
    keep[1, 33, 2] = False
    _finite_rows_equal(out, ref, keep)
    _finite_rows_equal(lse.transpose(1, 2), ref_lse.transpose(1, 2), keep)


def _causal_with_nan(device, s, dtype, which, j):
    """(out without the NaN, out with a NaN at position j, channel 7, of k or v), causal, one
    sequence of s tokens, 2 query heads on 1 kv head, head_dim 128."""
    q = torch.randn(1, s, 2, 128, dtype=dtype, device=device)
    k = torch.randn(1, s, 1, 128, dtype=dtype, device=device)
    v = torch.randn(1, s, 1, 128, dtype=dtype, device=device)
    ref = longctx.flash_attn_func(q, k, v, causal=True)
    (k if which == "k" else v)[0, j, 0, 7] = float("nan")
    return ref, longctx.flash_attn_func(q, k, v, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_nan_key_reaches_the_rows_that_see_it(device):
    _skip_unless_built(device, 128, torch.float16)
    j = 150
    ref, out = _causal_with_nan(device, 200, torch.float16, "k", j)
    assert torch.isnan(out[0, j:]).all(dim=-1).all()  # rows i >= j see key j (causal)
    keep = torch.zeros(1, 200, 2, dtype=torch.bool, device=device)
    keep[0, :j] = True
    _finite_rows_equal(out, ref, keep)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_nan_value_stays_in_the_tiles_that_load_it(device):
    """A NaN in v[j] reaches every row that sees key j. A row that does not see it may still get
    NaN where its query tile multiplies a zero weight by that key's value in the same tile (0 x
    NaN, as a dense P V does; documented in flash_fwd.md), but never outside the tiles that load
    it: with causal 128 x 128 tiles, rows of query tile 0 never load key 150."""
    _skip_unless_built(device, 128, torch.bfloat16)
    j = 150
    ref, out = _causal_with_nan(device, 300, torch.bfloat16, "v", j)
    assert torch.isnan(out[0, j:, :, 7]).all()  # rows i >= j see key j
    keep = torch.zeros(1, 300, 2, dtype=torch.bool, device=device)
    keep[0, :128] = True
    _finite_rows_equal(out, ref, keep)


def _varlen_grads(device, d, causal, poison):
    """out, lse (rows first), dq, dk, dv of three packed sequences (200, 120, 300 rows), with NaNs
    in the first rows of sequence 1 of the tensors named in `poison` (q, k, v, dout)."""
    lens, h, hk = [200, 120, 300], 4, 2
    cu = torch.tensor([0, 200, 320, 620], dtype=torch.int32, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(620, hh, d, generator=g).to(device, torch.bfloat16)
                     for hh in (h, hk, hk, h))
    for name, t in zip("qkvo", (q, k, v, dout)):
        if name in poison:
            t[200:202] = float("nan")
            t[330, 0, 5] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = longctx.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal,
                                              return_lse=True, deterministic=True)
    out.backward(dout)
    return {"out": out.detach(), "lse": lse.detach().transpose(0, 1), "dq": q.grad,
            "dk": k.grad, "dv": v.grad}


def _assert_sequence0_unchanged(device, d, causal, poison, names):
    """Sequence 0's rows of `names` are finite and bitwise those of the NaN-free call. Sequence
    0's last tiles (200 rows: not a multiple of the tile sizes) overlap sequence 1's first rows
    in memory."""
    _skip_unless_built(device, d, torch.bfloat16, backward=True)
    ref, bad = (_varlen_grads(device, d, causal, p) for p in ("", poison))
    for name in names:
        assert torch.isfinite(bad[name][:200]).all(), name
        torch.testing.assert_close(bad[name][:200], ref[name][:200], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_varlen_nan_keys_values_stay_in_their_sequence(device, d, causal):
    """Packed sequences are independent: NaNs in sequence 1's keys and values change nothing in
    sequence 0, forward and backward (on CUDA its last KV tile's rows of sequence 1 are zeroed
    in shared memory before use)."""
    _assert_sequence0_unchanged(device, d, causal, "kv", ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_varlen_nan_queries_stay_in_their_sequence(device, d, causal):
    """NaNs in sequence 1's queries and output gradients change nothing in sequence 0 (on CUDA
    the backward's query tile that crosses sequence 0's end has sequence 1's q/dout rows zeroed
    in shared memory before use)."""
    _assert_sequence0_unchanged(device, d, causal, "qo", ("out", "lse", "dq", "dk", "dv"))


def _paged(fmt, device, batch, ctx, hk, d, bs=16):
    """A cache of `fmt` filled with random tokens by kvcache_append; returns what attention needs
    and the bf16 tokens (so a test can append them again with a NaN in one)."""
    pages = (ctx + bs - 1) // bs
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    shape = (batch * pages, bs, hk, d)
    kc = torch.zeros(shape, dtype=dtype, device=device)
    vc = torch.zeros(shape, dtype=dtype, device=device)
    if fmt == "int8":
        ks = longctx.int8_scales(*shape[:3], device=device)
        vs = longctx.int8_scales(*shape[:3], device=device)
    elif fmt == "fp8":
        ks = torch.full((hk,), 5.5 / 448, device=device)
        vs = torch.full((hk,), 5.5 / 448, device=device)
    else:
        ks = vs = None
    table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
    k = torch.randn(batch, ctx, hk, d, dtype=torch.bfloat16, device=device)
    v = torch.randn(batch, ctx, hk, d, dtype=torch.bfloat16, device=device)
    return kc, vc, ks, vs, table, k, v


def _fill(kc, vc, ks, vs, table, k, v):
    zero = torch.zeros(k.shape[0], dtype=torch.int32, device=k.device)
    longctx.kvcache_append(k, v, kc, vc, zero, table, k_scale=ks, v_scale=vs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("splits", [1, 3])
def test_kvcache_nan_query_row_and_key(device, fmt, splits):
    _skip_unless_kvcache_built(device)
    batch, ctx, h, hk, d = 2, 300, 8, 2, 128
    kc, vc, ks, vs, table, k, v = _paged(fmt, device, batch, ctx, hk, d)
    _fill(kc, vc, ks, vs, table, k, v)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, 1, h, d, dtype=torch.bfloat16, device=device)

    def attend(q_):
        return longctx.flash_attn_with_kvcache(q_, kc, vc, lens, table, k_scale=ks, v_scale=vs,
                                               return_lse=True, num_splits=splits)

    ref, ref_lse = attend(q)
    # a NaN query row (sequence 1, head 5): that row only
    qn = q.clone()
    qn[1, 0, 5, 9] = float("nan")
    out, lse = attend(qn)
    assert torch.isnan(out[1, 0, 5]).all() and torch.isnan(lse[1, 5, 0])
    keep = torch.ones(batch, 1, h, dtype=torch.bool, device=device)
    keep[1, 0, 5] = False
    _finite_rows_equal(out, ref, keep)
    # a NaN in one key of sequence 0, kv head 1 (query heads 4..7 read it), written by the append
    kn = k.clone()
    kn[0, 123, 1, 3] = float("nan")
    _fill(kc, vc, ks, vs, table, kn, v)
    out, _ = attend(q)
    assert torch.isnan(out[0, 0, 4:]).all()
    keep = torch.ones(batch, 1, h, dtype=torch.bool, device=device)
    keep[0, 0, 4:] = False
    _finite_rows_equal(out, ref, keep)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_append_keeps_nan_in_the_scale(device):
    _skip_unless_kvcache_built(device)
    kc, vc, ks, vs, table, k, v = _paged("int8", device, 1, 32, 2, 64)
    k[0, 5, 1, 17] = float("nan")
    v[0, 9, 0, 3] = float("inf")
    _fill(kc, vc, ks, vs, table, k, v)
    assert torch.isnan(ks[0, 5, 1])  # page 0, slot 5, kv head 1
    assert torch.isinf(vs[0, 9, 0])  # dequantizes to NaN (0 * inf) on every channel
    for scales, bad in ((ks, (0, 5, 1)), (vs, (0, 9, 0))):
        finite = torch.isfinite(scales)
        finite[bad] = True
        assert finite.all()  # the other (token, head) scales are untouched

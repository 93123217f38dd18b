"""Reference pieces for the paged KV-cache tests, in plain torch (independent of PagedKVCache).

- gather_kv: a sequence's K/V from the pools through the block table, dequantized (x = stored *
  scale) in float64.
- quantize_int8_ref / quantize_fp8_ref: the stored codes (and int8 scales) the append op must
  produce, computed with torch ops (fp8 through torch's float8_e4m3fn cast, the oracle of the
  rounding).
- keys_with_outliers: realistic keys: a few channels ~20x larger than the rest (the massive
  activations of K seen in LLMs), a per-token magnitude spread, not only uniform noise.
- check_append_writes_only_new_slots: the memory-safety check of an append, shared by the CPU
  and GPU tests.
"""
from __future__ import annotations

import math

import torch

import longctx


def gather_kv(k_cache, v_cache, block_table, seqlen, b, k_scale=None, v_scale=None):
    """(seqlen, kv_heads, head_dim) float64 K and V of sequence b."""
    bs = k_cache.shape[1]
    pages = block_table[b, : (seqlen + bs - 1) // bs].long()
    out = []
    for pool, scale in ((k_cache, k_scale), (v_cache, v_scale)):
        x = pool[pages].flatten(0, 1)[:seqlen].double()
        if pool.dtype == torch.int8:
            x = x * scale[pages].flatten(0, 1)[:seqlen, :, None].double()
        elif pool.dtype == torch.float8_e4m3fn:
            x = x * scale.double()[None, :, None]
        out.append(x)
    return out[0], out[1]


def quantize_int8_ref(x: torch.Tensor):
    """x (..., head_dim) -> (int8 codes, fp32 scales (...)): scale = amax / 127 in fp32,
    q = clamp(round_half_even(x / scale), -127, 127) with the division in fp32."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[..., None]).clamp(-127, 127)
    q = torch.where(scale[..., None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def quantize_fp8_ref(x: torch.Tensor, head_scale: torch.Tensor):
    """x (..., kv_heads, head_dim), head_scale (kv_heads,) -> float8_e4m3fn codes of x / scale."""
    # saturating to +-448 as CUDA's __NV_SATFINITE does (torch's cast saturates from 2.14 on)
    return (x.float() / head_scale.float()[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def keys_with_outliers(*shape, dtype=torch.bfloat16, outlier_channels=4, outlier_gain=20.0,
                       generator=None):
    """(..., kv_heads, head_dim) keys: N(0, 1) channels, `outlier_channels` channels per head
    scaled by outlier_gain (the same channels for every token, as in real K), and a per-token
    gain in [0.5, 2]."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32)
    d = shape[-1]
    idx = torch.randperm(d, generator=generator)[:outlier_channels]
    gain = torch.ones(d)
    gain[idx] = outlier_gain
    tok = torch.rand(*shape[:-1], 1, generator=generator) * 1.5 + 0.5
    return (x * gain * tok).to(dtype)


def check_append_writes_only_new_slots(cache_dtype, head_dim, device, gen):
    """PagedKVCache.append of a packed batch (20, 3, 0 and 27 new tokens into four sequences
    with pages reserved for 30 more than that) writes every slot of the new tokens and no other
    byte of the pools (and of the int8 scales), which are poisoned first."""
    hk, bs, num_blocks = 2, 16, 30
    scale = torch.tensor([0.1, 0.1]) if cache_dtype == torch.float8_e4m3fn else None
    c = longctx.PagedKVCache(num_blocks, bs, hk, head_dim, cache_dtype=cache_dtype,
                             k_scale=scale, v_scale=scale, device=device)
    ids = [c.add_sequence() for _ in range(4)]
    for s, n in zip(ids, [40, 0, 17, 5]):
        c.reserve(s, n + 30)
    pools = [c.k_cache, c.v_cache]
    scales = [c.k_scale, c.v_scale] if cache_dtype == torch.int8 else []
    for pool in pools:
        pool.view(torch.uint8).fill_(0x7F)  # int8 127, fp8 NaN, 16-bit a huge value or NaN
    for sc in scales:
        sc.fill_(math.nan)

    def snapshot():  # the raw bits, (num_blocks, block_size, ...)
        return ([p.view(torch.uint8).clone() for p in pools]
                + [sc.view(torch.int32).clone() for sc in scales])

    before = snapshot()
    new = [20, 3, 0, 27]
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    c.append(torch.randn(sum(new), hk, head_dim, generator=gen).to(torch.bfloat16).to(device),
             torch.randn(sum(new), hk, head_dim, generator=gen).to(torch.bfloat16).to(device),
             ids, cu_new=cu)
    written = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for s, n in zip(ids, new):
        for t in range(n):
            written[c.pages(s)[t // bs], t % bs] = True
    written = written.to(device)
    for x, y in zip(before, snapshot()):
        same = (x == y).flatten(2).all(-1)  # per (page, slot)
        assert same[~written].all(), "a slot outside the appended tokens changed"
        assert not same[written].any(), "an appended slot was not written"

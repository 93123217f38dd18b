"""Reference pieces for the paged KV-cache tests, in plain torch (independent of PagedKVCache).

- gather_kv: a sequence's K/V from the pools through the block table, dequantized (x = stored *
  scale) in float64.
- quantize_int8_ref / quantize_fp8_ref: the stored codes (and int8 scales) the append op must
  produce, computed with torch ops (fp8 through torch's float8_e4m3fn cast, the oracle of the
  rounding).
- keys_with_outliers: realistic keys: a few channels ~20x larger than the rest (the massive
  activations of K seen in LLMs), a per-token magnitude spread, not only uniform noise.
"""
from __future__ import annotations

import torch


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

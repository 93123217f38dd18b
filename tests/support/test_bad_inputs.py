"""The bad-input suite: every public function of longctx (longctx.__all__ and the PagedKVCache
methods) called with bad arguments, one table of (op, bad argument, expected error fragment).

Each case builds its inputs from a fixed seed, snapshots every tensor (and a PagedKVCache's
pages, lengths, scales and pools), makes the bad call and checks the error, then checks that
nothing was written (bitwise), and that a correct call on the same inputs still works and gives
bitwise what it gives on fresh inputs (its result and every tensor it writes).

The table runs on the CPU (CI) and, marked `gpu`, on CUDA: the inputs use bf16 and head_dim 64,
which both devices take, and the expected fragments are the ones both devices give. NaN and Inf
in the quantized caches (decided in longctx.kvcache's docstring and docs/kernels/kvcache.md)
are at the end.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, NamedTuple

import pytest
import torch
import torch.distributed as dist

import longctx

BF16, FP16, INT8, FP8 = torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn
META = "meta"
NAN, INF = float("nan"), float("inf")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _randn(*shape, dtype=BF16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def _i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# --- inputs of each op: a dict built from a fixed seed, so two builds are bitwise equal --------

def flash_inputs(dev):
    return dict(q=_randn(1, 8, 4, 64, device=dev, seed=1),
                k=_randn(1, 8, 2, 64, device=dev, seed=2),
                v=_randn(1, 8, 2, 64, device=dev, seed=3))


def varlen_inputs(dev):
    return dict(q=_randn(8, 4, 64, device=dev, seed=1), k=_randn(8, 2, 64, device=dev, seed=2),
                v=_randn(8, 2, 64, device=dev, seed=3), cu=_i32([0, 3, 8], dev), max_s=5)


def kv_inputs(dev, fmt=BF16, packed=False):
    """Pools of 6 pages of 4 slots, 2 kv heads of 64 with random contents; two sequences of 5
    and 2 tokens on pages [0, 1, 2] and [3, 4, 5]; a query and a new token per sequence (packed:
    1 and 2 rows)."""
    s: Dict[str, Any] = {}
    shape = (6, 4, 2, 64)
    if fmt == BF16:
        s["kc"], s["vc"] = _randn(*shape, device=dev, seed=4), _randn(*shape, device=dev, seed=5)
        s["ks"] = s["vs"] = None
    elif fmt == INT8:
        s["kc"] = (_randn(*shape, dtype=torch.float32, seed=4) * 40).to(INT8).to(dev)
        s["vc"] = (_randn(*shape, dtype=torch.float32, seed=5) * 40).to(INT8).to(dev)
        s["ks"] = longctx.int8_scales(6, 4, 2, device=dev).add_(0.01)
        s["vs"] = longctx.int8_scales(6, 4, 2, device=dev).add_(0.02)
    else:
        s["kc"] = _randn(*shape, dtype=torch.float32, seed=4).to(FP8).to(dev)
        s["vc"] = _randn(*shape, dtype=torch.float32, seed=5).to(FP8).to(dev)
        s["ks"] = torch.full((2,), 0.05, device=dev)
        s["vs"] = torch.full((2,), 0.07, device=dev)
    s["table"] = _i32([[0, 1, 2], [3, 4, 5]], dev)
    s["seqlens"] = _i32([5, 2], dev)
    if packed:
        s["q"] = _randn(3, 4, 64, device=dev, seed=6)
        s["knew"], s["vnew"] = (_randn(3, 2, 64, device=dev, seed=7),
                                _randn(3, 2, 64, device=dev, seed=8))
        s["cu"] = _i32([0, 1, 3], dev)
    else:
        s["q"] = _randn(2, 1, 4, 64, device=dev, seed=6)
        s["knew"], s["vnew"] = (_randn(2, 1, 2, 64, device=dev, seed=7),
                                _randn(2, 1, 2, 64, device=dev, seed=8))
    s["rope"] = longctx.rope_frequencies(64, device=dev)
    return s


def kv_int8(dev):
    return kv_inputs(dev, INT8)


def kv_fp8(dev):
    return kv_inputs(dev, FP8)


def kv_packed(dev):
    return kv_inputs(dev, packed=True)


def cache_inputs(dev, cache_dtype=None, fp8_scale=None):
    """A PagedKVCache of 4 pages of 4 slots, 2 kv heads of 64, with sequences 0 (5 tokens) and
    1 (2 tokens) (for fp8 without scales: nothing appended yet), and the next tokens."""
    c = longctx.PagedKVCache(4, 4, 2, 64, dtype=BF16, cache_dtype=cache_dtype, device=dev,
                             k_scale=fp8_scale, v_scale=fp8_scale)
    a, b = c.add_sequence(), c.add_sequence()
    if not (cache_dtype == FP8 and fp8_scale is None):
        c.append(_randn(1, 5, 2, 64, device=dev, seed=9), _randn(1, 5, 2, 64, device=dev, seed=10),
                 [a])
        c.append(_randn(1, 2, 2, 64, device=dev, seed=11),
                 _randn(1, 2, 2, 64, device=dev, seed=12), [b])
    return dict(cache=c, k=_randn(2, 1, 2, 64, device=dev, seed=13),
                v=_randn(2, 1, 2, 64, device=dev, seed=14),
                q=_randn(2, 1, 4, 64, device=dev, seed=15),
                kp=_randn(3, 2, 64, device=dev, seed=16), vp=_randn(3, 2, 64, device=dev, seed=17))


def cache_fp8_uncalibrated(dev):
    return cache_inputs(dev, FP8)


def cache_int8(dev):
    return cache_inputs(dev, INT8)


def rope_inputs(dev):
    return dict(q=_randn(1, 8, 4, 64, device=dev, seed=18),
                k=_randn(1, 8, 2, 64, device=dev, seed=19),
                pos=torch.arange(8, device=dev), rf=longctx.rope_frequencies(64, device=dev))


def shard_inputs(dev):
    return dict(x=_randn(1, 8, 2, 64, device=dev, seed=20),
                shards=[_randn(1, 4, 2, 64, device=dev, seed=21),
                        _randn(1, 4, 2, 64, device=dev, seed=22)])


def calib_inputs(dev):
    return dict(x=_randn(3, 5, 2, 64, device=dev, seed=23))


def no_inputs(dev):
    return dict(dev=dev)


# --- correct calls (run after each error on the same inputs, and on fresh ones) ----------------

def good_flash(s):
    return longctx.flash_attn_func(s["q"], s["k"], s["v"], causal=True)


def good_varlen(s):
    return longctx.flash_attn_varlen_func(s["q"], s["k"], s["v"], s["cu"], s["cu"], s["max_s"],
                                          s["max_s"], causal=True)


def good_kv(s):
    """An append of the new tokens (with RoPE) and attention over the cache: writes the pools."""
    packed = "cu" in s
    return longctx.flash_attn_with_kvcache(
        s["q"], s["kc"], s["vc"], s["seqlens"], s["table"], k=s["knew"], v=s["vnew"],
        causal=True, k_scale=s["ks"], v_scale=s["vs"], rope=s["rope"],
        cu_seqlens_q=s.get("cu"), max_seqlen_q=2 if packed else None)


def good_append(s):
    longctx.kvcache_append(s["knew"], s["vnew"], s["kc"], s["vc"], s["seqlens"], s["table"],
                           k_scale=s["ks"], v_scale=s["vs"], rope=s["rope"], cu_new=s.get("cu"))


def good_cache(s):
    c = s["cache"]
    c.append(s["k"], s["v"], [0, 1])
    return c.attend(s["q"], [0, 1])


def good_rope(s):
    return longctx.apply_rope(s["q"], s["k"], s["pos"], *s["rf"])


def good_rope_frequencies(s):
    return longctx.rope_frequencies(64, 1e6, {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 32768},
                                    max_position_embeddings=131072, device=s["dev"]).inv_freq


def good_shard(s):
    return (longctx.ring_shard(s["x"], 1, 2), longctx.ring_unshard(s["shards"]),
            longctx.ring_positions(8, 1, 2, device=s["x"].device))


def good_calib(s):
    return longctx.fp8_scales_from_data(s["x"])


def good_int8_scales(s):
    return longctx.int8_scales(2, 4, 2, device=s["dev"])


def good_kv_pool(s):
    return longctx.kv_pool(2, 4, 2, 64, dtype=torch.int8, device=s["dev"])


def good_ring(s):
    return longctx.ring_flash_attn_func(s["q"], s["k"], s["v"], causal=True)


def good_build_info(s):
    return longctx.build_info()["version"]


def good_constructor(s):
    c = longctx.PagedKVCache(2, 4, 2, 64, device=s["dev"])
    return c.block_table()


# --- the table -------------------------------------------------------------------------------

class Case(NamedTuple):
    op: str                      # the public function or PagedKVCache method
    id: str                      # the bad argument
    inputs: Callable[[str], dict]
    bad: Callable[[dict], Any]
    exc: type
    match: str                   # regex fragment of the message
    good: Callable[[dict], Any]
    cpu_only: str = ""           # why the CUDA op answers differently (skipped there)


def _meta(t):
    return t.to(META)


def _kv(s, **kw):
    """flash_attn_with_kvcache on s's inputs with new k/v and RoPE, kw replacing arguments."""
    a = dict(q=s["q"], k_cache=s["kc"], v_cache=s["vc"], cache_seqlens=s["seqlens"],
             block_table=s["table"], k=s["knew"], v=s["vnew"], causal=True, k_scale=s["ks"],
             v_scale=s["vs"], rope=s["rope"])
    if "cu" in s:
        a.update(cu_seqlens_q=s["cu"], max_seqlen_q=2)
    a.update(kw)
    return longctx.flash_attn_with_kvcache(**a)


def _append(s, **kw):
    a = dict(k=s["knew"], v=s["vnew"], k_cache=s["kc"], v_cache=s["vc"],
             cache_seqlens=s["seqlens"], block_table=s["table"], k_scale=s["ks"],
             v_scale=s["vs"], rope=s["rope"])
    a.update(kw)
    return longctx.kvcache_append(**a)


def _flash(s, **kw):
    a = dict(q=s["q"], k=s["k"], v=s["v"], causal=True)
    a.update(kw)
    return longctx.flash_attn_func(**a)


def _varlen(s, **kw):
    a = dict(q=s["q"], k=s["k"], v=s["v"], cu_seqlens_q=s["cu"], cu_seqlens_k=s["cu"],
             max_seqlen_q=s["max_s"], max_seqlen_k=s["max_s"], causal=True)
    a.update(kw)
    return longctx.flash_attn_varlen_func(**a)


def _rope(s, **kw):
    a = dict(q=s["q"], k=s["k"], positions=s["pos"], inv_freq=s["rf"].inv_freq,
             attention_factor=s["rf"].attention_factor)
    a.update(kw)
    return longctx.apply_rope(**a)


def _ring(s, **kw):
    a = dict(q=s["q"], k=s["k"], v=s["v"], causal=True)
    a.update(kw)
    return longctx.ring_flash_attn_func(**a)


def _yarn(**kw):
    return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, **kw}


def _with_nan(t, idx, value=NAN):
    t = t.clone()
    t[idx] = value
    return t


RT, VE, TE, KE = RuntimeError, ValueError, TypeError, KeyError
_NO_HOST_READ = ("CUDA flash varlen does not read cu_seqlens on the host (no sync, as in "
                 "FlashAttention): its values are not validated there")
F, VL, KV, KP = flash_inputs, varlen_inputs, kv_inputs, kv_packed
GF, GV, GK, GA = good_flash, good_varlen, good_kv, good_append

CASES = [
    # flash_attn_func
    Case("flash_attn_func", "k on meta", F, lambda s: _flash(s, k=_meta(s["k"])), RT,
         r"flash_attn_fwd: k must be on the same device as q \((cpu|cuda:0)\), got meta", GF),
    Case("flash_attn_func", "v on meta", F, lambda s: _flash(s, v=_meta(s["v"])), RT,
         r"flash_attn_fwd: v must be on the same device as q", GF),
    Case("flash_attn_func", "q on meta", F, lambda s: _flash(s, q=_meta(s["q"])), RT,
         r"flash_attn_fwd: k must be on the same device as q \(meta\)", GF),
    Case("flash_attn_func", "head_dim 0", F,
         lambda s: _flash(s, q=s["q"][..., :0], k=s["k"][..., :0], v=s["v"][..., :0]), VE,
         r"longctx.flash_attn_func: q must have head_dim >= 1", GF),
    Case("flash_attn_func", "k dtype", F, lambda s: _flash(s, k=s["k"].half()), RT,
         r"flash_attn_fwd: k must have the dtype of q", GF),
    Case("flash_attn_func", "q dtype int", F, lambda s: _flash(s, q=s["q"].int()), RT,
         r"flash_attn_fwd: q must have dtype", GF),
    Case("flash_attn_func", "k head_dim", F, lambda s: _flash(s, k=s["k"][..., :32]), RT,
         r"flash_attn_fwd: k must have the head_dim of q \(64\), got 32", GF),
    Case("flash_attn_func", "heads not a multiple", F, lambda s: _flash(s, q=s["q"][:, :, :3]),
         RT, r"q heads must be a multiple of the heads_kv of k/v \(GQA\)", GF),
    Case("flash_attn_func", "k rank 3", F, lambda s: _flash(s, k=s["k"][0]), RT,
         r"flash_attn_fwd: k must have 4 dimensions", GF),
    Case("flash_attn_func", "k rank 1", F, lambda s: _flash(s, k=s["k"].flatten()), RT,
         r"flash_attn_fwd: k must have 4 dimensions", GF),
    Case("flash_attn_func", "q rank 3", F, lambda s: _flash(s, q=s["q"][0]), RT,
         r"flash_attn_fwd: q must have 4 dimensions", GF),
    Case("flash_attn_func", "k batch", F, lambda s: _flash(s, k=s["k"].expand(2, -1, -1, -1),
                                                           v=s["v"].expand(2, -1, -1, -1)), RT,
         r"k must have the batch of q \(1\), got 2", GF),
    Case("flash_attn_func", "v seqlen", F, lambda s: _flash(s, v=s["v"][:, :5]), RT,
         r"v must have the seqlen_k of k \(8\), got 5", GF),
    Case("flash_attn_func", "k last dim strided", F, lambda s: _flash(
        s, k=torch.cat([s["k"], s["k"]], -1)[..., ::2]), RT,
         r"k must be contiguous in its last dimension", GF),
    Case("flash_attn_func", "window_size not a pair", F, lambda s: _flash(s, window_size=4), VE,
         r"window_size must be a pair", GF),
    Case("flash_attn_func", "window_size -2", F, lambda s: _flash(s, window_size=(-2, 0)), VE,
         r"window_size values must be -1 \(unbounded\) or >= 0", GF),
    Case("flash_attn_func", "window right with causal", F,
         lambda s: _flash(s, window_size=(4, 3)), VE, r"contradicts causal=True", GF),
    Case("flash_attn_func", "softmax_scale inf", F, lambda s: _flash(s, softmax_scale=INF), RT,
         r"softmax_scale must be finite", GF),
    # flash_attn_varlen_func
    Case("flash_attn_func", "sinks of the wrong shape", F,
         lambda s: _flash(s, sinks=torch.zeros(3, device=s["q"].device)), RT,
         r"flash_attn_fwd: sinks must have shape \(heads,\) = \(4\), got \[3\]", GF),
    Case("flash_attn_func", "sinks on meta", F,
         lambda s: _flash(s, sinks=torch.zeros(4, device=META)), RT,
         r"flash_attn_fwd: sinks must be on the same device as q", GF),
    Case("flash_attn_func", "sinks int32", F,
         lambda s: _flash(s, sinks=torch.zeros(4, dtype=torch.int32)), TE,
         r"flash_attn_func: sinks must be a floating-point tensor", GF),
    Case("flash_attn_func", "softcap -1", F, lambda s: _flash(s, softcap=-1.0), RT,
         r"flash_attn_fwd: softcap must be finite and >= 0", GF),
    Case("flash_attn_func", "softcap nan", F, lambda s: _flash(s, softcap=NAN), RT,
         r"flash_attn_fwd: softcap must be finite and >= 0", GF),
    Case("flash_attn_varlen_func", "cu_seqlens_q on meta", VL,
         lambda s: _varlen(s, cu_seqlens_q=_meta(s["cu"])), RT,
         r"flash_attn_fwd: cu_seqlens_q must be on the same device as q", GV),
    Case("flash_attn_varlen_func", "cu_seqlens_k int64", VL,
         lambda s: _varlen(s, cu_seqlens_k=s["cu"].long()), RT,
         r"cu_seqlens_k must have dtype Int, got Long", GV),
    Case("flash_attn_varlen_func", "cu_seqlens_q decreasing", VL,
         lambda s: _varlen(s, cu_seqlens_q=_i32([0, 9, 8], s["q"].device), max_seqlen_q=9),
         RT, r"cu_seqlens_q must be non-decreasing", GV, _NO_HOST_READ),
    Case("flash_attn_varlen_func", "cu_seqlens_q past the rows", VL,
         lambda s: _varlen(s, cu_seqlens_q=_i32([0, 3, 7], s["q"].device)), RT,
         r"cu_seqlens_q must end at the number of packed rows \(8\), got 7", GV, _NO_HOST_READ),
    Case("flash_attn_varlen_func", "cu_seqlens_k entries", VL,
         lambda s: _varlen(s, cu_seqlens_k=_i32([0, 8], s["q"].device)), RT,
         r"cu_seqlens_k must have the batch \+ 1 = 3 entries", GV),
    Case("flash_attn_varlen_func", "max_seqlen_q too small", VL,
         lambda s: _varlen(s, max_seqlen_q=2), RT,
         r"cu_seqlens_q describes sequence 0 of length 3, longer than its max_seqlen = 2", GV,
         _NO_HOST_READ),
    Case("flash_attn_varlen_func", "max_seqlen_k negative", VL,
         lambda s: _varlen(s, max_seqlen_k=-1), RT, r"max_seqlen_k must lie in \[0, 2\^31\)",
         GV),
    Case("flash_attn_varlen_func", "head_dim 0", VL, lambda s: _varlen(
        s, q=s["q"][..., :0], k=s["k"][..., :0], v=s["v"][..., :0]), VE,
         r"longctx.flash_attn_varlen_func: q must have head_dim >= 1", GV),
    # flash_attn_with_kvcache (with new k/v and RoPE unless said otherwise)
    Case("flash_attn_with_kvcache", "block_table on meta", KV,
         lambda s: _kv(s, block_table=_meta(s["table"])), RT,
         r"flash_attn_with_kvcache: block_table must be on the same device as q", GK),
    Case("flash_attn_with_kvcache", "block_table on meta, no new k/v", KV,
         lambda s: _kv(s, block_table=_meta(s["table"]), k=None, v=None, rope=None), RT,
         r"flash_attn_with_kvcache: block_table must be on the same device as q", GK),
    Case("flash_attn_with_kvcache", "cache_seqlens on meta", KV,
         lambda s: _kv(s, cache_seqlens=_meta(s["seqlens"])), RT,
         r"flash_attn_with_kvcache: cache_seqlens must be on the same device as q", GK),
    Case("flash_attn_with_kvcache", "k on meta", KV, lambda s: _kv(s, k=_meta(s["knew"])), RT,
         r"flash_attn_with_kvcache: k must be on the same device as q", GK),
    Case("flash_attn_with_kvcache", "q on meta", KV, lambda s: _kv(s, q=_meta(s["q"])), RT,
         r"flash_attn_with_kvcache: k_cache must be on the same device as q \(meta\)", GK),
    Case("flash_attn_with_kvcache", "rope on meta", KV,
         lambda s: _kv(s, rope=(_meta(s["rope"].inv_freq), 1.0)), RT,
         r"flash_attn_with_kvcache: rope must be on the same device as q", GK),
    Case("flash_attn_with_kvcache", "page id outside the pool", KV,
         lambda s: _kv(s, block_table=_i32([[0, 1, 2], [9, 4, 5]], s["q"].device)), RT,
         r"block_table\[1\]\[0\] = 9 is not a page of the pool", GK),
    Case("flash_attn_with_kvcache", "cache_seqlens past the pages", KV,
         lambda s: _kv(s, cache_seqlens=_i32([12, 2], s["q"].device)), RT,
         r"cache_seqlens\[0\] = 12 plus 1 new tokens = 13 tokens need 4 pages of 4 but "
         r"block_table has 3 columns", GK),
    Case("flash_attn_with_kvcache", "cache_seqlens int64", KV,
         lambda s: _kv(s, cache_seqlens=s["seqlens"].long()), RT,
         r"flash_attn_with_kvcache: cache_seqlens must have dtype Int, got Long", GK),
    Case("flash_attn_with_kvcache", "q head_dim (before the append)", KV,
         lambda s: _kv(s, q=s["q"][..., :32]), RT,
         r"q has head_dim 32 but k_cache has head_dim = 64", GK),
    Case("flash_attn_with_kvcache", "q heads (before the append)", KV,
         lambda s: _kv(s, q=s["q"][:, :, :3]), RT,
         r"q heads must be a multiple of the kv_heads of k_cache \(GQA\): q has 3", GK),
    Case("flash_attn_with_kvcache", "q dtype (before the append)", KV,
         lambda s: _kv(s, q=s["q"].half()), RT, r"k_cache must have the dtype of q \(Half\)",
         GK),
    Case("flash_attn_with_kvcache", "q batch (before the append)", KV,
         lambda s: _kv(s, q=s["q"][:1]), RT, r"q must have the batch of block_table \(2\), "
         r"got 1", GK),
    Case("flash_attn_with_kvcache", "num_splits -1 (before the append)", KV,
         lambda s: _kv(s, num_splits=-1), RT, r"num_splits must", GK),
    Case("flash_attn_with_kvcache", "sinks of the wrong shape (before the append)", KV,
         lambda s: _kv(s, sinks=torch.zeros(5, device=s["q"].device)), RT,
         r"flash_attn_with_kvcache: sinks must have shape \(heads,\) = \(4\), got \[5\]", GK),
    Case("flash_attn_with_kvcache", "softcap inf (before the append)", KV,
         lambda s: _kv(s, softcap=INF), RT, r"softcap must be finite and >= 0", GK),
    Case("flash_attn_with_kvcache", "softmax_scale nan (before the append)", KV,
         lambda s: _kv(s, softmax_scale=NAN), RT, r"softmax_scale must be finite", GK),
    Case("flash_attn_with_kvcache", "head_dim 0", KV, lambda s: _kv(s, q=s["q"][..., :0]), VE,
         r"longctx.flash_attn_with_kvcache: q must have head_dim >= 1", GK),
    Case("flash_attn_with_kvcache", "new k heads", KV, lambda s: _kv(
        s, k=s["knew"].repeat(1, 1, 2, 1)[:, :, :3], v=s["vnew"].repeat(1, 1, 2, 1)[:, :, :3]),
         RT, r"kvcache_append: k has 3 heads but k_cache has kv_heads = 2", GK),
    Case("flash_attn_with_kvcache", "k without v", KV, lambda s: _kv(s, v=None), VE,
         r"k and v must be given together", GK),
    Case("flash_attn_with_kvcache", "scales on a bf16 cache", KV,
         lambda s: _kv(s, k_scale=1.0, v_scale=1.0), VE,
         r"k_scale / v_scale are given but the cache dtype", GK),
    Case("flash_attn_with_kvcache", "int8: k_scale missing", kv_int8,
         lambda s: _kv(s, k_scale=None), RT, r"k_scale_cache is required for an int8 cache", GK),
    Case("flash_attn_with_kvcache", "int8: k_scale shape", kv_int8,
         lambda s: _kv(s, k_scale=s["ks"][:, :2]), RT,
         r"k_scale_cache must have shape \(num_blocks, block_size, kv_heads\)", GK),
    Case("flash_attn_with_kvcache", "fp8: k_scale nan", kv_fp8,
         lambda s: _kv(s, k_scale=_with_nan(s["ks"], 1)), RT,
         r"k_fp8_scale\[1\] = nan must be finite and > 0", GK),
    Case("flash_attn_with_kvcache", "fp8: v_scale missing", kv_fp8,
         lambda s: _kv(s, v_scale=None), RT, r"v_fp8_scale is required", GK),
    # ... packed (cu_seqlens_q): the caller's argument is named, never cu_new
    Case("flash_attn_with_kvcache", "rope, cu_seqlens_q decreasing", KP,
         lambda s: _kv(s, k=None, v=None, cu_seqlens_q=_i32([0, 2, 1], s["q"].device)), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q must be non-decreasing", GK),
    Case("flash_attn_with_kvcache", "rope, cu_seqlens_q past the rows", KP,
         lambda s: _kv(s, k=None, v=None, cu_seqlens_q=_i32([0, 2, 4], s["q"].device)), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q must end at the number of packed rows \(3\), "
         r"got 4", GK),
    Case("flash_attn_with_kvcache", "rope, cu_seqlens_q entries", KP,
         lambda s: _kv(s, k=None, v=None, cu_seqlens_q=_i32([0, 3], s["q"].device)), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q must have batch \+ 1 = 3 entries", GK),
    Case("flash_attn_with_kvcache", "new k/v, cu_seqlens_q decreasing", KP,
         lambda s: _kv(s, cu_seqlens_q=_i32([0, 2, 1], s["q"].device)), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q must be non-decreasing", GK),
    Case("flash_attn_with_kvcache", "new k/v, cu_seqlens_q int64", KP,
         lambda s: _kv(s, cu_seqlens_q=s["cu"].long()), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q must have dtype Int, got Long", GK),
    Case("flash_attn_with_kvcache", "new k/v, max_seqlen_q too small", KP,
         lambda s: _kv(s, max_seqlen_q=1), RT,
         r"flash_attn_with_kvcache: cu_seqlens_q describes sequence 1 of length 2", GK),
    Case("flash_attn_with_kvcache", "new k rows", KP,
         lambda s: _kv(s, k=s["knew"][:2], v=s["vnew"][:2]), RT,
         r"flash_attn_with_kvcache: k must have total_q = 3 rows", GK),
    Case("flash_attn_with_kvcache", "max_seqlen_q missing", KP,
         lambda s: _kv(s, max_seqlen_q=None), VE, r"max_seqlen_q is required with cu_seqlens_q",
         GK),
    # kvcache_append
    Case("kvcache_append", "cache_seqlens on meta", KV,
         lambda s: _append(s, cache_seqlens=_meta(s["seqlens"])), RT,
         r"kvcache_append: cache_seqlens must be on the same device as k", GA),
    Case("kvcache_append", "block_table on meta", KV,
         lambda s: _append(s, block_table=_meta(s["table"])), RT,
         r"kvcache_append: block_table must be on the same device as k", GA),
    Case("kvcache_append", "positions on meta", KV,
         lambda s: _append(s, positions=_meta(torch.zeros(2, 1, dtype=torch.int64))), RT,
         r"kvcache_append: positions must be on the same device as k", GA),
    Case("kvcache_append", "int8: k_scale on meta", kv_int8,
         lambda s: _append(s, k_scale=_meta(s["ks"])), RT,
         r"kvcache_append: k_scale_cache must be on the same device as k", GA),
    Case("kvcache_append", "v dtype", KV, lambda s: _append(s, v=s["vnew"].half()), RT,
         r"v must have the dtype of k", GA),
    Case("kvcache_append", "a page of two sequences", KV,
         lambda s: _append(s, block_table=_i32([[0, 1, 2], [1, 4, 5]], s["q"].device),
                           cache_seqlens=_i32([5, 0], s["q"].device)), RT,
         r"block_table\[0\]\[1\] = 1 receives new tokens of sequence 0 but the page is used 2 "
         r"times", GA),
    Case("kvcache_append", "k_cache overlapping", KV,
         lambda s: _append(s, k_cache=s["kc"][:1].expand(6, -1, -1, -1)), RT,
         r"k_cache is written in place and must not have overlapping elements", GA),
    Case("kvcache_append", "positions without rope", KV,
         lambda s: _append(s, rope=None, positions=torch.zeros(2, 1, dtype=torch.int64,
                                                               device=s["q"].device)), RT,
         r"positions is given but inv_freq is not", GA),
    Case("kvcache_append", "cu_new decreasing", KP,
         lambda s: _append(s, cu_new=_i32([0, 2, 1], s["q"].device)), RT,
         r"kvcache_append: cu_new must be non-decreasing", GA),
    Case("kvcache_append", "rope too long", KV,
         lambda s: _append(s, rope=(torch.ones(33, device=s["q"].device), 1.0)), RT,
         r"inv_freq has 33 frequencies, so rotary_dim = 66", GA),
    Case("kvcache_append", "page id negative", KV,
         lambda s: _append(s, block_table=_i32([[0, -1, 2], [3, 4, 5]], s["q"].device)), RT,
         r"block_table\[0\]\[1\] = -1 is not a page of the pool", GA),
    # PagedKVCache
    Case("PagedKVCache", "num_blocks 0", no_inputs,
         lambda s: longctx.PagedKVCache(0, 4, 2, 64, device=s["dev"]), VE,
         r"num_blocks, block_size, kv_heads and head_dim must be >= 1", good_constructor),
    Case("PagedKVCache", "cache_dtype", no_inputs,
         lambda s: longctx.PagedKVCache(2, 4, 2, 64, cache_dtype=FP16, device=s["dev"]), VE,
         r"cache_dtype must be", good_constructor),
    Case("PagedKVCache", "k_scale on a bf16 cache", no_inputs,
         lambda s: longctx.PagedKVCache(2, 4, 2, 64, k_scale=1.0, device=s["dev"]), VE,
         r"k_scale / v_scale apply to float8_e4m3fn caches only", good_constructor),
    Case("PagedKVCache.free", "seq_id '0'", cache_inputs, lambda s: s["cache"].free("0"), TE,
         r"PagedKVCache.free: seq_id must be an int \(an id from add_sequence\), got '0'",
         good_cache),
    Case("PagedKVCache.free", "seq_id not live", cache_inputs, lambda s: s["cache"].free(7), KE,
         r"no live sequence 7", good_cache),
    Case("PagedKVCache.seqlen", "seq_id 1.0", cache_inputs, lambda s: s["cache"].seqlen(1.0),
         TE, r"PagedKVCache.seqlen: seq_id must be an int", good_cache),
    Case("PagedKVCache.pages", "seq_id True", cache_inputs, lambda s: s["cache"].pages(True), TE,
         r"PagedKVCache.pages: seq_id must be an int", good_cache),
    Case("PagedKVCache.reserve", "out of pages", cache_inputs,
         lambda s: s["cache"].reserve(1, 40), RT, r"out of pages: sequence 1 needs 9 more",
         good_cache),
    Case("PagedKVCache.reserve", "seq_id '1'", cache_inputs,
         lambda s: s["cache"].reserve("1", 4), TE, r"PagedKVCache.reserve: seq_id must be an int",
         good_cache),
    Case("PagedKVCache.block_table", "seq_ids duplicates", cache_inputs,
         lambda s: s["cache"].block_table([0, 0]), VE, r"seq_ids has duplicates", good_cache),
    Case("PagedKVCache.cache_seqlens", "seq_ids a string", cache_inputs,
         lambda s: s["cache"].cache_seqlens("01"), TE,
         r"PagedKVCache.cache_seqlens: seq_ids must be a sequence of ints", good_cache),
    Case("PagedKVCache.gather", "seq_id 'x'", cache_inputs, lambda s: s["cache"].gather("x"),
         TE, r"PagedKVCache.gather: seq_id must be an int", good_cache),
    Case("PagedKVCache.append", "out of pages in the middle of a batch", cache_inputs,
         lambda s: s["cache"].append(torch.cat([s["k"]] * 6, 1), torch.cat([s["v"]] * 6, 1),
                                     [0, 1]), RT, r"out of pages: sequence 1 needs", good_cache),
    Case("PagedKVCache.append", "cu_new decreasing", cache_inputs,
         lambda s: s["cache"].append(s["kp"], s["vp"], [0, 1], cu_new=[0, 3, 2]), RT,
         r"PagedKVCache.append: cu_new must be non-decreasing", good_cache),
    Case("PagedKVCache.append", "cu_new past the total", cache_inputs,
         lambda s: s["cache"].append(s["kp"], s["vp"], [0, 1], cu_new=[0, 1, 9]), RT,
         r"PagedKVCache.append: cu_new must end at the number of packed rows \(3\), got 9",
         good_cache),
    Case("PagedKVCache.append", "cu_new entries", cache_inputs,
         lambda s: s["cache"].append(s["kp"], s["vp"], [0, 1], cu_new=[0, 3]), VE,
         r"cu_new must have 3 entries", good_cache),
    Case("PagedKVCache.append", "k heads", cache_inputs,
         lambda s: s["cache"].append(s["k"][:, :, :1], s["v"][:, :, :1], [0, 1]), RT,
         r"k has 1 heads but k_cache has kv_heads = 2", good_cache),
    Case("PagedKVCache.append", "fp8 uncalibrated: k heads", cache_fp8_uncalibrated,
         lambda s: s["cache"].append(s["k"].repeat(1, 1, 2, 1), s["v"].repeat(1, 1, 2, 1),
                                     [0, 1]), RT,
         r"k has 4 heads but k_cache has kv_heads = 2", good_cache),
    Case("PagedKVCache.append", "fp8 uncalibrated: NaN in v", cache_fp8_uncalibrated,
         lambda s: s["cache"].append(s["k"], _with_nan(s["v"], (1, 0, 1, 5)), [0, 1]), VE,
         r"PagedKVCache.append: v holds NaN in kv head 1", good_cache),
    Case("PagedKVCache.append", "fp8 uncalibrated: Inf in k", cache_fp8_uncalibrated,
         lambda s: s["cache"].append(_with_nan(s["k"], (0, 0, 0, 0), -INF), s["v"], [0, 1]), VE,
         r"PagedKVCache.append: k holds an infinity in kv head 0", good_cache),
    Case("PagedKVCache.append", "k on meta", cache_inputs,
         lambda s: s["cache"].append(_meta(s["k"]), s["v"], [0, 1]), RT,
         r"PagedKVCache.append: k must be on the cache's device", good_cache),
    Case("PagedKVCache.append", "packed k without cu_new", cache_inputs,
         lambda s: s["cache"].append(s["kp"], s["vp"], [0, 1]), VE,
         r"k must be \(batch = 2, seqlen_new, kv_heads, head_dim\) without cu_new", good_cache),
    Case("PagedKVCache.append", "positions shape", cache_int8,
         lambda s: s["cache"].append(s["k"], s["v"], [0, 1], rope=longctx.rope_frequencies(
             64, device=s["k"].device), positions=torch.zeros(3, dtype=torch.int64,
                                                              device=s["k"].device)), RT,
         r"positions must have shape \(batch, seqlen_new\) = \(2, 1\)", good_cache),
    Case("PagedKVCache.append", "int8: v dtype", cache_int8,
         lambda s: s["cache"].append(s["k"], s["v"].half(), [0, 1]), RT,
         r"v must have the dtype of k", good_cache),
    Case("PagedKVCache.attend", "q heads", cache_inputs,
         lambda s: s["cache"].attend(s["q"][:, :, :3], [0, 1]), RT,
         r"q heads must be a multiple of the kv_heads", good_cache),
    Case("PagedKVCache.attend", "q on meta", cache_inputs,
         lambda s: s["cache"].attend(_meta(s["q"]), [0, 1]), RT,
         r"PagedKVCache.attend: q must be on the cache's device", good_cache),
    Case("PagedKVCache.attend", "cu_seqlens_q entries", cache_inputs,
         lambda s: s["cache"].attend(s["q"][0], [0, 1], cu_seqlens_q=[0]), RT,
         r"cu_seqlens_q must have batch \+ 1 = 3 entries", good_cache),
    Case("PagedKVCache.add_sequence", "an argument", cache_inputs,
         lambda s: s["cache"].add_sequence(3), TE, r"positional argument", good_cache),
    # apply_rope
    Case("apply_rope", "positions on meta", rope_inputs,
         lambda s: _rope(s, positions=_meta(s["pos"])), RT,
         r"apply_rope_: positions must be on the same device as q", good_rope),
    Case("apply_rope", "positions on meta, out of place", rope_inputs,
         lambda s: _rope(s, positions=_meta(s["pos"]), inplace=False), RT,
         r"apply_rope: positions must be on the same device as q", good_rope),
    Case("apply_rope", "inv_freq on meta", rope_inputs,
         lambda s: _rope(s, inv_freq=_meta(s["rf"].inv_freq)), RT,
         r"inv_freq must be on the same device as q", good_rope),
    Case("apply_rope", "k on meta", rope_inputs, lambda s: _rope(s, k=_meta(s["k"])), RT,
         r"k must be on the same device as q", good_rope),
    Case("apply_rope", "max_position -5", rope_inputs, lambda s: _rope(s, max_position=-5), VE,
         r"longctx.apply_rope: max_position must be None \(no check\) or an int >= 0, got -5",
         good_rope),
    Case("apply_rope", "max_position 2.5", rope_inputs, lambda s: _rope(s, max_position=2.5),
         VE, r"max_position must be None", good_rope),
    Case("apply_rope", "positions past max_position", rope_inputs,
         lambda s: _rope(s, max_position=4), RT,
         r"positions must lie in \[0, max_position = 4\), got values in \[0, 7\]", good_rope),
    Case("apply_rope", "positions shape", rope_inputs, lambda s: _rope(s, positions=s["pos"][:5]),
         RT, r"positions must have shape \(batch, seqlen\) = \(1, 8\)", good_rope),
    Case("apply_rope", "positions float", rope_inputs,
         lambda s: _rope(s, positions=s["pos"].float()), RT, r"positions must have dtype",
         good_rope),
    Case("apply_rope", "inv_freq too long", rope_inputs,
         lambda s: _rope(s, inv_freq=torch.ones(33, device=s["q"].device)), RT,
         r"inv_freq has 33 frequencies", good_rope),
    Case("apply_rope", "attention_factor 0", rope_inputs,
         lambda s: _rope(s, attention_factor=0.0), RT,
         r"attention_factor must be a finite positive number", good_rope),
    Case("apply_rope", "k head_dim", rope_inputs, lambda s: _rope(s, k=s["k"][..., :32]), RT,
         r"k must have the same head_dim as q", good_rope),
    Case("apply_rope", "q not a tensor", rope_inputs, lambda s: _rope(s, q=[1.0]), TE,
         r"longctx.apply_rope: q must be a tensor", good_rope),
    Case("apply_rope", "q overlapping", rope_inputs,
         lambda s: _rope(s, q=s["q"][:, :1].expand(1, 8, 4, 64)), RT,
         r"q is written in place and must not have overlapping elements", good_rope),
    # rope_frequencies
    Case("rope_frequencies", "scaling 'linear'", no_inputs,
         lambda s: longctx.rope_frequencies(64, scaling="linear"), TE,
         r"longctx.rope_frequencies: scaling must be a rope_scaling dict .* got 'linear'",
         good_rope_frequencies),
    Case("rope_frequencies", "scaling 4.0", no_inputs,
         lambda s: longctx.rope_frequencies(64, scaling=4.0), TE,
         r"scaling must be a rope_scaling dict .* got 4.0", good_rope_frequencies),
    Case("rope_frequencies", "YaRN contradictory max_position_embeddings", no_inputs,
         lambda s: longctx.rope_frequencies(64, 1e6, _yarn(), max_position_embeddings=65536), VE,
         r"rope_scaling\['yarn'\]: contradictory max_position_embeddings = 65536",
         good_rope_frequencies),
    Case("rope_frequencies", "unknown rope_type", no_inputs,
         lambda s: longctx.rope_frequencies(64, scaling={"rope_type": "su"}), VE,
         r"unknown rope_type 'su'", good_rope_frequencies),
    Case("rope_frequencies", "rope_type a list", no_inputs,
         lambda s: longctx.rope_frequencies(64, scaling={"rope_type": ["yarn"], "factor": 4.0}),
         VE, r"unknown rope_type \['yarn'\]", good_rope_frequencies),
    Case("rope_frequencies", "YaRN original_max_position_embeddings inf", no_inputs,
         lambda s: longctx.rope_frequencies(64, 1e6, {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": math.inf}),
         VE, r"original_max_position_embeddings must be a finite number >= 1, got inf",
         good_rope_frequencies),
    Case("rope_frequencies", "head_dim 0", no_inputs, lambda s: longctx.rope_frequencies(0), VE,
         r"head_dim must be a positive int", good_rope_frequencies),
    Case("rope_frequencies", "max_position_embeddings -1", no_inputs,
         lambda s: longctx.rope_frequencies(64, max_position_embeddings=-1), VE,
         r"max_position_embeddings must be a positive int", good_rope_frequencies),
    # fp8_scales_from_data, int8_scales
    Case("fp8_scales_from_data", "NaN", calib_inputs,
         lambda s: longctx.fp8_scales_from_data(_with_nan(s["x"], (2, 4, 1, 7))), VE,
         r"longctx.fp8_scales_from_data: x holds NaN in kv head 1", good_calib),
    Case("fp8_scales_from_data", "Inf", calib_inputs,
         lambda s: longctx.fp8_scales_from_data(_with_nan(s["x"], (0, 0, 0, 0), INF)), VE,
         r"x holds an infinity in kv head 0", good_calib),
    Case("fp8_scales_from_data", "x 1-D", calib_inputs,
         lambda s: longctx.fp8_scales_from_data(s["x"].flatten()), VE,
         r"x must be \(\.\.\., kv_heads, head_dim\)", good_calib),
    Case("fp8_scales_from_data", "margin 0", calib_inputs,
         lambda s: longctx.fp8_scales_from_data(s["x"], margin=0.0), VE,
         r"margin must be finite and > 0", good_calib),
    Case("int8_scales", "num_blocks 0", no_inputs,
         lambda s: longctx.int8_scales(0, 4, 2, device=s["dev"]), VE, r"int8_scales: .*>= 1",
         good_int8_scales),
    Case("kv_pool", "head_dim 0", no_inputs,
         lambda s: longctx.kv_pool(2, 4, 2, 0, device=s["dev"]), VE,
         r"kv_pool: num_blocks, block_size, kv_heads, head_dim must be >= 1", good_kv_pool),
    Case("kv_pool", "dtype float64", no_inputs,
         lambda s: longctx.kv_pool(2, 4, 2, 64, dtype=torch.float64, device=s["dev"]), VE,
         r"kv_pool: dtype must be .*got torch.float64", good_kv_pool),
    Case("kv_pool", "head_major 'HND'", no_inputs,
         lambda s: longctx.kv_pool(2, 4, 2, 64, head_major="HND", device=s["dev"]), TE,
         r"kv_pool: head_major must be True, False or None", good_kv_pool),
    # ring_shard, ring_unshard, ring_positions
    Case("ring_shard", "dim 7", shard_inputs, lambda s: longctx.ring_shard(s["x"], 0, 2, dim=7),
         VE, r"longctx.ring_shard: dim must be an int in \[-4, 4\)", good_shard),
    Case("ring_shard", "layout", shard_inputs,
         lambda s: longctx.ring_shard(s["x"], 0, 2, layout="ring"), VE, r"layout must be one of",
         good_shard),
    Case("ring_shard", "rank 2 of 2", shard_inputs, lambda s: longctx.ring_shard(s["x"], 2, 2),
         VE, r"rank must be in \[0, 2\), got 2", good_shard),
    Case("ring_shard", "seqlen not divisible", shard_inputs,
         lambda s: longctx.ring_shard(s["x"], 0, 3), VE,
         r"divisible by 2 \* world_size = 6, got seqlen 8", good_shard),
    Case("ring_shard", "x not a tensor", shard_inputs,
         lambda s: longctx.ring_shard([1, 2], 0, 1), TE, r"ring_shard: x must be a tensor",
         good_shard),
    Case("ring_unshard", "no shards", shard_inputs, lambda s: longctx.ring_unshard([]), VE,
         r"needs at least one shard", good_shard),
    Case("ring_unshard", "shapes differ", shard_inputs,
         lambda s: longctx.ring_unshard([s["shards"][0], s["shards"][1][:, :2]]), VE,
         r"every shard must have the same shape", good_shard),
    Case("ring_unshard", "dim 9", shard_inputs,
         lambda s: longctx.ring_unshard(s["shards"], dim=9), VE,
         r"ring_unshard: dim must be an int", good_shard),
    Case("ring_positions", "seqlen not divisible", shard_inputs,
         lambda s: longctx.ring_positions(7, 0, 2), VE, r"divisible by 2 \* world_size = 4",
         good_shard),
    Case("ring_positions", "rank -1", shard_inputs, lambda s: longctx.ring_positions(8, -1, 2),
         VE, r"rank must be in \[0, 2\)", good_shard),
    # ring_flash_attn_func (a process group of one rank)
    Case("ring_flash_attn_func", "head_dim 0", F, lambda s: _ring(
        s, q=s["q"][..., :0], k=s["k"][..., :0], v=s["v"][..., :0]), VE,
         r"longctx.ring_flash_attn_func: q must have head_dim >= 1", good_ring),
    Case("ring_flash_attn_func", "k on meta", F, lambda s: _ring(s, k=_meta(s["k"])), VE,
         r"q, k, v must be on one device", good_ring),
    Case("ring_flash_attn_func", "q rank 3", F, lambda s: _ring(s, q=s["q"][0]), VE,
         r"q must be a 4-d tensor", good_ring),
    Case("ring_flash_attn_func", "layout", F, lambda s: _ring(s, layout="ring"), VE,
         r"layout must be one of", good_ring),
    Case("ring_flash_attn_func", "window_size -3", F, lambda s: _ring(s, window_size=(-3, 0)),
         VE, r"window_size values must be -1", good_ring),
    # build_info takes no argument
    Case("build_info", "an argument", no_inputs, lambda s: longctx.build_info(1), TE,
         r"positional argument", good_build_info),
]


# --- snapshots --------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), t.dtype)
    c = t.detach().contiguous().cpu()
    return (tuple(t.shape), tuple(t.stride()), t.dtype, c.view(torch.uint8).clone()
            if c.numel() else c)


def snapshot(x):
    """Everything observable of x, with tensors as bytes (NaN-safe, bitwise comparison)."""
    if isinstance(x, torch.Tensor):
        return _tensor_bytes(x)
    if isinstance(x, longctx.PagedKVCache):
        return ("cache", snapshot(x.k_cache), snapshot(x.v_cache), snapshot(x.k_scale),
                snapshot(x.v_scale), list(x._free), copy.deepcopy(x._pages), dict(x._lens),
                x._next_id)
    if isinstance(x, dict):
        return {k: snapshot(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(snapshot(v) for v in x) if not hasattr(x, "_fields") else \
            tuple(snapshot(v) for v in x)
    return x


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def one_rank_group():
    """A process group of one rank (gloo; LONGCTX_RING_COMM=torch so CUDA tensors use it too)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _case_id(c: Case) -> str:
    return f"{c.op}: {c.id}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(case: Case, device, request, monkeypatch):
    if device != "cpu" and case.cpu_only:
        pytest.skip(case.cpu_only)
    if case.op == "ring_flash_attn_func":
        request.getfixturevalue("one_rank_group")
        monkeypatch.setenv("LONGCTX_RING_COMM", "torch")
    s = case.inputs(device)
    before = snapshot(s)
    with pytest.raises(case.exc, match=case.match):
        case.bad(s)
    assert_same(snapshot(s), before, "after the error")     # nothing was written
    got = snapshot(case.good(s))                            # a correct call still works ...
    fresh = case.inputs(device)
    want = snapshot(case.good(fresh))
    assert_same(got, want, "result")                        # ... and gives what it gives fresh
    assert_same(snapshot(s), snapshot(fresh), "state after the correct call")


def test_table_covers_the_public_api():
    """Every public function (longctx.__all__ less the constants and the result type) and every
    public PagedKVCache method has a case."""
    ops = {c.op for c in CASES}
    functions = {n for n in longctx.__all__
                 if callable(getattr(longctx, n)) and n not in ("RopeFrequencies",)}
    assert functions - ops == set()
    methods = {f"PagedKVCache.{n}" for n, v in vars(longctx.PagedKVCache).items()
               if callable(v) and not n.startswith("_")}
    assert methods - ops == set()


def test_dir_longctx_lists_no_torch():
    assert "torch" not in dir(longctx)


# --- NaN and Inf in quantized caches (longctx.kvcache's docstring, docs/kernels/kvcache.md) ----

def _cache_with(value, cache_dtype, dev, scale=None):
    c = longctx.PagedKVCache(4, 4, 2, 64, dtype=BF16, cache_dtype=cache_dtype, device=dev,
                             k_scale=scale, v_scale=scale)
    s = c.add_sequence()
    k = _randn(1, 6, 2, 64, device=dev, seed=30)
    k[0, 2, 1, 9] = value
    c.append(k, _randn(1, 6, 2, 64, device=dev, seed=31), [s])
    K, _ = c.gather(s)
    out = c.attend(_randn(1, 6, 4, 64, device=dev, seed=32), [s], causal=True)
    return K, out[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_int8_row_with_nan_or_inf_reads_nan(device, value):
    K, out = _cache_with(value, INT8, device)
    assert torch.isnan(K[2, 1]).all()                     # every channel of (token 2, head 1)
    assert torch.isfinite(K[2, 0]).all() and torch.isfinite(K[:2]).all()
    assert torch.isfinite(K[3:]).all()
    # causal: query rows 2.. see key 2; heads 2, 3 read kv head 1
    assert torch.isnan(out[2:, 2:]).all()
    assert torch.isfinite(out[:2]).all() and torch.isfinite(out[:, :2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_stores_nan_and_saturates_inf(device):
    K, out = _cache_with(NAN, FP8, device, scale=0.01)
    assert torch.isnan(K[2, 1, 9]) and torch.isfinite(K[2, 1, :9]).all()
    assert torch.isnan(out[2:, 2:]).all() and torch.isfinite(out[:2]).all()
    K, out = _cache_with(INF, FP8, device, scale=0.01)
    assert K[2, 1, 9].item() == pytest.approx(448 * 0.01)   # saturates, as any value past 448
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_calibration_refuses_nan_and_leaves_the_cache_uncalibrated(device):
    c = longctx.PagedKVCache(4, 4, 2, 64, dtype=BF16, cache_dtype=FP8, device=device)
    s = c.add_sequence()
    k = _with_nan(_randn(1, 3, 2, 64, device=device, seed=33), (0, 1, 0, 2))
    with pytest.raises(ValueError, match=r"k holds NaN in kv head 0"):
        c.append(k, _randn(1, 3, 2, 64, device=device, seed=34), [s])
    assert c.k_scale is None and c.v_scale is None and c.seqlen(s) == 0
    assert c.num_free_blocks == 4
    k = torch.nan_to_num(k)
    c.append(k, k, [s])
    assert torch.equal(c.k_scale, longctx.fp8_scales_from_data(k))
    assert math.isfinite(c.k_scale.sum().item())

"""The paged KV-cache benchmark: decode, chunked prefill and mixed batches over the cache, with
the peers measured in the same run.

Every case has GQA 32/8, page size 16 and bf16 queries; caches bf16 / fp8 e4m3 / int8. The cases
come in groups (run order; `--groups` and `--only` select, `python -m longctx.bench.kvcache_suite`
lists them):

- error: decode output of the fp8 / int8 caches vs the bf16 cache (same keys with outlier
  channels, 32K context) and vs float64 attention on the unquantized keys.
- decode: hdim 128, 32K and 128K cached tokens, batch 1 and 16. Ours:
  longctx.flash_attn_with_kvcache (split-KV, validate=False), timed inside a CUDA graph of 20
  calls (host launch overhead out, as serving engines run decode; the eager time is recorded
  too). Peers: torch SDPA with the cuDNN and flash backends on a contiguous bf16 cache with one
  query token, enable_gqa=True when the backend accepts it, else the group's query heads packed
  as query rows of their kv head (exact for a single query position; recorded per row as
  peer_mode). The bf16 pool's pages are allocated in order, so the contiguous cache of the peers
  is the same memory; the 8-bit rows' ratio_cudnn uses the bf16 row's cuDNN time (select whole
  (context, batch) groups). Achieved bandwidth counts the bytes of K, V, int8 scales and block
  table the kernel must read (decode_bytes), over the copy bandwidth (read + write bytes of a
  2 GiB device copy) measured in the same run. Alternatives in the same run (the row's
  "alternatives", ms): the pools in the other memory layout (decode and hdim groups; ours reads
  them as `kv_pool` and PagedKVCache allocate them: head-major within a page where a key row is
  narrower than 256 bytes, else token-major; the alternative is token_major_pool_ms or
  head_major_pool_ms), int8 scales slot-major and fixed split counts (decode group).
- window: bf16 decode of a 128K sequence through a sliding window of 4096 keys (window_size
  (4096, 0): the 4097 newest keys) beside a plain 4K-context decode, batch 1 and 16, timed as
  the decode rows; the rows carry case["window"], the peers run on a contiguous copy of the
  window's keys, bytes count the window's keys only, and the windowed row's ratio_plain is its
  time over the 4K decode's.
- hdim: decode at head dims 64, 96 and 256 (128K, batch 16, every format), timed as the decode
  rows, with frac_copy (issue 25's target: 0.85 of copy bandwidth). head_dim 96 (Phi-3) runs the
  kernels of width 128 reading 96 columns per key row; its bytes count 96 columns. A head dim the
  op rejects is recorded as a failed case (its error in the row).
- prefill: a 128K prompt in 8K chunks (append the chunk, then attend its 8K queries over the
  cache), hdim 128; ours vs the forward kernel (longctx.flash_attn_func, causal bottom-right) on
  contiguous bf16 K/V at the same (8K, 8K * (c + 1)) shapes; TFLOP/s with
  4 * heads * pairs * hdim FLOPs (chunk_flops). The chunked output is compared with one pass over
  the prompt. extra_bytes: for the chunks that end at 32K and at 128K, the peak device memory one
  attention call allocates beyond what existed before it (inputs, pool) and the outputs it
  returns (max_memory_allocated during the call minus memory_allocated after it).
- mixed: 15 decode rows at 32K and the last 8K chunk of a 16K prompt in ONE call with packed
  queries (cu_seqlens_q: lengths 1 x 15 and 8192; per-sequence cache lengths), as continuous
  batching issues them, against the same work as two calls (one decode call for the 15 rows, one
  prefill call for the chunk): ours_ms and separate_ms, both eager (the prefill path reads
  cache_seqlens on the host, so neither can be a CUDA graph today), same run.

`--quick` runs a small version of every group. Each finished case is written at once (partial
results survive a kill); `--merge` keeps the rows of an existing results file that this run does
not measure, so that runs of subsets build one file (rows then carry their run's date).

This module times the cases; their lists and arithmetic are in kvcache_cases, the merge of runs
and the markdown in kvcache_report.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .kvcache_cases import (BS, D, FORMATS, GROUPS, H, HK, DecodeCase, ErrorCase, MixedCase,
                            PrefillCase, chunk_ends, chunk_flops, cu_seqlens, decode_bytes,
                            plain_decode_ms, plan, select, visible_keys)
from .kvcache_report import load_results, markdown, merge_runs
from .._common import nvtx_range
from .results import Results, gpu_short_name
from .timing import time_cuda

COLUMNS = [("kind", "case.kind"), ("format", "case.format"), ("context", "case.context"),
           ("batch", "case.batch"), ("hdim", "case.hdim"), ("window", "case.window"),
           ("ours ms", "ours_ms"), ("eager ms", "ours_eager_ms"),
           ("GB/s", "gbps"), ("x copy", "frac_copy"),
           ("cuDNN ms", "peers.sdpa_cudnn"), ("flash ms", "peers.sdpa_flash"),
           ("ours / cuDNN", "ratio_cudnn"), ("separate ms", "separate_ms")]


# ------------------------------------------------------------------------------------------------
# timing and inputs
# ------------------------------------------------------------------------------------------------

def _graph_time(fn, inner: int = 20) -> float:
    """Median ms of one call of fn, replayed from a CUDA graph of `inner` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    ms = time_cuda(lambda: g.replay(), warmup=3, reps=20, min_time_ms=100)
    del g
    return ms / inner


def _extra_bytes(call) -> int:
    """Peak device memory allocated during call() beyond what it returns and what existed
    before it (allocated bytes of the caching allocator)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    kept = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    del kept
    return extra


def _sdpa_decode(backend, q, k, v):
    """SDPA on (b, 1, H, D) q and (b, s, HK, D) k/v views; returns (fn, mode)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    b, d = q.shape[0], q.shape[-1]
    qp = q.view(b, HK, H // HK, d)  # the group's heads as query rows of their kv head

    def packed():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qp, kt, vt)

    for fn, mode in ((gqa, "enable_gqa"), (packed, "gqa_heads_as_rows")):
        try:
            fn()
            torch.cuda.synchronize()
            return fn, mode
        except Exception:  # the backend refuses this form
            continue
    return None, None


def _fill_quantized(cache_dtype, batch, ctx, hdim=D, gen_chunk=8192):
    """Pools of `cache_dtype` holding batch sequences of ctx random tokens, written by our append
    from bf16 chunks; returns (k_cache, v_cache, k_scale, v_scale, table, seqlens, append_ms)."""
    from ..kvcache import int8_scales, kv_pool, kvcache_append

    pages = ctx // BS
    shape = (batch * pages, BS, HK, hdim)
    kc = kv_pool(*shape, dtype=cache_dtype, device="cuda")  # as PagedKVCache's
    vc = kv_pool(*shape, dtype=cache_dtype, device="cuda")
    if cache_dtype == torch.int8:  # head-major within a page, as PagedKVCache stores them
        ks = int8_scales(*shape[:3], device="cuda")
        vs = int8_scales(*shape[:3], device="cuda")
    else:  # N(0, 1) data: amax ~5; scale it to ~ 448 * 1.2
        ks = torch.full((HK,), 5.5 / 448, device="cuda")
        vs = torch.full((HK,), 5.5 / 448, device="cuda")
    table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms = 0.0
    for s in range(0, ctx, gen_chunk):
        n = min(gen_chunk, ctx - s)
        k = torch.randn(batch, n, HK, hdim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, n, HK, hdim, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), s, dtype=torch.int32, device="cuda")
        ev0.record()
        kvcache_append(k, v, kc, vc, lens, table, k_scale=ks, v_scale=vs, validate=False)
        ev1.record()
        torch.cuda.synchronize()
        ms += ev0.elapsed_time(ev1)
        del k, v
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return kc, vc, ks, vs, table, seqlens, ms


def _decode_inputs(fmt, batch, ctx, hdim=D):
    """One bf16 query token per sequence and a cache of `fmt` holding batch sequences of ctx
    random tokens in pools laid out as `kv_pool` allocates them (bf16: pages in order, so the
    token-major copy of the pools is the peers' contiguous cache);
    returns (q, k_cache, v_cache, k_scale, v_scale, table, seqlens, append_ms)."""
    q = torch.randn(batch, 1, H, hdim, device="cuda", dtype=torch.bfloat16)
    if fmt != "bf16":
        return (q,) + _fill_quantized(FORMATS[fmt], batch, ctx, hdim)
    pages = ctx // BS
    kc = _in_pool_layout(torch.randn(batch * pages, BS, HK, hdim, device="cuda",
                                     dtype=torch.bfloat16))
    vc = _in_pool_layout(torch.randn(batch * pages, BS, HK, hdim, device="cuda",
                                     dtype=torch.bfloat16))
    table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, kc, vc, None, None, table, seqlens, None


class _Shared:
    """What cases of one run share: the bf16 peers of each decode peer_key (the 8-bit rows'
    ratios use them) and the prefill reference of the current (prompt, chunk)."""

    def __init__(self, copy_gbps: float):
        self.copy_gbps = copy_gbps
        self.decode_peers: Dict[tuple, Tuple[dict, dict]] = {}
        self._prefill = None  # ((prompt, chunk), _PrefillReference)

    def prefill_reference(self, prompt: int, chunk: int) -> "_PrefillReference":
        if self._prefill is None or self._prefill[0] != (prompt, chunk):
            self._prefill = None  # free the old one first
            self._prefill = ((prompt, chunk), _PrefillReference(prompt, chunk))
        return self._prefill[1]

    def release_prefill(self) -> None:
        self._prefill = None


# ------------------------------------------------------------------------------------------------
# decode (the decode, window and hdim groups)
# ------------------------------------------------------------------------------------------------

def _run_decode(res: Results, c: DecodeCase, shared: _Shared) -> None:
    from ..kvcache import flash_attn_with_kvcache

    q, kc, vc, ks, vs, table, seqlens, append_ms = _decode_inputs(c.fmt, c.batch, c.context,
                                                                  c.hdim)
    window = c.window or (-1, -1)

    def ours(k_scale=ks, v_scale=vs, num_splits=0, k_cache=kc, v_cache=vc):
        return flash_attn_with_kvcache(q, k_cache, v_cache, seqlens, table, window_size=window,
                                       k_scale=k_scale, v_scale=v_scale, validate=False,
                                       num_splits=num_splits)
    with nvtx_range(c.tag + " longctx"):
        ours_ms = _graph_time(ours)
        eager_ms = time_cuda(ours, warmup=5, reps=30, min_time_ms=100)
    alt = _decode_alternatives(c, ours, ks, vs, kc, vc) if c.group in ("decode", "hdim") else {}
    peer_ms, peer_mode = shared.decode_peers.setdefault(c.peer_key, ({}, {}))
    if c.fmt == "bf16":
        _decode_peers(c, q, kc, vc, peer_ms, peer_mode)
    nbytes = decode_bytes(c.batch, c.context, c.hdim, kc.element_size(), c.fmt == "int8",
                          window[0])
    gbps = nbytes / (ours_ms * 1e-3) / 1e9
    cud = peer_ms.get("sdpa_cudnn")
    row = {"case": c.case(), "ours_ms": ours_ms, "ours_eager_ms": eager_ms,
           "bytes": nbytes, "gbps": gbps, "frac_copy": gbps / shared.copy_gbps,
           "append_ms": append_ms, "alternatives": alt,
           "peers": dict(peer_ms), "peer_mode": dict(peer_mode),
           "ratio_cudnn": ours_ms / cud if cud else None}
    if window[0] >= 0:
        plain = plain_decode_ms(res.rows, c)
        row["ratio_plain"] = ours_ms / plain if plain else None
    res.add(row)


def _in_pool_layout(pool, head_major=None):
    """A copy of pool in kv_pool's memory layout (head_major None: kv_pool's default for the
    shape and dtype; True: memory (pages, kv_heads, block_size, d) behind the op's (pages,
    block_size, kv_heads, d) view, a kv head's page one contiguous run of block_size key rows;
    False: contiguous, rows kv_heads x d elements apart)."""
    from ..kvcache import kv_pool

    out = kv_pool(*pool.shape, dtype=pool.dtype, device=pool.device, head_major=head_major)
    return out.copy_(pool)


def _decode_alternatives(c: DecodeCase, ours, ks, vs, kc, vc) -> Dict[str, float]:
    """Alternatives measured in the same run beside the default: the pools in the other memory
    layout (both groups: token-major, a narrow key row such as 64 bytes of 8-bit codes is a
    lone 64-byte access; head-major, part of a contiguous page run), and in the decode group
    int8 scales stored slot-major (contiguous: the decode copies all kv heads' scales of a
    tile's slots) and fixed split counts."""
    alt: Dict[str, float] = {}
    head_major = not kc.is_contiguous()
    ko, vo = _in_pool_layout(kc, not head_major), _in_pool_layout(vc, not head_major)
    name = "token_major_pool_ms" if head_major else "head_major_pool_ms"
    alt[name] = _graph_time(lambda: ours(k_cache=ko, v_cache=vo))
    del ko, vo
    if c.group != "decode":
        return alt
    if c.fmt == "int8":
        ks_slot, vs_slot = ks.contiguous(), vs.contiguous()
        alt["scales_slot_major_ms"] = _graph_time(lambda: ours(ks_slot, vs_slot))
        del ks_slot, vs_slot
    for sp in ((33, 66) if c.batch == 1 else (2, 4)):
        alt[f"splits{sp}_ms"] = _graph_time(lambda: ours(num_splits=sp))
    return alt


def _decode_peers(c: DecodeCase, q, kc, vc, peer_ms, peer_mode) -> None:
    """SDPA cuDNN and flash on the keys the query sees, contiguous (b, s, HK, d): the bf16 pool's
    token-major copy, or a copy of the window's keys."""
    from torch.nn.attention import SDPBackend

    keys = visible_keys(c.context, (c.window or (-1, -1))[0])
    kb = kc.contiguous().view(c.batch, c.context, HK, c.hdim)[:, c.context - keys:]
    vb = vc.contiguous().view(c.batch, c.context, HK, c.hdim)[:, c.context - keys:]
    if keys < c.context:
        kb, vb = kb.contiguous(), vb.contiguous()
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        fn, mode = _sdpa_decode(backend, q, kb, vb)
        peer_mode[name] = mode
        if fn is None:
            peer_ms[name] = None
            continue
        with nvtx_range(f"{c.tag} {name}"):
            try:
                peer_ms[name] = _graph_time(fn)
            except Exception:
                peer_ms[name] = time_cuda(fn, warmup=3, reps=20, min_time_ms=100)
                peer_mode[name] = mode + " (eager: graph capture refused)"


# ------------------------------------------------------------------------------------------------
# chunked prefill
# ------------------------------------------------------------------------------------------------

class _PrefillReference:
    """A prompt's random q/k/v, the forward kernel's time at every chunk's shapes on contiguous
    K/V, its one-pass time and output: shared by the formats' prefill cases."""

    def __init__(self, prompt: int, chunk: int):
        from ..attention import flash_attn_func

        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (1, prompt)
        self.q = torch.randn(*shape, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        self.k = torch.randn(*shape, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
        self.v = torch.randn(*shape, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
        self.fwd_ms, self.total_flops = [], 0
        for s, e in zip(range(0, prompt, chunk), chunk_ends(prompt, chunk)):
            qc, kc_, vc_ = self.q[:, s:e], self.k[:, :e], self.v[:, :e]
            self.fwd_ms.append(time_cuda(lambda: flash_attn_func(qc, kc_, vc_, causal=True),
                                         warmup=2, reps=5, min_time_ms=0))
            self.total_flops += chunk_flops(s, e)
        self.one_pass_fwd_ms = time_cuda(
            lambda: flash_attn_func(self.q, self.k, self.v, causal=True), warmup=1, reps=3,
            min_time_ms=0)
        self.full = flash_attn_func(self.q, self.k, self.v, causal=True)


def _run_prefill(res: Results, c: PrefillCase, shared: _Shared) -> None:
    from ..kvcache import PagedKVCache, fp8_scales_from_data, flash_attn_with_kvcache, \
        kvcache_append

    ref = shared.prefill_reference(c.prompt, c.chunk)
    q, k, v = ref.q, ref.k, ref.v
    ks = fp8_scales_from_data(k) if c.fmt == "fp8" else None
    vs = fp8_scales_from_data(v) if c.fmt == "fp8" else None
    cache = PagedKVCache(c.prompt // BS, BS, HK, D, dtype=torch.bfloat16,
                         cache_dtype=FORMATS[c.fmt], k_scale=ks, v_scale=vs, device="cuda")
    sid = cache.add_sequence()
    cache.reserve(sid, c.prompt)
    table = cache.block_table([sid])
    kscale, vscale = cache.k_scale, cache.v_scale
    ours_ms, append_ms, outs, extra = [], [], [], {}
    for s, e in zip(range(0, c.prompt, c.chunk), chunk_ends(c.prompt, c.chunk)):
        before = torch.tensor([s], dtype=torch.int32, device="cuda")
        after = torch.tensor([e], dtype=torch.int32, device="cuda")
        append_ms.append(time_cuda(
            lambda: kvcache_append(k[:, s:e], v[:, s:e], cache.k_cache, cache.v_cache, before,
                                   table, k_scale=kscale, v_scale=vscale, validate=False),
            warmup=1, reps=3, min_time_ms=0))
        qc = q[:, s:e]

        def attend(validate=False, return_lse=False):
            return flash_attn_with_kvcache(qc, cache.k_cache, cache.v_cache, after, table,
                                           causal=True, k_scale=kscale, v_scale=vscale,
                                           validate=validate, return_lse=return_lse)
        with nvtx_range(f"{c.tag} chunk {s // c.chunk}"):
            ours_ms.append(time_cuda(attend, warmup=1, reps=5, min_time_ms=0))
        if e in c.extra_at:  # out and lse kept: both count as outputs
            extra[str(e)] = _extra_bytes(lambda: attend(return_lse=True))
        outs.append(attend(validate=True))
    chunked = torch.cat(outs, 1).float()
    del outs
    full = flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache,
                                   torch.tensor([c.prompt], dtype=torch.int32, device="cuda"),
                                   table, causal=True, k_scale=kscale, v_scale=vscale)
    t_ours, t_fwd = sum(ours_ms), sum(ref.fwd_ms)
    res.add({"case": c.case(),
             "ours_ms": t_ours, "fwd_ms": t_fwd, "one_pass_fwd_ms": ref.one_pass_fwd_ms,
             "append_ms": sum(append_ms), "flops": ref.total_flops,
             "tflops": ref.total_flops / (t_ours * 1e-3) / 1e12,
             "fwd_tflops": ref.total_flops / (t_fwd * 1e-3) / 1e12,
             "frac_fwd": t_fwd / t_ours,
             "chunk_ms": ours_ms, "chunk_fwd_ms": ref.fwd_ms,
             "max_abs_diff_chunked_vs_one_pass": (chunked - full.float()).abs().max().item(),
             "max_abs_diff_vs_fwd_on_unquantized": (chunked - ref.full.float()).abs().max().item(),
             "extra_bytes": extra})


# ------------------------------------------------------------------------------------------------
# mixed batch
# ------------------------------------------------------------------------------------------------

def _run_mixed(res: Results, c: MixedCase, shared: _Shared) -> None:
    from ..kvcache import flash_attn_with_kvcache

    rows = c.decode_rows
    # the pool holds decode_context tokens per sequence; the chunk's sequence uses a prefix
    _, kc, vc, ks, vs, table, _, append_ms = _decode_inputs(c.fmt, rows + 1, c.decode_context)
    cu = torch.tensor(cu_seqlens(c.q_lens()), dtype=torch.int32, device="cuda")
    seqlens = torch.tensor(c.cache_lens(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(c.q_lens()), H, D, device="cuda", dtype=torch.bfloat16)
    q_dec, q_pre = q[:rows].view(rows, 1, H, D), q[rows:].view(1, c.chunk, H, D)
    parts = {"decode": (q_dec, seqlens[:rows], table[:rows]),
             "prefill": (q_pre, seqlens[rows:], table[rows:])}
    kw = dict(causal=True, k_scale=ks, v_scale=vs, validate=False)

    def mixed():
        return flash_attn_with_kvcache(q, kc, vc, seqlens, table, cu_seqlens_q=cu,
                                       max_seqlen_q=c.chunk, **kw)

    def part(name):
        qp, sl, tb = parts[name]
        return flash_attn_with_kvcache(qp, kc, vc, sl, tb, **kw)

    def separate():
        return part("decode"), part("prefill")
    times = {}
    for name, fn in (("ours_ms", mixed), ("separate_ms", separate),
                     ("decode_ms", lambda: part("decode")),
                     ("prefill_ms", lambda: part("prefill"))):
        with nvtx_range(f"{c.tag} {name[:-3]}"):
            times[name] = time_cuda(fn, warmup=3, reps=20, min_time_ms=100)
    out_dec, out_pre = separate()
    diff = (mixed().float() - torch.cat([out_dec.view(rows, H, D), out_pre[0]]).float())
    res.add({"case": c.case(), **times,
             "ratio_separate": times["ours_ms"] / times["separate_ms"],
             "append_ms": append_ms, "timing": "eager",
             "max_abs_diff_vs_separate": diff.abs().max().item()})


# ------------------------------------------------------------------------------------------------
# output error of the quantized formats
# ------------------------------------------------------------------------------------------------

def _run_error(res: Results, c: ErrorCase, shared: _Shared) -> None:
    from ..kvcache import PagedKVCache, fp8_scales_from_data

    ctx = c.context
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, ctx, HK, D, generator=g)
    gain = torch.ones(D)
    gain[torch.randperm(D, generator=g)[:4]] = 20.0  # outlier channels, as in real K
    k = (x * gain * (torch.rand(1, ctx, HK, 1, generator=g) * 1.5 + 0.5)).to(torch.bfloat16)
    v = torch.randn(1, ctx, HK, D, generator=g).to(torch.bfloat16)
    q = torch.randn(1, 1, H, D, generator=g).to(torch.bfloat16)
    k, v, q = k.cuda(), v.cuda(), q.cuda()
    # float64 attention on the unquantized keys
    kk = k[0].double().repeat_interleave(H // HK, 1)  # (s, H, D)
    vv = v[0].double().repeat_interleave(H // HK, 1)
    sc = torch.einsum("hd,shd->hs", q[0, 0].double(), kk) / math.sqrt(D)
    exact = torch.einsum("hs,shd->hd", torch.softmax(sc, -1), vv)
    outs = {}
    for fmt, cache_dtype in FORMATS.items():
        ks = fp8_scales_from_data(k) if fmt == "fp8" else None
        vs = fp8_scales_from_data(v) if fmt == "fp8" else None
        cache = PagedKVCache(ctx // BS, BS, HK, D, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                             k_scale=ks, v_scale=vs, device="cuda")
        sid = cache.add_sequence()
        cache.append(k, v, [sid])
        outs[fmt] = cache.attend(q, [sid])[0, 0].double()
    for fmt, o in outs.items():
        d_bf16 = o - outs["bf16"]
        d_exact = o - exact
        res.add({"case": {"kind": "error", "format": fmt, "context": ctx, "batch": 1},
                 "max_abs_vs_bf16_cache": d_bf16.abs().max().item(),
                 "rel_vs_bf16_cache": (d_bf16.norm() / outs["bf16"].norm()).item(),
                 "max_abs_vs_fp64": d_exact.abs().max().item(),
                 "rel_vs_fp64": (d_exact.norm() / exact.norm()).item()})


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

_RUNNERS = {DecodeCase: _run_decode, PrefillCase: _run_prefill, MixedCase: _run_mixed,
            ErrorCase: _run_error}


def run_kvcache(quick: bool = False, progress: Optional[Callable[[str], None]] = None,
                prefill: bool = True, groups: Optional[Sequence[str]] = None,
                only: Sequence[str] = (),
                checkpoint: Optional[Callable[[Results], None]] = None) -> Results:
    """prefill=False drops the prefill group (development runs of the decode kernels); groups:
    the groups to run (default all, GROUPS); only: run just the cases whose tag contains one of
    these substrings; checkpoint(res), if given, is called after every case. A case that raises
    is recorded as {"case": ..., "error": repr} and the run goes on."""
    groups = [g for g in (groups or GROUPS) if prefill or g != "prefill"]
    cases = select(plan(quick), groups, only)
    copy_gbps = copy_bandwidth_gbps()
    res = Results("kvcache", copy_gbps=copy_gbps, matmul_tflops=matmul_tflops())
    shared = _Shared(copy_gbps)
    for c in cases:
        if not isinstance(c, PrefillCase):
            shared.release_prefill()
        if progress:
            progress(c.tag)
        try:
            _RUNNERS[type(c)](res, c, shared)
        except Exception as e:  # record and go on (an OOM must not lose the run)
            res.add({"case": c.case(), "error": repr(e)[:500]})
            print(f"{c.tag}: FAILED {e!r}"[:600], file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        if checkpoint:
            checkpoint(res)
    return res


# ------------------------------------------------------------------------------------------------
# the command line of bench/kvcache.py (longctx.bench.bench_main), and the case list
# ------------------------------------------------------------------------------------------------

def _add_selection(ap) -> None:
    ap.add_argument("--groups", default="",
                    help=f"comma-separated groups to run (default all): {', '.join(GROUPS)}")
    ap.add_argument("--only", default="",
                    help='comma-separated substrings of case tags to run, e.g. "ctx=131072 '
                         'batch=16" or "kvcache mixed int8" (python -m '
                         'longctx.bench.kvcache_suite lists the tags)')


def _selection(args) -> Tuple[List[str], List[str]]:
    """(groups, only) from the options."""
    groups = [g for g in args.groups.split(",") if g] or list(GROUPS)
    if getattr(args, "no_prefill", False):
        groups = [g for g in groups if g != "prefill"]
    return groups, [o for o in args.only.split(",") if o]


def add_arguments(ap) -> None:
    ap.add_argument("--no-prefill", action="store_true",
                    help="no prefill group (development runs of the decode kernels)")
    _add_selection(ap)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of <out>/<gpu>/kvcache.json that this run does not "
                         "measure (runs of subsets build one file)")


def _write(res: Results, out: str) -> None:
    path = res.write(out, COLUMNS)
    path.with_suffix(".md").write_text(markdown(res))


def run_args(args, progress) -> Results:
    groups, only = _selection(args)
    previous = load_results(Path(args.out) / gpu_short_name() / "kvcache.json") \
        if args.merge else None
    # every finished case is written at once: partial results survive a kill
    res = run_kvcache(args.quick, progress=progress, groups=groups, only=only,
                      checkpoint=lambda r: _write(merge_runs(previous, r), args.out))
    return merge_runs(previous, res)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Lists the tags of the cases a bench/kvcache.py command line with these options runs."""
    import argparse

    ap = argparse.ArgumentParser(description="The cases of bench/kvcache.py, in run order.")
    ap.add_argument("--quick", action="store_true", help="the --quick cases")
    ap.add_argument("--no-prefill", action="store_true")
    _add_selection(ap)
    args = ap.parse_args(argv)
    groups, only = _selection(args)
    try:
        cases = select(plan(args.quick), groups, only)
    except ValueError as e:
        ap.error(str(e))
    for c in cases:
        print(c.tag)
    print(f"{len(cases)} cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The paged KV-cache benchmark: decode and chunked prefill over the cache, with the
peers measured in the same run.

Decode: GQA 32/8, hdim 128, page size 16, contexts 32K and 128K cached tokens, batch 1 and 16,
caches bf16 / fp8 e4m3 / int8. Ours: longctx.flash_attn_with_kvcache (split-KV, validate=False),
timed inside a CUDA graph of 20 calls (host launch overhead out, as serving engines run decode;
the eager time is recorded too). Peers: torch SDPA with the cuDNN and flash backends on a
contiguous bf16 cache with one query token, enable_gqa=True when the backend accepts it, else the
group's query heads packed as query rows of their kv head (exact for a single query position;
recorded per row as peer_mode). The bf16 pool's pages are allocated in order, so the contiguous
cache of the peers is the same memory. Achieved bandwidth counts the bytes of K, V, int8 scales
and block table the kernel must read, over the copy bandwidth (read + write bytes of a 2 GiB
device copy) measured in the same run.

Chunked prefill: a 128K prompt in 8K chunks (append the chunk, then attend its 8K queries over the
cache), GQA 32/8, hdim 128; ours vs the forward kernel (longctx.flash_attn_func, causal
bottom-right) on contiguous bf16 K/V at the same (8K, 8K * (c + 1)) shapes; TFLOP/s with
4 * heads * pairs * hdim FLOPs. The chunked output is compared with one pass over the prompt.

Errors: decode output of the fp8 / int8 caches vs the bf16 cache (same keys with outlier channels,
32K context) and vs float64 attention on the unquantized keys.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

H, HK, D, BS = 32, 8, 128, 16
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}

COLUMNS = [("kind", "case.kind"), ("format", "case.format"), ("context", "case.context"),
           ("batch", "case.batch"), ("ours ms", "ours_ms"), ("eager ms", "ours_eager_ms"),
           ("GB/s", "gbps"), ("x copy", "frac_copy"),
           ("cuDNN ms", "peers.sdpa_cudnn"), ("flash ms", "peers.sdpa_flash"),
           ("ours / cuDNN", "ratio_cudnn")]


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


def _sdpa_decode(backend, q, k, v):
    """SDPA on (b, 1, H, D) q and (b, s, HK, D) k/v views; returns (fn, mode)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    b = q.shape[0]
    qp = q.view(b, HK, H // HK, D)  # the group's heads as query rows of their kv head

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


def _fill_quantized(cache_dtype, batch, ctx, gen_chunk=8192):
    """Pools of `cache_dtype` holding batch sequences of ctx random tokens, written by our append
    from bf16 chunks; returns (k_cache, v_cache, k_scale, v_scale, table, seqlens, append_ms)."""
    from ..kvcache import int8_scales, kvcache_append

    pages = ctx // BS
    shape = (batch * pages, BS, HK, D)
    kc = torch.empty(shape, dtype=cache_dtype, device="cuda")
    vc = torch.empty(shape, dtype=cache_dtype, device="cuda")
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
        k = torch.randn(batch, n, HK, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, n, HK, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), s, dtype=torch.int32, device="cuda")
        ev0.record()
        kvcache_append(k, v, kc, vc, lens, table, k_scale=ks, v_scale=vs, validate=False)
        ev1.record()
        torch.cuda.synchronize()
        ms += ev0.elapsed_time(ev1)
        del k, v
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return kc, vc, ks, vs, table, seqlens, ms


def _decode_inputs(fmt, cache_dtype, batch, ctx):
    """One bf16 query token per sequence and a cache of `fmt` holding batch sequences of ctx
    random tokens (bf16: pages in order, the peers' contiguous cache is the same memory);
    returns (q, k_cache, v_cache, k_scale, v_scale, table, seqlens, append_ms)."""
    q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16)
    if fmt != "bf16":
        return (q,) + _fill_quantized(cache_dtype, batch, ctx)
    pages = ctx // BS
    kc = torch.randn(batch * pages, BS, HK, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, kc, vc, None, None, table, seqlens, None


def decode_bytes(k_cache, k_scale, table) -> int:
    """Bytes a decode must read: K and V, int8 scales (per token and head), the block table."""
    n = 2 * k_cache.numel() * k_cache.element_size() + table.numel() * 4
    if k_scale is not None and k_scale.dim() == 3:
        n += 2 * k_scale.numel() * 4
    return n


def _decode_rows(res, contexts, batches, copy_gbps, progress):
    for ctx in contexts:
        for batch in batches:
            peer_ms: Dict[str, Optional[float]] = {}
            peer_mode: Dict[str, Optional[str]] = {}
            for fmt, cache_dtype in FORMATS.items():
                tag = f"kvcache decode {fmt} ctx={ctx} batch={batch}"
                if progress:
                    progress(tag)
                try:
                    _decode_case(res, fmt, cache_dtype, ctx, batch, copy_gbps, peer_ms,
                                 peer_mode, tag)
                except Exception as e:  # record and go on (an OOM must not lose the run)
                    res.add({"case": {"kind": "decode", "format": fmt, "context": ctx,
                                      "batch": batch}, "error": repr(e)[:500]})
                    print(f"{tag}: FAILED {e!r}"[:600], flush=True)
                torch.cuda.empty_cache()


def _decode_case(res, fmt, cache_dtype, ctx, batch, copy_gbps, peer_ms, peer_mode, tag):
    from torch.nn.attention import SDPBackend

    from ..kvcache import flash_attn_with_kvcache

    q, kc, vc, ks, vs, table, seqlens, append_ms = _decode_inputs(fmt, cache_dtype, batch, ctx)

    def ours(k_scale=ks, v_scale=vs, num_splits=0):
        return flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=k_scale,
                                       v_scale=v_scale, validate=False, num_splits=num_splits)
    with nvtx_range(tag + " longctx"):
        ours_ms = _graph_time(ours)
        eager_ms = time_cuda(ours, warmup=5, reps=30, min_time_ms=100)
    # alternatives measured in the same run beside the default: int8 scales stored slot-major
    # (contiguous: the decode copies all kv heads' scales of a tile's slots) and fixed split
    # counts
    alt: Dict[str, float] = {}
    if fmt == "int8":
        ks_slot, vs_slot = ks.contiguous(), vs.contiguous()
        alt["scales_slot_major_ms"] = _graph_time(lambda: ours(ks_slot, vs_slot))
        del ks_slot, vs_slot
    for sp in ((33, 66) if batch == 1 else (2, 4)):
        alt[f"splits{sp}_ms"] = _graph_time(lambda: ours(num_splits=sp))
    nbytes = decode_bytes(kc, ks, table)
    if fmt == "bf16":  # peers on the same memory, contiguous (b, s, HK, D)
        kb, vb = kc.view(batch, ctx, HK, D), vc.view(batch, ctx, HK, D)
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            fn, mode = _sdpa_decode(backend, q, kb, vb)
            peer_mode[name] = mode
            if fn is None:
                peer_ms[name] = None
                continue
            with nvtx_range(f"{tag} {name}"):
                try:
                    peer_ms[name] = _graph_time(fn)
                except Exception:
                    peer_ms[name] = time_cuda(fn, warmup=3, reps=20,
                                              min_time_ms=100)
                    peer_mode[name] = mode + " (eager: graph capture refused)"
    gbps = nbytes / (ours_ms * 1e-3) / 1e9
    cud = peer_ms.get("sdpa_cudnn")
    res.add({"case": {"kind": "decode", "format": fmt, "context": ctx,
                      "batch": batch, "heads": H, "heads_kv": HK, "hdim": D,
                      "block_size": BS},
             "ours_ms": ours_ms, "ours_eager_ms": eager_ms,
             "bytes": nbytes, "gbps": gbps, "frac_copy": gbps / copy_gbps,
             "append_ms": append_ms, "alternatives": alt,
             "peers": dict(peer_ms), "peer_mode": dict(peer_mode),
             "ratio_cudnn": ours_ms / cud if cud else None})
    del kc, vc, ks, vs, table, q


def _prefill_rows(res, prompt, chunk, progress):
    from ..attention import flash_attn_func

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, prompt, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, prompt, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, prompt, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # forward kernel on contiguous K/V at the chunk shapes
    fwd_ms, flops = [], []
    for s in range(0, prompt, chunk):
        e = min(prompt, s + chunk)
        qc, kc_, vc_ = q[:, s:e], k[:, :e], v[:, :e]
        fwd_ms.append(time_cuda(lambda: flash_attn_func(qc, kc_, vc_, causal=True), warmup=2,
                                reps=5, min_time_ms=0))
        n = e - s
        # bottom-right causal: row i of the chunk sees s + i + 1 keys
        flops.append(4 * H * D * (n * s + n * (n + 1) // 2))
    one_pass_fwd_ms = time_cuda(lambda: flash_attn_func(q, k, v, causal=True), warmup=1, reps=3,
                                min_time_ms=0)
    total_flops = sum(flops)
    ref_full = flash_attn_func(q, k, v, causal=True)
    for fmt, cache_dtype in FORMATS.items():
        tag = f"kvcache prefill {fmt} prompt={prompt} chunk={chunk}"
        if progress:
            progress(tag)
        try:
            _prefill_case(res, fmt, cache_dtype, prompt, chunk, q, k, v, fwd_ms, total_flops,
                          one_pass_fwd_ms, ref_full, tag)
        except Exception as e:
            res.add({"case": {"kind": "prefill", "format": fmt, "context": prompt,
                              "chunk": chunk}, "error": repr(e)[:500]})
            print(f"{tag}: FAILED {e!r}"[:600], flush=True)
        torch.cuda.empty_cache()


def _prefill_case(res, fmt, cache_dtype, prompt, chunk, q, k, v, fwd_ms, total_flops,
                  one_pass_fwd_ms, ref_full, tag):
    from ..kvcache import PagedKVCache, fp8_scales_from_data, flash_attn_with_kvcache, \
        kvcache_append

    ks = fp8_scales_from_data(k) if fmt == "fp8" else None
    vs = fp8_scales_from_data(v) if fmt == "fp8" else None
    c = PagedKVCache(prompt // BS, BS, HK, D, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                     k_scale=ks, v_scale=vs, device="cuda")
    sid = c.add_sequence()
    c.reserve(sid, prompt)
    table = c.block_table([sid])
    ours_ms, append_ms, outs = [], [], []
    for s in range(0, prompt, chunk):
        e = min(prompt, s + chunk)
        before = torch.tensor([s], dtype=torch.int32, device="cuda")
        after = torch.tensor([e], dtype=torch.int32, device="cuda")
        kscale, vscale = c.k_scale, c.v_scale
        append_ms.append(time_cuda(
            lambda: kvcache_append(k[:, s:e], v[:, s:e], c.k_cache, c.v_cache, before, table,
                                   k_scale=kscale, v_scale=vscale, validate=False),
            warmup=1, reps=3, min_time_ms=0))
        qc = q[:, s:e]
        with nvtx_range(f"{tag} chunk {s // chunk}"):
            ours_ms.append(time_cuda(
                lambda: flash_attn_with_kvcache(qc, c.k_cache, c.v_cache, after, table,
                                                causal=True, k_scale=kscale, v_scale=vscale,
                                                validate=False),
                warmup=1, reps=5, min_time_ms=0))
        outs.append(flash_attn_with_kvcache(qc, c.k_cache, c.v_cache, after, table,
                                            causal=True, k_scale=kscale, v_scale=vscale))
    chunked = torch.cat(outs, 1)
    del outs
    full = flash_attn_with_kvcache(q, c.k_cache, c.v_cache,
                                   torch.tensor([prompt], dtype=torch.int32, device="cuda"),
                                   table, causal=True, k_scale=c.k_scale, v_scale=c.v_scale)
    diff_one_pass = (chunked.float() - full.float()).abs().max().item()
    diff_fwd = (chunked.float() - ref_full.float()).abs().max().item()
    t_ours, t_fwd = sum(ours_ms), sum(fwd_ms)
    res.add({"case": {"kind": "prefill", "format": fmt, "context": prompt, "chunk": chunk,
                      "batch": 1, "heads": H, "heads_kv": HK, "hdim": D, "block_size": BS},
             "ours_ms": t_ours, "fwd_ms": t_fwd, "one_pass_fwd_ms": one_pass_fwd_ms,
             "append_ms": sum(append_ms), "flops": total_flops,
             "tflops": total_flops / (t_ours * 1e-3) / 1e12,
             "fwd_tflops": total_flops / (t_fwd * 1e-3) / 1e12,
             "frac_fwd": t_fwd / t_ours,
             "chunk_ms": ours_ms, "chunk_fwd_ms": fwd_ms,
             "max_abs_diff_chunked_vs_one_pass": diff_one_pass,
             "max_abs_diff_vs_fwd_on_unquantized": diff_fwd})
    del c, chunked, full


def _error_rows(res, ctx, progress):
    from ..kvcache import PagedKVCache, fp8_scales_from_data

    if progress:
        progress(f"kvcache output error ctx={ctx}")
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
        c = PagedKVCache(ctx // BS, BS, HK, D, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                         k_scale=ks, v_scale=vs, device="cuda")
        sid = c.add_sequence()
        c.append(k, v, [sid])
        outs[fmt] = c.attend(q, [sid])[0, 0].double()
    for fmt, o in outs.items():
        d_bf16 = o - outs["bf16"]
        d_exact = o - exact
        res.add({"case": {"kind": "error", "format": fmt, "context": ctx, "batch": 1},
                 "max_abs_vs_bf16_cache": d_bf16.abs().max().item(),
                 "rel_vs_bf16_cache": (d_bf16.norm() / outs["bf16"].norm()).item(),
                 "max_abs_vs_fp64": d_exact.abs().max().item(),
                 "rel_vs_fp64": (d_exact.norm() / exact.norm()).item()})


def run_kvcache(quick: bool = False, progress: Optional[Callable[[str], None]] = None,
                prefill: bool = True) -> Results:
    """prefill=False skips the chunked-prefill rows (development runs of the decode kernels)."""
    copy = copy_bandwidth_gbps()
    res = Results("kvcache", copy_gbps=copy, matmul_tflops=matmul_tflops())
    _error_rows(res, 32768, progress)
    if quick:
        _decode_rows(res, [32768], [1], copy, progress)
        if prefill:
            _prefill_rows(res, 16384, 8192, progress)
    else:
        _decode_rows(res, [32768, 131072], [1, 16], copy, progress)
        if prefill:
            _prefill_rows(res, 131072, 8192, progress)
    return res


def _fmt(x, p=3) -> str:
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def _table(res: Results, kind: str, header, cells):
    """Markdown table rows for the results of `kind` (failed cases are in the JSON only)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells(r["case"], r)) + " |" for r in res.rows
            if r["case"]["kind"] == kind and "error" not in r]
    return out


def _decode_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["context"]), str(c["batch"]), f(r["ours_ms"], 4),
            f(r["ours_eager_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(p.get("sdpa_flash"), 4), f(r["ratio_cudnn"]),
            f(r["append_ms"], 2)]


def _prefill_cells(c, r):
    f = _fmt
    return [c["format"], str(c["context"]), str(c["chunk"]), f(r["ours_ms"], 2),
            f(r["fwd_ms"], 2), f(r["tflops"], 1), f(r["fwd_tflops"], 1), f(r["frac_fwd"]),
            f(r["one_pass_fwd_ms"], 2), f(r["append_ms"], 2),
            f"{r['max_abs_diff_chunked_vs_one_pass']:.2e}",
            f"{r['max_abs_diff_vs_fwd_on_unquantized']:.2e}"]


def _error_cells(c, r):
    return [c["format"]] + [f"{r[k]:.2e}" for k in ("max_abs_vs_bf16_cache", "rel_vs_bf16_cache",
                                                   "max_abs_vs_fp64", "rel_vs_fp64")]


def markdown(res: Results) -> str:
    m = res.meta
    modes = {k: v for r in res.rows if r["case"]["kind"] == "decode"
             for k, v in r.get("peer_mode", {}).items()}
    out = [f"# kvcache on {m['device_name']}", "",
           f"torch {m['torch']}, {m['date']}. Copy bandwidth {_fmt(m['copy_gbps'], 1)} GB/s "
           "(read + write bytes of a device copy), measured in the same run. GQA 32/8, hdim 128, "
           "page size 16.", "",
           "## Decode (one query token per sequence; CUDA-graph time per call)", ""]
    out += _table(res, "decode", ["format", "context", "batch", "ours ms", "eager ms",
                                  "GB/s read", "x copy BW", "cuDNN ms (bf16)", "flash ms (bf16)",
                                  "ours / cuDNN", "append ms"], _decode_cells)
    out += ["", f"Peers: {modes} (ratio uses the bf16 cuDNN time of the same context/batch).",
            "", "## Chunked prefill (append + attend per chunk; attention time summed)", ""]
    out += _table(res, "prefill", ["format", "prompt", "chunk", "ours ms",
                                   "fwd ms (contiguous, same shapes)", "ours TFLOP/s",
                                   "fwd TFLOP/s", "x fwd", "one-pass fwd ms", "append ms",
                                   "max diff chunked vs one pass",
                                   "max diff vs fwd (unquantized)"], _prefill_cells)
    out += ["", "## Output error of the quantized caches (decode, 32K keys with outlier channels)",
            ""]
    out += _table(res, "error", ["format", "max abs vs bf16 cache", "rel vs bf16 cache",
                                 "max abs vs fp64", "rel vs fp64"], _error_cells)
    return "\n".join(out) + "\n"


# the command line of bench/kvcache.py (longctx.bench.bench_main)

def add_arguments(ap) -> None:
    ap.add_argument("--no-prefill", action="store_true",
                    help="decode rows only (development runs of the decode kernels)")


def run_args(args, progress) -> Results:
    return run_kvcache(args.quick, progress=progress, prefill=not args.no_prefill)

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
  2 GiB device copy) measured in the same run.
- window: bf16 decode of a 128K sequence through a sliding window of 4096 keys (window_size
  (4096, 0): the 4097 newest keys) beside a plain 4K-context decode, batch 1 and 16, timed as
  the decode rows; the rows carry case["window"], the peers run on a contiguous copy of the
  window's keys, bytes count the window's keys only, and the windowed row's ratio_plain is its
  time over the 4K decode's.
- hdim: decode at head dims 64, 96 and 256 (128K, batch 16, every format), timed as the decode
  rows. A head dim the op rejects is recorded as a failed case (its error in the row).
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
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results, gpu_short_name
from .timing import time_cuda

H, HK, D, BS = 32, 8, 128, 16
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
GROUPS = ("error", "decode", "window", "hdim", "prefill", "mixed")
WINDOW = 4096  # the sliding window of the window group (keys left of the query)

COLUMNS = [("kind", "case.kind"), ("format", "case.format"), ("context", "case.context"),
           ("batch", "case.batch"), ("hdim", "case.hdim"), ("window", "case.window"),
           ("ours ms", "ours_ms"), ("eager ms", "ours_eager_ms"),
           ("GB/s", "gbps"), ("x copy", "frac_copy"),
           ("cuDNN ms", "peers.sdpa_cudnn"), ("flash ms", "peers.sdpa_flash"),
           ("ours / cuDNN", "ratio_cudnn"), ("separate ms", "separate_ms")]


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeCase:
    """One decode row: one query token per sequence over `context` cached tokens. window None:
    the row has no "window" key (the decode and hdim groups)."""
    group: str  # "decode", "window" or "hdim"
    fmt: str
    context: int
    batch: int
    hdim: int = D
    window: Optional[Tuple[int, int]] = None

    @property
    def tag(self) -> str:
        name = {"decode": "decode", "window": "window-decode", "hdim": "hdim-decode"}[self.group]
        tag = f"kvcache {name} {self.fmt} ctx={self.context} batch={self.batch}"
        if self.window is not None:
            tag += f" window={self.window[0]}"
        return tag + (f" hdim={self.hdim}" if self.group == "hdim" else "")

    @property
    def peer_key(self) -> tuple:
        """The cases that share the peers measured by their bf16 case."""
        return (self.group, self.context, self.batch, self.hdim, self.window)

    def case(self) -> dict:
        c = {"kind": "decode", "format": self.fmt, "context": self.context, "batch": self.batch,
             "heads": H, "heads_kv": HK, "hdim": self.hdim, "block_size": BS}
        if self.window is not None:
            c["window"] = list(self.window)
        return c


@dataclass(frozen=True)
class PrefillCase:
    """A prompt prefilled in chunks; extra_at: the chunk ends (cache lengths) at which the
    call's extra device memory is measured."""
    fmt: str
    prompt: int
    chunk: int
    extra_at: Tuple[int, ...]
    group = "prefill"

    @property
    def tag(self) -> str:
        return f"kvcache prefill {self.fmt} prompt={self.prompt} chunk={self.chunk}"

    def case(self) -> dict:
        return {"kind": "prefill", "format": self.fmt, "context": self.prompt,
                "chunk": self.chunk, "batch": 1, "heads": H, "heads_kv": HK, "hdim": D,
                "block_size": BS}


@dataclass(frozen=True)
class MixedCase:
    """decode_rows sequences of decode_context cached tokens with one query each, and one
    sequence whose last `chunk` tokens (cache length prefill_context) are a prefill chunk."""
    fmt: str
    decode_rows: int
    decode_context: int
    chunk: int
    prefill_context: int
    group = "mixed"

    def __post_init__(self):
        if not 0 < self.chunk <= self.prefill_context <= self.decode_context:
            raise ValueError(f"MixedCase: need 0 < chunk <= prefill_context <= decode_context "
                             f"(the pool holds decode_context tokens per sequence), got {self}")

    @property
    def tag(self) -> str:
        return (f"kvcache mixed {self.fmt} decode={self.decode_rows}x{self.decode_context} "
                f"chunk={self.chunk}/{self.prefill_context}")

    def q_lens(self) -> List[int]:
        """Query rows per sequence: the decode rows first, the chunk last."""
        return [1] * self.decode_rows + [self.chunk]

    def cache_lens(self) -> List[int]:
        """Cached tokens per sequence, the chunk's own included."""
        return [self.decode_context] * self.decode_rows + [self.prefill_context]

    def case(self) -> dict:
        return {"kind": "mixed", "format": self.fmt, "batch": self.decode_rows + 1,
                "decode_rows": self.decode_rows, "decode_context": self.decode_context,
                "prefill_chunk": self.chunk, "prefill_context": self.prefill_context,
                "heads": H, "heads_kv": HK, "hdim": D, "block_size": BS}


@dataclass(frozen=True)
class ErrorCase:
    """The quantized formats' output error (one row per format)."""
    context: int
    group = "error"

    @property
    def tag(self) -> str:
        return f"kvcache output error ctx={self.context}"

    def case(self) -> dict:
        return {"kind": "error", "context": self.context}


def decode_plan(quick: bool) -> List[DecodeCase]:
    contexts, batches = ([32768], [1]) if quick else ([32768, 131072], [1, 16])
    return [DecodeCase("decode", fmt, ctx, b) for ctx in contexts for b in batches
            for fmt in FORMATS]


def window_plan(quick: bool) -> List[DecodeCase]:
    """Per batch: the plain 4K decode first (the windowed row's ratio_plain needs it)."""
    cases = []
    for b in ([1] if quick else [1, 16]):
        cases.append(DecodeCase("window", "bf16", 4096, b, window=(-1, -1)))
        cases.append(DecodeCase("window", "bf16", 131072, b, window=(WINDOW, 0)))
    return cases


def hdim_plan(quick: bool) -> List[DecodeCase]:
    ctx, b = (32768, 1) if quick else (131072, 16)
    return [DecodeCase("hdim", fmt, ctx, b, hdim=d) for d in (64, 96, 256) for fmt in FORMATS]


def prefill_plan(quick: bool) -> List[PrefillCase]:
    prompt, chunk, extra_at = (16384, 8192, (8192, 16384)) if quick else \
        (131072, 8192, (32768, 131072))
    return [PrefillCase(fmt, prompt, chunk, extra_at) for fmt in FORMATS]


def mixed_plan(quick: bool) -> List[MixedCase]:
    if quick:
        return [MixedCase(fmt, 3, 4096, 2048, 4096) for fmt in ("bf16", "int8")]
    return [MixedCase(fmt, 15, 32768, 8192, 16384) for fmt in FORMATS]


def plan(quick: bool) -> list:
    """Every case, in run order (the groups in GROUPS order)."""
    return ([ErrorCase(32768)] + decode_plan(quick) + window_plan(quick) + hdim_plan(quick)
            + prefill_plan(quick) + mixed_plan(quick))


def select(cases: Sequence, groups: Sequence[str] = GROUPS, only: Sequence[str] = ()) -> list:
    """The cases of `groups` whose tag contains one of the `only` substrings (all without)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"kvcache bench: unknown groups {unknown}; the groups are "
                         f"{', '.join(GROUPS)}")
    return [c for c in cases if c.group in groups and (not only or any(o in c.tag for o in only))]


# ------------------------------------------------------------------------------------------------
# byte, FLOP and index arithmetic
# ------------------------------------------------------------------------------------------------

def visible_keys(context: int, window_left: int = -1) -> int:
    """Keys one query at the end of `context` keys sees with a left window (-1: all)."""
    return context if window_left < 0 else min(context, window_left + 1)


def pages_touched(context: int, keys: int, block_size: int = BS) -> int:
    """Pages holding the last `keys` of `context` tokens."""
    if keys <= 0:
        return 0
    return (context - 1) // block_size - (context - keys) // block_size + 1


def decode_bytes(batch: int, context: int, hdim: int, elem_bytes: int, int8_scales: bool,
                 window_left: int = -1, kv_heads: int = HK, block_size: int = BS) -> int:
    """Bytes a decode must read: K and V of the keys it sees, their int8 scales (one fp32 per
    token and kv head, K and V), and the block-table entries of the pages holding them."""
    keys = visible_keys(context, window_left)
    per_key = 2 * kv_heads * hdim * elem_bytes + (2 * kv_heads * 4 if int8_scales else 0)
    return batch * (keys * per_key + pages_touched(context, keys, block_size) * 4)


def chunk_flops(start: int, end: int, heads: int = H, hdim: int = D) -> int:
    """FLOPs of the causal (bottom-right) attention of the queries [start, end) of a prompt over
    its first `end` keys: row i of the chunk sees start + i + 1 keys."""
    n = end - start
    return 4 * heads * hdim * (n * start + n * (n + 1) // 2)


def chunk_ends(prompt: int, chunk: int) -> List[int]:
    """The cache length after each chunk of a prompt prefilled in chunks."""
    return [min(prompt, s + chunk) for s in range(0, prompt, chunk)]


def cu_seqlens(lengths: Sequence[int]) -> List[int]:
    """Offsets of packed sequences: [0, l0, l0 + l1, ...]."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def plain_decode_ms(rows: Sequence[dict], case: DecodeCase) -> Optional[float]:
    """ours_ms of the plain (window [-1, -1]) row of the window group with the format and batch
    of `case`, if one was measured."""
    for r in rows:
        c = r["case"]
        if c.get("window") == [-1, -1] and c["format"] == case.fmt and \
                c["batch"] == case.batch and "ours_ms" in r:
            return r["ours_ms"]
    return None


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
    from ..kvcache import int8_scales, kvcache_append

    pages = ctx // BS
    shape = (batch * pages, BS, HK, hdim)
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
    random tokens (bf16: pages in order, the peers' contiguous cache is the same memory);
    returns (q, k_cache, v_cache, k_scale, v_scale, table, seqlens, append_ms)."""
    q = torch.randn(batch, 1, H, hdim, device="cuda", dtype=torch.bfloat16)
    if fmt != "bf16":
        return (q,) + _fill_quantized(FORMATS[fmt], batch, ctx, hdim)
    pages = ctx // BS
    kc = torch.randn(batch * pages, BS, HK, hdim, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
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

    def ours(k_scale=ks, v_scale=vs, num_splits=0):
        return flash_attn_with_kvcache(q, kc, vc, seqlens, table, window_size=window,
                                       k_scale=k_scale, v_scale=v_scale, validate=False,
                                       num_splits=num_splits)
    with nvtx_range(c.tag + " longctx"):
        ours_ms = _graph_time(ours)
        eager_ms = time_cuda(ours, warmup=5, reps=30, min_time_ms=100)
    alt = _decode_alternatives(c, ours, ks, vs) if c.group == "decode" else {}
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


def _decode_alternatives(c: DecodeCase, ours, ks, vs) -> Dict[str, float]:
    """Alternatives measured in the same run beside the default: int8 scales stored slot-major
    (contiguous: the decode copies all kv heads' scales of a tile's slots) and fixed split
    counts."""
    alt: Dict[str, float] = {}
    if c.fmt == "int8":
        ks_slot, vs_slot = ks.contiguous(), vs.contiguous()
        alt["scales_slot_major_ms"] = _graph_time(lambda: ours(ks_slot, vs_slot))
        del ks_slot, vs_slot
    for sp in ((33, 66) if c.batch == 1 else (2, 4)):
        alt[f"splits{sp}_ms"] = _graph_time(lambda: ours(num_splits=sp))
    return alt


def _decode_peers(c: DecodeCase, q, kc, vc, peer_ms, peer_mode) -> None:
    """SDPA cuDNN and flash on the keys the query sees, contiguous (b, s, HK, d): the bf16 pool
    itself, or a copy of the window's keys."""
    from torch.nn.attention import SDPBackend

    keys = visible_keys(c.context, (c.window or (-1, -1))[0])
    kb = kc.view(c.batch, c.context, HK, c.hdim)[:, c.context - keys:]
    vb = vc.view(c.batch, c.context, HK, c.hdim)[:, c.context - keys:]
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
            print(f"{c.tag}: FAILED {e!r}"[:600], flush=True)
        torch.cuda.empty_cache()
        if checkpoint:
            checkpoint(res)
    return res


# ------------------------------------------------------------------------------------------------
# results of several runs in one file
# ------------------------------------------------------------------------------------------------

def load_results(path: Path | str) -> Optional[dict]:
    """A results file's JSON, or None where there is none."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def merge_runs(previous: Optional[dict], res: Results) -> Results:
    """res with the rows of `previous` (a results file's JSON) whose case res did not measure,
    in the file's order (res's rows replace those of the same case in place; new cases follow).
    Every row carries run_date, the date of the run that measured it; meta["runs"] holds each of
    those runs' date, torch, copy bandwidth and matmul rate. Without previous: res as it is."""
    if previous is None:
        return res
    prev_meta = {k: v for k, v in previous.items() if k != "rows"}
    runs = dict(prev_meta.get("runs") or {prev_meta["date"]: _run_meta(prev_meta)})
    runs[res.meta["date"]] = _run_meta(res.meta)
    new = {_case_key(r): {**r, "run_date": res.meta["date"]} for r in res.rows}
    rows = []
    for r in previous["rows"]:
        key = _case_key(r)
        rows.append(new.pop(key) if key in new else {"run_date": prev_meta["date"], **r})
    rows += list(new.values())
    merged = copy.copy(res)
    merged.meta = {**res.meta, "runs": {d: runs[d] for d in sorted({r["run_date"] for r in rows})}}
    merged.rows = rows
    return merged


def _run_meta(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("torch", "device_name", "copy_gbps", "matmul_tflops")}


def _case_key(row: dict) -> str:
    return json.dumps(row["case"], sort_keys=True)


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------

def _fmt(x, p=3) -> str:
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def _table(res: Results, keep: Callable[[dict], bool], header, cells):
    """Markdown table of the measured rows whose case passes keep (failed cases are listed in
    their own section)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells(r["case"], r)) + " |" for r in res.rows
            if "error" not in r and keep(r["case"])]
    return out


def _is_decode(c) -> bool:  # failed rows of older runs have no hdim
    return c["kind"] == "decode" and "window" not in c and c.get("hdim", D) == D


def _is_window(c) -> bool:
    return c["kind"] == "decode" and "window" in c


def _is_hdim(c) -> bool:
    return c["kind"] == "decode" and "window" not in c and c.get("hdim", D) != D


def _decode_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["context"]), str(c["batch"]), f(r["ours_ms"], 4),
            f(r["ours_eager_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(p.get("sdpa_flash"), 4), f(r["ratio_cudnn"]),
            f(r["append_ms"], 2)]


def _window_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["context"]), str(c["batch"]), str(c["window"][0]),
            f(r["ours_ms"], 4), f(r["ours_eager_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(r["ratio_cudnn"]), f(r.get("ratio_plain"))]


def _hdim_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["hdim"]), str(c["context"]), str(c["batch"]),
            f(r["ours_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(p.get("sdpa_flash"), 4), f(r["ratio_cudnn"])]


def _tokens(n: int) -> str:
    """32768 -> "32K"; counts that are not whole K as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 and n else str(n)


def _extra_cell(extra: Optional[dict]) -> str:
    """{"32768": bytes, ...} as "32K: 136.0, 128K: 520.0" (MiB)."""
    if not extra:
        return "-"
    return ", ".join(f"{_tokens(int(k))}: {v / 2**20:.1f}"
                     for k, v in sorted(extra.items(), key=lambda kv: int(kv[0])))


def _prefill_cells(c, r):
    f = _fmt
    return [c["format"], str(c["context"]), str(c["chunk"]), f(r["ours_ms"], 2),
            f(r["fwd_ms"], 2), f(r["tflops"], 1), f(r["fwd_tflops"], 1), f(r["frac_fwd"]),
            f(r["one_pass_fwd_ms"], 2), f(r["append_ms"], 2),
            f"{r['max_abs_diff_chunked_vs_one_pass']:.2e}",
            f"{r['max_abs_diff_vs_fwd_on_unquantized']:.2e}", _extra_cell(r.get("extra_bytes"))]


def _mixed_cells(c, r):
    f = _fmt
    return [c["format"], f"{c['decode_rows']} x {c['decode_context']}",
            f"{c['prefill_chunk']} of {c['prefill_context']}", f(r["ours_ms"], 3),
            f(r["separate_ms"], 3), f(r["ratio_separate"]), f(r["decode_ms"], 3),
            f(r["prefill_ms"], 3), f"{r['max_abs_diff_vs_separate']:.2e}"]


def _error_cells(c, r):
    return [c["format"]] + [f"{r[k]:.2e}" for k in ("max_abs_vs_bf16_cache", "rel_vs_bf16_cache",
                                                   "max_abs_vs_fp64", "rel_vs_fp64")]


def _failed(res: Results) -> List[str]:
    """One line per failed case: its case and the error."""
    rows = [r for r in res.rows if "error" in r]
    if not rows:
        return []
    out = ["", "## Failed cases", ""]
    for r in rows:
        case = ", ".join(f"{k} {v}" for k, v in r["case"].items())
        out.append(f"- {case}: `{r['error'][:300]}`")
    return out


def markdown(res: Results) -> str:
    m = res.meta
    modes = {k: v for r in res.rows if r["case"]["kind"] == "decode"
             for k, v in r.get("peer_mode", {}).items()}
    out = [f"# kvcache on {m['device_name']}", "",
           f"torch {m['torch']}, {m['date']}. Copy bandwidth {_fmt(m['copy_gbps'], 1)} GB/s "
           "(read + write bytes of a device copy), measured in the same run. GQA 32/8, hdim 128, "
           "page size 16."]
    if m.get("runs"):
        out += ["", "Rows from several runs (each row's run_date; ratios are within one run): "
                + "; ".join(f"{d}: copy {_fmt(v['copy_gbps'], 1)} GB/s"
                            for d, v in m["runs"].items()) + "."]
    out += ["", "## Decode (one query token per sequence; CUDA-graph time per call)", ""]
    out += _table(res, _is_decode, ["format", "context", "batch", "ours ms", "eager ms",
                                    "GB/s read", "x copy BW", "cuDNN ms (bf16)",
                                    "flash ms (bf16)", "ours / cuDNN", "append ms"],
                  _decode_cells)
    out += ["", f"Peers: {modes} (ratio uses the bf16 cuDNN time of the same context/batch).",
            "", f"## Sliding-window decode (window of {WINDOW} keys vs a plain 4K context; "
            "CUDA-graph time per call)", "",
            "Bytes count the keys the query sees; cuDNN runs on a contiguous copy of them. "
            "x plain: the windowed time over the plain 4K decode's (same batch).", ""]
    out += _table(res, _is_window, ["format", "context", "batch", "window", "ours ms",
                                    "eager ms", "GB/s read", "x copy BW", "cuDNN ms",
                                    "ours / cuDNN", "x plain 4K"], _window_cells)
    out += ["", "## Decode at other head dims (GQA 32/8; CUDA-graph time per call)", ""]
    out += _table(res, _is_hdim, ["format", "hdim", "context", "batch", "ours ms", "GB/s read",
                                  "x copy BW", "cuDNN ms (bf16)", "flash ms (bf16)",
                                  "ours / cuDNN"], _hdim_cells)
    out += ["", "## Chunked prefill (append + attend per chunk; attention time summed)", "",
            "extra MiB: device memory one chunk's call allocates beyond its inputs, outputs "
            "and the pool, at the chunk ending at that context.", ""]
    out += _table(res, lambda c: c["kind"] == "prefill",
                  ["format", "prompt", "chunk", "ours ms", "fwd ms (contiguous, same shapes)",
                   "ours TFLOP/s", "fwd TFLOP/s", "x fwd", "one-pass fwd ms", "append ms",
                   "max diff chunked vs one pass", "max diff vs fwd (unquantized)",
                   "extra MiB"], _prefill_cells)
    out += ["", "## Mixed batch (decode rows and a prefill chunk in one call vs two calls; "
            "eager time)", ""]
    out += _table(res, lambda c: c["kind"] == "mixed",
                  ["format", "decode rows x context", "prefill chunk of context", "ours ms",
                   "separate ms", "ours / separate", "decode call ms", "prefill call ms",
                   "max diff vs separate"], _mixed_cells)
    out += ["", "## Output error of the quantized caches (decode, 32K keys with outlier channels)",
            ""]
    out += _table(res, lambda c: c["kind"] == "error",
                  ["format", "max abs vs bf16 cache", "rel vs bf16 cache", "max abs vs fp64",
                   "rel vs fp64"], _error_cells)
    out += _failed(res)
    return "\n".join(out) + "\n"


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

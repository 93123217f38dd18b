"""The attention backward benchmark: longctx's backward (flash_attn_func, and
flash_attn_varlen_func for document-packed batches) against torch SDPA with the cuDNN and flash
backends and FlexAttention with the same block mask, in one process.

Grid (attn_cases.bwd_grid): the forward's batched grid (hdim 64/128/256, seqlen 1K..32K with
batch*seqlen = 32K and heads*hdim = 2048, causal and not, GQA 32/8 at hdim 128, sliding window
4096 (causal) at 16K and 32K), one 64K GQA 32/8 causal sequence and a document-packed causal GQA
varlen batch of 64K tokens (FlexAttention with a document mask is its peer), and one 128K
GQA sequence for the peak memory. Per case:
  bwd      - the backward alone: autograd.grad of a saved forward output (retain_graph), which for
             ours runs preprocess + main + postprocess, and for SDPA/Flex their own backward;
  fwd+bwd  - forward then backward, what a training step pays;
  det      - ours with deterministic=True (backward alone): the cost of bitwise
             reproducibility, for every row;
  bwd_peak_extra_bytes - for the one-sequence cases of 64K tokens and more: the peak memory the
             backward allocates beyond what it started with (dq/dk/dv included), ours and SDPA's.
FLOPs (docs/design.md): bwd = 2.5 x 4 * heads * pairs * hdim, fwd+bwd = 3.5 x ...
A peer that cannot run a case is recorded as null.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from . import attn_cases
from .attn_cases import (bwd_grid, flex_runner, fwd_flops, make_inputs, ours_fn, sdpa_runner,
                         throughput, to_bhsd, wants_flex)
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

COLUMNS = [("hdim", "case.hdim"), ("seqlen", "case.seqlen"), ("causal", "case.causal"),
           ("window", "case.window"), ("heads", "case.heads"), ("kv heads", "case.heads_kv"),
           ("docs", "case.docs"), ("bwd TFLOP/s", "tflops"), ("cuDNN", "peer_tflops.sdpa_cudnn"),
           ("FA2 (sdpa flash)", "peer_tflops.sdpa_flash"), ("Flex", "peer_tflops.flex"),
           ("x cuDNN", "ratio.sdpa_cudnn"), ("x FA2", "ratio.sdpa_flash"), ("x Flex", "ratio.flex"),
           ("det TFLOP/s", "det_tflops"), ("det cost", "det_cost"),
           ("fwd+bwd TFLOP/s", "fb_tflops"), ("fb x cuDNN", "fb_ratio.sdpa_cudnn"),
           ("fb x FA2", "fb_ratio.sdpa_flash"), ("fb x Flex", "fb_ratio.flex"),
           ("bwd peak extra MiB", "bwd_peak_mib.ours"),
           ("cuDNN peak extra MiB", "bwd_peak_mib.sdpa_cudnn")]


def _bwd_and_fb(fwd, inputs, dout):
    """(ms of the backward alone, ms of forward + backward) for fwd(*inputs) -> out."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fwd(*xs)
    bwd_ms = time_cuda(lambda: torch.autograd.grad(out, xs, dout, retain_graph=True),
                       warmup=3, reps=10, min_time_ms=100)

    def step():
        o = fwd(*xs)
        torch.autograd.grad(o, xs, dout)
    fb_ms = time_cuda(step, warmup=3, reps=10, min_time_ms=100)
    del out
    return bwd_ms, fb_ms


def peak_extra_bytes(fwd, inputs, dout) -> int:
    """Peak device memory the backward of fwd(*inputs) allocates beyond what was allocated when
    it started (its outputs dq/dk/dv included: they are part of what a step pays)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fwd(*xs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, xs, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del grads, out, xs
    return int(peak)


def _try(fn):
    try:
        return fn()
    except Exception:  # the backend refused this shape: record null, keep going
        return None, None


def run_attn_bwd(quick: bool = False, progress: Optional[Callable[[str], None]] = None,
                 with_flex: bool = True,
                 checkpoint: Optional[Callable[[Results], None]] = None,
                 only: Sequence[str] = ()) -> Results:
    """checkpoint(res), if given, is called after every case (partial results survive a kill).
    only: run just the cases whose tag ("d=128 s=16384 b=2 causal=True window=-1 h=16/16")
    contains one of these substrings (development runs; committed results use the full grid)."""
    from torch.nn.attention import SDPBackend

    res = Results("attn_bwd", copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
    for c, tag in attn_cases.each_case("attn_bwd", bwd_grid(quick), only, progress):
        q, k, v, cu = make_inputs(c)
        dout = torch.randn_like(q)
        pairs4 = fwd_flops(c)
        flops, fb_flops = 2.5 * pairs4, 3.5 * pairs4
        with nvtx_range(tag + " longctx"):
            ours_ms, ours_fb = _bwd_and_fb(ours_fn(c, cu), (q, k, v), dout)
        with nvtx_range(tag + " longctx det"):
            det_ms, _ = _bwd_and_fb(ours_fn(c, cu, deterministic=True), (q, k, v), dout)
        extra = None
        if c.seqlen >= 65536 and not c.docs:
            extra = {"ours": peak_extra_bytes(ours_fn(c, cu), (q, k, v), dout)}
        qt, kt, vt, dt = to_bhsd(c, q, k, v, dout)  # SDPA/Flex: (b, h, s, d)
        peers: Dict[str, Optional[float]] = {}
        peers_fb: Dict[str, Optional[float]] = {}
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            fn = sdpa_runner(backend, c)
            if fn is None:
                continue
            with nvtx_range(f"{tag} {name}"):
                peers[name], peers_fb[name] = _try(lambda: _bwd_and_fb(fn, (qt, kt, vt), dt))
            if extra is not None and peers[name] is not None:
                extra[name] = peak_extra_bytes(fn, (qt, kt, vt), dt)
        if with_flex and wants_flex(c):
            def flex_case():
                return _bwd_and_fb(flex_runner(c), (qt, kt, vt), dt)
            with nvtx_range(f"{tag} flex"):
                peers["flex"], peers_fb["flex"] = _try(flex_case)
        del q, k, v, dout, qt, kt, vt, dt
        res.add({"case": c.as_row(),
                 "ours_ms": ours_ms, "peers": peers, "flops": flops,
                 **throughput(flops, ours_ms, peers),
                 "det_ms": det_ms,
                 "det_tflops": flops / (det_ms * 1e-3) / 1e12 if det_ms else None,
                 "det_cost": det_ms / ours_ms if det_ms else None,
                 "fb_ms": ours_fb, "peers_fb": peers_fb,
                 **throughput(fb_flops, ours_fb, peers_fb, prefix="fb_"),
                 "bwd_peak_extra_bytes": extra,
                 "bwd_peak_mib": ({n: b / 2**20 for n, b in extra.items()} if extra else None)})
        attn_cases.case_done(res, checkpoint)
    return res


# the command line of bench/attn_bwd.py (longctx.bench.bench_main)

add_arguments, run_args = attn_cases.command_line(run_attn_bwd, COLUMNS)

"""The attention backward benchmark: longctx.flash_attn_func's backward against torch
SDPA with the cuDNN and flash backends and FlexAttention with the same block mask, in one process.

Grid: the forward's (longctx.bench.attn_fwd_suite.grid): hdim 64/128/256, seqlen 1K..32K with
batch*seqlen = 32K and heads*hdim = 2048, causal and not, GQA 32/8 at hdim 128, sliding window
4096 (causal) at 16K and 32K. Per case:
  bwd      - the backward alone: autograd.grad of a saved forward output (retain_graph), which for
             ours runs preprocess + main + postprocess, and for SDPA/Flex their own backward;
  fwd+bwd  - forward then backward, what a training step pays;
  det      - ours with deterministic=True (backward alone), the cost of bitwise reproducibility
             (hdim 128 and the window/GQA cases only: it is the same kernel at every hdim).
FLOPs (docs/design.md): bwd = 2.5 x 4 * batch * heads * pairs * hdim, fwd+bwd = 3.5 x ...
A peer that cannot run a case is recorded as null.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from .attn_fwd_suite import flex_runner, grid, mask_pairs
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

COLUMNS = [("hdim", "case.hdim"), ("seqlen", "case.seqlen"), ("causal", "case.causal"),
           ("window", "case.window"), ("heads", "case.heads"), ("kv heads", "case.heads_kv"),
           ("bwd TFLOP/s", "tflops"), ("cuDNN", "peer_tflops.sdpa_cudnn"),
           ("FA2 (sdpa flash)", "peer_tflops.sdpa_flash"), ("Flex", "peer_tflops.flex"),
           ("x cuDNN", "ratio.sdpa_cudnn"), ("x FA2", "ratio.sdpa_flash"), ("x Flex", "ratio.flex"),
           ("det TFLOP/s", "det_tflops"), ("det cost", "det_cost"),
           ("fwd+bwd TFLOP/s", "fb_tflops"), ("fb x cuDNN", "fb_ratio.sdpa_cudnn"),
           ("fb x FA2", "fb_ratio.sdpa_flash"), ("fb x Flex", "fb_ratio.flex")]


def _sdpa_fn(backend, causal, gqa):
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


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
    only: run just the cases whose tag ("d=128 s=16384 causal=True window=-1 h=16/16")
    contains one of these substrings (development runs; committed results use the full grid)."""
    from torch.nn.attention import SDPBackend

    from ..attention import flash_attn_func

    res = Results("attn_bwd", copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
    tokens = 32768
    for hdim, s, causal, wl, heads, heads_kv in grid(quick):
        b = max(1, tokens // s)
        tag = f"attn_bwd d={hdim} s={s} causal={causal} window={wl} h={heads}/{heads_kv}"
        if only and not any(o in tag for o in only):
            continue
        if progress:
            progress(tag)
        q = torch.randn(b, s, heads, hdim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, heads_kv, hdim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dout = torch.randn_like(q)
        pairs4 = 4 * b * heads * mask_pairs(s, s, causal, wl) * hdim
        flops, fb_flops = 2.5 * pairs4, 3.5 * pairs4
        window = (wl, 0 if causal else -1)

        def ours(det):
            return lambda q_, k_, v_: flash_attn_func(q_, k_, v_, causal=causal, window_size=window,
                                                      deterministic=det)
        with nvtx_range(tag + " longctx"):
            ours_ms, ours_fb = _bwd_and_fb(ours(False), (q, k, v), dout)
        det_ms = None
        if hdim == 128 and (s in (1024, 16384) or wl >= 0 or heads != heads_kv):
            with nvtx_range(tag + " longctx det"):
                det_ms, _ = _bwd_and_fb(ours(True), (q, k, v), dout)
        qt, kt, vt, dt = (x.transpose(1, 2) for x in (q, k, v, dout))  # SDPA/Flex: (b, h, s, d)
        peers: Dict[str, Optional[float]] = {}
        peers_fb: Dict[str, Optional[float]] = {}
        gqa = heads != heads_kv
        if wl < 0:
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = _sdpa_fn(backend, causal, gqa)
                with nvtx_range(f"{tag} {name}"):
                    peers[name], peers_fb[name] = _try(lambda: _bwd_and_fb(fn, (qt, kt, vt), dt))
        if with_flex and (wl >= 0 or (hdim == 128 and s == 16384)):
            def flex_case():
                flex = flex_runner(s, causal, wl, heads, heads_kv)
                return _bwd_and_fb(flex, (qt, kt, vt), dt)
            with nvtx_range(f"{tag} flex"):
                peers["flex"], peers_fb["flex"] = _try(flex_case)
        del q, k, v, dout, qt, kt, vt, dt
        res.add({"case": {"hdim": hdim, "seqlen": s, "batch": b, "heads": heads,
                          "heads_kv": heads_kv, "causal": causal, "window": [wl, window[1]],
                          "dtype": "bf16"},
                 "ours_ms": ours_ms, "peers": peers, "flops": flops,
                 "tflops": flops / (ours_ms * 1e-3) / 1e12,
                 "peer_tflops": {n: (flops / (ms * 1e-3) / 1e12 if ms else None)
                                 for n, ms in peers.items()},
                 "ratio": {n: (ms / ours_ms if ms else None) for n, ms in peers.items()},
                 "det_ms": det_ms,
                 "det_tflops": flops / (det_ms * 1e-3) / 1e12 if det_ms else None,
                 "det_cost": det_ms / ours_ms if det_ms else None,
                 "fb_ms": ours_fb, "peers_fb": peers_fb,
                 "fb_tflops": fb_flops / (ours_fb * 1e-3) / 1e12,
                 "fb_ratio": {n: (ms / ours_fb if ms else None) for n, ms in peers_fb.items()}})
        torch.cuda.empty_cache()
        if checkpoint:
            checkpoint(res)
    return res


# the command line of bench/attn_bwd.py (longctx.bench.bench_main)

def add_arguments(ap) -> None:
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (compiles per shape)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of case tags to run (development runs)")


def run_args(args, progress) -> Results:
    # every finished case is written at once: partial results survive a kill
    return run_attn_bwd(args.quick, progress=progress, with_flex=not args.no_flex,
                        checkpoint=lambda r: r.write(args.out, COLUMNS),
                        only=[o for o in args.only.split(",") if o])

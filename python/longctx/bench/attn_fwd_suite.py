"""The attention forward benchmark: longctx.flash_attn_func against torch SDPA
with the cuDNN and flash backends and FlexAttention with the same block mask, in one process.

Grid (attn_cases.fwd_grid): hdim 64/128/256; seqlen 1K..32K with batch*seqlen = 32K and
heads*hdim = 2048; causal and not; GQA 32/8 at hdim 128; sliding window 4096 (causal) at 16K and
32K; one 128K GQA 32/8 causal sequence; a document-packed causal GQA varlen batch of 64K tokens
(FlexAttention with a document mask is its peer; SDPA has no varlen). FLOPs follow
docs/design.md: 4 * heads * pairs * hdim, pairs = the (query, key) pairs the mask keeps.
A peer that cannot run a case (a backend that refuses the shape) is recorded as null.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from . import attn_cases
from .attn_cases import (flex_runner, fwd_flops, fwd_grid, make_inputs, ours_fn, sdpa_runner,
                         throughput, to_bhsd, wants_flex)
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

COLUMNS = [("hdim", "case.hdim"), ("seqlen", "case.seqlen"), ("causal", "case.causal"),
           ("window", "case.window"), ("heads", "case.heads"), ("kv heads", "case.heads_kv"),
           ("docs", "case.docs"), ("ours TFLOP/s", "tflops"), ("cuDNN", "peer_tflops.sdpa_cudnn"),
           ("FA2 (sdpa flash)", "peer_tflops.sdpa_flash"), ("Flex", "peer_tflops.flex"),
           ("x cuDNN", "ratio.sdpa_cudnn"), ("x FA2", "ratio.sdpa_flash"), ("x Flex", "ratio.flex")]


def _time_peer(fn) -> Optional[float]:
    if fn is None:
        return None
    try:
        return time_cuda(fn, warmup=3, reps=20, min_time_ms=100)
    except Exception:  # the backend refused this shape: record null, keep going
        return None


def run_attn_fwd(quick: bool = False, progress: Optional[Callable[[str], None]] = None,
                 with_flex: bool = True, checkpoint: Optional[Callable[[Results], None]] = None,
                 only: Sequence[str] = ()) -> Results:
    """checkpoint(res), if given, is called after every case (partial results survive a kill).
    only: run just the cases whose tag contains one of these substrings (development runs;
    committed results use the full grid)."""
    from torch.nn.attention import SDPBackend

    res = Results("attn_fwd", copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
    for c, tag in attn_cases.each_case("attn_fwd", fwd_grid(quick), only, progress):
        q, k, v, cu = make_inputs(c)
        flops = fwd_flops(c)
        ours_fn_ = ours_fn(c, cu)
        with nvtx_range(tag + " longctx"):
            ours = time_cuda(lambda: ours_fn_(q, k, v), warmup=5, reps=30, min_time_ms=150)
        qt, kt, vt = to_bhsd(c, q, k, v)
        peers: Dict[str, Optional[float]] = {}
        if not c.docs and c.window_left < 0:
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = sdpa_runner(backend, c)
                with nvtx_range(f"{tag} {name}"):
                    peers[name] = _time_peer(lambda: fn(qt, kt, vt))
        if with_flex and wants_flex(c):
            try:
                flex = flex_runner(c)
                with nvtx_range(f"{tag} flex"):
                    peers["flex"] = _time_peer(lambda: flex(qt, kt, vt))
            except Exception:
                peers["flex"] = None
        del q, k, v, qt, kt, vt
        res.add({"case": c.as_row(), "ours_ms": ours, "peers": peers, "flops": flops,
                 **throughput(flops, ours, peers)})
        attn_cases.case_done(res, checkpoint)
    return res


# the command line of bench/attn_fwd.py (longctx.bench.bench_main)

add_arguments, run_args = attn_cases.command_line(run_attn_fwd, COLUMNS)

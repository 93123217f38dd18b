"""The attention forward benchmark: longctx.flash_attn_func against torch SDPA
with the cuDNN and flash backends and FlexAttention with the same block mask, in one process.

Grid: hdim 64/128/256; seqlen 1K..32K with batch*seqlen = 32K and heads*hdim = 2048; causal and
not; GQA 32/8 at hdim 128; sliding window 4096 (causal) at 16K and 32K. FLOPs follow
docs/design.md: 4 * batch * heads * pairs * hdim, pairs = the (query, key) pairs the mask keeps.
A peer that cannot run a case (a backend that refuses the shape) is recorded as null.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

COLUMNS = [("hdim", "case.hdim"), ("seqlen", "case.seqlen"), ("causal", "case.causal"),
           ("window", "case.window"), ("heads", "case.heads"), ("kv heads", "case.heads_kv"),
           ("ours TFLOP/s", "tflops"), ("cuDNN", "peer_tflops.sdpa_cudnn"),
           ("FA2 (sdpa flash)", "peer_tflops.sdpa_flash"), ("Flex", "peer_tflops.flex"),
           ("x cuDNN", "ratio.sdpa_cudnn"), ("x FA2", "ratio.sdpa_flash"), ("x Flex", "ratio.flex")]


def mask_pairs(sq: int, sk: int, causal: bool, window_left: int = -1) -> int:
    """(query, key) pairs kept by the bottom-right aligned causal mask with an optional left
    window (query i sees keys j in [i + sk - sq - left, i + sk - sq])."""
    total = 0
    for i in range(sq):
        hi = min(sk - 1, i + sk - sq) if causal else sk - 1
        lo = max(0, i + sk - sq - window_left) if window_left >= 0 else 0
        total += max(0, hi - lo + 1)
    return total


def grid(quick: bool):
    """(hdim, seqlen, causal, window_left, heads, heads_kv) cases."""
    if quick:
        return [(128, 4096, True, -1, 16, 16), (128, 16384, True, -1, 16, 16)]
    cases = []
    for hdim in (64, 128, 256):
        for s in (1024, 2048, 4096, 8192, 16384, 32768):
            for causal in (False, True):
                cases.append((hdim, s, causal, -1, 2048 // hdim, 2048 // hdim))
    cases += [(128, 16384, True, -1, 32, 8), (128, 16384, False, -1, 32, 8)]
    cases += [(128, s, True, 4096, 16, 16) for s in (16384, 32768)]
    return cases


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel
    import torch.nn.functional as F

    def run(q, k, v, causal, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def flex_runner(seqlen, causal, window_left, heads, heads_kv):
    """FlexAttention (compiled for this shape) with the case's causal / left-window block mask:
    fn(q, k, v) on (b, h, s, d) tensors."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else q_idx >= 0
        if window_left >= 0:
            keep = keep & (q_idx - kv_idx <= window_left)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = heads != heads_kv
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _time_peer(fn) -> Optional[float]:
    try:
        return time_cuda(fn, warmup=3, reps=20, min_time_ms=100)
    except Exception:  # the backend refused this shape: record null, keep going
        return None


def run_attn_fwd(quick: bool = False, progress: Optional[Callable[[str], None]] = None,
                 with_flex: bool = True) -> Results:
    from torch.nn.attention import SDPBackend

    from ..attention import flash_attn_func

    res = Results("attn_fwd", copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops())
    tokens = 32768
    for hdim, s, causal, wl, heads, heads_kv in grid(quick):
        b = max(1, tokens // s)
        tag = f"attn_fwd d={hdim} s={s} causal={causal} window={wl} h={heads}/{heads_kv}"
        if progress:
            progress(tag)
        q = torch.randn(b, s, heads, hdim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, s, heads_kv, hdim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * b * heads * mask_pairs(s, s, causal, wl) * hdim
        window = (wl, 0 if causal else -1)
        with nvtx_range(tag + " longctx"):
            ours = time_cuda(lambda: flash_attn_func(q, k, v, causal=causal, window_size=window),
                             warmup=5, reps=30, min_time_ms=150)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA/Flex: (b, h, s, d)
        peers: Dict[str, Optional[float]] = {}
        gqa = heads != heads_kv
        if wl < 0:
            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = _sdpa(backend)
                with nvtx_range(f"{tag} {name}"):
                    peers[name] = _time_peer(lambda: fn(qt, kt, vt, causal, gqa))
        # FlexAttention compiles per shape: measured where the bar needs it (windows, 16K hdim 128)
        if with_flex and (wl >= 0 or (hdim == 128 and s == 16384)):
            try:
                flex = flex_runner(s, causal, wl, heads, heads_kv)
                with nvtx_range(f"{tag} flex"):
                    peers["flex"] = _time_peer(lambda: flex(qt, kt, vt))
            except Exception:
                peers["flex"] = None
        del q, k, v, qt, kt, vt
        tflops = flops / (ours * 1e-3) / 1e12
        res.add({"case": {"hdim": hdim, "seqlen": s, "batch": b, "heads": heads,
                          "heads_kv": heads_kv, "causal": causal, "window": [wl, window[1]],
                          "dtype": "bf16"},
                 "ours_ms": ours, "peers": peers, "flops": flops, "tflops": tflops,
                 "peer_tflops": {n: (flops / (ms * 1e-3) / 1e12 if ms else None)
                                 for n, ms in peers.items()},
                 "ratio": {n: (ms / ours if ms else None) for n, ms in peers.items()}})
        torch.cuda.empty_cache()
    return res


# the command line of bench/attn_fwd.py (longctx.bench.bench_main)

def add_arguments(ap) -> None:
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (compiles per shape)")


def run_args(args, progress) -> Results:
    return run_attn_fwd(args.quick, progress=progress, with_flex=not args.no_flex)

"""The RoPE benchmark: fused in-place RoPE on q and k against eager and torch.compile'd PyTorch
RoPE and against a device-to-device copy of the same bytes, all in one process.

Every implementation computes cos/sin from the positions inside the timed region, as a model's
forward does. Bandwidth counts q and k read once and written once (bytes read + written, like
the copy). Used by bench/rope.py and `longctx bench`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..rope import apply_rope
from ..rope_scaling import rope_frequencies
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .._common import nvtx_range
from .results import Results
from .timing import time_cuda

COLUMNS = [("tokens", "case.seqlen"), ("dtype", "case.dtype"), ("layout", "case.layout"),
           ("scaling", "case.scaling"), ("ours ms", "ours_ms"), ("GB/s", "gbps"),
           ("of copy", "fraction_of_copy"), ("eager ms", "peers.eager"),
           ("compile ms", "peers.torch_compile"), ("x compile", "speedup_vs_compile")]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def torch_rope(q, k, positions, inv_freq, attention_factor, interleaved):
    """The transformers formulation: fp32 angles, cos/sin times the attention factor."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_factor).to(q.dtype)[:, None, :]
    sin = (emb.sin() * attention_factor).to(q.dtype)[:, None, :]
    rot = _rotate_pairs if interleaved else _rotate_half
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


_CASES = [  # (dtype, interleaved, rope_scaling)
    ("bf16", False, None),
    ("bf16", True, None),
    ("fp16", False, None),
    ("bf16", False,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
]


def run_rope(quick: bool = False, tokens: int = 32768, heads: int = 32, heads_kv: int = 8,
             hdim: int = 128, progress: Optional[Callable[[str], None]] = None) -> Results:
    """The headline case (32K tokens, 32/8 heads of 128, bf16) and its variants; with quick, the
    bf16 NeoX case only. The full run adds a token sweep (4K..64K) of the bf16 NeoX case."""
    copy = copy_bandwidth_gbps()
    res = Results("rope", copy_gbps=copy, matmul_tflops=matmul_tflops())
    compiled = torch.compile(torch_rope, fullgraph=True, dynamic=False)
    cases = [(tokens,) + c for c in (_CASES[:1] if quick else _CASES)]
    if not quick:
        cases += [(t, "bf16", False, None) for t in (4096, 8192, 16384, 65536) if t != tokens]
    for T, dtype_name, interleaved, scaling in cases:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        inv_freq, factor = rope_frequencies(hdim, 500000.0, scaling, device="cuda")
        n_sets = max(2, -(-(256 << 20) // (T * (heads + heads_kv) * hdim * 2)))  # > 2x L2 total
        sets = [(torch.randn(T, heads, hdim, device="cuda", dtype=dtype),
                 torch.randn(T, heads_kv, hdim, device="cuda", dtype=dtype),
                 torch.randint(0, 1 << 20, (T,), device="cuda", dtype=torch.int64))
                for _ in range(n_sets)]
        nbytes = 2 * (sets[0][0].numel() + sets[0][1].numel()) * sets[0][0].element_size()
        case = {"seqlen": T, "heads": heads, "heads_kv": heads_kv, "hdim": hdim,
                "dtype": dtype_name, "layout": "interleaved" if interleaved else "neox",
                "scaling": (scaling or {}).get("rope_type", "default")}
        tag = f"rope T={T} {dtype_name} {case['layout']} {case['scaling']}"
        if progress:
            progress(tag)
        with nvtx_range(tag + " longctx"):
            ours = time_cuda(lambda s: apply_rope(s[0], s[1], s[2], inv_freq, factor,
                                                  interleaved=interleaved), inputs=sets)
        with nvtx_range(tag + " eager"):
            eager = time_cuda(lambda s: torch_rope(s[0], s[1], s[2], inv_freq, factor,
                                                   interleaved), inputs=sets)
        with nvtx_range(tag + " torch.compile"):
            comp = time_cuda(lambda s: compiled(s[0], s[1], s[2], inv_freq, factor, interleaved),
                             inputs=sets)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        with nvtx_range(tag + " copy"):
            copy_ms = time_cuda(lambda: dst.copy_(src))
        del src, dst, sets
        gbps = nbytes / (ours * 1e-3) / 1e9
        res.add({"case": case, "ours_ms": ours,
                 "peers": {"eager": eager, "torch_compile": comp, "copy_same_bytes": copy_ms},
                 "gbps": gbps,
                 "peer_gbps": {"eager": nbytes / (eager * 1e-3) / 1e9,
                               "torch_compile": nbytes / (comp * 1e-3) / 1e9,
                               "copy_same_bytes": nbytes / (copy_ms * 1e-3) / 1e9},
                 "fraction_of_copy": gbps / copy,
                 "fraction_of_copy_same_bytes": copy_ms / ours,
                 "speedup_vs_compile": comp / ours})
    return res


# the command line of bench/rope.py (longctx.bench.bench_main)

def add_arguments(ap) -> None:
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)


def run_args(args, progress) -> Results:
    return run_rope(args.quick, args.tokens, args.heads, args.heads_kv, args.hdim,
                    progress=progress)

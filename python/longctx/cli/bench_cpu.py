"""The CPU benchmark that `longctx bench` runs on a machine without a GPU (or without the GPU
suites): longctx's CPU kernels against plain PyTorch at small sizes, in a few seconds.

Cases: fused RoPE (torch.ops.longctx.apply_rope_, in place) against the eager PyTorch rotation
(cos/sin from the positions, rotate-half, out of place), reported in GB/s of q and k read and
written; attention forward (torch.ops.longctx.flash_attn_fwd) against
torch.nn.functional.scaled_dot_product_attention, in TFLOP/s (4 x b x h x pairs x d), when this
build has a CPU kernel for it. Each case is timed as the median of several calls with
time.perf_counter (longctx.bench.time_cpu). The results are dicts in the format of docs/design.md,
one per capability, with "gpu": "cpu".
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..bench.timing import time_cpu

__all__ = ["cpu_cases", "run_cpu_benchmarks", "attention_cpu_kernel_available"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention_cpu_kernel_available() -> bool:
    """True when torch.ops.longctx.flash_attn_fwd exists and has a CPU kernel in this build."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("longctx::flash_attn_fwd", "CPU")
    except RuntimeError:  # the op is not even declared
        return False


# ------------------------------------------------------------------------------------- rope


def _rope_case(seqlen: int, dtype: str, reps: int) -> Dict[str, Any]:
    heads, heads_kv, head_dim = 8, 2, 128
    dt = _DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seqlen, heads, head_dim, generator=gen).to(dt)
    k = torch.randn(1, seqlen, heads_kv, head_dim, generator=gen).to(dt)
    positions = torch.arange(seqlen, dtype=torch.int64)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_freq = inv_freq.to(torch.float32)

    def ours():
        torch.ops.longctx.apply_rope_(q, k, positions, inv_freq, 1.0, False, False, -1)

    def eager():
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            xf = x.float()
            return (xf * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(x.dtype)

        return rot(q), rot(k)

    ours_ms = time_cpu(ours, warmup=2, reps=reps)
    eager_ms = time_cpu(eager, warmup=2, reps=reps)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # q and k read and written
    return {"case": {"seqlen": seqlen, "heads": heads, "heads_kv": heads_kv, "hdim": head_dim,
                     "dtype": dtype, "layout": "neox"},
            "ours_ms": ours_ms, "peers": {"torch_eager": eager_ms},
            "gbps": nbytes / (ours_ms * 1e-3) / 1e9}


# --------------------------------------------------------------------------------- attention


def _attn_case(seqlen: int, dtype: str, reps: int) -> Dict[str, Any]:
    batch, heads, heads_kv, head_dim = 1, 4, 1, 64
    dt = _DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(dt)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(dt)
    v = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(dt)
    scale = head_dim ** -0.5

    def ours():
        return torch.ops.longctx.flash_attn_fwd(q, k, v, None, None, seqlen, seqlen, scale, True,
                                                -1, -1)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                scale=scale, enable_gqa=True)

    ours_ms = time_cpu(ours, warmup=1, reps=reps)
    sdpa_ms = time_cpu(sdpa, warmup=1, reps=reps)
    flops = 4 * batch * heads * (seqlen * (seqlen + 1) // 2) * head_dim
    return {"case": {"seqlen": seqlen, "heads": heads, "heads_kv": heads_kv, "hdim": head_dim,
                     "causal": True, "window": [-1, -1], "dtype": dtype},
            "ours_ms": ours_ms, "peers": {"sdpa_cpu": sdpa_ms},
            "tflops": flops / (ours_ms * 1e-3) / 1e12}


# -------------------------------------------------------------------------------- the suite


def cpu_cases(quick: bool) -> Tuple[List[Tuple[str, str, Callable[[], Dict[str, Any]]]],
                                    List[str]]:
    """(benchmark name, label, run) for every CPU case, and the CPU cases skipped, with why."""
    reps = 3 if quick else 7
    rope_lens = [512, 2048] if quick else [512, 2048, 8192]
    rope_dtypes = ["bf16"] if quick else ["fp32", "bf16"]
    cases = [("rope", f"rope {dt} s={s}", (lambda s=s, dt=dt: _rope_case(s, dt, reps)))
             for dt in rope_dtypes for s in rope_lens]
    skipped = []
    if attention_cpu_kernel_available():
        attn_lens = [256, 512] if quick else [256, 512, 1024]
        cases += [("attn_fwd", f"attn_fwd fp32 causal s={s}",
                   (lambda s=s: _attn_case(s, "fp32", min(reps, 5)))) for s in attn_lens]
    else:
        skipped.append("attn_fwd (cpu): torch.ops.longctx.flash_attn_fwd has no CPU kernel in "
                       "this build")
    return cases, skipped


def run_cpu_benchmarks(quick: bool, progress: Optional[Callable[[str], None]] = None
                       ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Runs every CPU case; returns one results dict (docs/design.md format) per benchmark name,
    and the skipped CPU cases."""
    cases, skipped = cpu_cases(quick)
    meta = {"gpu": "cpu", "device_name": "cpu", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_gbps": None, "matmul_tflops": None, "threads": torch.get_num_threads()}
    results: Dict[str, Dict[str, Any]] = {}
    for name, label, run in cases:
        if progress:
            progress(label)
        row = run()
        results.setdefault(name, {"name": name, **meta, "rows": []})["rows"].append(row)
    return list(results.values()), skipped

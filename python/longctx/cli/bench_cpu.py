"""What `longctx bench` runs on a machine without a GPU (or without the GPU suites): a correctness
smoke test of longctx's CPU kernels at small sizes, in seconds.

Each case runs a longctx op and checks its output against a float64 reference computed from the
same inputs: the largest absolute error must stay within a tolerance of a few roundings of the
output dtype (`TOLERANCE`, relative to the reference's largest magnitude). The case also records
the median time of one call of the op and of the plain-PyTorch equivalent, measured with
time.perf_counter (longctx.bench.time_cpu). Those times are one shared CPU's at toy sizes: they
show that the calls run, not how fast the kernels are, so no speedup or throughput is derived from
them (the GPU suites measure performance).

Cases: fused RoPE (torch.ops.longctx.apply_rope_, in place; the eager rotation is the peer) and,
when the build has a CPU kernel for it, causal attention forward (torch.ops.longctx.flash_attn_fwd;
scaled_dot_product_attention is the peer). The results are dicts in the format of docs/design.md,
one per op, with "gpu": "cpu" and "smoke_test": True; each row adds "max_abs_err", "tolerance" and
"ok".
"""
from __future__ import annotations

import datetime
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..bench.timing import time_cpu

__all__ = ["cpu_cases", "run_cpu_benchmarks", "attention_cpu_kernel_available", "TOLERANCE",
           "SMOKE_TEST_NOTE"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Allowed |ours - float64 reference| / max(1, max |reference|): four unit roundoffs of the output
# dtype (bf16 2^-8, fp16 2^-11) and, for fp32, the error of the fp32 math itself (1e-5).
TOLERANCE = {"fp32": 1e-5, "bf16": 4 * 2.0 ** -8, "fp16": 4 * 2.0 ** -11}

SMOKE_TEST_NOTE = ("longctx's CPU kernels at small sizes, each output checked against a float64 "
                   "reference. The times (ms, median of a few calls) only show that the calls "
                   "run: toy sizes on this CPU measure no performance, so no speedup or "
                   "throughput is derived from them.")


def attention_cpu_kernel_available() -> bool:
    """True when torch.ops.longctx.flash_attn_fwd exists and has a CPU kernel in this build."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("longctx::flash_attn_fwd", "CPU")
    except RuntimeError:  # the op is not even declared
        return False


def _check(ours: torch.Tensor, ref: torch.Tensor, dtype: str) -> Dict[str, Any]:
    """max_abs_err, tolerance and ok for ours against the float64 reference."""
    err = (ours.double() - ref).abs().max().item()
    tol = TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    return {"max_abs_err": err, "tolerance": tol, "ok": bool(math.isfinite(err) and err <= tol)}


# ------------------------------------------------------------------------------------- rope


def _rope_inputs(seqlen: int, dtype: str):
    heads, heads_kv, head_dim = 8, 2, 128
    dt = _DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seqlen, heads, head_dim, generator=gen).to(dt)
    k = torch.randn(1, seqlen, heads_kv, head_dim, generator=gen).to(dt)
    positions = torch.arange(seqlen, dtype=torch.int64)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return q, k, positions, inv_freq.to(torch.float32)


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
                    ) -> torch.Tensor:
    """NeoX rotation in float64 (the fp32 inv_freq values taken exactly)."""
    ang = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_case(seqlen: int, dtype: str, reps: int) -> Dict[str, Any]:
    q, k, positions, inv_freq = _rope_inputs(seqlen, dtype)

    def ours(qq=q, kk=k):
        torch.ops.longctx.apply_rope_(qq, kk, positions, inv_freq, 1.0, False, False, -1)

    def eager():
        angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            xf = x.float()
            return (xf * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(x.dtype)

        return rot(q), rot(k)

    q_out, k_out = q.clone(), k.clone()
    ours(q_out, k_out)
    check = _check(torch.cat([q_out, k_out], dim=2),
                   _rope_reference(torch.cat([q, k], dim=2), positions, inv_freq), dtype)
    heads, heads_kv, head_dim = q.shape[2], k.shape[2], q.shape[3]
    return {"case": {"seqlen": seqlen, "heads": heads, "heads_kv": heads_kv, "hdim": head_dim,
                     "dtype": dtype, "layout": "neox"},
            "ours_ms": time_cpu(ours, warmup=2, reps=reps),
            "peers": {"torch_eager": time_cpu(eager, warmup=2, reps=reps)}, **check}


# --------------------------------------------------------------------------------- attention


def _attention_reference(q, k, v, scale: float) -> torch.Tensor:
    """Causal GQA attention in float64: q (b, s, h, d), k/v (b, s, hk, d)."""
    group = q.shape[2] // k.shape[2]
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    scores = (qd @ kd.transpose(-1, -2)) * scale
    s = q.shape[1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2)


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

    check = _check(ours()[0], _attention_reference(q, k, v, scale), dtype)
    return {"case": {"seqlen": seqlen, "heads": heads, "heads_kv": heads_kv, "hdim": head_dim,
                     "causal": True, "window": [-1, -1], "dtype": dtype},
            "ours_ms": time_cpu(ours, warmup=1, reps=reps),
            "peers": {"sdpa_cpu": time_cpu(sdpa, warmup=1, reps=reps)}, **check}


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


def failed_checks(results: List[Dict[str, Any]]) -> List[str]:
    """One line per row whose output is outside its tolerance."""
    return [f"{r['name']} {' '.join(f'{k}={v}' for k, v in row['case'].items())}: max error "
            f"{row['max_abs_err']:.3g} > tolerance {row['tolerance']:.3g}"
            for r in results for row in r["rows"] if not row.get("ok", True)]


def run_cpu_benchmarks(quick: bool, progress: Optional[Callable[[str], None]] = None
                       ) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Runs every CPU case; returns one results dict (docs/design.md format) per benchmark name,
    and the skipped CPU cases."""
    cases, skipped = cpu_cases(quick)
    meta = {"gpu": "cpu", "device_name": "cpu", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_gbps": None, "matmul_tflops": None, "threads": torch.get_num_threads(),
            "smoke_test": True, "note": SMOKE_TEST_NOTE}
    results: Dict[str, Dict[str, Any]] = {}
    for name, label, run in cases:
        if progress:
            progress(label)
        row = run()
        results.setdefault(name, {"name": name, **meta, "rows": []})["rows"].append(row)
    return list(results.values()), skipped

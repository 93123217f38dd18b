"""`longctx plan`: the text report of a `longctx.plan.Plan` (the arithmetic lives in plan.py)."""
from __future__ import annotations

from .plan import Plan, format_bytes, format_tokens

__all__ = ["format_plan"]


def _flops(n: int) -> str:
    return f"{n:.3e} FLOP ({n / 1e12:,.1f} TFLOP)"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def format_plan(p: Plan) -> str:
    r, mem, pc = p.ring, p.memory, p.params
    gpus_note = "" if p.gpus_given else " (the fewest that fit)"
    lines = [
        f"model       {p.model}",
        f"context     {format_tokens(p.context)} tokens x batch {p.batch}, "
        f"{'causal' if p.causal else 'full (non-causal)'} attention",
        f"GPUs        {p.gpus} x {p.gpu}{gpus_note}, ring attention: "
        f"{format_tokens(r.shard_tokens)} tokens of each sequence per GPU",
        "",
        f"KV cache ({p.kv_dtype}"
        f"{', + an fp32 scale per token and head' if p.kv_dtype == 'int8' else ''})",
        f"  per token, one layer   {format_bytes(p.kv_bytes_per_token_per_layer)}",
        f"  per token, all layers  {format_bytes(p.kv_bytes_per_token)}",
        f"  per sequence           {format_bytes(p.kv_bytes_per_sequence)}",
    ]
    if p.batch > 1:
        lines.append(f"  whole batch            {format_bytes(p.kv_bytes_total)}")
    lines += [
        "",
        f"parameters  {pc.total:,} ({pc.total / 1e9:.2f}B): embeddings {pc.embedding:,}, "
        f"lm_head {pc.lm_head:,}{' (tied)' if pc.lm_head == 0 else ''}",
        f"weights     {format_bytes(p.weight_bytes)} in {p.weight_dtype}, "
        f"{'replicated on' if p.replicate_weights else 'sharded over'} the GPUs",
        "",
        f"memory per GPU (capacity {format_bytes(mem.capacity)})",
        f"  weights      {format_bytes(mem.weights)}",
        f"  KV cache     {format_bytes(mem.kv_cache)}",
        f"  activations  {format_bytes(mem.activations)} (estimate: one layer's prefill working "
        "set + ring buffers)",
        f"  reserve      {format_bytes(mem.reserve)}",
        f"  total        {format_bytes(mem.total)}: "
        f"{'fits' if mem.fits else 'DOES NOT FIT'} ({100 * mem.total / mem.capacity:.1f}% used)",
        f"  minimum GPUs {p.min_gpus if p.min_gpus is not None else 'none fits'}",
        "",
        f"attention FLOPs ({p.attention_pairs:,} (query, key) pairs per sequence)",
        f"  forward, one layer   {_flops(p.attention_fwd_flops_per_layer)}",
        f"  backward, one layer  {_flops(p.attention_bwd_flops_per_layer)} (2.5 x forward)",
        f"  forward, all layers  {_flops(p.attention_fwd_flops)}: "
        f"{_seconds(p.attention_fwd_flops / (p.tflops * 1e12 * p.gpus))} on {p.gpus} GPU(s) at "
        f"{p.tflops:g} TFLOP/s each",
        "",
    ]
    if p.gpus == 1:
        lines.append("ring        none (1 GPU)")
    else:
        lines += [
            f"ring step (one layer; {r.steps_per_layer} transfers per layer; work split evenly "
            f"over the steps{' by a load-balanced (zigzag) layout' if p.causal else ''})",
            f"  K/V shard sent    {format_bytes(r.shard_bytes_per_layer)} -> "
            f"{_seconds(r.transfer_s)} at {p.link_gbps:g} GB/s per direction",
            f"  compute per step  {_flops(r.compute_flops)} -> {_seconds(r.compute_s)} at "
            f"{p.tflops:g} TFLOP/s",
            "  " + ("transfer hidden behind compute" if r.hidden else
                    f"TRANSFER-BOUND: the link needs {r.transfer_s / r.compute_s:.1f}x the "
                    "compute time; use fewer GPUs, a longer context or a faster link"),
        ]
    rp = p.rope
    factor = f", factor {rp.factor:g}" if rp.factor is not None else ""
    lines += [
        "",
        f"RoPE        {rp.rope_type}{factor}, theta {rp.theta:g}, rotary dim {rp.rotary_dim}, "
        f"attention factor {rp.attention_factor:.6g} (checked with longctx.rope_frequencies)",
    ]
    lines += [f"note        {n}" for n in rp.notes]
    lines.append("units       GB = 1e9 B, GiB = 2^30 B; K = 1024, M = 1048576 tokens")
    return "\n".join(lines)

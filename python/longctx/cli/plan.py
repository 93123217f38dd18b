"""`longctx plan`: its options, and the text report of a `longctx.planner.Plan` (the arithmetic
lives in longctx.planner)."""
from __future__ import annotations

import argparse
import json

import math

from . import UserError
from ..planner import PRESETS, make_plan, resolve_model
from ..planner.models import short_repr
from ..planner.plan import (DEFAULT_LINK_GBPS, DEFAULT_TFLOPS, GPUS, KV_DTYPES, MAX_BATCH,
                            MAX_GIB, MAX_GPUS, RATE_RANGE, WEIGHT_DTYPES, Plan, PlanError,
                            format_bytes, format_number, format_tokens, parse_gpu, parse_tokens)

__all__ = ["format_plan", "add_parser", "run"]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


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
        f"{_seconds(p.attention_fwd_flops / (p.tflops * 1e12 * p.gpus))} on "
        f"{_plural(p.gpus, 'GPU')} at {p.tflops:g} TFLOP/s each",
        "",
    ]
    if p.gpus == 1:
        lines.append("ring        none (1 GPU)")
    else:
        lines += [
            f"ring step (one layer; {_plural(r.steps_per_layer, 'transfer')} per layer; work "
            "split evenly over the steps"
            f"{' by a load-balanced (zigzag) layout' if p.causal else ''})",
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
    if rp.max_context is not None:
        lines.append(f"max context {format_tokens(rp.max_context)} tokens of the model "
                     f"({rp.max_context_source})")
    lines += [f"note        {n}" for n in rp.notes]
    lines.append("units       GB = 1e9 B, GiB = 2^30 B; K = 1024, M = 1048576 tokens")
    return "\n".join(lines)


def add_parser(sub):
    plan = sub.add_parser(
        "plan", help="memory, FLOPs and ring-traffic plan for a model at a context length",
        description="Capacity plan for long-context inference with ring attention. Units: "
                    "GB = 1e9 B, GiB = 2^30 B; token suffixes are binary (128K = 131072).",
        epilog=f"presets: {', '.join(PRESETS)}. GPUs: {', '.join(GPUS)} or a memory size in "
               "GiB. Formulas: docs/cli.md.")
    plan.add_argument("--model", required=True,
                      help="a preset (listed below) or the path of a HuggingFace config.json "
                           "(or of the folder holding it)")
    plan.add_argument("--context", required=True,
                      help="tokens per sequence: 131072, 128k, 1M (K = 1024, M = 1048576)")
    plan.add_argument("--kv-dtype", default="bf16", choices=KV_DTYPES,
                      help="KV-cache dtype (int8 adds an fp32 scale per token and head; default "
                           "bf16)")
    plan.add_argument("--weight-dtype", default="bf16", choices=WEIGHT_DTYPES,
                      help="dtype of the weights (default bf16)")
    plan.add_argument("--gpus", type=int, default=None,
                      help="GPUs the sequence is split over (default: the fewest that fit)")
    plan.add_argument("--gpu", default="h100",
                      help="h100 (80 GB), h200 (141 GB) or a memory size in GiB (default h100)")
    plan.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    plan.add_argument("--link-gbps", type=float, default=DEFAULT_LINK_GBPS,
                      help="ring link bandwidth per direction in GB/s (default "
                           f"{DEFAULT_LINK_GBPS:g}: NVLink 4 on H100/H200 SXM, 900 GB/s both ways)")
    plan.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                      help=f"attention TFLOP/s assumed per GPU (default {DEFAULT_TFLOPS:g})")
    plan.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                      help="causal attention (default) or full")
    plan.add_argument("--replicate-weights", action="store_true",
                      help="a full copy of the weights on every GPU (pure context parallelism); "
                           "by default they are sharded over the GPUs")
    plan.add_argument("--reserve-gib", type=float, default=2.0,
                      help="memory set aside per GPU for the CUDA context, allocator slack and "
                           "communication buffers (default 2 GiB)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    return plan


def _option(option: str, parse, text):
    """parse(text), with a planner error reported against the command-line option."""
    try:
        return parse(text)
    except PlanError as e:
        raise UserError(f"{option}: {e}") from None


def _check_count(option: str, value: int, hi: int) -> None:
    if not 1 <= value <= hi:
        raise UserError(f"{option} must be from 1 to {hi:,}, got {short_repr(value)}")


def _check_number(option: str, value: float, lo: float, hi: float, unit: str = "") -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UserError(f"{option} must be a number from {format_number(lo)} to "
                        f"{format_number(hi)}{unit}, got {value:g}")


def run(args) -> int:
    model = resolve_model(args.model)
    context = _option("--context", parse_tokens, args.context)
    gpu = _option("--gpu", parse_gpu, args.gpu)
    if args.gpus is not None:
        _check_count("--gpus", args.gpus, MAX_GPUS)
    _check_count("--batch", args.batch, MAX_BATCH)
    _check_number("--link-gbps", args.link_gbps, *RATE_RANGE, " GB/s")
    _check_number("--tflops", args.tflops, *RATE_RANGE, " TFLOP/s")
    _check_number("--reserve-gib", args.reserve_gib, 0, MAX_GIB, " GiB")
    plan = make_plan(model, context, gpus=args.gpus, gpu=gpu, batch=args.batch,
                     kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype, causal=args.causal,
                     replicate_weights=args.replicate_weights, link_gbps=args.link_gbps,
                     tflops=args.tflops, reserve=int(args.reserve_gib * (1 << 30)))
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    if not plan.fits:
        fewest = (f"the fewest that fit: {plan.min_gpus}" if plan.min_gpus is not None
                  else "no number of GPUs fits")
        raise UserError(f"{plan.model} at {plan.context:,} tokens does not fit on {plan.gpus} x "
                        f"{plan.gpu}: {format_bytes(plan.memory.total)} per GPU against "
                        f"{format_bytes(plan.memory.capacity)} ({fewest})", code=1)
    return 0

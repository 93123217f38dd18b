"""The `longctx` command (also `python -m longctx`): argument parsing and dispatch.

  longctx info   the build, the GPUs found and the kernel families available on them
  longctx plan   KV-cache, memory, FLOPs and ring-traffic plan for a model at a context length
  longctx bench  benchmark longctx against its peers (GPU suites, or a CPU fallback)

Errors the user can fix (an unknown preset, a malformed config.json, a plan that cannot be made
or does not fit) print one line, "longctx <command>: error: ...", and exit non-zero: 2 for bad
arguments, 1 for a plan that does not fit or a failed benchmark. Set LONGCTX_DEBUG=1 to get the
traceback of an unexpected failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["main", "build_parser"]


class UserError(Exception):
    """A one-line error for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    from .plan import DEFAULT_LINK_GBPS, DEFAULT_TFLOPS, KV_DTYPES, WEIGHT_DTYPES

    parser = argparse.ArgumentParser(
        prog="longctx", description="longctx: long-context attention kernels for Hopper GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="{info,plan,bench}")
    sub.required = True

    info = sub.add_parser("info", help="the build, the GPUs found and the features on them")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    plan = sub.add_parser(
        "plan", help="memory, FLOPs and ring-traffic plan for a model at a context length",
        description="Capacity plan for long-context inference with ring attention. Units: "
                    "GB = 1e9 B, GiB = 2^30 B; token suffixes are binary (128K = 131072).")
    plan.add_argument("--model", required=True,
                      help="a preset (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, ...; an unknown "
                           "name lists them) or the path of a HuggingFace config.json")
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

    bench = sub.add_parser("bench", help="benchmark longctx against its peers")
    bench.add_argument("--quick", action="store_true", help="few, small cases (seconds)")
    bench.add_argument("--out", default="bench/results",
                       help="results folder: <out>/<gpu>/<name>.json, .md, .png "
                            "(default bench/results)")
    bench.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    bench.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _cmd_info(args) -> int:
    from .cli_info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def _cmd_plan(args) -> int:
    from .cli_plan import format_plan
    from .models import resolve_model
    from .plan import make_plan, parse_gpu, parse_tokens

    model = resolve_model(args.model)
    context = parse_tokens(args.context)
    if args.gpus is not None and args.gpus <= 0:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    if args.batch <= 0:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if not args.reserve_gib >= 0:
        raise UserError(f"--reserve-gib must not be negative, got {args.reserve_gib:g}")
    plan = make_plan(model, context, gpus=args.gpus, gpu=parse_gpu(args.gpu), batch=args.batch,
                     kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype, causal=args.causal,
                     replicate_weights=args.replicate_weights, link_gbps=args.link_gbps,
                     tflops=args.tflops, reserve=int(args.reserve_gib * (1 << 30)))
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    if not plan.fits:
        from .plan import format_bytes

        fewest = (f"the fewest that fit: {plan.min_gpus}" if plan.min_gpus is not None
                  else "no number of GPUs fits")
        raise UserError(f"{plan.model} at {plan.context:,} tokens does not fit on {plan.gpus} x "
                        f"{plan.gpu}: {format_bytes(plan.memory.total)} per GPU against "
                        f"{format_bytes(plan.memory.capacity)} ({fewest})", code=1)
    return 0


def _cmd_bench(args) -> int:
    from .cli_bench import run_bench

    return run_bench(quick=args.quick, out_dir=Path(args.out), plot=not args.no_plot,
                     as_json=args.json, show_progress=not args.no_progress)


def main(argv: Optional[List[str]] = None) -> int:
    from .models import ModelConfigError
    from .plan import PlanDoesNotFit, PlanError

    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"info": _cmd_info, "plan": _cmd_plan, "bench": _cmd_bench}[args.command]
    try:
        return command(args)
    except UserError as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except PlanDoesNotFit as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (PlanError, ModelConfigError) as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longctx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless debugging
        if os.environ.get("LONGCTX_DEBUG"):
            raise
        print(f"longctx {args.command}: internal error: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''} (LONGCTX_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Development probe of the paged decode (issue 5): per-call time from a CUDA graph (as
bench/kvcache.py times it), the kernels' own durations from the torch profiler, a split-count
sweep and environment A/B switches, for one shape. Not a benchmark of record: committed numbers
come from bench/kvcache.py.

    python scripts/decode_profile.py [--formats int8,fp8] [--batch 1] [--ctx 131072]
        [--splits 32,33,66] [--env NAME=VAL[,NAME=VAL...]] ...
"""
import argparse
import os
import statistics

import torch

from longctx.bench.ceilings import copy_bandwidth_gbps
from longctx.bench.kvcache_suite import FORMATS, _decode_inputs, _graph_time, decode_bytes
from longctx.kvcache import flash_attn_with_kvcache


def kernel_durations(fn, reps=20):
    """Mean device microseconds per kernel name over `reps` graph-free calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                    key=lambda e: e.time_range.start)
    for e in events:
        out.setdefault(e.name[:60], []).append(e.time_range.end - e.time_range.start)
    gaps = [b.time_range.start - a.time_range.end for a, b in zip(events, events[1:])]
    return {k: (statistics.mean(v), len(v)) for k, v in out.items()}, gaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", default="131072", help="comma-separated contexts")
    ap.add_argument("--splits", default="")
    ap.add_argument("--env", action="append", default=[])
    args = ap.parse_args()
    copy = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy:.0f} GB/s")
    for ctx in [int(c) for c in args.ctx.split(",")]:
        for fmt in args.formats.split(","):
            probe(args, fmt, ctx, copy)
            torch.cuda.empty_cache()


def probe(args, fmt, ctx, copy):
    q, kc, vc, ks, vs, table, seqlens, _ = _decode_inputs(fmt, FORMATS[fmt], args.batch, ctx)
    nbytes = decode_bytes(kc, ks, table)

    def call(splits=0):
        return flash_attn_with_kvcache(q, kc, vc, seqlens, table, k_scale=ks, v_scale=vs,
                                       validate=False, num_splits=splits)

    def report(label, ms):
        print(f"{fmt} ctx {ctx} b{args.batch} {label:28s} {ms * 1e3:8.2f} us  "
              f"x copy {nbytes / (ms * 1e-3) / 1e9 / copy:.3f}", flush=True)

    ref = call().float()
    report("default", _graph_time(call))
    kd, gaps = kernel_durations(call)
    for name, (us, n) in kd.items():
        print(f"    kernel {name:60s} {us:8.2f} us x{n}")
    print(f"    gaps between kernels: median {statistics.median(gaps):.2f} us")
    for sp in [int(s) for s in args.splits.split(",") if s]:
        report(f"splits={sp}", _graph_time(lambda: call(sp)))
    for spec in args.env:
        pairs = [kv.split("=", 1) for kv in spec.split(",")]
        for k, v in pairs:
            os.environ[k] = v
        try:
            err = (call().float() - ref).abs().max().item()
            report(spec + f" (diff {err:.1e})", _graph_time(call))
            kd, gaps = kernel_durations(call)
            for name, (us, n) in kd.items():
                print(f"    kernel {name:60s} {us:8.2f} us x{n}")
        finally:
            for k, _ in pairs:
                os.environ.pop(k, None)


if __name__ == "__main__":
    main()

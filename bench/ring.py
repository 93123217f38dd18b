"""bench/ring: ring attention across the GPUs of one host (zigzag vs contiguous), causal, hdim 128,
forward and forward+backward, 32K..256K tokens per GPU. Writes bench/results/<gpu>/ring.{json,md}.

    torchrun --nproc-per-node 2 bench/ring.py [--tokens 32768,65536,131072,262144] [--quick]

Parallel efficiency = (one GPU's time for its share) / (ring time), where one GPU's share is
1/N of longctx.flash_attn_func over the whole sequence on a single GPU (measured on rank 0 with
the same kernels; for the largest sizes use --single-max to bound it, rows above it get no
efficiency). Ring times: every call between CUDA events on each rank, the per-call maximum
over ranks (all_reduce MAX), then the median. NVTX ranges "ring step {i} compute/exchange/wait"
come from the library; run under `nsys profile -t cuda,nvtx` to see the overlap.
FLOPs (docs/design.md): fwd 4*b*h*pairs*d, pairs = S(S+1)/2 causal; bwd 2.5x fwd.
Overlap (--trace TOKENS): one zigzag fwd+bwd at TOKENS per GPU under torch.profiler on every
rank; rank 0 writes the kernel timeline (ring_trace.json.gz, chrome://tracing or Perfetto) and
both ranks measure, from the kernel intervals, how much of the NCCL kernels' time overlaps
compute kernels on the other stream ("hidden") and how long only communication ran ("exposed").
--torch-comm also times zigzag with LONGCTX_RING_COMM=torch: the same ring with the exchange over
torch.distributed P2P on the NCCL process group instead of longctx's C++ communicator.
Peer: ring-flash-attention's zigzag_ring_flash_attn_func on the same zigzag shards, when the
ring_flash_attn package (and flash_attn) is installed. Each 256K-per-GPU case takes seconds per
call: on a machine with a per-command time limit run the sizes separately (--tokens 262144).
"""
import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import longctx
from longctx.bench import Results, copy_bandwidth_gbps, matmul_tflops, nvtx_range
from longctx.ring import ring_shard

COLUMNS = [("mode", "case.mode"), ("layout", "layout"), ("tokens/GPU", "case.seqlen"),
           ("GPUs", "gpus"), ("ring ms", "ours_ms"), ("1-GPU share ms", "share_ms"),
           ("efficiency", "efficiency"), ("TFLOP/s per GPU", "tflops"),
           ("same ring, torch.distributed P2P ms", "peers.torch_dist_comm"),
           ("ring-flash-attn zigzag ms", "peers.ring_flash_attn_zigzag")]


def _time_ring(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        dist.barrier()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    t = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def _time_single(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _intervals_union(iv):
    out = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _overlap(a, b, union):
    """Length of [a, b] covered by the sorted disjoint intervals `union`."""
    total = 0.0
    for u0, u1 in union:
        if u1 <= a:
            continue
        if u0 >= b:
            break
        total += min(b, u1) - max(a, u0)
    return total


def _trace_overlap(fn, path):
    """Runs fn under torch.profiler; kernel-level overlap of NCCL kernels with compute kernels.

    Returns {nccl_ms, hidden_ms, exposed_ms, hidden_fraction, span_ms, kernels}. `path`: where to
    write the chrome trace (None: do not write)."""
    import gzip
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler import record_function
    fn()  # warm (communicator, allocator)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        # the ranks start the profiler at different times: line them up first, so that an
        # NCCL kernel waiting for a peer that is still starting its profiler is not counted
        dist.barrier()
        torch.cuda.synchronize()
        with record_function("ring traced call"):
            fn()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        prof.export_chrome_trace(tmp.name)
        with open(tmp.name) as f:
            trace = json.load(f)
        if path is not None:
            with gzip.open(path, "wt") as g:
                json.dump(trace, g)
    events = trace.get("traceEvents", [])
    marks = [e["ts"] for e in events if e.get("name") == "ring traced call" and "ts" in e]
    t0 = min(marks) if marks else float("-inf")
    kernels = [e for e in events if e.get("cat") == "kernel" and e["ts"] >= t0]
    # the ring's exchanges (SendRecv); the argument check's small all-gather is not an exchange
    nccl = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if "sendrecv" in e["name"].lower()]
    comp = _intervals_union([(e["ts"], e["ts"] + e["dur"]) for e in kernels
                             if "nccl" not in e["name"].lower()])
    # exposed per exchange, in order: the last one (dK/dV home) has nothing left to hide behind
    per_exchange = [round((b - a) / 1e3, 3) for a, b in nccl]
    nccl_us = sum(b - a for a, b in nccl)
    hidden_us = sum(_overlap(a, b, comp) for a, b in nccl)
    # exposed: time where an NCCL kernel runs and no compute kernel does
    nccl_union = _intervals_union(nccl)
    exposed_us = sum((b - a) - _overlap(a, b, comp) for a, b in nccl_union)
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
            if kernels else 0.0)
    return {"nccl_ms": nccl_us / 1e3, "hidden_ms": hidden_us / 1e3,
            "exposed_ms": exposed_us / 1e3, "span_ms": span / 1e3,
            "hidden_fraction": hidden_us / nccl_us if nccl_us else None,
            "nccl_kernels": len(nccl), "kernels": len(kernels),
            "exchange_ms_rank": per_exchange}


def _peer():
    """ring-flash-attention's zigzag ring (zhuzilin/ring-flash-attention) when installed."""
    try:
        from ring_flash_attn import zigzag_ring_flash_attn_func
    except Exception:
        return None
    return zigzag_ring_flash_attn_func


def _fwd_flops(b, h, S, d, causal):
    pairs = S * (S + 1) // 2 if causal else S * S
    return 4 * b * h * pairs * d


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32768,65536,131072,262144", help="tokens per GPU")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--heads-kv", type=int, default=16)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layouts", default="zigzag,contiguous")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--single-max", type=int, default=524288,
                    help="longest full sequence timed on one GPU for the efficiency")
    ap.add_argument("--quick", action="store_true", help="32K tokens per GPU, few reps")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions (0: by size)")
    ap.add_argument("--torch-comm", action="store_true",
                    help="also time zigzag with the exchange over torch.distributed P2P")
    ap.add_argument("--trace", type=int, default=0,
                    help="tokens per GPU of one profiled zigzag fwd+bwd (kernel overlap + trace)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/ring: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    if "RANK" not in os.environ:
        print("bench/ring: run under torchrun --nproc-per-node N", file=sys.stderr)
        return 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300),
                            device_id=torch.device("cuda", local_rank))
    rank, n = dist.get_rank(), dist.get_world_size()
    tokens = [32768] if args.quick else [int(t) for t in args.tokens.split(",")]
    peer = _peer()
    dt, dev = torch.bfloat16, torch.device("cuda")
    b, h, hk, d = args.batch, args.heads, args.heads_kv, args.hdim

    res = None
    if rank == 0:
        res = Results("ring", copy_gbps=copy_bandwidth_gbps(), matmul_tflops=matmul_tflops(),
                      extra={"gpus": n})
    for s_local in tokens:
        S = s_local * n
        # the largest cases take seconds per call: fewer repetitions
        reps, warmup = (3, 1) if args.quick else ((10, 3) if s_local <= 65536 else (5, 2))
        if args.reps:
            reps, warmup = args.reps, 1
        torch.manual_seed(0)
        full = [torch.randn(b, S, hh, d, device=dev, dtype=dt) for hh in (h, hk, hk)]
        dout_full = torch.randn(b, S, h, d, device=dev, dtype=dt)
        share = {}
        if rank == 0 and S <= args.single_max:  # one GPU over the whole sequence, then / n
            q, k, v = (t.clone().requires_grad_() for t in full)

            def single_fwd():
                return longctx.flash_attn_func(q, k, v, causal=True)

            def single_fwd_bwd(g=dout_full):
                torch.autograd.grad(longctx.flash_attn_func(q, k, v, causal=True), (q, k, v), g)
            with nvtx_range(f"single {S}"):
                share["fwd"] = _time_single(single_fwd, reps, warmup) / n
                share["fwd_bwd"] = _time_single(single_fwd_bwd, reps, warmup) / n
            del q, k, v
        dist.barrier()  # the other ranks wait here while rank 0 times the single GPU
        for layout in args.layouts.split(","):
            q, k, v = (ring_shard(t, rank, n, layout).contiguous().requires_grad_()
                       for t in full)
            dout = ring_shard(dout_full, rank, n, layout).contiguous()

            def ring_fwd():
                return longctx.ring_flash_attn_func(q, k, v, causal=True, layout=layout)

            def ring_fwd_bwd():
                torch.autograd.grad(ring_fwd(), (q, k, v), dout)
            for mode, fn in (("fwd", ring_fwd), ("fwd_bwd", ring_fwd_bwd)):
                if mode not in args.modes.split(","):
                    continue
                with nvtx_range(f"ring {mode} {layout} {s_local}"):
                    ms = _time_ring(fn, reps, warmup)
                peers = {}
                if peer is not None and layout == "zigzag":  # same shards, same process
                    def peer_fwd():
                        return peer(q, k, v, causal=True)

                    def peer_fn():
                        if mode == "fwd":
                            return peer_fwd()
                        torch.autograd.grad(peer_fwd(), (q, k, v), dout)
                    with nvtx_range(f"ring-flash-attn {mode} {s_local}"):
                        peers["ring_flash_attn_zigzag"] = _time_ring(peer_fn, reps, warmup)
                if args.torch_comm and layout == "zigzag":
                    # the same ring over torch.distributed P2P (batch_isend_irecv on the NCCL
                    # process group) instead of longctx's C++ communicator
                    os.environ["LONGCTX_RING_COMM"] = "torch"
                    try:
                        with nvtx_range(f"ring torch-comm {mode} {s_local}"):
                            peers["torch_dist_comm"] = _time_ring(fn, reps, warmup)
                    finally:
                        os.environ.pop("LONGCTX_RING_COMM", None)
                if rank == 0:
                    flops = _fwd_flops(b, h, S, d, True) * (3.5 if mode == "fwd_bwd" else 1.0)
                    row = {"case": {"hdim": d, "seqlen": s_local, "total_seqlen": S,
                                    "causal": True, "window": None, "dtype": "bf16",
                                    "heads": h, "heads_kv": hk, "batch": b, "mode": mode},
                           "ours_ms": ms, "peers": peers, "gpus": n, "layout": layout,
                           "share_ms": share.get(mode),
                           "efficiency": share[mode] / ms if mode in share else None,
                           "tflops": flops / n / (ms * 1e-3) / 1e12}
                    res.add(row)
                    print(f"{mode:8s} {layout:10s} {s_local:7d}/GPU  ring {ms:9.2f} ms  "
                          f"eff {row['efficiency'] if row['efficiency'] else float('nan'):.2f}",
                          flush=True)
            del q, k, v, dout
        del full, dout_full
        torch.cuda.empty_cache()
    if args.trace:
        S = args.trace * n
        torch.manual_seed(0)
        full = [torch.randn(b, S, hh, d, device=dev, dtype=dt) for hh in (h, hk, hk)]
        q, k, v = (ring_shard(t, rank, n, "zigzag").contiguous().requires_grad_() for t in full)
        dout = torch.randn_like(q)

        def traced():
            out = longctx.ring_flash_attn_func(q, k, v, causal=True, layout="zigzag")
            torch.autograd.grad(out, (q, k, v), dout)
        path = None
        if rank == 0:
            gpu_dir = Path(args.out) / res.meta["gpu"]
            gpu_dir.mkdir(parents=True, exist_ok=True)
            path = str(gpu_dir / "ring_trace.json.gz")
        ov = _trace_overlap(traced, path)
        t = torch.tensor([ov["exposed_ms"], ov["nccl_ms"], ov["hidden_ms"], ov["span_ms"]],
                         device=dev, dtype=torch.float64)
        all_t = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(all_t, t)
        if rank == 0:
            per_rank = [dict(zip(("exposed_ms", "nccl_ms", "hidden_ms", "span_ms"), x.tolist()))
                        for x in all_t]
            res.meta["overlap"] = {"tokens_per_gpu": args.trace, "layout": "zigzag",
                                    "mode": "fwd_bwd", "per_rank": per_rank,
                                    "kernels_rank0": ov["kernels"],
                                    "nccl_kernels_rank0": ov["nccl_kernels"],
                                    "exchange_kernel_ms_rank0": ov["exchange_ms_rank"]}
            for r, x in enumerate(per_rank):
                frac = x["hidden_ms"] / x["nccl_ms"] if x["nccl_ms"] else float("nan")
                print(f"overlap rank {r}: NCCL kernels {x['nccl_ms']:.2f} ms, hidden behind "
                      f"compute {frac:.1%}, exposed {x['exposed_ms']:.3f} ms of "
                      f"{x['span_ms']:.1f} ms", flush=True)
        del q, k, v, dout, full
    if rank == 0:
        path = res.write(args.out, COLUMNS)
        print(res.markdown(COLUMNS))
        if "overlap" in res.meta:
            print("overlap:", res.meta["overlap"])
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

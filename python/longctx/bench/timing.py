"""Timing: the median of many individually event-timed calls, after warm-up.

CUDA work is timed with CUDA events on the current stream (never a host clock around async
work). `fn` may take an argument: with `inputs`, each call gets the next input set in turn, so
inputs larger together than L2 are not measured from the cache.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence


def _caller(fn: Callable, inputs: Optional[Sequence[Any]]):
    if not inputs:
        return lambda i: fn()
    return lambda i: fn(inputs[i % len(inputs)])


def time_cuda(fn: Callable, *, inputs: Optional[Sequence[Any]] = None, warmup: int = 10,
              reps: int = 50, min_time_ms: float = 200.0) -> float:
    """Median milliseconds of one call of fn on the GPU.

    Runs `warmup` calls (module load, autotuning and compilation stay out), estimates one call's
    time, then enqueues max(reps, min_time_ms worth) calls back to back, each between its own
    pair of events, and synchronizes once at the end. Back to back, the host's launch overhead
    overlaps the previous call's GPU work, so the events time the GPU (as triton's do_bench does).
    """
    import torch

    call = _caller(fn, inputs)
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)
    n = max(reps, min(int(min_time_ms / est_ms), 20 * reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        call(i)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cpu(fn: Callable, *, inputs: Optional[Sequence[Any]] = None, warmup: int = 2,
             reps: int = 7) -> float:
    """Median milliseconds of one call of fn on the CPU."""
    call = _caller(fn, inputs)
    for i in range(warmup):
        call(i)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

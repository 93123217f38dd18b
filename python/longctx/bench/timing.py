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

    Runs `warmup` calls (module load, autotuning and compilation stay out), then at least `reps`
    timed calls and as many more as fit in min_time_ms, each between its own pair of events.
    """
    import torch

    call = _caller(fn, inputs)
    for i in range(warmup):
        call(i)
    torch.cuda.synchronize()
    times = []
    start_all = time.perf_counter()
    i = 0
    while i < reps or ((time.perf_counter() - start_all) * 1e3 < min_time_ms and i < 20 * reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        i += 1
    return statistics.median(times)


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

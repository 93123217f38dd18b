"""The benchmark harness shared by every bench/ script and by `longctx bench`.

- timing: CUDA-event medians after warm-up (CPU: perf_counter medians), rotating input sets
- nvtx: ranges in the "longctx" NVTX domain around each case
- ceilings: the copy bandwidth and matrix rate of this GPU, measured in the same run
- results: bench/results/<gpu>/<name>.json plus a markdown table (format in shared/DESIGN.md)
"""
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .nvtx import nvtx_range
from .results import Results, gpu_short_name
from .timing import time_cpu, time_cuda

__all__ = [
    "copy_bandwidth_gbps",
    "matmul_tflops",
    "nvtx_range",
    "Results",
    "gpu_short_name",
    "time_cpu",
    "time_cuda",
]

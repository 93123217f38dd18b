"""The benchmark harness shared by every bench/ script and by `longctx bench`.

- timing: CUDA-event medians after warm-up (CPU: perf_counter medians), rotating input sets
- nvtx_range: ranges in the "longctx" NVTX domain around each case (from longctx._common)
- ceilings: the copy bandwidth and matrix rate of this GPU, measured in the same run
- results: bench/results/<gpu>/<name>.json plus a markdown table (format in docs/design.md)
- script: bench_main, the command line of the bench/<name>.py scripts
- suites: the GPU suites `longctx bench` runs (rope_suite, attn_fwd_suite, attn_bwd_suite,
  kvcache_suite)
"""
from .._common import nvtx_range
from .ceilings import copy_bandwidth_gbps, matmul_tflops
from .results import Results, gpu_short_name
from .script import bench_main
from .timing import time_cpu, time_cuda

__all__ = [
    "bench_main",
    "copy_bandwidth_gbps",
    "matmul_tflops",
    "nvtx_range",
    "Results",
    "gpu_short_name",
    "time_cpu",
    "time_cuda",
]

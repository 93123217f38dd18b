"""bench/kvcache: paged KV-cache decode (bf16 / fp8 / int8 caches) vs SDPA cuDNN and flash on a
contiguous bf16 cache, chunked prefill vs the forward kernel, and the quantized formats' output
error, in one run (the suite lives in longctx.bench.kvcache_suite).
Writes bench/results/<gpu>/kvcache.{json,md}.

    python bench/kvcache.py [--quick] [--no-prefill] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("kvcache", __doc__, Path(__file__).resolve().parent / "results"))

"""bench/kvcache: paged KV-cache decode (window, head dims), chunked prefill, mixed batches.
Decode (bf16 / fp8 / int8 caches) vs SDPA cuDNN and flash on a contiguous bf16 cache, chunked
prefill vs the forward kernel (and its extra device memory), one mixed decode + prefill call vs
separate calls, and the quantized formats' output error, in one run (the suite lives in
longctx.bench.kvcache_suite). Writes bench/results/<gpu>/kvcache.{json,md}.

    python bench/kvcache.py [--quick] [--groups error,decode,window,hdim,prefill,mixed]
                            [--only SUBSTRINGS] [--merge] [--no-prefill] [--out bench/results]
    python -m longctx.bench.kvcache_suite [--quick] [--groups ...] [--only ...]  # lists the cases
"""
import sys
from pathlib import Path

from longctx.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("kvcache", __doc__, Path(__file__).resolve().parent / "results"))

"""bench/kvcache: paged KV-cache decode (bf16 / fp8 / int8 caches) vs SDPA cuDNN and flash on a
contiguous bf16 cache, chunked prefill vs the forward kernel, and the quantized formats' output
error, in one run (the suite lives in longctx.bench.kvcache_suite).
Writes bench/results/<gpu>/kvcache.{json,md}.

    python bench/kvcache.py [--quick] [--no-prefill] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main
from longctx.bench.kvcache_suite import COLUMNS, markdown, run_kvcache


def _arguments(ap):
    ap.add_argument("--no-prefill", action="store_true",
                    help="decode rows only (development runs of the decode kernels)")


def main(argv=None):
    return bench_main(
        "kvcache", __doc__,
        lambda args, progress: run_kvcache(args.quick, progress=progress,
                                           prefill=not args.no_prefill),
        COLUMNS, default_out=Path(__file__).resolve().parent / "results",
        add_arguments=_arguments, markdown=markdown, argv=argv)


if __name__ == "__main__":
    sys.exit(main())

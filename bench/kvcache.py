"""bench/kvcache: paged KV-cache decode (bf16 / fp8 / int8 caches) vs SDPA cuDNN and flash on a
contiguous bf16 cache, chunked prefill vs the forward kernel, and the quantized formats' output
error, in one run (the suite lives in longctx.bench.kvcache_suite).
Writes bench/results/<gpu>/kvcache.{json,md}.

    python bench/kvcache.py [--quick] [--no-prefill] [--out bench/results]
"""
import argparse
import sys
from pathlib import Path

import torch

from longctx.bench.kvcache_suite import COLUMNS, markdown, run_kvcache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-prefill", action="store_true",
                    help="decode rows only (development runs of the decode kernels)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kvcache: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    res = run_kvcache(args.quick, progress=lambda label: print(label, flush=True),
                      prefill=not args.no_prefill)
    path = res.write(args.out, COLUMNS)
    md = markdown(res)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/attn_fwd: flash attention forward vs SDPA (cuDNN, flash) and FlexAttention on a grid of
head dims, lengths and masks, in one run (the suite lives in longctx.bench.attn_fwd_suite).
Writes bench/results/<gpu>/attn_fwd.{json,md}.

    python bench/attn_fwd.py [--quick] [--no-flex] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("attn_fwd", __doc__, Path(__file__).resolve().parent / "results"))

"""bench/attn_bwd: flash attention backward (alone and forward+backward) vs SDPA (cuDNN, flash) and
FlexAttention on the forward's grid, in one run, plus the cost of deterministic=True (the suite
lives in longctx.bench.attn_bwd_suite). Writes bench/results/<gpu>/attn_bwd.{json,md}.

    python bench/attn_bwd.py [--quick] [--no-flex] [--only "d=128 s=16384"] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("attn_bwd", __doc__, Path(__file__).resolve().parent / "results"))

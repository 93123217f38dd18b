"""bench/rope: in-place fused RoPE on q and k vs eager and torch.compile'd PyTorch RoPE and the
device-to-device copy bandwidth, in one run (the suite lives in longctx.bench.rope_suite).
Writes bench/results/<gpu>/rope.{json,md}.

    python bench/rope.py [--tokens 32768] [--quick] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("rope", __doc__, Path(__file__).resolve().parent / "results"))

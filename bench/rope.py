"""bench/rope: in-place fused RoPE on q and k vs eager and torch.compile'd PyTorch RoPE and the
device-to-device copy bandwidth, in one run (the suite lives in longctx.bench.rope_suite).
Writes bench/results/<gpu>/rope.{json,md}.

    python bench/rope.py [--tokens 32768] [--quick] [--out bench/results]
"""
import argparse
import sys
from pathlib import Path

import torch

from longctx.bench.rope_suite import COLUMNS, run_rope


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/rope: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    res = run_rope(args.quick, args.tokens, args.heads, args.heads_kv, args.hdim,
                   progress=lambda label: print(label, flush=True))
    path = res.write(args.out, COLUMNS)
    print(res.markdown(COLUMNS))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

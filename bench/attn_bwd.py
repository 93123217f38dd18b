"""bench/attn_bwd: flash attention backward (alone and forward+backward) vs SDPA (cuDNN, flash) and
FlexAttention on the forward's grid, in one run, plus the cost of deterministic=True (the suite
lives in longctx.bench.attn_bwd_suite). Writes bench/results/<gpu>/attn_bwd.{json,md}.

    python bench/attn_bwd.py [--quick] [--no-flex] [--only "d=128 s=16384"] [--out bench/results]
"""
import argparse
import sys
from pathlib import Path

import torch

from longctx.bench.attn_bwd_suite import COLUMNS, run_attn_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles per shape)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of case tags to run (development runs)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attn_bwd: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    res = run_attn_bwd(args.quick, progress=lambda label: print(label, flush=True),
                       with_flex=not args.no_flex,
                       checkpoint=lambda r: r.write(args.out, COLUMNS),
                       only=[o for o in args.only.split(",") if o])
    path = res.write(args.out, COLUMNS)
    print(res.markdown(COLUMNS))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

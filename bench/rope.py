"""bench/rope: in-place fused RoPE on q and k vs eager and torch.compile'd PyTorch RoPE and the
device-to-device copy bandwidth, in one run (the suite lives in longctx.bench.rope_suite).
Writes bench/results/<gpu>/rope.{json,md}.

    python bench/rope.py [--tokens 32768] [--quick] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main
from longctx.bench.rope_suite import COLUMNS, run_rope


def _arguments(ap):
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)


def main(argv=None):
    return bench_main(
        "rope", __doc__,
        lambda args, progress: run_rope(args.quick, args.tokens, args.heads, args.heads_kv,
                                        args.hdim, progress=progress),
        COLUMNS, default_out=Path(__file__).resolve().parent / "results",
        add_arguments=_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())

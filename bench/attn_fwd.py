"""bench/attn_fwd: flash attention forward vs SDPA (cuDNN, flash) and FlexAttention on the issue's
grid, in one run (the suite lives in longctx.bench.attn_fwd_suite).
Writes bench/results/<gpu>/attn_fwd.{json,md}.

    python bench/attn_fwd.py [--quick] [--no-flex] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main
from longctx.bench.attn_fwd_suite import COLUMNS, run_attn_fwd


def _arguments(ap):
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (compiles per shape)")


def main(argv=None):
    return bench_main(
        "attn_fwd", __doc__,
        lambda args, progress: run_attn_fwd(args.quick, progress=progress,
                                            with_flex=not args.no_flex),
        COLUMNS, default_out=Path(__file__).resolve().parent / "results",
        add_arguments=_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())

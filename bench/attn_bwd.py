"""bench/attn_bwd: flash attention backward (alone and forward+backward) vs SDPA (cuDNN, flash) and
FlexAttention on the forward's grid, in one run, plus the cost of deterministic=True (the suite
lives in longctx.bench.attn_bwd_suite). Writes bench/results/<gpu>/attn_bwd.{json,md}.

    python bench/attn_bwd.py [--quick] [--no-flex] [--only "d=128 s=16384"] [--out bench/results]
"""
import sys
from pathlib import Path

from longctx.bench import bench_main
from longctx.bench.attn_bwd_suite import COLUMNS, run_attn_bwd


def _arguments(ap):
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (compiles per shape)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of case tags to run (development runs)")


def _run(args, progress):
    # every finished case is written at once: partial results survive a kill
    return run_attn_bwd(args.quick, progress=progress, with_flex=not args.no_flex,
                        checkpoint=lambda r: r.write(args.out, COLUMNS),
                        only=[o for o in args.only.split(",") if o])


def main(argv=None):
    return bench_main("attn_bwd", __doc__, _run, COLUMNS,
                      default_out=Path(__file__).resolve().parent / "results",
                      add_arguments=_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())

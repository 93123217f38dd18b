"""The command line of the bench/<name>.py scripts: `--quick`, `--out`, the options of the suite
(longctx.bench.<name>_suite: add_arguments(parser), run_args(args, progress) -> Results,
COLUMNS, and optionally markdown(results)), a check for a CUDA GPU, then run the suite, write
<out>/<gpu>/<name>.json and .md and print the markdown table.

    # bench/rope.py
    sys.exit(bench_main("rope", __doc__, Path(__file__).resolve().parent / "results"))
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["bench_main"]


def _progress(label: str) -> None:
    print(label, flush=True)


def bench_main(name: str, doc: str, default_out: Path | str,
               argv: Optional[Sequence[str]] = None) -> int:
    """Runs the suite `name` with the options in argv; returns the exit status.

    doc: the script's docstring (its first line describes the command); default_out: the
    results folder when --out is not given."""
    import torch

    suite = importlib.import_module(f"{__package__}.{name}_suite")
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few, small cases")
    ap.add_argument("--out", default=str(default_out),
                    help="results folder: <out>/<gpu>/<name>.json and .md")
    suite.add_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench/{name}: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    res = suite.run_args(args, _progress)
    path = res.write(args.out, suite.COLUMNS)
    markdown = getattr(suite, "markdown", None)
    md = res.markdown(suite.COLUMNS) if markdown is None else markdown(res)
    if markdown is not None:
        path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path}")
    return 0

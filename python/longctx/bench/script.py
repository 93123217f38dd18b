"""The command line every bench/<name>.py script shares: `--quick`, `--out`, the script's own
options, a check for a CUDA GPU, then run the suite, write <out>/<gpu>/<name>.json and .md, and
print the markdown table.

    def main(argv=None):
        return bench_main("rope", __doc__, lambda args, progress: run_rope(args.quick, ...),
                          COLUMNS, default_out=Path(__file__).resolve().parent / "results",
                          add_arguments=lambda ap: ap.add_argument("--tokens", ...), argv=argv)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from .results import Results

__all__ = ["bench_main"]


def _progress(label: str) -> None:
    print(label, flush=True)


def bench_main(name: str, doc: str,
               run: Callable[[argparse.Namespace, Callable[[str], None]], Results],
               columns: Sequence[Tuple[str, str]], *, default_out: Path | str,
               add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               markdown: Optional[Callable[[Results], str]] = None,
               argv: Optional[Sequence[str]] = None) -> int:
    """Parses argv, runs run(args, progress) and writes its Results; returns the exit status.

    doc: the script's docstring (its first line describes the command). columns: the markdown
    table's (header, dotted key) columns; markdown(results), when given, writes the .md instead.
    """
    import torch

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few, small cases")
    ap.add_argument("--out", default=str(default_out),
                    help="results folder: <out>/<gpu>/<name>.json and .md")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench/{name}: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1
    res = run(args, _progress)
    path = res.write(args.out, columns)
    md = res.markdown(columns)
    if markdown is not None:
        md = markdown(res)
        path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path}")
    return 0

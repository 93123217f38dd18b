"""The `longctx` command (also `python -m longctx`): argument parsing and dispatch.

  longctx info   the build, the GPUs found and the kernel families available on them (info.py)
  longctx plan   KV-cache, memory, FLOPs and ring-traffic plan for a model at a context length
                 (plan.py; the arithmetic is longctx.planner)
  longctx bench  benchmark longctx against its peers: the GPU suites of longctx.bench, or the CPU
                 fallback of bench_cpu.py (bench.py)

Each command module defines add_parser(subparsers) (its options) and run(args) (exit status).

Errors the user can fix (an unknown preset, a malformed config.json, a plan that cannot be made
or does not fit) print one line, "longctx <command>: error: ...", and exit non-zero: 2 for bad
arguments, 1 for a plan that does not fit or a failed benchmark. Set LONGCTX_DEBUG=1 to get the
traceback of an unexpected failure.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


class UserError(Exception):
    """A one-line error for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    from . import bench, info, plan

    parser = argparse.ArgumentParser(
        prog="longctx", description="longctx: long-context attention kernels for Hopper GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="{info,plan,bench}")
    sub.required = True
    for command in (info, plan, bench):
        command.add_parser(sub).set_defaults(run=command.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..planner import ModelConfigError, PlanDoesNotFit, PlanError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except PlanDoesNotFit as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (PlanError, ModelConfigError) as e:
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longctx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless debugging
        if os.environ.get("LONGCTX_DEBUG"):
            raise
        print(f"longctx {args.command}: internal error: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''} (LONGCTX_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1

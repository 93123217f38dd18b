"""The `longctx` command (also `python -m longctx`): argument parsing and dispatch.

  longctx info   the build, the GPUs found and the kernel families available on them (info.py)
  longctx plan   KV-cache, memory, FLOPs and ring-traffic plan for a model at a context length
                 (plan.py; the arithmetic is longctx.planner)
  longctx bench  benchmark longctx against its peers: the GPU suites of longctx.bench, or the CPU
                 fallback of bench_cpu.py (bench.py)

Each command module defines add_parser(subparsers) (its options) and run(args) (exit status).

Errors the user can fix (an unknown preset, a malformed config.json, an option out of range, a
plan that cannot be made or does not fit) print one line, "longctx <command>: error: ...", and
exit non-zero: 2 for bad arguments (argparse's own errors included), 1 for a plan that does not fit
or a failed benchmark. Set LONGCTX_DEBUG=1 to get the traceback of an unexpected failure.

Nothing here imports torch before a command runs: the console script (_longctx_cli) answers
--help and --version from this parser without importing longctx's extension.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, NoReturn, Optional

__all__ = ["main", "build_parser", "parse_args", "UserError"]


class UserError(Exception):
    """A one-line error for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class OneLineParser(argparse.ArgumentParser):
    """argparse held to the command's error contract: one line, "<prog>: error: ..." and where
    to find the options (instead of argparse's usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def package_version() -> str:
    """longctx's __version__, read from the package this module belongs to."""
    package = sys.modules.get(__name__.rpartition(".")[0])
    return getattr(package, "__version__", None) or "unknown"


def build_parser() -> argparse.ArgumentParser:
    from . import bench, info, plan

    parser = OneLineParser(
        prog="longctx", description="longctx: long-context attention kernels for Hopper GPUs.",
        epilog="Errors print one line and exit 2 (bad input) or 1 (a plan that does not fit, a "
               "failed benchmark); LONGCTX_DEBUG=1 shows the traceback of an unexpected failure.")
    parser.add_argument("--version", action="version", version=f"longctx {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{info,plan,bench}")
    sub.required = True
    for command in (info, plan, bench):
        p = command.add_parser(sub)
        p.set_defaults(run=command.run, parser=p)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """parser.parse_args(argv), with unknown options reported by the command they were given to
    ("longctx plan: error: unrecognized arguments: ...")."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # the bare command: what it can do
        parser.print_help(sys.stderr)
        return 2
    return _run(parse_args(parser, argv))


def _run(args) -> int:
    from ..planner import ModelConfigError, PlanDoesNotFit, PlanError

    try:
        return args.run(args)
    except UserError as e:
        _error(args, e)
        return e.code
    except PlanDoesNotFit as e:
        _error(args, e)
        return 1
    except (PlanError, ModelConfigError) as e:
        _error(args, e)
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


def _error(args, e: Exception) -> None:
    print(f"longctx {args.command}: error: {e}", file=sys.stderr)

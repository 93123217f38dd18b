"""The GPU benchmark suites `longctx bench` runs: name -> fn(quick=bool, progress=callable)
returning longctx.bench.Results (contract in longctx/cli_bench.py)."""
from .rope_suite import run_rope

SUITES = {"rope": run_rope}

"""The GPU benchmark suites `longctx bench` runs: name -> fn(quick=bool, progress=callable)
returning longctx.bench.Results (contract in longctx/cli/bench.py). A suite is registered only
when its CUDA kernels are in this build (longctx.build_info())."""
from ..info import build_info
from .rope_suite import run_rope


def _compiled_for_cuda(family: str) -> bool:
    return any(k["family"] == family and k["device"] == "cuda" for k in build_info()["kernels"])


SUITES = {}
if _compiled_for_cuda("rope"):
    SUITES["rope"] = run_rope
if _compiled_for_cuda("flash_fwd"):
    from .attn_fwd_suite import run_attn_fwd

    SUITES["attn_fwd"] = run_attn_fwd
if _compiled_for_cuda("flash_bwd") and _compiled_for_cuda("flash_fwd"):
    from .attn_bwd_suite import run_attn_bwd

    SUITES["attn_bwd"] = run_attn_bwd
if _compiled_for_cuda("kvcache"):
    from .kvcache_suite import run_kvcache

    SUITES["kvcache"] = run_kvcache

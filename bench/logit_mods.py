"""bench/logit_mods: what attention sinks and logit softcapping cost the CUDA forward: the same
flash_attn_func call plain, with sinks, with softcap 30, beside cuDNN SDPA (plain), on the attn_fwd
grid's 16K shapes (bf16, batch 2, heads * hdim = 2048, head dims 64/128/256, causal and not).
The four calls alternate for 3 rounds; each figure is the median of the rounds' medians.
Writes bench/results/<gpu>/logit_mods.{json,md}.

    python bench/logit_mods.py [--out bench/results]
"""
import argparse
import statistics
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

import longctx
from longctx.bench.attn_cases import Case, fwd_flops, make_inputs, sdpa_runner, to_bhsd
from longctx.bench.results import Results
from longctx.bench.timing import time_cuda

SOFTCAP = 30.0
COLUMNS = [("hdim", "case.hdim"), ("causal", "case.causal"), ("plain ms", "ours_ms"),
           ("sinks ms", "variants_ms.sinks"), ("softcap ms", "variants_ms.softcap"),
           ("cuDNN ms", "peers.sdpa_cudnn"), ("sinks / plain", "cost.sinks"),
           ("softcap / plain", "cost.softcap"), ("plain TFLOP/s", "tflops")]


def case(d: int, causal: bool) -> Case:
    """The attn_fwd grid's 16K shape at head dim d (batch * seqlen = 32K, heads * hdim = 2048)."""
    return Case(hdim=d, seqlen=16384, causal=causal, window_left=-1, heads=2048 // d,
                heads_kv=2048 // d, batch=2)


def row(c: Case, ms: dict) -> dict:
    """The result row of a case from its median times (plain, sinks, softcap, cudnn)."""
    return {"case": {**c.as_row(), "softcap": SOFTCAP}, "ours_ms": ms["plain"],
            "peers": {"sdpa_cudnn": ms["cudnn"]},
            "variants_ms": {"sinks": ms["sinks"], "softcap": ms["softcap"]},
            "cost": {"sinks": ms["sinks"] / ms["plain"], "softcap": ms["softcap"] / ms["plain"]},
            "tflops": fwd_flops(c) / (ms["plain"] * 1e-3) / 1e12}


def measure(c: Case) -> dict:
    """The three calls and cuDNN, alternating, median of 3 rounds."""
    q, k, v, _ = make_inputs(c)
    sinks = torch.randn(c.heads, device="cuda", dtype=torch.float32)
    qt, kt, vt = to_bhsd(c, q, k, v)
    cudnn = sdpa_runner(SDPBackend.CUDNN_ATTENTION, c)
    fns = {
        "plain": lambda: longctx.flash_attn_func(q, k, v, causal=c.causal),
        "sinks": lambda: longctx.flash_attn_func(q, k, v, causal=c.causal, sinks=sinks),
        "softcap": lambda: longctx.flash_attn_func(q, k, v, causal=c.causal, softcap=SOFTCAP),
        "cudnn": lambda: cudnn(qt, kt, vt),
    }
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_cuda(f, warmup=3, reps=20, min_time_ms=100))
    return row(c, {n: statistics.median(t) for n, t in times.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    res = Results("logit_mods")
    for d in (64, 128, 256):
        for causal in (False, True):
            res.add(measure(case(d, causal)))
            print(res.rows[-1], flush=True)
    print(f"wrote {res.write(args.out, COLUMNS)}")


if __name__ == "__main__":
    main()

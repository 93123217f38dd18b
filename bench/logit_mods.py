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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import longctx
from longctx.bench.results import Results
from longctx.bench.timing import time_cuda

COLUMNS = [("hdim", "case.hdim"), ("causal", "case.causal"), ("plain ms", "ours_ms"),
           ("sinks ms", "variants_ms.sinks"), ("softcap ms", "variants_ms.softcap"),
           ("cuDNN ms", "peers.sdpa_cudnn"), ("sinks / plain", "cost.sinks"),
           ("softcap / plain", "cost.softcap"), ("plain TFLOP/s", "tflops")]


def _cudnn(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def measure(d: int, causal: bool) -> dict:
    """One row: the three calls and cuDNN, alternating, median of 3 rounds."""
    h, b, s = 2048 // d, 2, 16384
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(h, device="cuda", dtype=torch.float32)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    fns = {
        "plain": lambda: longctx.flash_attn_func(q, k, v, causal=causal),
        "sinks": lambda: longctx.flash_attn_func(q, k, v, causal=causal, sinks=sinks),
        "softcap": lambda: longctx.flash_attn_func(q, k, v, causal=causal, softcap=30.0),
        "cudnn": lambda: _cudnn(qt, kt, vt, causal),
    }
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_cuda(f, warmup=3, reps=20, min_time_ms=100))
    ms = {n: statistics.median(t) for n, t in times.items()}
    flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return {"case": {"hdim": d, "seqlen": s, "batch": b, "heads": h, "heads_kv": h,
                     "causal": causal, "dtype": "bf16", "softcap": 30.0},
            "ours_ms": ms["plain"], "peers": {"sdpa_cudnn": ms["cudnn"]},
            "variants_ms": {"sinks": ms["sinks"], "softcap": ms["softcap"]},
            "cost": {"sinks": ms["sinks"] / ms["plain"], "softcap": ms["softcap"] / ms["plain"]},
            "tflops": flops / (ms["plain"] * 1e-3) / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    res = Results("logit_mods")
    for d in (64, 128, 256):
        for causal in (False, True):
            res.add(measure(d, causal))
            print(res.rows[-1], flush=True)
    print(f"wrote {res.write(args.out, COLUMNS)}")


if __name__ == "__main__":
    main()

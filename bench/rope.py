"""bench/rope: in-place fused RoPE on q and k vs eager and torch.compile'd PyTorch RoPE.

Case of the issue: 32K tokens, 32 query heads and 8 KV heads of 128, bf16, NeoX layout, plus
interleaved, fp16 and a YaRN-scaled variant. Every implementation computes cos/sin from the
positions inside the timed region (as a model's forward does). Bandwidth counts the bytes of q
and k read once and written once; the copy bandwidth of this GPU is measured in the same run.
Writes bench/results/<gpu>/rope.{json,md}.

    python bench/rope.py [--tokens 32768] [--out bench/results]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import longctx
from longctx.bench import Results, copy_bandwidth_gbps, matmul_tflops, nvtx_range, time_cuda


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def torch_rope(q, k, positions, inv_freq, attention_factor, interleaved):
    """The HuggingFace formulation: fp32 angles, cos/sin times the attention factor."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_factor).to(q.dtype)[:, None, :]
    sin = (emb.sin() * attention_factor).to(q.dtype)[:, None, :]
    if interleaved:
        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        rot = rotate_half
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/rope: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 1

    copy = copy_bandwidth_gbps()
    res = Results("rope", copy_gbps=copy, matmul_tflops=matmul_tflops())
    compiled = torch.compile(torch_rope, fullgraph=True, dynamic=False)
    T, H, HK, D = args.tokens, args.heads, args.heads_kv, args.hdim
    cases = [
        ("bf16", False, None),
        ("bf16", True, None),
        ("fp16", False, None),
        ("bf16", False, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ]
    for dtype_name, interleaved, scaling in cases:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        inv_freq, factor = longctx.rope_frequencies(D, 500000.0, scaling, device="cuda")
        sets = []
        for _ in range(2):  # two input sets: 2 x 335 MB, far past L2
            q = torch.randn(T, H, D, device="cuda", dtype=dtype)
            k = torch.randn(T, HK, D, device="cuda", dtype=dtype)
            pos = torch.randint(0, 1 << 20, (T,), device="cuda", dtype=torch.int64)
            sets.append((q, k, pos))
        nbytes = 2 * (sets[0][0].numel() + sets[0][1].numel()) * sets[0][0].element_size()
        case = {"tokens": T, "heads": H, "heads_kv": HK, "hdim": D, "dtype": dtype_name,
                "layout": "interleaved" if interleaved else "neox",
                "scaling": (scaling or {}).get("rope_type", "default")}
        tag = f"rope {dtype_name} {case['layout']} {case['scaling']}"
        with nvtx_range(tag + " longctx"):
            ours = time_cuda(lambda s: longctx.apply_rope(s[0], s[1], s[2], inv_freq, factor,
                                                          interleaved=interleaved), inputs=sets)
        with nvtx_range(tag + " eager"):
            eager = time_cuda(lambda s: torch_rope(s[0], s[1], s[2], inv_freq, factor, interleaved),
                              inputs=sets)
        with nvtx_range(tag + " torch.compile"):
            comp = time_cuda(lambda s: compiled(s[0], s[1], s[2], inv_freq, factor, interleaved),
                             inputs=sets)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        with nvtx_range(tag + " copy"):
            copy_ms = time_cuda(lambda: dst.copy_(src))
        del src, dst, sets
        gbps = nbytes / (ours * 1e-3) / 1e9
        res.add({"case": case, "ours_ms": ours,
                 "peers": {"eager": eager, "torch_compile": comp, "copy_same_bytes": copy_ms},
                 "gbps": gbps,
                 "peer_gbps": {"eager": nbytes / (eager * 1e-3) / 1e9,
                               "torch_compile": nbytes / (comp * 1e-3) / 1e9},
                 "fraction_of_copy": gbps / copy,
                 "speedup_vs_compile": comp / ours})
        print(f"{tag:40s} ours {ours:.3f} ms ({gbps:.0f} GB/s, {gbps / copy:.1%} of copy) | "
              f"eager {eager:.3f} | compile {comp:.3f} | copy {copy_ms:.3f}", flush=True)
    path = res.write(args.out, [
        ("dtype", "case.dtype"), ("layout", "case.layout"), ("scaling", "case.scaling"),
        ("ours ms", "ours_ms"), ("GB/s", "gbps"), ("of copy", "fraction_of_copy"),
        ("eager ms", "peers.eager"), ("compile ms", "peers.torch_compile"),
        ("x compile", "speedup_vs_compile")])
    print(f"copy bandwidth {copy:.0f} GB/s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

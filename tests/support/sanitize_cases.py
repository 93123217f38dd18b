"""Small calls that reach every CUDA kernel path of longctx's default dispatch, for
compute-sanitizer: scripts/gpu_sanitize.sh runs this file under memcheck, racecheck and
synccheck, with torch's caching allocator off so that every tensor is its own allocation and an
access past a tensor's end is caught.

    python tests/support/sanitize_cases.py [--device cuda|cpu] [--only SUBSTR[,SUBSTR...]] [--list]

Each case draws fresh random inputs, runs the op (and its backward where it has one) and checks
that every output is finite, as it must be for finite inputs. The sizes are the smallest that
still take each path: lengths that end inside a tile, a window edge inside a tile, an empty
varlen sequence, GQA, hdim 64's tall tiles (4,096 query rows), a padded head dim (96), softcap
and sinks, the deterministic backward; the KV cache's append with RoPE, the decode (bf16, int8,
fp8; one split and several; the staged kernel and the CUDA-core one for pages that are not a
multiple of 16), the chunked prefill (over 32 query rows per kv head; with a window) and a
mixed batch; RoPE forward and backward in both layouts. With --device cpu the same calls run the
CPU twins (CI runs the list that way, tests/support/test_sanitize_cases.py).
Exit status: 0 when every selected case ran and gave finite outputs, 1 otherwise.
"""
import argparse
import sys
import traceback
from typing import Callable, Dict, List

import torch

import longctx
from logit_mods_check import make_sinks

BF16, FP16 = torch.bfloat16, torch.float16
CASES: Dict[str, Callable[[torch.device], List[torch.Tensor]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _rand(*shape, dtype=BF16, device="cpu", grad=False):
    t = torch.randn(*shape, device=device).to(dtype)
    return t.requires_grad_(grad)


def _attention(device, b, sq, sk, h, hk, d, dtype=BF16, backward=True, **kw):
    """flash_attn_func forward (and backward): out and the three gradients."""
    q = _rand(b, sq, h, d, dtype=dtype, device=device, grad=backward)
    k = _rand(b, sk, hk, d, dtype=dtype, device=device, grad=backward)
    v = _rand(b, sk, hk, d, dtype=dtype, device=device, grad=backward)
    out = longctx.flash_attn_func(q, k, v, **kw)
    if not backward:
        return [out]
    out.backward(torch.randn_like(out))
    return [out, q.grad, k.grad, v.grad]


for _d in (64, 128, 256):
    @case(f"attn d={_d} odd lengths")
    def _odd(device, d=_d):
        return _attention(device, 2, 77, 203, 4, 4, d)

    @case(f"attn d={_d} causal sq<sk")
    def _causal(device, d=_d):
        return _attention(device, 2, 130, 259, 4, 4, d, causal=True)

    @case(f"attn d={_d} causal GQA deterministic")
    def _det(device, d=_d):
        return _attention(device, 1, 200, 200, 8, 2, d, causal=True, deterministic=True)

    @case(f"attn d={_d} window softcap sinks")
    def _window(device, d=_d):
        return _attention(device, 1, 333, 333, 4, 2, d, window_size=(70, 5), softcap=30.0,
                          sinks=make_sinks(4, device))


@case("attn d=128 fp16 causal")
def _fp16(device):
    return _attention(device, 2, 150, 150, 4, 1, 128, dtype=FP16, causal=True)


@case("attn d=96 padded head dim")
def _d96(device):
    return _attention(device, 1, 190, 190, 4, 4, 96, causal=True)


@case("attn d=64 tall tiles")
def _tall(device):
    return _attention(device, 1, 4100, 4100, 1, 1, 64, causal=True)


@case("attn varlen empty sequence")
def _varlen(device):
    outs = []
    for d in (64, 128, 256):
        lq, lk = [37, 0, 300], [50, 0, 290]
        cq = torch.tensor([0, 37, 37, 337], dtype=torch.int32, device=device)
        ck = torch.tensor([0, 50, 50, 340], dtype=torch.int32, device=device)
        q = _rand(sum(lq), 4, d, device=device, grad=True)
        k = _rand(sum(lk), 2, d, device=device, grad=True)
        v = _rand(sum(lk), 2, d, device=device, grad=True)
        out = longctx.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True)
        out.backward(torch.randn_like(out))
        outs += [out, q.grad, k.grad, v.grad]
    return outs


# ---------------------------------------------------------------------------- KV cache

H, HK = 8, 2  # GQA 4: a decode step is 4 query rows per kv head


def _cache(device, fmt, d, lens, block_size=16, rope=None):
    """A PagedKVCache holding `lens` random tokens per sequence (two appends each: a packed one
    of all but the last token, then one more, so both append paths run)."""
    dtype = {"bf16": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
    blocks = sum(-(-n // block_size) for n in lens) + 2
    c = longctx.PagedKVCache(blocks, block_size, HK, d, cache_dtype=dtype, device=device)
    ids = [c.add_sequence() for _ in lens]
    first = [n - 1 for n in lens]
    cu = [0]
    for n in first:
        cu.append(cu[-1] + n)
    c.append(_rand(cu[-1], HK, d, device=device), _rand(cu[-1], HK, d, device=device), ids,
             cu_new=cu, rope=rope)
    c.append(_rand(len(lens), 1, HK, d, device=device), _rand(len(lens), 1, HK, d, device=device),
             ids, rope=rope)
    return c


def _rope(d, device):
    f = longctx.rope_frequencies(d, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64})
    return f.inv_freq.to(device), f.attention_factor


for _fmt in ("bf16", "int8", "fp8"):
    @case(f"kvcache {_fmt} append rope, decode")
    def _decode(device, fmt=_fmt):
        c = _cache(device, fmt, 128, [1, 300, 2049], rope=_rope(128, device))
        q = _rand(3, 1, H, 128, device=device)
        return [c.attend(q), c.attend(q, num_splits=3), c.attend(q, window_size=(100, 0))]

    @case(f"kvcache {_fmt} decode d=64,96,256")
    def _decode_hdims(device, fmt=_fmt):
        outs = []
        for d in (64, 96, 256):
            c = _cache(device, fmt, d, [5, 700])
            outs.append(c.attend(_rand(2, 1, H, d, device=device)))
        return outs

    @case(f"kvcache {_fmt} decode pages of 8 (CUDA-core kernel)")
    def _decode_small_pages(device, fmt=_fmt):
        c = _cache(device, fmt, 64, [3, 150], block_size=8)
        return [c.attend(_rand(2, 1, H, 64, device=device))]

    @case(f"kvcache {_fmt} chunked prefill, window, mixed batch")
    def _prefill(device, fmt=_fmt):
        lens = [1, 60, 333]
        c = _cache(device, fmt, 128, lens)
        lq = [1, 40, 45]  # 4 x 40 > 32 rows per kv head: the prefill path
        cq = torch.tensor([0, 1, 41, 86], dtype=torch.int32)
        q = _rand(sum(lq), H, 128, device=device)
        return [c.attend(q, cu_seqlens_q=cq, max_seqlen_q=max(lq)),
                c.attend(q, cu_seqlens_q=cq, max_seqlen_q=max(lq), window_size=(64, 0)),
                c.attend(_rand(3, 40, H, 128, device=device), softcap=20.0,
                         sinks=make_sinks(H, device))]


# ---------------------------------------------------------------------------- RoPE

@case("rope forward and backward, both layouts")
def _rope_case(device):
    outs = []
    inv_freq, factor = _rope(128, device)
    for interleaved in (False, True):
        q = _rand(2, 37, 4, 128, device=device, grad=True)
        k = _rand(2, 37, 2, 128, device=device, grad=True)
        pos = torch.randint(0, 1 << 20, (2, 37), device=device)
        qr, kr = longctx.apply_rope(q, k, pos, inv_freq, factor, interleaved=interleaved,
                                    inplace=False)
        (qr.float().sum() + 2 * kr.float().sum()).backward()
        outs += [qr, kr, q.grad, k.grad]
    return outs


def run(names, device) -> List[str]:
    """Runs the named cases; returns the failures' names (an exception or a non-finite output)."""
    failed = []
    for name in names:
        torch.manual_seed(len(name))
        try:
            outs = CASES[name](device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            bad = [i for i, t in enumerate(outs) if not bool(t.float().isfinite().all())]
            if bad:
                raise AssertionError(f"outputs {bad} hold NaN or infinity")
            print(f"ok      {name}", flush=True)
        except Exception:
            traceback.print_exc()
            print(f"FAILED  {name}", flush=True)
            failed.append(name)
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--only", default="", help="comma-separated substrings of case names")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    names = [n for n in CASES if not only or any(s in n for s in only)]
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        print(f"no case matches --only {args.only!r}", file=sys.stderr)
        return 1
    failed = run(names, torch.device(args.device))
    print(f"{len(names) - len(failed)} of {len(names)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The cases of the attention benchmarks (attn_fwd_suite, attn_bwd_suite): shapes, masks, FLOP
counts, the inputs and the FlexAttention peer of each. Everything here but `make_inputs` and
`flex_runner` runs without a GPU (the CPU tests check the case lists and the counts).

A case is batched (`batch` sequences of `seqlen` tokens) or document-packed (`docs`: one packed
varlen batch of documents of mixed lengths, `seqlen` = their total, as document-packed training
batches are built). Masks are bottom-right aligned causal masks with an optional left window
(query i sees keys j in [i + sk - sq - left, i + sk - sq]), within each document when packed.
FLOPs follow docs/design.md: forward 4 * heads * pairs * hdim, pairs = the (query, key) pairs the
mask keeps (summed over sequences or documents); the backward counts 2.5x that.
"""
from __future__ import annotations

import random
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

TOKENS = 32768  # batch * seqlen of the grid's batched cases


class Case(NamedTuple):
    hdim: int
    seqlen: int  # tokens per sequence; packed: the total of the documents
    causal: bool
    window_left: int  # -1: unbounded
    heads: int
    heads_kv: int
    batch: int = 1
    docs: Optional[Tuple[int, ...]] = None  # document lengths of a packed varlen batch

    @property
    def window(self) -> Tuple[int, int]:
        """flash_attn_func's window_size."""
        return (self.window_left, 0 if self.causal else -1)

    @property
    def tag(self) -> str:
        """What progress lines, NVTX ranges and --only name the case by."""
        shape = f"docs={len(self.docs)}" if self.docs else f"b={self.batch}"
        return (f"d={self.hdim} s={self.seqlen} {shape} causal={self.causal} "
                f"window={self.window_left} h={self.heads}/{self.heads_kv}")

    def as_row(self) -> dict:
        """The row's "case" entry (today's schema, plus "docs" for packed cases)."""
        row = {"hdim": self.hdim, "seqlen": self.seqlen, "batch": self.batch,
               "heads": self.heads, "heads_kv": self.heads_kv, "causal": self.causal,
               "window": list(self.window), "dtype": "bf16"}
        if self.docs:
            row["docs"] = len(self.docs)
            row["doc_lengths"] = list(self.docs)
        return row


def mask_pairs(sq: int, sk: int, causal: bool, window_left: int = -1) -> int:
    """(query, key) pairs kept by the bottom-right aligned causal mask with an optional left
    window (query i sees keys j in [i + sk - sq - left, i + sk - sq])."""
    total = 0
    for i in range(sq):
        hi = min(sk - 1, i + sk - sq) if causal else sk - 1
        lo = max(0, i + sk - sq - window_left) if window_left >= 0 else 0
        total += max(0, hi - lo + 1)
    return total


def case_pairs(c: Case) -> int:
    """Kept (query, key) pairs of the whole case, per head."""
    if c.docs:
        return sum(mask_pairs(n, n, c.causal, c.window_left) for n in c.docs)
    return c.batch * mask_pairs(c.seqlen, c.seqlen, c.causal, c.window_left)


def fwd_flops(c: Case) -> int:
    return 4 * c.heads * case_pairs(c) * c.hdim


def document_lengths(total: int, seed: int = 0, shortest: int = 128,
                     longest: int = 16384) -> Tuple[int, ...]:
    """Lengths of documents packed into `total` tokens: log-uniform in [shortest, longest] (many
    short documents, a few long ones, as web-text training batches), the last one trimmed to
    fill `total` exactly. Deterministic for a seed."""
    rng = random.Random(seed)
    lengths: List[int] = []
    left = total
    while left > 0:
        n = int(round(shortest * (longest / shortest) ** rng.random()))
        n = min(n, left)
        lengths.append(n)
        left -= n
    return tuple(lengths)


def _batched_grid(quick: bool) -> List[Case]:
    if quick:
        return [Case(128, 4096, True, -1, 16, 16, TOKENS // 4096),
                Case(128, 16384, True, -1, 16, 16, TOKENS // 16384)]
    cases = []
    for hdim in (64, 128, 256):
        for s in (1024, 2048, 4096, 8192, 16384, 32768):
            for causal in (False, True):
                cases.append(Case(hdim, s, causal, -1, 2048 // hdim, 2048 // hdim, TOKENS // s))
    cases += [Case(128, 16384, c, -1, 32, 8, TOKENS // 16384) for c in (True, False)]
    cases += [Case(128, s, True, 4096, 16, 16, TOKENS // s) for s in (16384, 32768)]
    return cases


def fwd_grid(quick: bool) -> List[Case]:
    """The forward's cases: the batched grid, one 128K GQA 32/8 causal sequence and a
    document-packed causal GQA batch of 64K tokens."""
    cases = _batched_grid(quick)
    if not quick:
        cases += [Case(128, 131072, True, -1, 32, 8, 1),
                  Case(128, 65536, True, -1, 32, 8, 1, document_lengths(65536))]
    return cases


def bwd_grid(quick: bool) -> List[Case]:
    """The backward's cases: the batched grid, one 64K and one 128K GQA 32/8 causal sequence
    (the 128K one for the backward's peak memory) and a document-packed causal GQA batch of 64K
    tokens."""
    cases = _batched_grid(quick)
    if not quick:
        cases += [Case(128, 65536, True, -1, 32, 8, 1), Case(128, 131072, True, -1, 32, 8, 1),
                  Case(128, 65536, True, -1, 32, 8, 1, document_lengths(65536))]
    return cases


def select(cases: Sequence[Case], only: Sequence[str]) -> List[Case]:
    """The cases whose tag contains one of `only` (all of them when `only` is empty)."""
    return [c for c in cases if not only or any(o in c.tag for o in only)]


def wants_flex(c: Case) -> bool:
    """FlexAttention compiles per shape: measured where it is the peer that matters (windows,
    document-packed batches) and at 16K hdim 128."""
    return c.window_left >= 0 or bool(c.docs) or (c.hdim == 128 and c.seqlen == 16384
                                                   and c.batch > 1)


def cu_seqlens(lengths: Sequence[int]) -> List[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def make_inputs(c: Case):
    """bf16 CUDA inputs of the case. Batched: q (b, s, h, d), k/v (b, s, hk, d), cu = None.
    Packed: q (total, h, d), k/v (total, hk, d) and cu, the int32 cu_seqlens of the documents."""
    import torch

    rows = (c.seqlen,) if c.docs else (c.batch, c.seqlen)

    def rnd(heads):
        return torch.randn(*rows, heads, c.hdim, device="cuda", dtype=torch.bfloat16)
    cu = (torch.tensor(cu_seqlens(c.docs), device="cuda", dtype=torch.int32) if c.docs
          else None)
    return rnd(c.heads), rnd(c.heads_kv), rnd(c.heads_kv), cu


def ours_fn(c: Case, cu, deterministic: bool = False):
    """longctx on the case: fn(q, k, v) -> out, in the case's layout."""
    from ..attention import flash_attn_func, flash_attn_varlen_func

    if c.docs:
        longest = max(c.docs)
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest,
                                                      causal=c.causal, window_size=c.window,
                                                      deterministic=deterministic)
    return lambda q, k, v: flash_attn_func(q, k, v, causal=c.causal, window_size=c.window,
                                           deterministic=deterministic)


def to_bhsd(c: Case, *xs):
    """The case's tensors in SDPA / FlexAttention's (batch, heads, seq, dim) layout (views;
    a packed batch is one sequence of `seqlen` tokens)."""
    if c.docs:
        return tuple(x.unsqueeze(0).transpose(1, 2) for x in xs)
    return tuple(x.transpose(1, 2) for x in xs)


def flex_runner(c: Case):
    """FlexAttention, compiled for this shape, with the case's block mask (causal / left window,
    within documents when packed): fn(q, k, v) on (b, h, s, d) tensors."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = None
    if c.docs:
        lengths = torch.tensor(c.docs, device="cuda")
        doc = torch.repeat_interleave(torch.arange(len(c.docs), device="cuda"), lengths)
    causal, wl = c.causal, c.window_left

    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx if causal else q_idx >= 0
        if wl >= 0:
            keep = keep & (q_idx - kv_idx <= wl)
        if doc is not None:
            keep = keep & (doc[q_idx] == doc[kv_idx])
        return keep

    block_mask = create_block_mask(mask_mod, None, None, c.seqlen, c.seqlen, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = c.heads != c.heads_kv
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def sdpa_runner(backend, c: Case):
    """torch SDPA with one backend on a batched case: fn(q, k, v) on (b, h, s, d) tensors.
    SDPA has no varlen and no left window: None for packed and windowed cases."""
    if c.docs or c.window_left >= 0:
        return None
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    gqa = c.heads != c.heads_kv

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=c.causal, enable_gqa=gqa)
    return run


def throughput(flops: float, ours_ms: float, peers: Dict[str, Optional[float]],
               prefix: str = "") -> dict:
    """A row's rate fields: <prefix>tflops (ours), <prefix>peer_tflops and <prefix>ratio (peer
    time over ours: > 1 means longctx is faster) per peer, None where a peer did not run."""
    return {prefix + "tflops": flops / (ours_ms * 1e-3) / 1e12,
            prefix + "peer_tflops": {n: (flops / (ms * 1e-3) / 1e12 if ms else None)
                                     for n, ms in peers.items()},
            prefix + "ratio": {n: (ms / ours_ms if ms else None) for n, ms in peers.items()}}


# the command line both attention suites take (bench/attn_fwd.py, bench/attn_bwd.py)

def add_arguments(ap) -> None:
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (compiles per shape)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of case tags to run (development runs)")


def command_line(run, columns):
    """(add_arguments, run_args) of a suite's bench script (longctx.bench.bench_main) from its
    run function run(quick, progress=..., with_flex=..., checkpoint=..., only=...)."""
    def run_args(args, progress):
        return run(args.quick, progress=progress, **run_options(args, columns))
    return add_arguments, run_args


def each_case(suite: str, grid: Sequence[Case], only: Sequence[str], progress):
    """(case, tag) for the selected cases of the grid, announcing each to progress."""
    for c in select(grid, only):
        tag = f"{suite} {c.tag}"
        if progress:
            progress(tag)
        yield c, tag


def case_done(res, checkpoint) -> None:
    """After each case: free the case's cached blocks and write the results so far."""
    import torch
    torch.cuda.empty_cache()
    if checkpoint:
        checkpoint(res)


def run_options(args, columns) -> dict:
    """The run function's keyword arguments from the command line; every finished case is
    written at once (partial results survive a kill)."""
    return dict(with_flex=not args.no_flex, checkpoint=lambda r: r.write(args.out, columns),
                only=[o for o in args.only.split(",") if o])

"""The cases of the KV-cache benchmark (kvcache_suite) and their arithmetic: the case types, each
group's case list in run order, the selection by group and tag, and the bytes, FLOPs and offsets
the rows report. Runs without a GPU (tests/kvcache/test_kvcache_bench_cases.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

H, HK, D, BS = 32, 8, 128, 16
FORMATS = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
GROUPS = ("error", "decode", "window", "hdim", "prefill", "mixed")
WINDOW = 4096  # the sliding window of the window group (keys left of the query)


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeCase:
    """One decode row: one query token per sequence over `context` cached tokens. window None:
    the row has no "window" key (the decode and hdim groups)."""
    group: str  # "decode", "window" or "hdim"
    fmt: str
    context: int
    batch: int
    hdim: int = D
    window: Optional[Tuple[int, int]] = None

    @property
    def tag(self) -> str:
        name = {"decode": "decode", "window": "window-decode", "hdim": "hdim-decode"}[self.group]
        tag = f"kvcache {name} {self.fmt} ctx={self.context} batch={self.batch}"
        if self.window is not None:
            tag += f" window={self.window[0]}"
        return tag + (f" hdim={self.hdim}" if self.group == "hdim" else "")

    @property
    def peer_key(self) -> tuple:
        """The cases that share the peers measured by their bf16 case."""
        return (self.group, self.context, self.batch, self.hdim, self.window)

    def case(self) -> dict:
        c = {"kind": "decode", "format": self.fmt, "context": self.context, "batch": self.batch,
             "heads": H, "heads_kv": HK, "hdim": self.hdim, "block_size": BS}
        if self.window is not None:
            c["window"] = list(self.window)
        return c


@dataclass(frozen=True)
class PrefillCase:
    """A prompt prefilled in chunks; extra_at: the chunk ends (cache lengths) at which the
    call's extra device memory is measured."""
    fmt: str
    prompt: int
    chunk: int
    extra_at: Tuple[int, ...]
    group = "prefill"

    @property
    def tag(self) -> str:
        return f"kvcache prefill {self.fmt} prompt={self.prompt} chunk={self.chunk}"

    def case(self) -> dict:
        return {"kind": "prefill", "format": self.fmt, "context": self.prompt,
                "chunk": self.chunk, "batch": 1, "heads": H, "heads_kv": HK, "hdim": D,
                "block_size": BS}


@dataclass(frozen=True)
class MixedCase:
    """decode_rows sequences of decode_context cached tokens with one query each, and one
    sequence whose last `chunk` tokens (cache length prefill_context) are a prefill chunk."""
    fmt: str
    decode_rows: int
    decode_context: int
    chunk: int
    prefill_context: int
    group = "mixed"

    def __post_init__(self):
        if not 0 < self.chunk <= self.prefill_context <= self.decode_context:
            raise ValueError(f"MixedCase: need 0 < chunk <= prefill_context <= decode_context "
                             f"(the pool holds decode_context tokens per sequence), got {self}")

    @property
    def tag(self) -> str:
        return (f"kvcache mixed {self.fmt} decode={self.decode_rows}x{self.decode_context} "
                f"chunk={self.chunk}/{self.prefill_context}")

    def q_lens(self) -> List[int]:
        """Query rows per sequence: the decode rows first, the chunk last."""
        return [1] * self.decode_rows + [self.chunk]

    def cache_lens(self) -> List[int]:
        """Cached tokens per sequence, the chunk's own included."""
        return [self.decode_context] * self.decode_rows + [self.prefill_context]

    def case(self) -> dict:
        return {"kind": "mixed", "format": self.fmt, "batch": self.decode_rows + 1,
                "decode_rows": self.decode_rows, "decode_context": self.decode_context,
                "prefill_chunk": self.chunk, "prefill_context": self.prefill_context,
                "heads": H, "heads_kv": HK, "hdim": D, "block_size": BS}


@dataclass(frozen=True)
class ErrorCase:
    """The quantized formats' output error (one row per format)."""
    context: int
    group = "error"

    @property
    def tag(self) -> str:
        return f"kvcache output error ctx={self.context}"

    def case(self) -> dict:
        return {"kind": "error", "context": self.context}


def decode_plan(quick: bool) -> List[DecodeCase]:
    contexts, batches = ([32768], [1]) if quick else ([32768, 131072], [1, 16])
    return [DecodeCase("decode", fmt, ctx, b) for ctx in contexts for b in batches
            for fmt in FORMATS]


def window_plan(quick: bool) -> List[DecodeCase]:
    """Per batch: the plain 4K decode first (the windowed row's ratio_plain needs it)."""
    cases = []
    for b in ([1] if quick else [1, 16]):
        cases.append(DecodeCase("window", "bf16", 4096, b, window=(-1, -1)))
        cases.append(DecodeCase("window", "bf16", 131072, b, window=(WINDOW, 0)))
    return cases


def hdim_plan(quick: bool) -> List[DecodeCase]:
    ctx, b = (32768, 1) if quick else (131072, 16)
    return [DecodeCase("hdim", fmt, ctx, b, hdim=d) for d in (64, 96, 256) for fmt in FORMATS]


def prefill_plan(quick: bool) -> List[PrefillCase]:
    prompt, chunk, extra_at = (16384, 8192, (8192, 16384)) if quick else \
        (131072, 8192, (32768, 131072))
    return [PrefillCase(fmt, prompt, chunk, extra_at) for fmt in FORMATS]


def mixed_plan(quick: bool) -> List[MixedCase]:
    if quick:
        return [MixedCase(fmt, 3, 4096, 2048, 4096) for fmt in ("bf16", "int8")]
    return [MixedCase(fmt, 15, 32768, 8192, 16384) for fmt in FORMATS]


def plan(quick: bool) -> list:
    """Every case, in run order (the groups in GROUPS order)."""
    return ([ErrorCase(32768)] + decode_plan(quick) + window_plan(quick) + hdim_plan(quick)
            + prefill_plan(quick) + mixed_plan(quick))


def select(cases: Sequence, groups: Sequence[str] = GROUPS, only: Sequence[str] = ()) -> list:
    """The cases of `groups` whose tag contains one of the `only` substrings (all without)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"kvcache bench: unknown groups {unknown}; the groups are "
                         f"{', '.join(GROUPS)}")
    return [c for c in cases if c.group in groups and (not only or any(o in c.tag for o in only))]


# ------------------------------------------------------------------------------------------------
# byte, FLOP and index arithmetic
# ------------------------------------------------------------------------------------------------

def visible_keys(context: int, window_left: int = -1) -> int:
    """Keys one query at the end of `context` keys sees with a left window (-1: all)."""
    return context if window_left < 0 else min(context, window_left + 1)


def pages_touched(context: int, keys: int, block_size: int = BS) -> int:
    """Pages holding the last `keys` of `context` tokens."""
    if keys <= 0:
        return 0
    return (context - 1) // block_size - (context - keys) // block_size + 1


def decode_bytes(batch: int, context: int, hdim: int, elem_bytes: int, int8_scales: bool,
                 window_left: int = -1, kv_heads: int = HK, block_size: int = BS) -> int:
    """Bytes a decode must read: K and V of the keys it sees, their int8 scales (one fp32 per
    token and kv head, K and V), and the block-table entries of the pages holding them."""
    keys = visible_keys(context, window_left)
    per_key = 2 * kv_heads * hdim * elem_bytes + (2 * kv_heads * 4 if int8_scales else 0)
    return batch * (keys * per_key + pages_touched(context, keys, block_size) * 4)


def chunk_flops(start: int, end: int, heads: int = H, hdim: int = D) -> int:
    """FLOPs of the causal (bottom-right) attention of the queries [start, end) of a prompt over
    its first `end` keys: row i of the chunk sees start + i + 1 keys."""
    n = end - start
    return 4 * heads * hdim * (n * start + n * (n + 1) // 2)


def chunk_ends(prompt: int, chunk: int) -> List[int]:
    """The cache length after each chunk of a prompt prefilled in chunks."""
    return [min(prompt, s + chunk) for s in range(0, prompt, chunk)]


def cu_seqlens(lengths: Sequence[int]) -> List[int]:
    """Offsets of packed sequences: [0, l0, l0 + l1, ...]."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def plain_decode_ms(rows: Sequence[dict], case: DecodeCase) -> Optional[float]:
    """ours_ms of the plain (window [-1, -1]) row of the window group with the format and batch
    of `case`, if one was measured."""
    for r in rows:
        c = r["case"]
        if c.get("window") == [-1, -1] and c["format"] == case.fmt and \
                c["batch"] == case.batch and "ours_ms" in r:
            return r["ours_ms"]
    return None

"""Paged KV cache for long-context inference: storage, append and attention over the cache.

Layout (the one vLLM and FlashInfer users know, "NHD" pages):
- k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) pools of pages, last dimension
  contiguous (any strides elsewhere: k_cache = kv[:, 0] of a combined pool works). `kv_pool`
  and PagedKVCache store each page head-major (FlashInfer's "HND": a kv head's page is one
  contiguous run) where a key row is narrower than 256 bytes, which the CUDA decode reads
  fastest there (8-bit codes at head dim 64 and 96 in 0.66-0.72x the time of token-major
  pages), and token-major otherwise;
- block_table: int32 (batch, max_blocks); token t of sequence b lives in page
  block_table[b, t // block_size], slot t % block_size; entries past a sequence's pages are never
  read (PagedKVCache pads them with -1);
- cache_seqlens: int32 (batch,) tokens per sequence.

Formats, chosen by the pool dtype (dequantization is always x = stored * scale, in fp32):
- bf16 / fp16 (fp32 on CPU): the dtype of q and of the new tokens;
- torch.int8: symmetric, one fp32 scale per (token, kv head) in k_scale / v_scale tensors of shape
  (num_blocks, block_size, kv_heads) beside the pages: scale = amax / 127,
  q = clamp(rint(x / scale), -127, 127). Any strides work; decode on CUDA reads them fastest
  head-major within a page (strides (block_size * kv_heads, 1, block_size): a head's scales of
  16 slots are 64 contiguous bytes), as `int8_scales` and PagedKVCache allocate them;
- torch.float8_e4m3fn: one fixed fp32 scale per kv head, k_scale / v_scale of shape (kv_heads,):
  q = e4m3(x / scale) (round to nearest even, saturating to +-448). `fp8_scales_from_data`
  calibrates them (amax / 448 per head).

NaN and Inf in K/V: a quantized cache never makes them vanish.
- bf16 / fp16 / fp32 caches store them as they are.
- int8: a (token, kv head) whose values hold a NaN or an infinity gets scale NaN or inf (amax
  keeps the NaN), so every channel of that (token, head) reads back as NaN: attention over the
  key gives NaN in the rows that see it.
- fp8 e4m3: a NaN element is stored as NaN; +-inf saturates to +-448 * scale, as every value
  beyond the format's range does (the SATFINITE conversion).
- Calibration refuses non-finite data: fp8_scales_from_data, and the first append of a
  PagedKVCache whose fp8 scales were left to calibrate, raise ValueError naming the tensor and
  the kv head, because a scale computed from a NaN or an infinity (NaN, inf, or 1 where amax is
  NaN) would spoil or hide that head for every later token.

Ops (torch.ops.longctx): kvcache_append (mutates the pools, quantizes on write, RoPE on K) and
flash_attn_with_kvcache (attention over the cache, dequantization fused, split-KV for decode).
Both have fake implementations registered here, so torch.compile(fullgraph=True) traces them.
There is no backward: the cache is for inference.

Errors name the argument, and a call that raises writes nothing: kvcache_append runs every
check before its first write; flash_attn_with_kvcache with new k/v first checks what its
attention would reject (shapes of q, k, v, cache_seqlens and cu_seqlens_q, dtypes, the CUDA
head_dim and alignment; with validate the cu_seqlens_q values), then appends; a PagedKVCache
method that raises leaves the cache as it was (pages, lengths, scales, pool contents).
"""
from __future__ import annotations

import math
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.longctx.*)
from ._common import (check_cu_seqlens, check_cu_seqlens_values,
                      check_index_vector, check_same_device, resolve_scale, resolve_sinks,
                      resolve_softcap, resolve_window, size_or_zero)
from .rope import apply_rope

__all__ = [
    "PagedKVCache",
    "flash_attn_with_kvcache",
    "kvcache_append",
    "fp8_scales_from_data",
    "int8_scales",
    "kv_pool",
    "FP8_E4M3_MAX",
    "INT8_MAX",
]

_ops = torch.ops.longctx

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
_QUANTIZED = (torch.int8, torch.float8_e4m3fn)
_POOL_DTYPES = (torch.bfloat16, torch.float16, torch.float32) + _QUANTIZED


@torch.library.register_fake("longctx::kvcache_append")
def _kvcache_append_fake(k, v, k_cache, v_cache, k_scale_cache, v_scale_cache, k_fp8_scale,
                         v_fp8_scale, block_table, cache_seqlens, cu_new, positions, inv_freq,
                         attention_factor=1.0, rope_interleaved=False, validate=True):
    check_same_device("kvcache_append", (
        ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
        ("k_scale_cache", k_scale_cache), ("v_scale_cache", v_scale_cache),
        ("k_fp8_scale", k_fp8_scale), ("v_fp8_scale", v_fp8_scale), ("block_table", block_table),
        ("cache_seqlens", cache_seqlens), ("cu_new", cu_new), ("positions", positions),
        ("inv_freq", inv_freq)))
    return None


@torch.library.register_fake("longctx::flash_attn_with_kvcache_check")
def _flash_attn_with_kvcache_check_fake(*args):  # nothing to check on fake tensors
    return None


@torch.library.register_fake("longctx::flash_attn_with_kvcache")
def _flash_attn_with_kvcache_fake(q, k_cache, v_cache, k_scale_cache, v_scale_cache, k_fp8_scale,
                                  v_fp8_scale, block_table, cache_seqlens, cu_seqlens_q,
                                  max_seqlen_q, softmax_scale, causal, window_left, window_right,
                                  num_splits=0, validate=True, sinks=None, softcap=0.0):
    check_same_device("flash_attn_with_kvcache", (
        ("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_scale_cache", k_scale_cache),
        ("v_scale_cache", v_scale_cache), ("k_fp8_scale", k_fp8_scale),
        ("v_fp8_scale", v_fp8_scale), ("block_table", block_table),
        ("cache_seqlens", cache_seqlens), ("cu_seqlens_q", cu_seqlens_q), ("sinks", sinks)))
    if cu_seqlens_q is None:
        torch._check(q.dim() == 4,
                     lambda: "longctx.flash_attn_with_kvcache: q must have 4 dimensions")
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        torch._check(q.dim() == 3,
                     lambda: "longctx.flash_attn_with_kvcache: q must have 3 dimensions")
        lse_shape = (q.shape[1], q.shape[0])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


# --- helpers ------------------------------------------------------------------------------------

def _fp8_scales(x: torch.Tensor, margin: float, op: str, name: str) -> torch.Tensor:
    """fp8_scales_from_data's work; errors name op and the tensor (name)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"longctx.{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: {name} must be (..., kv_heads, head_dim), got shape "
                         f"{tuple(x.shape)}")
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"{op}: margin must be finite and > 0, got {margin}")
    dims = [d for d in range(x.dim()) if d != x.dim() - 2]
    xf = x.detach().abs().float()
    amax = xf.amax(dim=dims) if x.numel() else x.new_zeros(x.shape[-2], dtype=torch.float32)
    if x.numel() and x.device.type != "meta":
        # amax drops no NaN (torch.amax propagates it); an infinity gives inf. One sync.
        bad = (~torch.isfinite(amax)).nonzero().flatten().tolist()
        if bad:
            h = bad[0]
            what = "NaN" if bool(torch.isnan(xf.select(-2, h)).any()) else "an infinity"
            raise ValueError(
                f"longctx.{op}: {name} holds {what} in kv head {h} (heads with non-finite values: "
                f"{bad}); an fp8 scale calibrated from it would hide or spread it (see 'NaN and "
                f"Inf' in longctx.kvcache's docstring): calibrate from finite data or pass the "
                f"scales")
    scale = amax * (margin / FP8_E4M3_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()


def fp8_scales_from_data(x: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Per-kv-head fp8 e4m3 scales calibrated from data: amax over every dimension but the head
    dimension (-2) of x (..., kv_heads, head_dim), times margin, divided by 448, as fp32
    (kv_heads,). A head of zeros gets scale 1. margin > 1 leaves headroom for later, larger
    values (they saturate at 448 * scale otherwise). x holding NaN or an infinity raises
    ValueError naming the first such kv head (a NaN would otherwise give that head scale 1 and
    an infinity scale inf); reading the check's result back is a sync on CUDA."""
    return _fp8_scales(x, margin, "fp8_scales_from_data", "x")


def _page_zeros(fn: str, num_blocks: int, block_size: int, kv_heads: int,
                tail: Tuple[int, ...], dtype: torch.dtype, device,
                head_major: bool = True) -> torch.Tensor:
    """Zeros of shape (num_blocks, block_size, kv_heads, *tail), stored head-major within each
    page (memory (num_blocks, kv_heads, block_size, *tail)) or contiguous."""
    dims = (num_blocks, block_size, kv_heads) + tail
    if min(dims) < 1:
        names = "num_blocks, block_size, kv_heads" + (", head_dim" if tail else "")
        raise ValueError(f"{fn}: {names} must be >= 1, got {dims}")
    if not head_major:
        return torch.zeros(dims, dtype=dtype, device=device)
    return torch.zeros((num_blocks, kv_heads, block_size) + tail, dtype=dtype,
                       device=device).transpose(1, 2)


def kv_pool(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype = torch.bfloat16, device=None,
            head_major: Optional[bool] = None) -> torch.Tensor:
    """A zeroed K or V pool for the ops, shape (num_blocks, block_size, kv_heads, head_dim) (the
    ops' "NHD" view), in the memory layout the CUDA decode reads fastest, as PagedKVCache
    allocates its pools. Every op takes either layout.

    head_major: True stores each page head-major (memory (num_blocks, kv_heads, block_size,
    head_dim), FlashInfer's "HND": a kv head's page is one contiguous run); False token-major
    (contiguous); None (default) head-major where a key row is narrower than 256 bytes
    (head_dim * element size < 256: 8-bit codes at head dim <= 248, 16-bit at <= 120). Measured
    (H100, decode at 128K, batch 16, docs/kernels/kvcache.md): head-major takes 0.66-0.72x the
    time of token-major for 8-bit codes at head dim 64 and 96, 0.89-0.97x for bf16 there and
    0.96-0.99x for 8-bit at 128; token-major is 2-9% faster for bf16 at head dim 128 (batch 1)
    and 256."""
    if dtype not in _POOL_DTYPES:
        raise ValueError(f"kv_pool: dtype must be one of {', '.join(map(str, _POOL_DTYPES))}, "
                         f"got {dtype}")
    if head_major is not None and not isinstance(head_major, bool):
        raise TypeError(f"kv_pool: head_major must be True, False or None, got {head_major!r}")
    if head_major is None:
        head_major = head_dim * torch.empty((), dtype=dtype).element_size() < 256
    return _page_zeros("kv_pool", num_blocks, block_size, kv_heads, (head_dim,), dtype, device,
                       head_major)


def int8_scales(num_blocks: int, block_size: int, kv_heads: int, device=None) -> torch.Tensor:
    """A zeroed fp32 scale tensor for an int8 pool: shape (num_blocks, block_size, kv_heads),
    stored head-major within each page (strides (block_size * kv_heads, 1, block_size)), the
    layout the CUDA decode kernel reads with the fewest bytes (docs/kernels/kvcache.md). A
    contiguous (slot-major) tensor of the same shape works too, a little slower."""
    return _page_zeros("int8_scales", num_blocks, block_size, kv_heads, (), torch.float32,
                       device)


def _scale_args(k_cache: torch.Tensor, k_scale, v_scale):
    """(k_scale_cache, v_scale_cache, k_fp8_scale, v_fp8_scale) for the op, by cache dtype."""
    if k_cache.dtype == torch.int8:
        return k_scale, v_scale, None, None
    if k_cache.dtype == torch.float8_e4m3fn:
        def per_head(s):
            if s is None or isinstance(s, torch.Tensor):
                return s
            return torch.full((k_cache.shape[2],), float(s), dtype=torch.float32,
                              device=k_cache.device)
        return None, None, per_head(k_scale), per_head(v_scale)
    if k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale / v_scale are given but the cache dtype {k_cache.dtype} is not "
                         "quantized (scales belong to int8 and float8_e4m3fn caches)")
    return None, None, None, None


def _rope_args(rope) -> Tuple[Optional[torch.Tensor], float]:
    if rope is None:
        return None, 1.0
    if isinstance(rope, torch.Tensor):
        return rope, 1.0
    inv_freq, factor = rope  # RopeFrequencies or (inv_freq, attention_factor)
    return inv_freq, float(factor)


def kvcache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor,
                   *, k_scale=None, v_scale=None, cu_new: Optional[torch.Tensor] = None,
                   positions: Optional[torch.Tensor] = None, rope=None,
                   rope_interleaved: bool = False, validate: bool = True) -> None:
    """Write new tokens into their pages, in place (one fused op).

    k, v: (batch, seqlen_new, kv_heads, head_dim), or packed (total_new, kv_heads, head_dim) with
    int32 cu_new (batch + 1,). Token i of sequence b goes to position cache_seqlens[b] + i
    (cache_seqlens: the lengths before the append; this function does not update it). The pages
    must already be in block_table. k_scale / v_scale: the int8 scale tensors (num_blocks,
    block_size, kv_heads) (written) or the fp8 per-head scales (kv_heads,) (read).
    rope: (inv_freq, attention_factor) (e.g. a `rope_frequencies` result): K is rotated at
    `positions` ((batch, seqlen_new) or (total_new,); default: the cache positions) before it is
    stored, exactly as apply_rope followed by an append would do.
    validate: check page ids and lengths on the host (a sync on CUDA); with False nothing is
    checked, but nothing outside the pool is ever written.
    """
    ksc, vsc, kfp8, vfp8 = _scale_args(k_cache, k_scale, v_scale)
    inv_freq, factor = _rope_args(rope)
    _ops.kvcache_append(k, v, k_cache, v_cache, ksc, vsc, kfp8, vfp8, block_table, cache_seqlens,
                        cu_new, positions, inv_freq, factor, bool(rope_interleaved),
                        bool(validate))


def _precheck(q, k, v, k_cache, v_cache, scale_args, cache_seqlens, block_table, inv_freq,
              cu_seqlens_q, max_seqlen_q, attn_args) -> torch.Tensor:
    """flash_attn_with_kvcache with new k/v or rope appends (and rotates) before it attends: the
    attention's own checks run first, through the op flash_attn_with_kvcache_check (told how
    many tokens the append adds, so that its page checks are the append's), so that a call the
    attention would refuse writes nothing and its errors name the caller's arguments (not
    cu_new, which the caller never passed). Checked here is only what this wrapper composes: the
    devices of every tensor, the structure of cache_seqlens and cu_seqlens_q (the lengths after
    the append are computed from them) and the new k/v against q. scale_args: the ops'
    (k_scale_cache, v_scale_cache, k_fp8_scale, v_fp8_scale); attn_args: the attention op's
    arguments after max_seqlen_q. Returns the lengths after the append (int32, (batch,))."""
    op = "flash_attn_with_kvcache"
    ksc, vsc, kfp8, vfp8 = scale_args
    check_same_device(op, (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                           ("k_scale", kfp8 if kfp8 is not None else ksc),
                           ("v_scale", vfp8 if vfp8 is not None else vsc),
                           ("block_table", block_table), ("cache_seqlens", cache_seqlens),
                           ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                           ("rope", inv_freq), ("sinks", attn_args[-2])))
    packed = cu_seqlens_q is not None
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"longctx.{op}: q must be a tensor, got {type(q).__name__}")
    if packed and q.dim() != 3:
        raise RuntimeError(f"longctx.{op}: q must have 3 dimensions (total_q, heads, head_dim) "
                           f"when cu_seqlens_q is given, got shape {list(q.shape)}")
    if not packed and q.dim() != 4:
        raise RuntimeError(f"longctx.{op}: q must have 4 dimensions (batch, seqlen_q, heads, "
                           f"head_dim) when cu_seqlens_q is not given, got shape "
                           f"{list(q.shape)}")
    batch = block_table.shape[0] if isinstance(block_table, torch.Tensor) and \
        block_table.dim() == 2 else None
    sl = cache_seqlens
    check_index_vector(sl, op, "cache_seqlens", "(batch,)", batch,
                       f"one entry per row of block_table (batch = {batch})")
    if packed:
        check_cu_seqlens(cu_seqlens_q, op, "cu_seqlens_q", sl.shape[0], q, "q")
    elif q.shape[0] != sl.shape[0]:
        raise RuntimeError(f"longctx.{op}: q must have the batch of block_table "
                           f"({sl.shape[0]}), got {q.shape[0]}")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"longctx.{op}: {name} must be a tensor, got "
                                f"{type(t).__name__}")
            if t.dim() != q.dim():
                layout = ("3 dimensions (total_q, kv_heads, head_dim) when cu_seqlens_q is given"
                          if packed else "4 dimensions (batch, seqlen_new, kv_heads, head_dim)")
                raise RuntimeError(f"longctx.{op}: {name} must have {layout}, got shape "
                                   f"{list(t.shape)}")
            if packed and t.shape[0] != q.shape[0]:
                raise RuntimeError(f"longctx.{op}: {name} must have total_q = {q.shape[0]} rows "
                                   f"(cu_seqlens_q gives each sequence's new tokens as well as "
                                   f"its queries), got shape {list(t.shape)}")
    _ops.flash_attn_with_kvcache_check(q, k_cache, v_cache, *scale_args, block_table,
                                       cache_seqlens, cu_seqlens_q, max_seqlen_q, *attn_args,
                                       new_tokens=(0 if k is None else -1 if packed
                                                   else k.shape[1]))
    if k is None:
        return cache_seqlens
    new = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]) if packed else k.shape[1]
    return (cache_seqlens + new).to(torch.int32)


def _query_positions(q, total_len, sq, cu_seqlens_q):
    """Positions of the query rows: the last sq of each sequence's total_len keys."""
    if cu_seqlens_q is None:
        i = torch.arange(q.shape[1], device=q.device, dtype=torch.int64)
        return total_len.to(torch.int64)[:, None] - q.shape[1] + i[None, :]
    cu = cu_seqlens_q.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.shape[0], device=q.device), lens,
                                  output_size=q.shape[0])
    row = torch.arange(q.shape[0], device=q.device, dtype=torch.int64)
    return total_len.to(torch.int64)[seq] - lens[seq] + (row - cu[seq])


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    k_scale=None,
    v_scale=None,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    rope=None,
    rotary_interleaved: bool = False,
    num_splits: int = 0,
    validate: bool = True,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of q over a paged KV cache (FlashAttention's flash_attn_with_kvcache semantics).

    q: (batch, seqlen_q, heads, head_dim), or packed (total_q, heads, head_dim) with int32
    cu_seqlens_q (batch + 1,) and max_seqlen_q (chunked prefill of several sequences).
    k_cache/v_cache, block_table, cache_seqlens: see the module docstring. k_scale/v_scale: the
    int8 scale tensors or the fp8 per-head scales (a float is broadcast to every head).
    k, v: optional new tokens (q's layout, kv_heads heads), appended at cache_seqlens first (the
    pools are updated in place; cache_seqlens is not: as in FlashAttention, the caller advances
    it); attention then covers cache_seqlens + new tokens.
    Queries are the last seqlen_q positions of each sequence (bottom-right aligned causal and
    window masks); heads % kv_heads == 0 (GQA). rope = (inv_freq, attention_factor): q is rotated
    at its positions and the new k at theirs before they are used (rotary_interleaved: GPT-J
    pairs). num_splits: key splits merged by lse (decode: one long sequence fills the device);
    0 = automatic (1 on CPU). Returns out (q's shape and dtype) or (out, lse) with lse fp32,
    (batch, heads, seqlen_q) or (heads, total_q) packed; a row that sees no key gets out = 0 and
    lse = -inf. softcap and sinks: as in flash_attn_func (CPU and CUDA). With k/v, what the
    attention would reject is checked before the append (an error writes nothing); with k/v or
    rope and validate, that check reads the lengths, page ids and cu_seqlens_q on the host once
    (a sync on CUDA), for the append and the attention together. CUDA graphs: with
    validate=False the call captures, prefill included (eager, the prefill reads the lengths
    and checks the page ids on the host whatever validate says; captured it reads nothing
    there, and a page id outside the pool gives NaN in the rows that see its keys).
    """
    op = "flash_attn_with_kvcache"
    left, right = resolve_window(window_size, causal)
    ksc, vsc, kfp8, vfp8 = _scale_args(k_cache, k_scale, v_scale)
    inv_freq, factor = _rope_args(rope)
    if max_seqlen_q is None:
        if cu_seqlens_q is not None:
            raise ValueError("flash_attn_with_kvcache: max_seqlen_q is required with cu_seqlens_q")
        max_seqlen_q = size_or_zero(q, 1)
    max_seqlen_q = int(max_seqlen_q)
    num_splits = int(num_splits)
    scale = resolve_scale(softmax_scale, q, op)
    softcap = resolve_softcap(softcap, op)
    sinks = resolve_sinks(sinks, op)
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: k and v must be given together")

    def attn_args(check: bool):  # the attention op's arguments after max_seqlen_q
        return (scale, bool(causal), left, right, num_splits, check, sinks, softcap)

    total_len = cache_seqlens
    prechecked = k is not None or inv_freq is not None
    if prechecked:
        total_len = _precheck(q, k, v, k_cache, v_cache, (ksc, vsc, kfp8, vfp8), cache_seqlens,
                              block_table, inv_freq, cu_seqlens_q, max_seqlen_q,
                              attn_args(bool(validate)))
    # _precheck's op has read on the host all that the append and the attention would validate
    # (cu_seqlens_q, the pages of the lengths after the append, fp8 scales): they skip it. Traced
    # by torch.compile, they keep it: a backend may drop the output-less check op.
    validate = bool(validate) and not (prechecked and not torch.compiler.is_compiling())
    if k is not None:
        _ops.kvcache_append(k, v, k_cache, v_cache, ksc, vsc, kfp8, vfp8, block_table,
                            cache_seqlens, cu_seqlens_q, None, inv_freq, factor,
                            bool(rotary_interleaved), validate)
    if inv_freq is not None:
        pos = _query_positions(q, total_len, max_seqlen_q, cu_seqlens_q)
        q, _ = apply_rope(q, None, pos, inv_freq, factor, interleaved=rotary_interleaved,
                          inplace=False)
    out, lse = _ops.flash_attn_with_kvcache(q, k_cache, v_cache, ksc, vsc, kfp8, vfp8, block_table,
                                            total_len, cu_seqlens_q, max_seqlen_q,
                                            *attn_args(validate))
    return (out, lse) if return_lse else out


# --- the cache manager --------------------------------------------------------------------------

class PagedKVCache:
    """A pool of KV pages and the sequences that own them.

    PagedKVCache(num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16,
    cache_dtype=None, k_scale=None, v_scale=None, device=None, max_blocks_per_seq=None)

    cache_dtype: None (store as dtype), torch.int8 (per-token-and-head scales, allocated here)
    or torch.float8_e4m3fn (per-head scales: give them as k_scale / v_scale tensors (kv_heads,)
    or floats; left as None they are calibrated from the first append with
    `fp8_scales_from_data`). Sequences are integer ids: `add_sequence()`, `free(seq)`; pages are
    taken from the pool as sequences grow and returned on free (`reserve` grows ahead of time).
    `append(k, v)` / `attend(q)` work on a batch of sequences (`seq_ids`, default: all live
    sequences in creation order); `block_table()` and `cache_seqlens()` give the plain tensors
    the ops take.
    """

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, cache_dtype: Optional[torch.dtype] = None,
                 k_scale=None, v_scale=None, device=None,
                 max_blocks_per_seq: Optional[int] = None):
        if num_blocks < 1 or block_size < 1 or kv_heads < 1 or head_dim < 1:
            raise ValueError("PagedKVCache: num_blocks, block_size, kv_heads and head_dim must be "
                             f">= 1, got {(num_blocks, block_size, kv_heads, head_dim)}")
        cache_dtype = dtype if cache_dtype is None else cache_dtype
        if cache_dtype not in (dtype,) + _QUANTIZED:
            raise ValueError(f"PagedKVCache: cache_dtype must be {dtype}, torch.int8 or "
                             f"torch.float8_e4m3fn, got {cache_dtype}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.dtype, self.cache_dtype = dtype, cache_dtype
        self.max_blocks_per_seq = max_blocks_per_seq
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = kv_pool(*shape, dtype=cache_dtype, device=device)
        self.v_cache = kv_pool(*shape, dtype=cache_dtype, device=device)
        self.k_scale: Optional[torch.Tensor] = None
        self.v_scale: Optional[torch.Tensor] = None
        if cache_dtype == torch.int8:
            self.k_scale = int8_scales(num_blocks, block_size, kv_heads, device)
            self.v_scale = int8_scales(num_blocks, block_size, kv_heads, device)
        elif cache_dtype == torch.float8_e4m3fn:
            self.k_scale = self._head_scale(k_scale)
            self.v_scale = self._head_scale(v_scale)
        elif k_scale is not None or v_scale is not None:
            raise ValueError("PagedKVCache: k_scale / v_scale apply to float8_e4m3fn caches only")
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives page 0 first
        self._pages: Dict[int, List[int]] = {}
        self._lens: Dict[int, int] = {}
        self._next_id = 0

    def _head_scale(self, s):
        if s is None:
            return None
        if not isinstance(s, torch.Tensor):
            s = torch.full((self.kv_heads,), float(s))
        return s.to(device=self.k_cache.device, dtype=torch.float32).contiguous()

    # sequences and pages
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> List[int]:
        return list(self._pages)

    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._pages[sid] = []
        self._lens[sid] = 0
        return sid

    def seqlen(self, seq_id: int) -> int:
        return self._lens[self._check(seq_id, "seqlen")]

    def pages(self, seq_id: int) -> List[int]:
        return list(self._pages[self._check(seq_id, "pages")])

    def free(self, seq_id: int) -> None:
        """Return the sequence's pages to the pool (they are reused by later sequences)."""
        sid = self._check(seq_id, "free")
        self._free.extend(reversed(self._pages.pop(sid)))
        del self._lens[sid]

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make sure the sequence has pages for num_tokens tokens in all (all or nothing: when
        the pages are not there, nothing is taken)."""
        seq_id = self._check(seq_id, "reserve")
        pages = self._pages[seq_id]
        need = -(-int(num_tokens) // self.block_size)
        if self.max_blocks_per_seq is not None and need > self.max_blocks_per_seq:
            raise RuntimeError(f"PagedKVCache: sequence {seq_id} needs {need} pages for "
                               f"{num_tokens} tokens, more than max_blocks_per_seq = "
                               f"{self.max_blocks_per_seq}")
        if need - len(pages) > len(self._free):
            raise RuntimeError(f"PagedKVCache: out of pages: sequence {seq_id} needs "
                               f"{need - len(pages)} more, {len(self._free)} are free")
        while len(pages) < need:
            pages.append(self._free.pop())

    def _check(self, seq_id, method: str = "", arg: str = "seq_id") -> int:
        """seq_id as the int id of a live sequence: TypeError for what is not an int (a string
        "0" is not sequence 0), KeyError for an id that is not live."""
        try:
            sid = None if isinstance(seq_id, bool) else operator.index(seq_id)
        except TypeError:
            sid = None
        if sid is None:
            raise TypeError(f"longctx.PagedKVCache.{method or 'seq_id'}: {arg} must be an int "
                            f"(an id from add_sequence), got {seq_id!r} "
                            f"({type(seq_id).__name__})")
        if sid not in self._pages:
            raise KeyError(f"PagedKVCache: no live sequence {sid}")
        return sid

    def _ids(self, seq_ids, method: str = "") -> List[int]:
        if seq_ids is None:
            ids = self.seq_ids
        else:
            if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
                raise TypeError(f"longctx.PagedKVCache.{method or 'seq_ids'}: seq_ids must be a "
                                f"sequence of ints (ids from add_sequence) or None, got "
                                f"{seq_ids!r} ({type(seq_ids).__name__})")
            ids = [self._check(s, method, "seq_ids") for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache: seq_ids has duplicates: {ids}")
        return ids

    def _check_device(self, method: str, **tensors) -> None:
        dev = self.k_cache.device
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"longctx.PagedKVCache.{method}: {name} must be a tensor, got "
                                f"{type(t).__name__}")
            if t.device != dev:
                raise RuntimeError(f"longctx.PagedKVCache.{method}: {name} must be on the "
                                   f"cache's device ({dev}), got {t.device}")

    # the plain tensors the ops take
    def block_table(self, seq_ids=None) -> torch.Tensor:
        ids = self._ids(seq_ids, "block_table")
        width = self.max_blocks_per_seq or max([len(self._pages[s]) for s in ids] + [1])
        table = torch.full((len(ids), width), -1, dtype=torch.int32)
        for row, s in enumerate(ids):
            pages = self._pages[s]
            if pages:
                table[row, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(self.k_cache.device)

    def cache_seqlens(self, seq_ids=None) -> torch.Tensor:
        ids = self._ids(seq_ids, "cache_seqlens")
        return torch.tensor([self._lens[s] for s in ids], dtype=torch.int32,
                            device=self.k_cache.device)

    def _scales(self):
        return self.k_scale, self.v_scale

    # append / attend
    def _calibration(self, x, name: str) -> torch.Tensor:
        """The fp8 scales of the first append, from x; a placeholder of the right shape where x
        has the wrong one (the op then rejects x by name; the placeholder is never stored)."""
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and \
                tuple(x.shape[-2:]) == (self.kv_heads, self.head_dim):
            return _fp8_scales(x, 1.0, "PagedKVCache.append", name)
        return torch.ones(self.kv_heads, dtype=torch.float32, device=self.k_cache.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, seq_ids=None, *,
               cu_new: Optional[Union[torch.Tensor, Sequence[int]]] = None,
               positions: Optional[torch.Tensor] = None, rope=None,
               rope_interleaved: bool = False) -> None:
        """Append new tokens to the sequences seq_ids: k/v (batch, seqlen_new, kv_heads,
        head_dim), or packed (total_new, kv_heads, head_dim) with cu_new offsets. Pages are
        allocated as needed; RoPE (rope = (inv_freq, attention_factor)) rotates K at
        `positions` (default: the cache positions); int8/fp8 caches quantize on write. An fp8
        cache without scales calibrates them from this k and v (ValueError if they hold NaN or
        an infinity). All or nothing: a call that raises leaves the cache as it was (pages,
        lengths, scales, pool contents)."""
        op = "PagedKVCache.append"
        ids = self._ids(seq_ids, "append")
        self._check_device("append", k=k, v=v)
        if cu_new is not None:
            cu_t = torch.as_tensor(cu_new, dtype=torch.int32)
            if cu_t.dim() != 1:
                raise ValueError(f"longctx.{op}: cu_new must be 1-D (batch + 1 offsets), got "
                                 f"shape {tuple(cu_t.shape)}")
            cu = [int(x) for x in cu_t.tolist()]
            if len(cu) != len(ids) + 1:
                raise ValueError(f"PagedKVCache.append: cu_new must have {len(ids) + 1} entries "
                                 f"(one more than the {len(ids)} sequences), got {len(cu)}")
            # the values before any page is taken for them (the op checks them again)
            check_cu_seqlens_values(cu, k.shape[0] if k.dim() == 3 else cu[-1], None, op,
                                    "cu_new")
            new = [cu[i + 1] - cu[i] for i in range(len(ids))]
            cu_t = cu_t.to(self.k_cache.device)
        else:
            if k.dim() != 4 or k.shape[0] != len(ids):
                raise ValueError(f"PagedKVCache.append: k must be (batch = {len(ids)}, seqlen_new, "
                                 f"kv_heads, head_dim) without cu_new, got {tuple(k.shape)}")
            new = [k.shape[1]] * len(ids)
            cu_t = None
        k_scale, v_scale = self.k_scale, self.v_scale
        calibrate = self.cache_dtype == torch.float8_e4m3fn and self.k_scale is None
        if calibrate:  # stored only once the append has succeeded
            k_scale, v_scale = self._calibration(k, "k"), self._calibration(v, "v")
        free_before = list(self._free)
        pages_before = {s: len(self._pages[s]) for s in ids}
        try:
            for s, n in zip(ids, new):
                self.reserve(s, self._lens[s] + n)
            kvcache_append(k, v, self.k_cache, self.v_cache, self.cache_seqlens(ids),
                           self.block_table(ids), k_scale=k_scale, v_scale=v_scale,
                           cu_new=cu_t, positions=positions, rope=rope,
                           rope_interleaved=rope_interleaved)
        except BaseException:
            # every check of the op runs before its first write: the pool is untouched, and
            # the pages taken above go back where they were
            self._free[:] = free_before
            for s, n in pages_before.items():
                del self._pages[s][n:]
            raise
        if calibrate:
            self.k_scale, self.v_scale = k_scale, v_scale
        for s, n in zip(ids, new):
            self._lens[s] += n

    def attend(self, q: torch.Tensor, seq_ids=None, *, causal: bool = True,
               window_size: Tuple[int, int] = (-1, -1), softmax_scale: Optional[float] = None,
               return_lse: bool = False, cu_seqlens_q=None, max_seqlen_q: Optional[int] = None,
               num_splits: int = 0, softcap: float = 0.0,
               sinks: Optional[torch.Tensor] = None):
        """Attention of q (the last positions of each sequence: (batch, seqlen_q, heads,
        head_dim), or packed with cu_seqlens_q) over everything cached for seq_ids; softcap
        and sinks as in flash_attn_func."""
        ids = self._ids(seq_ids, "attend")
        self._check_device("attend", q=q)
        if cu_seqlens_q is not None:
            cu_seqlens_q = torch.as_tensor(cu_seqlens_q, dtype=torch.int32).to(q.device)
            if max_seqlen_q is None:
                max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) \
                    if cu_seqlens_q.dim() == 1 and cu_seqlens_q.numel() >= 2 else 0
        return flash_attn_with_kvcache(
            q, self.k_cache, self.v_cache, self.cache_seqlens(ids), self.block_table(ids),
            softmax_scale=softmax_scale, causal=causal, window_size=window_size,
            return_lse=return_lse, k_scale=self.k_scale, v_scale=self.v_scale,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, num_splits=num_splits,
            softcap=softcap, sinks=sinks)

    def gather(self, seq_id: int, dtype: torch.dtype = torch.float32):
        """The sequence's K and V as contiguous (seqlen, kv_heads, head_dim) tensors,
        dequantized (x = stored * scale) and cast to dtype: for tests and debugging."""
        seq_id = self._check(seq_id, "gather")
        n = self.seqlen(seq_id)
        idx = torch.tensor(self._pages[seq_id], dtype=torch.long, device=self.k_cache.device)
        out = []
        for pool, scale in ((self.k_cache, self.k_scale), (self.v_cache, self.v_scale)):
            x = pool[idx].flatten(0, 1)[:n].float()
            if self.cache_dtype == torch.int8:
                x = x * scale[idx].flatten(0, 1)[:n, :, None]
            elif self.cache_dtype == torch.float8_e4m3fn:
                x = x * scale[None, :, None]
            out.append(x.to(dtype))
        return out[0], out[1]

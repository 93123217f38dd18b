"""Capacity planning for long-context inference with ring attention: pure integer arithmetic.

`make_plan(model, context, ...)` returns a `Plan`: KV-cache bytes, weight bytes, an activation
estimate and their sum per GPU against the GPU's memory, the minimum number of GPUs that holds it,
the attention FLOPs of a forward over the whole context, and the ring traffic of one step against
the compute of that step. Every byte and FLOP count is an exact int; times are floats.

Definitions (the units are exact: GB = 1e9 bytes, GiB = 2**30 bytes; K = 1024, M = 2**20 tokens):
- KV cache per token and layer: 2 (K and V) x kv_heads x head_dim x bytes of the KV dtype.
  int8 also stores one fp32 scale per (token, head) for K and for V: + 2 x kv_heads x 4 bytes.
  fp8 (e4m3) uses one fp32 scale per (layer, head) for K and for V, shared by all tokens:
  2 x kv_heads x 4 bytes per layer per GPU, counted once (negligible).
- Ring attention (context parallelism): the sequence is split evenly over the GPUs, each holds
  ceil(context / gpus) tokens of every sequence in the batch, for every layer. Weights are
  sharded evenly over the GPUs (context parallelism combined with tensor/pipeline parallelism or
  FSDP) unless `replicate_weights` (pure context parallelism: a full copy on every GPU).
- Parameters: embeddings (vocab x hidden), per layer q/k/v/o projections (GQA: k and v are
  hidden x kv_heads x head_dim; Qwen2 adds q/k/v biases), a gated MLP (3 x hidden x
  intermediate), two RMSNorm weights (2 x hidden); a final norm; an lm_head unless tied.
- Activations (prefill forward, one layer alive at a time, inference: nothing kept for backward):
  local_tokens x act_bytes x (2 hidden + 2 q_dim + 2 kv_dim + 2 intermediate)
  [residual + normed input, q + attention output, k + v, MLP gate + up], with
  local_tokens = batch x ceil(context / gpus), q_dim = heads x head_dim, kv_dim = kv_heads x
  head_dim, act_bytes = 2 (bf16 compute; 4 if the weights are fp32); plus, with more than one GPU,
  the ring's receive buffer: 2 x local_tokens x KV bytes per token and layer (double-buffered);
  plus the fp32 logits of the last position (batch x vocab x 4). A fixed reserve (default 2 GiB:
  CUDA context, allocator slack, communication buffers) is added on top.
- Attention FLOPs (docs/design.md): forward 4 x batch x heads x pairs x head_dim per layer,
  pairs = s (s + 1) / 2 causal, s^2 otherwise; backward 2.5 x forward.
- Ring step: each GPU sends its K/V shard of one layer (local_tokens x KV bytes per token and
  layer) to the next GPU while it computes attention of its queries against the shard it holds.
  With a load-balanced (zigzag) layout each of the gpus x gpus (query shard, key shard) steps does
  an equal share of the layer's work: forward FLOPs / gpus^2. Transfer time = shard bytes / link
  bandwidth (GB/s per direction); compute time = step FLOPs / (TFLOP/s x 1e12). The transfer hides
  behind compute when it is not longer.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, List, Optional, Tuple

from .models import ModelConfig, short_repr

__all__ = [
    "PlanError", "PlanDoesNotFit", "GpuSpec", "GPUS", "DTYPE_BYTES", "KV_DTYPES", "WEIGHT_DTYPES",
    "parse_tokens", "parse_gpu", "format_bytes", "format_tokens",
    "ParamCount", "param_count", "kv_bytes_per_token_per_layer", "kv_scale_bytes",
    "attention_pairs", "attention_fwd_flops", "attention_bwd_flops",
    "activation_bytes", "RopeReport", "rope_report", "model_context", "MemoryPerGpu",
    "memory_per_gpu",
    "RingStep", "ring_step", "Plan", "make_plan", "min_gpus",
    "DEFAULT_LINK_GBPS", "DEFAULT_TFLOPS", "DEFAULT_RESERVE_BYTES", "format_number",
]


class PlanError(ValueError):
    """An input that makes no plan (the message is one line, meant for the user)."""


class PlanDoesNotFit(PlanError):
    """No number of GPUs holds the plan."""


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
KV_DTYPES = ("bf16", "fp16", "fp8", "int8")
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")
SCALE_BYTES = 4  # fp32 scales of the quantized KV caches

DEFAULT_LINK_GBPS = 450.0  # NVLink 4 (H100/H200 SXM): 900 GB/s both directions, 450 each way
DEFAULT_TFLOPS = 600.0  # sustained bf16 attention rate assumed per GPU (H100 SXM peak: 989)
DEFAULT_RESERVE_BYTES = 2 << 30
MAX_GPUS = 1 << 16
# Bounds that keep every figure finite and exact (byte and FLOP counts stay far below 2^1024):
# contexts, batches and memory sizes beyond them describe no machine.
MAX_CONTEXT = 1 << 40
MAX_BATCH = (1 << 31) - 1
MAX_GIB = float(1 << 20)  # GPU memory and the reserve, in GiB (1 PiB)
MIN_GPU_GIB = 0.001
RATE_RANGE = (1e-6, 1e9)  # link GB/s and TFLOP/s


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int  # what the driver reports as total memory


# Total memory as nvidia-smi reports it (MiB): H100 SXM 80GB HBM3 81559 MiB, H200 141GB 143771.
GPUS = {
    "h100": GpuSpec("H100 SXM 80GB", 81559 << 20),
    "h200": GpuSpec("H200 SXM 141GB", 143771 << 20),
}

_TOKEN_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_tokens(text: str | int) -> int:
    """'131072', '128k', '128K', '1M', '1.5M' -> tokens. Suffixes are binary: K = 1024,
    M = 1048576, G = 2**30 (what "128K context" means for every model card). The result must be a
    positive whole number of at most MAX_CONTEXT (2^40)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)\s*([kKmMgG]?)", s)
        if not m:
            raise PlanError(f"cannot read {short_repr(text)} as a token count (examples: 131072, "
                            "128k, 1M)")
        num, suffix = m.group(1), m.group(2).lower()
        if len(num.lstrip("+-").split(".")[0].lstrip("0")) > 16:  # past 2^40 whatever the suffix
            raise PlanError(f"the token count must be at most {MAX_CONTEXT:,} (2^40), got "
                            f"{short_repr(text)}")
        if len(num) > 64:
            raise PlanError(f"cannot read {short_repr(text)} as a token count: too many digits")
        value = _scaled_whole(num, _TOKEN_SUFFIX[suffix], text)
    if value <= 0:
        raise PlanError(f"the token count must be positive, got {short_repr(text)}")
    if value > MAX_CONTEXT:
        raise PlanError(f"the token count must be at most {MAX_CONTEXT:,} (2^40), got "
                        f"{short_repr(text)}")
    return value


def _scaled_whole(num: str, mult: int, text: Any) -> int:
    """The decimal string `num` times `mult`, which must be a whole number."""
    if "." not in num:
        return int(num) * mult
    whole, frac = num.split(".")
    scaled = int(whole + frac) * mult
    div = 10 ** len(frac)
    if scaled % div:
        raise PlanError(f"{short_repr(text)} is not a whole number of tokens")
    return scaled // div


def parse_gpu(text: str) -> GpuSpec:
    """'h100', 'h200' or a memory size in GiB ('80', '141.5')."""
    key = str(text).strip().lower()
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(key.removesuffix("gib").removesuffix("gb"))
    except ValueError:
        raise PlanError(f"unknown GPU {short_repr(text)}; use one of {', '.join(GPUS)} or a memory "
                        "size in GiB such as 80") from None
    if not math.isfinite(gib) or not MIN_GPU_GIB <= gib <= MAX_GIB:
        raise PlanError(f"GPU memory must be a positive number of GiB from {MIN_GPU_GIB:g} up to "
                        f"{MAX_GIB:,.0f}, got {short_repr(text)}")
    return GpuSpec(f"{gib:g} GiB GPU", int(round(gib * (1 << 30))))


def format_bytes(n: int) -> str:
    """Bytes in both unit systems: '327,680 B (320.00 KiB)', '42.95 GB (40.00 GiB)'.
    Below 1 MB the exact count is shown; from there decimal (MB, GB, TB; 1e3 steps) and binary
    (MiB, GiB, TiB; 2**10 steps) values with two decimals."""
    if n < 1024:
        return f"{n:,} B"
    if n < 10 ** 6:
        return f"{n:,} B ({n / 1024:.2f} KiB)"
    dec = next((u, p) for u, p in (("TB", 12), ("GB", 9), ("MB", 6)) if n >= 10 ** p)
    binu = next((u, p) for u, p in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10))
                if n >= 1 << p)
    return f"{n / 10 ** dec[1]:.2f} {dec[0]} ({n / (1 << binu[1]):.2f} {binu[0]})"


def format_tokens(n: int) -> str:
    """131072 -> '131,072 (128K)'; exact binary multiples get their short form."""
    for suffix, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n:,} ({n // mult}{suffix})"
    return f"{n:,}"


# ---------------------------------------------------------------------------- model arithmetic


@dataclasses.dataclass(frozen=True)
class ParamCount:
    embedding: int
    attention_per_layer: int
    mlp_per_layer: int
    norms_per_layer: int
    final_norm: int
    lm_head: int
    total: int


def param_count(m: ModelConfig) -> ParamCount:
    q_dim, kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    attn = m.hidden_size * q_dim + 2 * m.hidden_size * kv_dim + q_dim * m.hidden_size
    if m.qkv_bias:
        attn += q_dim + 2 * kv_dim
    mlp = 3 * m.hidden_size * m.intermediate_size
    norms = 2 * m.hidden_size
    embedding = m.vocab_size * m.hidden_size
    lm_head = 0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size
    total = embedding + m.num_layers * (attn + mlp + norms) + m.hidden_size + lm_head
    return ParamCount(embedding, attn, mlp, norms, m.hidden_size, lm_head, total)


def kv_bytes_per_token_per_layer(m: ModelConfig, kv_dtype: str) -> int:
    """K and V of one token in one layer, with int8's per-(token, head) fp32 scales."""
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"unknown KV dtype {kv_dtype!r}; use one of {', '.join(KV_DTYPES)}")
    b = 2 * m.num_kv_heads * m.head_dim * DTYPE_BYTES[kv_dtype]
    if kv_dtype == "int8":
        b += 2 * m.num_kv_heads * SCALE_BYTES
    return b


def kv_scale_bytes(m: ModelConfig, kv_dtype: str) -> int:
    """fp8's per-(layer, head) fp32 scales for K and V, held once per GPU; 0 for other dtypes."""
    return m.num_layers * 2 * m.num_kv_heads * SCALE_BYTES if kv_dtype == "fp8" else 0


def attention_pairs(seqlen: int, causal: bool = True) -> int:
    """(query, key) pairs a self-attention mask keeps over one sequence."""
    return seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen


def attention_fwd_flops(m: ModelConfig, seqlen: int, batch: int = 1, causal: bool = True) -> int:
    """Forward FLOPs of one attention layer: 4 x batch x heads x pairs x head_dim."""
    return 4 * batch * m.num_heads * attention_pairs(seqlen, causal) * m.head_dim


def attention_bwd_flops(m: ModelConfig, seqlen: int, batch: int = 1, causal: bool = True) -> int:
    """Backward FLOPs of one attention layer: 2.5 x forward (exact: forward is a multiple of 4)."""
    return attention_fwd_flops(m, seqlen, batch, causal) * 5 // 2


def _local_tokens(context: int, gpus: int, batch: int) -> int:
    return batch * -(-context // gpus)


def activation_bytes(m: ModelConfig, context: int, gpus: int, batch: int, kv_dtype: str,
                     weight_dtype: str = "bf16") -> int:
    """The activation estimate per GPU (formula in the module docstring)."""
    act = 4 if weight_dtype == "fp32" else 2
    q_dim, kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    local = _local_tokens(context, gpus, batch)
    per_token = act * (2 * m.hidden_size + 2 * q_dim + 2 * kv_dim + 2 * m.intermediate_size)
    ring = 2 * local * kv_bytes_per_token_per_layer(m, kv_dtype) if gpus > 1 else 0
    logits = batch * m.vocab_size * 4
    return local * per_token + ring + logits


@dataclasses.dataclass(frozen=True)
class MemoryPerGpu:
    weights: int
    kv_cache: int
    activations: int
    reserve: int
    total: int
    capacity: int
    fits: bool


def memory_per_gpu(m: ModelConfig, context: int, gpus: int, *, batch: int = 1,
                   kv_dtype: str = "bf16", weight_dtype: str = "bf16", capacity: int,
                   replicate_weights: bool = False,
                   reserve: int = DEFAULT_RESERVE_BYTES) -> MemoryPerGpu:
    weight_total = param_count(m).total * DTYPE_BYTES[weight_dtype]
    weights = weight_total if replicate_weights else -(-weight_total // gpus)
    kv = (m.num_layers * _local_tokens(context, gpus, batch) * kv_bytes_per_token_per_layer(
        m, kv_dtype) + kv_scale_bytes(m, kv_dtype))
    act = activation_bytes(m, context, gpus, batch, kv_dtype, weight_dtype)
    total = weights + kv + act + reserve
    return MemoryPerGpu(weights, kv, act, reserve, total, capacity, total <= capacity)


def min_gpus(m: ModelConfig, context: int, *, capacity: int, **kw) -> Optional[int]:
    """The fewest GPUs (at most min(context, 65536)) whose memory holds the plan, or None.
    Memory per GPU never grows with the GPU count, so a binary search finds it."""
    hi = min(context, MAX_GPUS)
    if not memory_per_gpu(m, context, hi, capacity=capacity, **kw).fits:
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if memory_per_gpu(m, context, mid, capacity=capacity, **kw).fits:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclasses.dataclass(frozen=True)
class RingStep:
    gpus: int
    shard_tokens: int  # tokens of every sequence in the batch one GPU holds
    shard_bytes_per_layer: int  # K/V bytes one GPU sends per step (one layer)
    steps_per_layer: int  # transfers per layer: gpus - 1
    transfer_s: float
    compute_flops: int  # forward FLOPs per GPU per step, load-balanced layout
    compute_s: float
    hidden: bool  # transfer_s <= compute_s


def ring_step(m: ModelConfig, context: int, gpus: int, *, batch: int = 1, kv_dtype: str = "bf16",
              causal: bool = True, link_gbps: float = DEFAULT_LINK_GBPS,
              tflops: float = DEFAULT_TFLOPS) -> RingStep:
    local = _local_tokens(context, gpus, batch)
    shard = local * kv_bytes_per_token_per_layer(m, kv_dtype)
    flops = attention_fwd_flops(m, context, batch, causal) // (gpus * gpus)
    transfer = shard / (link_gbps * 1e9) if gpus > 1 else 0.0
    compute = flops / (tflops * 1e12)
    return RingStep(gpus, local // batch, shard, gpus - 1, transfer, flops, compute,
                    transfer <= compute)


@dataclasses.dataclass(frozen=True)
class RopeReport:
    rope_type: str
    theta: float
    rotary_dim: int
    factor: Optional[float]
    attention_factor: float
    notes: List[str]
    max_context: Optional[int] = None  # the longest context the model is made for (model_context)
    max_context_source: str = ""  # the config fields max_context comes from


def model_context(m: ModelConfig) -> Tuple[Optional[int], str]:
    """The longest context the model is made for, and the config fields it comes from.

    A rope_scaling that states a factor and original_max_position_embeddings (there or at the top
    level) extends the original context by the factor: YaRN factor 4 over 32K is a 128K model,
    whatever max_position_embeddings says (Qwen2.5's model cards keep it at 32K). Otherwise, and
    when it is larger (Llama 3.1: llama3 factor 8 over 8K, trained to 128K), the context is
    max_position_embeddings."""
    scaling = m.rope_scaling or {}
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings",
                           m.original_max_position_embeddings)
    scaled = None
    if (isinstance(factor, (int, float)) and not isinstance(factor, bool)
            and isinstance(original, int) and math.isfinite(factor) and factor > 1):
        scaled = int(factor * original)
    mpe = m.max_position_embeddings
    if scaled is not None and (mpe is None or scaled > mpe):
        rope_type = scaling.get("rope_type", scaling.get("type", "rope_scaling"))
        return scaled, (f"{rope_type} factor {factor:g} x original_max_position_embeddings "
                        f"{original:,}")
    if mpe is not None:
        return mpe, "max_position_embeddings"
    return None, ""


def rope_report(m: ModelConfig, context: int) -> RopeReport:
    """Validates the model's RoPE settings with longctx.rope_frequencies and reports them.
    Raises PlanError when rope_scaling is malformed."""
    from ..rope_scaling import rope_frequencies

    scaling = dict(m.rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    has_original = (scaling.get("original_max_position_embeddings") is not None
                    or m.original_max_position_embeddings is not None)
    # YaRN checks max_position_embeddings == factor x original; configs that follow a model
    # card's advice (add rope_scaling, keep max_position_embeddings) state the original length
    # explicitly, so the check is only asked for where the original length must come from it.
    pass_max = rope_type in ("dynamic", "longrope") or not has_original
    rotary_dim = int(m.head_dim * m.partial_rotary_factor)
    try:
        freqs = rope_frequencies(
            m.head_dim, m.rope_theta, scaling or None, rotary_dim=rotary_dim,
            max_position_embeddings=m.max_position_embeddings if pass_max else None,
            original_max_position_embeddings=m.original_max_position_embeddings,
            seq_len=context)
    except (ValueError, TypeError, OverflowError) as e:  # a value of a wrong type or size
        raise PlanError(f"{m.name}: the RoPE settings (rope_theta, rope_scaling, head_dim, "
                        f"partial_rotary_factor) are not valid: {e}") from None
    notes = []
    max_context, source = model_context(m)
    if max_context is not None and context > max_context:
        notes.append(f"the context ({context:,}) is longer than the model's ({max_context:,}, "
                     f"{source}): quality past it is not what the model was trained for")
    if context > 1 << 24:
        notes.append("positions past 2^24 lose exactness in longctx's fp32 RoPE angles")
    if m.sliding_window:
        notes.append(f"the config uses a sliding window of {m.sliding_window:,} tokens; this plan "
                     "keeps every token's K/V (full attention), an upper bound")
    factor = scaling.get("factor")
    return RopeReport(rope_type, m.rope_theta, rotary_dim,
                      float(factor) if factor is not None else None, freqs.attention_factor,
                      notes, max_context, source)


# ---------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    context: int
    batch: int
    gpus: int
    gpus_given: bool  # False: gpus is the minimum that fits
    gpu: str
    kv_dtype: str
    weight_dtype: str
    causal: bool
    replicate_weights: bool
    link_gbps: float
    tflops: float
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int  # all layers
    kv_bytes_per_sequence: int
    kv_bytes_total: int  # the whole batch, all GPUs together
    params: ParamCount
    weight_bytes: int
    memory: MemoryPerGpu
    min_gpus: Optional[int]
    attention_pairs: int  # per sequence
    attention_fwd_flops_per_layer: int
    attention_bwd_flops_per_layer: int
    attention_fwd_flops: int  # all layers
    ring: RingStep
    rope: RopeReport

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        d["units"] = {"bytes": "B", "flops": "FLOP", "time": "s", "link_gbps": "1e9 B/s",
                      "tflops": "1e12 FLOP/s", "tokens": "K = 1024, M = 1048576"}
        return d


def format_number(x: float) -> str:
    """1048576 -> '1,048,576', 1e-06 -> '1e-06': whole numbers with separators."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _in_range(name: str, v, lo, hi, whole: bool = True):
    """v must be a finite number (a whole one when `whole`) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanError(f"{name} must be a number, got {short_repr(v)}")
    if whole and isinstance(v, float) and (not math.isfinite(v) or int(v) != v):
        raise PlanError(f"{name} must be a whole number, got {short_repr(v)}")
    if not (isinstance(v, int) or math.isfinite(v)) or not lo <= v <= hi:
        if lo == 1 and whole:
            raise PlanError(f"{name} must be positive and at most {hi:,}, got {short_repr(v)}")
        raise PlanError(f"{name} must be a number from {format_number(lo)} to "
                        f"{format_number(hi)}, got {short_repr(v)}")


def make_plan(m: ModelConfig, context: int, *, gpus: Optional[int] = None, gpu: GpuSpec = GPUS[
        "h100"], batch: int = 1, kv_dtype: str = "bf16", weight_dtype: str = "bf16",
              causal: bool = True, replicate_weights: bool = False,
              link_gbps: float = DEFAULT_LINK_GBPS, tflops: float = DEFAULT_TFLOPS,
              reserve: int = DEFAULT_RESERVE_BYTES) -> Plan:
    """The plan for `batch` sequences of `context` tokens over `gpus` GPUs (None: the fewest
    that fit). Raises PlanError for inputs that make no plan, and when gpus is None and no
    number of GPUs holds it. A plan for a given gpus that does not fit is returned with
    fits == False (the caller decides what to do)."""
    _in_range("context", context, 1, MAX_CONTEXT)
    _in_range("batch", batch, 1, MAX_BATCH)
    _in_range("link bandwidth (GB/s)", link_gbps, *RATE_RANGE, whole=False)
    _in_range("TFLOP/s", tflops, *RATE_RANGE, whole=False)
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"unknown KV dtype {kv_dtype!r}; use one of {', '.join(KV_DTYPES)}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise PlanError(f"unknown weight dtype {weight_dtype!r}; use one of "
                        f"{', '.join(WEIGHT_DTYPES)}")
    _in_range("the memory reserve (bytes)", reserve, 0, int(MAX_GIB) << 30)
    if gpus is not None:
        _in_range("the number of GPUs", gpus, 1, MAX_GPUS)
        if gpus > context:
            raise PlanError(f"{gpus} GPUs cannot split a context of {context:,} tokens (ring "
                            "attention needs at least one token per GPU)")
    rope = rope_report(m, context)
    mem_kw = dict(batch=batch, kv_dtype=kv_dtype, weight_dtype=weight_dtype,
                  replicate_weights=replicate_weights, reserve=reserve)
    fewest = min_gpus(m, context, capacity=gpu.memory_bytes, **mem_kw)
    gpus_given = gpus is not None
    if not gpus_given:
        if fewest is None:
            limit = min(context, MAX_GPUS)
            need = memory_per_gpu(m, context, limit, capacity=gpu.memory_bytes, **mem_kw).total
            why = (" (the weights are replicated on every GPU)" if replicate_weights else "")
            raise PlanDoesNotFit(f"{m.name} at {context:,} tokens does not fit on any number of "
                            f"{gpu.name} GPUs up to {limit:,}: {format_bytes(need)} per GPU "
                            f"against {format_bytes(gpu.memory_bytes)}{why}")
        gpus = fewest
    per_layer = kv_bytes_per_token_per_layer(m, kv_dtype)
    fwd_layer = attention_fwd_flops(m, context, batch, causal)
    return Plan(
        model=m.name, context=context, batch=batch, gpus=gpus, gpus_given=gpus_given,
        gpu=gpu.name, kv_dtype=kv_dtype, weight_dtype=weight_dtype, causal=causal,
        replicate_weights=replicate_weights, link_gbps=float(link_gbps), tflops=float(tflops),
        kv_bytes_per_token_per_layer=per_layer,
        kv_bytes_per_token=m.num_layers * per_layer,
        kv_bytes_per_sequence=m.num_layers * per_layer * context + kv_scale_bytes(m, kv_dtype),
        kv_bytes_total=m.num_layers * per_layer * context * batch + kv_scale_bytes(m, kv_dtype),
        params=param_count(m),
        weight_bytes=param_count(m).total * DTYPE_BYTES[weight_dtype],
        memory=memory_per_gpu(m, context, gpus, capacity=gpu.memory_bytes, **mem_kw),
        min_gpus=fewest,
        attention_pairs=attention_pairs(context, causal),
        attention_fwd_flops_per_layer=fwd_layer,
        attention_bwd_flops_per_layer=fwd_layer * 5 // 2,
        attention_fwd_flops=fwd_layer * m.num_layers,
        ring=ring_step(m, context, gpus, batch=batch, kv_dtype=kv_dtype, causal=causal,
                       link_gbps=link_gbps, tflops=tflops),
        rope=rope,
    )

"""RoPE inverse frequencies with every context-extension scaling in use today.

`rope_frequencies(head_dim, base, scaling)` takes a HuggingFace-style `rope_scaling` dict and
returns fp32 inverse frequencies (rotary_dim / 2 of them) and the attention factor that multiplies
cos and sin. The arithmetic is done in float64 and rounded once to fp32, following the published
definitions (the same formulas as transformers' modeling_rope_utils):

- default:  inv_freq[i] = base ** (-2i / dim)
- linear:   position interpolation (Chen et al. 2023): inv_freq / factor
- ntk:      static NTK-aware scaling (bloc97): base' = base * factor ** (dim / (dim - 2))
- dynamic:  dynamic NTK: base' = base * (factor * L / L0 - (factor - 1)) ** (dim / (dim - 2)),
            L = max(seq_len, L0), L0 = max_position_embeddings
- yarn:     YaRN (Peng et al. 2023): per-frequency blend of interpolation and extrapolation over
            the correction range [beta_fast, beta_slow] rotations, attention factor
            0.1 * ln(factor) + 1 (or the mscale / mscale_all_dim ratio, or attention_factor)
- llama3:   Llama 3.1: low frequencies / factor, high frequencies kept, a smooth ramp between
- longrope: LongRoPE / Phi-3: inv_freq / ext_factor[i], long_factor past the original context,
            short_factor within it; attention factor sqrt(1 + ln(factor) / ln(L0))
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

__all__ = ["RopeFrequencies", "rope_frequencies", "ROPE_TYPES"]


class RopeFrequencies(NamedTuple):
    inv_freq: torch.Tensor  # fp32, (rotary_dim // 2,)
    attention_factor: float


_COMMON_KEYS = {"rope_type", "type", "rope_theta"}
_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "longrope": {"short_factor", "long_factor", "factor", "attention_factor",
                 "original_max_position_embeddings"},
}
ROPE_TYPES = tuple(_KEYS)


def _err(rope_type: str, msg: str) -> ValueError:
    return ValueError(f"longctx.rope_frequencies: rope_scaling[{rope_type!r}]: {msg}")


def _number(scaling: Mapping[str, Any], key: str, rope_type: str, default=None, *,
            required=False, minimum=None, strict_min=False):
    if key not in scaling or scaling[key] is None:
        if required:
            raise _err(rope_type, f"missing required parameter {key!r}")
        return default
    v = scaling[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(rope_type, f"parameter {key!r} must be a finite number, got {v!r}")
    v = float(v)
    if minimum is not None and (v < minimum or (strict_min and v == minimum)):
        op = ">" if strict_min else ">="
        raise _err(rope_type, f"parameter {key!r} must be {op} {minimum}, got {v}")
    return v


def _resolve_same(name: str, a, b, rope_type: str):
    """Two sources for one value (dict and keyword): use either, but they must agree."""
    if a is None:
        return b
    if b is not None and float(a) != float(b):
        raise _err(rope_type, f"{name} is given twice with different values: {a} in rope_scaling "
                              f"and {b} as an argument")
    return a


def _length(name: str, v, rope_type: str):
    """A context length (None passes): a finite number >= 1."""
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                          not math.isfinite(v) or v < 1):
        raise _err(rope_type, f"{name} must be a finite number >= 1, got {v!r}")
    return v


def _default_inv_freq(base: float, dim: int) -> list[float]:
    return [base ** (-(2 * i) / dim) for i in range(dim // 2)]


def _yarn(scaling, base, dim, max_pos, orig_arg):
    """YaRN as the paper defines it: `factor` is the scale s and original_max_position_embeddings
    the pretrained length L. max_position_embeddings stands in for a missing L. Given both, it
    must be L (left unchanged, as Qwen2.5's model card pairs factor 4 with it) or s * L (the
    extended context, as DeepSeek-V3's config states it); any other value contradicts factor:
    transformers versions differ on whether factor or max_position_embeddings / L wins, so it
    is an error rather than a guess."""
    t = "yarn"
    factor = _number(scaling, "factor", t, required=True, minimum=1.0)
    orig = _length("original_max_position_embeddings", _resolve_same(
        "original_max_position_embeddings", scaling.get("original_max_position_embeddings"),
        orig_arg, t), t)
    max_pos = _length("max_position_embeddings", max_pos, t)
    if orig is None:
        orig = max_pos
        if orig is None:
            raise _err(t, "needs original_max_position_embeddings (in rope_scaling or as an "
                          "argument) or max_position_embeddings: the pretrained context length")
    elif max_pos is not None and not (
            math.isclose(max_pos, orig, rel_tol=1e-9) or
            math.isclose(max_pos, factor * orig, rel_tol=1e-9)):
        raise _err(t, f"contradictory max_position_embeddings = {max_pos}: it must be "
                      f"original_max_position_embeddings = {orig} (the pretrained context, left "
                      f"unchanged) or factor * original_max_position_embeddings = {factor} * "
                      f"{orig} = {factor * orig} (the extended context); "
                      f"max_position_embeddings / original_max_position_embeddings = "
                      f"{max_pos / orig:g} contradicts factor = {factor}")
    orig = float(orig)
    beta_fast = _number(scaling, "beta_fast", t, 32.0, minimum=0.0, strict_min=True)
    beta_slow = _number(scaling, "beta_slow", t, 1.0, minimum=0.0, strict_min=True)
    if beta_fast <= beta_slow:
        raise _err(t, f"beta_fast ({beta_fast}) must be greater than beta_slow ({beta_slow})")
    mscale = _number(scaling, "mscale", t)
    mscale_all_dim = _number(scaling, "mscale_all_dim", t)
    attention_factor = _number(scaling, "attention_factor", t, minimum=0.0, strict_min=True)
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise _err(t, f"parameter 'truncate' must be a bool, got {truncate!r}")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    elif mscale is not None or mscale_all_dim is not None:
        raise _err(t, "give either attention_factor or mscale/mscale_all_dim, not both")

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the published code's guard against a zero-width ramp
    inv = []
    for i in range(dim // 2):
        extrap = base ** (-(2 * i) / dim)
        interp = extrap / factor
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrap_weight = 1.0 - ramp
        inv.append(interp * (1 - extrap_weight) + extrap * extrap_weight)
    return inv, attention_factor


def _llama3(scaling, base, dim, orig_arg):
    t = "llama3"
    factor = _number(scaling, "factor", t, required=True, minimum=1.0)
    low_ff = _number(scaling, "low_freq_factor", t, required=True, minimum=0.0, strict_min=True)
    high_ff = _number(scaling, "high_freq_factor", t, required=True, minimum=0.0, strict_min=True)
    orig = _resolve_same("original_max_position_embeddings",
                         scaling.get("original_max_position_embeddings"), orig_arg, t)
    if orig is None:
        raise _err(t, "missing required parameter 'original_max_position_embeddings'")
    if high_ff <= low_ff:
        raise _err(t, f"high_freq_factor ({high_ff}) must be greater than low_freq_factor "
                      f"({low_ff})")
    low_wavelen, high_wavelen = orig / low_ff, orig / high_ff
    inv = []
    for f in _default_inv_freq(base, dim):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            inv.append(f)
        elif wavelen > low_wavelen:
            inv.append(f / factor)
        else:
            smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
            inv.append((1 - smooth) * f / factor + smooth * f)
    return inv, 1.0


def _longrope(scaling, base, dim, max_pos, orig_arg, seq_len):
    t = "longrope"
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    for name, v in (("short_factor", short), ("long_factor", long)):
        if v is None:
            raise _err(t, f"missing required parameter {name!r}")
        if not isinstance(v, Sequence) or len(v) != dim // 2:
            n = len(v) if isinstance(v, Sequence) else type(v).__name__
            raise _err(t, f"{name} must be a list of rotary_dim / 2 = {dim // 2} numbers, got {n}")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v):
            raise _err(t, f"{name} must hold finite positive numbers")
    orig = _resolve_same("original_max_position_embeddings",
                         scaling.get("original_max_position_embeddings"), orig_arg, t)
    factor = _number(scaling, "factor", t, minimum=0.0, strict_min=True)
    if orig is None:
        if max_pos is None:
            raise _err(t, "needs original_max_position_embeddings (the pretrained context)")
        orig = max_pos
    elif max_pos is not None:
        ratio = max_pos / orig
        if factor is not None and not math.isclose(factor, ratio, rel_tol=1e-9):
            raise _err(t, f"contradictory factor: factor={factor} but max_position_embeddings / "
                          f"original_max_position_embeddings = {max_pos} / {orig} = {ratio}")
        factor = ratio
    if factor is None:
        factor = 1.0
    attention_factor = _number(scaling, "attention_factor", t, minimum=0.0, strict_min=True)
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = long if (seq_len is not None and seq_len > orig) else short
    inv = [f / float(e) for f, e in zip(_default_inv_freq(base, dim), ext)]
    return inv, attention_factor


def rope_frequencies(
    head_dim: int,
    base: Optional[float] = None,
    scaling: Optional[Mapping[str, Any]] = None,
    *,
    partial_rotary_factor: float = 1.0,
    rotary_dim: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
    original_max_position_embeddings: Optional[int] = None,
    seq_len: Optional[int] = None,
    device: Optional[torch.device | str] = None,
) -> RopeFrequencies:
    """Inverse frequencies (fp32, rotary_dim // 2) and attention factor for RoPE.

    head_dim: the attention head size. base: rope_theta (default 10000; may also come as
    scaling["rope_theta"]). scaling: a HuggingFace `rope_scaling` dict with "rope_type" (or the
    legacy "type") in ROPE_TYPES, or None for plain RoPE. rotary_dim or partial_rotary_factor:
    how many channels rotate (rotary_dim = int(head_dim * partial_rotary_factor), even).
    max_position_embeddings: the model's context (dynamic NTK's L0; LongRoPE checks it against
    factor * original; YaRN takes it as the original length when none is given, and otherwise
    requires it to be the original length or factor * original). seq_len: the current length
    for dynamic NTK and LongRoPE.
    Unknown types, unknown or missing keys and contradictory values raise ValueError (naming the
    parameter); a scaling that is not a dict, TypeError.
    """
    if scaling is not None and not isinstance(scaling, Mapping):
        raise TypeError(f"longctx.rope_frequencies: scaling must be a rope_scaling dict (e.g. "
                        f"{{'rope_type': 'linear', 'factor': 4.0}}) or None, got {scaling!r} "
                        f"({type(scaling).__name__})")
    scaling = dict(scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if "rope_type" in scaling and "type" in scaling and scaling["rope_type"] != scaling["type"]:
        raise ValueError(f"longctx.rope_frequencies: rope_scaling has rope_type="
                         f"{scaling['rope_type']!r} and type={scaling['type']!r}; give one")
    if not isinstance(rope_type, str) or rope_type not in _KEYS:
        raise ValueError(f"longctx.rope_frequencies: unknown rope_type {rope_type!r}; supported: "
                         f"{', '.join(ROPE_TYPES)}")
    unknown = set(scaling) - _KEYS[rope_type] - _COMMON_KEYS
    if unknown:
        raise _err(rope_type, f"unknown parameter(s) {sorted(unknown)}; accepted: "
                              f"{sorted(_KEYS[rope_type])}")
    theta = _resolve_same("rope_theta (base)", scaling.get("rope_theta"), base, rope_type)
    base = 10000.0 if theta is None else float(theta)
    if not (math.isfinite(base) and base > 1.0):
        raise ValueError(f"longctx.rope_frequencies: base must be a finite number > 1, got {base}")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"longctx.rope_frequencies: head_dim must be a positive int, got "
                         f"{head_dim!r}")
    if rotary_dim is None:
        if not (0 < partial_rotary_factor <= 1):
            raise ValueError("longctx.rope_frequencies: partial_rotary_factor must lie in (0, 1], "
                             f"got {partial_rotary_factor}")
        dim = int(head_dim * partial_rotary_factor)
    else:
        if partial_rotary_factor != 1.0 and rotary_dim != int(head_dim * partial_rotary_factor):
            raise ValueError(f"longctx.rope_frequencies: rotary_dim={rotary_dim} contradicts "
                             f"partial_rotary_factor={partial_rotary_factor} (head_dim "
                             f"{head_dim}); give one")
        dim = rotary_dim
    if dim < 2 or dim % 2 or dim > head_dim:
        raise ValueError(f"longctx.rope_frequencies: rotary_dim must be even and in [2, "
                         f"head_dim={head_dim}], got {dim}")
    for name, v in (("max_position_embeddings", max_position_embeddings),
                    ("original_max_position_embeddings", original_max_position_embeddings),
                    ("seq_len", seq_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"longctx.rope_frequencies: {name} must be a positive int, got {v!r}")

    attention_factor = 1.0
    if rope_type == "default":
        inv = _default_inv_freq(base, dim)
    elif rope_type == "linear":
        factor = _number(scaling, "factor", rope_type, required=True, minimum=1.0)
        inv = [f / factor for f in _default_inv_freq(base, dim)]
    elif rope_type == "ntk":
        factor = _number(scaling, "factor", rope_type, required=True, minimum=1.0)
        inv = _default_inv_freq(base * factor ** (dim / (dim - 2)), dim) if dim > 2 else \
            _default_inv_freq(base, dim)
    elif rope_type == "dynamic":
        factor = _number(scaling, "factor", rope_type, required=True, minimum=1.0)
        l0 = _resolve_same("original_max_position_embeddings",
                           scaling.get("original_max_position_embeddings"),
                           original_max_position_embeddings, rope_type) or max_position_embeddings
        if l0 is None:
            raise _err(rope_type, "needs max_position_embeddings (the pretrained context length)")
        length = seq_len if seq_len is not None and seq_len > l0 else l0
        scaled = base * ((factor * length / l0) - (factor - 1)) ** (dim / (dim - 2)) \
            if dim > 2 else base
        inv = _default_inv_freq(scaled, dim)
    elif rope_type == "yarn":
        inv, attention_factor = _yarn(scaling, base, dim, max_position_embeddings,
                                      original_max_position_embeddings)
    elif rope_type == "llama3":
        inv, attention_factor = _llama3(scaling, base, dim, original_max_position_embeddings)
    else:
        inv, attention_factor = _longrope(scaling, base, dim, max_position_embeddings,
                                          original_max_position_embeddings, seq_len)
    inv_freq = torch.tensor(inv, dtype=torch.float64).to(dtype=torch.float32, device=device)
    return RopeFrequencies(inv_freq, float(attention_factor))

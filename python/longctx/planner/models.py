"""Model shapes for capacity planning: built-in presets and HuggingFace config.json parsing.

A `ModelConfig` holds only what the planner (plan.py) needs: the transformer's shape (layers,
hidden size, attention heads with GQA, gated-MLP width, vocabulary, tied embeddings, q/k/v
biases) and its RoPE settings (rope_theta, rope_scaling, context lengths).

The presets are copied from the models' published config.json files (the base checkpoints):
Llama 2 / 3.1 / 3.2 (meta-llama), Mistral 7B v0.3 and Mistral NeMo 12B (mistralai), Qwen2.5
(Qwen). Every preset is a decoder of the Llama family: RMSNorm (one weight vector, no bias),
a SwiGLU MLP (gate, up, down projections), RoPE. `load_config` reads any config.json of that family
(model_type llama, mistral, qwen2, ... ) and names the field that is missing or malformed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["ModelConfig", "ModelConfigError", "PRESETS", "load_config", "resolve_model",
           "short_repr"]


class ModelConfigError(ValueError):
    """An unknown preset or a config.json that cannot be planned (the message says why)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k and v (not on o)
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: Optional[int] = None
    original_max_position_embeddings: Optional[int] = None  # top-level (Phi-3 LongRoPE style)
    sliding_window: Optional[int] = None  # only when the config turns it on


def _llama31_scaling(factor: float = 8.0) -> Dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# What the models of a family share (the checkpoints' config.json files agree on these).
_LLAMA31 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
_LLAMA32 = dict(_LLAMA31, tie_word_embeddings=True, rope_scaling=_llama31_scaling(32.0))
_QWEN25 = dict(vocab_size=152064, qkv_bias=True, rope_theta=1000000.0,
               max_position_embeddings=131072)


def _model(name, layers, hidden, heads, kv_heads, head_dim, intermediate, **kw) -> ModelConfig:
    return ModelConfig(name, num_layers=layers, hidden_size=hidden, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                       **kw)


PRESETS: Dict[str, ModelConfig] = {
    m.name: m for m in [
        #      name               layers hidden heads kv  hdim  intermediate
        _model("llama-2-7b",         32,  4096,  32, 32, 128, 11008, vocab_size=32000,
               max_position_embeddings=4096),
        _model("llama-3.1-8b",       32,  4096,  32,  8, 128, 14336,
               rope_scaling=_llama31_scaling(), **_LLAMA31),
        _model("llama-3.1-70b",      80,  8192,  64,  8, 128, 28672,
               rope_scaling=_llama31_scaling(), **_LLAMA31),
        _model("llama-3.1-405b",    126, 16384, 128,  8, 128, 53248,
               rope_scaling=_llama31_scaling(), **_LLAMA31),
        _model("llama-3.2-1b",       16,  2048,  32,  8,  64,  8192, **_LLAMA32),
        _model("llama-3.2-3b",       28,  3072,  24,  8, 128,  8192, **_LLAMA32),
        _model("mistral-7b",         32,  4096,  32,  8, 128, 14336, vocab_size=32768,
               rope_theta=1000000.0, max_position_embeddings=32768),
        _model("mistral-nemo-12b",   40,  5120,  32,  8, 128, 14336, vocab_size=131072,
               rope_theta=1000000.0, max_position_embeddings=1024000),
        _model("qwen2.5-0.5b",       24,   896,  14,  2,  64,  4864,
               **dict(_QWEN25, vocab_size=151936, tie_word_embeddings=True,
                      max_position_embeddings=32768)),
        _model("qwen2.5-7b",         28,  3584,  28,  4, 128, 18944, **_QWEN25),
        _model("qwen2.5-14b",        48,  5120,  40,  8, 128, 13824, **_QWEN25),
        _model("qwen2.5-32b",        64,  5120,  40,  8, 128, 27648, **_QWEN25),
        _model("qwen2.5-72b",        80,  8192,  64,  8, 128, 29568, **_QWEN25),
    ]
}

_QKV_BIAS_MODEL_TYPES = {"qwen2"}


# Integer fields above 2^40 describe no model and would overflow the planner's float figures.
MAX_FIELD = 1 << 40
MAX_HEAD_DIM = 1 << 16  # the RoPE check allocates head_dim / 2 frequencies
MAX_CONFIG_BYTES = 16 << 20  # config.json files are kilobytes; a larger file is not one


def short_repr(v: Any, limit: int = 40) -> str:
    """repr(v), shortened to `limit` characters and its length (errors stay one readable line)."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text):,} characters)"


def _field(cfg: Mapping[str, Any], source: str, *names: str, required: bool = True,
           default: Any = None, positive_int: bool = True) -> Any:
    """The first of `names` present in cfg (config.json files use several spellings)."""
    for name in names:
        if name in cfg and cfg[name] is not None:
            v = cfg[name]
            if positive_int and (isinstance(v, bool) or not isinstance(v, int) or not
                                 0 < v <= MAX_FIELD):
                raise ModelConfigError(f"{source}: field {name!r} must be a positive integer up "
                                       f"to 2^40, got {short_repr(v)}")
            return v
    if required:
        alt = f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
        raise ModelConfigError(f"{source}: missing field {names[0]!r}{alt}")
    return default


def _check_rope_scaling(scaling: Any, source: str) -> None:
    """What the planner reads of rope_scaling itself (rope_frequencies checks the rest)."""
    if not isinstance(scaling, Mapping):
        raise ModelConfigError(f"{source}: field 'rope_scaling' must be an object or null, got "
                               f"{short_repr(scaling)}")
    for key in ("rope_type", "type"):
        if key in scaling and not isinstance(scaling[key], str):
            raise ModelConfigError(f"{source}: rope_scaling: field {key!r} must be a string, got "
                                   f"{short_repr(scaling[key])}")
    _field(scaling, f"{source}: rope_scaling", "original_max_position_embeddings", required=False)


def config_from_dict(cfg: Mapping[str, Any], name: str, source: Optional[str] = None
                     ) -> ModelConfig:
    """A ModelConfig from a parsed HuggingFace config.json (text_config is used when present,
    as in multimodal checkpoints)."""
    source = source or name
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg, **cfg["text_config"]}
    layers = _field(cfg, source, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _field(cfg, source, "hidden_size", "n_embd", "d_model")
    heads = _field(cfg, source, "num_attention_heads", "n_head")
    kv_heads = _field(cfg, source, "num_key_value_heads", required=False, default=heads)
    if heads % kv_heads:
        raise ModelConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                               f"num_key_value_heads ({kv_heads})")
    if "head_dim" in cfg and cfg["head_dim"] is not None:
        head_dim = _field(cfg, source, "head_dim")
    else:
        if hidden % heads:
            raise ModelConfigError(f"{source}: hidden_size ({hidden}) is not a multiple of "
                                   f"num_attention_heads ({heads}) and there is no 'head_dim'")
        head_dim = hidden // heads
    if head_dim > MAX_HEAD_DIM:
        raise ModelConfigError(f"{source}: head_dim ({head_dim:,}) must be at most "
                               f"{MAX_HEAD_DIM:,}")
    intermediate = _field(cfg, source, "intermediate_size", "n_inner", "ffn_dim")
    vocab = _field(cfg, source, "vocab_size")
    theta = cfg.get("rope_theta", 10000.0)
    if (isinstance(theta, bool) or not isinstance(theta, (int, float))
            or not math.isfinite(theta) or theta <= 1):
        raise ModelConfigError(f"{source}: field 'rope_theta' must be a finite number > 1, got "
                               f"{short_repr(theta)}")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        _check_rope_scaling(scaling, source)
    partial = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ModelConfigError(f"{source}: field 'partial_rotary_factor' must lie in (0, 1], got "
                               f"{short_repr(partial)}")
    window = None
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        window = _field(cfg, source, "sliding_window")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelConfigError(f"{source}: field 'tie_word_embeddings' must be true or false, "
                               f"got {short_repr(tie)}")
    qkv_bias = cfg.get("attention_bias")
    if qkv_bias is None:
        qkv_bias = cfg.get("model_type") in _QKV_BIAS_MODEL_TYPES
    return ModelConfig(
        name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
        tie_word_embeddings=tie, qkv_bias=bool(qkv_bias), rope_theta=float(theta),
        rope_scaling=dict(scaling) if scaling else None, partial_rotary_factor=float(partial),
        max_position_embeddings=_field(cfg, source, "max_position_embeddings", required=False),
        original_max_position_embeddings=_field(cfg, source, "original_max_position_embeddings",
                                                required=False),
        sliding_window=window,
    )


def _read_text(p: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark is allowed), at most MAX_CONFIG_BYTES."""
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ModelConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a "
                               "config.json")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                               f"{e.start:,}); a config.json is UTF-8 JSON") from None


def _parse_json(text: str, p: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{p}: not valid JSON: {e.msg} at line {e.lineno} column "
                               f"{e.colno}") from None
    except RecursionError:
        raise ModelConfigError(f"{p}: not a config.json: its JSON is nested too deeply") from None
    except ValueError as e:  # a number too long to convert (Python's 4300-digit limit)
        raise ModelConfigError(f"{p}: not a config.json: {str(e).split(';')[0]}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Reads a HuggingFace config.json (or a checkpoint folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    return config_from_dict(_parse_json(_read_text(p), p), name=str(path), source=str(p))


def resolve_model(name_or_path: str) -> ModelConfig:
    """A preset by name (case-insensitive), else a path to a config.json or its folder."""
    key = name_or_path.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    try:
        exists = Path(name_or_path).exists()
    except (OSError, ValueError) as e:  # a name too long for a path, a NUL byte
        raise ModelConfigError(f"{short_repr(name_or_path)}: not a preset and not a usable path "
                               f"({getattr(e, 'strerror', None) or e})") from None
    if exists:
        return load_config(name_or_path)
    if name_or_path.endswith(".json") or "/" in name_or_path or "\\" in name_or_path:
        raise ModelConfigError(f"{name_or_path}: no such file (give a preset name or the path "
                               "of a HuggingFace config.json)")
    raise ModelConfigError(f"unknown model {short_repr(name_or_path, 80)} (not a preset, and no "
                           f"such file); known presets: {', '.join(PRESETS)}; or give the path of "
                           "a HuggingFace config.json")

"""Tiny random-weight causal LMs of the six families the transformers integration is tested on,
built from config (no download), and the tolerance rule their outputs are held to.

Each family keeps the attention features that make it a test case: Llama 3.1 (llama3 RoPE,
GQA), Qwen2.5 (YaRN), Mistral (sliding window 8 < the 32-token prompt), Phi-3 (LongRoPE with
short/long factors, head dim 96 = hidden 192 / 2 heads), Gemma 2 (logit softcapping, head dim
256, sliding and full layers alternating, query_pre_attn_scalar != head_dim), gpt-oss (attention
sinks, sliding window 128 < the 160-token prompt, head dim 64, 4 tiny experts).

initializer_range 0.1 (transformers' default 0.02 leaves the attention nearly uniform, where a
wrong mask changes little): scores of a few units, so a key too many or too few in a window, a
lost sink or softcap moves the logits by far more than the tolerance. Gemma 2's softcap is 5 for
the same reason (50 would be linear at these scores).

Tolerance (the rule of tests/flash, FlashAttention-3's): for logits and gradients,
    max|X_longctx - X_f64| <= 2 * max|X_eager32 - X_f64| + floor * max|X_f64|
with X_f64 the eager model in float64 and X_eager32 the eager model in float32 on the same
weights and inputs: longctx's CPU kernels compute fp32 in fp32, so their error is held to twice
PyTorch's own fp32 error, plus a floor: 1e-6 (~8 fp32 ulps of the largest value) for logits,
1e-5 for gradients, which are sums over every token with cancellation (gpt-oss's router bias:
an error of 2.8e-8 on a largest value of 1.1e-2 on another x86 machine, where eager fp32 happened
to reach 5.6e-9).
"""
from __future__ import annotations

import copy
import functools

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GptOssConfig, LlamaConfig,
                          MistralConfig, Phi3Config, Qwen2Config)

import longctx.integrations.transformers  # noqa: F401  (registers attn_implementation "longctx")

_BASE = dict(vocab_size=160, num_hidden_layers=2, max_position_embeddings=512, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, initializer_range=0.1, tie_word_embeddings=False)
_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def _llama():
    return LlamaConfig(**_BASE, **_SMALL, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def _qwen2():
    return Qwen2Config(**_BASE, **_SMALL, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
        "original_max_position_embeddings": 512})


def _mistral():
    return MistralConfig(**_BASE, **_SMALL, head_dim=16, sliding_window=8)


def _phi3():
    base = {**_BASE, "max_position_embeddings": 128}
    return Phi3Config(**base, hidden_size=192, intermediate_size=128, num_attention_heads=2,
                      num_key_value_heads=1, original_max_position_embeddings=32,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "short_factor": [1.0 + 0.05 * i for i in range(48)],
                                       "long_factor": [1.0 + 0.25 * i for i in range(48)],
                                       "original_max_position_embeddings": 32})


def _gemma2():
    return Gemma2Config(**_BASE, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=64,
                        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                        attn_logit_softcapping=5.0, final_logit_softcapping=30.0)


def _gpt_oss():
    return GptOssConfig(**_BASE, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"])


# name -> (config factory, prompt length)
MODELS = {
    "llama3.1": (_llama, 32),
    "qwen2.5": (_qwen2, 32),
    "mistral": (_mistral, 32),
    "phi3": (_phi3, 40),  # 40 > original_max_position_embeddings 32: the long factors
    "gemma2": (_gemma2, 32),
    "gpt-oss": (_gpt_oss, 160),
}


def _build(cfg, attn: str, dtype=torch.float32):
    # a config per model: from_config writes attn_implementation into the config it is given
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn,
                                            experts_implementation="eager", dtype=dtype).eval()


def _seeded_eager(cfg):
    """The eager fp32 model of cfg with the weights every variant of the family shares."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return _build(cfg, "eager")


@functools.lru_cache(maxsize=None)
def models(name: str):
    """(config, eager fp32, eager fp64, longctx fp32) with the same weights. Cached: callers
    reset train/eval mode and gradients."""
    cfg = MODELS[name][0]()
    eager = _seeded_eager(cfg)
    ours = _build(cfg, "longctx")
    ours.load_state_dict(eager.state_dict())
    eager64 = copy.deepcopy(eager).double()
    return cfg, eager, eager64, ours


def prompt(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Token ids (batch, prompt length) of the family, avoiding pad/bos/eos."""
    cfg, n = MODELS[name][0](), MODELS[name][1]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (batch, n), generator=g)


def left_padded(name: str, pad: int):
    """Two prompts, the second left-padded by `pad` tokens: ids, mask, the unpadded rows."""
    ids = prompt(name, batch=2, seed=1)
    rows = [ids[0:1], ids[1:2, pad:]]
    padded = ids.clone()
    padded[1, :pad] = 0  # the pad id; masked out
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return padded, mask, rows


def positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids of a left-padded batch (pads at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def assert_close_f64(what: str, ours: torch.Tensor, eager32: torch.Tensor,
                     ref64: torch.Tensor, floor: float = 1e-6, eager_name: str = "eager fp32"
                     ) -> None:
    """The module docstring's rule (eager32: the eager model at the precision under test)."""
    ref64 = ref64.double()
    err = (ours.double() - ref64).abs().max().item()
    err_eager = (eager32.double() - ref64).abs().max().item()
    bound = 2 * err_eager + floor * ref64.abs().max().item()
    assert err <= bound, (f"{what}: max error {err:.3g} vs float64 > bound {bound:.3g} "
                          f"({eager_name}'s own error {err_eager:.3g})")


def _config(name: str, head_dim=None):
    cfg = MODELS[name][0]()
    if head_dim is not None:
        cfg.head_dim = head_dim
    return cfg


def _on_cuda(cfg, attn: str, eager):
    """A bf16 copy of the eager model `eager` on CUDA under attn_implementation attn."""
    m = _build(cfg, attn, torch.bfloat16).cuda()
    m.load_state_dict(eager.state_dict())
    return m


def cuda_model(name: str, attn: str, head_dim=None):
    """The bf16 model of name on CUDA under attn_implementation attn, with models(name)'s
    weights; head_dim overrides the family's."""
    cfg = _config(name, head_dim)
    return _on_cuda(cfg, attn, _seeded_eager(cfg))


def cuda_models(name: str, head_dim=None):
    """(eager bf16 on CUDA, eager fp64 on the CPU, longctx bf16 on CUDA) with the weights of
    models(name); head_dim overrides the family's."""
    cfg = _config(name, head_dim)
    eager = _seeded_eager(cfg)
    return (_on_cuda(cfg, "eager", eager), copy.deepcopy(eager).double(),
            _on_cuda(cfg, "longctx", eager))

"""longctx.planner (plan.py, models.py): hand-worked capacity numbers (every expected value below
is worked out in the comment beside it, not computed by the code under test)."""
import json
import math

import pytest

from longctx.planner.models import (PRESETS, ModelConfigError, config_from_dict, load_config,
                                    resolve_model)
from longctx.planner.plan import (
    GPUS, PlanDoesNotFit, PlanError, activation_bytes, attention_bwd_flops, attention_fwd_flops,
    attention_pairs, format_bytes, format_tokens, kv_bytes_per_token_per_layer, kv_scale_bytes,
    make_plan, memory_per_gpu, min_gpus, model_context, param_count, parse_gpu, parse_tokens,
    ring_step, rope_report,
)

L8, L70 = PRESETS["llama-3.1-8b"], PRESETS["llama-3.1-70b"]
K128 = 131072

# The published config.json of meta-llama/Llama-3.1-8B (the fields a planner reads, and a few
# it must ignore).
LLAMA31_8B_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


# ------------------------------------------------------------------------------ KV cache bytes


def test_kv_bytes_llama31_8b():
    # 2 (K, V) x 8 kv heads x 128 x 2 B = 4096 B per layer; x 32 layers = 131,072 B per token
    assert kv_bytes_per_token_per_layer(L8, "bf16") == 4096
    p = make_plan(L8, K128, gpus=1)
    assert p.kv_bytes_per_token == 131_072
    # 131,072 B x 131,072 tokens = 2^34 B = 17.18 GB = 16 GiB
    assert p.kv_bytes_per_sequence == 17_179_869_184 == 16 << 30


def test_kv_bytes_llama31_70b():
    # 80 layers x 2 x 8 x 128 x 2 B = 327,680 B per token; x 131,072 = 42.9 GB = 40 GiB
    p = make_plan(L70, K128, gpus=8)
    assert p.kv_bytes_per_token == 327_680
    assert p.kv_bytes_per_sequence == 42_949_672_960 == 40 << 30
    assert format_bytes(p.kv_bytes_per_sequence) == "42.95 GB (40.00 GiB)"
    # ring: each of 8 GPUs holds 16,384 tokens: 5 GiB
    assert p.memory.kv_cache == 5 << 30


def test_kv_batch_scales_total():
    p = make_plan(L70, K128, gpus=8, batch=3)
    assert p.kv_bytes_total == 3 * 42_949_672_960
    assert p.memory.kv_cache == 3 * (5 << 30)


def test_int8_scale_overhead():
    # int8: 2 x 8 x 128 x 1 B = 2048 B + an fp32 scale per (token, head) for K and V:
    # 2 x 8 x 4 B = 64 B -> 2112 B per layer, 80 x 2112 = 168,960 B per token
    assert kv_bytes_per_token_per_layer(L70, "int8") == 2112
    p = make_plan(L70, K128, gpus=8, kv_dtype="int8")
    assert p.kv_bytes_per_token == 168_960
    assert p.kv_bytes_per_sequence == 168_960 * K128
    assert kv_scale_bytes(L70, "int8") == 0


def test_fp8_per_head_scales_counted_once():
    # fp8: 2048 B per layer per token; the per-(layer, head) scales are 80 x 2 x 8 x 4 = 5120 B
    assert kv_bytes_per_token_per_layer(L70, "fp8") == 2048
    assert kv_scale_bytes(L70, "fp8") == 5120
    p = make_plan(L70, K128, gpus=8, kv_dtype="fp8")
    assert p.kv_bytes_per_sequence == 163_840 * K128 + 5120
    assert p.memory.kv_cache == 80 * 16384 * 2048 + 5120


def test_fp16_same_as_bf16():
    assert kv_bytes_per_token_per_layer(L8, "fp16") == kv_bytes_per_token_per_layer(L8, "bf16")


def test_unknown_kv_dtype():
    with pytest.raises(PlanError, match="KV dtype"):
        kv_bytes_per_token_per_layer(L8, "fp4")


# ---------------------------------------------------------------------------------- parameters


def test_params_llama31_8b_exact_and_published():
    # embeddings 128,256 x 4096 = 525,336,576 (and the same again for the untied lm_head)
    # per layer: q, o 4096 x 4096 x 2 = 33,554,432; k, v 4096 x 1024 x 2 = 8,388,608;
    # MLP 3 x 4096 x 14,336 = 176,160,768; norms 8192 -> 218,112,000; x 32 = 6,979,584,000
    # + final norm 4096 + 2 x 525,336,576 = 8,030,261,248
    pc = param_count(L8)
    assert pc.embedding == pc.lm_head == 525_336_576
    assert pc.attention_per_layer == 41_943_040
    assert pc.mlp_per_layer == 176_160_768
    assert pc.total == 8_030_261_248
    assert abs(pc.total / 8.03e9 - 1) < 0.01


def test_params_llama31_70b_published():
    # per layer: 2 x 8192^2 + 2 x 8192 x 1024 = 150,994,944; MLP 3 x 8192 x 28,672 =
    # 704,643,072; norms 16,384 -> 855,654,400; x 80 = 68,452,352,000
    # + 8192 + 2 x 128,256 x 8192 = 70,553,706,496
    assert param_count(L70).total == 70_553_706_496
    assert abs(param_count(L70).total / 70.6e9 - 1) < 0.01


def test_params_tied_embeddings_and_qkv_bias():
    # Llama 3.2 1B ties the lm_head to the embeddings: 1.24B published
    assert param_count(PRESETS["llama-3.2-1b"]).lm_head == 0
    assert abs(param_count(PRESETS["llama-3.2-1b"]).total / 1.24e9 - 1) < 0.01
    # Qwen2.5 0.5B: tied, q/k/v biases 896 + 2 x 128 = 1152 per layer; 494,032,768 in its
    # safetensors
    q = PRESETS["qwen2.5-0.5b"]
    assert param_count(q).attention_per_layer == 2 * 896 * 896 + 2 * 896 * 128 + 1152
    assert param_count(q).total == 494_032_768


@pytest.mark.parametrize("name,published", [
    ("llama-3.1-405b", 405.85e9), ("llama-2-7b", 6.74e9), ("mistral-7b", 7.25e9),
    ("qwen2.5-7b", 7.62e9), ("qwen2.5-72b", 72.7e9),
])
def test_params_presets_near_published(name, published):
    assert abs(param_count(PRESETS[name]).total / published - 1) < 0.01


def test_weight_bytes_by_dtype():
    assert make_plan(L8, 1024, gpus=1).weight_bytes == 2 * 8_030_261_248
    assert make_plan(L8, 1024, gpus=1, weight_dtype="fp8").weight_bytes == 8_030_261_248


# ------------------------------------------------------------------------------------- FLOPs


def test_attention_pairs():
    assert attention_pairs(4, causal=True) == 10  # 1 + 2 + 3 + 4
    assert attention_pairs(4, causal=False) == 16
    assert attention_pairs(K128) == 8_590_000_128  # 131072 x 131073 / 2


def test_attention_flops_llama31_70b():
    # 4 x batch 1 x 64 heads x 8,590,000,128 pairs x 128 = 281,477,124,194,304 per layer
    assert attention_fwd_flops(L70, K128) == 281_477_124_194_304
    assert attention_bwd_flops(L70, K128) == 703_692_810_485_760  # 2.5 x
    assert attention_fwd_flops(L70, 4, batch=2, causal=False) == 4 * 2 * 64 * 16 * 128
    p = make_plan(L70, K128, gpus=8)
    assert p.attention_fwd_flops == 80 * 281_477_124_194_304


# -------------------------------------------------------------------------------------- ring


def test_ring_step_llama31_70b_8_gpus():
    r = ring_step(L70, K128, 8, link_gbps=450, tflops=600)
    assert r.shard_tokens == 16_384
    assert r.shard_bytes_per_layer == 16_384 * 4096 == 64 << 20  # 67,108,864 B
    assert r.steps_per_layer == 7
    assert math.isclose(r.transfer_s, 67_108_864 / 450e9)  # 0.149 ms
    assert r.compute_flops == 281_477_124_194_304 // 64 == 4_398_080_065_536
    assert math.isclose(r.compute_s, 4_398_080_065_536 / 600e12)  # 7.33 ms
    assert r.hidden


def test_ring_step_transfer_bound_on_slow_link():
    # 8B at 16K over 8 GPUs: 2048 tokens x 4096 B = 8 MiB per step; compute
    # 4 x 32 x 128 x (16384 x 16385 / 2 = 134,225,920) / 64 = 2,199,157,473,280 / 64
    # = 34,361,835,520 FLOP -> 57 us at 600 TFLOP/s;
    # at 25 GB/s the transfer takes 336 us
    r = ring_step(L8, 16384, 8, link_gbps=25, tflops=600)
    assert r.shard_bytes_per_layer == 8 << 20
    assert r.compute_flops == 34_361_835_520
    assert not r.hidden


def test_single_gpu_has_no_transfer():
    assert ring_step(L8, 1024, 1).transfer_s == 0.0


# ----------------------------------------------------------------------------------- memory


def test_min_gpus_llama31_70b_128k_h100_by_hand():
    cap = GPUS["h100"].memory_bytes
    assert cap == 81559 << 20
    # 2 GPUs: weights 141,107,412,992 / 2 + KV 80 x 65,536 x 4096 = 92.0 GB > 85.5 GB
    two = memory_per_gpu(L70, K128, 2, capacity=cap)
    assert two.weights == 70_553_706_496 and two.kv_cache == 21_474_836_480 and not two.fits
    # 3 GPUs: 43,691 tokens each; weights ceil(141,107,412,992 / 3) = 47,035,804,331;
    # KV 80 x 43,691 x 4096 = 14,316,666,880; activations 43,691 x 2 x (2 x 8192 + 2 x 8192 +
    # 2 x 1024 + 2 x 28,672) + 2 x 43,691 x 4096 (ring buffers) + 128,256 x 4 (logits)
    # = 8,411,554,816; + 2 GiB reserve = 71,911,509,675 <= 85,520,809,984
    three = memory_per_gpu(L70, K128, 3, capacity=cap)
    assert three.weights == 47_035_804_331
    assert three.kv_cache == 14_316_666_880
    assert three.activations == 8_411_554_816 == activation_bytes(L70, K128, 3, 1, "bf16")
    assert three.total == 71_911_509_675 and three.fits
    assert min_gpus(L70, K128, capacity=cap) == 3
    auto = make_plan(L70, K128)
    assert auto.gpus == 3 and not auto.gpus_given and auto.fits


def test_plan_that_does_not_fit_is_reported():
    p = make_plan(L70, K128, gpus=1)
    assert not p.fits and p.min_gpus == 3


def test_memory_never_grows_with_gpus():
    cap = GPUS["h200"].memory_bytes
    totals = [memory_per_gpu(L70, 1 << 20, n, capacity=cap).total for n in range(1, 70)]
    assert all(a >= b for a, b in zip(totals, totals[1:]))


def test_replicated_weights_that_never_fit():
    # 405B in bf16 is 811.7 GB: no single H100 holds a full copy
    with pytest.raises(PlanDoesNotFit, match="replicated"):
        make_plan(PRESETS["llama-3.1-405b"], 1 << 20, replicate_weights=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(context=0), "context"), (dict(context=-5), "context"),
    (dict(context=K128, gpus=0), "GPUs"), (dict(context=4, gpus=8), "at least one token"),
    (dict(context=K128, batch=0), "batch"), (dict(context=K128, link_gbps=0), "link"),
    (dict(context=K128, tflops=float("nan")), "TFLOP"),
    (dict(context=K128, weight_dtype="fp64"), "weight dtype"),
    (dict(context=(1 << 40) + 1), "context must be positive and at most 1,099,511,627,776"),
    (dict(context=K128, batch=1 << 31), "batch"), (dict(context=K128, gpus=(1 << 16) + 1), "GPUs"),
    (dict(context=K128, tflops=1e308), "TFLOP"), (dict(context=K128, link_gbps=1e-320), "link"),
    (dict(context=K128, reserve=-1), "reserve"), (dict(context=K128, reserve=1 << 60), "reserve"),
    (dict(context=K128, reserve=float("inf")), "reserve"), (dict(context=2.5), "whole"),
])
def test_impossible_inputs(kwargs, match):
    with pytest.raises(PlanError, match=match):
        make_plan(L8, **kwargs)


# ------------------------------------------------------------------------ units and parsing


@pytest.mark.parametrize("text,tokens", [
    ("131072", 131072), ("128k", 131072), ("128K", 131072), ("1M", 1 << 20), ("1m", 1 << 20),
    ("1.5M", 1_572_864), ("2G", 1 << 31), ("1_000", 1000), (" 64k ", 65536), (4096, 4096),
    ("1024G", 1 << 40), ("0001k", 1024),
])
def test_parse_tokens_binary_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["0", "-5", "-1k", "0.5", "12x", "k", "", "1.0001k", "1025G",
                                  "9" * 400, "1." + "0" * 100, "1e9"])
def test_parse_tokens_rejects(text):
    with pytest.raises(PlanError):
        parse_tokens(text)


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1000, "1,000 B"), (4096, "4,096 B (4.00 KiB)"),
    (327_680, "327,680 B (320.00 KiB)"), (1_000_000, "1.00 MB (976.56 KiB)"),
    (16 << 30, "17.18 GB (16.00 GiB)"), (42_949_672_960, "42.95 GB (40.00 GiB)"),
    (1 << 40, "1.10 TB (1.00 TiB)"),
])
def test_format_bytes_gb_and_gib(n, text):
    assert format_bytes(n) == text


def test_format_tokens():
    assert format_tokens(131072) == "131,072 (128K)"
    assert format_tokens(1 << 20) == "1,048,576 (1M)"
    assert format_tokens(1000) == "1,000"


def test_parse_gpu():
    assert parse_gpu("H200").memory_bytes == 143771 << 20
    assert parse_gpu("80").memory_bytes == 80 << 30
    with pytest.raises(PlanError, match="unknown GPU"):
        parse_gpu("h900")
    with pytest.raises(PlanError):
        parse_gpu("-8")
    for text in ("1e308", "inf", "nan", "0", "1e-300", "2000000"):
        with pytest.raises(PlanError, match="positive number of GiB"):
            parse_gpu(text)
    assert parse_gpu("1048576").memory_bytes == 1 << 50


# ---------------------------------------------------------------------------- config.json


def test_config_json_matches_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31_8B_JSON))
    m = load_config(path)
    assert dataclass_fields_without_name(m) == dataclass_fields_without_name(L8)
    assert load_config(tmp_path).num_layers == 32  # a checkpoint folder works too
    assert resolve_model(str(path)).hidden_size == 4096


def dataclass_fields_without_name(m):
    import dataclasses

    d = dataclasses.asdict(m)
    d.pop("name")
    return d


def test_config_rope_scaling_llama3():
    m = config_from_dict(LLAMA31_8B_JSON, "llama")
    r = rope_report(m, K128)
    assert (r.rope_type, r.factor, r.theta, r.rotary_dim) == ("llama3", 8.0, 500000.0, 128)
    assert r.attention_factor == 1.0
    assert r.notes == []
    assert rope_report(m, 1 << 20).notes  # past max_position_embeddings: a note


def test_config_rope_scaling_yarn_as_model_cards_advise():
    # Qwen2.5's model card: add {"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
    # 32768} and keep max_position_embeddings; attention factor 0.1 ln 4 + 1 = 1.13863
    cfg = {k: v for k, v in LLAMA31_8B_JSON.items() if k != "attention_bias"}  # as Qwen2's
    cfg = {**cfg, "model_type": "qwen2", "max_position_embeddings": 32768,
           "rope_theta": 1000000.0,
           "rope_scaling": {"type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768}}
    m = config_from_dict(cfg, "qwen-like")
    assert m.qkv_bias
    r = rope_report(m, K128)
    assert r.rope_type == "yarn" and math.isclose(r.attention_factor, 0.1 * math.log(4) + 1)


def _with_rope(max_pos, scaling, **top):
    return config_from_dict({**LLAMA31_8B_JSON, "max_position_embeddings": max_pos,
                             "rope_scaling": scaling, **top}, "m")


def test_model_context_from_rope_scaling():
    # YaRN factor 4 over 32,768 (Qwen2.5's card keeps max_position_embeddings at 32,768): 131,072
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert model_context(_with_rope(32768, yarn)) == (
        131072, "yarn factor 4 x original_max_position_embeddings 32,768")
    # the same with max_position_embeddings already 131,072 (as transformers writes it)
    assert model_context(_with_rope(131072, yarn))[0] == 131072
    # Llama 3.1: llama3 factor 8 over 8,192 = 65,536, but trained to max_position_embeddings
    assert model_context(L8) == (131072, "max_position_embeddings")
    # the original length at the top level (Phi-3 style), linear factor 2.5: 10,240
    linear = {"rope_type": "linear", "factor": 2.5}
    assert model_context(_with_rope(4096, linear, original_max_position_embeddings=4096))[0] == (
        10240)
    # a factor without an original length: max_position_embeddings is the scaled model's
    assert model_context(_with_rope(8192, linear)) == (8192, "max_position_embeddings")
    assert model_context(_with_rope(None, None)) == (None, "")


def test_yarn_model_card_config_plans_128k_without_a_note():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    r = rope_report(_with_rope(32768, yarn), K128)
    assert r.notes == [] and r.max_context == K128
    assert "longer than the model's (131,072" in rope_report(_with_rope(32768, yarn), 2 * K128
                                                             ).notes[0]


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": ["yarn"], "factor": 4.0}, "'rope_type' must be a string"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1e400},
     "original_max_position_embeddings' must be a positive integer"),
])
def test_rope_scaling_fields_the_planner_reads(scaling, match):
    with pytest.raises(ModelConfigError, match=match):
        _with_rope(32768, scaling)


def test_config_bad_rope_scaling_is_named():
    bad = {**LLAMA31_8B_JSON, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(PlanError, match="rope_scaling.*low_freq_factor"):
        rope_report(config_from_dict(bad, "bad"), K128)


def test_config_head_dim_explicit_and_gqa():
    cfg = {**LLAMA31_8B_JSON, "hidden_size": 5120, "head_dim": 128}
    assert config_from_dict(cfg, "nemo-like").head_dim == 128
    no_kv = {k: v for k, v in LLAMA31_8B_JSON.items() if k != "num_key_value_heads"}
    assert config_from_dict(no_kv, "mha").num_kv_heads == 32  # MHA when absent


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "intermediate_size", "vocab_size"])
def test_config_missing_field_is_named(drop):
    cfg = {k: v for k, v in LLAMA31_8B_JSON.items() if k != drop}
    with pytest.raises(ModelConfigError, match=f"missing field '{drop}'"):
        config_from_dict(cfg, "x")


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 5, "multiple"), ("hidden_size", "4096", "positive integer"),
    ("rope_scaling", "llama3", "rope_scaling"), ("tie_word_embeddings", "no", "tie_word"),
])
def test_config_malformed_field_is_named(field, value, match):
    with pytest.raises(ModelConfigError, match=match):
        config_from_dict({**LLAMA31_8B_JSON, field: value}, "x")


def test_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_config(path)


def test_unknown_preset_lists_known():
    with pytest.raises(ModelConfigError, match="llama-3.1-8b.*qwen2.5-72b"):
        resolve_model("llama-9")
    assert resolve_model("Llama-3.1-70B") is L70

"""rope_frequencies against an independent float64 port of the published definitions
(transformers' modeling_rope_utils, the YaRN, Llama 3.1 and LongRoPE papers)."""
import math

import numpy as np
import pytest
import torch

from longctx import rope_frequencies


def default_ref(base, dim):
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def yarn_ref(base, dim, factor, orig, beta_fast=32, beta_slow=1, truncate=True):
    # the (fractional) dimension indices where a frequency turns beta_fast and beta_slow times
    # over the original context; linear ramp between them from extrapolation to interpolation
    rotations = np.array([beta_fast, beta_slow], dtype=np.float64)
    bounds = dim * np.log(orig / (rotations * 2 * np.pi)) / (2 * np.log(base))
    if truncate:
        bounds = np.array([np.floor(bounds[0]), np.ceil(bounds[1])])
    low, high = max(bounds[0], 0), min(bounds[1], dim - 1)
    high += 0.001 if low == high else 0.0
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = default_ref(base, dim)
    return extrapolation / factor * ramp + extrapolation * (1 - ramp)


def llama3_ref(base, dim, factor, low, high, orig):
    inv = default_ref(base, dim)
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    return np.where(medium, smoothed, out)


def check(freqs, ref, attention_factor=1.0):
    inv, af = freqs
    assert inv.dtype == torch.float32
    ref32 = torch.tensor(ref, dtype=torch.float64).float()
    # fp32 rounding of the float64 definition: at most one ulp apart
    torch.testing.assert_close(inv, ref32, rtol=2 ** -23, atol=0)
    assert af == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_default(dim):
    check(rope_frequencies(dim, 10000.0), default_ref(10000.0, dim))
    check(rope_frequencies(dim, 500000.0, {"rope_type": "default"}), default_ref(500000.0, dim))


def test_linear_and_legacy_type_key():
    check(rope_frequencies(128, 10000.0, {"type": "linear", "factor": 4.0}),
          default_ref(10000.0, 128) / 4)


def test_ntk_static():
    dim, f = 128, 8.0
    check(rope_frequencies(128, 10000.0, {"rope_type": "ntk", "factor": f}),
          default_ref(10000.0 * f ** (dim / (dim - 2)), dim))


def test_dynamic_ntk():
    s = {"rope_type": "dynamic", "factor": 2.0}
    # within the pretrained context: plain RoPE
    check(rope_frequencies(128, 10000.0, s, max_position_embeddings=4096, seq_len=1000),
          default_ref(10000.0, 128))
    L, L0, f, dim = 16384, 4096, 2.0, 128
    base = 10000.0 * ((f * L / L0) - (f - 1)) ** (dim / (dim - 2))
    check(rope_frequencies(128, 10000.0, s, max_position_embeddings=L0, seq_len=L),
          default_ref(base, dim))


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn(truncate):
    s = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
         "truncate": truncate}
    check(rope_frequencies(128, 1e6, s), yarn_ref(1e6, 128, 4.0, 32768, truncate=truncate),
          0.1 * math.log(4.0) + 1.0)


def test_yarn_factor_is_the_scale_whatever_max_position_embeddings_says():
    # Qwen2.5's model card: factor 4 over 32768 with max_position_embeddings left at 32768
    s = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    check(rope_frequencies(128, 1e6, s, max_position_embeddings=32768),
          yarn_ref(1e6, 128, 4.0, 32768), 0.1 * math.log(4.0) + 1.0)


def test_yarn_deepseek_mscale():
    # DeepSeek-V3: rotary 64 of qk_rope_head_dim, factor 40, mscale = mscale_all_dim = 1
    s = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    check(rope_frequencies(64, 10000.0, s, max_position_embeddings=163840),
          yarn_ref(10000.0, 64, 40.0, 4096), 1.0)
    s2 = dict(s, mscale=0.707)
    m = lambda x: 0.1 * x * math.log(40) + 1  # noqa: E731
    assert rope_frequencies(64, 10000.0, s2).attention_factor == pytest.approx(m(0.707) / m(1.0))


def test_llama3():
    s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    ref = llama3_ref(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    check(rope_frequencies(128, 500000.0, s), ref)
    inv = rope_frequencies(128, 500000.0, s).inv_freq
    assert inv[0].item() == 1.0  # highest frequency kept
    assert inv[-1].item() == pytest.approx(default_ref(500000.0, 128)[-1] / 8, rel=1e-6)


def test_longrope_phi3():
    short = [1.0 + 0.01 * i for i in range(48)]
    long = [1.0 + 0.5 * i for i in range(48)]
    s = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    kw = dict(max_position_embeddings=131072, original_max_position_embeddings=4096)
    af = math.sqrt(1 + math.log(32) / math.log(4096))
    check(rope_frequencies(96, 10000.0, s, **kw, seq_len=2000),
          default_ref(10000.0, 96) / np.array(short), af)
    check(rope_frequencies(96, 10000.0, s, **kw, seq_len=100000),
          default_ref(10000.0, 96) / np.array(long), af)
    assert af == pytest.approx(1.1902380714238083)


def test_partial_rotary_and_theta_in_dict():
    inv, _ = rope_frequencies(128, scaling={"rope_type": "default", "rope_theta": 1e6},
                              partial_rotary_factor=0.25)
    assert inv.numel() == 16
    check((inv, 1.0), default_ref(1e6, 32))
    assert rope_frequencies(128, 10000.0, rotary_dim=64).inv_freq.numel() == 32


def test_device_argument():
    assert rope_frequencies(64, device="cpu").inv_freq.device.type == "cpu"


@pytest.mark.parametrize("kwargs,match", [
    (dict(scaling={"rope_type": "su"}), "unknown rope_type 'su'"),
    (dict(scaling={"rope_type": "linear"}), "missing required parameter 'factor'"),
    (dict(scaling={"rope_type": "linear", "factor": 2.0, "factr": 3}), "unknown parameter"),
    (dict(scaling={"rope_type": "linear", "factor": 0.5}), "'factor' must be >= 1.0"),
    (dict(scaling={"rope_type": "linear", "factor": "2"}), "finite number"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0}), "needs max_position_embeddings"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0}), "original_max_position_embeddings"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                   "beta_fast": 1, "beta_slow": 32}), "beta_fast"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                   "attention_factor": 1.2, "mscale": 1.0}), "not both"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
     "high_freq_factor"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0}), "original_max_position_embeddings"),
    (dict(scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 64,
                   "original_max_position_embeddings": 4096}), "short_factor must be a list"),
    (dict(scaling={"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64,
                   "factor": 4.0, "original_max_position_embeddings": 4096},
          max_position_embeddings=131072), "contradictory factor"),
    (dict(scaling={"rope_type": "default", "rope_theta": 1e6}, base=1e4), "given twice"),
    (dict(scaling={"rope_type": "linear", "type": "dynamic", "factor": 2.0}), "give one"),
    (dict(rotary_dim=63), "rotary_dim must be even"),
    (dict(rotary_dim=256), "rotary_dim must be even"),
    (dict(rotary_dim=64, partial_rotary_factor=0.25), "contradicts"),
    (dict(base=0.5), "base must be"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rope_frequencies(128, **kwargs)

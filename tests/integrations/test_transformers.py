"""attn_implementation="longctx" under HuggingFace transformers (longctx.integrations.transformers),
on the CPU kernels in fp32.

Six tiny random-weight families (tiny_models.py: Llama 3.1, Qwen2.5, Mistral, Phi-3, Gemma 2,
gpt-oss) against the same weights under attn_implementation="eager": logits and the gradients of
one training step against eager float64 (tolerance: tiny_models.assert_close_f64), greedy
generation with transformers' default cache (tokens identical, each step's logits within the
tolerance), and a left-padded batch (forward and generation) against the rows run alone; static
caches for two families with sliding layers. Then the
adapter itself: registration, from_pretrained, no copies of transformers' tensors, GQA without
repeated K/V, transformers' sliding-window mask convention, packed sequences, and the errors for
what it cannot express.

The whole module skips where transformers is not installed (CI installs it: scripts/setup.sh).
"""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import longctx.integrations.transformers as lt  # noqa: E402
from tiny_models import (MODELS, assert_close_f64, left_padded, models, positions,  # noqa: E402
                         prompt)

NAMES = list(MODELS)
NEW_TOKENS = 5


def _generate(model, ids, mask=None):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                          output_logits=True, return_dict_in_generate=True)


# ------------------------------------------------------------------------- the model families


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_eager(name):
    _, eager, eager64, ours = models(name)
    ids = prompt(name)
    with torch.no_grad():
        ref = eager64(ids).logits
        assert_close_f64(f"{name} logits", ours(ids).logits, eager(ids).logits, ref)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_gradients_match_eager(name):
    _, eager, eager64, ours = models(name)
    ids = prompt(name, seed=2)
    grads = []
    for m in (ours, eager, eager64):
        m.train()
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        m.eval()
    g_ours, g_eager, g64 = grads
    assert g_ours.keys() == g64.keys()
    for n in g64:
        assert g_ours[n] is not None, f"{name}: no gradient for {n}"
        assert_close_f64(f"{name} grad {n}", g_ours[n], g_eager[n], g64[n], floor=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_eager(name):
    _, eager, eager64, ours = models(name)
    ids = prompt(name, seed=3)
    with torch.no_grad():
        got, want32, want64 = (_generate(m, ids) for m in (ours, eager, eager64))
    assert got.sequences.tolist() == want64.sequences.tolist()
    assert want32.sequences.tolist() == want64.sequences.tolist()
    for step, (a, b, c) in enumerate(zip(got.logits, want32.logits, want64.logits)):
        assert_close_f64(f"{name} generation step {step} logits", a, b, c)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_rows_alone(name):
    """A padded batch runs as varlen: each row's logits as if it ran alone (against eager
    float64 on the row alone), and batched generation (left-padded decode steps) gives each
    row's tokens alone."""
    _, eager, eager64, ours = models(name)
    pad = 5
    ids, mask, rows = left_padded(name, pad)
    pos = positions(mask)
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask, position_ids=pos).logits
        batch32 = eager(ids, attention_mask=mask, position_ids=pos).logits
        for r, row in enumerate(rows):
            ref = eager64(row).logits[0]
            keep = mask[r].bool()
            assert_close_f64(f"{name} padded row {r}", batch[r][keep], batch32[r][keep], ref)

        got = _generate(ours, ids, mask).sequences[:, -NEW_TOKENS:]
        want = _generate(eager, ids, mask).sequences[:, -NEW_TOKENS:]
        alone = [_generate(ours, row).sequences[0, -NEW_TOKENS:] for row in rows]
    assert got.tolist() == want.tolist()
    assert got.tolist() == [a.tolist() for a in alone]


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_static_cache_generation_matches_eager(name):
    """cache_implementation="static" (sliding layers in a fixed window buffer, full layers in
    slots not yet written): left-padded greedy generation as eager's."""
    _, eager, _, ours = models(name)
    ids, mask, _ = left_padded(name, pad=4)
    with torch.no_grad():
        got, want = (m.generate(ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=NEW_TOKENS, cache_implementation="static")
                     for m in (ours, eager))
    assert got.tolist() == want.tolist()


# --------------------------------------------------------------------------------- the adapter


def test_registered_under_longctx():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert lt.register() == lt.NAME == "longctx"
    assert AttentionInterface._global_mapping["longctx"] is lt.longctx_attention_forward
    # without a mask function transformers would pass no padding mask at all
    assert "longctx" in AttentionMaskInterface._global_mapping


def test_from_pretrained_runs_every_layer_through_longctx(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg, eager, _, _ = models("mistral")
    eager.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longctx").eval()
    assert model.config._attn_implementation == "longctx"
    calls = []
    real = lt.flash_attn_func
    monkeypatch.setattr(lt, "flash_attn_func",
                        lambda *a, **kw: calls.append(kw["window_size"]) or real(*a, **kw))
    with torch.no_grad():
        model(prompt("mistral"))
    assert calls == [(cfg.sliding_window - 1, 0)] * cfg.num_hidden_layers


def _qkv(b=2, h=4, hk=2, sq=6, sk=6, d=16):
    """transformers' layout, as its attention modules make it: (b, s, h, d) projections viewed
    as (b, h, s, d)."""
    q = torch.randn(b, sq, h, d).transpose(1, 2)
    k = torch.randn(b, sk, hk, d).transpose(1, 2)
    v = torch.randn(b, sk, hk, d).transpose(1, 2)
    return q, k, v


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, keep, scale):
    """softmax(scale q k^T masked by keep (sq, sk)) v with K/V repeated per group, in float64;
    (b, sq, h, d)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def test_views_without_copies_gqa_and_output_layout(monkeypatch):
    q, k, v = _qkv()
    seen = {}
    real = lt.flash_attn_func

    def spy(q_, k_, v_, **kw):
        seen.update(q=q_, k=k_, v=v_)
        return real(q_, k_, v_, **kw)

    monkeypatch.setattr(lt, "flash_attn_func", spy)
    out, weights = lt.longctx_attention_forward(_Module(), q, k, v, None, scaling=0.3)
    assert weights is None
    for n, t in (("q", q), ("k", k), ("v", v)):
        assert seen[n].data_ptr() == t.data_ptr(), f"{n} was copied"
        assert seen[n].shape == t.transpose(1, 2).shape  # K/V keep their 2 heads: no repeat
    assert out.shape == (2, 6, 4, 16)  # (batch, seq, heads, head_dim), what transformers expects
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(out.double(), _reference(q, k, v, keep, 0.3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("sq", [7, 1])
def test_sliding_window_follows_transformers_mask(window, sq):
    """The keys transformers' own sliding mask keeps (masking_utils), for a prefill (sq = sk) and
    a decode step (1 query, 7 keys)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    sk = 7
    q, k, v = _qkv(sq=sq, sk=sk)
    i = torch.arange(sk - sq, sk)[:, None]  # the queries' positions
    j = torch.arange(sk)[None, :]
    keep = sliding_window_causal_mask_function(window)(0, 0, i, j)
    out, _ = lt.longctx_attention_forward(_Module(), q, k, v, None, scaling=0.25,
                                          sliding_window=window)
    torch.testing.assert_close(out.double(), _reference(q, k, v, keep, 0.25), atol=1e-5, rtol=0)


def test_packed_sequences_match_eager():
    """Batch 1, no mask, position_ids restarting at each sequence (padding-free training):
    each sequence attends only to itself, as in transformers' eager path (which detects packing
    only without a cache: use_cache=False) and its FlashAttention path."""
    _, eager, eager64, ours = models("mistral")
    ids = prompt("mistral", seed=4)
    n = ids.shape[1]
    pos = torch.cat([torch.arange(20), torch.arange(n - 20)])[None]
    with torch.no_grad():
        got = ours(ids, position_ids=pos, use_cache=False).logits
        assert_close_f64("packed logits", got, eager(ids, position_ids=pos, use_cache=False).logits,
                         eager64(ids, position_ids=pos, use_cache=False).logits)
        assert_close_f64("packed: second sequence", got[:, 20:], eager(ids[:, 20:]).logits,
                         eager64(ids[:, 20:]).logits)


# ---------------------------------------------------------------------------------- the errors


def test_output_attentions_is_an_error():
    _, _, _, ours = models("llama3.1")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(prompt("llama3.1"), output_attentions=True)


def test_4d_mask_is_an_error():
    _, _, _, ours = models("llama3.1")
    ids = prompt("llama3.1")
    n = ids.shape[1]
    bias = torch.zeros(1, 1, n, n).masked_fill(torch.ones(n, n).triu(1).bool(), -1e9)
    with pytest.raises(NotImplementedError, match="4D attention_mask"):
        ours(ids, attention_mask=bias)


def test_dropout_in_training_is_an_error():
    from transformers import AutoModelForCausalLM

    cfg, _, _, _ = models("qwen2.5")
    cfg = type(cfg).from_dict({**cfg.to_dict(), "attention_dropout": 0.1})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longctx").train()
    with pytest.raises(NotImplementedError, match="dropout=0.1"):
        model(prompt("qwen2.5"))
    with torch.no_grad():
        model.eval()(prompt("qwen2.5"))  # eval: no dropout, runs


def test_static_cache_without_a_mask_is_an_error():
    from transformers import StaticCache

    _, _, _, ours = models("llama3.1")
    ids = prompt("llama3.1")
    cache = StaticCache(config=ours.config, max_cache_len=64)
    with pytest.raises(NotImplementedError, match="static cache without an attention_mask"):
        ours(ids, past_key_values=cache)
    cache = StaticCache(config=ours.config, max_cache_len=64)
    with torch.no_grad():  # with the mask it runs
        ours(ids, attention_mask=torch.ones_like(ids), past_key_values=cache)


def test_mask_longctx_cannot_express_is_an_error():
    """Chunked attention (Llama 4) and custom mask overlays (image tokens) reach the mask
    function only as mask_function; refused, not ignored."""
    from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask

    cfg, _, _, ours = models("llama3.1")
    embeds = torch.zeros(1, 12, cfg.hidden_size)
    args = dict(inputs_embeds=embeds, attention_mask=None, past_key_values=None)
    assert create_causal_mask(ours.config, **args) is None  # plain causal: fine
    def image_tokens_overlay(b, h, q, kv):
        return kv < 4

    with pytest.raises(NotImplementedError, match="image_tokens_overlay"):
        create_causal_mask(ours.config, **args, or_mask_function=image_tokens_overlay)
    chunked = type(ours.config).from_dict({**ours.config.to_dict(), "attention_chunk_size": 4})
    chunked._attn_implementation = "longctx"
    with pytest.raises(NotImplementedError, match="chunked_overlay"):
        create_chunked_causal_mask(chunked, **args)


def test_bidirectional_sliding_window_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="without causal"):
        lt.longctx_attention_forward(_Module(), q, k, v, None, sliding_window=4, is_causal=False)


@pytest.mark.parametrize("kw,what", [({"softcap": 30.0}, "softcap"),
                                     ({"s_aux": torch.zeros(4)}, "s_aux")])
def test_feature_missing_from_longctx_is_an_error(monkeypatch, kw, what):
    monkeypatch.setattr(lt, "_FLASH_KWARGS", frozenset({"softmax_scale", "causal"}))
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=what):
        lt.longctx_attention_forward(_Module(), q, k, v, None, **kw)

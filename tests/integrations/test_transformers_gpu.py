"""attn_implementation="longctx" under HuggingFace transformers on CUDA: the tiny families of
tiny_models.py in bf16 on the Hopper kernels, against the same weights under "eager".

Llama 3.1, Qwen2.5 and Mistral run here at head dim 64 (their CPU configs use 16), Gemma 2 at 256,
gpt-oss at 64 and Phi-3 at 96 as configured. The CUDA forward and backward run head dim 96 on
the 128 kernels (the columns past 96 load as zeros). Every family trains, Gemma 2's softcap and
gpt-oss's sinks through the CUDA backward.

Tolerance (set by the bf16 eager path's own error): the reference is eager in float64 on the CPU,
and for logits max|X_longctx - X_f64| <= 2 * max|X_eager_bf16 - X_f64| + 1e-3 * max|X_f64|;
gradients, where a single element's error is noisy in bf16, compare the relative L2 error,
scaled by the larger of eager bf16's and rounded_ref's (float64 attention rounded where a
flash kernel rounds: a flash backward's own error, 2.2x eager's on gpt-oss's k_proj):
|G_longctx - G_f64| / |G_f64| <= 2 * max(eager bf16's, rounded_ref's) + 1e-3.
"""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import rounded_ref  # noqa: E402  (registers its attn_implementation)
from tiny_models import (MODELS, assert_close_f64, cuda_model, cuda_models,  # noqa: E402
                         left_padded, positions, prompt)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# family -> head dim on CUDA (None: the family's own)
CUDA_HEAD_DIM = {"llama3.1": 64, "qwen2.5": 64, "mistral": 64, "gemma2": None, "gpt-oss": None,
                 "phi3": None}
NAMES = list(CUDA_HEAD_DIM)
NEW_TOKENS = 5
assert set(NAMES) <= set(MODELS)


def _models(name):
    return cuda_models(name, CUDA_HEAD_DIM[name])


def _logits(model, ids, **kw):
    return model(ids.to(model.device), **kw).logits.float().cpu()


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_eager(name):
    eager16, eager64, ours = _models(name)
    ids = prompt(name)
    with torch.no_grad():
        assert_close_f64(f"{name} logits", _logits(ours, ids), _logits(eager16, ids),
                         eager64(ids).logits, floor=1e-3, eager_name="eager bf16")


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    ids = ids.to(model.device)
    model(ids, labels=ids).loss.backward()
    model.eval()
    return {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_training_step_gradients_match_eager(name):
    eager16, eager64, ours = _models(name)
    rounded16 = cuda_model(name, rounded_ref.NAME, CUDA_HEAD_DIM[name])
    ids = prompt(name, seed=2)
    g_ours, g16, g_rounded, g64 = (_grads(m, ids)
                                    for m in (ours, eager16, rounded16, eager64))
    assert g_ours.keys() == g64.keys() == g16.keys() == g_rounded.keys()
    for n, ref in g64.items():
        norm = ref.norm().item()
        if norm == 0:
            continue
        err, err16, err_rounded = ((g[n] - ref).norm().item() / norm
                                   for g in (g_ours, g16, g_rounded))
        assert err <= 2 * max(err16, err_rounded) + 1e-3, (
            f"{name} grad {n}: relative L2 error {err:.3g} vs float64 > 2 x max(eager bf16's "
            f"{err16:.3g}, rounded_ref's {err_rounded:.3g}) + 1e-3")


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_rows_alone(name):
    """A left-padded batch runs as varlen: each row's logits against eager float64 on the row
    alone, the error scale from eager bf16 on the padded batch."""
    eager16, eager64, ours = _models(name)
    ids, mask, rows = left_padded(name, pad=5)
    kw = dict(attention_mask=mask.cuda(), position_ids=positions(mask).cuda())
    with torch.no_grad():
        batch, batch16 = _logits(ours, ids, **kw), _logits(eager16, ids, **kw)
        for r, row in enumerate(rows):
            keep = mask[r].bool()
            assert_close_f64(f"{name} padded row {r}", batch[r][keep], batch16[r][keep],
                             eager64(row).logits[0], floor=1e-3, eager_name="eager bf16")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_steps_match_eager(name):
    """generate() with transformers' cache (the decode steps through longctx): each step's logits
    against eager float64 on the sequence generate() produced."""
    eager16, eager64, ours = _models(name)
    ids = prompt(name, seed=3)
    n = ids.shape[1]
    with torch.no_grad():
        out = ours.generate(ids.cuda(), do_sample=False, max_new_tokens=NEW_TOKENS,
                            output_logits=True, return_dict_in_generate=True)
        seq = out.sequences.cpu()
        assert seq.shape[1] == n + NEW_TOKENS
        steps = torch.stack([s[0].float().cpu() for s in out.logits])
        prefix = seq[:, :-1]
        ref = eager64(prefix).logits[0, n - 1:]
        scale = _logits(eager16, prefix)[0, n - 1:]
    assert_close_f64(f"{name} generation logits", steps, scale, ref, floor=1e-3,
                     eager_name="eager bf16")


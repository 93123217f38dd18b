"""GPU training test of the flash-attention backward: a small causal GQA attention block trained
for a few dozen AdamW steps on a copy task, once with longctx.flash_attn_func and once with torch
SDPA (same initial weights, same batches, same bf16 casts around the attention); the two loss
curves must agree step by step (bf16 rounding noise only) and the loss must fall. A third run with
the query gradient zeroed (hook) must leave the tolerance band, so the comparison is shown to
detect a wrong gradient. Skipped without a Hopper GPU or when hdim 128 bf16 is not compiled.
"""
import pytest
import torch
import torch.nn.functional as F

import longctx
from gpu_kernels import skip_unless_compiled

pytestmark = pytest.mark.gpu

VOCAB, D_MODEL, HEADS, HEADS_KV, HDIM, SEQ, BATCH, STEPS = 64, 512, 4, 2, 128, 384, 8, 40


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        self.wq = torch.nn.Linear(D_MODEL, HEADS * HDIM, bias=False)
        self.wkv = torch.nn.Linear(D_MODEL, 2 * HEADS_KV * HDIM, bias=False)
        self.wo = torch.nn.Linear(HEADS * HDIM, D_MODEL, bias=False)
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens, attn):
        b, s = tokens.shape
        x = self.emb(tokens) + self.pos[:s]
        h = self.norm(x)
        q = self.wq(h).view(b, s, HEADS, HDIM)
        k, v = self.wkv(h).view(b, s, 2, HEADS_KV, HDIM).unbind(2)
        o = attn(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # (b, s, heads, hdim)
        x = x + self.wo(o.reshape(b, s, HEADS * HDIM))
        return self.head(x)


def _ours(q, k, v):
    return longctx.flash_attn_func(q, k, v, causal=True)


def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def _batches():
    g = torch.Generator(device="cpu").manual_seed(1234)
    out = []
    for _ in range(STEPS):
        half = torch.randint(0, VOCAB, (BATCH, SEQ // 2), generator=g)
        out.append(torch.cat([half, half], dim=1).cuda())  # second half copies the first
    return out


def _train(attn, zero_dq=False):
    torch.manual_seed(0)
    model = Block().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for tokens in _batches():
        def attn_hooked(q, k, v):
            if zero_dq and q.requires_grad:
                q.register_hook(lambda g: torch.zeros_like(g))
            return attn(q, k, v)
        logits = model(tokens[:, :-1], attn_hooked)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def _close(a, b):
    return (a - b).abs() <= 0.02 * b.abs() + 0.02


def test_train_loss_curve_matches_sdpa():
    skip_unless_compiled(HDIM, torch.bfloat16, ("flash_fwd", "flash_bwd"))
    ref = _train(_sdpa)
    ours = _train(_ours)
    assert ref[-1] < 0.7 * ref[0], f"the reference did not learn: {ref.tolist()}"
    bad = (~_close(ours, ref)).nonzero().flatten().tolist()
    assert not bad, (f"loss curves differ at steps {bad}: ours {ours.tolist()} "
                     f"sdpa {ref.tolist()}")
    # The comparison detects a wrong gradient: no query gradient moves the curve out of the band.
    broken = _train(_ours, zero_dq=True)
    assert not bool(_close(broken, ref).all()), "zeroed dq still matches: the test cannot fail"

"""GPU training test of the flash-attention backward: a small causal GQA attention block (no
residual: its output is the attention's) is trained for a few dozen AdamW steps to imitate a
fixed, randomly initialised teacher block (MSE on random inputs), once with
longctx.flash_attn_func and once with torch SDPA (same initial weights, same batches, same bf16
casts around the attention). The two loss curves must agree step by step to within bf16
rounding noise (1% relative; fp32-vs-bf16 SDPA differ by ~1e-4 on CPU) and the loss must fall.
A third run with the query gradient zeroed (hook) must leave the band, so the comparison is
shown to detect a wrong gradient. Skipped without a Hopper GPU or when hdim 128 bf16 is not
compiled.
"""
import pytest
import torch
import torch.nn.functional as F

import longctx
from gpu_kernels import skip_unless_compiled

pytestmark = pytest.mark.gpu

D_MODEL, HEADS, HEADS_KV, HDIM, SEQ, BATCH, STEPS = 256, 4, 2, 128, 256, 8, 30


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = torch.nn.Linear(D_MODEL, HEADS * HDIM, bias=False)
        self.wkv = torch.nn.Linear(D_MODEL, 2 * HEADS_KV * HDIM, bias=False)
        self.wo = torch.nn.Linear(HEADS * HDIM, D_MODEL, bias=False)
        self.norm = torch.nn.LayerNorm(D_MODEL)

    def forward(self, x, attn):
        b, s, _ = x.shape
        h = self.norm(x)
        q = self.wq(h).view(b, s, HEADS, HDIM) * 4.0  # sharper attention than at init
        k, v = self.wkv(h).view(b, s, 2, HEADS_KV, HDIM).unbind(2)
        o = attn(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # (b, s, heads, hdim)
        return self.wo(o.reshape(b, s, HEADS * HDIM))


def _ours(q, k, v):
    return longctx.flash_attn_func(q, k, v, causal=True)


def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


def _data():
    torch.manual_seed(1)
    teacher = Block().cuda()
    g = torch.Generator(device="cpu").manual_seed(1234)
    xs = [torch.randn(BATCH, SEQ, D_MODEL, generator=g).cuda() for _ in range(STEPS)]
    with torch.no_grad():
        ys = [teacher(x, _sdpa) for x in xs]
    return list(zip(xs, ys))


def _train(attn, data, zero_dq=False):
    torch.manual_seed(0)
    model = Block().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for x, y in data:
        def attn_hooked(q, k, v):
            if zero_dq and q.requires_grad:
                q.register_hook(lambda g: torch.zeros_like(g))
            return attn(q, k, v)
        loss = F.mse_loss(model(x, attn_hooked), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def _close(a, b):
    return (a - b).abs() <= 0.01 * b.abs()


def test_train_loss_curve_matches_sdpa():
    skip_unless_compiled(HDIM, torch.bfloat16, ("flash_fwd", "flash_bwd"))
    data = _data()
    ref = _train(_sdpa, data)
    ours = _train(_ours, data)
    assert ref[-1] < 0.7 * ref[0], f"the reference did not learn: {ref.tolist()}"
    bad = (~_close(ours, ref)).nonzero().flatten().tolist()
    assert not bad, (f"loss curves differ at steps {bad}: ours {ours.tolist()} "
                     f"sdpa {ref.tolist()}")
    # The comparison detects a wrong gradient: no query gradient moves the curve out of the band.
    broken = _train(_ours, data, zero_dq=True)
    assert not bool(_close(broken, ref).all()), "zeroed dq still matches: the test cannot fail"

"""apply_rope (fused RoPE on q and k) against a float64 reference, on CPU (always) and CUDA
(when a GPU is present): layouts, pair layouts, partial rotary, GQA, dtypes, positions as
offsets and past 2^21, in place and out of place, autograd, opcheck, torch.compile, errors."""
import pytest
import torch

import longctx
from rope_reference import rope_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def make(layout, dtype, device, b=2, s=37, h=8, hk=2, d=128, pos_max=4096, pos_dtype=torch.int64):
    shape = (b, s) if layout == "bshd" else (b * s,)
    q = torch.randn(*shape, h, d, dtype=dtype, device=device)
    k = torch.randn(*shape, hk, d, dtype=dtype, device=device)
    pos = torch.randint(0, pos_max, shape, device=device, dtype=pos_dtype)
    return q, k, pos


def check_fa3_rule(ours, x, pos, inv, factor, interleaved):
    ref = rope_ref(x, pos, inv, factor, interleaved)
    torch_same_precision = rope_ref(x, pos, inv, factor, interleaved, dtype=x.dtype)
    err, base = rel_err(ours, ref), rel_err(torch_same_precision, ref)
    assert err <= 2 * base + 1e-6, (err, base)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("inplace", [True, False])
def test_matches_reference(device, dtype, layout, interleaved, inplace):
    q, k, pos = make(layout, DTYPES[dtype], device)
    inv, factor = longctx.rope_frequencies(128, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 2048}, device=device)
    q0, k0 = q.clone(), k.clone()
    qo, ko = longctx.apply_rope(q, k, pos, inv, factor, interleaved=interleaved, inplace=inplace)
    if inplace:
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    else:
        assert torch.equal(q, q0) and torch.equal(k, k0)
    check_fa3_rule(qo, q0, pos, inv, factor, interleaved)
    check_fa3_rule(ko, k0, pos, inv, factor, interleaved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,rotary", [(128, 64), (64, 32), (96, 96), (80, 20), (256, 256), (6, 2)])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_and_odd_dims(device, d, rotary, inplace, interleaved):
    q, k, pos = make("bshd", torch.float32, device, b=1, s=19, h=3, hk=1, d=d)
    inv, _ = longctx.rope_frequencies(d, 10000.0, rotary_dim=rotary, device=device)
    q0 = q.clone()
    qo, _ = longctx.apply_rope(q, k, pos, inv, inplace=inplace, interleaved=interleaved)
    ref = rope_ref(q0, pos, inv, interleaved=interleaved)
    torch.testing.assert_close(qo.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(qo[..., rotary:], q0[..., rotary:])  # pass-through channels untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_positions_shared_offsets_and_int32(device, pos_dtype):
    # chunked prefill: one (seqlen,) position vector starting at an offset, shared by the batch
    q, k, _ = make("bshd", torch.float32, device, b=3, s=50)
    pos = torch.arange(7000, 7050, device=device, dtype=pos_dtype)
    inv, _ = longctx.rope_frequencies(128, 500000.0, device=device)
    q0 = q.clone()
    longctx.apply_rope(q, k, pos, inv)
    torch.testing.assert_close(q.double(), rope_ref(q0, pos, inv), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("center", [2 ** 20, 2 ** 21, 2 ** 23])
def test_accurate_at_large_positions(device, center):
    """Angles past 1M positions: the naive fp32 product pos * inv_freq is off by up to
    ulp(pos * f) / 2 ~ 0.06-0.5 rad there; the kernel's exact reduction keeps ~1e-6."""
    q, k, _ = make("thd", torch.float32, device, b=1, s=256, h=4, hk=1)
    pos = torch.randint(center - 1000, center + 1000, (256,), device=device)
    inv, _ = longctx.rope_frequencies(128, 10000.0, device=device)
    q0 = q.clone()
    longctx.apply_rope(q, k, pos, inv)
    ref = rope_ref(q0, pos, inv)
    ours = (q.double() - ref).abs().max().item()
    naive = (rope_ref(q0, pos, inv, dtype=torch.float32).double() - ref).abs().max().item()
    assert ours < 2e-5, ours
    assert naive > 50 * ours  # the test can tell an accurate kernel from a naive one


@pytest.mark.parametrize("device", DEVICES)
def test_k_none_and_noncontiguous_views(device):
    # q and k as strided views into one packed qkv projection, as models produce them
    qkv = torch.randn(2, 33, 8 + 2 + 2, 64, device=device, dtype=torch.bfloat16)
    q, k = qkv[:, :, :8], qkv[:, :, 8:10]
    v0 = qkv[:, :, 10:].clone()
    q0, k0 = q.clone(), k.clone()
    pos = torch.arange(33, device=device)
    inv, _ = longctx.rope_frequencies(64, device=device)
    longctx.apply_rope(q, k, pos, inv)
    check_fa3_rule(q, q0, pos, inv, 1.0, False)
    check_fa3_rule(k, k0, pos, inv, 1.0, False)
    assert torch.equal(qkv[:, :, 10:], v0)  # neighbours untouched
    q2 = q0.clone()
    qo, ko = longctx.apply_rope(q2, None, pos, inv)
    assert ko is None
    check_fa3_rule(qo, q0, pos, inv, 1.0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    q, k, pos = make("thd", torch.bfloat16, device, b=1, s=0)
    inv, _ = longctx.rope_frequencies(128, device=device)
    longctx.apply_rope(q, k, pos, inv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_autograd_is_inverse_rotation(device, interleaved):
    x = torch.randn(2, 9, 4, 64, device=device, requires_grad=True)
    kx = torch.randn(2, 9, 2, 64, device=device, requires_grad=True)
    pos = torch.randint(0, 10000, (2, 9), device=device)
    inv, factor = longctx.rope_frequencies(64, device=device, rotary_dim=48)
    factor = 1.3
    qo, ko = longctx.apply_rope(x * 1, kx * 1, pos, inv, factor, interleaved=interleaved)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (x, kx))
    xr = x.detach().double().requires_grad_()
    kr = kx.detach().double().requires_grad_()
    rq = rope_ref(xr, pos, inv, factor, interleaved)
    rk = rope_ref(kr, pos, inv, factor, interleaved)
    # pass-through channels of the reference: copy of the input
    rdq, rdk = torch.autograd.grad((rq * gq.double()).sum() + (rk * gk.double()).sum(), (xr, kr))
    torch.testing.assert_close(dq.double(), rdq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk.double(), rdk, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, pos = make("bshd", torch.float32, device, b=1, s=5, h=2, hk=1, d=32)
    inv, _ = longctx.rope_frequencies(32, device=device)
    args = (q, k, pos, inv, 1.0, False, False, -1)
    torch.library.opcheck(torch.ops.longctx.apply_rope.default, args)
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.longctx.apply_rope.default, (q, k, pos, inv, 1.2, True, False, -1))
    torch.library.opcheck(torch.ops.longctx.apply_rope_.default,
                          (q.detach().clone(), k.clone(), pos, inv, 1.0, False, False, 4096))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    inv, factor = longctx.rope_frequencies(64, device=device)

    def f(q, k, pos):
        q2, k2 = longctx.apply_rope(q, k, pos, inv, factor, inplace=False)
        q3, k3 = longctx.apply_rope(q2 * 2, k2 * 2, pos, inv, factor)  # in place on temporaries
        return q3 + 1, k3

    q, k, pos = make("bshd", torch.float32, device, b=2, s=7, h=4, hk=2, d=64)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    a = compiled(q, k, pos)
    b = f(q, k, pos)
    torch.testing.assert_close(a, b)
    # and with autograd through the compiled graph
    qg = q.clone().requires_grad_()
    out = compiled(qg, k, pos)[0].sum()
    out.backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_argument(device):
    q, k, pos = make("bshd", torch.float32, device, b=2, s=5, h=4, hk=2, d=64)
    inv, _ = longctx.rope_frequencies(64, device=device)

    def err(match, *args, **kw):
        with pytest.raises((RuntimeError, ValueError), match=match):
            longctx.apply_rope(*args, **kw)

    err("q must have dtype", q.double(), k.double(), pos, inv)
    err("k must have the same dtype as q", q, k.half(), pos, inv)
    err("q must have 3 or 4 dimensions", q[0, 0], k[0, 0], pos, inv)
    err("k must have the same leading", q, k[:, :4], pos, inv)
    err("k must have the same head_dim", q, k[..., :32], pos, inv)
    err("positions must have shape", q, k, pos[:, :4], inv)
    err("positions must have dtype", q, k, pos.float(), inv)
    err("inv_freq .*rotary_dim = 128", q, k, pos, torch.ones(64, device=device))
    err("inv_freq must have dtype", q, k, pos, inv.double())
    err("attention_factor must be a finite positive", q, k, pos, inv, float("nan"))
    err(r"positions must lie in \[0, max_position = 3\)", q, k, pos + 1, inv, max_position=3)
    err("q must be contiguous in its last dimension", q.transpose(-1, -2).contiguous().transpose(-1, -2), k, pos, inv)
    err("q is written in place and must not have overlapping",
        q[:, :, :1].expand(2, 5, 4, 64), k, pos, inv)
    if device == "cuda":
        err("positions must be on the same device as q", q, k, pos.cpu(), inv)
        err("inv_freq must be on the same device as q", q, k, pos, inv.cpu())
        err("k must be on the same device as q", q, k.cpu(), pos, inv)


@pytest.mark.gpu
def test_cuda_matches_cpu_op():
    q, k, pos = make("bshd", torch.bfloat16, "cpu", b=2, s=300, h=8, hk=2, d=128, pos_max=1 << 21)
    inv, factor = longctx.rope_frequencies(128, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
    qc, kc = longctx.apply_rope(q, k, pos, inv, factor, inplace=False)
    qg, kg = longctx.apply_rope(q.cuda(), k.cuda(), pos.cuda(), inv.cuda(), factor, inplace=False)
    # same fp32 arithmetic, one rounding to bf16: at most one bf16 ulp apart
    torch.testing.assert_close(qg.cpu().float(), qc.float(), rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(kg.cpu().float(), kc.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.gpu
def test_cuda_past_2_31_elements():
    # 2^31 + 2^19 bf16 elements of q: 64-bit offsets in the kernel (needs ~4.3 GB)
    T, H, D = (1 << 24) + (1 << 12), 1, 128
    q = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(T, 0, D, dtype=torch.bfloat16, device="cuda")
    pos = torch.arange(T, device="cuda", dtype=torch.int32) % 100000
    inv, _ = longctx.rope_frequencies(D, device="cuda")
    tail = q[-64:].clone()
    head = q[:64].clone()
    longctx.apply_rope(q, k, pos, inv)
    check_fa3_rule(q[-64:], tail, pos[-64:], inv, 1.0, False)
    check_fa3_rule(q[:64], head, pos[:64], inv, 1.0, False)

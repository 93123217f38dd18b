"""Worker processes for test_ring_cpu.py (spawned with torch.multiprocessing, gloo on CPU).

Each worker joins a gloo group on 127.0.0.1 with a short timeout, runs its list of scenarios and
writes {scenario id: error message or None} to <out>.<rank>.json; the test process reads them.
Every rank builds the same full-sequence inputs from the same seed, so it can compute the
single-device reference (longctx.flash_attn_func over the whole sequence) and compare its shard.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import ring_spawn

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# relative tolerance: max|ours - ref| <= TOL * max|ref| per tensor
TOL = {"fp32": 1e-5, "fp64": 1e-6}


def case_id(c) -> str:
    return "{layout}-{mask}-h{h}kv{hk}-{dtype}".format(**c)


def _init(rank, world, port, timeout_s):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _rel_err(name, ours, ref):
    ours, ref = ours.double(), ref.double()
    if ours.shape != ref.shape:
        return f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}", None
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(ours), inf):
        return f"{name}: -inf pattern differs", None
    ours, ref = ours[~inf], ref[~inf]
    if ref.numel() == 0:
        return None, 0.0
    if not torch.isfinite(ours).all():
        return f"{name}: non-finite values", None
    return None, ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_case(c, rank, world):
    import longctx
    from longctx.ring import ring_shard

    dtype = DTYPES[c["dtype"]]
    torch.manual_seed(1234)
    b, d, S = 2, 16, c["seqlen"]
    full = [torch.randn(b, S, c["h"], d, dtype=dtype), torch.randn(b, S, c["hk"], d, dtype=dtype),
            torch.randn(b, S, c["hk"], d, dtype=dtype)]
    dout_full = torch.randn(b, S, c["h"], d, dtype=dtype)
    causal, window, layout = c["causal"], tuple(c["window"]), c["layout"]

    ref_in = [t.clone().requires_grad_() for t in full]
    out_ref, lse_ref = longctx.flash_attn_func(*ref_in, causal=causal, window_size=window,
                                               return_lse=True)
    grads_ref = torch.autograd.grad(out_ref, ref_in, dout_full)

    shard = [ring_shard(t, rank, world, layout).clone().requires_grad_() for t in full]
    out, lse = longctx.ring_flash_attn_func(*shard, causal=causal, window_size=window,
                                            layout=layout, return_lse=True)
    grads = torch.autograd.grad(out, shard, ring_shard(dout_full, rank, world, layout))

    errs, worst = [], 0.0
    pairs = [("out", out, ring_shard(out_ref, rank, world, layout)),
             ("lse", lse, ring_shard(lse_ref, rank, world, layout, dim=2))]
    pairs += [(n, g, ring_shard(r, rank, world, layout))
              for n, g, r in zip(("dq", "dk", "dv"), grads, grads_ref)]
    for name, ours, ref in pairs:
        if name != "lse" and ours.dtype != dtype:
            errs.append(f"{name}: dtype {ours.dtype}")
        msg, rel = _rel_err(name, ours, ref)
        if msg:
            errs.append(msg)
        elif rel > TOL[c["dtype"]]:
            errs.append(f"{name}: relative error {rel:.2e} > {TOL[c['dtype']]:.0e}")
        else:
            worst = max(worst, rel)
    return ("; ".join(errs) if errs else None), worst


def run_cases(rank, world, port, cases, out):
    _init(rank, world, port, 30)
    ring_spawn.run_cases(rank, cases, lambda c: check_case(c, rank, world), case_id, out)


def run_errors(rank, world, port, timeout_s, out):
    """Scenarios that must raise on every rank; the last one leaves the group unusable."""
    import longctx

    _init(rank, world, port, timeout_s)
    res = {}
    t = torch.randn(1, 8, 2, 4)

    def mismatched():  # rank 1 passes a shorter shard
        x = t if rank != 1 else t[:, :6].contiguous()
        return longctx.ring_flash_attn_func(x, x, x, layout="zigzag")
    res["mismatch"] = ring_spawn.expect_raise(mismatched)

    def odd_zigzag():  # a local length of 7 cannot hold two equal zigzag chunks
        x = torch.randn(1, 7, 2, 4)
        return longctx.ring_flash_attn_func(x, x, x, layout="zigzag")
    res["odd_zigzag"] = ring_spawn.expect_raise(odd_zigzag)

    # the group is still usable after those: a correct call works
    res["after"] = ring_spawn.raised(lambda: longctx.ring_flash_attn_func(t, t, t))

    # rank 1 fails inside the loop (after the argument check): rank 0 must not hang
    ring_spawn.peer_failure(rank, lambda: longctx.ring_flash_attn_func(t, t, t), res, out,
                            linger_s=timeout_s + 1.0)

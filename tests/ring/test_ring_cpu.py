"""CPU tests of ring attention (longctx.ring_flash_attn_func) over gloo, 1, 2, 4 and 8 processes.

- In the test process: the layout helpers (shard / unshard round trip, zigzag positions, length
  checks), the per-block mask plan against a brute-force mask over the full sequence, the LSE
  merge on rows that see nothing.
- Spawned processes (ring_worker.py, gloo on 127.0.0.1, short timeouts): output, lse and
  dq, dk, dv of every rank's shard equal longctx.flash_attn_func over the full sequence, for both
  layouts, causal and not, a causal sliding window (5, 0) and a symmetric window (3, 3), GQA
  (4 q heads / 2 kv heads) and MQA (4 / 1), fp32 and float64; one spawn per world size runs every
  case and each case is reported as its own test. Tolerance: max|ours - ref| <= tol * max|ref|
  with tol 1e-5 for fp32 and 1e-6 for float64: the ops return lse in fp32, and the merge of
  partial results weighs them by exp(lse_i - lse), so float64 results carry the fp32 rounding
  of the partial lse (~1e-7 relative); float64 runs well under that bound.
- Errors: a mismatched shard shape on one rank and an odd zigzag shard raise the same ValueError
  on every rank; a rank failing inside the loop makes the other raise RingTimeoutError after the
  group's timeout instead of hanging.
"""
import time

import pytest
import torch

import longctx
from attention_reference import visible_mask
from longctx.ring.layout import local_segments, ring_positions, ring_shard, ring_unshard
from longctx.ring.merge import merge_
from longctx.ring.plan import plan_step
import ring_worker
from ring_spawn import assert_case_passed, assert_peer_failure_raised, spawn


MASKS = {"causal": (True, (-1, -1)), "full": (False, (-1, -1)), "causalwin": (True, (5, 0)),
         "symwin": (False, (3, 3))}


def _cases(world):
    cases = []
    for layout in ("zigzag", "contiguous"):
        for mask, (causal, window) in MASKS.items():
            for h, hk in ((4, 2), (4, 1)):
                for dtype in ("fp32", "fp64"):
                    # chunks of 3 (4 ranks) or 5 (2 ranks) tokens: windows cross chunk borders
                    c = {1: 4, 2: 5, 4: 3, 8: 2}[world]
                    cases.append(dict(layout=layout, mask=mask, causal=causal, window=window,
                                      h=h, hk=hk, dtype=dtype, seqlen=2 * world * c))
    return cases


_results = {}


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    """world size -> [per-rank {case id: result}], each world size spawned once."""
    def get(world):
        if world not in _results:
            t0 = time.time()
            _results[world] = spawn(ring_worker.run_cases, world, (_cases(world),),
                                     tmp_path_factory.mktemp(f"ring{world}"), "res")
            print(f"ring world {world}: {time.time() - t0:.1f} s")
        return _results[world]
    return get


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("case", _cases(2), ids=ring_worker.case_id)
def test_ring_matches_flash_attn(ring_results, world, case):
    per_rank = ring_results(world)
    cid = ring_worker.case_id(case)
    assert_case_passed(per_rank, cid)


def _cases8():
    """8 ranks (a node of 8 GPUs, here over gloo): float64, GQA, every mask and layout."""
    return [c for c in _cases(8) if c["dtype"] == "fp64" and (c["h"], c["hk"]) == (4, 2)]


@pytest.mark.parametrize("case", _cases8(), ids=ring_worker.case_id)
def test_ring_8_ranks_matches_flash_attn(tmp_path_factory, case):
    if 8 not in _results:
        _results[8] = spawn(ring_worker.run_cases, 8, (_cases8(),),
                             tmp_path_factory.mktemp("ring8"), "res")
    cid = ring_worker.case_id(case)
    assert_case_passed(_results[8], cid)


def test_ring_errors_raise_on_every_rank(tmp_path):
    timeout_s = 3
    t0 = time.time()
    res = spawn(ring_worker.run_errors, 2, (timeout_s,), tmp_path, "err")
    for r in range(2):
        m = res[r]["mismatch"]
        assert m.startswith("ValueError") and "disagree on q shape" in m, m
        assert "rank 0: q shape (1, 8, 2, 4)" in m and "rank 1: q shape (1, 6, 2, 4)" in m, m
        z = res[r]["odd_zigzag"]
        assert z.startswith("ValueError") and "divisible by 2" in z, z
        assert res[r]["after"] is None, res[r]["after"]
    assert_peer_failure_raised(res, timeout_s + 5)
    assert time.time() - t0 < 60


# --- in-process: layout, plan, merge --------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layout_round_trip(layout, world):
    x = torch.randn(2, 4 * world * 3, 3, 5)
    shards = [ring_shard(x, r, world, layout) for r in range(world)]
    assert all(s.shape == (2, 12, 3, 5) for s in shards)
    assert torch.equal(ring_unshard(shards, layout), x)
    pos = torch.cat([ring_positions(x.shape[1], r, world, layout) for r in range(world)])
    assert torch.equal(pos.sort().values, torch.arange(x.shape[1]))
    for r in range(world):  # positions index the full tensor to give the shard
        assert torch.equal(x[:, ring_positions(x.shape[1], r, world, layout)], shards[r])
    lse = torch.randn(2, 3, x.shape[1])
    assert torch.equal(ring_unshard([ring_shard(lse, r, world, layout, dim=2)
                                     for r in range(world)], layout, dim=2), lse)


def test_zigzag_positions():
    # 16 tokens, 4 ranks: chunks of 2; rank r holds chunks r and 7 - r
    assert ring_positions(16, 0, 4, "zigzag").tolist() == [0, 1, 14, 15]
    assert ring_positions(16, 1, 4, "zigzag").tolist() == [2, 3, 12, 13]
    assert ring_positions(16, 3, 4, "zigzag").tolist() == [6, 7, 8, 9]
    assert ring_positions(16, 2, 4, "contiguous").tolist() == [8, 9, 10, 11]


def test_seqlen_not_divisible_raises():
    x = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="divisible by 2 \\* world_size = 8"):
        ring_shard(x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by world_size = 5"):
        ring_shard(x, 0, 5, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_shard(x, 0, 2, "stripe")


WINDOWS = [(-1, -1), (0, 0), (1, 0), (2, 3), (5, 0), (0, 5), (3, -1), (-1, 2), (7, 7), (20, 1)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_matches_brute_force_mask(layout, world):
    """Blocks of every (rank, src) cover exactly the visible pairs, once, with the op's mask."""
    per_rank = 2 if layout == "zigzag" else 1
    for c in (1, 2, 3, 5):
        S = world * per_rank * c
        local = S // world
        for causal in (False, True):
            for window in WINDOWS:
                if causal and window[1] > 0:
                    continue
                full = visible_mask(S, S, causal, window)
                for r in range(world):
                    pq = ring_positions(S, r, world, layout)
                    for src in range(world):
                        want = full[pq][:, ring_positions(S, src, world, layout)]
                        cov = torch.zeros(local, local, dtype=torch.int64)
                        for b in plan_step(r, src, world, local, layout, causal, window):
                            assert b.window_left >= -1 and b.window_right >= -1
                            assert b.causal == (b.window_right == 0)
                            m = visible_mask(b.q1 - b.q0, b.k1 - b.k0, b.causal,
                                             (b.window_left, b.window_right))
                            assert m.any(), f"empty block {b}"
                            assert b.pairs == int(m.sum())
                            cov[b.q0:b.q1, b.k0:b.k1] += m.long()
                        assert torch.equal(cov, want.long()), (
                            f"world {world} {layout} c={c} causal={causal} window={window} "
                            f"rank {r} src {src}: {plan_step(r, src, world, local, layout, causal, window)}")


def test_plan_zigzag_causal_is_one_call_per_step():
    """ring-flash-attention's zigzag schedule falls out of the general rule."""
    n, local = 4, 8
    for r in range(n):
        for step in range(n):
            src = (r - step) % n
            (b,) = plan_step(r, src, n, local, "zigzag", True)
            if step == 0:
                assert (b.q0, b.q1, b.k0, b.k1, b.causal) == (0, 8, 0, 8, True)
            elif src < r:
                assert (b.q0, b.q1, b.k0, b.k1, b.causal, b.window_left) == (0, 8, 0, 4, False, -1)
            else:
                assert (b.q0, b.q1, b.k0, b.k1, b.causal, b.window_left) == (4, 8, 0, 8, False, -1)
    assert len(local_segments(1, n, local, "zigzag")) == 2


def test_plan_window_trims_blocks():
    # contiguous, 2 ranks of 8 tokens, causal window 2: rank 1 needs 2 keys of rank 0, 2 rows
    (b,) = plan_step(1, 0, 2, 8, "contiguous", True, (2, 0))
    assert (b.q0, b.q1, b.k0, b.k1) == (0, 2, 6, 8) and b.pairs == 3
    assert plan_step(0, 1, 2, 8, "contiguous", True, (2, 0)) == []


def test_merge_handles_empty_rows():
    b, s, h, d = 1, 3, 2, 4
    out_acc = torch.zeros(b, s, h, d)
    lse_acc = torch.full((b, h, s), float("-inf"))
    o1, l1 = torch.randn(b, s, h, d), torch.tensor([[[0.5, float("-inf"), float("-inf")]] * h])
    o1[:, 1:] = 0
    merge_(out_acc, lse_acc, o1, l1)
    o2, l2 = torch.randn(b, s, h, d), torch.tensor([[[1.0, 2.0, float("-inf")]] * h])
    o2[:, 2:] = 0
    merge_(out_acc, lse_acc, o2, l2)
    assert torch.isfinite(out_acc).all()
    assert torch.equal(out_acc[:, 2], torch.zeros(b, h, d)) and torch.isneginf(lse_acc[..., 2]).all()
    assert torch.allclose(out_acc[:, 1], o2[:, 1]) and torch.allclose(lse_acc[..., 1], l2[..., 1])
    w1, w2 = torch.sigmoid(torch.tensor(0.5 - 1.0)), torch.sigmoid(torch.tensor(1.0 - 0.5))
    assert torch.allclose(out_acc[:, 0], w1 * o1[:, 0] + w2 * o2[:, 0], atol=1e-6)
    assert torch.allclose(lse_acc[..., 0], torch.logaddexp(torch.tensor(0.5), torch.tensor(1.0)))


def test_public_api_exports():
    for name in ("ring_flash_attn_func", "ring_shard", "ring_unshard", "ring_positions"):
        assert callable(getattr(longctx, name))


def test_make_comm_choice(tmp_path, monkeypatch):
    """CPU tensors use torch.distributed; LONGCTX_RING_COMM is validated; the timeout override."""
    import datetime

    import torch.distributed as dist
    from longctx.ring import comm as ring_comm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=42))
    try:
        c = ring_comm.make_comm(None, torch.device("cpu"))
        assert isinstance(c, ring_comm.TorchDistComm) and c.world_size == 1
        monkeypatch.setenv("LONGCTX_RING_COMM", "nccl")
        with pytest.raises(RuntimeError, match="not on a CUDA device"):
            ring_comm.make_comm(None, torch.device("cpu"))
        monkeypatch.setenv("LONGCTX_RING_COMM", "mpi")
        with pytest.raises(ValueError, match="LONGCTX_RING_COMM must be auto, nccl or torch"):
            ring_comm.make_comm(None, torch.device("cpu"))
        monkeypatch.delenv("LONGCTX_RING_COMM")
        assert ring_comm._timeout_seconds(None, None) == 42.0
        assert ring_comm._timeout_seconds(None, datetime.timedelta(seconds=5)) == 5.0
        assert ring_comm.make_comm(None, torch.device("cpu")).timeout is None  # the group's
        monkeypatch.setenv("LONGCTX_RING_TIMEOUT", "7.5")
        assert ring_comm._timeout_seconds(None, None) == 7.5
        assert ring_comm.make_comm(None, torch.device("cpu")).timeout.total_seconds() == 7.5
        monkeypatch.setenv("LONGCTX_RING_TIMEOUT", "-1")
        with pytest.raises(ValueError, match="LONGCTX_RING_TIMEOUT must be positive"):
            ring_comm._timeout_seconds(None, None)
    finally:
        dist.destroy_process_group()
    # the NCCL communicator is compiled exactly when the build says so
    assert ring_comm.nccl_available() == bool(longctx.build_info().get("with_nccl"))
